"""Florence-2's DaViT vision towers as davit_ext checkpoints.

Florence-2 ships the whole vision-language model in one ``pytorch_model.bin``
or ``model.safetensors``; its image encoder is a DaViT (our archs ``base-fl``
and ``huge-fl``). Hugging Face serves it in two layouts (see
:mod:`davit_ext.weights.layouts`): the remote-code model's
(microsoft/Florence-2-base, -large: ``vision_tower.convs.0.proj``...) and
transformers' own (florence-community/Florence-2-base, -large:
``model.vision_tower.convs.0.conv``...). This module reads either safely,
whole models or towers alone, keeps the tower and converts it to our
(mmpretrain) layout:

- :func:`read_safetensors` -- a ``.safetensors`` file (no pickle at all),
  optionally reading only the tensors under a prefix;
- :func:`load_vision_tower` -- a local Florence-2 file -> our state dict;
- the ``florence2://`` checkpoint scheme (:func:`install`):
  ``florence2://huggingface.co/<org>/<repo>/resolve/<revision>/<file>``
  (the metafile's weights of ``davit-{base,huge}-fl_florence2-pre_3rdparty``)
  fetches the file through ``huggingface_hub`` -- its cache (``HF_HOME`` /
  ``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE=1``), ``HF_ENDPOINT``
  mirrors and tokens -- at that revision (a branch, tag or commit: pin a
  commit for reproducible runs), and converts its tower on the fly; offline
  without a cached copy it stops with one message saying how to get one.
"""
import re
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor

from davit_ext.errors import CheckpointDownloadError, UnknownLayoutError
from .layouts import (convert, find_florence2_tower, florence2_vision_tower,
                      infer_num_stages, unwrap_state_dict)
from .safe_load import safe_torch_load

__all__ = [
    'SCHEME', 'read_safetensors', 'read_florence2_safetensors',
    'load_vision_tower', 'load_from_florence2', 'parse_url', 'install'
]

SCHEME = 'florence2://'
CONVERTER = 'tools/model_converters/davit_to_mmpretrain.py'
# florence2://HOST/ORG/REPO/resolve/REVISION/FILE (a Hugging Face file URL
# without its https://); REVISION may itself hold slashes (refs/pr/6).
_URL = re.compile(r'(?P<host>[^/]+)/(?P<repo>[^/]+/[^/]+)/resolve/'
                  r'(?P<revision>.+)/(?P<file>[^/]+)')


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


def read_florence2_safetensors(
        path: str) -> Tuple['OrderedDict[str, Tensor]', List[str]]:
    """Read a ``.safetensors`` file; of a whole Florence-2 model only the
    vision tower's tensors (the rest is mostly language model).

    Returns:
        tuple: The tensors read (under their own names) and the names of
        the tensors left unread.
    """
    keys: List[str] = []
    try:
        from safetensors import safe_open
        with safe_open(path, framework='pt', device='cpu') as f:
            keys = list(f.keys())
    except Exception:  # not installed or not a safetensors file: said below
        pass
    found = find_florence2_tower(keys)
    return read_safetensors(path, prefix=found[1] if found else None)


def _read_any(path: str) -> Tuple[Dict[str, Any], List[str]]:
    """A Florence-2 (or any) weights file -> (state dict, keys not read)."""
    if path.endswith('.safetensors'):
        return read_florence2_safetensors(path)
    return unwrap_state_dict(safe_torch_load(path, map_location='cpu')), []


def load_vision_tower(path: str) -> Tuple['OrderedDict[str, Tensor]', Dict]:
    """Convert the vision tower of a local Florence-2 file to our layout.

    Args:
        path: ``pytorch_model.bin`` or ``model.safetensors`` of a Florence-2
            model (microsoft/Florence-2-* or florence-community/Florence-2-*,
            the whole model), or of its vision tower alone.

    Returns:
        tuple: The state dict in our layout (``backbone.*`` keys, an
        identity output norm added, see :mod:`davit_ext.weights.layouts`) and a
        dict with ``layout`` (``florence2`` or ``florence2-native``),
        ``num_stages``, ``converted`` (tensors taken from the file) and
        ``ignored`` (the file's other tensors).

    Raises:
        UnknownLayoutError: The file holds no Florence-2 vision tower.
    """
    state_dict, skipped = _read_any(path)
    found = find_florence2_tower(state_dict)
    if found is None:
        raise UnknownLayoutError(
            f'{path} holds no Florence-2 vision tower (no key ends in '
            '"convs.0.proj.weight" (remote-code Florence-2) or '
            '"convs.0.conv.weight" (transformers\' Florence-2) next to its '
            'blocks).')
    layout, prefix = found
    tower, others = florence2_vision_tower(state_dict, prefix)
    num_stages = infer_num_stages(tower, layout)
    converted = convert(tower, 'mmpretrain', layout, num_stages)
    return converted, dict(
        layout=layout,
        num_stages=num_stages,
        converted=len(tower),
        ignored=len(others) + len(skipped))


