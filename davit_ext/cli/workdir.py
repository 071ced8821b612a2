"""A guard on the work_dir: a run that fails before it starts leaves it as it
was."""
import logging
import os
import os.path as osp
import re
import shutil
import sys
import traceback
from typing import Any, List, Optional

from davit_ext.errors import USER_ERRORS, ConfigError
from .checks import describe_build_error
from .config import _clean
from .dist import process_rank

__all__ = ['WorkDirGuard']

_TIMESTAMP = re.compile(r'\d{8}_\d{6}')


def _manager_classes() -> List[type]:
    """mmengine's ``ManagerMixin`` classes (logger, message hub, visualizers,
    default scope), each of which keeps its own instances by name."""
    from mmengine.utils import ManagerMixin
    found, todo = [], [ManagerMixin]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def _manager_instances() -> dict:
    return {
        cls: set(getattr(cls, '_instance_dict', ()))
        for cls in _manager_classes()
    }


def _forget_instances(before: dict) -> None:
    """Drop the named mmengine instances made since ``before``.

    The runner names its logger, message hub and visualizer after the config
    and the second it started. A failed start's visualizer would otherwise be
    handed, with its save_dir in the folder we just removed, to the next run of
    the same config in the same process and second (it then fails writing
    there); its logger would keep that folder's log file open.
    """
    for cls in _manager_classes():
        instances = getattr(cls, '_instance_dict', None)
        if instances is None:
            continue
        for name in list(instances):
            if name in before.get(cls, ()):
                continue
            instance = instances.pop(name)
            if isinstance(instance, logging.Logger):
                for handler in list(instance.handlers):
                    if isinstance(handler, logging.FileHandler):
                        handler.close()
                        instance.removeHandler(handler)


def _in_build_model(tb: Any) -> bool:
    """Whether the error came from the runner building the model."""
    return any(frame.name == 'build_model'
               for frame in traceback.extract_tb(tb))


class WorkDirGuard:
    """Leave the work_dir as it was if the run fails before it starts.

    mmengine's runner makes the work_dir and a timestamp folder, and copies
    the config into ``WORK_DIR/<config>.py``, before it builds the
    dataloaders, optimizer and schedulers; an error there would leave an
    empty run behind and overwrite the copy of the previous run's config.
    Used as a context manager around building and running the runner: on an
    exception before :meth:`started` is called, the folders this run made are
    removed and the config copy is put back (rank 0 only), mmengine's named
    instances made by the failed start (logger, visualizer, ...) are dropped,
    and a ``ValueError``/``TypeError``/``KeyError``/``AssertionError`` (a
    config value mmengine or torch refused) becomes one :class:`ConfigError`
    line, unless the environment sets ``DAVIT_EXT_TRACEBACK=1``.

    An error while the runner builds the model gets the words of
    :func:`~davit_ext.cli.checks.describe_build_error` (the closest argument
    name, where in the config): the runner's build is the only one.

    Args:
        cfg (Config): The run's config (``work_dir``, ``filename``, ``model``).
    """

    # raised by mmengine/torch while building from config values
    setup_errors = (ValueError, TypeError, KeyError, AssertionError)

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        config_file = getattr(cfg, 'filename', None)
        self.work_dir = osp.abspath(cfg.work_dir)
        self.existed = osp.isdir(self.work_dir)
        self.entries = set(os.listdir(self.work_dir) if self.existed else ())
        self.copy = osp.join(self.work_dir, osp.basename(config_file)) \
            if config_file else None
        self.copy_bytes: Optional[bytes] = None
        if self.copy and osp.isfile(self.copy):
            with open(self.copy, 'rb') as f:
                self.copy_bytes = f.read()
        self.config_name = osp.basename(config_file or 'the config')
        self.has_started = False
        self.instances = _manager_instances()

    def started(self) -> None:
        """Training/testing has begun: keep what the run writes from now."""
        self.has_started = True

    def hook(self) -> Any:
        """A hook that calls :meth:`started` at ``before_train`` and
        ``before_test``; register it with priority ``'HIGHEST'``."""
        from mmengine.hooks import Hook

        guard = self

        class _StartedHook(Hook):

            def before_train(self, runner: Any) -> None:
                guard.started()

            def before_test(self, runner: Any) -> None:
                guard.started()

        return _StartedHook()

    def __enter__(self) -> 'WorkDirGuard':
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is None or self.has_started:
            return
        _forget_instances(self.instances)
        if process_rank() == 0:
            self.restore()
        if issubclass(kind, USER_ERRORS) or not issubclass(kind, Exception):
            return  # already one line; or an interrupt
        if os.environ.get('DAVIT_EXT_TRACEBACK'):
            pass
        elif issubclass(kind, self.setup_errors) and _in_build_model(tb):
            raise ConfigError(describe_build_error(value, self.cfg)) from None
        elif issubclass(kind, self.setup_errors):
            # What fails while the runner builds the loaders, optimizer and
            # schedulers from the config is a config value (lr=-1, an
            # unknown type, ...): one line, as for the checks before.
            raise ConfigError(
                f'the run of {self.config_name} failed while mmengine set it '
                f'up, before its first step: {kind.__name__}: '
                f'{_clean(value)}. Fix the config or --cfg-options; '
                f'{self.work_dir} was left as it was (DAVIT_EXT_TRACEBACK=1 '
                'shows where it failed).') from None
        if process_rank() == 0:
            print(
                f'note: the run failed before it started; {self.work_dir} '
                'was left as it was. The error:',
                file=sys.stderr,
                flush=True)

    def restore(self) -> None:
        """Undo what the failed start wrote."""
        if not self.existed:
            # made by this run: everything in it is from the failed start
            shutil.rmtree(self.work_dir, ignore_errors=True)
            return
        if not osp.isdir(self.work_dir):
            return
        for name in set(os.listdir(self.work_dir)) - self.entries:
            path = osp.join(self.work_dir, name)
            if _TIMESTAMP.fullmatch(name) and osp.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
        if self.copy is None:
            return
        if self.copy_bytes is None:
            if osp.isfile(self.copy):
                os.remove(self.copy)  # this run's copy; there was none
        else:
            with open(self.copy, 'rb') as f:
                changed = f.read() != self.copy_bytes
            if changed:
                with open(self.copy, 'wb') as f:
                    f.write(self.copy_bytes)
