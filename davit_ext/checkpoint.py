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

HistoryBuffer's own ``__setstate__`` would copy the statistics methods a file
names into a class-level dict shared by the whole process; while we load, it
is replaced by one that only accepts mmengine's defaults (``min``, ``max``,
``mean``, ``current`` mapped to themselves) and leaves class state alone, and
the class dict is restored afterwards whatever happens.

URLs are downloaded into torch's hub cache (``<torch hub dir>/checkpoints``,
where mmengine and torch look too). A sha256 is checked only where one is
known:

- names in OpenMMLab's form, ``..._<YYYYMMDD>-<hex>.pth``: the hex digits
  start the file's sha256 (the published DaViT weights are named so);
- a ``SHA256`` in the metadata of one of our model-index entries whose
  ``Weights`` is that URL;
- one the caller passes (``sha256=`` or a ``#sha256=<hex>`` URL fragment);
- torchvision's own table (``torchvision://``), whose names carry torch
  hub's ``-<hex>.`` hash, as torchvision checks them itself.

Any other name (e.g. ``davit-tiny-20240315.pth``) is downloaded and loaded,
still safely, without a hash. A file this process downloaded that fails its
hash is removed before it reaches the cache; a file already in the cache
(possibly put there by the user) is never deleted: it is refused, kept, and
the message names it, the expected and actual hashes and what to do.

Every scheme mmengine's ``CheckpointLoader`` knows (local paths, http(s),
``torchvision://``/``modelzoo://``, ``open-mmlab://``/``openmmlab://``,
``mmcls://``, ``pavi://``, ``s3://``/``petrel://``) is served by a loader of
this module; a scheme registered by someone else before :func:`install` is
refused with one message.

Safety rests on torch >= 2.6 (CVE-2025-32434: ``weights_only`` could run code
up to 2.5.1); an older torch is refused with one message.

Public entry points:

- :func:`load_checkpoint_file` -- path or URL -> checkpoint object;
- :func:`safe_torch_load` -- a file or file object, no download;
- :func:`download_checkpoint` -- URL -> verified local path;
- :func:`check_state_dict_fits` -- refuse a checkpoint whose keys or shapes
  do not fit a model;
- :func:`install` / :func:`uninstall` -- route mmengine's
  ``CheckpointLoader`` (so the runner's ``load_from``/``resume``,
  ``mmengine.runner.load_checkpoint``, and mmpretrain's
  ``get_model``/``init_model``/``inference_model`` with ``pretrained=``)
  through these loaders, for every scheme, or give mmengine its own back.
"""
import contextlib
import hashlib
import io
import os
import os.path as osp
import pickle
import re
import socket
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

__all__ = [
    'CheckpointError', 'CheckpointNotFoundError', 'UnsafeCheckpointError',
    'CorruptCheckpointError', 'CheckpointIntegrityError',
    'CheckpointDownloadError', 'CheckpointMismatchError',
    'UnsupportedTorchError', 'UnknownSchemeError', 'allowed_globals',
    'safe_load_context', 'safe_torch_load', 'download_checkpoint',
    'load_checkpoint_file', 'check_state_dict_fits', 'install', 'uninstall',
    'is_installed', 'expected_sha256', 'expected_sha256_prefix',
    'CACHE_SUBDIR', 'MIN_TORCH', 'SCHEMES'
]

#: Sub-folder of ``torch.hub.get_dir()`` holding downloaded checkpoints.
CACHE_SUBDIR = 'checkpoints'
#: OpenMMLab's ``name_<YYYYMMDD>-<hex>.pth``: the hex starts the sha256.
_OPENMMLAB_NAME = re.compile(r'_\d{8}-([0-9a-f]{8,64})\.pth$')
#: torch hub's ``name-<hex>.ext`` (torchvision's weights are named so).
_TORCH_HUB_NAME = re.compile(r'-([0-9a-f]{8,64})\.[A-Za-z0-9]+$')
#: ``#sha256=<hex>`` at the end of a URL: a hash the user passes.
_SHA256_FRAGMENT = re.compile(r'^sha256=([0-9a-fA-F]{8,64})$')
#: The torch release whose ``weights_only`` loading the safety rests on.
MIN_TORCH = (2, 6)
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


class UnsupportedTorchError(CheckpointError):
    """Torch is older than :data:`MIN_TORCH`: no safe loading there."""


class UnknownSchemeError(CheckpointError):
    """A checkpoint scheme davit_ext does not serve safely."""


def _torch_version(version: Optional[str] = None) -> Tuple[int, int]:
    m = re.match(r'(\d+)\.(\d+)', version or torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _require_safe_torch() -> None:
    """Refuse to load anything with a torch whose weights_only is unsafe."""
    missing = not hasattr(torch.serialization, 'safe_globals')
    if _torch_version() < MIN_TORCH or missing:
        floor = '.'.join(map(str, MIN_TORCH))
        lacks = ' and lacks torch.serialization.safe_globals' if missing \
            else ''
        raise UnsupportedTorchError(
            f'davit_ext loads checkpoints only with torch >= {floor}, found '
            f'torch {torch.__version__}: older torch can run code from a '
            f'crafted checkpoint even with weights_only=True '
            f'(CVE-2025-32434){lacks}. Upgrade torch (pip install '
            f'"torch>={floor}" with its matching torchvision); nothing was '
            f'loaded.')


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


# Held while HistoryBuffer.__setstate__ is swapped for the guarded one, so
# that concurrent loads neither see nor restore each other's swap.
_GUARD_LOCK = threading.RLock()


def _guarded_setstate(self: Any, state: Dict[str, Any]) -> None:
    """HistoryBuffer's ``__setstate__`` without its class-state update.

    mmengine's version copies ``state['statistics_methods']`` into the class
    dict ``HistoryBuffer._statistics_methods`` (shared by every buffer of the
    process). A file written by mmengine holds exactly the defaults there;
    anything else is refused, and nothing is copied in either case.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    state = dict(state)
    methods = state.pop('statistics_methods', {})
    defaults = {
        name: getattr(HistoryBuffer, name)
        for name in _HISTORY_BUFFER_STATISTICS
    }
    if isinstance(methods, dict):
        missing = object()
        wrong = sorted(
            str(name) for name, method in methods.items()
            if defaults.get(name, missing) is not method)
    else:
        wrong = [type(methods).__name__]
    if wrong:
        raise pickle.UnpicklingError(
            f'a HistoryBuffer in it sets statistics methods {wrong} that are '
            f'not mmengine\'s own ({", ".join(_HISTORY_BUFFER_STATISTICS)} '
            f'mapped to themselves): this is not allowed')
    self.__dict__.update(state)


@contextlib.contextmanager
def safe_load_context() -> Iterator[None]:
    """Where ``torch.load(..., weights_only=True)`` may read mmengine files.

    Allows :func:`allowed_globals` and, for the duration, rebuilds
    HistoryBuffer without class-state changes (see :func:`_guarded_setstate`);
    ``HistoryBuffer._statistics_methods`` is restored on exit in any case.

    Raises:
        UnsupportedTorchError: torch is older than :data:`MIN_TORCH`.
    """
    _require_safe_torch()
    from mmengine.logging.history_buffer import HistoryBuffer
    with _GUARD_LOCK:
        had_own = '__setstate__' in HistoryBuffer.__dict__
        original = HistoryBuffer.__dict__.get('__setstate__')
        methods = dict(HistoryBuffer._statistics_methods)
        HistoryBuffer.__setstate__ = _guarded_setstate
        try:
            with torch.serialization.safe_globals(allowed_globals()):
                yield
        finally:
            if had_own:
                HistoryBuffer.__setstate__ = original
            else:
                del HistoryBuffer.__setstate__
            if HistoryBuffer._statistics_methods != methods:
                HistoryBuffer._statistics_methods.clear()
                HistoryBuffer._statistics_methods.update(methods)


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
        with safe_load_context():
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


def _url_name(url: str) -> str:
    return osp.basename(urllib.parse.urlparse(url).path)


def expected_sha256_prefix(url_or_name: str) -> Optional[str]:
    """The hex of an OpenMMLab-style ``..._<YYYYMMDD>-<hex>.pth`` name.

    Lower-case, or None for any other name (``davit-tiny-20240315.pth``,
    ``model-1a2b3c4d.pth``...): only OpenMMLab's form promises a hash.
    """
    path = urllib.parse.urlparse(url_or_name).path or url_or_name
    m = _OPENMMLAB_NAME.search(osp.basename(path))
    return m.group(1) if m else None


def _metafile_sha256(url: str) -> Optional[Tuple[str, str]]:
    """A ``SHA256`` of our model index for the entry whose weights are url."""
    try:
        from . import hub
        models = hub._load_models()
    except (ImportError, OSError):  # no model index: no hash from it
        return None
    for metainfo in models.values():
        if metainfo.weights != url or metainfo.metadata is None:
            continue
        data = getattr(metainfo.metadata, 'data', None)
        sha = data.get('SHA256') if isinstance(data, dict) else None
        if sha:
            return (str(sha).lower(),
                    f"davit_ext's model index ({metainfo.name})")
    return None


def expected_sha256(url: str,
                    sha256: Optional[str] = None) -> Optional[Tuple[str, str]]:
    """The sha256 (or its start) known for ``url``, and where it comes from.

    In order: ``sha256`` (passed by the caller), a ``#sha256=<hex>`` URL
    fragment, a ``SHA256`` in our model index's metadata for this URL, an
    OpenMMLab-style name. None when no hash is known: the file then loads
    (safely) without one.

    Args:
        url (str): The checkpoint URL.
        sha256 (str, optional): A hash (8 to 64 hex digits) the user passes.

    Returns:
        tuple | None: ``(lower-case hex, origin)``, origin naming the source
        in messages (e.g. ``'its name'``).
    """
    if sha256 is not None:
        if not re.fullmatch(r'[0-9a-fA-F]{8,64}', sha256):
            raise CheckpointIntegrityError(
                f'the sha256 given for checkpoint {url}, {sha256!r}, is not '
                f'8 to 64 hex digits: pass the start (or all) of the '
                f'file\'s sha256, e.g. from "sha256sum FILE".')
        return sha256.lower(), 'the sha256 passed'
    parsed = urllib.parse.urlparse(url)
    m = _SHA256_FRAGMENT.match(parsed.fragment)
    if m:
        return m.group(1).lower(), "the URL's #sha256 fragment"
    bare = urllib.parse.urlunparse(parsed._replace(fragment=''))
    from_index = _metafile_sha256(bare)
    if from_index is not None:
        return from_index
    prefix = expected_sha256_prefix(bare)
    return (prefix, 'its name') if prefix else None


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


def _refuse_download(url: str, dst: str, known: Tuple[str, str],
                     actual: str) -> CheckpointIntegrityError:
    expected, origin = known
    return CheckpointIntegrityError(
        f'checkpoint {url} failed its integrity check: {origin} says the '
        f'sha256 starts with {expected}, the downloaded file\'s sha256 is '
        f'{actual}. The downloaded file was removed and not loaded (nothing '
        f'was written to {dst}). Try again; if this persists, the server or '
        f'a proxy serves a different file: fetch it from the original source '
        f'and pass the local path instead.')


def _refuse_cached(url: str, dst: str, known: Tuple[str, str],
                   actual: str) -> CheckpointIntegrityError:
    expected, origin = known
    return CheckpointIntegrityError(
        f'checkpoint {url}: the file found at {dst} does not match: '
        f'{origin} says the sha256 starts with {expected}, the file\'s '
        f'sha256 is {actual}. It was not loaded and was left where it is. '
        f'If you copied it there, it is not the published file: copy the '
        f'right one over it (offline: fetch it on a machine with network '
        f'first), or pass the path of a file you trust instead of the URL. '
        f'To download it again instead, delete {dst} and run again.')


def download_checkpoint(url: str,
                        cache_dir: Optional[str] = None,
                        progress: Optional[bool] = None,
                        sha256: Optional[str] = None) -> str:
    """Download ``url`` into the cache (once) and return the local path.

    The file is written under a temporary name and renamed once complete
    and verified, so an interrupted download never leaves a partial file
    under the final name. Where a hash is known (:func:`expected_sha256`) a
    cached file is re-verified on every call; a mismatching cached file is
    refused but never deleted (the user may have put it there).

    Args:
        url (str): http(s) URL; a ``#sha256=<hex>`` fragment is a hash.
        cache_dir (str, optional): Defaults to torch's hub checkpoints dir.
        progress (bool, optional): Show a progress bar (default: on a tty).
        sha256 (str, optional): Start (or all) of the file's sha256.

    Raises:
        CheckpointIntegrityError: sha256 does not match the known hash.
        CheckpointDownloadError: the download is impossible (offline...).
    """
    return _download(url, cache_dir, progress, expected_sha256(url, sha256))


def _download(url: str, cache_dir: Optional[str], progress: Optional[bool],
              known: Optional[Tuple[str, str]]) -> str:
    url = urllib.parse.urldefrag(url)[0]
    cache_dir = _cache_dir(cache_dir)
    name = _url_name(url)
    if not name:
        raise CheckpointDownloadError(
            f'cannot tell the file name of checkpoint URL {url}: it must end '
            f'in the file name, e.g. https://host/path/model.pth.')
    dst = osp.join(cache_dir, name)

    if osp.isfile(dst):
        if known is not None:
            actual = _sha256(dst)
            if not actual.startswith(known[0]):
                raise _refuse_cached(url, dst, known, actual)
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
        hint = '' if known is None else \
            f' (its sha256 must start with {known[0]})'
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
    if known is not None and not actual.startswith(known[0]):
        _remove_quietly(tmp)  # ours, never seen by the user: removed
        raise _refuse_download(url, dst, known, actual)
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
                         progress: Optional[bool] = None,
                         sha256: Optional[str] = None) -> Any:
    """Load a checkpoint from a path, an http(s) URL or an mmengine scheme.

    URLs go through :func:`download_checkpoint` (cache + sha256 check where
    a hash is known), ``torchvision://``, ``open-mmlab://``... through this
    module's loader for that scheme, and every file through
    :func:`safe_torch_load`. Returns what the file holds (a dict for mmengine
    and published checkpoints).

    Args:
        path_or_url (str): Local path, URL or ``scheme://name``.
        map_location: As for :func:`torch.load`.
        cache_dir (str, optional): Download cache (URLs only).
        progress (bool, optional): Progress bar for downloads.
        sha256 (str, optional): Start (or all) of the file's sha256, checked
            for URLs and local paths alike (a local file is never deleted).
    """
    if _is_url(path_or_url):
        local = _download(path_or_url, cache_dir, progress,
                          expected_sha256(path_or_url, sha256))
        return safe_torch_load(
            local, map_location, source=urllib.parse.urldefrag(path_or_url)[0])
    if isinstance(path_or_url, str) and '://' in path_or_url:
        if sha256 is not None:
            raise CheckpointIntegrityError(
                f'sha256= is checked for local paths and http(s) URLs only, '
                f'not for {path_or_url}: download the file and pass its path.')
        return _scheme_loader(path_or_url)(path_or_url, map_location)
    if sha256 is not None and osp.isfile(osp.expanduser(path_or_url)):
        local = osp.expanduser(path_or_url)
        expected, origin = expected_sha256(local, sha256)
        actual = _sha256(local)
        if not actual.startswith(expected):
            raise CheckpointIntegrityError(
                f'checkpoint {local}: {origin} starts with {expected}, the '
                f'file\'s sha256 is {actual}. It was not loaded and was left '
                f'where it is: check that it is the file you meant, or pass '
                f'the right hash.')
    return safe_torch_load(path_or_url, map_location)


