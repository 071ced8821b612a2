"""Hooks that stop (or carry) a run through the faults of real runs.

- :class:`NonFiniteLossHook`: the first NaN/inf loss stops the run with one
  message (which terms, the likely causes), before anything is saved; or,
  opted in, such steps are skipped and counted.
- :class:`PreemptionHook`: SIGTERM / SIGUSR1 finish the current iteration,
  save a resumable checkpoint (with the position in the epoch) and stop with
  exit status 75; ``--resume`` continues exactly there.
- :class:`UnreadableImageHook`: an image that cannot be read stops the run
  with one message naming it; or, opted in, it is skipped (a warning each,
  a count per epoch).

In distributed runs the ranks agree (:func:`agree`, an all-reduce of one
integer) so that all stop at the same step with the same message.
"""
import logging
import signal
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch
from mmengine.dist import all_gather_object, all_reduce, get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log

from davit_ext.errors import NonFiniteLossError, Preempted
from davit_ext.registry import HOOKS

__all__ = [
    'agree', 'describe_position', 'NonFiniteLossHook', 'PreemptionHook',
    'UnreadableImageHook', 'PREEMPT_PREFIX', 'POSITION_KEY'
]

#: File name prefix of the checkpoints saved on a stop signal.
PREEMPT_PREFIX = 'preempt_iter_'
#: Key of the position within the epoch in a checkpoint saved mid-epoch.
POSITION_KEY = 'train_position'


def agree(code: int,
          message: Optional[str] = None) -> Tuple[int, Optional[str]]:
    """The largest ``code`` of all ranks, and the message of a rank that had it
    (one process: ``code`` and ``message`` as given).

    Every rank must call it at the same point. It costs one all-reduce of an
    integer; the messages are gathered only when some rank has a fault.
    """
    _, world_size = get_dist_info()
    if world_size == 1:
        return code, message
    flag = torch.tensor([int(code)], dtype=torch.int64)
    all_reduce(flag, op='max')
    agreed = int(flag.item())
    if agreed == 0:
        return 0, None
    gathered = all_gather_object((int(code), message))
    chosen = next(m for c, m in gathered if c == agreed)
    return agreed, chosen


def describe_position(runner) -> str:
    """'iteration N (epoch E, batch B/L)' of the step that just ran, or
    'iteration N' for iteration-based loops."""
    loop = runner.train_loop
    text = f'iteration {runner.iter + 1}'
    batch = getattr(loop, 'current_batch', None)
    if _epoch_based(loop) and batch is not None:
        try:
            total = f'/{len(loop.dataloader)}'
        except TypeError:
            total = ''
        text += f' (epoch {runner.epoch + 1}, batch {batch + 1}{total})'
    return text


def _epoch_based(loop) -> bool:
    from mmengine.runner import EpochBasedTrainLoop
    return isinstance(loop, EpochBasedTrainLoop)


