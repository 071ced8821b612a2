"""Sharded training of DaViT with mmengine's ``FlexibleRunner`` and classic
FSDP (``FullyShardedDataParallel``).

- :class:`FSDPStrategy`: mmengine's ``FSDPStrategy``, with the optimizer's
  parameter-wise rules and gradient clipping of an unsharded run, and CPU
  processes (``type='davit_ext.FSDPStrategy'`` in a config);
- :func:`davit_wrap_policy`: the auto-wrap policy that makes every DaViT
  block (or stage) its own FSDP unit (``auto_wrap_policy=dict(
  type='davit_ext.davit_wrap_policy', wrap='block')``, from the ``davit_ext``
  function registry);
- :func:`full_state_dict`: the model's full state dict on every rank, the
  names and shapes the fit policy compares a checkpoint with.

See docs/large_models.md.
"""
import inspect
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Tuple

import torch
from mmengine._strategy import FSDPStrategy as _MMEngineFSDPStrategy
from torch import nn

from davit_ext.errors import ConfigError
from davit_ext.models.davit import DaViTBlock, DaViTStage
from davit_ext.registry import FUNCTIONS

__all__ = [
    'FSDPStrategy', 'WRAP_UNITS', 'davit_wrap_policy', 'is_fsdp',
    'full_state_dict'
]

#: What ``wrap=`` of :func:`davit_wrap_policy` may name.
WRAP_UNITS: Dict[str, Tuple[type, ...]] = {
    'block': (DaViTBlock, ),
    'stage': (DaViTStage, ),
}


