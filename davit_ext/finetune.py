"""Fine-tuning from pretrained weights: which tensors of a checkpoint fit.

One policy, used wherever pretrained weights meet a model (``load_from`` in
``tools/train.py``, and our DaViT backbone whatever loads it: mmpretrain's
``get_model``/``inference_model``, ``init_cfg=dict(type='Pretrained')``,
``demo/image_demo.py --pretrained``):

- **head of another ``num_classes`` (or a new neck, new output norms) ->
  warning.** Every tensor whose name and shape fit is loaded; the others keep
  their initialisation and one warning lists them.
- **backbone of another arch -> refusal.** Backbone tensors of another shape,
  backbone tensors missing from the checkpoint or extra blocks in it (e.g.
  DaViT-S weights for a DaViT-T) raise :class:`CheckpointMismatchError`
  with one message: such weights cannot be meant.
- **no shared key -> refusal** (another layout, e.g. timm's, or a bare
  backbone state dict given as ``load_from``).

The backbone's output norms (``backbone.norm<i>``, one per ``out_indices``
entry) count as "head": a model with more outputs than the checkpoint's has
new ones. Resuming stays strict (:func:`davit_ext.preflight.check_checkpoint`).
"""
import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from mmengine.hooks import Hook

from davit_ext.checkpoint import CheckpointMismatchError, state_dict_of
from davit_ext.registry import HOOKS

__all__ = [
    'WeightsFit', 'fit_pretrained', 'check_backbone_weights', 'fit_warning',
    'FitLoadFromHook', 'BACKBONE_PREFIX', 'state_dict_of'
]

BACKBONE_PREFIX = 'backbone.'
_OUTPUT_NORM = re.compile(r'norm\d+\.')


