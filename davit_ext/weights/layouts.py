"""State-dict layouts of DaViT and the conversions between them.

The layouts below hold the same tensors under different names:

- ``mmpretrain``: ``backbone.patch_embed.projection``, ``backbone.stages.{i}.
  blocks.{j}.{spatial,channel}_block.*`` (window attention under
  ``attn.w_msa``), ``backbone.stages.{i}.downsample`` at the *end* of stage i,
  ``backbone.norm{last}``, ``head.fc``. This is our backbone's layout.
- ``timm``: ``stem.conv``, ``stages.{i}.blocks.{j}.{0,1}.*``, downsample at
  the *start* of stage i (``stages.{i}.downsample.conv``, i >= 1),
  ``head.norm``, ``head.fc``.
- ``official`` (github.com/dingmyu/davit): ``patch_embeds.0`` is the stem and
  ``patch_embeds.{i}`` (i >= 1) the downsample in front of stage i,
  ``main_blocks.{i}.{j}.{0,1}.*`` with ``cpe.{0,1}`` position encodings,
  ``norms`` (output norm) and ``head`` (the classifier ``Linear``).
- ``florence2`` and ``florence2-native`` (sources only): the DaViT vision
  tower of a Florence-2 checkpoint (microsoft/Florence-2-base / -large) in
  the two spellings Hugging Face serves. ``florence2`` is the remote-code
  model's (microsoft/Florence-2-*, ``trust_remote_code``): ``convs.{i}.proj``
  (stem, then the downsample in front of stage i), ``blocks.{s}.{b}.
  {spatial,channel}_block.*`` with pre-norm wrappers (``window_attn.norm`` /
  ``window_attn.fn``, ``ffn.fn.net.fc1`` ...). ``florence2-native`` is
  transformers' own Florence-2 (``transformers.models.florence2``, the
  florence-community/* repositories): ``convs.{i}.conv``, ``blocks.{s}.{b}.
  spatial_block.{conv1,norm1,window_attn.qkv,...,ffn.fc1}``. Either comes as
  a whole vision-language model (the tower under ``vision_tower.`` or
  ``model.vision_tower.``) or as the tower alone (no prefix):
  :func:`find_florence2_tower` finds the tower's prefix and layout from the
  key names. Florence-2 deleted the tower's output norm and classifier
  before training: a conversion from it adds the output norm as an identity
  LayerNorm (weight 1, bias 0: what timm's ``davit_*_fl`` keep, untouched, in
  its place; transformers' tower returns its last map without a norm). Every
  key outside the tower (language model, image projection, position
  embeddings) is left out by :func:`florence2_vision_tower`, which counts
  them.

timm's ``davit_*_fl`` models (``named_blocks``) name a block's halves
``spatial_block`` / ``channel_block`` instead of ``0`` / ``1``: both are read,
and a conversion to timm writes the named form for a model whose downsample
convs have kernel 3 (the ``_fl`` models; no other timm DaViT has them).

Every rule below names one tensor in all five layouts with a template whose
``{fields}`` are matched against a key and written into the other layout's
template. A field ending in ``_1`` holds one less than the shared value (the
mmpretrain stage that *ends* with a downsample is one below the timm/official
stage that starts with it). Conversion is a rename: values pass through
untouched, so every round trip is bit-identical.
"""
import re
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from torch import Tensor

from davit_ext.errors import (CheckpointMismatchError, UnknownLayoutError,
                              UnmappedKeysError)

__all__ = [
    'LAYOUTS', 'TARGET_LAYOUTS', 'FLORENCE2_LAYOUTS', 'convert',
    'detect_layout', 'find_florence2_tower', 'florence2_vision_tower',
    'unwrap_state_dict', 'infer_num_stages', 'timm_to_mmpretrain',
    'mmpretrain_to_timm', 'official_to_mmpretrain', 'mmpretrain_to_official',
    'official_to_timm', 'timm_to_official'
]

