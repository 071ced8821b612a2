"""Checkpoints that a failed save cannot damage.

mmengine writes ``epoch_N.pth`` in place and deletes the oldest kept
checkpoint *before* it writes the new one, then overwrites
``last_checkpoint``: a disk that fills up mid-write leaves a partial file
where ``--resume`` looks, and may already have removed the last good one.

- :class:`AtomicLocalBackend` (file backend ``'davit_ext_atomic_local'``)
  writes every file to a temporary file in the same folder, flushes it to
  disk and renames it over the target (:func:`os.replace`): a reader sees the
  old file or the new one, never a part.
- :class:`SafeCheckpointHook` is mmengine's ``CheckpointHook`` saving through
  that backend, which removes outdated checkpoints and moves
  ``last_checkpoint`` only once the new checkpoint is complete, refuses to
  save weights that are not finite, and stops the run with one message when a
  save fails (every rank, in distributed runs).
"""
import errno
import os
import os.path as osp
import shutil
import tempfile
from typing import Any, List, Optional

import torch
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook

from davit_ext.errors import CheckpointSaveError, NonFiniteLossError
from davit_ext.registry import HOOKS
from .faults import agree, describe_position

__all__ = [
    'AtomicLocalBackend', 'SafeCheckpointHook', 'atomic_write',
    'ATOMIC_BACKEND'
]

#: Name of :class:`AtomicLocalBackend` in mmengine's file backends.
ATOMIC_BACKEND = 'davit_ext_atomic_local'


