#!/usr/bin/env python
"""Convert a DaViT checkpoint between the official, timm and mmpretrain
layouts, or Florence-2's vision tower to any of them.

    python tools/model_converters/davit_to_mmpretrain.py SRC DST
    python tools/model_converters/davit_to_mmpretrain.py SRC DST --to timm

SRC is a ``.pth``/``.pt``/``.bin`` checkpoint (file or http(s) URL) or a
``.safetensors`` file of an official (github.com/dingmyu/davit), timm
(also ``davit_base_fl`` / ``davit_huge_fl``) or mmpretrain DaViT classifier:
a plain state dict or one wrapped under ``state_dict``, ``model`` or
``state_dict_ema`` (``--key`` picks another). It may also be a
Florence-2 model (``pytorch_model.bin`` or ``model.safetensors`` of
microsoft/Florence-2-base or -large, remote-code layout, or of
florence-community/Florence-2-base or -large, transformers' layout), whole
or its vision tower alone: the tower's tensors are converted, every other
tensor is left out and counted, and the output norm the tower lacks is added
as identity. Its layout is detected. With
``--to mmpretrain`` (the default) DST is ``{'state_dict': ..., 'meta': ...}``
and loads with ``strict=True`` into davit_ext's DaViT (arch ``base-fl`` /
``huge-fl`` for Florence-2 towers); ``--to timm`` / ``--to official`` write
a plain state dict. Nothing is written when the conversion fails.
"""
import argparse
import os
import os.path as osp
import sys
from collections import OrderedDict

import torch

from davit_ext.version import __version__
from davit_ext.weights.layouts import (FLORENCE2_LAYOUTS, TARGET_LAYOUTS,
                                       UnknownLayoutError, UnmappedKeysError,
                                       convert, detect_layout,
                                       infer_num_stages, unwrap_state_dict)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert a DaViT checkpoint (official dingmyu/davit, '
        'timm, mmpretrain or a Florence-2 model\'s vision tower, detected) '
        'to the mmpretrain layout, or with --to to another one.')
    parser.add_argument('src', help='source checkpoint (.pth or .safetensors)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument(
        '--to',
        choices=TARGET_LAYOUTS,
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
    mmengine's runner writes (davit_ext.weights); downloads are checked
    against a sha256 where one is known. ``allow_pickle`` unpickles
    anything (trusted files only). A ``.safetensors`` file holds tensors
    only; of a Florence-2 one only the vision tower is read.

    Returns:
        tuple: The checkpoint and the names of tensors left unread (the
        non-vision-tower tensors of a Florence-2 ``.safetensors`` file).
    """
    from davit_ext.errors import UnsafeCheckpointError
    from davit_ext.weights import download_checkpoint, safe_torch_load
    from davit_ext.weights.florence2 import read_florence2_safetensors
    source = path
    if path.startswith(('http://', 'https://')):
        path = download_checkpoint(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'No checkpoint file at {path!r}.')
    if path.endswith('.safetensors'):
        return read_florence2_safetensors(path)
    if allow_pickle:
        return torch.load(path, map_location='cpu', weights_only=False), []
    try:
        return safe_torch_load(path, map_location='cpu', source=source), []
    except UnsafeCheckpointError as e:
        raise RuntimeError(f'{e} If you trust the file, run again with '
                           '--allow-pickle.') from None


def main(argv=None) -> int:
    args = parse_args(argv)
    ignored = []
    try:
        checkpoint, ignored = load_source(args.src, args.allow_pickle)
        state_dict = unwrap_state_dict(checkpoint, args.key)
        src_layout = detect_layout(state_dict)
        num_stages = infer_num_stages(state_dict, src_layout)
        converted = convert(state_dict, args.to, src_layout, num_stages,
                            ignored)
    except (UnknownLayoutError, UnmappedKeysError, FileNotFoundError, KeyError,
            TypeError, ValueError, RuntimeError, ImportError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    if args.to == 'mmpretrain':
        meta = dict(
            converted_from=src_layout,
            source=osp.basename(args.src),
            num_stages=num_stages,
            converter=f'davit_ext {__version__}')
        if src_layout in FLORENCE2_LAYOUTS:
            meta['ignored_tensors'] = len(ignored)
        out = OrderedDict(state_dict=converted, meta=meta)
    else:
        out = converted
    dst_dir = osp.dirname(osp.abspath(args.dst))
    os.makedirs(dst_dir, exist_ok=True)
    torch.save(out, args.dst)
    if src_layout in FLORENCE2_LAYOUTS:
        print(f'Florence-2 model ({src_layout} layout): converted its '
              f'vision tower (a {num_stages}-stage DaViT, '
              f'{len(converted) - 2} tensors, plus an identity output norm '
              f'it does not have) to {args.to}; ignored {len(ignored)} other '
              f'tensors (language model, image projection, position '
              f'embeddings): {args.dst}')
    else:
        print(f'Converted {len(converted)} tensors of a {num_stages}-stage '
              f'DaViT from the {src_layout} layout to {args.to}: {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