LAYOUTS = ('mmpretrain', 'timm', 'official', 'florence2', 'florence2-native')
#: Layouts a state dict can be converted to (Florence-2 is a source only).
TARGET_LAYOUTS = ('mmpretrain', 'timm', 'official')
#: Florence-2 towers: remote-code and transformers-native spellings.
FLORENCE2_LAYOUTS = ('florence2', 'florence2-native')
#: Where the remote-code Florence-2 model keeps its tower.
FLORENCE2_PREFIX = 'vision_tower.'

# What each field of a template may match.
_FIELD_RE = {
    's': r'\d+',  # stage index
    'b': r'\d+',  # block index inside a stage
    'd': r'\d+',  # stage a downsample feeds (timm/official numbering)
    'd_1': r'\d+',  # the same minus one (mmpretrain numbering)
    'last': r'\d+',  # index of the last stage (mmpretrain's output norm)
    'p': r'weight|bias',
    'm': r'qkv|proj',
}

# One row per tensor family: (mmpretrain, timm, official, florence2,
# florence2-native) templates; None where the layout has no such tensor.
# Florence-2 templates name keys inside the tower (its prefix removed).
_RULES: List[Tuple[Optional[str], ...]] = [
    ('backbone.patch_embed.projection.{p}', 'stem.conv.{p}',
     'patch_embeds.0.proj.{p}', 'convs.0.proj.{p}', 'convs.0.conv.{p}'),
    ('backbone.patch_embed.norm.{p}', 'stem.norm.{p}',
     'patch_embeds.0.norm.{p}', 'convs.0.norm.{p}', 'convs.0.norm.{p}'),
    ('backbone.stages.{d_1}.downsample.norm.{p}',
     'stages.{d}.downsample.norm.{p}', 'patch_embeds.{d}.norm.{p}',
     'convs.{d}.norm.{p}', 'convs.{d}.norm.{p}'),
    ('backbone.stages.{d_1}.downsample.projection.{p}',
     'stages.{d}.downsample.conv.{p}', 'patch_embeds.{d}.proj.{p}',
     'convs.{d}.proj.{p}', 'convs.{d}.conv.{p}'),
    ('backbone.norm{last}.{p}', 'head.norm.{p}', 'norms.{p}', None, None),
    ('head.fc.{p}', 'head.fc.{p}', 'head.{p}', None, None),
]
# The output norm's row (added as identity for Florence-2 sources).
_NORM_ROW = 4
# Inside a block: (mmpretrain, timm, official, florence2, florence2-native)
# submodule names; ``{attn}`` is ``window_attn`` or ``channel_attn``.
_BLOCK_SUBMODULES = [
    ('cpe1.proj', 'cpe1.proj', 'cpe.0.proj', 'conv1.fn.dw', 'conv1'),
    ('cpe2.proj', 'cpe2.proj', 'cpe.1.proj', 'conv2.fn.dw', 'conv2'),
    ('norm1', 'norm1', 'norm1', '{attn}.norm', 'norm1'),
    ('norm2', 'norm2', 'norm2', 'ffn.norm', 'norm2'),
    ('ffn.layers.0.0', 'mlp.fc1', 'mlp.fc1', 'ffn.fn.net.fc1', 'ffn.fc1'),
    ('ffn.layers.1', 'mlp.fc2', 'mlp.fc2', 'ffn.fn.net.fc2', 'ffn.fc2'),
]
for _mm_part, _idx, _mm_attn, _fl_attn in (('spatial_block', '0', 'attn.w_msa',
                                            'window_attn'),
                                           ('channel_block', '1', 'attn',
                                            'channel_attn')):
    _prefixes = (f'backbone.stages.{{s}}.blocks.{{b}}.{_mm_part}.',
                 f'stages.{{s}}.blocks.{{b}}.{_idx}.',
                 f'main_blocks.{{s}}.{{b}}.{_idx}.',
                 f'blocks.{{s}}.{{b}}.{_mm_part}.',
                 f'blocks.{{s}}.{{b}}.{_mm_part}.')
    _attn = (_mm_attn, 'attn', 'attn', _fl_attn + '.fn', _fl_attn)
    _RULES.append(
        tuple(pre + a + '.{m}.{p}' for pre, a in zip(_prefixes, _attn)))
    for _subs in _BLOCK_SUBMODULES:
        _RULES.append(
            tuple(pre + sub.replace('{attn}', _fl_attn) + '.{p}'
                  for pre, sub in zip(_prefixes, _subs)))

