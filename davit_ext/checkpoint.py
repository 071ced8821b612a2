"""Safe checkpoint loading for davit_ext (and mmengine, once installed).

torch >= 2.6 loads checkpoints with ``weights_only=True``: its unpickler only
rebuilds tensors, containers and the globals it is told are safe, so a
checkpoint cannot run code while it is read. mmengine's runner checkpoints
need a few more types than torch allows by default. This module loads every
checkpoint with ``weights_only=True`` plus an explicit allowlist of exactly
what mmengine writes:

- ``mmengine.logging.history_buffer.HistoryBuffer`` (the message hub's
  logged scalars);
- numpy arrays and scalars inside those buffers and the runtime info
  (``ndarray``, ``dtype`` and the float64/int64/float32/int32 dtype
  classes, the array/scalar reconstructors);
- ``getattr`` *only* as mmengine uses it: HistoryBuffer pickles its
  statistics methods as ``getattr(HistoryBuffer, 'min')`` etc. A narrow
  stand-in is registered under the name ``builtins.getattr`` that resolves
  ``HistoryBuffer.{min,max,mean,current}`` and refuses anything else, so
  the real ``getattr`` (which would reopen arbitrary code execution) is never
  reachable from a checkpoint.

Anything else pickled in a file is refused with :class:`UnsafeCheckpointError`
before it is constructed: nothing from the file runs.

URLs are downloaded into torch's hub cache (``<torch hub dir>/checkpoints``,
where mmengine and torch look too). When the file name ends in
``-<8 hex digits>.pth`` (the OpenMMLab convention), those digits must be the
start of the file's sha256: a mismatch removes the file and raises
:class:`CheckpointIntegrityError`. Cached files are checked on every use.

Public entry points:

- :func:`load_checkpoint_file` -- path or URL -> checkpoint object;
- :func:`safe_torch_load` -- a file or file object, no download;
- :func:`download_checkpoint` -- URL -> verified local path;
- :func:`check_state_dict_fits` -- refuse a checkpoint whose keys or shapes
  do not fit a model;
- :func:`install` -- route mmengine's ``CheckpointLoader`` (so the runner's
  ``load_from``/``resume``, ``mmengine.runner.load_checkpoint``, and
  mmpretrain's ``get_model``/``init_model``/``inference_model`` with
  ``pretrained=``) through these loaders for local paths and http(s) URLs.
"""
import hashlib
import os
import os.path as osp
import pickle
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

__all__ = [
    'CheckpointError', 'CheckpointNotFoundError', 'UnsafeCheckpointError',
    'CorruptCheckpointError', 'CheckpointIntegrityError',
    'CheckpointDownloadError', 'CheckpointMismatchError', 'allowed_globals',
    'safe_torch_load', 'download_checkpoint', 'load_checkpoint_file',
    'check_state_dict_fits', 'install', 'is_installed',
    'expected_sha256_prefix', 'CACHE_SUBDIR'
]

#: Sub-folder of ``torch.hub.get_dir()`` holding downloaded checkpoints.
CACHE_SUBDIR = 'checkpoints'
#: ``name-<hex>.pth``: the hex digits start the file's sha256.
_HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.pth$')
#: Statistics methods HistoryBuffer registers on itself (and pickles by name).
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'mean', 'current')
_DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used.

    The message says what, where, and what to do; tools print it alone, without
    a traceback.
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """The file pickles an object outside the allowlist (nothing ran)."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, damaged, or not a torch checkpoint."""


class CheckpointIntegrityError(CheckpointError):
    """A downloaded file's sha256 does not match the hash in its name."""


class CheckpointDownloadError(CheckpointError):
    """A URL could not be downloaded (offline, unreachable, HTTP error)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not fit the model."""


# --------------------------------------------------------------------------
# The allowlist
# --------------------------------------------------------------------------


def _history_buffer_attribute(obj: Any, name: str) -> Any:
    """Stand-in for ``getattr`` while unpickling (see module docstring)."""
    from mmengine.logging.history_buffer import HistoryBuffer
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'getattr({_describe(obj)}, {name!r}) is not allowed: only '
        f'HistoryBuffer.{{{",".join(_HISTORY_BUFFER_STATISTICS)}}} is')


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f'{obj.__module__}.{obj.__qualname__}'
    return type(obj).__name__ + ' object'


