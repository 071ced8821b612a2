"""DaViT: Dual Attention Vision Transformers (Ding et al., ECCV 2022).

Our own implementation, written for mmpretrain's ``ImageClassifier`` and for
speed. Its state dict has exactly the keys and shapes of mmpretrain 1.2's
``DaViT`` so the published checkpoints load with ``strict=True``.

Layout: between the stem and the output norms every feature map travels as a
contiguous ``(B, H, W, C)`` tensor ("tokens in a grid"). LayerNorm and the
linear layers act on the last dim directly, the depthwise convolutions see the
same memory as a channels-last NCHW tensor (a view, no copy), and only window
partitioning needs a real copy.

Module contract: each module's ``forward`` below states its math with the
calls of its layers, and those calls run on every path (hooks, adapters,
quantized layers and autocast see what they expect). Where
:func:`fast_paths.plain` proves that nothing could tell the difference (exact
layer classes, no hooks, no parametrization, not traced or compiled), a CPU
fast path from :mod:`davit_ext.models.fast_paths` computes the same values
with fewer passes over memory or a faster GEMM; each call site names it
(``fast_paths.linear(self.qkv, x)`` is ``self.qkv(x)``, with oneDNN's GEMMs
in fp32 on CPU).

Input sizes: any ``H, W`` runs. Feature maps are ``ceil(H / 4)`` then halved
with ceil at each stage, as in the original model: an odd map is padded
right/bottom by the downsample layer, and a map that is not a multiple of the
window is padded right/bottom (after the LayerNorm, no attention mask), both
exactly as the original DaViT does. Where every stage map is even and at least
the window, the forward equals mmpretrain's.
"""
import re
from copy import deepcopy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from mmcv.cnn import build_norm_layer
from mmengine.utils.dl_utils.parrots_wrapper import _BatchNorm
from mmpretrain.models.backbones.base_backbone import BaseBackbone
from torch import Tensor
from torchvision.ops import stochastic_depth

from davit_ext.errors import CheckpointMismatchError
from davit_ext.registry import MODELS
from . import fast_paths


def _reshape(x: Tensor, shape: Tuple) -> Tensor:
    """``x.reshape(shape)``; when exporting with dynamic shapes, always as a
    copy.

    Whether a reshape can be a view depends on which sizes are 1 (e.g. one
    window per row): the exporter would freeze that answer for the example's
    size. A copy first makes the view valid for every size.
    """
    if fast_paths.is_symbolic(*x.shape):
        return x.clone(memory_format=torch.contiguous_format).view(shape)
    return x.reshape(shape)


def _sym_min(a, b):
    """``min`` that torch.export keeps symbolic (``torch.sym_min``); sizes that
    ``torch.jit.trace`` hands out as tensors (FLOP counting) take the
    builtin."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return min(a, b)
    return torch.sym_min(a, b)


def _sym_max(a, b):
    """``max`` counterpart of :func:`_sym_min`."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return max(a, b)
    return torch.sym_max(a, b)


def drop_path(x: Tensor, prob: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch."""
    return stochastic_depth(x, prob, 'row', training)


class ConvPosEnc(nn.Module):
    """Conditional position encoding: ``x + depthwise_conv(x)``.

    Args:
        embed_dims (int): Number of channels.
        kernel_size (int): Kernel of the depthwise conv. Defaults to 3.
    """

    def __init__(self, embed_dims: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            embed_dims,
            embed_dims,
            kernel_size,
            padding=kernel_size // 2,
            groups=embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, H, W, C) -> (B, H, W, C)."""
        out = fast_paths.cpe_folded(self.proj, x)
        if out is not None:
            return out
        # The NHWC map is a channels-last NCHW tensor: no copy either way.
        nchw = x.permute(0, 3, 1, 2)
        if fast_paths.is_exporting():
            # The same sum in NCHW (exported graphs): OpenVINO then adds in
            # the conv's own layout and reads both transposes as layout
            # changes, instead of reordering the map twice per encoding.
            return (nchw + self.proj(nchw)).permute(0, 2, 3, 1)
        return x + self.proj(nchw).permute(0, 2, 3, 1)


class FFN(nn.Module):
    """Two-layer MLP with GELU (keys ``layers.0.0`` and ``layers.1``).

    Args:
        embed_dims (int): Input and output channels.
        hidden_dims (int): Hidden channels.
    """

    def __init__(self, embed_dims: int, hidden_dims: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, hidden_dims), nn.GELU()),
            nn.Linear(hidden_dims, embed_dims))

    def forward(self, x: Tensor) -> Tensor:
        """``fc2(gelu(fc1(x)))`` over the last dim."""
        return self.layers(x)


