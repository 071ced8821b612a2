"""Mixed precision training on CPU: ``tools/train.py --amp`` without a GPU.

mmengine's ``AmpOptimWrapper`` asserts a CUDA (or NPU/MLU) device. On a CPU,
autocast runs in bfloat16, which has the range of float32: no loss scaling is
needed, so the wrapper only has to run the forward under
``torch.autocast('cpu', dtype=torch.bfloat16)``; backward and the optimizer
step stay those of ``OptimWrapper`` (parameters and gradients in float32).
"""
from contextlib import contextmanager
from typing import Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper

from davit_ext.models.fast_paths import cpu_has_bf16
from davit_ext.registry import OPTIM_WRAPPERS


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
