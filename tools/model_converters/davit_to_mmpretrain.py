#!/usr/bin/env python
"""Convert a DaViT checkpoint between the official, timm and mmpretrain
layouts.

    python tools/model_converters/davit_to_mmpretrain.py SRC DST
    python tools/model_converters/davit_to_mmpretrain.py SRC DST --to timm

SRC is a ``.pth``/``.pt``/``.bin`` checkpoint (file or http(s) URL) or a
``.safetensors`` file of an official (github.com/dingmyu/davit), timm or
mmpretrain DaViT classifier: a plain state dict or one wrapped under
``state_dict``, ``model`` or ``state_dict_ema`` (``--key`` picks another).
Its layout is detected. With
``--to mmpretrain`` (the default) DST is ``{'state_dict': ..., 'meta': ...}``
and loads with ``strict=True`` into davit_ext's (and mmpretrain's) DaViT
classifier; ``--to timm`` / ``--to official`` write a plain state dict.
"""
import argparse
import os
import os.path as osp
import pickle
import sys
from collections import OrderedDict

import torch

from davit_ext.converters import (LAYOUTS, UnknownLayoutError,
                                  UnmappedKeysError, convert, detect_layout,
                                  infer_num_stages, unwrap_state_dict)
from davit_ext.version import __version__


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert a DaViT checkpoint (official dingmyu/davit, '
        'timm or mmpretrain layout, detected) to the mmpretrain layout, or '
        'with --to to another one.')
    parser.add_argument('src', help='source checkpoint (.pth or .safetensors)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument(
        '--to',
        choices=LAYOUTS,
        default='mmpretrain',
        help='target layout (default: mmpretrain)')
    parser.add_argument(
        '--key',
        default=None,
        help='entry of the checkpoint that holds the state dict (default: '
        'the first of state_dict, model, state_dict_ema, model_ema, or the '
        'checkpoint itself)')
    parser.add_argument(
        '--allow-pickle',
        action='store_true',
        help='load SRC with full pickle (weights_only=False). Only for files '
        'you trust: unpickling can run arbitrary code.')
    return parser.parse_args(argv)


def load_source(path: str, allow_pickle: bool = False):
    """Load a checkpoint file or http(s) URL.

    Safely by default: ``weights_only=True`` with the allowlist of what
    mmengine's runner writes (davit_ext.checkpoint); downloads are checked
    against the sha256 prefix in their name. ``allow_pickle`` unpickles
    anything (trusted files only).
    """
    from davit_ext.checkpoint import download_checkpoint, safe_load_context
    source = path
    if path.startswith(('http://', 'https://')):
        path = download_checkpoint(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'No checkpoint file at {path!r}.')
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError('Reading .safetensors needs the safetensors '
                              'package: pip install safetensors') from e
        return load_file(path, device='cpu')
    if allow_pickle:
        return torch.load(path, map_location='cpu', weights_only=False)
    try:
        with safe_load_context():  # allowlist, HistoryBuffer guarded
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines()]
        reason = next((ln for ln in lines if 'global' in ln.lower()),
                      lines[0] if lines else type(e).__name__)
        raise RuntimeError(
            f'refused to load {source}: it pickles objects other than '
            'tensors, plain containers and what mmengine writes (e.g. the '
            f'training arguments): {reason.split(". Please use")[0]}. '
            'Nothing from the file was executed. If you trust the file, run '
            'again with --allow-pickle.') from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        checkpoint = load_source(args.src, args.allow_pickle)
        state_dict = unwrap_state_dict(checkpoint, args.key)
        src_layout = detect_layout(state_dict)
        num_stages = infer_num_stages(state_dict, src_layout)
        converted = convert(state_dict, args.to, src_layout, num_stages)
    except (UnknownLayoutError, UnmappedKeysError, FileNotFoundError, KeyError,
            TypeError, RuntimeError, ImportError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    if args.to == 'mmpretrain':
        out = OrderedDict(
            state_dict=converted,
            meta=dict(
                converted_from=src_layout,
                source=osp.basename(args.src),
                num_stages=num_stages,
                converter=f'davit_ext {__version__}'))
    else:
        out = converted
    dst_dir = osp.dirname(osp.abspath(args.dst))
    os.makedirs(dst_dir, exist_ok=True)
    torch.save(out, args.dst)
    print(f'Converted {len(converted)} tensors of a {num_stages}-stage DaViT '
          f'from the {src_layout} layout to {args.to}: {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