class WeightsFit(NamedTuple):
    """What loading a checkpoint into a model does (names without ``module.``).

    Attributes:
        loaded (list[str]): Model keys taken from the checkpoint.
        kept (list[str]): Model keys that keep their initialisation, each
            with its reason, e.g. ``'head.fc.weight (checkpoint (1000, 768),
            model (3, 768))'`` or ``'head.fc.bias (not in the checkpoint)'``.
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


def _is_structural(rest: str) -> bool:
    """Whether a backbone key (without the prefix) is part of the arch, i.e.
    not an output norm."""
    return not _OUTPUT_NORM.match(rest)


def _backbone_problems(own: Dict[str, Optional[Tuple[int, ...]]],
                       theirs: Dict[str, Optional[Tuple[int, ...]]],
                       prefix: str) -> List[str]:
    """Ways in which the backbone keys under ``prefix`` of ``theirs`` (name.

    -> shape) are another arch than ``own``'s; empty if they fit.
    """
    mine = {
        k
        for k in own
        if k.startswith(prefix) and _is_structural(k[len(prefix):])
    }
    other = {
        k
        for k in theirs
        if k.startswith(prefix) and _is_structural(k[len(prefix):])
    }
    shapes = [
        f'{k} (checkpoint {theirs[k]}, model {own[k]})' for k in own
        if k in mine and k in other and theirs[k] != own[k]
    ]
    missing = [k for k in own if k in mine and k not in other]
    extra = [k for k in theirs if k in other and k not in mine]
    problems = []
    if shapes:
        problems.append(f'{len(shapes)} tensor(s) of another shape: '
                        f'{_listing(shapes, 3)}')
    if missing:
        problems.append(f'{len(missing)} backbone tensor(s) missing from the '
                        f'checkpoint: {_listing(missing, 3)}')
    if extra:
        problems.append(f'{len(extra)} backbone tensor(s) the model does not '
                        f'have: {_listing(extra, 3)}')
    return problems


def _arch_refusal(subject: str, model_name: str, problems: List[str]) -> str:
    return (f'{subject} the backbone of {model_name}: '
            f'it was trained with another arch ({"; ".join(problems)}). '
            f'Fine-tuning may change the head (num_classes), not the '
            f'backbone: use weights of the same arch (e.g. a '
            f'davit-tiny checkpoint for arch="tiny"), or set '
            f'model.backbone.arch to the checkpoint\'s arch.')


def fit_pretrained(model: torch.nn.Module,
                   checkpoint: Any,
                   source: str,
                   model_name: str = 'the model',
                   backbone_prefix: str = BACKBONE_PREFIX) -> WeightsFit:
    """Check pretrained weights against ``model`` under the fine-tuning policy
    (module docstring) and say what loading them does.

    Args:
        model (torch.nn.Module): The model to load into (a wrapper's
            ``module`` is used).
        checkpoint (Any): The loaded checkpoint (a dict with or without
            ``state_dict``).
        source (str): How to name the checkpoint in messages (its path).
        model_name (str): How to name the model in messages.
        backbone_prefix (str): Keys of the backbone. A model without such
            keys (a bare backbone) is all backbone. Defaults to
            ``'backbone.'``.

    Returns:
        WeightsFit: loaded, kept (at initialisation) and ignored keys.

    Raises:
        CheckpointMismatchError: the backbone is another arch, or the
            checkpoint shares no key with the model.
    """
    state_dict = state_dict_of(checkpoint, source)
    if hasattr(model, 'module') and isinstance(model.module, torch.nn.Module):
        model = model.module
    own = {k: _shape(v) for k, v in model.state_dict().items()}
    theirs = {k: _shape(v) for k, v in state_dict.items()}
    if not any(k.startswith(backbone_prefix) for k in own):
        backbone_prefix = ''
    shared = [k for k in own if k in theirs]
    if not shared:
        raise CheckpointMismatchError(
            f'checkpoint {source} does not fit {model_name}: none of its '
            f'{len(theirs)} keys is a key of the model (checkpoint: '
            f'{_listing(list(theirs), 2)}; model: {_listing(list(own), 2)}).'
            f' DaViT weights in the timm or official layout must be '
            f'converted first (tools/model_converters/davit_to_mmpretrain.py)'
            f'; a bare backbone state dict loads with '
            f'model.backbone.init_cfg=dict(type="Pretrained", '
            f'checkpoint=...) instead of load_from.')
    problems = _backbone_problems(own, theirs, backbone_prefix)
    if problems:
        raise CheckpointMismatchError(
            _arch_refusal(f'checkpoint {source} does not fit', model_name,
                          problems))
    loaded = [k for k in shared if own[k] == theirs[k]]
    kept, kept_keys = [], []
    for k in own:
        if k not in theirs:
            kept.append(f'{k} (not in the checkpoint)')
        elif own[k] != theirs[k]:
            kept.append(f'{k} (checkpoint {theirs[k]}, model {own[k]})')
        else:
            continue
        kept_keys.append(k)
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


def check_backbone_weights(module: torch.nn.Module, state_dict: Dict[str, Any],
                           prefix: str) -> None:
    """Refuse backbone weights of another arch while they are being loaded.

    For a backbone's ``_load_from_state_dict``: ``state_dict`` holds (at
    least) the keys under ``prefix``. Nothing to check if it holds none of
    the backbone's own tensors (a load of other parts only).

    Raises:
        CheckpointMismatchError: some backbone tensors have another shape,
            are missing, or the state dict has extra blocks.
    """
    own = {prefix + k: _shape(v) for k, v in module.state_dict().items()}
    theirs = {
        k: _shape(v)
        for k, v in state_dict.items() if k.startswith(prefix)
    }
    if not any(k in theirs and _is_structural(k[len(prefix):]) for k in own):
        return
    problems = _backbone_problems(own, theirs, prefix)
    if problems:
        name = f'this {type(module).__name__}' + (f' ({prefix[:-1]})'
                                                  if prefix else '')
        raise CheckpointMismatchError(
            _arch_refusal('the weights being loaded do not fit', name,
                          problems))


@HOOKS.register_module()
class FitLoadFromHook(Hook):
    """Apply the fine-tuning policy to the runner's ``load_from``.

    mmengine loads ``load_from`` non-strictly and warns about each skipped
    tensor in its own words. This hook, called with the checkpoint before it
    reaches the model, checks it with :func:`fit_pretrained` (refusing another
    backbone arch), logs one warning naming what keeps its initialisation, and
    hands mmengine a state dict that fits: the kept tensors' current
    (initialised) values instead of the checkpoint's, the ignored ones removed.
    Resuming is left alone (strict).
    """
    priority = 'VERY_HIGH'

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if getattr(runner, '_resume', False):
            return
        source = str(getattr(runner, '_load_from', None) or 'load_from')
        model = runner.model
        if hasattr(model, 'module') and isinstance(model.module,
                                                   torch.nn.Module):
            model = model.module
        fit = fit_pretrained(model, checkpoint, source, 'the model')
        message = fit_warning(fit, source)
        if message is None:
            return
        runner.logger.warning(message)
        state_dict = checkpoint.get('state_dict', checkpoint)
        names = {re.sub(r'^module\.', '', k): k for k in state_dict}
        own = model.state_dict()
        for key in fit.kept_keys:
            state_dict[names.get(key, key)] = own[key].detach().clone()
        for key in fit.ignored:
            del state_dict[names[key]]
