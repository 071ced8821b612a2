"""davit_ext: DaViT for mmpretrain, in the ``davit_ext`` registry scope.

Importing the package registers mmpretrain's modules and ours, so configs with
``default_scope='davit_ext'`` build our ``DaViT`` and mmpretrain's everything
else. It also changes mmengine and mmpretrain process-wide (safe checkpoint
loaders, the model hub, mmpretrain's DaViT names, the FLOP table): see
:mod:`davit_ext.side_effects` for the list and how to opt out of each
(``DAVIT_EXT_DISABLE``). The layers are described in docs/architecture.md.
"""
from mmpretrain.utils import register_all_modules as _register_mmpretrain

from .compat import keep_mmpretrain_importable
from .version import __version__

keep_mmpretrain_importable()
_register_mmpretrain(init_default_scope=False)

from . import engine  # noqa: F401  (registers hooks, optim wrapper)
from . import models  # noqa: F401  (registers DaViT)
from .engine import (CPUAmpOptimWrapper, FitLoadFromHook, FSDPStrategy,
                     LayerDecayOptimWrapperConstructor, NonFiniteLossHook,
                     PreemptionHook, RandomStateHook,
                     ResumableEpochBasedTrainLoop, SafeCheckpointHook,
                     UnreadableImageHook)
from .models import DaViT
from .registry import MODELS
from .side_effects import install_unless_disabled

install_unless_disabled()

# What configs name as ``davit_ext.<Name>`` is exported here: from other scopes
# (mmdet, mmseg) that is how the dotted names resolve. Our registry is a child
# of mmpretrain's, which mmengine's scoped lookup does not search, so it falls
# back to importing the dotted name.
__all__ = [
    '__version__', 'DaViT', 'CPUAmpOptimWrapper', 'FitLoadFromHook',
    'FSDPStrategy', 'LayerDecayOptimWrapperConstructor', 'RandomStateHook',
    'MODELS', 'models', 'NonFiniteLossHook', 'PreemptionHook',
    'ResumableEpochBasedTrainLoop', 'SafeCheckpointHook', 'UnreadableImageHook'
]
