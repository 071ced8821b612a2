"""What the runner uses from davit_ext: hooks, optimizer wrappers and
constructors (registered in the ``davit_ext`` scope on import), and the FSDP
wrap policy for mmengine's FSDPStrategy."""
from .fsdp import FSDPStrategy, davit_wrap_policy
from .hooks import FitLoadFromHook, RandomStateHook
from .optim import CPUAmpOptimWrapper, LayerDecayOptimWrapperConstructor

__all__ = [
    'FitLoadFromHook', 'RandomStateHook', 'CPUAmpOptimWrapper',
    'LayerDecayOptimWrapperConstructor', 'FSDPStrategy', 'davit_wrap_policy'
]
