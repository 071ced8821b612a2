"""CPU fast paths of our DaViT, and the one condition that gates them all.

:mod:`davit_ext.models.davit` states the model's math with module calls. Five
places may instead take a fast path that computes the same values with fewer
passes over memory:

=============================  ==============================================
fast path                      runs when (besides :func:`plain`)
=============================  ==============================================
:func:`cpe_folded`             no autocast, input dtype == conv weight dtype
:class:`NormFFNFunction`       autograd records (training); saves memory
:func:`norm_ffn_chunked`       CPU inference; cache-sized groups of rows
:func:`window_msa_chunked`     CPU inference; cache-sized groups of windows
:func:`channel_attn_t`         CPU inference; one image at a time, transposed
=============================  ==============================================

:func:`plain` is true only where calling the modules would compute exactly
what the fast path computes: every module involved (and its submodules) is of
an exact, known class (``type(m) is nn.Linear``, not a subclass, not a LoRA or
quantized wrapper), has no forward/backward hooks or pre-hooks, no
parametrization, no global module hooks are registered, and nothing traces
or compiles the model (tracers and compilers see the plain module calls).

Under CPU autocast (bf16, fp16) the inference paths cast what ``nn.Linear``
casts (input, weight, bias to the autocast dtype; :func:`_linear_dtype`) and
keep every other op in the dtype the module calls give it; the residual
stream keeps its dtype. :class:`NormFFNFunction`'s linears run under the
caller's autocast, as ``nn.Linear`` would. :func:`cpe_folded` declines
(``1 + w`` would be rounded to half precision).

Each fast path is gated by an equivalence test in ``tests/test_contract.py``
(outputs and, for the autograd Function, gradients equal the module calls,
in fp32 and under bf16 autocast; under autocast, where two bf16 sums in
another order differ by a few bf16 steps, the outputs must also be as close
to the fp32 forward as the module calls' are).
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


def chunk_rows(x: Tensor) -> Optional[int]:
    """Rows (tokens) per chunk for the CPU inference paths, or None.

    A chunk small enough for its activations to stay in cache from one op to
    the next, large enough (at least 8C rows) for the GEMMs to stay efficient.
    Only on CPU and without autograd (inference); under CPU autocast too
    (there the chunk's linears run in the autocast dtype, see
    :func:`_linear_dtype`).
    """
    if x.device.type != 'cpu' or torch.is_grad_enabled():
        return None
    return max(1024, 8 * x.shape[-1])


def _linear_dtype(x: Tensor, *layers: nn.Linear) -> Optional[torch.dtype]:
    """The dtype the module calls ``layer(x)`` would compute in, where a
    chunked path knows how to reproduce it; None otherwise.

    Without autocast: ``x``'s dtype, if every weight has it (nothing cast).
    Under CPU autocast (bf16 or fp16) with fp32 weights and ``x`` in fp32 or in
    the autocast dtype (the residual stream of DaViT under autocast, as in
    mmpretrain's and timm's: the stem conv hands out half precision): the
    autocast dtype, to which ``nn.Linear`` casts its input, weight and bias.
    The chunked paths then cast the same tensors themselves.
    """
    weights = {layer.weight.dtype for layer in layers}
    if not _autocast_on(x.device.type):
        return x.dtype if weights == {x.dtype} else None
    dt = _compute_dtype(x, layers[0].weight)
    if x.device.type != 'cpu' or weights != {torch.float32} or \
            dt not in (torch.bfloat16, torch.float16) or \
            x.dtype not in (torch.float32, dt):
        return None
    return dt


def _params_in(layer: nn.Linear, dtype: torch.dtype):
    """``layer``'s weight and bias in ``dtype`` (as autocast casts them)."""
    bias = layer.bias if layer.bias is None else layer.bias.to(dtype)
    return layer.weight.to(dtype), bias