def allowed_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """Globals allowed on top of torch's ``weights_only`` defaults.

    Entries are objects or ``(object, 'pickled.module.name')`` pairs, the form
    ``torch.serialization.safe_globals`` takes.
    """
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    rc: List[Union[Callable, Tuple[Callable, str]]] = [
        HistoryBuffer,
        (_history_buffer_attribute, 'builtins.getattr'),
        np.ndarray,
        np.dtype,
    ]
    # A dtype unpickles as an instance of its own class (numpy >= 1.25:
    # numpy.dtypes.Float64DType...), which the unpickler must be allowed to
    # build. mmengine's buffers and scalars are float64/int64 (float32/int32
    # where those are the platform defaults).
    for name in ('float64', 'int64', 'float32', 'int32'):
        dtype_class = type(np.dtype(name))
        if dtype_class is not np.dtype:
            rc.append(dtype_class)
    # Files written with numpy 1.x name the reconstructors numpy.core.*,
    # files written with numpy 2.x name them numpy._core.*.
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        rc.append((multiarray._reconstruct, f'{module}._reconstruct'))
        rc.append((multiarray.scalar, f'{module}.scalar'))
    return rc


# --------------------------------------------------------------------------
# Loading a local file
# --------------------------------------------------------------------------


def _unpickling_reason(err: BaseException) -> str:
    """The specific sentence of torch's weights_only error message."""
    text = str(err)
    # torch >= 2.6 puts the refusal in the first paragraph after this marker.
    marker = 'WeightsUnpickler error:'
    if marker in text:
        reason = text.split(marker, 1)[1].strip().splitlines()[0]
        return reason.split(' Please use `torch.serialization')[0]
    parts = [p.strip() for p in text.split('\n\n') if p.strip()]
    for part in parts:
        if part.startswith('Weights only load failed') or part.startswith(
                'Check the documentation'):
            continue
        return part.split(' Please use `torch.serialization')[0]
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _is_refusal(reason: str) -> bool:
    """True if torch refused an object (rather than hitting bad bytes)."""
    keys = ('GLOBAL', 'global', 'is not allowed', 'reduce for unrecognized',
            'Can only create new object', 'Can only build',
            'Unsupported operand', 'must be imported to load')
    return any(k in reason for k in keys)


def safe_torch_load(file: Union[str, os.PathLike, Any],
                    map_location: Any = None,
                    source: Optional[str] = None) -> Any:
    """``torch.load(file, weights_only=True)`` with :func:`allowed_globals`.

    Args:
        file: A path or a binary file object.
        map_location: As for :func:`torch.load`.
        source (str, optional): How to name the file in errors (e.g. the URL
            it came from). Defaults to ``file``.

    Raises:
        CheckpointNotFoundError: ``file`` is a path that does not exist.
        UnsafeCheckpointError: the file pickles a disallowed object.
        CorruptCheckpointError: the file is truncated or not a checkpoint.
    """
    if isinstance(file, (str, os.PathLike)):
        file = osp.expanduser(os.fspath(file))
        source = source or file
        if not osp.exists(file):
            raise CheckpointNotFoundError(
                f'checkpoint {file!r} does not exist (looked in '
                f'{osp.abspath(file)!r}). Check the path, or give an '
                f'http(s) URL of a published checkpoint.')
        if osp.isdir(file):
            raise CheckpointNotFoundError(
                f'checkpoint {file!r} is a folder, not a file. Pass the '
                f'.pth file itself (a run\'s work_dir holds epoch_N.pth / '
                f'iter_N.pth and a "last_checkpoint" file naming the latest).')
    source = source or repr(file)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(
                file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickling_reason(err)
        if _is_refusal(reason):
            raise UnsafeCheckpointError(
                f'refused to load checkpoint {source}: it contains a pickled '
                f'object that is neither a tensor nor one of the types '
                f'mmengine writes ({reason}). Nothing from the file was '
                f'executed. Only load checkpoints from sources you trust; if '
                f'you trust this one, re-save just its weights in an '
                f'isolated environment, e.g. '
                f'torch.save({{"state_dict": ckpt["state_dict"]}}, path).'
            ) from None
        raise _corrupt(source, reason) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError,
            zipfile.BadZipFile, UnicodeDecodeError, IndexError, AttributeError,
            TypeError) as err:
        if isinstance(err, CheckpointError):
            raise
        reason = str(err).split('. This is an internal')[0] or \
            type(err).__name__
        raise _corrupt(source, reason) from None