@FUNCTIONS.register_module()
def davit_wrap_policy(module: nn.Module,
                      recurse: bool,
                      nonwrapped_numel: int,
                      wrap: str = 'block') -> bool:
    """FSDP auto-wrap policy: one FSDP unit per DaViT block or stage.

    A unit's parameters are gathered for its forward and backward only, so
    per block at most one block (plus the root's stem, head and norms) is
    unsharded at a time. ``'stage'`` makes fewer, larger units (fewer
    collectives, more memory while a stage runs). Each stage runs its own
    downsample, so a stage unit sees every use of its parameters.

    Args:
        module (nn.Module): The module FSDP asks about.
        recurse (bool): FSDP asks whether to look inside ``module``.
        nonwrapped_numel (int): Parameters not yet wrapped (unused).
        wrap (str): ``'block'`` (:class:`DaViTBlock`) or ``'stage'``
            (:class:`DaViTStage`).
    """
    if wrap not in WRAP_UNITS:
        raise ConfigError(
            f'davit_wrap_policy: wrap={wrap!r} is not a DaViT unit: use one '
            f'of {", ".join(map(repr, WRAP_UNITS))}.')
    if recurse:
        return True
    return isinstance(module, WRAP_UNITS[wrap])


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped in classic FSDP."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    return isinstance(model, FullyShardedDataParallel)


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP-wrapped ``model`` on every rank
    (collective: call it on all ranks), keys as in the unwrapped model.

    The state-dict type set by the strategy is restored afterwards.
    """
    from torch.distributed.fsdp import FullStateDictConfig
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType
    on_gpu = any(p.is_cuda for p in model.parameters())
    config = FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=False)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        return model.state_dict()


def _fsdp_clip_grad_norm(root: nn.Module):
    """A ``clip_func`` for mmengine's ``OptimWrapper``: FSDP's
    ``clip_grad_norm_``, whose norm is that of the whole gradient."""

    def clip(params: Any,
             max_norm: float,
             norm_type: float = 2.0,
             **unused: Any) -> torch.Tensor:
        return root.clip_grad_norm_(max_norm, norm_type)

    return clip


class FSDPStrategy(_MMEngineFSDPStrategy):
    """mmengine's ``FSDPStrategy``, training as an unsharded run does.

    Same arguments as mmengine's. What it changes:

    - **Parameter-wise optimizer rules.** mmengine builds the optimizer from
      the wrapped model, where every parameter is a flat shard: the rules of
      ``paramwise_cfg`` that look at shapes (``flat_decay_mult``: no weight
      decay on 1-d parameters) then apply to every parameter, and names
      carry ``_fsdp_wrapped_module.``. Here the optimizer wrapper is built
      from the model before it is wrapped, with the real shapes and names,
      then its parameter groups are moved onto the shards by name.
    - **Gradient clipping by norm** (``clip_grad=dict(max_norm=...)``)
      uses FSDP's ``clip_grad_norm_``: the norm of the whole gradient, as
      in an unsharded run (``torch.nn.utils.clip_grad_norm_`` would clip
      each rank's shard by the norm of that shard).
    - **CPU processes.** Without CUDA the wrapper's ``device_id`` is the
      CPU (mmengine passes the CUDA device ``LOCAL_RANK``), and full state
      dicts are not "offloaded to the CPU": with ``offload_to_cpu=True``
      (mmengine's ``state_dict_cfg='full'``) on CPU tensors, torch 2.14
      saves every Adam ``exp_avg`` as the ``exp_avg_sq`` (2 CPU processes).
    - **The optimizer state** is saved from and loaded into the optimizer
      with torch's argument order (mmengine 0.10.7 passes
      ``optim_state_dict_to_load`` its arguments in torch 2.0's order: a
      resume stops with ``TypeError: unhashable type: 'dict'``).
    - **Resuming a full checkpoint** (``state_dict_cfg='full'``): every rank
      has read the whole checkpoint, and every rank loads it
      (``rank0_only=False``). With mmengine's ``rank0_only=True`` torch
      2.14 aborts the non-zero ranks in ``load_state_dict`` (``INTERNAL
      ASSERT FAILED ... python_variable.cpp``, 2 CPU processes).

    After wrapping, the log says how many FSDP units the model has.
    """

    def prepare(self,
                model: Any,
                *,
                optim_wrapper: Any = None,
                **kwargs: Any) -> Any:
        self._pending_optim = optim_wrapper
        self._prebuilt = None
        try:
            return super().prepare(
                model, optim_wrapper=optim_wrapper, **kwargs)
        finally:
            self._pending_optim = self._prebuilt = None

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        from mmengine.model import is_model_wrapper
        from mmengine.optim import build_optim_wrapper
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        if is_model_wrapper(model):
            return super()._wrap_model(model)
        cfg = getattr(self, '_pending_optim', None)
        if isinstance(cfg, dict) and (cfg.get('optimizer') is not None
                                      or 'constructor' in cfg):
            cfg = cfg.copy()
            cfg.setdefault('type', 'OptimWrapper')
            if cfg['type'] == 'AmpOptimWrapper':
                cfg.setdefault('use_fsdp', True)  # as mmengine's does
            # Built before FSDP flattens the parameters (build_optim_wrapper
            # moves it onto the shards).
            names = {id(p): n for n, p in model.named_parameters()}
            self._prebuilt = (build_optim_wrapper(model, cfg), names)
        self.model_wrapper = dict(
            self.model_wrapper or dict(type='MMFullyShardedDataParallel'))
        if not torch.cuda.is_available():
            self.model_wrapper.setdefault('device_id', 'cpu')
            # Offloading to the CPU what is there already garbles the
            # optimizer state (torch 2.14: every gathered exp_avg is
            # exp_avg_sq); nothing to offload anyway.
            for config in (self.state_dict_config,
                           self.optim_state_dict_config):
                if getattr(config, 'offload_to_cpu', False):
                    config.offload_to_cpu = False
        wrapped = super()._wrap_model(model)
        kinds: Dict[str, int] = {}
        for unit in FSDP.fsdp_modules(wrapped):
            name = type(unit.module).__name__
            kinds[name] = kinds.get(name, 0) + 1
        self.logger.info('FSDP units: ' + ', '.join(f'{n} {k}'
                                                    for k, n in kinds.items()))
        return wrapped

    @contextmanager
    def _loading(self) -> Iterator[None]:
        """Full state dicts load on every rank (see the class docstring)."""
        from torch.distributed.fsdp import (FullOptimStateDictConfig,
                                            FullStateDictConfig)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType
        if not self._is_full_state_dict():
            yield
            return
        offload = getattr(self.state_dict_config, 'offload_to_cpu', False)
        optim_offload = getattr(self.optim_state_dict_config, 'offload_to_cpu',
                                False)
        with FSDP.state_dict_type(
                self.model, StateDictType.FULL_STATE_DICT,
                FullStateDictConfig(offload_to_cpu=offload, rank0_only=False),
                FullOptimStateDictConfig(
                    offload_to_cpu=optim_offload, rank0_only=False)):
            yield

    def load_model_state_dict(self, state_dict: dict, **kwargs: Any) -> None:
        with self._loading():
            super().load_model_state_dict(state_dict, **kwargs)

    def optim_state_dict(self) -> dict:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        state = FSDP.optim_state_dict(self.model, self.optim_wrapper.optimizer)
        if state:  # empty on ranks > 0 with rank0_only
            # What the wrapper keeps beside the optimizer (the schedulers'
            # base_lr group, AMP's loss scaler).
            state.update(_wrapper_extras(self.optim_wrapper.state_dict()))
        return state

    def load_optim_state_dict(self, state_dict: dict) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        extras = _wrapper_extras(state_dict)
        state_dict = {k: v for k, v in state_dict.items() if k not in extras}
        # mmengine passes (state, model, optimizer) positionally: torch >=
        # 2.1 takes (model, optim, optim_state_dict).
        with self._loading():
            state = FSDP.optim_state_dict_to_load(
                model=self.model,
                optim=self.optim_wrapper.optimizer,
                optim_state_dict=state_dict)
        self.optim_wrapper.load_state_dict(dict(state, **extras))

    def build_optim_wrapper(self,
                            optim_wrapper: Any,
                            model: Any = None) -> Any:
        prebuilt = getattr(self, '_prebuilt', None)
        if prebuilt is None:
            wrapper = super().build_optim_wrapper(optim_wrapper, model)
        else:
            wrapper = prebuilt[0]
            wrapper.optimizer = _onto_shards(wrapper.optimizer, prebuilt[1],
                                             model)
        if getattr(wrapper, 'grad_name', None) == 'grad_norm' and \
                is_fsdp(model):
            wrapper.clip_func = _fsdp_clip_grad_norm(model)
        return wrapper


def _wrapper_extras(state_dict: dict) -> dict:
    """The entries of an optim wrapper's state dict that are not the
    optimizer's."""
    return {
        k: v
        for k, v in state_dict.items() if k not in ('state', 'param_groups')
    }


def _clean_name(name: str) -> str:
    """A parameter's name in the unwrapped model."""
    for wrapper in ('_fsdp_wrapped_module.', '_checkpoint_wrapped_module.'):
        name = name.replace(wrapper, '')
    return name


def _onto_shards(optimizer: torch.optim.Optimizer, names: Dict[int, str],
                 model: nn.Module) -> torch.optim.Optimizer:
    """The same optimizer (class, defaults, parameter groups with their
    settings) over the FSDP-wrapped ``model``'s parameters, matched by name;
    ``optimizer`` has not stepped yet."""
    if optimizer.state:
        raise ConfigError('FSDPStrategy: the optimizer was given with a '
                          'state; give it as a config dict instead.')
    shards = {_clean_name(n): p for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        group = dict(group)
        group['params'] = [shards[names[id(p)]] for p in group['params']]
        groups.append(group)
    # Only the constructor's own arguments: torch adds defaults (e.g.
    # AdamW's decoupled_weight_decay) that its __init__ does not take.
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(groups, **defaults)
