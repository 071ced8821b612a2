"""davit_ext: DaViT for mmpretrain, in the ``davit_ext`` registry scope.

Importing the package registers mmpretrain's modules and ours, so configs with
``default_scope='davit_ext'`` build our ``DaViT`` and mmpretrain's everything
else. It also changes mmengine and mmpretrain process-wide (safe checkpoint
loaders, the model hub, mmpretrain's DaViT names, the FLOP table): see
:mod:`davit_ext.side_effects` for the list and how to opt out of each
(``DAVIT_EXT_DISABLE``).
"""
from mmpretrain.utils import register_all_modules as _register_mmpretrain

from .version import __version__

_register_mmpretrain(init_default_scope=False)

from . import amp  # noqa: E402,F401  (registers CPUAmpOptimWrapper)
from . import finetune  # noqa: E402,F401  (registers FitLoadFromHook)
from . import hooks  # noqa: E402,F401  (registers RandomStateHook)
from . import hub  # noqa: E402,F401  (mmpretrain's model hub serves ours)
from . import models  # noqa: E402,F401  (registers DaViT)
from .analysis import register_flop_handles  # noqa: E402
from .checkpoint import install as _install_safe_checkpoints  # noqa: E402
from .florence2 import install as _install_florence2  # noqa: E402
from .registry import MODELS  # noqa: E402,F401
from .side_effects import disabled as _disabled  # noqa: E402

if 'flops' not in _disabled():
    register_flop_handles()
# mmengine's loaders, as used by the runner, get_model and inference_model,
# load with weights_only=True and our allowlist (torch >= 2.6 checkpoints).
if 'checkpoint' not in _disabled():
    _install_safe_checkpoints()
    # The florence2:// weights of the -fl hub models (converted when
    # loaded); registered after the safe loaders, which refuse schemes
    # they do not know.
    _install_florence2()

__all__ = ['__version__', 'MODELS', 'models']
