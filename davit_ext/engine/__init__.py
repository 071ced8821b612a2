"""What the runner uses from davit_ext: hooks, optimizer wrappers and
constructors (registered in the ``davit_ext`` scope on import)."""
from .hooks import FitLoadFromHook, RandomStateHook
from .optim import CPUAmpOptimWrapper, LayerDecayOptimWrapperConstructor

__all__ = [
    'FitLoadFromHook', 'RandomStateHook', 'CPUAmpOptimWrapper',
    'LayerDecayOptimWrapperConstructor'
]
