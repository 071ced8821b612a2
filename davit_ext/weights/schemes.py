"""mmengine's ``CheckpointLoader``, made safe for every scheme it knows.

:func:`install` (run by ``import davit_ext`` unless
``DAVIT_EXT_DISABLE=checkpoint``) gives each scheme a loader that reads only
through :func:`~davit_ext.weights.safe_load.safe_torch_load` semantics:

- local paths and http(s) URLs: ours (downloads checked against the sha256
  known for them, one clear message per failure);
- ``torchvision://``/``modelzoo://``, ``open-mmlab://``/``openmmlab://``,
  ``mmcls://``, ``pavi://``, ``s3://``/``petrel://``: mmengine's own loaders
  (their name tables, deprecated names, ``$MMENGINE_HOME``, key renaming),
  run with ``weights_only`` forced, our allowlist, and their URL and file
  reads routed to our two loaders above;
- any scheme registered by someone else before :func:`install`: refused with
  one message (davit_ext cannot check what it loads).

So the runner's ``load_from``/``resume``, ``mmengine.runner.load_checkpoint``
and mmpretrain's ``get_model``/``inference_model`` load safely.
"""
import contextlib
import os
import pickle
import re
import urllib.parse
from typing import Any, Callable, Dict, Iterator, Optional

from davit_ext.errors import (CheckpointDownloadError, CheckpointError,
                              CheckpointIntegrityError,
                              CheckpointNotFoundError, UnknownSchemeError)
from .download import (TORCH_HUB_NAME, Known, download_checkpoint,
                       expected_sha256, file_sha256, is_url, url_file_name)
from .safe_load import (_LOCK, _Refused, safe_load_context, safe_torch_load,
                        unsafe_error)

__all__ = [
    'load_checkpoint_file', 'load_from_local', 'load_from_http', 'SCHEMES',
    'install', 'uninstall', 'is_installed'
]


