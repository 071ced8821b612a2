"""CPU fast paths of our DaViT, and the one condition that gates them all.

:mod:`davit_ext.models.davit` states the model's math with module calls. These
places may instead take a fast path that computes the same values with fewer
passes over memory, or with a faster GEMM:

=============================  ==============================================
fast path                      runs when (besides :func:`plain`)
=============================  ==============================================
:func:`linear`                 fp32 on CPU, no autocast: oneDNN GEMMs
                               (:class:`LinearFunction` while training)
:func:`cpe_folded`             no autocast, input dtype == conv weight dtype
:class:`NormFFNFunction`       autograd records (training); saves memory
:func:`norm_ffn_chunked`       CPU inference (AVX-512); groups of rows
:func:`norm_attn_chunked`      CPU inference (AVX-512); bands of windows,
                               or per image
:func:`window_msa_chunked`     CPU inference (AVX-512); groups of windows
:func:`channel_attn_t`         CPU fp32 inference (AVX-512); per image,
                               transposed
=============================  ==============================================

``DAVIT_EXT_FAST_PATHS_OFF=name,...`` in the environment (or
:func:`turned_off`) switches fast paths off by name
(:data:`FAST_PATH_NAMES`); ``tools/analysis_tools/benchmark.py
--fast-paths-off`` compares them with the module calls in one run. The four
chunked inference paths are off by default on CPUs without AVX-512
(:func:`default_off`); ``DAVIT_EXT_FAST_PATHS_ON=name,...`` (or ``all``)
switches them on there.

Every fp32 GEMM of a fast path on CPU goes through oneDNN
(:data:`ONEDNN_LINEAR`), where PyTorch's own fp32 matmul calls MKL: for the
same fp32 arithmetic oneDNN's ran DaViT-T's linears 2.1-2.3x faster on an
AMD EPYC Zen 5 (MKL does not use AVX-512 there), median 1.2x on a Zen 4
(``tools/analysis_tools/gemm_bench.py``). Half precision already goes
through oneDNN in PyTorch; where the CPU has bf16 instructions the bf16
GEMMs of the fast paths also call oneDNN's linear directly (bias added in
the GEMM, not copied into the output first).

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
import contextlib
import os
from typing import FrozenSet, Iterator, Optional

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

# The fast paths by name, for DAVIT_EXT_FAST_PATHS_OFF and turned_off().
# ``channel_attn_t`` also switches the transposed channel attention inside
# ``norm_attn_chunked`` (which then still chunks window attention).
FAST_PATH_NAMES = ('linear', 'cpe_folded', 'norm_ffn_saving',
                   'norm_ffn_chunked', 'norm_attn_chunked',
                   'window_msa_chunked', 'channel_attn_t')


def _parse_names(names, source: str) -> FrozenSet[str]:
    found = frozenset(n.strip() for n in names if n.strip())
    unknown = found - set(FAST_PATH_NAMES)
    if unknown:
        raise ValueError(f'{source}: unknown fast path(s) {sorted(unknown)}; '
                         f'choose from {", ".join(FAST_PATH_NAMES)}.')
    return found


# The inference paths that chunk a half block so that each piece stays in
# cache. Measured faster than the module calls on AMD EPYC Zen 4 and Zen 5
# (AVX-512), slower on an AVX2-only Zen 3: DaViT-T fp32 inference, batch 8,
# ran 1.18x faster with these four off (benchmark.py --fast-paths-off).
CHUNKED = ('norm_ffn_chunked', 'norm_attn_chunked', 'window_msa_chunked',
           'channel_attn_t')


def cpu_capability() -> str:
    """The vector ISA ATen dispatches to (``AVX512``, ``AVX2``, ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return 'DEFAULT'


def default_off(capability: str) -> FrozenSet[str]:
    """The fast paths off by default on a CPU of this ``capability``.

    The chunked inference paths run only where they were measured faster: with
    AVX-512. Elsewhere (AVX2, and ISAs we have not measured) the module calls
    run, as in the peers.
    """
    return frozenset() if capability.startswith('AVX512') else \
        frozenset(CHUNKED)


def _env_names(var: str) -> FrozenSet[str]:
    names = os.environ.get(var, '').split(',')
    if [n.strip() for n in names] == ['all']:
        return frozenset(FAST_PATH_NAMES)
    return _parse_names(names, var)


# Fast paths switched off: this CPU's default_off() less
# DAVIT_EXT_FAST_PATHS_ON, plus DAVIT_EXT_FAST_PATHS_OFF (names, or ``all``)
# in the environment; turned_off() adds names around some calls. The module
# calls (or, for ``linear``, the layer call) run instead.
OFF = (default_off(cpu_capability()) - _env_names('DAVIT_EXT_FAST_PATHS_ON')
       ) | _env_names('DAVIT_EXT_FAST_PATHS_OFF')


@contextlib.contextmanager
def turned_off(*names: str) -> Iterator[None]:
    """Switch the named fast paths off inside the ``with`` block.

    For A/B measurements on your CPU: see the benchmark tool's options. Not
    thread-safe: it changes a module global.
    """
    global OFF
    saved = OFF
    OFF = saved | _parse_names(names, 'turned_off')
    try:
        yield
    finally:
        OFF = saved


def is_exporting() -> bool:
    """True under ``torch.export`` (and the ONNX exporter built on it).

    The graph it records must hold for every input size: there the model
    computes its padding from the symbolic shape and applies it unconditionally
    (zero amounts where none is needed) instead of behind a Python branch on
    the example's size, which would be frozen into the graph.
    """
    exporting = getattr(torch.compiler, 'is_exporting', None)
    return bool(exporting and exporting())


def is_symbolic(*sizes) -> bool:
    """True under ``torch.export`` with dynamic shapes, where these sizes are
    symbols: the graph must then hold for every size.

    A static export sees plain ints and may branch on them like eager code.
    """
    return is_exporting() and any(isinstance(s, torch.SymInt) for s in sizes)


def is_capturing() -> bool:
    """True while a tracer, compiler or exporter records the model."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting()
            or _is_compiling() or is_exporting())


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


# Rows per piece of the attention paths when their GEMMs run in half
# precision: with 1024-row pieces the first stage's window attention ran
# 1.3x slower than the module calls in a microbenchmark on an AMD EPYC Zen 4
# (bf16 autocast); with 4096 rows, as fast or faster.
HALF_ATTN_ROWS = 4096


def _half(dt: Optional[torch.dtype]) -> bool:
    return dt in (torch.bfloat16, torch.float16)


def _attn_rows(step: int, dt: torch.dtype) -> int:
    return max(step, HALF_ATTN_ROWS) if _half(dt) else step


def _linear_dtype(x: Tensor, *layers: nn.Linear) -> Optional[torch.dtype]:
    """The dtype the module calls ``layer(x)`` would compute in, where a
    chunked path knows how to reproduce it; None otherwise.

    Without autocast: ``x``'s dtype, if every weight has it (nothing cast).
    Under autocast (bf16 or fp16) with fp32 weights and ``x`` in fp32 or in the
    autocast dtype (the residual stream of DaViT under autocast, as in
    mmpretrain's and timm's: the stem conv hands out half precision): the
    autocast dtype, to which ``nn.Linear`` casts its input, weight and bias.
    The chunked paths then cast the same tensors themselves.
    """
    weights = {layer.weight.dtype for layer in layers}
    if not _autocast_on(x.device.type):
        return x.dtype if weights == {x.dtype} else None
    dt = _compute_dtype(x, layers[0].weight)
    if weights != {torch.float32} or \
            dt not in (torch.bfloat16, torch.float16) or \
            x.dtype not in (torch.float32, dt):
        return None
    return dt


def _addmm(x: Tensor,
           weight: Tensor,
           bias: Optional[Tensor],
           out: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` of a 2-D ``x`` as the addmm (or mm) it
    runs, with an optional ``out=``."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _find_onednn_linear():
    if os.environ.get('DAVIT_EXT_ONEDNN', '1') == '0':
        return None  # opted out: the fast paths call addmm (MKL/BLAS)
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        pass
    return None


# oneDNN's fp32 GEMM (the one inductor's CPU code calls). PyTorch's eager
# fp32 matmuls call MKL, which on AMD CPUs does not use their AVX-512 units:
# on an AMD EPYC (Zen 5) the oneDNN GEMMs of DaViT-T's linears ran 1.9-2.3x
# faster in forward and input gradient, 0.9-1.8x in weight gradient
# (tools/analysis_tools/gemm_bench.py; same fp32 arithmetic; half precision
# already goes through oneDNN).
# None where PyTorch has no oneDNN, or with DAVIT_EXT_ONEDNN=0 in the
# environment: then the fast paths call addmm.
ONEDNN_LINEAR = _find_onednn_linear()


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX);
    elsewhere bf16 autocast is emulated, slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# oneDNN's linear also takes bf16 where the CPU has the instructions. There
# it is the GEMM addmm runs, with the bias added in the GEMM instead of
# copied into the output first (10-15% faster on DaViT-T's shapes in a
# microbenchmark on an AMD EPYC Zen 4).
_ONEDNN_DTYPES = {torch.float32}
if ONEDNN_LINEAR is not None and cpu_has_bf16():
    _ONEDNN_DTYPES.add(torch.bfloat16)


def _onednn(*tensors: Tensor) -> bool:
    """Whether :data:`ONEDNN_LINEAR` takes these operands: all on CPU, and all
    fp32, or all contiguous bf16 where oneDNN has bf16 (it copies a transposed
    bf16 operand first: there torch.mm, which does not, runs)."""
    if ONEDNN_LINEAR is None:
        return False
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not dtypes <= _ONEDNN_DTYPES or any(
            t.device.type != 'cpu' for t in tensors):
        return False
    return dtypes == {torch.float32} or all(t.is_contiguous() for t in tensors)


def _linear(x: Tensor,
            weight: Tensor,
            bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` of a 2-D ``x``: through oneDNN
    (:data:`ONEDNN_LINEAR`) where :func:`_onednn` takes the operands, otherwise
    the addmm ``F.linear`` runs.

    ``x`` and ``weight`` may be transposed views.
    """
    if _onednn(x, weight):
        return ONEDNN_LINEAR(x, weight, bias, 'none', [], '')
    return _addmm(x, weight, bias)


def _linear_into(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                 out: Tensor) -> Tensor:
    """:func:`_linear` written into ``out`` (addmm writes there itself)."""
    if _onednn(x, weight):
        return out.copy_(ONEDNN_LINEAR(x, weight, bias, 'none', [], ''))
    return _addmm(x, weight, bias, out=out)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of 2-D tensors (gradients of a linear): fp32 on CPU through
    oneDNN, which reads transposed operands in place."""
    if _onednn(a, b):
        return ONEDNN_LINEAR(a, b.t(), None, 'none', [], '')
    return torch.mm(a, b)


def _weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad^T @ x``, the weight gradient of a linear (a few thousand rows
    at a time: oneDNN is slow on one very long reduction).

    oneDNN's linear copies a transposed input operand first (the weight
    operand it packs anyway): where the layer's output is wider than its
    input (qkv, fc1) it computes ``(x^T @ grad)^T``, copying the narrower
    ``x^T`` instead of ``grad^T``. The same GEMM, fewer bytes copied.
    """
    if grad.shape[1] > x.shape[1] and _onednn(x.t(), grad.t()):
        return ONEDNN_LINEAR(x.t(), grad.t(), None, 'none', [], '').t()
    return _mm(grad.t(), x)


class LinearFunction(torch.autograd.Function):
    """``F.linear`` whose GEMMs (forward, input and weight gradients) go
    through :func:`_linear`: the fp32 CPU training path of the attention
    linears.

    It keeps what ``F.linear``'s autograd keeps (input, weight). The weight
    gradient is summed over chunks of 2048 rows (oneDNN is slow on one very
    long reduction). Not differentiable twice: double backward raises. Gate:
    ``test_linear_function_equals_f_linear``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor,
                bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        out = _linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(x.shape[:-1] + (weight.shape[0], ))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad  # False for a None bias
        grad = grad.reshape(-1, weight.shape[0])
        grad_x = grad_w = grad_b = None
        if need[0]:
            grad_x = _mm(grad, weight).view(x.shape)
        if need[1]:
            rows = x.reshape(-1, x.shape[-1])
            grad_w = torch.zeros_like(weight)
            for i, j in _spans(rows.shape[0], 2048):
                grad_w.add_(_weight_grad(grad[i:j], rows[i:j]))
        if need[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)``; where :func:`plain` ``(layer)``, fp32 on CPU without
    autocast, its GEMMs through oneDNN (:func:`_linear`, and
    :class:`LinearFunction` while autograd records).

    Everywhere else (a hook, a LoRA or quantized layer, autocast, CUDA,
    tracing) the module call itself runs. Gate:
    ``test_linear_function_equals_f_linear`` and
    ``test_fast_paths_equal_module_calls``.
    """
    if 'linear' in OFF or not plain(layer) or x.dtype != torch.float32 or \
            not _onednn(x, layer.weight) or _autocast_on(x.device.type):
        return layer(x)
    if torch.is_grad_enabled():
        return LinearFunction.apply(x, layer.weight, layer.bias)
    out = _linear(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias)
    return out.view(x.shape[:-1] + (layer.weight.shape[0], ))


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
    if 'cpe_folded' in OFF:
        return None
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
def _spans(rows: int, step: int):
    """``(start, stop)`` of ``ceil(rows / step)`` near-equal chunks."""
    n = max(1, -(-rows // step))
    size = -(-rows // n)
    return [(i, min(i + size, rows)) for i in range(0, rows, size)]


class NormFFNFunction(torch.autograd.Function):
    """``fc2(gelu(fc1(layer_norm(x))))`` for training, ``step`` rows at a time,
    keeping only ``x`` and the fc1 output ``h`` for backward.

    Plain autograd keeps ``x`` (norm), ``norm(x)`` (fc1), ``h`` (GELU) and
    ``gelu(h)`` (fc2): 10C values per token; this keeps 5C. The norm's output
    and ``gelu(h)`` are recomputed in backward, one chunk of rows at a time:
    there the 4C-wide temporaries of a chunk stay in cache and are never a
    whole-batch tensor (measured alone on DaViT-T's first stage, batch 16:
    forward and backward 1.7x faster in fp32, 1.9x under bf16 autocast; in a
    whole bf16 training step a few percent). On CUDA ``step`` covers all
    rows: one chunk.

    The linears run in ``dtype``, the dtype ``nn.Linear`` would compute in
    (the autocast dtype under autocast; :func:`_linear_dtype`), with the
    weights cast as autocast casts them; so do their gradients. Weight and
    norm gradients are summed over the chunks in fp32 (under bf16 autocast
    they come out closer to the fp32 gradients than the module calls',
    which round one whole-batch sum to bf16). Backward is not differentiable
    again: double backward raises.
    Gate: ``test_norm_ffn_function_equals_plain_ops`` and
    ``test_fast_paths_equal_module_calls`` (fp32 and bf16 autocast).
    """

    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                eps: float, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                b2: Optional[Tensor], dtype: torch.dtype, step: int) -> Tensor:
        C = x.shape[-1]
        rows = x.reshape(-1, C)
        M = rows.shape[0]
        w1c, b1c = _cast(w1, b1, dtype)
        w2c, b2c = _cast(w2, b2, dtype)
        out = rows.new_empty((M, w2.shape[0]), dtype=dtype)
        stats = rows.new_empty((2, M, 1), dtype=torch.float32)
        # fc1's output is kept chunk by chunk, as the GEMMs write it (one
        # whole-batch tensor would cost a copy of 4C values per row).
        hs = []
        for i, j in _spans(M, step):
            y, mean, rstd = torch.native_layer_norm(rows[i:j], (C, ),
                                                    norm_weight, norm_bias,
                                                    eps)
            stats[0, i:j], stats[1, i:j] = mean, rstd
            hs.append(_linear(y.to(dtype), w1c, b1c))
            _linear_into(F.gelu(hs[-1]), w2c, b2c, out[i:j])
        ctx.save_for_backward(x, stats, norm_weight, norm_bias, w1, w2, *hs)
        ctx.eps, ctx.step = eps, step
        return out.view(x.shape[:-1] + (w2.shape[0], ))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, stats, norm_weight, norm_bias, w1, w2, *hs = ctx.saved_tensors
        need = ctx.needs_input_grad  # False for a None bias
        C = x.shape[-1]
        rows = x.reshape(-1, C)
        M, dt = rows.shape[0], hs[0].dtype
        grad = grad.reshape(M, -1).to(dt)
        w1c, w2c = w1.to(dt), w2.to(dt)

        def total(k: int, like: Tensor) -> Optional[Tensor]:
            """fp32 sum over the chunks of input ``k``'s gradient."""
            if not need[k]:
                return None
            return torch.zeros(
                like.shape, dtype=torch.float32, device=like.device)

        gnw, gnb = total(1, norm_weight), total(2, norm_bias)
        gw1, gb1 = total(4, w1), total(5, hs[0][0])
        gw2, gb2 = total(6, w2), total(7, grad[0])
        gx = torch.empty_like(rows) if need[0] else None

        def add_(acc: Optional[Tensor], part) -> None:
            if acc is not None:
                acc.add_(part() if callable(part) else part)

        for (i, j), hc in zip(_spans(M, ctx.step), hs):
            g = grad[i:j]
            add_(gw2, lambda: _weight_grad(g, F.gelu(hc)))
            add_(gb2, lambda: g.sum(0))
            if not any(need[:6]):
                continue
            gh = torch.ops.aten.gelu_backward(_mm(g, w2c), hc)
            if gw1 is not None:
                y = torch.native_layer_norm(rows[i:j], (C, ), norm_weight,
                                            norm_bias, ctx.eps)[0]
                gw1.add_(_weight_grad(gh, y.to(dt)))
            add_(gb1, lambda: gh.sum(0))
            if any(need[:3]):
                gxc, gnwc, gnbc = torch.ops.aten.native_layer_norm_backward(
                    _mm(gh, w1c).to(x.dtype), rows[i:j], (C, ), stats[0, i:j],
                    stats[1, i:j], norm_weight, norm_bias, list(need[:3]))
                if gx is not None:
                    gx[i:j] = gxc
                add_(gnw, gnwc)
                add_(gnb, gnbc)
        grads = [gx if gx is None else gx.view(x.shape)] + [None] * 9
        for k, acc, like in ((1, gnw, norm_weight), (2, gnb, norm_bias),
                             (4, gw1, w1), (5, gb1, w1), (6, gw2, w2), (7, gb2,
                                                                        w2)):
            if acc is not None:
                grads[k] = acc.to(like.dtype)
        return tuple(grads)


def _cast(weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype):
    """``weight`` and ``bias`` in ``dtype`` (as autocast casts them)."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _ffn_parts(norm: nn.LayerNorm, ffn: nn.Module):
    (fc1, act), fc2 = ffn.layers
    return fc1, act, fc2


def norm_ffn_saving(norm: nn.LayerNorm, ffn: nn.Module,
                    x: Tensor) -> Optional[Tensor]:
    """``ffn(norm(x))`` through :class:`NormFFNFunction` while autograd
    records.

    Runs when: :func:`plain` ``(norm, ffn)``, grad enabled, an exact-GELU
    ``nn.GELU``, an elementwise-affine norm, and :func:`_linear_dtype` knows
    the linears' dtype. Chunks of 2048 rows on CPU (measured best on DaViT-T's
    first two stages), one chunk elsewhere. Returns None otherwise.
    """
    if 'norm_ffn_saving' in OFF:
        return None
    if not torch.is_grad_enabled() or not plain(norm, ffn):
        return None
    fc1, act, fc2 = _ffn_parts(norm, ffn)
    if act.approximate != 'none' or norm.weight is None or \
            norm.bias is None or len(norm.normalized_shape) != 1:
        return None
    dtype = _linear_dtype(x, fc1, fc2)
    if dtype is None:
        return None
    rows = x.numel() // x.shape[-1]
    step = 2048 if x.device.type == 'cpu' else max(rows, 1)
    return NormFFNFunction.apply(x, norm.weight, norm.bias, norm.eps,
                                 fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                                 dtype, step)


def norm_ffn_chunked(norm: nn.LayerNorm, ffn: nn.Module,
                     x: Tensor) -> Optional[Tensor]:
    """``x + ffn(norm(x))`` at inference, ``chunk_rows`` tokens at a time.

    Each chunk's 4C-wide hidden activations are still in cache when GELU and
    fc2 read them, and the residual is added while the chunk is in cache
    (measured on the first stage of DaViT-T, batch 8: fp32 2.2x faster, bf16
    autocast 3.3x). Runs when: :func:`plain` ``(norm, ffn)``, CPU, no autograd,
    and :func:`_linear_dtype` knows the linears' dtype (no autocast and
    everything in one dtype, or CPU autocast over fp32 weights). Under
    autocast the chunk does what the module calls do: the norm in ``x``'s
    dtype, the linears and GELU in the autocast dtype, the residual sum in
    the dtype the module calls' sum has. Returns None otherwise.
    Gate: ``test_fast_paths_equal_module_calls``.
    """
    if 'norm_ffn_chunked' in OFF:
        return None
    step = chunk_rows(x)
    if step is None or not plain(norm, ffn):
        return None
    fc1, act, fc2 = _ffn_parts(norm, ffn)
    dt = _linear_dtype(x, fc1, fc2)
    if dt is None:
        return None
    if dt != fc1.weight.dtype:
        # Half-precision GEMMs like longer chunks. A map of one chunk (DaViT-T
        # at batch 8: stages 2 and 3) still runs here: its casts are those of
        # the module calls, and oneDNN adds the biases inside the GEMMs and
        # GELU runs in place (no 4C-wide bias copy, no second 4C tensor).
        step = max(step, 2048)
    w1, b1 = _cast(fc1.weight, fc1.bias, dt)
    w2, b2 = _cast(fc2.weight, fc2.bias, dt)
    C = x.shape[-1]
    rows = x.reshape(-1, C)
    out = torch.empty_like(rows)
    for start in range(0, rows.shape[0], step):
        t, o = rows[start:start + step], out[start:start + step]
        y = F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias,
                         norm.eps)
        h = _linear(y.to(dt), w1, b1)
        h = torch.ops.aten.gelu_(h, approximate=act.approximate)
        # The residual is added while the chunk's rows are in cache (an fp32
        # residual plus the branch in the autocast dtype under autocast).
        torch.add(t, _linear(h, w2, b2), out=o)
    return out.view(x.shape)


# ------------------------------------------------------ window attention
def _attend_windows(w_msa: nn.Module,
                    windows: Tensor,
                    weights,
                    dt: torch.dtype,
                    out: Optional[Tensor] = None) -> Tensor:
    """``w_msa`` on (n, N, C) ``windows`` (qkv, ``w_msa.attend``, proj).

    ``weights`` are already in ``dt``. Returns (n * N, C) rows in ``dt``.
    """
    (w_qkv, b_qkv), (w_proj, b_proj) = weights
    n, N, C = windows.shape
    heads = w_msa.num_heads
    qkv = _linear(windows.reshape(n * N, C).to(dt), w_qkv, b_qkv)
    q, k, v = qkv.view(n, N, 3, heads, C // heads).permute(2, 0, 3, 1,
                                                           4).unbind(0)
    a = w_msa.attend(q, k, v)
    out_rows = _linear(a.transpose(1, 2).reshape(n * N, C), w_proj, b_proj)
    return out_rows if out is None else out.copy_(out_rows)


def _attn_weights(attn: nn.Module, x: Tensor):
    """``(dtype, ((w_qkv, b_qkv), (w_proj, b_proj)))`` for ``attn``'s qkv and
    proj linears applied to ``x``, in the dtype :func:`_linear_dtype` gives;
    None where it gives none."""
    dt = _linear_dtype(x, attn.qkv, attn.proj)
    if dt is None:
        return None
    qkv = _cast(attn.qkv.weight, attn.qkv.bias, dt)
    return dt, (qkv, _cast(attn.proj.weight, attn.proj.bias, dt))


def window_msa_chunked(w_msa: nn.Module, windows: Tensor,
                       window_tokens: int) -> Optional[Tensor]:
    """``w_msa(windows)`` at inference, a group of windows at a time.

    qkv, the attention and its output stay in cache between the ops (measured
    1.03x on the whole model, fp32). Runs when: :func:`plain` ``(w_msa)``, CPU,
    no autograd, :func:`_linear_dtype` knows the linears' dtype (as in
    :func:`norm_ffn_chunked`), more than one chunk. The attention itself is
    ``w_msa.attend``, as in the module's forward. Where the whole half block
    can be chunked, :func:`norm_attn_chunked` runs instead. Returns None
    otherwise. Gate: ``test_fast_paths_equal_module_calls``.
    """
    if 'window_msa_chunked' in OFF:
        return None
    step = chunk_rows(windows)
    if step is None or not plain(w_msa):
        return None
    setup = _attn_weights(w_msa, windows)
    if setup is None:
        return None
    dt, weights = setup
    step = max(1, _attn_rows(step, dt) // window_tokens)
    if windows.shape[0] <= step:
        return None
    B, N, C = windows.shape
    out = windows.new_empty(windows.shape, dtype=dt)
    for start in range(0, B, step):
        o = out[start:start + step]
        _attend_windows(w_msa, windows[start:start + step], weights, dt,
                        o.view(-1, C))
    return out


# ----------------------------------------------------- channel attention
def _attend_channels(attn: nn.Module,
                     image: Tensor,
                     weights,
                     dt: torch.dtype,
                     out: Optional[Tensor] = None) -> Tensor:
    """Channel attention of one image's (N, C) tokens, transposed.

    ``qkv^T = W x^T + b`` is one (3C, N) GEMM whose rows are q, k and v of
    each head as plain (d, N) matrices: the attention's bmm read them in
    place (the token-major q/k/v of the module calls are copied by each
    matmul), and the image's q/k/v stay in cache. The proj reads the (C, N)
    result as a transposed operand. Returns (N, C) in ``dt``.
    """
    (w_qkv, b_qkv), (w_proj, b_proj) = weights
    N, C = image.shape
    heads = attn.num_heads
    image = image.to(dt)
    if _onednn(w_qkv, image):
        qkv = _linear(w_qkv, image)  # (3C, N) = W x^T
        if b_qkv is not None:
            qkv = qkv.add_(b_qkv[:, None])
    elif b_qkv is None:
        qkv = torch.mm(w_qkv, image.t())
    else:
        qkv = torch.addmm(b_qkv[:, None], w_qkv, image.t())
    q, k, v = qkv.view(3, heads, C // heads, N).unbind(0)
    if attn.v2:  # Florence-2's: softmax(q^T k / sqrt(N)) mixes v
        logits = torch.bmm(q * N**-0.5, k.transpose(1, 2))
        mixed = torch.bmm(logits.softmax(dim=-1), v)
    else:
        # k scaled first, as the module path (and mmpretrain) does.
        logits = torch.bmm(k * attn.scale, v.transpose(1, 2))
        mixed = torch.bmm(logits.softmax(dim=-1), q)  # q's channels
    out_rows = _linear(mixed.view(C, N).t(), w_proj, b_proj)
    return out_rows if out is None else out.copy_(out_rows)


def channel_attn_t(attn: nn.Module, x: Tensor) -> Optional[Tensor]:
    """Channel attention at inference, one image at a time, transposed (see
    :func:`_attend_channels`).

    Measured on DaViT-T's stages, batch 8: fp32 1.0-1.2x faster than the
    module calls. Not in half precision: under bf16 autocast, whole DaViT-T
    inference ran 1.06-1.07x faster without it (two interleaved runs, AMD
    EPYC Zen 4, torch 2.14), although single stages had measured faster
    with it. Runs when: :func:`plain` ``(attn.qkv, attn.proj)``, CPU, no
    autograd, :func:`_linear_dtype` gives fp32. Where the whole half block
    can be chunked, :func:`norm_attn_chunked` runs instead. Returns None
    otherwise. Gate: ``test_fast_paths_equal_module_calls``.
    """
    if 'channel_attn_t' in OFF:
        return None
    if x.device.type != 'cpu' or torch.is_grad_enabled() or \
            not plain(attn.qkv, attn.proj):
        return None
    setup = _attn_weights(attn, x)
    if setup is None or _half(setup[0]):
        return None
    dt, weights = setup
    B, H, W, C = x.shape
    images = x.reshape(B, H * W, C)
    out = x.new_empty((B, H * W, C), dtype=dt)
    for i in range(B):
        _attend_channels(attn, images[i], weights, dt, out[i])
    return out.view(B, H, W, C)


# ------------------------------------------------ norm + attention + residual
def norm_attn_chunked(norm: nn.LayerNorm, attn: nn.Module,
                      x: Tensor) -> Optional[Tensor]:
    """``x + attn(norm(x))`` at inference, a cache-sized piece at a time.

    Window attention: a band of whole windows (``window_size`` rows of the
    map: contiguous in the (B, H, W, C) layout) is normalised, split into
    windows, attended and added to its residual while in cache. Channel
    attention: one image at a time (its attention spans the image), in fp32
    only (see :func:`channel_attn_t`). The
    module calls instead write the whole map 4-5 times (norm, windows,
    attention, merged windows, sum). Runs when: :func:`plain` ``(norm,
    attn)``, CPU, no autograd, :func:`_linear_dtype` knows the linears'
    dtype, and for window attention the map is a whole number of windows (no
    padding; otherwise the module calls run, with their own fast paths).
    Returns None otherwise. Gate: ``test_fast_paths_equal_module_calls``.
    """
    if 'norm_attn_chunked' in OFF:
        return None
    step = chunk_rows(x)
    if step is None or not plain(norm, attn):
        return None
    kind = type(attn).__name__
    if kind == 'ChannelAttention':
        inner = attn
        # The same transposed attention, with the same exceptions.
        if 'channel_attn_t' in OFF or _half(_linear_dtype(x, attn.qkv)):
            return None
    elif kind == 'WindowAttention':
        inner = attn.w_msa
    else:
        return None
    setup = _attn_weights(inner, x)
    if setup is None:
        return None
    dt, weights = setup
    B, H, W, C = x.shape
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, dt))

    def normed(t: Tensor) -> Tensor:
        return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias,
                            norm.eps)

    if kind == 'ChannelAttention':
        for i in range(B):
            branch = _attend_channels(attn,
                                      normed(x[i]).view(H * W, C), weights, dt)
            torch.add(x[i], branch.view(H, W, C), out=out[i])
        return out
    wh = ww = attn.window_size
    if not attn.pad_small_map:
        wh, ww = min(wh, H), min(ww, W)
    if H % wh or W % ww:
        return None
    nw = W // ww
    bands = x.view(B * (H // wh), wh, W, C)
    out_bands = out.view(bands.shape)
    per_chunk = max(1, _attn_rows(step, dt) // (wh * W))
    for i in range(0, bands.shape[0], per_chunk):
        t = bands[i:i + per_chunk]
        n = t.shape[0]
        windows = normed(t).view(n, wh, nw, ww,
                                 C).transpose(1,
                                              2).reshape(n * nw, wh * ww, C)
        branch = _attend_windows(attn.w_msa, windows, weights, dt)
        branch = branch.view(n, nw, wh, ww, C).transpose(1, 2)
        torch.add(
            t.view(n, wh, nw, ww, C),
            branch,
            out=out_bands[i:i + per_chunk].view(n, wh, nw, ww, C))
    return out
