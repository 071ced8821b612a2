"""davit_ext: DaViT for mmpretrain, in the ``davit_ext`` registry scope.

Importing the package registers mmpretrain's modules and ours, so configs with
``default_scope='davit_ext'`` build our ``DaViT`` and mmpretrain's everything
else.
"""
from mmpretrain.utils import register_all_modules as _register_mmpretrain

from .version import __version__

_register_mmpretrain(init_default_scope=False)

from . import models  # noqa: E402,F401  (registers DaViT)
from .analysis import register_flop_handles  # noqa: E402
from . import hub  # noqa: E402,F401  (mmpretrain's model hub serves ours)
from .registry import MODELS  # noqa: E402,F401

register_flop_handles()

__all__ = ['__version__', 'MODELS', 'models']