# A key that only the layout's own checkpoints have (Florence-2: see
# _FLORENCE2_MARKERS, as its towers come under any prefix).
_MARKERS = {
    'mmpretrain': 'backbone.patch_embed.projection.weight',
    'timm': 'stem.conv.weight',
    'official': 'patch_embeds.0.proj.weight',
}
# Two keys of each Florence-2 tower, relative to the tower: a stem alone is
# not enough (mmseg decode heads have ``convs.0.conv.weight`` too).
_FLORENCE2_MARKERS = {
    'florence2': ('convs.0.proj.weight',
                  'blocks.0.0.spatial_block.window_attn.fn.qkv.weight'),
    'florence2-native':
    ('convs.0.conv.weight', 'blocks.0.0.spatial_block.window_attn.qkv.weight'),
}
# Where each layout numbers its stages (Florence-2: inside the tower).
_STAGE_RE = {
    'mmpretrain': r'backbone\.stages\.(\d+)\.',
    'timm': r'stages\.(\d+)\.',
    'official': r'main_blocks\.(\d+)\.',
    'florence2': r'blocks\.(\d+)\.',
    'florence2-native': r'blocks\.(\d+)\.',
}
# timm's named block halves (``davit_*_fl``) <-> its indexed ones.
_TIMM_NAMED = re.compile(r'^(stages\.\d+\.blocks\.\d+\.)'
                         r'(spatial_block|channel_block)\.')
_TIMM_INDEXED = re.compile(r'^(stages\.\d+\.blocks\.\d+\.)([01])\.')
_HALVES = ('spatial_block', 'channel_block')
# Keys under which training scripts wrap a state dict, in order of preference.
WRAPPER_KEYS = ('state_dict', 'model', 'state_dict_ema', 'model_ema')


def _compile(template: str) -> 're.Pattern':
    parts = re.split(r'\{(\w+)\}', template)
    regex = ''
    for i, part in enumerate(parts):
        regex += re.escape(part) if i % 2 == 0 else \
            f'(?P<{part}>{_FIELD_RE[part]})'
    return re.compile(regex)


_COMPILED = [
    tuple(None if t is None else _compile(t) for t in row) for row in _RULES
]


def _check_layout(name: str, what: str) -> str:
    choices = TARGET_LAYOUTS if what == 'target' else LAYOUTS
    if name not in choices:
        raise ValueError(f'Unknown {what} layout {name!r}; choose one of '
                         f'{list(choices)}.')
    return name


def find_florence2_tower(keys: Iterable[str]) -> Optional[Tuple[str, str]]:
    """Find a Florence-2 vision tower among state dict key names.

    Args:
        keys: The key names (of a whole Florence-2 model, of its tower alone,
            or of anything else).

    Returns:
        tuple or None: ``(layout, prefix)``: ``'florence2'`` (remote code) or
        ``'florence2-native'`` (transformers), and the prefix its tower's keys
        have (``'vision_tower.'``, ``'model.vision_tower.'``, ``''`` ...);
        None if no tower is there.

    Raises:
        UnknownLayoutError: More than one tower (a file of several models).
    """
    keys = set(keys)
    found = []
    for layout, (stem, block) in _FLORENCE2_MARKERS.items():
        for key in keys:
            if not key.endswith(stem):
                continue
            prefix = key[:-len(stem)]
            if (prefix == '' or prefix.endswith('.')) and \
                    prefix + block in keys:
                found.append((layout, prefix))
    if len(found) > 1:
        raise UnknownLayoutError(
            'The state dict holds several Florence-2 vision towers (' +
            ', '.join(f'{layout} under {prefix!r}'
                      for layout, prefix in sorted(found)) +
            '); convert one model at a time.')
    return found[0] if found else None