def atomic_write(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` all or nothing.

    The bytes go to a temporary file next to ``path`` (same file system, so the
    rename is atomic), are flushed to disk, and the file is renamed over
    ``path``. On an error the temporary file is removed and the error is raised
    with ``needed`` (bytes to write) and ``written`` (bytes written before it
    failed) attributes; ``path`` is untouched.
    """
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f'.{osp.basename(path)}.', suffix='.tmp', dir=folder)
    written = 0
    try:
        # mkstemp makes the file private; give it the mode open() would
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        view = memoryview(data)
        while written < len(view):
            written += os.write(fd, view[written:written + (64 << 20)])
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException as err:
        if fd >= 0:
            os.close(fd)
        if osp.exists(tmp):
            os.remove(tmp)
        err.needed, err.written = len(data), written  # type: ignore
        raise
    try:  # the rename itself survives a power cut once the folder is synced
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose writes are atomic
    (:func:`atomic_write`)."""

    def put(self, obj: bytes, filepath: Any) -> None:
        atomic_write(obj, str(filepath))

    def put_text(self,
                 obj: str,
                 filepath: Any,
                 encoding: str = 'utf-8') -> None:
        atomic_write(obj.encode(encoding), str(filepath))


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)


def _megabytes(n: float) -> str:
    return f'{n / 2**20:.1f} MB'


def describe_save_error(err: BaseException, path: str) -> str:
    """What went wrong writing ``path`` and what to do, in one line."""
    needed = getattr(err, 'needed', None)
    code = getattr(err, 'errno', None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(osp.dirname(osp.abspath(path))).free
            free_text = f'; {_megabytes(free)} free there now'
        except OSError:
            free_text = ''
        what = 'no space left on the device' if code == errno.ENOSPC else \
            'the disk quota is exhausted'
        need = f': the checkpoint needs {_megabytes(needed)}' \
            if needed is not None else ''
        return (f'{what}{need}{free_text}. Free that much space (or point '
                'work_dir / default_hooks.checkpoint.out_dir at another '
                'disk)')
    if code == errno.EFBIG:
        need = f' ({_megabytes(needed)})' if needed is not None else ''
        return (f'the file is larger{need} than this process may write '
                '(a file-size limit: ulimit -f). Raise the limit')
    if isinstance(err, OSError):
        return (f'{err.strerror or err}. Check that the folder exists and is '
                'writable')
    return f'{type(err).__name__}: {err}'


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` (same arguments) with saves that cannot
    damage what was saved before.

    - Each checkpoint and ``last_checkpoint`` is written atomically (a
      temporary file renamed over the target; :class:`AtomicLocalBackend`).
      Other storage backends (``backend_args``) are used as given.
    - Checkpoints beyond ``max_keep_ckpts`` are removed, and
      ``last_checkpoint`` moved, only after the new checkpoint is complete.
    - Before saving, the weights are checked: non-finite weights are not
      saved (:class:`~davit_ext.errors.NonFiniteLossError`).
    - A failed save raises :class:`~davit_ext.errors.CheckpointSaveError` on
      every rank, saying why (disk full: how much was needed) and that the
      previous checkpoint is intact.
    """

    def __init__(self, *args, **kwargs) -> None:
        out_dir = kwargs.get('out_dir')
        if kwargs.get('backend_args') is None and kwargs.get(
                'file_client_args') is None and (out_dir is None
                                                 or '://' not in str(out_dir)):
            kwargs['backend_args'] = dict(backend=ATOMIC_BACKEND)
        super().__init__(*args, **kwargs)

    @property
    def atomic(self) -> bool:
        return (self.backend_args or {}).get('backend') == ATOMIC_BACKEND

    # -------------------------------------------------------------- saving
    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        name = self.filename_tmpl.format(step)
        self.save_file(
            runner,
            name,
            meta=meta,
            by_epoch=self.by_epoch,
            keep_step=step if self.max_keep_ckpts > 0 else None)

    def save_file(self,
                  runner,
                  name: str,
                  meta: Optional[dict] = None,
                  by_epoch: bool = True,
                  keep_step: Optional[int] = None) -> str:
        """Save the runner's state as ``out_dir/name`` (all ranks call it);
        returns the path.

        On success ``last_checkpoint`` names it.
        """
        where = (f'end of epoch {runner.epoch + 1}, iteration {runner.iter}'
                 if by_epoch else describe_position(runner))
        check_finite_weights(runner, f'checkpoint {name} was not written',
                             where)
        path = self.file_backend.join_path(self.out_dir, name)
        hub = runner.message_hub
        before = dict(
            keep=list(getattr(self, 'keep_ckpt_ids', [])),
            last=self.last_ckpt,
            hub_keep=hub.get_info('keep_ckpt_ids'),
            hub_last=hub.get_info('last_ckpt'))
        stale: List[int] = []
        if keep_step is not None and not (self.keep_ckpt_ids and
                                          self.keep_ckpt_ids[-1] == keep_step):
            # The new id is recorded before saving: the checkpoint's message
            # hub must list it, as mmengine's does.
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                stale.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(keep_step)
            hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        self.last_ckpt = path
        hub.update_info('last_ckpt', path)

        message = None
        try:
            runner.save_checkpoint(
                self.out_dir,
                name,
                self.file_client_args,
                save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler,
                meta=meta,
                by_epoch=by_epoch,
                backend_args=self.backend_args,
                **self.args)
            if runner.rank == 0:
                self._write_pointer(runner, path)
        except Exception as err:  # any failure: every rank must hear of it
            message = self._failure(runner, path, err, where)
        code, message = agree(1 if message else 0, message)
        if code:
            if hasattr(self, 'keep_ckpt_ids'):
                self.keep_ckpt_ids.clear()
                self.keep_ckpt_ids.extend(before['keep'])
            self.last_ckpt = before['last']
            hub.update_info('keep_ckpt_ids', before['hub_keep'])
            hub.update_info('last_ckpt', before['hub_last'])
            raise CheckpointSaveError(message)
        if runner.rank == 0:
            for old in stale:
                self._remove(self.filename_tmpl.format(old))
            self._remove_preemption_checkpoints(runner, keep=path)
        return path

    def _write_pointer(self, runner, path: str) -> None:
        pointer = osp.join(runner.work_dir, 'last_checkpoint')
        if self.atomic:
            atomic_write(str(path).encode(), pointer)
        else:
            with open(pointer, 'w') as f:
                f.write(str(path))

    def _remove(self, name: str) -> None:
        path = self.file_backend.join_path(self.out_dir, name)
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):
            self.file_backend.rmtree(path)  # deepspeed saves folders

    def _remove_preemption_checkpoints(self, runner, keep: str) -> None:
        """A checkpoint saved on a stop signal is outdated by the next one."""
        from .faults import PREEMPT_PREFIX
        if not self.atomic or not osp.isdir(str(self.out_dir)):
            return
        for name in os.listdir(self.out_dir):
            path = osp.join(self.out_dir, name)
            if name.startswith(PREEMPT_PREFIX) and name.endswith('.pth') \
                    and osp.abspath(path) != osp.abspath(keep):
                os.remove(path)

    def _failure(self, runner, path: str, err: BaseException,
                 where: str) -> str:
        pointer = osp.join(runner.work_dir, 'last_checkpoint')
        previous = None
        if osp.isfile(pointer):
            with open(pointer) as f:
                previous = f.read().strip() or None
        if previous and previous != str(path):
            kept = (f'The previous checkpoint {previous} and '
                    f'{pointer} are intact; after fixing this, continue '
                    f'with --resume.')
        else:
            kept = 'No checkpoint of this run was damaged; nothing to resume.'
        if not self.atomic:
            kept = (f'{path} may be partial (backend_args '
                    f'{self.backend_args} writes in place).')
        return (f'cannot save checkpoint {path} ({where}): '
                f'{describe_save_error(err, path)}. {kept}')


def check_finite_weights(runner,
                         what: str,
                         where: Optional[str] = None) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if the model holds a NaN
    or infinite parameter or buffer (on any rank)."""
    model = runner.model
    model = getattr(model, 'module', model)
    bad = []
    for name, tensor in model.state_dict().items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and \
                not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    message = None
    if bad:
        shown = ', '.join(bad[:5]) + (' ...' if len(bad) > 5 else '')
        message = (f'the model\'s weights are not finite '
                   f'({where or describe_position(runner)}: {len(bad)} '
                   f'tensor(s), '
                   f'e.g. {shown}): {what}, so the last good checkpoint '
                   f'stays the latest. The loss of that iteration was finite '
                   f'but its update was not: lower the learning rate, or '
                   f'clip gradients (optim_wrapper.clip_grad).')
    code, message = agree(1 if message else 0, message)
    if code:
        raise NonFiniteLossError(message)