def log_to_file(runner, message: str, level: int = logging.ERROR) -> None:
    """Put ``message`` in the run's log file only (the tool prints it once on
    the console)."""
    logger = runner.logger
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None,
                               None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _last_checkpoint(runner) -> Optional[str]:
    import os.path as osp
    pointer = osp.join(runner.work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            return f.read().strip() or None
    return None


# ----------------------------------------------------------- non-finite loss


def _loss_values(outputs: Any) -> Dict[str, float]:
    values = {}
    if isinstance(outputs, dict):
        for key, value in outputs.items():
            if torch.is_tensor(value) and value.numel() == 1:
                values[key] = float(value.detach().float())
            elif isinstance(value, (int, float)):
                values[key] = float(value)
    return values


def _not_finite(values: Dict[str, float]) -> List[str]:
    return [
        k for k, v in values.items()
        if v != v or v in (float('inf'), float('-inf'))
    ]


def _causes(runner) -> str:
    """The likely causes, the certain one first if it can be seen."""
    model = getattr(runner.model, 'module', runner.model)
    pre = getattr(model, 'data_preprocessor', None)
    std = getattr(pre, 'std', None)
    causes = []
    if torch.is_tensor(std) and bool((std == 0).any()):
        causes.append(f'data_preprocessor.std is {std.flatten().tolist()}: '
                      'a std of 0 divides the images by zero; fix it')
    causes += [
        'a learning rate too high for this batch size '
        '(optim_wrapper.optimizer.lr; --auto-scale-lr)',
        'data normalisation (data_preprocessor mean/std, images that are '
        'blank or of another value range)',
        'fp16 overflow under --amp (the loss scaler skips steps with '
        'overflowing gradients but cannot fix a non-finite loss: lower the '
        'lr or train in bf16/fp32)'
    ]
    return '; '.join(causes)


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Stop at the first non-finite loss, or skip such steps.

    Args:
        skip (bool): Skip the optimizer step of an iteration whose loss is
            not finite (no backward, no update; counted, a warning each)
            instead of stopping. The run still stops if the weights
            themselves are not finite (skipping cannot recover). Defaults to
            False (``tools/train.py --skip-nonfinite`` sets it).

    Stopping raises :class:`~davit_ext.errors.NonFiniteLossError` (exit status
    3) in ``after_train_iter``, before the checkpoint hook: no checkpoint of
    that state is written (and :class:`SafeCheckpointHook` refuses non-finite
    weights whatever their cause). Under mmengine's ``AmpOptimWrapper`` (fp16
    on a GPU) overflowing *gradients* of a finite loss are the loss scaler's:
    it skips that step and lowers its scale, and this hook sees a finite loss.
    The loss itself is checked as the model reports it (unscaled).
    """
    priority = 'ABOVE_NORMAL'  # before the logger and checkpoint hooks

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.skipped = 0
        self._skipped_epoch = 0
        self._pending: Optional[str] = None

    def before_train(self, runner) -> None:
        if not self.skip:
            return
        from mmengine.optim import OptimWrapper
        wrapper = runner.optim_wrapper
        if not isinstance(wrapper, OptimWrapper):
            runner.logger.warning(
                'NonFiniteLossHook(skip=True) needs one OptimWrapper; with '
                f'{type(wrapper).__name__} it stops at a non-finite loss.')
            self.skip = False
            return
        update = wrapper.update_params
        hook = self

        def guarded_update(loss, *args, **kwargs):
            bad = not bool(torch.isfinite(loss.detach()).all())
            # Every rank must skip the same step: DDP's backward is
            # collective.
            code, _ = agree(int(bad))
            if not code:
                return update(loss, *args, **kwargs)
            wrapper.zero_grad()
            hook._pending = 'this rank' if bad else 'another rank'
            return None

        wrapper.update_params = guarded_update

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Any = None,
                         outputs: Any = None) -> None:
        values = _loss_values(outputs)
        bad = _not_finite(values)
        terms = ', '.join(f'{k}={values[k]}' for k in bad)
        if self.skip:
            if self._pending is None:
                return
            self._pending = None
            self.skipped += 1
            self._skipped_epoch += 1
            from .checkpoint import check_finite_weights
            check_finite_weights(runner, 'skipping steps cannot recover')
            runner.logger.warning(
                f'non-finite loss at {describe_position(runner)}'
                f'{": " + terms if terms else " (on another rank)"}: the '
                f'step was skipped ({self.skipped} so far).')
            runner.message_hub.update_info('skipped_nonfinite_steps',
                                           self.skipped)
            return
        message = None
        if bad:
            rank, world_size = get_dist_info()
            terms += f' on rank {rank}' if world_size > 1 else ''
            last = _last_checkpoint(runner)
            saved = (f'the last checkpoint, {last}, is from before it'
                     if last else 'this run has no checkpoint yet')
            message = (
                f'non-finite loss at {describe_position(runner)}: {terms} '
                f'(not finite: {", ".join(bad)}). Training stopped and this '
                f'state was not saved; {saved}. Likely causes: '
                f'{_causes(runner)}. To skip such steps instead: '
                'tools/train.py --skip-nonfinite.')
        code, message = agree(1 if message else 0, message)
        if code:
            log_to_file(runner, message)
            raise NonFiniteLossError(message)

    def after_train_epoch(self, runner) -> None:
        if self.skip and self._skipped_epoch:
            runner.logger.warning(
                f'epoch {runner.epoch + 1}: {self._skipped_epoch} step(s) '
                f'with a non-finite loss skipped ({self.skipped} in all).')
        self._skipped_epoch = 0


# ---------------------------------------------------------------- preemption


@HOOKS.register_module()
class PreemptionHook(Hook):
    """Save a resumable checkpoint and stop when the job is told to stop.

    On one of ``signals`` (default SIGTERM, which slurm and Kubernetes send
    before they kill a job, and SIGUSR1, slurm's ``--signal`` default), the
    current iteration finishes (its logging and schedulers included), then
    every rank agrees, ``preempt_iter_<N>.pth`` is saved through the
    :class:`SafeCheckpointHook` (model, optimizer, schedulers, message hub,
    every rank's random states, and the position in the epoch: epoch, batch,
    sampler seed), ``last_checkpoint`` points at it, and the run stops with
    :class:`~davit_ext.errors.Preempted` (exit status 75). ``tools/train.py
    --resume`` continues at the next batch of that epoch; with data loading
    in the main process the result is that of an uninterrupted run, bit for
    bit (:class:`~davit_ext.engine.loops.ResumableEpochBasedTrainLoop`).

    The handlers are installed for training only (``before_train`` to
    ``after_train``) and only in the main thread; the previous ones are put
    back. The next regular checkpoint removes ``preempt_iter_*.pth``.

    Args:
        signals (sequence of str): Signal names; empty to switch off.
    """
    priority = 'LOWEST'  # after the schedulers' and logger's step

    def __init__(self, signals=('SIGTERM', 'SIGUSR1')) -> None:
        self.signals = [getattr(signal, name) for name in signals]
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        self._position: Optional[dict] = None
        self._saving: Optional[dict] = None

    # ------------------------------------------------------------ signals
    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def before_train(self, runner) -> None:
        from .loops import use_resumable_loop
        loop = use_resumable_loop(runner)
        if self._position is not None:
            self._resume_position(runner, loop)
        if threading.current_thread() is not threading.main_thread():
            if self.signals:
                runner.logger.warning(
                    'PreemptionHook: training runs outside the main thread, '
                    'where signal handlers cannot be set: a stop signal '
                    'ends the run without a checkpoint.')
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def after_train(self, runner) -> None:
        self.restore_handlers()

    def restore_handlers(self) -> None:
        """Put the previous signal handlers back (``after_train`` does; a run
        that stops on an exception skips it, so the tools call this too)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    # ------------------------------------------------------------- saving
    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Any = None,
                         outputs: Any = None) -> None:
        if not self.signals:
            return
        name = signal.Signals(self.received).name if self.received else None
        code, name = agree(1 if name else 0, name)
        if not code:
            return
        self.restore_handlers()
        self._save_and_stop(runner, batch_idx, name)

    def _save_and_stop(self, runner, batch_idx: int, name: str) -> None:
        from .checkpoint import SafeCheckpointHook
        from .hooks import RandomStateHook
        ckpt = next(
            (h for h in runner.hooks if isinstance(h, SafeCheckpointHook)),
            None)
        where = describe_position(runner)
        if ckpt is None:
            message = (f'{name} received: training stopped after {where} '
                       'without a checkpoint (the checkpoint hook is not a '
                       'davit_ext.SafeCheckpointHook).')
            raise Preempted(message)
        for hook in runner.hooks:
            if isinstance(hook, RandomStateHook):
                hook._capture()  # this very state (every rank's)
        loop = runner.train_loop
        self._saving = dict(
            epoch=runner.epoch,
            batch=batch_idx + 1 if _epoch_based(loop) else None,
            sampler_seed=getattr(
                getattr(loop.dataloader, 'sampler', None), 'seed', None),
            signal=name)
        try:
            path = ckpt.save_file(
                runner,
                f'{PREEMPT_PREFIX}{runner.iter + 1}.pth',
                meta=dict(epoch=runner.epoch, iter=runner.iter + 1),
                by_epoch=False)
        finally:
            self._saving = None
        message = (f'{name} received: training stopped after {where} and '
                   f'saved {path}. Continue with: tools/train.py CONFIG '
                   '--resume (same work_dir); exit status 75.')
        log_to_file(runner, message, logging.WARNING)
        raise Preempted(message)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._saving is not None:
            checkpoint[POSITION_KEY] = dict(self._saving)

    # ----------------------------------------------------------- resuming
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        position = checkpoint.get(POSITION_KEY)
        if getattr(runner, '_resume', False) and isinstance(position, dict):
            states = checkpoint.get('random_states')
            self._position = dict(position, random_states=states)

    def _resume_position(self, runner, loop) -> None:
        position, self._position = self._position, None
        sampler = getattr(loop.dataloader, 'sampler', None)
        seed = position.get('sampler_seed')
        if seed is not None and hasattr(sampler, 'seed'):
            sampler.seed = seed  # the interrupted run's order
        batch = position.get('batch')
        if batch is None or position.get('epoch') != runner.epoch:
            return
        if not hasattr(loop, 'resume_at'):
            runner.logger.warning(
                f'this train loop ({type(loop).__name__}) cannot start '
                f'an epoch in the middle: epoch {runner.epoch + 1} starts '
                f'again at its first batch ({batch} batches trained twice).')
            return
        states = position.get('random_states')
        rank, _ = get_dist_info()
        mine = states[rank % len(states)] if states else None
        loop.resume_at(batch, mine)
        runner.logger.info(
            f'resuming epoch {runner.epoch + 1} at batch {batch + 1} '
            f'(stopped there by {position.get("signal")}).')


