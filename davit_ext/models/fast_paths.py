"""CPU fast paths of our DaViT, and the one condition that gates them all.

:mod:`davit_ext.models.davit` states the model's math with module calls. Four
places may instead take a fast path that computes the same values with fewer
passes over memory:

=============================  ==============================================
fast path                      runs when (besides :func:`plain`)
=============================  ==============================================
:func:`cpe_folded`             no autocast, input dtype == conv weight dtype
:class:`NormFFNFunction`       autograd records (training); saves memory
:func:`norm_ffn_chunked`       CPU, no autograd, no autocast; cache-sized rows
:func:`window_msa_chunked`     CPU, no autograd, no autocast; window groups
:func:`channel_attn_t`         CPU, no autograd, no autocast; transposed
=============================  ==============================================

:func:`plain` is true only where calling the modules would compute exactly
what the fast path computes: every module involved (and its submodules) is of
an exact, known class (``type(m) is nn.Linear``, not a subclass, not a LoRA or
quantized wrapper), has no forward/backward hooks or pre-hooks, no
parametrization, no global module hooks are registered, and nothing traces
or compiles the model (tracers and compilers see the plain module calls).
Under autocast only :class:`NormFFNFunction` runs (its linears run under the
caller's autocast, as ``nn.Linear`` would; the residual stream keeps the
dtype the module calls give it); the others decline and the module calls
run.

Each fast path is gated by an equivalence test in ``tests/test_contract.py``
(outputs and, for the autograd Function, gradients equal the module calls,
in fp32 and under bf16 autocast).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules.module as _module
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

try:
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling

# Layers whose forward we know exactly. Our own classes (defined in
# davit_ext.models.davit) are accepted by module name, exact class only.
_TORCH_LAYERS = (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.GELU, nn.Sequential)
_OWN_MODULE = 'davit_ext.models.davit'
_GLOBAL_HOOKS = ('_global_forward_hooks', '_global_forward_pre_hooks',
                 '_global_backward_hooks', '_global_backward_pre_hooks')
_MODULE_HOOKS = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks',
                 '_backward_pre_hooks')


def is_capturing() -> bool:
    """True while a tracer, compiler or exporter records the model."""
    is_exporting = getattr(torch.compiler, 'is_exporting', None)
    return (torch.jit.is_tracing() or torch.jit.is_scripting()
            or _is_compiling() or bool(is_exporting and is_exporting()))


def plain(*modules: nn.Module) -> bool:
    """Whether a fast path may stand in for calling ``modules``.

    True only if nothing could observe or change what their module calls do:
    see the module docstring.
    """
    if is_capturing():
        return False
    if any(getattr(_module, name, None) for name in _GLOBAL_HOOKS):
        return False
    for top in modules:
        for m in top.modules():
            cls = type(m)
            if cls not in _TORCH_LAYERS and cls.__module__ != _OWN_MODULE:
                return False
            if any(getattr(m, name, None) for name in _MODULE_HOOKS):
                return False
            if parametrize.is_parametrized(m):
                return False
    return True


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        if device_type == 'cpu':
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, weight)`` computes in here."""
    if _autocast_on(x.device.type):
        return torch.get_autocast_dtype(x.device.type) if hasattr(
            torch, 'get_autocast_dtype') else torch.get_autocast_cpu_dtype()
    return torch.promote_types(x.dtype, weight.dtype)


def _linear_into(x: Tensor, layer: nn.Linear, out: Tensor) -> Tensor:
    """``layer(x)`` (2-D ``x``, same dtype as the layer), written into ``out``:

    the addmm (or mm) that ``F.linear`` runs, with an ``out=`` argument.
    """
    if layer.bias is None:
        return torch.mm(x, layer.weight.t(), out=out)
    return torch.addmm(layer.bias, x, layer.weight.t(), out=out)


def chunk_rows(x: Tensor) -> Optional[int]:
    """Rows (tokens) per chunk for the CPU inference paths, or None.

    A chunk small enough for its activations to stay in cache from one op to
    the next, large enough (at least 8C rows) for the GEMMs to stay efficient.
    Only on CPU, without autograd (inference) and outside autocast: under bf16
    autocast the chunks measured 1.6-2x slower than one pass on an AVX512-BF16
    CPU (per-chunk casts and mixed-dtype adds).
    """
    if x.device.type != 'cpu' or torch.is_grad_enabled() or \
            _autocast_on(x.device.type):
        return None
    return max(1024, 8 * x.shape[-1])


# -------------------------------------------------------------------- CPE
def cpe_folded(conv: nn.Conv2d, x: Tensor) -> Optional[Tensor]:
    """``x + conv(x)`` as one depthwise conv with 1 added to the centre tap.

    Runs when: :func:`plain` ``(conv)``, no autocast, ``x`` in the conv's
    dtype (then ``1 + w`` is exact enough: fp32 rounding only). Under
    autocast the sum ``1 + w`` would be rounded to half precision and the
    residual stream would become half: there the module call runs
    (``x + conv(x)``, x kept in its dtype). Returns None where it does not
    run. ``x`` is the (B, H, W, C) map; the result has the same layout.
    Gate: ``test_cpe_fold_equals_module_call``.
    """
    if (not plain(conv) or _autocast_on(x.device.type)
            or x.dtype != conv.weight.dtype):
        return None
    c = conv.kernel_size[0] // 2
    weight = conv.weight.clone()
    weight[:, :, c, c] += 1
    # The NHWC tensor is a channels-last NCHW tensor: no copy either way.
    out = F.conv2d(
        x.permute(0, 3, 1, 2),
        weight,
        conv.bias,
        padding=conv.padding,
        groups=conv.groups)
    return out.permute(0, 2, 3, 1)


