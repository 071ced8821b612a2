"""Which tensors of a checkpoint fit a model: the one fit policy.

Applied once per load, wherever weights meet a model (``load_from``,
``--resume`` and ``tools/test.py`` through
:class:`~davit_ext.engine.hooks.FitLoadFromHook`; the ONNX exporter):

- ``strict=True`` (resume, test, export): same keys, same shapes.
- ``strict=False`` (fine-tuning):

  - **head of another ``num_classes`` (or a new neck, new output norms) ->
    warning.** Every tensor whose name and shape fit is loaded; the others
    keep their initialisation and one warning lists them.
  - **backbone of another arch -> refusal** (tensors of another shape,
    missing, or extra blocks): such weights cannot be meant.
  - **no shared key -> refusal** (another layout, e.g. timm's, or a bare
    backbone state dict given as ``load_from``).

The arch comparison itself is the backbone's own pure check
(:func:`davit_ext.models.davit.arch_problems`), which also guards every other
load into the backbone (``init_cfg``, ``get_model``, ``load_state_dict``).
"""
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

from davit_ext.errors import CheckpointMismatchError
from davit_ext.models.davit import arch_problems, arch_refusal
from .layouts import unwrap_state_dict

__all__ = ['WeightsFit', 'fit_pretrained', 'fit_warning', 'BACKBONE_PREFIX']

BACKBONE_PREFIX = 'backbone.'
CONVERTER = 'tools/model_converters/davit_to_mmpretrain.py'


class WeightsFit(NamedTuple):
    """What loading a checkpoint into a model does (names without ``module.``).

    Attributes:
        loaded (list[str]): Model keys taken from the checkpoint.
        kept (list[str]): Model keys that keep their initialisation, each
            with its reason, e.g. ``'head.fc.bias (not in the checkpoint)'``.
        kept_keys (list[str]): The same keys, bare.
        ignored (list[str]): Checkpoint keys the model does not have.
    """
    loaded: List[str]
    kept: List[str]
    kept_keys: List[str]
    ignored: List[str]


def _shape(value: Any) -> Optional[Tuple[int, ...]]:
    return tuple(value.shape) if hasattr(value, 'shape') else None


def _listing(items: List[str], limit: int = 4) -> str:
    shown = ', '.join(items[:limit])
    return shown + (f', ... ({len(items) - limit} more)'
                    if len(items) > limit else '')


def _strict_problems(own: Dict, theirs: Dict, model_name: str) -> List[str]:
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [
        f'{k} (checkpoint {theirs[k]}, model {own[k]})' for k in theirs
        if k in own and theirs[k] != own[k]
    ]
    problems = []
    if missing:
        problems.append(f'{len(missing)} key(s) of {model_name} are '
                        f'missing: {_listing(missing, 5)}')
    if unexpected:
        problems.append(f'{len(unexpected)} key(s) are not in {model_name}: '
                        f'{_listing(unexpected, 5)}')
    if shapes:
        problems.append(f'{len(shapes)} shape mismatch(es): '
                        f'{_listing(shapes, 3)}')
    return problems


def fit_pretrained(model: torch.nn.Module,
                   checkpoint: Any,
                   source: str,
                   model_name: str = 'the model',
                   strict: bool = False,
                   backbone_prefix: str = BACKBONE_PREFIX) -> WeightsFit:
    """Check a checkpoint against ``model`` (module docstring) and say what
    loading it does.

    Args:
        model (torch.nn.Module): The model (a wrapper's ``module`` is used).
        checkpoint (Any): The loaded checkpoint (with or without
            ``state_dict``).
        source (str): How to name the checkpoint in messages.
        model_name (str): How to name the model in messages.
        strict (bool): Same keys and shapes (resume, test) instead of the
            fine-tuning policy.
        backbone_prefix (str): Keys of the backbone; a model without such
            keys is all backbone.

    Raises:
        CheckpointMismatchError: what does not fit, and what to do.
    """
    state_dict = unwrap_state_dict(checkpoint, source=source)
    if hasattr(model, 'module') and isinstance(model.module, torch.nn.Module):
        model = model.module
    own = {k: _shape(v) for k, v in model.state_dict().items()}
    theirs = {k: _shape(v) for k, v in state_dict.items()}
    if strict:
        problems = _strict_problems(own, theirs, model_name)
        if problems:
            raise CheckpointMismatchError(
                f'checkpoint {source} does not fit {model_name}: ' +
                '; '.join(problems) + '. Use a checkpoint saved from this '
                'config (same arch and num_classes); DaViT weights in the '
                f'timm or official layout must be converted first ({CONVERTER}'
                ').')
        return WeightsFit(list(own), [], [], [])
    if not any(k.startswith(backbone_prefix) for k in own):
        backbone_prefix = ''
    shared = [k for k in own if k in theirs]
    if not shared:
        raise CheckpointMismatchError(
            f'checkpoint {source} does not fit {model_name}: none of its '
            f'{len(theirs)} keys is a key of the model (checkpoint: '
            f'{_listing(list(theirs), 2)}; model: {_listing(list(own), 2)}).'
            f' DaViT weights in the timm or official layout must be '
            f'converted first ({CONVERTER}); a bare backbone state dict loads '
            f'with model.backbone.init_cfg=dict(type="Pretrained", '
            f'checkpoint=...) instead of load_from.')
    problems = arch_problems(own, theirs, backbone_prefix)
    if problems:
        raise CheckpointMismatchError(
            arch_refusal(f'checkpoint {source} does not fit', model_name,
                         problems))
    kept, kept_keys = [], []
    for k in own:
        if k not in theirs:
            kept.append(f'{k} (not in the checkpoint)')
        elif own[k] != theirs[k]:
            kept.append(f'{k} (checkpoint {theirs[k]}, model {own[k]})')
        else:
            continue
        kept_keys.append(k)
    loaded = [k for k in shared if own[k] == theirs[k]]
    ignored = [k for k in theirs if k not in own]
    return WeightsFit(loaded, kept, kept_keys, ignored)


def fit_warning(fit: WeightsFit, source: str) -> Optional[str]:
    """The one warning for a fine-tuning load, or None if all fits."""
    if not fit.kept and not fit.ignored:
        return None
    parts = [f'load_from {source}: loaded {len(fit.loaded)} tensor(s)']
    if fit.kept:
        parts.append(f'{len(fit.kept)} keep their initialisation (a new head '
                     f'is expected when fine-tuning): '
                     f'{_listing(fit.kept, 8)}')
    if fit.ignored:
        parts.append(f'{len(fit.ignored)} checkpoint tensor(s) not in the '
                     f'model are ignored: {_listing(fit.ignored, 8)}')
    return '; '.join(parts) + '.'