def _addmm(x: Tensor,
           weight: Tensor,
           bias: Optional[Tensor],
           out: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` of a 2-D ``x`` as the addmm (or mm) it
    runs, with an optional ``out=``."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


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
    fc2 read them, and the residual is added while the chunk is in cache
    (measured on the first stage of DaViT-T, batch 8: fp32 2.2x faster, bf16
    autocast 3.3x). Runs when: :func:`plain` ``(norm, ffn)``, CPU, no autograd,
    and :func:`_linear_dtype` knows the linears' dtype (no autocast and
    everything in one dtype, or CPU autocast over fp32). Under autocast the
    chunk does what the module calls do: the norm in fp32, the linears and GELU
    in the autocast dtype, the residual sum in fp32. Returns None otherwise.
    Gate: ``test_fast_paths_equal_module_calls``.
    """
    step = chunk_rows(x)
    if step is None or not plain(norm, ffn):
        return None
    fc1, act, fc2 = _ffn_parts(norm, ffn)
    dt = _linear_dtype(x, fc1, fc2)
    if dt is None:
        return None
    if dt != fc1.weight.dtype:
        # Half-precision GEMMs like longer chunks; one chunk would only add
        # the casts to what the module calls do.
        step = max(step, 2048)
        if x.numel() <= step * x.shape[-1]:
            return None
    w1, b1 = _params_in(fc1, dt)
    w2, b2 = _params_in(fc2, dt)
    C = x.shape[-1]
    rows = x.reshape(-1, C)
    out = torch.empty_like(rows)
    for start in range(0, rows.shape[0], step):
        t, o = rows[start:start + step], out[start:start + step]
        y = F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias,
                         norm.eps)
        h = _addmm(y.to(dt), w1, b1)
        h = torch.ops.aten.gelu_(h, approximate=act.approximate)
        if dt == x.dtype:
            _addmm(h, w2, b2, out=o).add_(t)
        else:  # an fp32 residual + the branch in the autocast dtype
            torch.add(t, _addmm(h, w2, b2), out=o)
    return out.view(x.shape)


# ------------------------------------------------------ window attention
def window_msa_chunked(w_msa: nn.Module, windows: Tensor,
                       window_tokens: int) -> Optional[Tensor]:
    """``w_msa(windows)`` at inference, a group of windows at a time.

    qkv, the attention and its output stay in cache between the ops (measured
    1.03x on the whole model, fp32). Runs when: :func:`plain` ``(w_msa)``, CPU,
    no autograd, :func:`_linear_dtype` knows the linears' dtype (as in
    :func:`norm_ffn_chunked`), more than one chunk. The attention itself is
    ``w_msa.attend``, as in the module's forward. Returns None otherwise.
    Gate: ``test_fast_paths_equal_module_calls``.
    """
    step = chunk_rows(windows)
    if step is None:
        return None
    step = max(1, step // window_tokens)
    if windows.shape[0] <= step or not plain(w_msa):
        return None
    qkv_l, proj = w_msa.qkv, w_msa.proj
    dt = _linear_dtype(windows, qkv_l, proj)
    if dt is None:
        return None
    w_qkv, b_qkv = _params_in(qkv_l, dt)
    w_proj, b_proj = _params_in(proj, dt)
    B, N, C = windows.shape
    heads = w_msa.num_heads
    out = windows.new_empty(windows.shape, dtype=dt)
    for start in range(0, B, step):
        t, o = windows[start:start + step], out[start:start + step]
        b = t.shape[0]
        qkv = _addmm(t.reshape(b * N, C).to(dt), w_qkv, b_qkv)
        q, k, v = qkv.view(b, N, 3, heads, C // heads).permute(2, 0, 3, 1,
                                                               4).unbind(0)
        a = w_msa.attend(q, k, v)
        _addmm(
            a.transpose(1, 2).reshape(b * N, C),
            w_proj,
            b_proj,
            out=o.view(-1, C))
    return out


# ----------------------------------------------------- channel attention
def channel_attn_t(attn: nn.Module, x: Tensor) -> Optional[Tensor]:
    """Channel attention at inference, one image at a time, transposed.

    Per image, ``qkv^T = W x^T + b`` is one (3C, N) GEMM whose rows are q, k
    and v of each head as plain (d, N) matrices: the attention's bmm read
    them in place, where the token-major q/k/v of the module calls are
    copied by each matmul; and the image's q/k/v stay in cache. The proj
    reads the (C, N) result as a transposed operand. Measured on DaViT-T's
    stages, batch 8: fp32 1.0-1.2x, bf16 autocast 1.2-3.4x faster than the
    module calls. Runs when: :func:`plain` ``(attn.qkv, attn.proj)``, CPU, no
    autograd, :func:`_linear_dtype` knows the linears' dtype (under autocast
    the GEMMs, the scaling and the softmax run in the autocast dtype, as in
    the module calls). Returns None otherwise.
    Gate: ``test_fast_paths_equal_module_calls``.
    """
    if x.device.type != 'cpu' or torch.is_grad_enabled() or \
            not plain(attn.qkv, attn.proj):
        return None
    dt = _linear_dtype(x, attn.qkv, attn.proj)
    if dt is None:
        return None
    w_qkv, b_qkv = _params_in(attn.qkv, dt)
    w_proj, b_proj = _params_in(attn.proj, dt)
    if b_qkv is not None:
        b_qkv = b_qkv[:, None]
    B, H, W, C = x.shape
    N, heads = H * W, attn.num_heads
    d = C // heads
    images = x.reshape(B, N, C)
    out = x.new_empty((B, N, C), dtype=dt)
    for i in range(B):
        image = images[i].to(dt)
        if b_qkv is None:
            qkv = torch.mm(w_qkv, image.t())
        else:
            qkv = torch.addmm(b_qkv, w_qkv, image.t())
        q, k, v = qkv.view(3, heads, d, N).unbind(0)
        if attn.v2:  # Florence-2's: softmax(q^T k / sqrt(N)) mixes v
            logits = torch.bmm(q * N**-0.5, k.transpose(1, 2))
            mixed = torch.bmm(logits.softmax(dim=-1), v)
        else:
            # k scaled first, as the module path (and mmpretrain) does.
            logits = torch.bmm(k * attn.scale, v.transpose(1, 2))
            mixed = torch.bmm(logits.softmax(dim=-1), q)  # q's channels
        _addmm(mixed.view(C, N).t(), w_proj, b_proj, out=out[i])
    return out.view(B, H, W, C)