# -------------------------------------------------------------------- FFN
class NormFFNFunction(torch.autograd.Function):
    """``fc2(gelu(fc1(layer_norm(x))))`` keeping only ``x`` and the fc1 output
    ``h`` for backward; the norm's output and ``gelu(h)`` are recomputed there.

    Plain autograd keeps ``x`` (norm), ``norm(x)`` (fc1), ``h`` (GELU) and
    ``gelu(h)`` (fc2): 10C values per token. This keeps 5C. Gradients are
    those of the plain ops, also under autocast (the linears then run in the
    autocast dtype, as ``F.linear`` would, and so do their gradients).
    Backward is not differentiable again: double backward raises.
    Gate: ``test_norm_ffn_function_equals_plain_ops`` and
    ``test_fast_paths_equal_module_calls`` (fp32 and bf16 autocast).
    """

    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                eps: float, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                b2: Optional[Tensor]) -> Tensor:
        C = x.shape[-1]
        y, mean, rstd = torch.native_layer_norm(x, (C, ), norm_weight,
                                                norm_bias, eps)
        # Under autocast this casts y, w1 (and later w2) like nn.Linear.
        h = F.linear(y, w1, b1)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, w1, h, w2)
        ctx.eps = eps
        ctx.has_bias = (b1 is not None, b2 is not None)
        return F.linear(F.gelu(h), w2, b2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, mean, rstd, norm_weight, norm_bias, w1, h, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        C = x.shape[-1]
        # The linears ran in h's dtype (the autocast dtype, or fp32).
        dt = h.dtype
        grad = grad.to(dt)
        grad2d = grad.reshape(-1, grad.shape[-1])
        grads = [None] * 8
        if need[6]:
            act = F.gelu(h).reshape(-1, h.shape[-1])
            grads[6] = (grad2d.t() @ act).to(w2.dtype)
        if need[7] and ctx.has_bias[1]:
            grads[7] = grad2d.sum(0).to(w2.dtype)
        if not any(need[:6]):
            return tuple(grads)
        grad_h = torch.ops.aten.gelu_backward(grad @ w2.to(dt), h)
        grad_h2d = grad_h.reshape(-1, grad_h.shape[-1])
        if need[4]:
            y = F.layer_norm(x, (C, ), norm_weight, norm_bias, ctx.eps)
            grads[4] = (grad_h2d.t() @ y.reshape(-1, C).to(dt)).to(w1.dtype)
        if need[5] and ctx.has_bias[0]:
            grads[5] = grad_h2d.sum(0).to(w1.dtype)
        if any(need[:3]):
            grad_y = (grad_h @ w1.to(dt)).to(x.dtype)
            grads[0], grads[1], grads[2] = \
                torch.ops.aten.native_layer_norm_backward(
                    grad_y, x, (C, ), mean, rstd, norm_weight, norm_bias,
                    list(need[:3]))
        return tuple(grads)


def _ffn_parts(norm: nn.LayerNorm, ffn: nn.Module):
    (fc1, act), fc2 = ffn.layers
    return fc1, act, fc2


def norm_ffn_saving(norm: nn.LayerNorm, ffn: nn.Module,
                    x: Tensor) -> Optional[Tensor]:
    """``ffn(norm(x))`` through :class:`NormFFNFunction` while autograd
    records.

    Runs when: :func:`plain` ``(norm, ffn)``, grad enabled, an exact-GELU
    ``nn.GELU`` and an elementwise-affine norm. Returns None otherwise.
    """
    if not torch.is_grad_enabled() or not plain(norm, ffn):
        return None
    fc1, act, fc2 = _ffn_parts(norm, ffn)
    if act.approximate != 'none' or norm.weight is None or \
            norm.bias is None or len(norm.normalized_shape) != 1:
        return None
    return NormFFNFunction.apply(x, norm.weight, norm.bias, norm.eps,
                                 fc1.weight, fc1.bias, fc2.weight, fc2.bias)


def norm_ffn_chunked(norm: nn.LayerNorm, ffn: nn.Module,
                     x: Tensor) -> Optional[Tensor]:
    """``x + ffn(norm(x))`` at inference, ``chunk_rows`` tokens at a time.

    Each chunk's 4C-wide hidden activations are still in cache when GELU and
    fc2 read them (measured 2.2x faster at 96 channels, 1.18x on the whole
    model, fp32), and the residual is added while the chunk is in cache.
    Runs when: :func:`plain` ``(norm, ffn)``, CPU, no autograd, no autocast
    and ``x`` in the weights' dtype (nothing cast). Returns None otherwise.
    Same ops per row as the module calls.
    Gate: ``test_fast_paths_equal_module_calls``.
    """
    step = chunk_rows(x)
    if step is None or not plain(norm, ffn):
        return None
    fc1, act, fc2 = _ffn_parts(norm, ffn)
    C = x.shape[-1]
    rows = x.reshape(-1, C)
    if not x.dtype == fc1.weight.dtype == fc2.weight.dtype:
        return None
    out = torch.empty_like(rows)
    for start in range(0, rows.shape[0], step):
        t, o = rows[start:start + step], out[start:start + step]
        y = F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias,
                         norm.eps)
        h = F.linear(y, fc1.weight, fc1.bias)
        h = torch.ops.aten.gelu_(h, approximate=act.approximate)
        # The residual is added while the chunk's rows are in cache.
        _linear_into(h, fc2, o).add_(t)
    return out.view(x.shape)


