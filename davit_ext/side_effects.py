"""What ``import davit_ext`` changes outside its own modules, and opt-outs.

``import davit_ext`` changes, process-wide:

- ``checkpoint``: mmengine's ``CheckpointLoader`` loads every scheme through
  :mod:`davit_ext.weights` (``weights_only=True`` + allowlist, sha256
  checks; unknown schemes refused), and gains the ``florence2://`` scheme
  (:mod:`davit_ext.weights.florence2`; its loads are as safe, and undo
  leaves it). Undo: :func:`davit_ext.weights.uninstall`.
- ``hub``: mmpretrain's ``ModelHub`` (behind ``get_model``,
  ``inference_model``, ``list_models``) also serves our model index, and
  marks our configs' model with ``_scope_='davit_ext'``. Undo:
  :func:`davit_ext.hub.uninstall`.
- ``names``: within ``hub``, mmpretrain's own names
  ``davit-{tiny,small,base}_3rdparty_in1k`` resolve to our entries (our
  DaViT). Keep mmpretrain's: ``davit_ext.hub.install(keep_mmpretrain_names=
  True)`` (our ``-official`` names are still added).
- ``flops``: mmengine's FLOP counter gets a handle for
  ``aten::scaled_dot_product_attention`` (counted for every model, not only
  ours). Undo: :func:`davit_ext.analysis.unregister_flop_handles`.

Not optional: with transformers >= 5 and pycocotools both installed,
mmpretrain's multimodal models (which cannot import there) are replaced by
its placeholders, or no mmpretrain model would import
(:mod:`davit_ext.compat`).

Set ``DAVIT_EXT_DISABLE`` to a comma-separated list of these names (or
``all``) before importing davit_ext to skip them. Registering our modules in
the ``davit_ext`` registry scope (a child of mmpretrain's) and mmpretrain's
own modules changes nothing that other code resolves.
"""
import os
from typing import FrozenSet

__all__ = ['ENV', 'SIDE_EFFECTS', 'disabled', 'install_unless_disabled']

#: The environment variable read on import.
ENV = 'DAVIT_EXT_DISABLE'
#: The side effects that can be turned off, by name.
SIDE_EFFECTS = ('checkpoint', 'hub', 'names', 'flops')


def disabled() -> FrozenSet[str]:
    """The side effects ``DAVIT_EXT_DISABLE`` turns off.

    Raises:
        ValueError: the variable names something unknown.
    """
    value = os.environ.get(ENV, '')
    items = {v.strip().lower() for v in value.replace(' ', ',').split(',')}
    items.discard('')
    if 'all' in items:
        return frozenset(SIDE_EFFECTS)
    unknown = sorted(items - set(SIDE_EFFECTS))
    if unknown:
        raise ValueError(
            f'{ENV}={value!r} names {", ".join(unknown)}, which davit_ext '
            f'does not know: use a comma-separated list of '
            f'{", ".join(SIDE_EFFECTS)}, or all.')
    return frozenset(items)


def install_unless_disabled() -> None:
    """What ``import davit_ext`` does: every side effect not disabled."""
    from . import analysis, hub
    from .weights import florence2, schemes
    off = disabled()
    if 'flops' not in off:
        analysis.register_flop_handles()
    if 'hub' not in off:
        hub.install(keep_mmpretrain_names='names' in off)
    if 'checkpoint' not in off:
        schemes.install()
        # florence2:// after the safe loaders, which refuse schemes they do
        # not know.
        florence2.install()