def load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine ``CheckpointLoader`` scheme for local paths (safe)."""
    return safe_torch_load(filename, map_location)


def _load_url(url: str, map_location: Any = None, known: Known = None) -> Any:
    """Download (rank 0 first in a distributed run) and load safely."""
    from mmengine.dist import barrier, get_dist_info

    def load():
        local = download_checkpoint(url, known=known)
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
    """mmengine ``CheckpointLoader`` scheme for http(s) URLs (safe)."""
    return _load_url(filename, map_location)


@contextlib.contextmanager
def _weights_only_forced() -> Iterator[None]:
    """``torch.load`` of foreign code uses ``weights_only=True`` even where it
    asks for ``False`` (torch's own switch, read on every call)."""
    saved = {
        k: os.environ.pop(k, None)
        for k in ('TORCH_FORCE_WEIGHTS_ONLY_LOAD',
                  'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD')
    }
    os.environ['TORCH_FORCE_WEIGHTS_ONLY_LOAD'] = '1'
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def _wrap(mm_loader: Callable, table: Optional[str] = None) -> Callable:
    """mmengine's ``mm_loader``, safe: forced ``weights_only`` with our
    allowlist, and its URL/local reads through our loaders.

    URLs from a name ``table`` are checked against the torch-hub hash in their
    names.
    """

    def http(url: str, map_location: Any = None, **_) -> Any:
        known = expected_sha256(url)
        m = TORCH_HUB_NAME.search(url_file_name(url))
        if known is None and m and table:
            known = (m.group(1), f'its name in {table}')
        return _load_url(url, map_location, known)

    def safe(filename: str, map_location: Any = None) -> Any:
        from mmengine.runner import checkpoint as mm
        with _LOCK, safe_load_context(), _weights_only_forced():
            routed = dict(load_from_http=http, load_from_local=load_from_local)
            saved = {name: getattr(mm, name) for name in routed}
            for name, fn in routed.items():
                setattr(mm, name, fn)
            try:
                return mm_loader(filename, map_location)
            except CheckpointError:
                raise
            except _Refused as err:
                raise unsafe_error(filename, str(err)) from None
            except KeyError as err:  # a name the table does not have
                name = err.args[0] if err.args else '?'
                raise CheckpointNotFoundError(
                    f'checkpoint {filename}: {table or "the model table"} '
                    f'has no model named {name!r}. Check the name, or pass a '
                    f'local path or an http(s) URL.') from None
            except ImportError as err:
                raise CheckpointDownloadError(
                    f'checkpoint {filename}: {err}. Install the package, or '
                    f'download the file and pass its local path.') from None
            except Exception as err:
                if isinstance(err, pickle.UnpicklingError):
                    found = re.search(r'GLOBAL ([\w.]+)', str(err))
                    raise unsafe_error(
                        filename, 'not allowed: ' +
                        (found.group(1) if found else 'an object')) from None
                raise CheckpointDownloadError(
                    f'could not fetch checkpoint {filename}: '
                    f'{type(err).__name__}: {err}. Download the file and pass '
                    f'its local path.') from None
            finally:
                for name, fn in saved.items():
                    setattr(mm, name, fn)

    safe._davit_ext_wraps = mm_loader
    safe.__name__ = getattr(mm_loader, '__name__', 'loader')
    return safe


def _mmengine_schemes() -> Dict[str, Callable]:
    from mmengine.runner import checkpoint as mm
    torchvision = _wrap(mm.load_from_torchvision, "torchvision's model table")
    openmmlab = _wrap(mm.load_from_openmmlab, "OpenMMLab's model table")
    ceph = _wrap(mm.load_from_ceph)
    return {
        '': load_from_local,
        'http://': load_from_http,
        'https://': load_from_http,
        'torchvision://': torchvision,
        'modelzoo://': torchvision,
        'open-mmlab://': openmmlab,
        'openmmlab://': openmmlab,
        'mmcls://': _wrap(mm.load_from_mmcls, "mmcls's model table"),
        'pavi://': _wrap(mm.load_from_pavi),
        r'(\S+\:)?s3://': ceph,
        r'(\S+\:)?petrel://': ceph,
    }


#: mmengine's ``CheckpointLoader`` prefixes and our loader for each.
SCHEMES: Dict[str, Callable] = {}
# The loaders install() replaced, by prefix, for uninstall().
_originals: Dict[str, Callable] = {}


def _schemes() -> Dict[str, Callable]:
    if not SCHEMES:
        SCHEMES.update(_mmengine_schemes())
    return SCHEMES


def _refusing_loader(prefix: str, loader: Callable) -> Callable:
    owner = f'{getattr(loader, "__module__", "?")}.' \
        f'{getattr(loader, "__qualname__", repr(loader))}'

    def refuse(filename: str, map_location: Any = None, *args, **kwargs):
        raise UnknownSchemeError(
            f'refused to load checkpoint {filename}: its scheme {prefix!r} '
            f'is served by {owner}, which davit_ext cannot check loads with '
            f'weights_only=True. Download the file yourself and pass its '
            f'local path, or, if you trust that loader, call '
            f'davit_ext.weights.uninstall() (or set '
            f'DAVIT_EXT_DISABLE=checkpoint before importing davit_ext).')

    refuse._davit_ext_refusal = prefix
    return refuse


def _ours(loader: Callable) -> bool:
    """Our loaders and refusals, and davit_ext loaders marked
    ``_davit_ext_safe`` (``florence2://``): kept by :func:`install`."""
    return (loader in _schemes().values()
            or hasattr(loader, '_davit_ext_refusal')
            or getattr(loader, '_davit_ext_safe', False))


def install() -> None:
    """Make mmengine load checkpoints only through this module (idempotent;
    :func:`uninstall` undoes it)."""
    from mmengine.runner.checkpoint import CheckpointLoader
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if not _ours(loader):
            _originals[prefix] = loader
            if prefix not in _schemes():
                CheckpointLoader.register_scheme(
                    prefix, _refusing_loader(prefix, loader), force=True)
    for prefix, loader in _schemes().items():
        CheckpointLoader.register_scheme(prefix, loader, force=True)


def uninstall() -> None:
    """Give mmengine its own checkpoint loaders back.

    Schemes registered by others after :func:`install` stay, and so does
    ``florence2://``.
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
    return all(schemes.get(p) is f for p, f in _schemes().items()) and all(
        _ours(f) for f in schemes.values())


def _scheme_loader(filename: str) -> Callable:
    for prefix in sorted(_schemes(), reverse=True):
        if prefix and re.match(prefix, filename) is not None:
            return _schemes()[prefix]
    raise UnknownSchemeError(
        f'cannot load checkpoint {filename}: unknown scheme. davit_ext '
        f'loads local paths, http(s) URLs and '
        f'{", ".join(p for p in _schemes() if p and "(" not in p)}, s3://, '
        f'petrel://. Download the file and pass its local path.')


def load_checkpoint_file(path_or_url: str,
                         map_location: Any = None,
                         cache_dir: Optional[str] = None,
                         progress: Optional[bool] = None,
                         sha256: Optional[str] = None) -> Any:
    """Load a checkpoint from a path, an http(s) URL or an mmengine scheme,
    safely; returns what the file holds.

    Args:
        path_or_url (str): Local path, URL or ``scheme://name``.
        map_location: As for :func:`torch.load`.
        cache_dir (str, optional): Download cache (URLs only).
        progress (bool, optional): Progress bar for downloads.
        sha256 (str, optional): Start (or all) of the file's sha256, checked
            for URLs and local paths alike (a local file is never deleted).
    """
    if is_url(path_or_url):
        local = download_checkpoint(path_or_url, cache_dir, progress, sha256)
        return safe_torch_load(
            local, map_location, source=urllib.parse.urldefrag(path_or_url)[0])
    if isinstance(path_or_url, str) and '://' in path_or_url:
        if sha256 is not None:
            raise CheckpointIntegrityError(
                f'sha256= is checked for local paths and http(s) URLs only, '
                f'not for {path_or_url}: download the file and pass its path.')
        return _scheme_loader(path_or_url)(path_or_url, map_location)
    if sha256 is not None and os.path.isfile(os.path.expanduser(path_or_url)):
        local = os.path.expanduser(path_or_url)
        expected, origin = expected_sha256(local, sha256)
        actual = file_sha256(local)
        if not actual.startswith(expected):
            raise CheckpointIntegrityError(
                f'checkpoint {local}: {origin} starts with {expected}, the '
                f'file\'s sha256 is {actual}. It was not loaded and was left '
                f'where it is: check that it is the file you meant, or pass '
                f'the right hash.')
    return safe_torch_load(path_or_url, map_location)