def florence2_vision_tower(
    state_dict: Mapping[str, Tensor],
    prefix: Optional[str] = None
) -> Tuple['OrderedDict[str, Tensor]', List[str]]:
    """Split a Florence-2 state dict into its DaViT vision tower.

    Args:
        state_dict: A whole Florence-2 model or its tower alone, in either
            layout.
        prefix: Where the tower's keys start; found when None.

    Returns:
        tuple: The tower's entries with the prefix removed (``convs.0.*``,
        ``blocks.*``) and the list of every other key (language model, image
        projection, position embeddings ...), which no DaViT layout holds.

    Raises:
        UnknownLayoutError: No Florence-2 tower in the state dict.
    """
    if prefix is None:
        found = find_florence2_tower(state_dict)
        if found is None:
            raise UnknownLayoutError(
                'No Florence-2 vision tower in the state dict: no key ends '
                'in ' + ' or '.join(
                    repr(stem) for stem, _ in _FLORENCE2_MARKERS.values()) +
                ' next to its first block.')
        prefix = found[1]
    tower, others = OrderedDict(), []
    for key, value in state_dict.items():
        if key.startswith(prefix):
            tower[key[len(prefix):]] = value
        else:
            others.append(key)
    return tower, others


def unwrap_state_dict(checkpoint: Any,
                      key: Optional[str] = None,
                      source: str = 'the checkpoint') -> Dict[str, Tensor]:
    """The state dict inside a loaded checkpoint: the one place that unwraps.

    A checkpoint is either a plain state dict or a dict holding one under
    ``key`` (by default the first of ``state_dict``, ``model``,
    ``state_dict_ema``, ``model_ema`` that is there). DDP's ``module.``
    prefix is dropped from the keys that have it.

    Raises:
        CheckpointMismatchError: not a dict, or ``key`` is not in it.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(
            f'checkpoint {source} holds a {type(checkpoint).__name__}, not a '
            f'dict of weights: it is not a model checkpoint.')
    if key is not None:
        if key not in checkpoint:
            raise CheckpointMismatchError(
                f'checkpoint {source} has no {key!r} entry; its entries are '
                f'{sorted(map(str, checkpoint))[:20]}.')
        state_dict = checkpoint[key]
    else:
        state_dict = checkpoint
        for name in WRAPPER_KEYS:
            if isinstance(checkpoint.get(name), Mapping):
                state_dict = checkpoint[name]
                break
    if not isinstance(state_dict, Mapping):
        raise CheckpointMismatchError(
            f'checkpoint {source}: "{key}" is a {type(state_dict).__name__}, '
            f'not a dict of tensors.')
    if any(k.startswith('module.') for k in state_dict):
        state_dict = OrderedDict(
            (k[len('module.'):] if k.startswith('module.') else k, v)
            for k, v in state_dict.items())
    return state_dict


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """Name the layout of a DaViT state dict (one of :data:`LAYOUTS`), from
    keys that each one alone has; a Florence-2 tower may be under any prefix (a
    whole model) or none (the tower alone)."""
    found = [name for name, key in _MARKERS.items() if key in state_dict]
    florence2 = find_florence2_tower(state_dict)
    if florence2 is not None:
        found.append(florence2[0])
    if len(found) == 1:
        return found[0]
    keys = list(state_dict)
    shown = ', '.join(keys[:10]) + (' ...' if len(keys) > 10 else '')
    if not found:
        raise UnknownLayoutError(
            'Not a DaViT state dict of a known layout: none of the stem keys '
            + ', '.join(f'{v!r} ({k})' for k, v in _MARKERS.items()) +
            ', nor a Florence-2 vision tower (' +
            ', '.join(f'"[PREFIX]{stem}" ({k})'
                      for k, (stem, _) in _FLORENCE2_MARKERS.items()) +
            f') is there. Its {len(keys)} keys start with: {shown}')
    raise UnknownLayoutError(
        f'The state dict mixes DaViT layouts {found}; convert a checkpoint of '
        'one model at a time.')


def infer_num_stages(state_dict: Mapping[str, Tensor], layout: str) -> int:
    """Number of stages of a DaViT state dict (highest stage index + 1); a
    Florence-2 one may be a whole model."""
    pattern = re.compile(_STAGE_RE[_check_layout(layout, 'source')])
    if layout in FLORENCE2_LAYOUTS:
        state_dict, _ = florence2_vision_tower(state_dict)
    stages = [int(m.group(1)) for m in map(pattern.match, state_dict) if m]
    if not stages:
        raise UnknownLayoutError(
            f'No stage of a {layout} DaViT state dict found (no key matches '
            f'{_STAGE_RE[layout]!r}).')
    return max(stages) + 1


def convert(state_dict: Mapping[str, Tensor],
            dst: str,
            src: Optional[str] = None,
            num_stages: Optional[int] = None,
            ignored: Optional[List[str]] = None) -> 'OrderedDict[str, Tensor]':
    """Rename a DaViT classifier state dict from layout ``src`` to ``dst``.

    Args:
        state_dict: The state dict (not a wrapping checkpoint, see
            :func:`unwrap_state_dict`).
        dst: ``'mmpretrain'``, ``'timm'`` or ``'official'``.
        src: Layout of ``state_dict`` (also ``'florence2'`` or
            ``'florence2-native'``, a whole model or the tower alone);
            detected when None.
        num_stages: Stages of the model (decides which mmpretrain
            ``backbone.norm{i}`` is the output norm); inferred when None.
        ignored: With a Florence-2 source, the keys outside its vision tower
            are skipped and appended to this list when one is given.

    Raises:
        UnknownLayoutError: ``src`` is None and cannot be detected.
        UnmappedKeysError: Keys that fit no rule, all listed.
    """
    _check_layout(dst, 'target')
    src = detect_layout(state_dict) if src is None else _check_layout(
        src, 'source')
    if src in FLORENCE2_LAYOUTS:
        found = find_florence2_tower(state_dict)
        if found is None or found[0] != src:
            raise UnknownLayoutError(
                f'No {src} vision tower in the state dict (it has '
                f'{"a " + found[0] + " one" if found else "none"}).')
        state_dict, others = florence2_vision_tower(state_dict, found[1])
        if ignored is not None:
            ignored.extend(others)
    elif src == 'timm':
        state_dict = _timm_block_halves(state_dict, named=False)
    if num_stages is None:
        num_stages = infer_num_stages(state_dict, src)
    i_src, i_dst = LAYOUTS.index(src), LAYOUTS.index(dst)
    out, unmapped = OrderedDict(), []
    for key, value in state_dict.items():
        new_key = _rename(key, i_src, i_dst, num_stages)
        if new_key is None:
            unmapped.append(key)
        elif new_key in out:
            raise ValueError(f'Two keys of the {src} state dict map to '
                             f'{new_key!r}; is it a DaViT checkpoint?')
        else:
            out[new_key] = value
    if unmapped:
        raise UnmappedKeysError(src, dst, unmapped)
    if src in FLORENCE2_LAYOUTS:
        _add_identity_output_norm(out, i_src, i_dst, num_stages)
    if dst == 'timm' and _is_timm_fl(out):
        out = _timm_block_halves(out, named=True)
    return out


def _timm_block_halves(state_dict: Mapping[str, Tensor],
                       named: bool) -> 'OrderedDict[str, Tensor]':
    """timm block halves ``.0.``/``.1.`` to ``.spatial_block.``/
    ``.channel_block.`` (``named``) or back."""

    def half(m: 're.Match') -> str:
        name = _HALVES[int(m.group(2))] if named else \
            _HALVES.index(m.group(2))
        return f'{m.group(1)}{name}.'

    pattern = _TIMM_INDEXED if named else _TIMM_NAMED
    return OrderedDict(
        (pattern.sub(half, k), v) for k, v in state_dict.items())


def _is_timm_fl(timm_state_dict: Mapping[str, Tensor]) -> bool:
    """Whether a timm state dict is one of timm's ``davit_*_fl`` models (the
    only timm DaViTs with kernel-3 downsample convs)."""
    return any(
        k.endswith('downsample.conv.weight') and v.shape[-1] == 3
        for k, v in timm_state_dict.items())


def _add_identity_output_norm(out: 'OrderedDict[str, Tensor]', i_src: int,
                              i_dst: int, num_stages: int) -> None:
    """Add the output LayerNorm that Florence-2's tower lacks, as identity."""
    import torch

    # Its width: that of the last stage's first block's last norm.
    row = next(r for r in _RULES
               if r[0] == 'backbone.stages.{s}.blocks.{b}.channel_block.'
               'norm2.{p}')
    last_norm = row[i_src].format(s=num_stages - 1, b=0, p='weight')
    ref = _rename(last_norm, i_src, i_dst, num_stages)
    if ref is None or ref not in out:
        raise UnknownLayoutError(
            'The Florence-2 vision tower has no blocks in its last stage '
            f'({num_stages - 1}); is the checkpoint complete?')
    channels = out[ref].shape[0]
    template = _RULES[_NORM_ROW][i_dst]
    for p, fill in (('weight', torch.ones), ('bias', torch.zeros)):
        key = template.format(last=num_stages - 1, p=p)
        out[key] = fill(channels, dtype=out[ref].dtype)