# --------------------------------------------------------------------------
# Fitting a model
# --------------------------------------------------------------------------


def state_dict_of(checkpoint: Any, source: str) -> Dict[str, Any]:
    """The weights of a checkpoint (``state_dict`` or the dict itself), without
    DDP's ``module.`` prefix."""
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
    state_dict = state_dict_of(checkpoint, source)
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
# mmengine integration: one safe loader per scheme CheckpointLoader knows
# --------------------------------------------------------------------------


def load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine ``CheckpointLoader`` scheme for local paths (safe)."""
    return safe_torch_load(filename, map_location)


def _load_url(url: str,
              map_location: Any = None,
              known: Optional[Tuple[str, str]] = None) -> Any:
    """Download (rank 0 first in a distributed run) and load safely."""
    from mmengine.dist import barrier, get_dist_info
    if known is None:
        known = expected_sha256(url)

    def load():
        local = _download(url, None, None, known)
        return safe_torch_load(
            local, map_location, source=urllib.parse.urldefrag(url)[0])

    rank, world_size = get_dist_info()
    if world_size > 1 and rank != 0:
        barrier()
        return load()
    try:
        return load()
    finally:
        if world_size > 1:
            barrier()


def load_from_http(filename: str, map_location: Any = None) -> Any:
    """mmengine ``CheckpointLoader`` scheme for http(s) URLs (safe).

    In a distributed run rank 0 downloads first while the others wait, as
    mmengine's own loader does.
    """
    return _load_url(filename, map_location)


def _split_scheme(filename: str) -> Tuple[str, str]:
    scheme, name = filename.split('://', 1)
    return scheme + '://', name


def _table_url(table: Dict[str, str], name: str, filename: str,
               what: str) -> str:
    if name not in table:
        close = sorted(k for k in table if k.split('_')[0] in name)[:5] or \
            sorted(table)[:5]
        raise CheckpointNotFoundError(
            f'checkpoint {filename}: {what} has no model named {name!r} '
            f'(e.g. {", ".join(close)}). Check the name, or pass a local '
            f'path or an http(s) URL.')
    return table[name]


def _table_known(url: str, what: str) -> Optional[Tuple[str, str]]:
    """The hash of a URL from mmengine's tables of published weights.

    Their files are all named with torch hub's ``-<hex>.pth`` (checked in
    mmengine 0.10.7's and torchvision 0.29's tables), so that hex is a known
    hash here, unlike in an arbitrary URL.
    """
    known = expected_sha256(url)
    if known is None:
        m = _TORCH_HUB_NAME.search(_url_name(url))
        known = (m.group(1), f'its name in {what}') if m else None
    return known


def load_from_torchvision(filename: str, map_location: Any = None) -> Any:
    """``torchvision://NAME`` (and the old ``modelzoo://NAME``), safely.

    The URL comes from torchvision's table (as in mmengine); its torch hub
    style name carries the sha256 start, which is checked as torchvision itself
    does.
    """
    from mmengine.runner import checkpoint as mm_checkpoint
    _, name = _split_scheme(filename)
    what = "torchvision's model table"
    url = _table_url(mm_checkpoint.get_torchvision_models(), name, filename,
                     what)
    return _load_url(url, map_location, _table_known(url, what))


def load_from_openmmlab(filename: str, map_location: Any = None) -> Any:
    """``open-mmlab://NAME`` / ``openmmlab://NAME``, safely.

    Names resolve as in mmengine: its table, plus
    ``$MMENGINE_HOME/open_mmlab.json``, deprecated names renamed; a URL is
    downloaded, anything else is a file under ``$MMENGINE_HOME``.
    """
    from mmengine.runner import checkpoint as mm_checkpoint
    _, name = _split_scheme(filename)
    name = mm_checkpoint.get_deprecated_model_names().get(name, name)
    what = "OpenMMLab's model table"
    target = _table_url(mm_checkpoint.get_external_models(), name, filename,
                        what)
    if _is_url(target):
        return _load_url(target, map_location, _table_known(target, what))
    path = osp.join(mm_checkpoint._get_mmengine_home(), target)
    return safe_torch_load(path, map_location, source=f'{filename} ({path})')


def load_from_mmcls(filename: str, map_location: Any = None) -> Any:
    """``mmcls://NAME``, safely (keys renamed as mmengine does)."""
    from mmengine.runner import checkpoint as mm_checkpoint
    _, name = _split_scheme(filename)
    what = "mmcls's model table"
    url = _table_url(mm_checkpoint.get_mmcls_models(), name, filename, what)
    return mm_checkpoint._process_mmcls_checkpoint(
        _load_url(url, map_location, _table_known(url, what)))


