"""An epoch-based train loop that can start an epoch in the middle.

mmengine resumes an epoch-based run at the start of the epoch it was saved
in: a checkpoint saved mid-epoch (on a stop signal) would train that epoch's
first batches twice. :class:`ResumableEpochBasedTrainLoop` is mmengine's
``EpochBasedTrainLoop`` that, told to (:meth:`~ResumableEpochBasedTrainLoop.
resume_at`), skips the batches already trained without loading them, and
restores the random generators right after the epoch's data iterator is made
(making it draws a seed, which the interrupted run drew before its first
batch): the rest of the epoch is the interrupted run's, bit for bit, with
data loading in the main process.

In distributed runs the ranks also agree after each batch is loaded, so that
an unreadable image on one rank stops every rank at the same step.
"""
import contextlib
import logging
from typing import Any, Iterator, Optional

from mmengine.runner import EpochBasedTrainLoop
from torch.utils.data import BatchSampler

from davit_ext.errors import UnreadableImageError
from davit_ext.registry import LOOPS
from .faults import agree
from .hooks import set_random_states

__all__ = ['ResumableEpochBasedTrainLoop', 'use_resumable_loop']


class _SkipFirst:
    """A sampler that leaves out the first ``n`` indices of another; its length
    stays the epoch's (the logs count batches of the whole epoch)."""

    def __init__(self, sampler: Any, n: int) -> None:
        self.sampler, self.n = sampler, n

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        for _ in range(self.n):
            if next(it, StopIteration) is StopIteration:
                return
        yield from it

    def __len__(self) -> int:
        return len(self.sampler)


@LOOPS.register_module()
class ResumableEpochBasedTrainLoop(EpochBasedTrainLoop):
    """mmengine's ``EpochBasedTrainLoop`` (same arguments) that can start an
    epoch at a given batch and stops all ranks on an unreadable image.

    :class:`~davit_ext.engine.faults.PreemptionHook` switches mmengine's loop
    of a run to this class when training starts (it only adds behaviour), so
    configs need not name it.
    """
    current_batch: Optional[int] = None
    _start_batch = 0
    _start_states: Optional[dict] = None

    def resume_at(self, batch: int, random_states: Optional[dict]) -> None:
        """Start the current epoch at ``batch`` (0-based) and restore
        ``random_states`` (:func:`~davit_ext.engine.hooks.get_random_states`)
        once its data iterator is made."""
        self._start_batch, self._start_states = batch, random_states

    def run_epoch(self) -> None:
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        start, states = self._start_batch, self._start_states
        self._start_batch, self._start_states = 0, None
        with self._skipping(start) as skipped:
            iterator = iter(self.dataloader)
            for _ in range(start - skipped):
                # a batch sampler we cannot skip in: load and drop
                next(iterator, None)
            if states is not None:
                set_random_states(states)
            idx = start
            while True:
                data_batch = self._next(iterator)
                if data_batch is StopIteration:
                    break
                self.current_batch = idx
                self.run_iter(idx, data_batch)
                idx += 1
        self.current_batch = None
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1

    def _next(self, iterator: Iterator) -> Any:
        message = None
        try:
            batch = next(iterator)
        except StopIteration:
            batch = StopIteration
        except UnreadableImageError as err:
            batch, message = None, str(err)
        code, message = agree(1 if message else 0, message)
        if code:
            raise UnreadableImageError(message)
        return batch

    @contextlib.contextmanager
    def _skipping(self, batches: int):
        """Leave out the first ``batches`` batches of the epoch at the sampler
        (nothing is loaded); yields how many were left out."""
        batch_sampler = getattr(self.dataloader, 'batch_sampler', None)
        if batches == 0:
            yield 0
            return
        if type(batch_sampler) is not BatchSampler:
            self.runner.logger.warning(
                f'{type(batch_sampler).__name__} batches cannot be skipped '
                f'unread: the first {batches} batches of the epoch are loaded '
                'and dropped (their random augmentation draws differ from the '
                'interrupted run).')
            yield 0
            return
        sampler = batch_sampler.sampler
        batch_sampler.sampler = _SkipFirst(sampler,
                                           batches * batch_sampler.batch_size)
        try:
            yield batches
        finally:
            batch_sampler.sampler = sampler


def use_resumable_loop(runner) -> Any:
    """Make the runner's loop a :class:`ResumableEpochBasedTrainLoop` if it is
    mmengine's ``EpochBasedTrainLoop`` (the subclass adds behaviour only, so
    the object's class is switched in place); returns the loop."""
    loop = runner.train_loop
    if type(loop) is EpochBasedTrainLoop:
        loop.__class__ = ResumableEpochBasedTrainLoop
    elif not isinstance(loop, ResumableEpochBasedTrainLoop) and isinstance(
            loop, EpochBasedTrainLoop):
        runner.logger.log(
            logging.INFO, f'{type(loop).__name__} is kept: a mid-epoch resume '
            'restarts the epoch, and in distributed runs an unreadable image '
            'stops only the rank that read it.')
    return loop