def _corrupt(source: str, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f'cannot read checkpoint {source}: the file is truncated, damaged or '
        f'not a torch checkpoint ({reason.strip()}). Copy or download it '
        f'again; for a run of your own, resume from an earlier epoch_N.pth / '
        f'iter_N.pth in its work_dir.')


# --------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------


def expected_sha256_prefix(url_or_name: str) -> Optional[str]:
    """The hex digits of ``...-<hex>.pth`` (lower-case), or None."""
    path = urllib.parse.urlparse(url_or_name).path or url_or_name
    m = _HASH_IN_NAME.search(osp.basename(path))
    return m.group(1) if m else None


def _cache_dir(cache_dir: Optional[str]) -> str:
    if cache_dir is None:
        cache_dir = osp.join(torch.hub.get_dir(), CACHE_SUBDIR)
    os.makedirs(cache_dir, exist_ok=True)
    return cache_dir


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _refuse_hash(url: str, path: str, expected: str,
                 actual: str) -> CheckpointIntegrityError:
    return CheckpointIntegrityError(
        f'checkpoint {url} failed its integrity check: its name says the '
        f'sha256 starts with {expected}, the downloaded file\'s sha256 is '
        f'{actual}. The file was removed from the cache ({path}) and not '
        f'loaded. Download it again; if this persists, the server or a proxy '
        f'serves a different file: fetch it from the original source and '
        f'pass the local path instead.')


def download_checkpoint(url: str,
                        cache_dir: Optional[str] = None,
                        progress: Optional[bool] = None) -> str:
    """Download ``url`` into the cache (once) and return the local path.

    The file is written under a temporary name and renamed once complete
    and verified, so an interrupted download never leaves a partial file
    under the final name. A cached file is re-verified on every call.

    Raises:
        CheckpointIntegrityError: sha256 does not match the name's hex.
        CheckpointDownloadError: the download is impossible (offline...).
    """
    cache_dir = _cache_dir(cache_dir)
    name = osp.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise CheckpointDownloadError(
            f'cannot tell the file name of checkpoint URL {url}: it must end '
            f'in the file name, e.g. https://host/path/model-1a2b3c4d.pth.')
    dst = osp.join(cache_dir, name)
    expected = expected_sha256_prefix(name)

    if osp.isfile(dst):
        if expected is not None:
            actual = _sha256(dst)
            if not actual.startswith(expected):
                os.remove(dst)
                raise _refuse_hash(url, dst, expected, actual)
        return dst

    if progress is None:
        progress = sys.stderr.isatty()
    tmp = f'{dst}.{uuid.uuid4().hex[:8]}.partial'
    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(
            url, headers={'User-Agent': 'davit_ext'})
        with urllib.request.urlopen(
                request, timeout=_DOWNLOAD_TIMEOUT_S) as response, \
                open(tmp, 'wb') as out:
            total = response.headers.get('Content-Length')
            bar = _progress_bar(name, total, progress)
            for chunk in iter(lambda: response.read(_CHUNK), b''):
                out.write(chunk)
                digest.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
    except (urllib.error.URLError, socket.timeout, ConnectionError,
            OSError) as err:
        _remove_quietly(tmp)
        reason = getattr(err, 'reason', None) or err
        if isinstance(err, urllib.error.HTTPError):
            reason = f'HTTP {err.code} {err.reason}'
        hint = '' if expected is None else \
            f' (its sha256 must start with {expected})'
        raise CheckpointDownloadError(
            f'could not download checkpoint {url}: {reason}. Without network '
            f'access, fetch the file on another machine and pass its local '
            f'path instead of the URL (tools/test.py CONFIG /path/to/{name}, '
            f"or inference_model(..., pretrained='/path/to/{name}')), or "
            f'copy it to {dst}{hint} where it is found without '
            f'downloading.') from None
    except BaseException:
        _remove_quietly(tmp)
        raise

    actual = digest.hexdigest()
    if expected is not None and not actual.startswith(expected):
        _remove_quietly(tmp)
        raise _refuse_hash(url, dst, expected, actual)
    os.replace(tmp, dst)
    return dst