def load_from_pavi(filename: str, map_location: Any = None) -> Any:
    """``pavi://PATH``: downloaded with pavi, loaded safely."""
    try:
        from pavi import modelcloud
    except ImportError:
        raise CheckpointDownloadError(
            f'checkpoint {filename}: pavi:// needs the pavi package, which '
            f'is not installed. Install it, or download the file and pass '
            f'its local path.') from None
    model = modelcloud.get(filename[len('pavi://'):])
    with tempfile.TemporaryDirectory() as tmp_dir:
        path = osp.join(tmp_dir, osp.basename(str(model.name)) or 'ckpt.pth')
        model.download(path)
        return safe_torch_load(path, map_location, source=filename)


def load_from_ceph(filename: str,
                   map_location: Any = None,
                   backend: str = 'petrel') -> Any:
    """``s3://`` / ``petrel://`` (optionally ``cluster:s3://``), safely."""
    from mmengine import fileio
    try:
        data = fileio.get_file_backend(
            filename, backend_args={
                'backend': backend
            }).get(filename)
    except (ImportError, OSError, ValueError, KeyError) as err:
        raise CheckpointDownloadError(
            f'could not fetch checkpoint {filename}: {err}. Install and '
            f'configure the {backend} client, or download the file and pass '
            f'its local path.') from None
    with io.BytesIO(data) as buffer:
        return safe_torch_load(buffer, map_location, source=filename)