def _rename(key: str, i_src: int, i_dst: int,
            num_stages: int) -> Optional[str]:
    for row, compiled in zip(_RULES, _COMPILED):
        if compiled[i_src] is None:
            continue
        m = compiled[i_src].fullmatch(key)
        if m is None:
            continue
        if row[i_dst] is None:
            return None  # no such tensor in the target layout
        fields = m.groupdict()
        if 'last' in fields and int(fields['last']) != num_stages - 1:
            return None  # a norm of another stage: not the classifier's
        # Shared values: undo the "minus one" of ``*_1`` fields.
        shared = {(k[:-2] if k.endswith('_1') else k):
                  (str(int(v) + 1) if k.endswith('_1') else v)
                  for k, v in fields.items()}
        shared['last'] = str(num_stages - 1)
        if 'd' in shared:
            shared['d_1'] = str(int(shared['d']) - 1)
            if not 1 <= int(shared['d']) < num_stages:
                return None  # no such downsample layer
        return row[i_dst].format(**shared)
    return None


def mmpretrain_to_timm(
        state_dict: Mapping[str, Tensor],
        num_stages: Optional[int] = None) -> 'OrderedDict[str, Tensor]':
    """Rename an mmpretrain DaViT classifier state dict to timm's layout.

    The output norm ``backbone.norm{num_stages - 1}`` becomes ``head.norm``.
    Raises :class:`UnmappedKeysError` listing keys that fit no rule.
    """
    return convert(state_dict, 'timm', 'mmpretrain', num_stages)


