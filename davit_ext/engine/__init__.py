"""What the runner uses from davit_ext: hooks, a train loop, a pipeline
transform, optimizer wrappers and constructors (registered in the ``davit_ext``
scope on import), and the FSDP strategy and wrap policy for mmengine's
FlexibleRunner."""
from .checkpoint import AtomicLocalBackend, SafeCheckpointHook
from .data import LoadImageFromFile
from .faults import NonFiniteLossHook, PreemptionHook, UnreadableImageHook
from .fsdp import FSDPStrategy, davit_wrap_policy
from .hooks import FitLoadFromHook, RandomStateHook
from .loops import ResumableEpochBasedTrainLoop
from .optim import CPUAmpOptimWrapper, LayerDecayOptimWrapperConstructor

__all__ = [
    'FitLoadFromHook', 'RandomStateHook', 'CPUAmpOptimWrapper',
    'LayerDecayOptimWrapperConstructor', 'SafeCheckpointHook',
    'AtomicLocalBackend', 'NonFiniteLossHook', 'PreemptionHook',
    'UnreadableImageHook', 'ResumableEpochBasedTrainLoop', 'LoadImageFromFile',
    'FSDPStrategy', 'davit_wrap_policy'
]
