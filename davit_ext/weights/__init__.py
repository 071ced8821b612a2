"""Everything about weights: reading them safely, downloading, the mmengine
checkpoint schemes, state-dict layouts, the fit policy, Florence-2 files.

Layering: this package uses :mod:`davit_ext.errors` and the backbone's pure
arch check (:mod:`davit_ext.models`); nothing here knows the tools.

Public entry points:

- :func:`load_checkpoint_file` -- path, URL or ``scheme://`` -> checkpoint;
- :func:`safe_torch_load` -- a file or file object, no download;
- :func:`download_checkpoint` -- URL -> verified local path;
- :func:`fit_pretrained` -- what of a checkpoint fits a model, or one
  refusal;
- :func:`install` / :func:`uninstall` -- route mmengine's
  ``CheckpointLoader`` through these loaders (``import davit_ext`` installs),
  or give mmengine its own back;
- :mod:`~davit_ext.weights.layouts` -- mmpretrain/timm/official/Florence-2
  key layouts and :func:`~davit_ext.weights.layouts.convert`.
"""
from .download import (CACHE_SUBDIR, download_checkpoint, expected_sha256,
                       expected_sha256_prefix)
from .fit import WeightsFit, fit_pretrained, fit_warning
from .safe_load import (MIN_TORCH, allowed_globals, safe_load_context,
                        safe_torch_load)
from .schemes import (SCHEMES, install, is_installed, load_checkpoint_file,
                      load_from_http, load_from_local, uninstall)

__all__ = [
    'CACHE_SUBDIR', 'download_checkpoint', 'expected_sha256',
    'expected_sha256_prefix', 'WeightsFit', 'fit_pretrained', 'fit_warning',
    'MIN_TORCH', 'allowed_globals', 'safe_load_context', 'safe_torch_load',
    'SCHEMES', 'install', 'is_installed', 'load_checkpoint_file',
    'load_from_http', 'load_from_local', 'uninstall'
]
