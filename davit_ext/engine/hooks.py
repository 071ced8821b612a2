"""Hooks of every davit_ext run (listed in the runtime base's
``custom_hooks``).

- :class:`RandomStateHook` makes ``--resume`` lose nothing: mmengine saves
  the weights, optimizer, schedulers and message hub, but not the random
  generators, so after a resume drop-path, Mixup/CutMix and random data
  augmentation would draw different numbers than the uninterrupted run did.
- :class:`FitLoadFromHook` applies the fit policy
  (:mod:`davit_ext.weights.fit`) to the checkpoint the runner has just read,
  before it reaches the model: once per load, with no second read.
"""
import random
import re
from typing import Any, List, Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_dist_info
from mmengine.hooks import CheckpointHook, Hook

from davit_ext.errors import CheckpointStateError, NothingToResume
from davit_ext.registry import HOOKS
from davit_ext.weights.fit import fit_pretrained, fit_warning

#: Key of the saved states in a checkpoint (a list with one entry per rank).
CHECKPOINT_KEY = 'random_states'


def get_random_states() -> dict:
    """The states of Python's, numpy's and torch's global generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = dict(
        python=random.getstate(),
        # numpy's uint32 key array is stored as an int64 tensor: checkpoints
        # then hold no numpy type beyond those mmengine itself writes.
        numpy=(kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
               gauss),
        torch=torch.get_rng_state())
    if torch.cuda.is_available():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict) -> None:
    """Restore what :func:`get_random_states` returned."""
    random.setstate(_as_tuple(states['python']))
    kind, keys, pos, has_gauss, gauss = states['numpy']
    np.random.set_state(
        (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` wants tuples all the way down."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save the random generators in checkpoints, restore them on resume.

    - When the :class:`~mmengine.hooks.CheckpointHook` is about to save (end
      of an epoch or iteration), the states of every rank are gathered and
      written to the checkpoint under ``'random_states'``.
    - On resume they are restored before training continues, each rank its
      own, so a resumed run is identical to an uninterrupted one (with
      ``randomness=dict(seed=..., deterministic=True)``, data loading in the
      main process and an epoch-based loop; mmengine's iteration-based loop
      re-reads the skipped batches, which may draw augmentation randomness).
    - Validation during training runs on a saved copy of the states, so
      whether or how often one validates does not change training.

    Runs at ``NORMAL`` priority: before the CheckpointHook (``VERY_LOW``).
    """
    priority = 'NORMAL'

    def __init__(self) -> None:
        self._pending: Optional[List[dict]] = None
        self._to_restore: Optional[List[dict]] = None
        self._before_val: Optional[dict] = None

    # ---------------------------------------------------------- saving
    def _checkpoint_hook(self, runner) -> Optional[CheckpointHook]:
        for hook in runner.hooks:
            if isinstance(hook, CheckpointHook):
                return hook
        return None

    def _capture(self) -> None:
        states = get_random_states()
        _, world_size = get_dist_info()
        self._pending = all_gather_object(states) \
            if world_size > 1 else [states]

    def after_train_epoch(self, runner) -> None:
        ckpt = self._checkpoint_hook(runner)
        if ckpt is None or not ckpt.by_epoch:
            return
        if ckpt.every_n_epochs(runner, ckpt.interval, ckpt.save_begin) or (
                ckpt.save_last and ckpt.is_last_train_epoch(runner)):
            self._capture()

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Any = None,
                         outputs: Any = None) -> None:
        ckpt = self._checkpoint_hook(runner)
        if ckpt is None or ckpt.by_epoch:
            return
        if ckpt.every_n_train_iters(
                runner, ckpt.interval,
                ckpt.save_begin) or (ckpt.save_last
                                     and ckpt.is_last_train_iter(runner)):
            self._capture()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._pending is not None:
            checkpoint[CHECKPOINT_KEY] = self._pending

    # ---------------------------------------------------------- resuming
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._to_restore = checkpoint.get(CHECKPOINT_KEY)

    def before_train(self, runner) -> None:
        states, self._to_restore = self._to_restore, None
        if not states or (runner.iter == 0 and runner.epoch == 0):
            return  # not a resume (or an old checkpoint without states)
        rank, world_size = get_dist_info()
        if len(states) != world_size:
            runner.logger.warning(
                f'The checkpoint holds random states of {len(states)} '
                f'rank(s), this run has {world_size}: random draws will '
                f'differ from the original run after resuming.')
        set_random_states(states[rank % len(states)])

    # ---------------------------------------------------------- validation
    def before_val(self, runner) -> None:
        self._before_val = get_random_states()

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            set_random_states(self._before_val)
            self._before_val = None


