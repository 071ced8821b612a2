"""Keep mmpretrain importable next to packages its release did not foresee.

mmpretrain 1.2 imports its multimodal models (BLIP, Flamingo, ...) whenever
``pycocotools`` and ``transformers>=4.28`` are both installed. BLIP's code
imports helpers that transformers 5 removed from ``modeling_utils``, so with
transformers >= 5 every ``import mmpretrain.models`` -- every DaViT, every
``get_model`` -- fails with ``TypeError: NoneType takes no arguments``.
pycocotools comes with mmdet, transformers with Florence-2 and peft: a
detection user has both. :func:`keep_mmpretrain_importable` then makes
mmpretrain register its placeholders for those models instead (what it does
without transformers; they cannot run on transformers 5 anyway).

Imports nothing of davit_ext and only ``mmpretrain.utils`` of mmpretrain: it
must run before anything imports ``mmpretrain.models``.
"""
import sys
from importlib import metadata

__all__ = ['keep_mmpretrain_importable']


def _major(package: str) -> int:
    try:
        return int(metadata.version(package).split('.')[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


def keep_mmpretrain_importable() -> bool:
    """Turn mmpretrain's multimodal models off where importing them would fail;
    True if it did."""
    if 'mmpretrain.models' in sys.modules:
        return False  # too late to matter, or already imported fine
    from mmpretrain.utils import dependency
    if dependency.WITH_MULTIMODAL and _major('transformers') >= 5:
        dependency.WITH_MULTIMODAL = False
        return True
    return False