def _progress_bar(name: str, total: Optional[str], enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(
        total=int(total) if total and total.isdigit() else None,
        unit='B',
        unit_scale=True,
        desc=f'Downloading {name}',
        file=sys.stderr)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _is_url(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(('http://', 'https://'))


def load_checkpoint_file(path_or_url: str,
                         map_location: Any = None,
                         cache_dir: Optional[str] = None,
                         progress: Optional[bool] = None) -> Any:
    """Load a checkpoint from a local path or an http(s) URL, safely.

    URLs go through :func:`download_checkpoint` (cache + sha256 check), every
    file through :func:`safe_torch_load`. Returns what the file holds (a dict
    for mmengine and published checkpoints).
    """
    if _is_url(path_or_url):
        local = download_checkpoint(path_or_url, cache_dir, progress)
        return safe_torch_load(local, map_location, source=path_or_url)
    return safe_torch_load(path_or_url, map_location)


# --------------------------------------------------------------------------
# Fitting a model
# --------------------------------------------------------------------------


def _state_dict_of(checkpoint: Any, source: str) -> Dict[str, Any]:
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(
            f'checkpoint {source} holds a {type(checkpoint).__name__}, not a '
            f'dict of weights: it is not a model checkpoint.')
    state_dict = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state_dict, dict):
        raise CheckpointMismatchError(
            f'checkpoint {source}: "state_dict" is a '
            f'{type(state_dict).__name__}, not a dict of tensors.')
    return {re.sub(r'^module\.', '', k): v for k, v in state_dict.items()}


def _listing(keys: List[str], limit: int = 5) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)'
                    if len(keys) > limit else '')


def check_state_dict_fits(model: torch.nn.Module,
                          checkpoint: Any,
                          source: str,
                          strict: bool = True,
                          model_name: str = 'the model') -> None:
    """Raise :class:`CheckpointMismatchError` unless the weights fit.

    ``strict=True``: same keys and shapes (what resuming and testing need).
    ``strict=False``: shared keys must have equal shapes and at least one key
    must be shared (fine-tuning may leave e.g. a new head out).
    A ``module.`` prefix (from a DDP-wrapped model) is ignored.
    """
    state_dict = _state_dict_of(checkpoint, source)
    if hasattr(model, 'module') and not any(
            k.startswith('module.') for k in state_dict):
        model = model.module  # a wrapper (e.g. TTA) around the model
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f'{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})'
        for k, v in state_dict.items() if k in own and hasattr(v, 'shape')
        and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = []
    if strict and missing:
        problems.append(f'{len(missing)} key(s) of {model_name} are '
                        f'missing: {_listing(missing)}')
    if strict and unexpected:
        problems.append(f'{len(unexpected)} key(s) are not in {model_name}: '
                        f'{_listing(unexpected)}')
    if shapes:
        problems.append(f'{len(shapes)} shape mismatch(es): '
                        f'{_listing(shapes, 3)}')
    if not strict and own and len(missing) == len(own):
        problems.append(f'none of its {len(state_dict)} keys belongs to '
                        f'{model_name} (e.g. {_listing(list(state_dict), 3)})')
    if problems:
        raise CheckpointMismatchError(
            f'checkpoint {source} does not fit {model_name}: ' +
            '; '.join(problems) + '. Use a checkpoint saved from this '
            'config (same arch and num_classes); DaViT weights in the timm '
            'layout must be converted first (davit_ext.converters).')


# --------------------------------------------------------------------------
# mmengine integration
# --------------------------------------------------------------------------


def load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine ``CheckpointLoader`` scheme for local paths (safe)."""
    return safe_torch_load(filename, map_location)


def load_from_http(filename: str, map_location: Any = None) -> Any:
    """mmengine ``CheckpointLoader`` scheme for http(s) URLs (safe).

    In a distributed run rank 0 downloads first while the others wait, as
    mmengine's own loader does.
    """
    from mmengine.dist import barrier, get_dist_info
    rank, world_size = get_dist_info()
    if world_size > 1 and rank != 0:
        barrier()
        return load_checkpoint_file(filename, map_location)
    try:
        return load_checkpoint_file(filename, map_location)
    finally:
        if world_size > 1:
            barrier()


def install() -> None:
    """Make mmengine load local and http(s) checkpoints through this module.

    Idempotent. Other schemes (``open-mmlab://``, ``s3://``...) keep mmengine's
    loaders (torch's plain ``weights_only`` default applies).
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    if is_installed():
        return
    CheckpointLoader.register_scheme('', load_from_local, force=True)
    CheckpointLoader.register_scheme(('http://', 'https://'),
                                     load_from_http,
                                     force=True)


def is_installed() -> bool:
    """Whether mmengine's loaders for paths and URLs are ours."""
    from mmengine.runner.checkpoint import CheckpointLoader
    schemes = CheckpointLoader._schemes
    return (schemes.get('') is load_from_local
            and schemes.get('http://') is load_from_http
            and schemes.get('https://') is load_from_http)