@HOOKS.register_module()
class FitLoadFromHook(Hook):
    """The fit policy for the checkpoint the runner loads.

    Called with the checkpoint the runner has read, before it reaches the
    model:

    - ``--resume``: the checkpoint must hold the training state
      (:class:`~davit_ext.errors.CheckpointStateError`), fit the model
      exactly, and leave something to train
      (:class:`~davit_ext.errors.NothingToResume`);
    - ``load_from`` of a training run: the fine-tuning policy. Another
      backbone arch is refused; otherwise one warning names what keeps its
      initialisation, and mmengine is handed a state dict that fits (the kept
      tensors' initialised values, the ignored ones removed);
    - testing (``tools/test.py CONFIG CHECKPOINT``): an exact fit.

    Mismatches raise :class:`~davit_ext.errors.CheckpointMismatchError`.
    """
    priority = 'VERY_HIGH'

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.runner import BaseLoop
        model = _fit_view(runner)
        source = str(getattr(runner, '_load_from', None) or 'the checkpoint')
        name = f'the model of {_config_name(runner)}'
        if getattr(runner, '_resume', False):
            _check_training_state(checkpoint, source)
            if model is not None:
                fit_pretrained(model, checkpoint, source, name, strict=True)
            _check_work_left(runner, checkpoint, source)
            return
        if model is None:
            return  # one rank's shard: its keys are FSDP's, not the model's
        if not isinstance(getattr(runner, '_train_loop', None), BaseLoop):
            fit_pretrained(model, checkpoint, source, name, strict=True)
            return
        fit = fit_pretrained(model, checkpoint, source, name)
        message = fit_warning(fit, source)
        if message is None:
            return
        runner.logger.warning(message)
        state_dict = checkpoint.get('state_dict', checkpoint)
        names = {re.sub(r'^module\.', '', k): k for k in state_dict}
        own = model.state_dict()
        for key in fit.kept_keys:
            state_dict[names.get(key, key)] = own[key].detach().clone()
        for key in fit.ignored:
            del state_dict[names[key]]


class _StateDictView:
    """What the fit policy reads of a model (``state_dict()``), for a model
    whose own ``state_dict()`` would be sharded."""

    def __init__(self, state_dict: dict) -> None:
        self._state_dict = state_dict

    def state_dict(self) -> dict:
        return self._state_dict


def _fit_view(runner) -> Any:
    """The model as the fit policy compares it with a checkpoint; None where
    the checkpoint is one rank's shard (FSDP's ``state_dict_cfg='local'``).

    Under FSDP (mmengine's FSDPStrategy) the parameters are sharded: the full
    state dict is gathered on every rank (all ranks load the checkpoint, so all
    ranks are here).
    """
    from davit_ext.engine.fsdp import full_state_dict, is_fsdp
    model = runner.model
    if is_fsdp(model):
        strategy = getattr(runner, 'strategy', None)
        is_full = getattr(strategy, '_is_full_state_dict', lambda: True)
        if not is_full():
            return None
        return _StateDictView(full_state_dict(model))
    if hasattr(model, 'module') and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _config_name(runner) -> str:
    import os.path as osp
    name = getattr(getattr(runner, 'cfg', None), 'filename', None)
    return osp.basename(name) if name else 'the config'


def _check_training_state(checkpoint: Any, source: str) -> None:
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    missing = [
        k for k in ('epoch', 'iter')
        if not isinstance(meta, dict) or k not in meta
    ]
    if not isinstance(checkpoint, dict) or 'message_hub' not in checkpoint:
        missing.append('message_hub')
    if missing:
        raise CheckpointStateError(
            f'checkpoint {source} holds weights but not the training state '
            f'needed to resume ({", ".join(missing)} missing): it was not '
            f'saved by an mmengine training run. To start training from '
            f'these weights, pass them as --cfg-options load_from={source} '
            f'instead of --resume.')


def _check_work_left(runner, checkpoint: dict, source: str) -> None:
    """Raise :class:`NothingToResume` if the checkpoint already reached the
    train loop's end."""
    from mmengine.runner import EpochBasedTrainLoop
    loop = runner.train_loop
    unit = 'epoch' if isinstance(loop, EpochBasedTrainLoop) else 'iter'
    done = checkpoint['meta'].get(unit)
    total = getattr(loop, f'max_{unit}s', None)
    if not isinstance(done, int) or not isinstance(total, int) or \
            done < total:
        return
    plural = '' if done == 1 else 's'
    more = done + (1 if unit == 'epoch' else 1000)
    raise NothingToResume(
        f'nothing to resume: checkpoint {source} has already done {done} '
        f'{unit}{plural} and train_cfg.max_{unit}s is {total}. To train '
        f'longer, raise it, e.g. --cfg-options train_cfg.max_{unit}s={more}')
