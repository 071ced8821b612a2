"""Florence-2's DaViT vision towers as davit_ext checkpoints.

Florence-2 (microsoft/Florence-2-base and -large on Hugging Face) ships the
whole vision-language model in one ``pytorch_model.bin`` or
``model.safetensors``; its image encoder is a DaViT under ``vision_tower.*``
(our archs ``base-fl`` and ``huge-fl``). This module reads such a file
safely, keeps the tower, and converts it to our (mmpretrain) layout with
:mod:`davit_ext.weights.layouts`:

- :func:`read_safetensors` -- a ``.safetensors`` file (no pickle at all),
  optionally reading only the tensors under a prefix;
- :func:`load_vision_tower` -- a local Florence-2 file -> our state dict;
- the ``florence2://`` checkpoint scheme (:func:`install`): the metafile
  names ``florence2://huggingface.co/<repo>/resolve/main/<file>``, so
  ``get_model('davit-base-fl_florence2-pre_3rdparty', pretrained=True)``
  downloads the Hugging Face file over https and converts its tower on the
  fly; offline it stops with one message saying how to convert a copy.
"""
import os.path as osp
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor

from davit_ext.errors import CheckpointDownloadError, UnknownLayoutError
from .download import download_checkpoint
from .layouts import (FLORENCE2_PREFIX, convert, detect_layout,
                      infer_num_stages, unwrap_state_dict)
from .safe_load import safe_torch_load

__all__ = [
    'SCHEME', 'read_safetensors', 'load_vision_tower', 'load_from_florence2',
    'install'
]

SCHEME = 'florence2://'
CONVERTER = 'tools/model_converters/davit_to_mmpretrain.py'


def read_safetensors(
    path: str,
    prefix: Optional[str] = None
) -> Tuple['OrderedDict[str, Tensor]', List[str]]:
    """Read a ``.safetensors`` file on the CPU.

    The format holds only tensors and a JSON header: reading it runs nothing
    from the file. With ``prefix``, only the tensors whose names start with it
    are read (a Florence-2 file is mostly language model).

    Returns:
        tuple: The tensors read, by name, and the names left unread.

    Raises:
        ImportError: safetensors is not installed (with the pip command).
        ValueError: The file is not a valid safetensors file.
    """
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as e:
        raise ImportError(
            f'Reading {path} needs the safetensors package: pip install '
            'safetensors (or pip install "davit_ext[safetensors]").') from e
    tensors, skipped = OrderedDict(), []
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            for key in f.keys():
                if prefix is None or key.startswith(prefix):
                    tensors[key] = f.get_tensor(key)
                else:
                    skipped.append(key)
    except SafetensorError as e:
        raise ValueError(
            f'{path} is not a valid .safetensors file ({e}). Pass the '
            'model.safetensors (or pytorch_model.bin) of a checkpoint; a '
            'partial download must be fetched again.') from None
    return tensors, skipped


def _read_any(path: str) -> Tuple[Dict[str, Any], List[str]]:
    """A Florence-2 (or any) weights file -> (state dict, keys not read)."""
    if path.endswith('.safetensors'):
        return read_safetensors(path, prefix=FLORENCE2_PREFIX)
    return unwrap_state_dict(safe_torch_load(path, map_location='cpu')), []


def load_vision_tower(path: str) -> Tuple['OrderedDict[str, Tensor]', Dict]:
    """Convert the vision tower of a local Florence-2 file to our layout.

    Args:
        path: ``pytorch_model.bin`` or ``model.safetensors`` of
            microsoft/Florence-2-base or -large (the whole model).

    Returns:
        tuple: The state dict in our layout (``backbone.*`` keys, an
        identity output norm added, see :mod:`davit_ext.weights.layouts`) and a
        dict with ``num_stages``, ``converted`` (tensors taken from the
        file) and ``ignored`` (the file's other tensors).

    Raises:
        UnknownLayoutError: The file holds no Florence-2 vision tower.
    """
    state_dict, skipped = _read_any(path)
    if not state_dict or detect_layout(state_dict) != 'florence2':
        raise UnknownLayoutError(
            f'{path} holds no Florence-2 vision tower (no '
            f'"{FLORENCE2_PREFIX}convs.0.proj.weight" key).')
    ignored: List[str] = []
    num_stages = infer_num_stages(state_dict, 'florence2')
    converted = convert(state_dict, 'mmpretrain', 'florence2', num_stages,
                        ignored)
    return converted, dict(
        num_stages=num_stages,
        converted=len(state_dict) - len(ignored),
        ignored=len(ignored) + len(skipped))


def load_from_florence2(filename: str, map_location: Any = None) -> Dict:
    """mmengine ``CheckpointLoader`` scheme ``florence2://HOST/PATH``.

    Downloads ``https://HOST/PATH`` (a Florence-2 weights file) into
    ``<torch hub dir>/checkpoints/florence2/<repo>/`` and returns
    ``{'state_dict': <our layout>, 'meta': ...}``.
    """
    url = 'https://' + filename[len(SCHEME):]
    parts = filename[len(SCHEME):].split('/')
    # One folder per repository: base and large files share their names.
    repo = '--'.join(parts[1:3]) if len(parts) > 3 else 'florence2'
    import torch
    cache_dir = osp.join(torch.hub.get_dir(), 'checkpoints', 'florence2', repo)
    from mmengine.dist import barrier, get_dist_info
    rank, world_size = get_dist_info()
    try:
        # Distributed: rank 0 downloads while the others wait (as mmengine's
        # loader does), then they find the file in the cache.
        if world_size > 1 and rank != 0:
            barrier()
        try:
            local = download_checkpoint(url, cache_dir=cache_dir)
        finally:
            if world_size > 1 and rank == 0:
                barrier()
    except CheckpointDownloadError as e:
        name = parts[-1]
        raise CheckpointDownloadError(
            f'could not download the Florence-2 weights {url} '
            f'({str(e).split(": ", 1)[-1].split(". ")[0]}). Without network '
            f'access: fetch {name} from https://huggingface.co/'
            f'{"/".join(parts[1:3])} on another machine, convert its vision '
            f'tower with "python {CONVERTER} {name} tower.pth" and pass '
            "pretrained='tower.pth' (in a fine-tuning config: "
            "model.backbone.init_cfg.checkpoint='tower.pth');"
            f' or copy {name} to {osp.join(cache_dir, name)}, where it is '
            'found without downloading.') from None
    state_dict, info = load_vision_tower(local)
    return dict(
        state_dict=state_dict,
        meta=dict(converted_from='florence2', source=url, **info))


# It reads only through safe_torch_load / safetensors: the schemes'
# install() keeps it instead of refusing an unknown scheme.
load_from_florence2._davit_ext_safe = True


def install() -> None:
    """Register the ``florence2://`` scheme with mmengine (idempotent)."""
    from mmengine.runner.checkpoint import CheckpointLoader
    if CheckpointLoader._schemes.get(SCHEME) is not load_from_florence2:
        CheckpointLoader.register_scheme(
            SCHEME, load_from_florence2, force=True)
