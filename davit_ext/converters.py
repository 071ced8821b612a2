"""State-dict layouts of DaViT and the conversions between them.

Three layouts hold the same tensors under different names:

- ``mmpretrain``: ``backbone.patch_embed.projection``, ``backbone.stages.{i}.
  blocks.{j}.{spatial,channel}_block.*`` (window attention under
  ``attn.w_msa``), ``backbone.stages.{i}.downsample`` at the *end* of stage i,
  ``backbone.norm3``, ``head.fc``. This is our backbone's layout.
- ``timm``: ``stem.conv``, ``stages.{i}.blocks.{j}.{0,1}.*``, downsample at
  the *start* of stage i (``stages.{i+1}.downsample.conv``), ``head.norm``,
  ``head.fc``.

Each rule below is a pair of regexes, one per layout, applied to the whole key;
conversion is a rename, so values are passed through untouched (a round trip
is bit-identical).
"""
import re
from collections import OrderedDict
from typing import Dict, List, Tuple

from torch import Tensor

# (mmpretrain pattern, timm pattern). Groups are written as named groups so
# a rule can be used in both directions; ``{n}``-style references are
# filled from the match.
_MMPRETRAIN_TIMM: List[Tuple[str, str]] = [
    (r'backbone\.patch_embed\.projection\.(?P<p>weight|bias)',
     r'stem\.conv\.(?P<p>weight|bias)'),
    (r'backbone\.patch_embed\.norm\.(?P<p>weight|bias)',
     r'stem\.norm\.(?P<p>weight|bias)'),
    (r'backbone\.stages\.(?P<s>\d+)\.downsample\.norm\.(?P<p>weight|bias)',
     r'stages\.(?P<s1>\d+)\.downsample\.norm\.(?P<p>weight|bias)'),
    (r'backbone\.stages\.(?P<s>\d+)\.downsample\.projection\.'
     r'(?P<p>weight|bias)',
     r'stages\.(?P<s1>\d+)\.downsample\.conv\.(?P<p>weight|bias)'),
    (r'backbone\.stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.spatial_block\.'
     r'attn\.w_msa\.(?P<m>qkv|proj)\.(?P<p>weight|bias)',
     r'stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.0\.attn\.(?P<m>qkv|proj)\.'
     r'(?P<p>weight|bias)'),
    (r'backbone\.stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.channel_block\.'
     r'attn\.(?P<m>qkv|proj)\.(?P<p>weight|bias)',
     r'stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.1\.attn\.(?P<m>qkv|proj)\.'
     r'(?P<p>weight|bias)'),
]
_BLOCK_PARTS = [('spatial_block', '0'), ('channel_block', '1')]
_SUBMODULES = [(r'cpe1\.proj', r'cpe1\.proj'), (r'cpe2\.proj', r'cpe2\.proj'),
               (r'norm1', r'norm1'), (r'norm2', r'norm2'),
               (r'ffn\.layers\.0\.0', r'mlp\.fc1'),
               (r'ffn\.layers\.1', r'mlp\.fc2')]
for _mm_part, _timm_part in _BLOCK_PARTS:
    for _mm_sub, _timm_sub in _SUBMODULES:
        _MMPRETRAIN_TIMM.append(
            (rf'backbone\.stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.{_mm_part}'
             rf'\.{_mm_sub}\.(?P<p>weight|bias)',
             rf'stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.{_timm_part}'
             rf'\.{_timm_sub}\.(?P<p>weight|bias)'))
_MMPRETRAIN_TIMM += [
    (r'backbone\.norm(?P<n>\d+)\.(?P<p>weight|bias)',
     r'head\.norm\.(?P<p>weight|bias)'),
    (r'head\.fc\.(?P<p>weight|bias)', r'head\.fc\.(?P<p>weight|bias)'),
]


def _fill(pattern: str, groups: Dict[str, str]) -> str:
    """Write the key that ``pattern`` describes, using matched groups."""

    def group(m: 're.Match') -> str:
        return groups[m.group(1)]

    key = re.sub(r'\(\?P<(\w+)>[^)]*\)', group, pattern)
    return key.replace('\\', '')


class UnmappedKeysError(KeyError):
    """Some keys of a state dict fit no rule of the conversion."""

    def __init__(self, src: str, dst: str, keys: List[str]) -> None:
        shown = ', '.join(keys[:20]) + (' ...' if len(keys) > 20 else '')
        super().__init__(
            f'{len(keys)} key(s) of the {src} state dict have no {dst} '
            f'equivalent: {shown}')
        self.keys = keys

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


def mmpretrain_to_timm(state_dict: Dict[str, Tensor],
                       num_stages: int = 4) -> 'OrderedDict[str, Tensor]':
    """Rename an mmpretrain DaViT classifier state dict to timm's layout.

    The output-norm ``backbone.norm{num_stages - 1}`` becomes ``head.norm``.
    Raises :class:`UnmappedKeysError` listing keys that fit no rule.
    """
    return _convert(state_dict, 'mmpretrain', 'timm', num_stages)


def timm_to_mmpretrain(state_dict: Dict[str, Tensor],
                       num_stages: int = 4) -> 'OrderedDict[str, Tensor]':
    """Rename a timm ``DaVit`` state dict to the mmpretrain layout."""
    return _convert(state_dict, 'timm', 'mmpretrain', num_stages)


def _convert(state_dict: Dict[str, Tensor], src: str, dst: str,
             num_stages: int) -> 'OrderedDict[str, Tensor]':
    forward = src == 'mmpretrain'
    out, unmapped = OrderedDict(), []
    for key, value in state_dict.items():
        new_key = None
        for mm_pat, timm_pat in _MMPRETRAIN_TIMM:
            pat_in, pat_out = (mm_pat, timm_pat) if forward else (timm_pat,
                                                                   mm_pat)
            m = re.fullmatch(pat_in, key)
            if m is None:
                continue
            groups = dict(m.groupdict())
            # Stage of a downsample layer: end of stage s (mmpretrain) is
            # the start of stage s + 1 (timm).
            if 's' in groups and 's1' in pat_out:
                groups['s1'] = str(int(groups['s']) + 1)
            elif 's1' in groups and '<s>' in pat_out:
                groups['s'] = str(int(groups['s1']) - 1)
            if 'n' in groups and int(groups['n']) != num_stages - 1:
                break  # only the last stage's norm feeds the head
            if 'n' in pat_out:
                groups['n'] = str(num_stages - 1)
            new_key = _fill(pat_out, groups)
            break
        if new_key is None:
            unmapped.append(key)
        else:
            out[new_key] = value
    if unmapped:
        raise UnmappedKeysError(src, dst, unmapped)
    return out
