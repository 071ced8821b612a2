"""davit_ext: DaViT for mmpretrain, in the ``davit_ext`` registry scope.

Importing the package registers mmpretrain's modules and ours, so configs with
``default_scope='davit_ext'`` build our ``DaViT`` and mmpretrain's everything
else.
"""
from mmpretrain.utils import register_all_modules as _register_mmpretrain

from .version import __version__

_register_mmpretrain(init_default_scope=False)

from . import amp  # noqa: E402,F401  (registers CPUAmpOptimWrapper)
from . import hooks  # noqa: E402,F401  (registers RandomStateHook)
from . import hub  # noqa: E402,F401  (mmpretrain's model hub serves ours)
from . import models  # noqa: E402,F401  (registers DaViT)
from .analysis import register_flop_handles  # noqa: E402
from .checkpoint import install as _install_safe_checkpoints  # noqa: E402
from .registry import MODELS  # noqa: E402,F401

register_flop_handles()
# mmengine's loaders, as used by the runner, get_model and inference_model,
# load with weights_only=True and our allowlist (torch >= 2.6 checkpoints).
_install_safe_checkpoints()

__all__ = ['__version__', 'MODELS', 'models']
