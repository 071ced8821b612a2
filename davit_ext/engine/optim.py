"""Optimizer wrappers and constructors: mixed precision training on CPU
(``tools/train.py --amp`` without a GPU) and layer-wise lr decay for detectors
and segmentors.

mmengine's ``AmpOptimWrapper`` asserts a CUDA (or NPU/MLU) device. On a CPU,
autocast runs in bfloat16, which has the range of float32: no loss scaling is
needed, so the wrapper only has to run the forward under
``torch.autocast('cpu', dtype=torch.bfloat16)``; backward and the optimizer
step stay those of ``OptimWrapper`` (parameters and gradients in float32).
"""
from contextlib import contextmanager
from functools import partial
from typing import Callable, List, Optional, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from mmpretrain.engine.optimizers import \
    LearningRateDecayOptimWrapperConstructor

from davit_ext.errors import ConfigError
from davit_ext.models.fast_paths import cpu_has_bf16
from davit_ext.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward runs under CPU autocast (bfloat16).

    Args:
        dtype (str | torch.dtype): Autocast dtype. Defaults to
            ``'bfloat16'`` (CPU autocast supports bfloat16 and float16;
            float16 would need loss scaling, which this wrapper does not do,
            so only bfloat16 is accepted).
        **kwargs: Arguments of ``OptimWrapper``.
    """

    def __init__(self,
                 dtype: Union[str, torch.dtype] = 'bfloat16',
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if dtype is not torch.bfloat16:
            raise ValueError(
                'CPUAmpOptimWrapper: dtype must be bfloat16 (no loss '
                f'scaling on CPU); got {dtype}. Use mmengine\'s '
                'AmpOptimWrapper on a GPU for float16.')
        self.cast_dtype = dtype
        print_log(
            'CPUAmpOptimWrapper: forward under torch.autocast("cpu", '
            'bfloat16)' +
            ('' if cpu_has_bf16() else '; this CPU has no bf16 instructions '
             '(avx512_bf16/amx_bf16): slower than fp32'),
            logger='current')

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), torch.autocast(
                'cpu', dtype=self.cast_dtype):
            yield


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(
        LearningRateDecayOptimWrapperConstructor):
    """mmpretrain's layer-wise lr decay for detectors and segmentors.

    mmpretrain's constructor asks the *model* for ``get_layer_depth``, which
    its classifiers have and mmdet's detectors and mmseg's segmentors do not.
    This one falls back to ``model.backbone.get_layer_depth(name,
    'backbone.')``: DaViT's depths (stem 0, one per block), and the last
    depth -- the full lr -- for everything outside the backbone (neck,
    heads). The ``paramwise_cfg`` keys are mmpretrain's
    (``layer_decay_rate``, ``norm_decay_mult``, ``custom_keys``, ...).

    From an mmdet or mmseg config::

        optim_wrapper = dict(
            constructor='davit_ext.LayerDecayOptimWrapperConstructor',
            paramwise_cfg=dict(layer_decay_rate=0.9), ...)
    """

    def add_params(self,
                   params: List[dict],
                   module: nn.Module,
                   prefix: str = '',
                   get_layer_depth: Optional[Callable] = None,
                   **kwargs) -> None:
        if get_layer_depth is None and not hasattr(module, 'get_layer_depth'):
            backbone = getattr(module, 'backbone', None)
            if not hasattr(backbone, 'get_layer_depth'):
                raise ConfigError(
                    f'layer-wise lr decay needs get_layer_depth on the model '
                    f'({type(module).__name__}) or on its backbone '
                    f'({type(backbone).__name__}); DaViT has it. Remove '
                    f'the constructor or layer_decay_rate from optim_wrapper '
                    f'for this model.')
            get_layer_depth = partial(
                backbone.get_layer_depth, prefix=f'{prefix}backbone.')
        super().add_params(
            params,
            module,
            prefix=prefix,
            get_layer_depth=get_layer_depth,
            **kwargs)