#: mmengine's ``CheckpointLoader`` prefixes and our loader for each.
SCHEMES: Dict[str, Callable] = {
    '': load_from_local,
    'http://': load_from_http,
    'https://': load_from_http,
    'torchvision://': load_from_torchvision,
    'modelzoo://': load_from_torchvision,
    'open-mmlab://': load_from_openmmlab,
    'openmmlab://': load_from_openmmlab,
    'mmcls://': load_from_mmcls,
    'pavi://': load_from_pavi,
    r'(\S+\:)?s3://': load_from_ceph,
    r'(\S+\:)?petrel://': load_from_ceph,
}
# The loaders install() replaced, by prefix, for uninstall().
_originals: Dict[str, Callable] = {}


def _refusing_loader(prefix: str, loader: Callable) -> Callable:
    """A loader for a scheme we do not know: refuse, say what to do."""
    owner = f'{getattr(loader, "__module__", "?")}.' \
        f'{getattr(loader, "__qualname__", repr(loader))}'

    def refuse(filename: str, map_location: Any = None, *args, **kwargs):
        raise UnknownSchemeError(
            f'refused to load checkpoint {filename}: its scheme {prefix!r} '
            f'is served by {owner}, which davit_ext cannot check loads with '
            f'weights_only=True. Download the file yourself and pass its '
            f'local path, or, if you trust that loader, call '
            f'davit_ext.checkpoint.uninstall() (or set '
            f'DAVIT_EXT_DISABLE=checkpoint before importing davit_ext).')

    refuse._davit_ext_refusal = prefix
    return refuse