# ------------------------------------------------------ window attention
def window_msa_chunked(w_msa: nn.Module, windows: Tensor,
                       window_tokens: int) -> Optional[Tensor]:
    """``w_msa(windows)`` at inference, a group of windows at a time.

    qkv, the attention and its output stay in cache between the ops (measured
    1.03x on the whole model, fp32). Runs when: :func:`plain` ``(w_msa)``, CPU,
    no autograd, no autocast, windows in the weights' dtype, more than one
    chunk. Returns None otherwise. Gate:
    ``test_fast_paths_equal_module_calls``.
    """
    step = chunk_rows(windows)
    if step is None:
        return None
    step = max(1, step // window_tokens)
    if windows.shape[0] <= step or not plain(w_msa):
        return None
    qkv_l, proj = w_msa.qkv, w_msa.proj
    B, N, C = windows.shape
    heads = w_msa.num_heads
    if not windows.dtype == qkv_l.weight.dtype == proj.weight.dtype:
        return None
    out = torch.empty_like(windows)
    for start in range(0, B, step):
        t, o = windows[start:start + step], out[start:start + step]
        b = t.shape[0]
        qkv = F.linear(t, qkv_l.weight, qkv_l.bias)
        q, k, v = qkv.view(b, N, 3, heads, C // heads).permute(2, 0, 3, 1,
                                                               4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        _linear_into(a.transpose(1, 2).reshape(b * N, C), proj, o.view(-1, C))
    return out


# ----------------------------------------------------- channel attention
def channel_attn_t(attn: nn.Module, x: Tensor) -> Optional[Tensor]:
    """Channel attention computed transposed, (B, 3C, N), at inference.

    The qkv weight's rows are taken in (head, q/k/v, channel) order: then
    every head's q, k and v are plain (d, N) matrices one batch stride apart
    and the bmm read them in place (token-major q/k/v are copied by each
    matmul; measured 1.3-1.5x faster on this module, fp32). The weights are
    broadcast over the batch as stride-0 views, which fp32 bmm reads in
    place (no per-sample copies). Runs when: :func:`plain` ``(attn.qkv,
    attn.proj)``, CPU, no autograd, no autocast (all in the weights' dtype).
    Returns None otherwise.
    Gate: ``test_fast_paths_equal_module_calls``.
    """
    if x.device.type != 'cpu' or torch.is_grad_enabled() or \
            not plain(attn.qkv, attn.proj):
        return None
    qkv_l, proj = attn.qkv, attn.proj
    dt = _compute_dtype(x, qkv_l.weight)
    if not dt == x.dtype == qkv_l.weight.dtype == proj.weight.dtype:
        # Under autocast, bmm of a broadcast (stride-0) bf16 weight is
        # materialised per sample inside aten: there the module calls run.
        return None
    B, H, W, C = x.shape
    N, heads = H * W, attn.num_heads
    d = C // heads
    weight = qkv_l.weight.view(3, heads, d, C).transpose(0, 1)
    qkv = torch.bmm(
        weight.reshape(1, 3 * C, C).expand(B, -1, -1),
        x.reshape(B, N, C).transpose(1, 2))
    if qkv_l.bias is not None:
        qkv = qkv.add_(
            qkv_l.bias.view(3, heads, d, 1).transpose(0, 1).reshape(3 * C, 1))
    q, k, v = qkv.view(B * heads, 3, d, N).unbind(1)
    if attn.v2:  # Florence-2's: softmax(q^T k / sqrt(N)) mixes v
        attn_w = torch.bmm(q * N**-0.5, k.transpose(1, 2)).softmax(dim=-1)
        out = torch.bmm(attn_w, v).view(B, C, N)
    else:
        # k scaled first, as the module path (and mmpretrain) does.
        attn_w = torch.bmm(k * attn.scale, v.transpose(1, 2)).softmax(dim=-1)
        out = torch.bmm(attn_w, q).view(B, C, N)  # channels of q mixed
    # proj as out^T @ W^T: a transposed operand, no copy.
    out = torch.bmm(out.transpose(1, 2), proj.weight.t().expand(B, -1, -1))
    if proj.bias is not None:
        out = out.add_(proj.bias)
    return out.view(B, H, W, C)