# ---------------------------------------------------------- unreadable data


@HOOKS.register_module()
class UnreadableImageHook(Hook):
    """Unreadable training images: stop with one message, or skip them.

    davit_ext's ``LoadImageFromFile`` (what ``type='LoadImageFromFile'``
    builds in the davit_ext scope) turns a file that cannot be read or decoded
    into :class:`~davit_ext.errors.UnreadableImageError` naming the file and
    its dataset index (exit status 2). In distributed runs the ranks agree
    after every batch is loaded, so all stop together
    (:class:`~davit_ext.engine.loops.ResumableEpochBasedTrainLoop`).

    Args:
        skip (bool): Skip unreadable images of the *training* set instead: a
            warning names each, the dataset puts a random other image in its
            place (mmengine's refetch), and the number skipped is logged at
            the end of each epoch. Validation and test images are never
            skipped. Defaults to False (``tools/train.py --skip-unreadable``).
    """
    priority = 'NORMAL'

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self._counts: Optional[torch.Tensor] = None
        self._reported = 0

    def before_train(self, runner) -> None:
        from .data import configure_loaders
        from .loops import use_resumable_loop
        use_resumable_loop(runner)
        loader = runner.train_dataloader
        if self.skip:
            slots = max(int(getattr(loader, 'num_workers', 0)), 0) + 1
            self._counts = torch.zeros(slots, dtype=torch.int64)
            self._counts.share_memory_()
        found = configure_loaders(
            loader.dataset,
            skip=self.skip,
            counts=self._counts,
            where='train_dataloader.dataset')
        if self.skip and not found:
            runner.logger.warning(
                'UnreadableImageHook(skip=True): the training pipeline has no '
                'davit_ext LoadImageFromFile, nothing can be skipped.')

    def after_train_epoch(self, runner) -> None:
        if self._counts is None:
            return
        total = int(self._counts.sum())
        new = torch.tensor([total - self._reported], dtype=torch.int64)
        self._reported = total
        _, world_size = get_dist_info()
        if world_size > 1:
            all_reduce(new, op='sum')
        if int(new):
            print_log(
                f'epoch {runner.epoch + 1}: {int(new)} unreadable training '
                'image(s) skipped (each named in a warning above; the '
                'dataset used random other images in their place). '
                'tools/analysis_tools/check_dataset.py CONFIG lists them.',
                logger='current',
                level=logging.WARNING)