def timm_to_mmpretrain(
        state_dict: Mapping[str, Tensor],
        num_stages: Optional[int] = None) -> 'OrderedDict[str, Tensor]':
    """Rename a timm ``DaVit`` state dict to the mmpretrain layout."""
    return convert(state_dict, 'mmpretrain', 'timm', num_stages)


def official_to_mmpretrain(
        state_dict: Mapping[str, Tensor],
        num_stages: Optional[int] = None) -> 'OrderedDict[str, Tensor]':
    """Rename an official (dingmyu/davit) state dict to mmpretrain's."""
    return convert(state_dict, 'mmpretrain', 'official', num_stages)


def mmpretrain_to_official(
        state_dict: Mapping[str, Tensor],
        num_stages: Optional[int] = None) -> 'OrderedDict[str, Tensor]':
    """Rename an mmpretrain DaViT state dict to the official layout."""
    return convert(state_dict, 'official', 'mmpretrain', num_stages)


def official_to_timm(
        state_dict: Mapping[str, Tensor],
        num_stages: Optional[int] = None) -> 'OrderedDict[str, Tensor]':
    """Rename an official (dingmyu/davit) state dict to timm's layout."""
    return convert(state_dict, 'timm', 'official', num_stages)


def timm_to_official(
        state_dict: Mapping[str, Tensor],
        num_stages: Optional[int] = None) -> 'OrderedDict[str, Tensor]':
    """Rename a timm ``DaVit`` state dict to the official layout."""
    return convert(state_dict, 'official', 'timm', num_stages)