def _scheme_loader(filename: str) -> Callable:
    """Our loader for ``filename``'s scheme (mmengine's matching rules)."""
    for prefix in sorted(SCHEMES, reverse=True):
        if prefix and re.match(prefix, filename) is not None:
            return SCHEMES[prefix]
    raise UnknownSchemeError(
        f'cannot load checkpoint {filename}: unknown scheme. davit_ext '
        f'loads local paths, http(s) URLs and '
        f'{", ".join(p for p in SCHEMES if p and "(" not in p)}, s3://, '
        f'petrel://. Download the file and pass its local path.')


def _ours(loader: Callable) -> bool:
    """Our loaders, refusals, and davit_ext loaders that read only through
    :func:`safe_torch_load` / safetensors (marked ``_davit_ext_safe``, e.g.
    ``florence2://``): these are kept by :func:`install`."""
    return (loader in SCHEMES.values() or hasattr(loader, '_davit_ext_refusal')
            or getattr(loader, '_davit_ext_safe', False))


def install() -> None:
    """Make mmengine load checkpoints only through this module.

    Every scheme of :data:`SCHEMES` gets our loader; any other scheme
    registered so far gets a loader that refuses with one message. Idempotent;
    :func:`uninstall` undoes it.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if not _ours(loader):
            _originals[prefix] = loader  # what uninstall() gives back
        if prefix not in SCHEMES and not _ours(loader):
            CheckpointLoader.register_scheme(
                prefix, _refusing_loader(prefix, loader), force=True)
    for prefix, loader in SCHEMES.items():
        CheckpointLoader.register_scheme(prefix, loader, force=True)


def uninstall() -> None:
    """Give mmengine its own checkpoint loaders back (undo :func:`install`).

    Schemes registered by others after :func:`install` stay as they are, and so
    do davit_ext's own extra schemes (``florence2://``), which replace nothing
    of mmengine's.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if not _ours(loader) or getattr(loader, '_davit_ext_safe', False):
            continue
        if prefix in _originals:
            CheckpointLoader.register_scheme(
                prefix, _originals[prefix], force=True)
        else:
            del CheckpointLoader._schemes[prefix]


def is_installed() -> bool:
    """Whether every scheme mmengine knows is served by this module."""
    from mmengine.runner.checkpoint import CheckpointLoader
    schemes = CheckpointLoader._schemes
    return all(schemes.get(p) is f for p, f in SCHEMES.items()) and all(
        _ours(f) for f in schemes.values())
