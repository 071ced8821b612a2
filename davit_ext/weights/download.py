"""Downloads into torch's hub cache, checked against the sha256 known for them.

Files go to ``<torch hub dir>/checkpoints`` (where mmengine and torch look
too) through ``torch.hub.download_url_to_file`` (temporary file, sha256
prefix check, rename). A hash is checked only where one is known
(:func:`expected_sha256`): the caller's, a ``#sha256=<hex>`` URL fragment,
our model index's ``SHA256`` for that URL, or an OpenMMLab-style name
``..._<YYYYMMDD>-<hex>.pth`` (the hex starts the sha256). A file this process
downloaded that fails its hash never reaches the cache; a file already in the
cache (possibly put there by the user) is never deleted: it is refused and
kept, and the message says what to do.
"""
import hashlib
import os
import os.path as osp
import re
import sys
import urllib.error
import urllib.parse
from typing import Optional, Tuple

import torch

from davit_ext.errors import CheckpointDownloadError, CheckpointIntegrityError

__all__ = [
    'CACHE_SUBDIR', 'expected_sha256_prefix', 'expected_sha256',
    'download_checkpoint', 'file_sha256', 'is_url', 'url_file_name'
]

#: Sub-folder of ``torch.hub.get_dir()`` holding downloaded checkpoints.
CACHE_SUBDIR = 'checkpoints'
#: OpenMMLab's ``name_<YYYYMMDD>-<hex>.pth``: the hex starts the sha256.
_OPENMMLAB_NAME = re.compile(r'_\d{8}-([0-9a-f]{8,64})\.pth$')
#: torch hub's ``name-<hex>.ext`` (torchvision's weights are named so).
TORCH_HUB_NAME = re.compile(r'-([0-9a-f]{8,64})\.[A-Za-z0-9]+$')
_SHA256_FRAGMENT = re.compile(r'^sha256=([0-9a-fA-F]{8,64})$')

#: (lower-case hex, where it comes from, for messages)
Known = Optional[Tuple[str, str]]


def is_url(path) -> bool:
    return isinstance(path, str) and path.startswith(('http://', 'https://'))


def url_file_name(url: str) -> str:
    return osp.basename(urllib.parse.urlparse(url).path)


def expected_sha256_prefix(url_or_name: str) -> Optional[str]:
    """The hex of an OpenMMLab-style ``..._<YYYYMMDD>-<hex>.pth`` name, else
    None (only OpenMMLab's form promises a hash)."""
    path = urllib.parse.urlparse(url_or_name).path or url_or_name
    m = _OPENMMLAB_NAME.search(osp.basename(path))
    return m.group(1) if m else None


def expected_sha256(url: str, sha256: Optional[str] = None) -> Known:
    """The sha256 (or its start) known for ``url`` and where it comes from:

    ``sha256`` passed by the caller, a ``#sha256=`` fragment, our model index,
    an OpenMMLab-style name, in that order; None if no hash is known.
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
    from .index import sha256_of_weights
    from_index = sha256_of_weights(bare)
    if from_index is not None:
        return from_index
    prefix = expected_sha256_prefix(bare)
    return (prefix, 'its name') if prefix else None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def download_checkpoint(url: str,
                        cache_dir: Optional[str] = None,
                        progress: Optional[bool] = None,
                        sha256: Optional[str] = None,
                        known: Known = None) -> str:
    """Download ``url`` into the cache (once) and return the local path.

    Where a hash is known a cached file is re-verified on every call.

    Args:
        url (str): http(s) URL; a ``#sha256=<hex>`` fragment is a hash.
        cache_dir (str, optional): Defaults to torch's hub checkpoints dir.
        progress (bool, optional): Show a progress bar (default: on a tty).
        sha256 (str, optional): Start (or all) of the file's sha256.
        known (tuple, optional): ``(hex, origin)`` instead of looking the
            hash up with :func:`expected_sha256`.

    Raises:
        CheckpointIntegrityError: the file does not match the known hash.
        CheckpointDownloadError: the download is impossible (offline...).
    """
    if known is None:
        known = expected_sha256(url, sha256)
    url = urllib.parse.urldefrag(url)[0]
    name = url_file_name(url)
    if not name:
        raise CheckpointDownloadError(
            f'cannot tell the file name of checkpoint URL {url}: it must end '
            f'in the file name, e.g. https://host/path/model.pth.')
    if cache_dir is None:
        cache_dir = osp.join(torch.hub.get_dir(), CACHE_SUBDIR)
    os.makedirs(cache_dir, exist_ok=True)
    dst = osp.join(cache_dir, name)
    expected, origin = known or (None, None)

    if osp.isfile(dst):
        actual = file_sha256(dst) if expected else None
        if expected and not actual.startswith(expected):
            raise CheckpointIntegrityError(
                f'checkpoint {url}: the file found at {dst} does not match: '
                f'{origin} says the sha256 starts with {expected}, the '
                f'file\'s sha256 is {actual}. It was not loaded and was left '
                f'where it is. If you copied it there, it is not the '
                f'published file: copy the right one over it (offline: fetch '
                f'it on a machine with network first), or pass the path of a '
                f'file you trust instead of the URL. To download it again '
                f'instead, delete {dst} and run again.')
        return dst

    try:
        torch.hub.download_url_to_file(
            url,
            dst,
            hash_prefix=expected,
            progress=sys.stderr.isatty() if progress is None else progress)
    except RuntimeError as err:
        if expected is None or 'invalid hash value' not in str(err):
            raise
        got = re.search(r'got "([0-9a-f]+)"', str(err))
        raise CheckpointIntegrityError(
            f'checkpoint {url} failed its integrity check: {origin} says the '
            f'sha256 starts with {expected}, the downloaded file\'s sha256 '
            f'is {got.group(1) if got else "different"}. The downloaded file '
            f'was removed and not loaded (nothing was written to {dst}). Try '
            f'again; if this persists, the server or a proxy serves a '
            f'different file: fetch it from the original source and pass '
            f'the local path instead.') from None
    except (urllib.error.URLError, OSError) as err:
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
    return dst