def parse_url(filename: str) -> Dict[str, str]:
    """Split ``florence2://HOST/ORG/REPO/resolve/REVISION/FILE``.

    Returns:
        dict: ``host``, ``repo`` (``ORG/REPO``), ``revision`` and ``file``.

    Raises:
        CheckpointDownloadError: Not of that form (with an example).
    """
    m = _URL.fullmatch(filename[len(SCHEME):])
    if m is None:
        raise CheckpointDownloadError(
            f'{filename} is not a Florence-2 weights URL: write it as '
            f'{SCHEME}huggingface.co/ORG/REPO/resolve/REVISION/FILE, e.g. '
            f'{SCHEME}huggingface.co/microsoft/Florence-2-base/resolve/main/'
            'pytorch_model.bin (REVISION: a branch, tag or commit).')
    return m.groupdict()


def _hub_download(url: Dict[str, str]) -> str:
    """Fetch the file through huggingface_hub (its cache, offline mode,
    endpoint and token settings) and return its local path."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError,
                                            LocalEntryNotFoundError)
    except ImportError as e:
        raise ImportError(
            'Florence-2 weights are fetched with huggingface_hub: pip '
            'install huggingface_hub (a dependency of davit_ext).') from e
    # huggingface.co: None lets HF_ENDPOINT (a mirror) apply.
    endpoint = None if url['host'] == 'huggingface.co' else \
        'https://' + url['host']
    try:
        return hf_hub_download(
            url['repo'],
            url['file'],
            revision=url['revision'],
            endpoint=endpoint,
            library_name='davit_ext')
    except LocalEntryNotFoundError as e:
        # Offline (HF_HUB_OFFLINE=1) or no connection, and not in the cache.
        reason = str(e).strip().splitlines()[0].rstrip('.')
        raise CheckpointDownloadError(reason) from None
    except EntryNotFoundError as e:
        raise CheckpointDownloadError(
            f'{url["repo"]} has no file {url["file"]} at revision '
            f'{url["revision"]} ({type(e).__name__})') from None
    except (HfHubHTTPError, OSError) as e:
        reason = str(e).strip().splitlines()[0].rstrip('.')
        raise CheckpointDownloadError(reason) from None


def load_from_florence2(filename: str, map_location: Any = None) -> Dict:
    """mmengine ``CheckpointLoader`` scheme ``florence2://HOST/ORG/REPO/
    resolve/REVISION/FILE``.

    Fetches the Florence-2 weights file through huggingface_hub (into its
    cache; offline mode and mirrors as huggingface_hub has them) and returns
    ``{'state_dict': <our layout>, 'meta': ...}``.
    """
    url = parse_url(filename)
    https = 'https://' + filename[len(SCHEME):]
    from mmengine.dist import barrier, get_dist_info
    rank, world_size = get_dist_info()
    try:
        # Distributed: rank 0 downloads while the others wait (as mmengine's
        # loader does), then they find the file in the cache.
        if world_size > 1 and rank != 0:
            barrier()
        try:
            local = _hub_download(url)
        finally:
            if world_size > 1 and rank == 0:
                barrier()
    except CheckpointDownloadError as e:
        name, repo, rev = url['file'], url['repo'], url['revision']
        raise CheckpointDownloadError(
            f'could not fetch the Florence-2 weights {https} ({e}). On a '
            f'machine with network access run "hf download {repo} {name} '
            f'--revision {rev}" and copy its Hugging Face cache (HF_HOME, '
            '~/.cache/huggingface) here, where it is found offline; or '
            f'fetch {name} from https://huggingface.co/{repo}, convert its '
            f'vision tower with "python {CONVERTER} {name} tower.pth" and '
            "pass pretrained='tower.pth' (in a fine-tuning config: "
            "model.backbone.init_cfg.checkpoint='tower.pth').") from None
    state_dict, info = load_vision_tower(local)
    return dict(
        state_dict=state_dict,
        meta=dict(
            converted_from=info.pop('layout'),
            source=https,
            revision=url['revision'],
            **info))


# It reads only through safe_torch_load / safetensors: the schemes'
# install() keeps it instead of refusing an unknown scheme.
load_from_florence2._davit_ext_safe = True


def install() -> None:
    """Register the ``florence2://`` scheme with mmengine (idempotent)."""
    from mmengine.runner.checkpoint import CheckpointLoader
    if CheckpointLoader._schemes.get(SCHEME) is not load_from_florence2:
        CheckpointLoader.register_scheme(
            SCHEME, load_from_florence2, force=True)