class WindowMSA(nn.Module):
    """Multi-head self-attention inside each window (no position bias).

    Args:
        embed_dims (int): Number of channels.
        num_heads (int): Number of heads.
        qkv_bias (bool): Bias of the fused qkv projection. Defaults to True.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (num_windows * B, N, C) -> same shape."""
        B, N, C = x.shape
        # fast_paths.linear(layer, x) is layer(x) (fp32 CPU: oneDNN GEMMs).
        qkv = fast_paths.linear(self.qkv, x)
        q, k, v = qkv.view(B, N, 3, self.num_heads,
                           C // self.num_heads).permute(2, 0, 3, 1,
                                                        4).unbind(0)
        x = self.attend(q, k, v)
        return fast_paths.linear(self.proj, x.transpose(1, 2).reshape(B, N, C))

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``softmax(q k^T / sqrt(head_dim)) v`` per window and head."""
        if q.device.type == 'cpu' and (q.dtype
                                       in (torch.bfloat16, torch.float16)
                                       or not torch.is_grad_enabled()):
            # On CPU these matmuls beat SDPA on 49-token windows: in half
            # precision (autocast) 1.6x in forward and 5-7x in forward +
            # backward, in fp32 inference 1.5x (measured, AVX512-BF16 CPU).
            # The same math, as mmpretrain's DaViT writes it.
            attn = (q * q.shape[-1]**-0.5) @ k.transpose(-2, -1)
            return attn.softmax(dim=-1) @ v
        # Training in fp32: SDPA keeps no attention matrix for backward.
        # Its default scale is 1 / sqrt(head_dim).
        return F.scaled_dot_product_attention(q, k, v)


class WindowAttention(nn.Module):
    """Split a (B, H, W, C) map into windows, attend, and merge back.

    Args:
        embed_dims (int): Number of channels.
        num_heads (int): Number of heads.
        window_size (int): Side of the square windows.
        qkv_bias (bool): Bias of the qkv projection. Defaults to True.
        pad_small_map (bool): If True, a map smaller than the window is
            zero-padded up to the window, as in the original DaViT. If False,
            the window shrinks to the map instead (no padded tokens).
            Defaults to True.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 window_size: int,
                 qkv_bias: bool = True,
                 pad_small_map: bool = True) -> None:
        super().__init__()
        self.window_size = window_size
        self.pad_small_map = pad_small_map
        self.w_msa = WindowMSA(embed_dims, num_heads, qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        wh = ww = self.window_size
        if not self.pad_small_map:
            wh, ww = _sym_min(wh, H), _sym_min(ww, W)
        # Pad right/bottom after the norm and attend over the zeros without a
        # mask: what the original model (and mmpretrain) does. Graphs of
        # dynamic shapes pad (possibly by 0) whatever the size: see
        # fast_paths.is_symbolic (static graphs skip a pad by 0: a copy).
        # (ceil(H / wh) * wh - H: floor division only, which keeps the
        # exporter's symbolic sizes simple.)
        nh, nw = (H + wh - 1) // wh, (W + ww - 1) // ww
        pad_b, pad_r = nh * wh - H, nw * ww - W
        padded = fast_paths.is_symbolic(H, W) or bool(pad_b or pad_r)
        if padded:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        windows = _reshape(
            x.view(B, nh, wh, nw, ww, C).transpose(2, 3),
            (B * nh * nw, wh * ww, C))
        out = fast_paths.window_msa_chunked(self.w_msa, windows, wh * ww)
        if out is None:
            out = self.w_msa(windows)
        out = out.view(B, nh, nw, wh, ww, C).transpose(2, 3)
        out = _reshape(out, (B, nh * wh, nw * ww, C))
        if padded:
            out = out[:, :H, :W]
        return out


class ChannelAttention(nn.Module):
    """Channel group attention: each head attends over its channels.

    Per head, ``softmax((scale * k)^T v)`` (head_dim x head_dim) mixes the
    channels of ``q``; ``scale = head_dim ** -0.5``.

    ``v2=True`` is Florence-2's variant (timm's ``ChannelAttentionV2``):
    ``softmax(q^T k / sqrt(N))`` mixes the channels of ``v``, N being the
    number of tokens of the map. Same parameters, same state dict.

    Args:
        embed_dims (int): Number of channels.
        num_heads (int): Number of channel groups.
        qkv_bias (bool): Bias of the qkv projection. Defaults to True.
        v2 (bool): Florence-2's variant (see above). Defaults to False.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 qkv_bias: bool = True,
                 v2: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.v2 = v2
        self.scale = (embed_dims // num_heads)**-0.5
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, H, W, C) -> same shape."""
        out = fast_paths.channel_attn_t(self, x)
        if out is not None:
            return out
        B, H, W, C = x.shape
        N, heads = H * W, self.num_heads
        # fast_paths.linear(layer, x) is layer(x) (fp32 CPU: oneDNN GEMMs).
        qkv = fast_paths.linear(self.qkv, x.reshape(B, N, C))
        qkv = qkv.view(B, N, 3, heads, C // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d)
        if self.v2:
            # The scale follows the token count: the (d x d) logits are sums
            # over N tokens.
            attn = ((q * N**-0.5).transpose(-1, -2) @ k).softmax(dim=-1)
            x = attn @ v.transpose(-1, -2)  # v's channels mixed
        else:
            attn = ((k * self.scale).transpose(-1, -2) @ v).softmax(dim=-1)
            x = attn @ q.transpose(-1, -2)  # q's channels mixed
        # x: (B, heads, d, N)
        x = x.permute(0, 3, 1, 2).reshape(B, N, C)
        return fast_paths.linear(self.proj, x).view(B, H, W, C)


class AttentionBlock(nn.Module):
    """One half of a DaViT block around the attention ``attn``::

        x = cpe1(x); x = x + drop_path(attn(norm1(x)))
        x = cpe2(x); x = x + drop_path(ffn(norm2(x)))

    Args:
        attn (nn.Module): Spatial (window) or channel attention.
        embed_dims (int): Number of channels.
        ffn_ratio (float): Hidden width of the FFN over ``embed_dims``.
        drop_path (float): Stochastic depth rate of both residual branches.
    """

    def __init__(self, attn: nn.Module, embed_dims: int, ffn_ratio: float,
                 drop_path: float) -> None:
        super().__init__()
        self.cpe1 = ConvPosEnc(embed_dims)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.attn = attn
        self.cpe2 = ConvPosEnc(embed_dims)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, int(embed_dims * ffn_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        if fast_paths.is_exporting():
            return self._forward_tokens(x)
        x = self.cpe1(x)
        out = None
        if not self.training or self.drop_path == 0:
            # Inference on CPU: x + attn(norm1(x)) in cache-sized pieces.
            out = fast_paths.norm_attn_chunked(self.norm1, self.attn, x)
        if out is None:
            out = x + drop_path(
                self.attn(self.norm1(x)), self.drop_path, self.training)
        x = self.cpe2(out)
        if not self.training or self.drop_path == 0:
            # Inference on CPU: x + ffn(norm2(x)) in cache-sized chunks.
            out = fast_paths.norm_ffn_chunked(self.norm2, self.ffn, x)
            if out is not None:
                return out
        # Training: the same, keeping fewer activations for backward.
        branch = fast_paths.norm_ffn_saving(self.norm2, self.ffn, x)
        if branch is None:
            branch = self.ffn(self.norm2(x))
        return x + drop_path(branch, self.drop_path, self.training)

    def _forward_tokens(self, x: Tensor) -> Tensor:
        """The same math on (B, H * W, C) tokens: the exported graph's form.

        Only reshapes differ from :meth:`forward` (same module calls, same
        values). Deployment runtimes pick their kernels by rank: OpenVINO
        fuses a LayerNorm over the last dim of a 3-D tensor into one MVN
        (over a 4-D map into ReduceMean + RMS) and runs fc1 + GELU of 3-D
        tokens as a 1x1 convolution (faster than its 4-D GEMM).
        """
        B, H, W, C = x.shape
        x = self.cpe1(x).reshape(B, H * W, C)
        branch = self.attn(self.norm1(x).view(B, H, W, C))
        x = x + drop_path(
            branch.reshape(B, H * W, C), self.drop_path, self.training)
        x = self.cpe2(x.view(B, H, W, C)).reshape(B, H * W, C)
        x = x + drop_path(
            self.ffn(self.norm2(x)), self.drop_path, self.training)
        return x.view(B, H, W, C)


class DaViTBlock(nn.Module):
    """A spatial (window) attention block followed by a channel one.

    ``channel_attn_v2`` selects Florence-2's channel attention (see
    :class:`ChannelAttention`). ``with_cp``: gradient checkpointing of each
    half (spatial, channel) when training.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 window_size: int = 7,
                 ffn_ratio: float = 4.,
                 qkv_bias: bool = True,
                 drop_path: float = 0.,
                 pad_small_map: bool = True,
                 channel_attn_v2: bool = False,
                 with_cp: bool = False) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.spatial_block = AttentionBlock(
            WindowAttention(embed_dims, num_heads, window_size, qkv_bias,
                            pad_small_map), embed_dims, ffn_ratio, drop_path)
        self.channel_block = AttentionBlock(
            ChannelAttention(embed_dims, num_heads, qkv_bias, channel_attn_v2),
            embed_dims, ffn_ratio, drop_path)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled():
            # Each half on its own: backward recomputes half a block at a
            # time, which keeps less memory live. Inside the block's forward,
            # so that a wrapper of the block (an FSDP unit) has gathered its
            # parameters for the forward and for the recomputation.
            for half in (self.spatial_block, self.channel_block):
                x = checkpoint.checkpoint(half, x, use_reentrant=False)
            return x
        return self.channel_block(self.spatial_block(x))


class Downsample(nn.Module):
    """LayerNorm, then a stride-2 conv.

    Kernel 2 (DaViT): odd maps are padded right/bottom. An odd kernel ``k``
    (Florence-2 uses 3) pads ``k // 2`` on every side inside the conv. Both
    give ``ceil(H / 2)`` rows.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): 2 or an odd size. Defaults to 2.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: int = 2) -> None:
        super().__init__()
        if kernel_size != 2 and kernel_size % 2 == 0:
            raise ValueError(
                'DaViT: downsample_kernel_size must be 2 (DaViT) or odd (3 '
                f'for Florence-2); got {kernel_size}.')
        self.norm = nn.LayerNorm(in_channels)
        self.projection = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=2,
            padding=kernel_size // 2 if kernel_size % 2 else 0)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out)."""
        x = self.norm(x)
        H, W = x.shape[1:3]
        if self.projection.kernel_size[0] != 2:
            pass  # an odd kernel pads inside the conv
        elif fast_paths.is_symbolic(H, W):
            # A graph of dynamic shapes: one zero row/column whatever the
            # size (see fast_paths.is_symbolic): the 2x2 stride-2 conv never
            # reads it on an even map.
            x = F.pad(x, (0, 0, 0, 1, 0, 1))
        elif H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = self.projection(x.permute(0, 3, 1, 2))
        return x.permute(0, 2, 3, 1).contiguous()


class PatchEmbed(nn.Module):
    """Stem: 7x7 conv with stride ``patch_size``, then LayerNorm.

    Both paddings give ``ceil(H / patch_size)`` rows:

    - mmpretrain's ("same"): the padding the 7x7 kernel needs, the odd pixel
      at the bottom/right (1 top, 2 bottom at 224).
    - the original DaViT's (``official=True``): pad right/bottom to a
      multiple of ``patch_size``, then 3 on every side.

    Args:
        in_channels (int): Image channels.
        embed_dims (int): Output channels.
        patch_size (int): Stride of the stem conv.
        official (bool): Use the original model's padding.
    """
    kernel_size = 7

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int,
                 official: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.official = official
        self.projection = nn.Conv2d(
            in_channels,
            embed_dims,
            kernel_size=self.kernel_size,
            stride=patch_size)
        self.norm = nn.LayerNorm(embed_dims)

    def _padding(self, size: int) -> Tuple[int, int]:
        """(before, after) padding of one spatial dim."""
        s, k = self.patch_size, self.kernel_size
        # Integer ceil and sym_max: also exact on the symbolic sizes of an
        # exported graph (math.ceil / max would freeze the example's size).
        to_multiple = (size + s - 1) // s * s - size  # -size % s
        if self.official:
            # sym_max of a sum >= 0 changes nothing in eager; exported, it
            # keeps torch.export from turning the conv's checks of the maps'
            # sizes (> 1, for its memory format only) into a minimum input
            # size (it demanded H, W >= 33 without it; the default padding
            # below has its sym_max anyway).
            return k // 2, _sym_max(k // 2 + to_multiple, 0)
        total = _sym_max(to_multiple - s + k, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, C_in, H, W) -> (B, ceil(H/p), ceil(W/p), C)."""
        top, bottom = self._padding(x.shape[2])
        left, right = self._padding(x.shape[3])
        # A channels-last input makes the conv write (B, H, W, C) itself:
        # the permute below is then a view (stem 3.4x faster on CPU).
        x = F.pad(
            x.contiguous(memory_format=torch.channels_last),
            (left, right, top, bottom))
        x = self.projection(x).permute(0, 2, 3, 1).contiguous()
        return self.norm(x)


class DaViTStage(nn.Module):
    """``depth`` DaViT blocks, then (all but the last stage) a downsample.

    Args:
        embed_dims (int): Channels of the blocks.
        depth (int): Number of blocks.
        num_heads (int): Heads of both attentions.
        window_size (int): Window side of the spatial attention.
        ffn_ratio (float): FFN hidden width over ``embed_dims``.
        qkv_bias (bool): Bias of the qkv projections.
        drop_paths (Sequence[float]): Stochastic depth rate of each block.
        downsample (bool): Whether the stage ends with a downsample layer.
        pad_small_map (bool): See :class:`WindowAttention`.
        with_cp (bool): Gradient checkpointing of each half block (spatial,
            channel) when training.
        downsample_kernel_size (int): See :class:`Downsample`. Defaults to 2.
        channel_attn_v2 (bool): See :class:`ChannelAttention`. Defaults to
            False.
    """

    def __init__(self,
                 embed_dims: int,
                 depth: int,
                 num_heads: int,
                 window_size: int = 7,
                 ffn_ratio: float = 4.,
                 qkv_bias: bool = True,
                 drop_paths: Sequence[float] = (),
                 downsample: bool = False,
                 pad_small_map: bool = True,
                 with_cp: bool = False,
                 downsample_kernel_size: int = 2,
                 channel_attn_v2: bool = False) -> None:
        super().__init__()
        drop_paths = list(drop_paths) or [0.] * depth
        self.blocks = nn.ModuleList(
            DaViTBlock(embed_dims, num_heads, window_size, ffn_ratio, qkv_bias,
                       drop_paths[i], pad_small_map, channel_attn_v2, with_cp)
            for i in range(depth))
        self.downsample = None
        if downsample:
            self.downsample = Downsample(embed_dims, 2 * embed_dims,
                                         downsample_kernel_size)
        self.out_channels = 2 * embed_dims if downsample else embed_dims

    @property
    def with_cp(self) -> bool:
        """Gradient checkpointing of the blocks (each block does its own)."""
        return any(block.with_cp for block in self.blocks)

    @with_cp.setter
    def with_cp(self, value: bool) -> None:
        for block in self.blocks:
            block.with_cp = value

    def forward(self,
                x: Tensor,
                downsample: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """Run the blocks, then the downsample: (B, H, W, C) in.

        Returns the blocks' output and its downsampled map (None for the last
        stage, or with ``downsample=False`` when the backbone does not need
        it). The stage runs its own downsample so that wrappers of a stage
        (FSDP's ``fully_shard``, activation checkpointing) see every use of its
        parameters inside its ``forward``.
        """
        for block in self.blocks:
            x = block(x)  # with_cp: the block checkpoints its halves
        if downsample and self.downsample is not None:
            return x, self.downsample(x)
        return x, None


@MODELS.register_module()
class DaViT(BaseBackbone):
    """DaViT backbone (`DaViT: Dual Attention Vision Transformers.

    <https://arxiv.org/abs/2204.03645>`_).

    Args:
        arch (str | dict): One of ``tiny``/``t``, ``small``/``s``, ``base``/
            ``b``, ``large``/``l``, ``huge``/``h``, ``giant``/``g``, the
            Florence-2 vision towers ``base-fl`` and ``huge-fl`` (window 12,
            downsample kernel 3, V2 channel attention), or a dict with
            ``embed_dims`` (int), ``depths`` and ``num_heads`` (lists of one
            entry per stage) and optionally ``window_size``,
            ``downsample_kernel_size`` and ``channel_attn_v2``. Defaults to
            ``'t'``.
        patch_size (int): Stride of the 7x7 stem conv. Defaults to 4.
        in_channels (int): Image channels. Defaults to 3.
        window_size (int, optional): Window side of the spatial attention.
            None takes the arch's (12 for the ``-fl`` archs), else 7.
        downsample_kernel_size (int, optional): Kernel of the stride-2
            downsample convs: 2 (DaViT) or odd (3, padding 1: Florence-2).
            None takes the arch's, else 2.
        channel_attn_v2 (bool, optional): Florence-2's channel attention,
            scaled by the token count (see :class:`ChannelAttention`). None
            takes the arch's, else False.
        ffn_ratio (float): FFN hidden width over the channels. Defaults to 4.
        qkv_bias (bool): Bias of the qkv projections. Defaults to True.
        drop_path_rate (float): Stochastic depth rate, rising linearly from 0
            over the blocks. Defaults to 0.1.
        out_after_downsample (bool): Output a stage's map after its downsample
            layer instead of before. Defaults to False.
        pad_small_map (bool): Pad maps smaller than the window up to it (the
            original model's behaviour). False shrinks the window to the map
            instead. Defaults to True. (mmpretrain raises on such maps.)
        norm_cfg (dict): Norm applied to each output, over the channels.
            Defaults to ``dict(type='LN')``.
        stage_cfgs (dict | Sequence[dict]): Per-stage overrides of
            ``window_size``, ``ffn_ratio``, ``qkv_bias``, ``pad_small_map``
            and ``with_cp``: one dict for all stages or one per stage.
        frozen_stages (int): Freeze the stem and stages ``0..frozen_stages``
            (and their output norms); -1 freezes nothing. Defaults to -1.
        norm_eval (bool): Keep BatchNorm layers in eval mode while training.
            Defaults to False.
        out_indices (int | Sequence[int]): Stages to output; negative indices
            count from the end. Defaults to ``(3, )``.
        with_cp (bool): Gradient checkpointing of every block (saves memory,
            same outputs and gradients). Defaults to False.
        official (bool): Forward of the original DaViT instead of
            mmpretrain's: the stem is padded 3 on every side (after padding
            right/bottom to a multiple of ``patch_size``) and (unless
            ``out_type='featmap'``) each output is globally average pooled
            *before* its norm, so the backbone returns normalised ``(B, C)``
            features and the classifier needs no neck.
            The state dict is the same. Defaults to False.
        out_type (str, optional): ``'featmap'``: normalised ``(B, C, H, W)``
            maps; ``'avg_featmap'``: globally average pooled, then
            normalised ``(B, C)`` features. Defaults to ``'avg_featmap'``
            with ``official=True`` and ``'featmap'`` otherwise;
            ``official=True, out_type='featmap'`` gives the original
            model's maps (e.g. a Florence-2 tower's last map, as
            transformers' ``Florence2VisionBackbone`` returns it).
        init_cfg (dict | list[dict], optional): mmengine initialization
            config. Without one, linear weights get a truncated normal
            (std 0.02) and zero bias, as in the original model.

    Returns (forward):
        tuple[Tensor]: One entry per ``out_indices``, in stage order:
        ``(B, C_i, H_i, W_i)`` maps, or ``(B, C_i)`` vectors with
        ``out_type='avg_featmap'`` (the default of ``official=True``).
    """
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], {
                            'embed_dims': 96,
                            'depths': [1, 1, 3, 1],
                            'num_heads': [3, 6, 12, 24]
                        }),
        **dict.fromkeys(['s', 'small'], {
                            'embed_dims': 96,
                            'depths': [1, 1, 9, 1],
                            'num_heads': [3, 6, 12, 24]
                        }),
        **dict.fromkeys(['b', 'base'], {
                            'embed_dims': 128,
                            'depths': [1, 1, 9, 1],
                            'num_heads': [4, 8, 16, 32]
                        }),
        **dict.fromkeys(
            ['l', 'large'], {
                'embed_dims': 192,
                'depths': [1, 1, 9, 1],
                'num_heads': [6, 12, 24, 48]
            }),
        **dict.fromkeys(
            ['h', 'huge'], {
                'embed_dims': 256,
                'depths': [1, 1, 9, 1],
                'num_heads': [8, 16, 32, 64]
            }),
        **dict.fromkeys(
            ['g', 'giant'], {
                'embed_dims': 384,
                'depths': [1, 1, 12, 3],
                'num_heads': [12, 24, 48, 96]
            }),
        # Florence-2's vision towers (timm's davit_base_fl / davit_huge_fl):
        # the "huge" one is Florence-2-large's.
        'base-fl': {
            'embed_dims': 128,
            'depths': [1, 1, 9, 1],
            'num_heads': [4, 8, 16, 32],
            'window_size': 12,
            'downsample_kernel_size': 3,
            'channel_attn_v2': True
        },
        'huge-fl': {
            'embed_dims': 256,
            'depths': [1, 1, 9, 1],
            'num_heads': [8, 16, 32, 64],
            'window_size': 12,
            'downsample_kernel_size': 3,
            'channel_attn_v2': True
        },
    }
    # Options an arch may set; the constructor's argument wins when given.
    _arch_options = dict(
        window_size=7, downsample_kernel_size=2, channel_attn_v2=False)
    _stage_keys = ('window_size', 'ffn_ratio', 'qkv_bias', 'pad_small_map',
                   'with_cp')

    def __init__(self,
                 arch: Union[str, Dict] = 't',
                 patch_size: int = 4,
                 in_channels: int = 3,
                 window_size: Optional[int] = None,
                 ffn_ratio: float = 4.,
                 qkv_bias: bool = True,
                 drop_path_rate: float = 0.1,
                 out_after_downsample: bool = False,
                 pad_small_map: bool = True,
                 norm_cfg: Optional[Dict] = dict(type='LN'),
                 stage_cfgs: Union[Dict, Sequence[Dict]] = dict(),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 out_indices: Union[int, Sequence[int]] = (3, ),
                 with_cp: bool = False,
                 official: bool = False,
                 out_type: Optional[str] = None,
                 downsample_kernel_size: Optional[int] = None,
                 channel_attn_v2: Optional[bool] = None,
                 init_cfg: Optional[Union[Dict, List[Dict]]] = None) -> None:
        super().__init__(init_cfg)
        self.arch_settings = self._parse_arch(arch)
        given = dict(
            window_size=window_size,
            downsample_kernel_size=downsample_kernel_size,
            channel_attn_v2=channel_attn_v2)
        for key, default in self._arch_options.items():
            if given[key] is None:
                given[key] = self.arch_settings.get(key, default)
        window_size = given['window_size']
        self.downsample_kernel_size = given['downsample_kernel_size']
        self.channel_attn_v2 = bool(given['channel_attn_v2'])
        self.embed_dims = self.arch_settings['embed_dims']
        self.depths = list(self.arch_settings['depths'])
        self.num_heads = list(self.arch_settings['num_heads'])
        self.num_layers = len(self.depths)
        self.in_channels = in_channels
        self.out_indices = self._parse_out_indices(out_indices)
        if not -1 <= frozen_stages < self.num_layers:
            raise ValueError(
                f'DaViT: frozen_stages must be in [-1, {self.num_layers - 1}]'
                f' (-1 freezes nothing); got {frozen_stages}.')
        self.frozen_stages = frozen_stages
        if not 0 <= drop_path_rate < 1:  # 1 drops every block: NaN
            raise ValueError('DaViT: drop_path_rate must be in [0, 1); got '
                             f'{drop_path_rate}.')
        self.norm_eval = norm_eval
        self.out_after_downsample = out_after_downsample
        self.official = official
        if out_type is None:
            out_type = 'avg_featmap' if official else 'featmap'
        if out_type not in ('featmap', 'avg_featmap'):
            raise ValueError(
                "DaViT: out_type must be 'featmap' ((B, C, H, W) maps) or "
                f"'avg_featmap' (pooled (B, C) features); got {out_type!r}.")
        self.out_type = out_type
        stage_cfgs = self._parse_stage_cfgs(stage_cfgs)

        self.patch_embed = PatchEmbed(in_channels, self.embed_dims, patch_size,
                                      official)

        # Stochastic depth rises linearly over all blocks.
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        self.stages = nn.ModuleList()
        channels = self.embed_dims
        self.num_features = []
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            cfg = dict(
                window_size=window_size,
                ffn_ratio=ffn_ratio,
                qkv_bias=qkv_bias,
                pad_small_map=pad_small_map,
                with_cp=with_cp)
            cfg.update(stage_cfgs[i])
            if not isinstance(cfg['window_size'], int) or \
                    cfg['window_size'] < 1:
                raise ValueError('DaViT: window_size must be an integer >= 1'
                                 f' (stage {i}); got {cfg["window_size"]!r}.')
            stage = DaViTStage(
                channels,
                depth,
                heads,
                drop_paths=dpr[:depth],
                downsample=i < self.num_layers - 1,
                downsample_kernel_size=self.downsample_kernel_size,
                channel_attn_v2=self.channel_attn_v2,
                **cfg)
            dpr = dpr[depth:]
            self.stages.append(stage)
            self.num_features.append(
                stage.out_channels if out_after_downsample else channels)
            channels = stage.out_channels

        for i in self.out_indices:
            norm = nn.Identity() if norm_cfg is None else build_norm_layer(
                norm_cfg, self.num_features[i])[1]
            if out_type == 'avg_featmap' and not isinstance(
                    norm, (nn.LayerNorm, nn.Identity)):
                raise ValueError(
                    'DaViT: pooled outputs (official=True, out_type='
                    "'avg_featmap') are normalised (B, C) features and need "
                    f'a LayerNorm norm_cfg; got {norm_cfg}.')
            self.add_module(f'norm{i}', norm)
        self._freeze_stages()

    # ------------------------------------------------------------ validation
    def _parse_arch(self, arch: Union[str, Dict]) -> Dict:
        if isinstance(arch, str):
            if arch.lower() not in self.arch_zoo:
                raise ValueError(
                    f'DaViT: unknown arch {arch!r}; choose one of '
                    f'{sorted(self.arch_zoo)} or pass a dict with '
                    '"embed_dims", "depths" and "num_heads".')
            return deepcopy(self.arch_zoo[arch.lower()])
        if not isinstance(arch, dict):
            raise TypeError('DaViT: arch must be a name or a dict; got '
                            f'{type(arch).__name__}.')
        missing = {'embed_dims', 'depths', 'num_heads'} - set(arch)
        if missing:
            raise ValueError(f'DaViT: custom arch is missing keys '
                             f'{sorted(missing)}; it needs "embed_dims" '
                             '(int), "depths" and "num_heads" (lists).')
        depths, heads = list(arch['depths']), list(arch['num_heads'])
        if len(depths) != len(heads) or not depths:
            raise ValueError(
                'DaViT: custom arch "depths" and "num_heads" must be '
                f'non-empty lists of equal length; got {len(depths)} depths '
                f'and {len(heads)} num_heads.')
        for i, h in enumerate(heads):
            dims = arch['embed_dims'] * 2**i
            if h <= 0 or dims % h:
                raise ValueError(
                    f'DaViT: stage {i} has {dims} channels, not divisible by '
                    f'its {h} heads; choose num_heads[{i}] dividing {dims}.')
        return dict(arch)

    def _parse_out_indices(self, out_indices) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        n = self.num_layers
        parsed = set()
        for i in out_indices:
            if not -n <= i < n:
                raise ValueError(
                    f'DaViT: out_indices entry {i} is out of range for '
                    f'{n} stages; use 0..{n - 1} or -{n}..-1.')
            parsed.add(i % n)
        return tuple(sorted(parsed))

    def _parse_stage_cfgs(self, stage_cfgs) -> List[Dict]:
        if isinstance(stage_cfgs, dict):
            stage_cfgs = [stage_cfgs] * self.num_layers
        stage_cfgs = list(stage_cfgs)
        if len(stage_cfgs) != self.num_layers:
            raise ValueError(
                f'DaViT: stage_cfgs has {len(stage_cfgs)} entries for '
                f'{self.num_layers} stages; give one dict or one per stage.')
        for cfg in stage_cfgs:
            unknown = set(cfg) - set(self._stage_keys)
            if unknown:
                raise ValueError(
                    f'DaViT: stage_cfgs keys {sorted(unknown)} are not '
                    f'supported; allowed: {list(self._stage_keys)}.')
        return [dict(cfg) for cfg in stage_cfgs]

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels or \
                x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(
                'DaViT expects an image batch of shape (N, '
                f'{self.in_channels}, H, W) with N, H, W >= 1; got a tensor '
                f'of shape {tuple(x.shape)}.')

    # ---------------------------------------------------------------- train
    def init_weights(self) -> None:
        if self.init_cfg is not None:
            super().init_weights()
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> 'DaViT':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen = [self.patch_embed
                  ] + [self.stages[i]
                       for i in range(self.frozen_stages + 1)] + [
                           getattr(self, f'norm{i}')
                           for i in self.out_indices if i <= self.frozen_stages
                       ]
        for m in frozen:
            m.eval()
            for param in m.parameters():
                param.requires_grad = False

    # -------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self._check_input(x)
        x = self.patch_embed(x)
        outs = []
        last = self.out_indices[-1]
        for i, stage in enumerate(self.stages[:last + 1]):
            out, down = stage(x, self.out_after_downsample or i < last)
            if self.out_after_downsample and down is not None:
                out = down
            if i in self.out_indices:
                outs.append(self._output(i, out))
            x = out if down is None else down
        return tuple(outs)

    def _output(self, i: int, x: Tensor) -> Tensor:
        norm = getattr(self, f'norm{i}')
        if self.out_type == 'avg_featmap':
            # The original model pools first, then normalises.
            return norm(x.mean(dim=(1, 2)))
        if isinstance(norm, nn.LayerNorm):
            # (B, H, W, C) -> contiguous (B, C, H, W): downstream code
            # (.view, necks) expects mmpretrain's layout; one copy of an
            # output map.
            return norm(x).permute(0, 3, 1, 2).contiguous()
        # Other norms (BN, GN, ...) take NCHW.
        return norm(x.permute(0, 3, 1, 2)).contiguous()

    # ------------------------------------------------------------ fine-tune
    def get_layer_depth(self,
                        param_name: str,
                        prefix: str = '') -> Tuple[int, int]:
        """Layer depth of a parameter, for layer-wise lr decay (mmpretrain's
        ``LearningRateDecayOptimWrapperConstructor``).

        Depth 0 is the stem; each DaViT block (spatial + channel) is one
        layer, in order; a stage's downsample shares the depth of the
        stage's last block; the output norms and everything outside the
        backbone (neck, head) are the last layer.

        Args:
            param_name (str): Name of the parameter, e.g.
                ``'backbone.stages.2.blocks.1.spatial_block.norm1.weight'``.
            prefix (str): Prefix of the backbone's parameters in
                ``param_name``, e.g. ``'backbone.'``. Defaults to ``''``.

        Returns:
            tuple[int, int]: The parameter's depth and the number of depths
            (``sum(depths) + 2``).
        """
        num_layers = sum(self.depths) + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers  # neck, head
        parts = param_name[len(prefix):].split('.')
        if parts[0] == 'patch_embed':
            return 0, num_layers
        if parts[0] == 'stages' and len(parts) > 2:
            stage = int(parts[1])
            before = sum(self.depths[:stage])
            if parts[2] == 'blocks':
                return before + int(parts[3]) + 1, num_layers
            return before + self.depths[stage], num_layers  # downsample
        return num_layers - 1, num_layers  # output norms

    def _load_from_state_dict(self, state_dict: Dict, prefix: str, *args,
                              **kwargs) -> None:
        # Weights of another arch are refused here, whatever loads them:
        # mmengine's loaders (get_model, init_cfg, load_from) would skip
        # them with a warning and leave a randomly initialised backbone.
        own = {
            prefix + k: tuple(v.shape)
            for k, v in self.state_dict().items()
        }
        theirs = {
            k: tuple(v.shape) if hasattr(v, 'shape') else None
            for k, v in state_dict.items() if k.startswith(prefix)
        }
        if any(k in theirs and _is_structural(k[len(prefix):]) for k in own):
            problems = arch_problems(own, theirs, prefix)
            if problems:
                name = f'this {type(self).__name__}' + (f' ({prefix[:-1]})'
                                                        if prefix else '')
                raise CheckpointMismatchError(
                    arch_refusal('the weights being loaded do not fit', name,
                                 problems))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ------------------------------------------------------------ arch check
# The backbone's own output norms (``norm<i>``, one per out_indices entry) are
# not part of the arch: a model with more outputs than a checkpoint has new
# ones.
_OUTPUT_NORM = re.compile(r'norm\d+\.')


def _is_structural(rest: str) -> bool:
    return not _OUTPUT_NORM.match(rest)


def _listing(items: List[str], limit: int = 3) -> str:
    shown = ', '.join(items[:limit])
    return shown + (f', ... ({len(items) - limit} more)'
                    if len(items) > limit else '')


def arch_problems(own: Dict[str, Optional[Tuple[int, ...]]],
                  theirs: Dict[str, Optional[Tuple[int, ...]]],
                  prefix: str) -> List[str]:
    """How the backbone keys under ``prefix`` of ``theirs`` (name -> shape) are
    another arch than ``own``'s (tensors of another shape, missing, extra);
    empty if they are the same arch.

    A pure check, no I/O.
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
                        f'{_listing(shapes)}')
    if missing:
        problems.append(f'{len(missing)} backbone tensor(s) missing from the '
                        f'checkpoint: {_listing(missing)}')
    if extra:
        problems.append(f'{len(extra)} backbone tensor(s) the model does not '
                        f'have: {_listing(extra)}')
    return problems


def arch_refusal(subject: str, model_name: str, problems: List[str]) -> str:
    """The message refusing weights of another arch."""
    return (f'{subject} the backbone of {model_name}: '
            f'it was trained with another arch ({"; ".join(problems)}). '
            f'Fine-tuning may change the head (num_classes), not the '
            f'backbone: use weights of the same arch (e.g. a '
            f'davit-tiny checkpoint for arch="tiny"), or set '
            f'model.backbone.arch to the checkpoint\'s arch.')
