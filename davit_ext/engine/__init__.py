"""What the runner uses from davit_ext: hooks and optimizer wrappers
(registered in the ``davit_ext`` scope on import)."""
from .hooks import FitLoadFromHook, RandomStateHook
from .optim import CPUAmpOptimWrapper

__all__ = ['FitLoadFromHook', 'RandomStateHook', 'CPUAmpOptimWrapper']
