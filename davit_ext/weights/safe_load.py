"""Reading a checkpoint file without running anything from it.

torch >= 2.6 loads with ``weights_only=True``: its unpickler rebuilds only
tensors, containers and the globals it is told are safe. mmengine's runner
checkpoints need a few more, and :func:`allowed_globals` lists exactly those:

- ``mmengine.logging.history_buffer.HistoryBuffer`` (the message hub's
  logged scalars) and the numpy arrays, dtypes and scalars inside them;
- ``getattr`` *only* as mmengine uses it: HistoryBuffer pickles its
  statistics methods as ``getattr(HistoryBuffer, 'min')``. A stand-in is
  registered under the name ``builtins.getattr`` that resolves
  ``HistoryBuffer.{min,max,mean,current}`` and refuses anything else, so the
  real ``getattr`` is never reachable from a file.

HistoryBuffer's own ``__setstate__`` would copy the statistics methods a file
names into a class-level dict shared by the whole process; while we load, a
guarded one accepts only mmengine's defaults and leaves class state alone.
"""
import contextlib
import os
import os.path as osp
import pickle
import re
import threading
import zipfile
from typing import Any, Callable, Dict, Iterator, List, Tuple, Union

import torch

from davit_ext.errors import (CheckpointError, CheckpointNotFoundError,
                              CorruptCheckpointError, UnsafeCheckpointError,
                              UnsupportedTorchError)

__all__ = [
    'MIN_TORCH', 'allowed_globals', 'check_checkpoint_file',
    'safe_load_context', 'safe_torch_load', 'unsafe_error', 'corrupt_error'
]

#: The torch release whose ``weights_only`` loading the safety rests on.
MIN_TORCH = (2, 6)
#: Statistics methods HistoryBuffer registers on itself (and pickles by name).
_STATISTICS = ('min', 'max', 'mean', 'current')
# Held while HistoryBuffer.__setstate__ is swapped for the guarded one.
_LOCK = threading.RLock()


class _Refused(Exception):
    """Raised by our stand-ins while unpickling (torch passes it through)."""


def _require_safe_torch() -> None:
    m = re.match(r'(\d+)\.(\d+)', torch.__version__)
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    missing = not hasattr(torch.serialization, 'safe_globals')
    if version < MIN_TORCH or missing:
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


def _history_buffer_attribute(obj: Any, name: str) -> Any:
    """Stand-in for ``getattr`` while unpickling (see module docstring)."""
    from mmengine.logging.history_buffer import HistoryBuffer
    if obj is HistoryBuffer and name in _STATISTICS:
        return getattr(HistoryBuffer, name)
    what = f'{obj.__module__}.{obj.__qualname__}' if isinstance(
        obj, type) else type(obj).__name__ + ' object'
    raise _Refused(f'getattr({what}, {name!r}) is not allowed: only '
                   f'HistoryBuffer.{{{",".join(_STATISTICS)}}} is')


def allowed_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """Globals allowed on top of torch's ``weights_only`` defaults, in the form
    ``torch.serialization.safe_globals`` takes."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    rc: List[Union[Callable, Tuple[Callable, str]]] = [
        HistoryBuffer, (_history_buffer_attribute, 'builtins.getattr'),
        np.ndarray, np.dtype
    ]
    # A dtype unpickles as an instance of its own class (numpy >= 1.25).
    for name in ('float64', 'int64', 'float32', 'int32'):
        dtype_class = type(np.dtype(name))
        if dtype_class is not np.dtype:
            rc.append(dtype_class)
    # numpy 1.x files name the reconstructors numpy.core.*, 2.x numpy._core.*
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        rc.append((multiarray._reconstruct, f'{module}._reconstruct'))
        rc.append((multiarray.scalar, f'{module}.scalar'))
    return rc


def _guarded_setstate(self: Any, state: Dict[str, Any]) -> None:
    """HistoryBuffer's ``__setstate__`` without its class-state update."""
    from mmengine.logging.history_buffer import HistoryBuffer
    state = dict(state)
    methods = state.pop('statistics_methods', {})
    defaults = {name: getattr(HistoryBuffer, name) for name in _STATISTICS}
    if isinstance(methods, dict):
        missing = object()
        wrong = sorted(
            str(name) for name, method in methods.items()
            if defaults.get(name, missing) is not method)
    else:
        wrong = [type(methods).__name__]
    if wrong:
        raise _Refused(
            f'a HistoryBuffer in it sets statistics methods {wrong} that are '
            f'not mmengine\'s own ({", ".join(_STATISTICS)} mapped to '
            f'themselves): this is not allowed')
    self.__dict__.update(state)


