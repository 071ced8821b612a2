"""What the runner uses from davit_ext: hooks, a train loop, a pipeline
transform, optimizer wrappers and constructors (registered in the ``davit_ext``
scope on import)."""
from .checkpoint import AtomicLocalBackend, SafeCheckpointHook
from .data import LoadImageFromFile
from .faults import NonFiniteLossHook, PreemptionHook, UnreadableImageHook
from .hooks import FitLoadFromHook, RandomStateHook
from .loops import ResumableEpochBasedTrainLoop
from .optim import CPUAmpOptimWrapper, LayerDecayOptimWrapperConstructor

__all__ = [
    'FitLoadFromHook', 'RandomStateHook', 'CPUAmpOptimWrapper',
    'LayerDecayOptimWrapperConstructor', 'SafeCheckpointHook',
    'AtomicLocalBackend', 'NonFiniteLossHook', 'PreemptionHook',
    'UnreadableImageHook', 'ResumableEpochBasedTrainLoop', 'LoadImageFromFile'
]