@contextlib.contextmanager
def safe_load_context() -> Iterator[None]:
    """Where ``torch.load(..., weights_only=True)`` may read mmengine files:

    :func:`allowed_globals` allowed, HistoryBuffer rebuilt without class-state
    changes (its class dict is restored on exit in any case).
    """
    _require_safe_torch()
    from mmengine.logging.history_buffer import HistoryBuffer
    with _LOCK:
        had_own = '__setstate__' in HistoryBuffer.__dict__
        original = HistoryBuffer.__dict__.get('__setstate__')
        # mmengine registers its default statistics methods in the class
        # dict when a buffer is made, not when one is unpickled: a process
        # whose first buffers come from a file (a resumed rank > 0) would
        # have none, and its first log after validation failed with
        # "KeyError: 'mean' has not been registered".
        HistoryBuffer()
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


def unsafe_error(source: str, reason: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f'refused to load checkpoint {source}: it contains a pickled object '
        f'that is neither a tensor nor one of the types mmengine writes '
        f'({reason}). Nothing from the file was executed. Only load '
        f'checkpoints from sources you trust; if you trust this one, re-save '
        f'just its weights in an isolated environment, e.g. '
        f'torch.save({{"state_dict": ckpt["state_dict"]}}, path).')


def corrupt_error(source: str, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f'cannot read checkpoint {source}: the file is truncated, damaged or '
        f'not a torch checkpoint ({reason.strip()}). Copy or download it '
        f'again; for a run of your own, resume from an earlier epoch_N.pth / '
        f'iter_N.pth in its work_dir.')


def _unsafe_globals(file: Any) -> List[str]:
    """The globals of ``file`` that neither torch nor we allow (torch's static
    scan of the pickle); [] where the file cannot be scanned."""
    if hasattr(file, 'seek'):
        file.seek(0)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return sorted(
                torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception:  # not a zip checkpoint: torch.load said why
        return []


def check_checkpoint_file(path: str) -> str:
    """``path`` (user folder expanded) if it names a file, else one
    :class:`CheckpointNotFoundError` saying what to pass instead."""
    file = osp.expanduser(path)
    if not osp.exists(file):
        raise CheckpointNotFoundError(
            f'checkpoint {file!r} does not exist (looked in '
            f'{osp.abspath(file)!r}). Check the path, or give an http(s) URL '
            f'of a published checkpoint.')
    if osp.isdir(file):
        raise CheckpointNotFoundError(
            f'checkpoint {file!r} is a folder, not a file. Pass the .pth file '
            f'itself (a run\'s work_dir holds epoch_N.pth / iter_N.pth and a '
            f'"last_checkpoint" file naming the latest).')
    return file


def safe_torch_load(file: Union[str, os.PathLike, Any],
                    map_location: Any = None,
                    source: str = None) -> Any:
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
        file = check_checkpoint_file(os.fspath(file))
        source = source or file
    source = source or repr(file)
    try:
        with safe_load_context():
            return torch.load(
                file, map_location=map_location, weights_only=True)
    except _Refused as err:
        raise unsafe_error(source, str(err)) from None
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(file)
        if unsafe:
            raise unsafe_error(source,
                               'not allowed: ' + ', '.join(unsafe)) from None
        raise corrupt_error(source, str(err).strip().splitlines()[-1]) \
            from None
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, KeyError, ValueError, OSError,
            zipfile.BadZipFile, UnicodeDecodeError, IndexError, AttributeError,
            TypeError) as err:
        reason = str(err).split('. This is an internal')[0] or \
            type(err).__name__
        raise corrupt_error(source, reason) from None
