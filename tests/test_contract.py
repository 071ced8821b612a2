"""The module contract of our DaViT: hooks, adapters, int8, autocast.

Every ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Conv2d`` is used through its
module call, or a fast path (``davit_ext.models.fast_paths``) runs that
computes the same values; the tests here check both halves: what users see
through the module calls, and that each fast path equals the module calls.
"""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn as nn
from test_davit import build_pair
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from davit_ext.models import DaViT, fast_paths

SMALL = dict(embed_dims=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
ARCH32 = dict(embed_dims=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
LAYERS = (nn.Linear, nn.LayerNorm, nn.Conv2d)


def small_model(**kwargs):
    torch.manual_seed(0)
    model = DaViT(
        arch=SMALL, drop_path_rate=0., out_indices=(0, 1, 2, 3), **kwargs)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def module_calls_only(monkeypatch):
    """Make every fast path decline: the plain module calls run."""
    monkeypatch.setattr(fast_paths, 'plain', lambda *modules: False)


# ---------------------------------------------------------------- hooks
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('kind', ['module', 'global'])
def test_forward_hooks_fire_once_per_layer(training, kind):
    """224x224: stage 0 has 2x3136 tokens, several chunks of the inference
    fast paths; a hook must still fire once and see the whole tensor."""
    model = small_model().train(training)
    x = torch.randn(2, 3, 224, 224)
    grad = torch.enable_grad() if training else torch.no_grad()
    with grad:
        expected = model(x)  # fast paths
    calls, numel = Counter(), {}
    names = {m: n for n, m in model.named_modules()}

    def hook(m, args, out):
        if m in names:
            calls[names[m]] += 1
            if isinstance(m, LAYERS):
                numel[names[m]] = out.numel()

    if kind == 'module':
        handles = [
            m.register_forward_hook(hook) for m in model.modules()
            if isinstance(m, LAYERS)
        ]
    else:
        handles = [nn.modules.module.register_module_forward_hook(hook)]
    try:
        with grad:
            got = model(x)
    finally:
        for h in handles:
            h.remove()
    layers = [n for n, m in model.named_modules() if isinstance(m, LAYERS)]
    assert len(layers) == 5 * 2 * 8 + 2 + 3 * 2 + 4  # blocks, stem, ds, outs
    if kind == 'module':
        assert calls == Counter({n: 1 for n in layers})
    else:  # every module of ours too (FFN, WindowMSA, GELU, ...)
        assert calls == Counter({
            n: 1
            for m, n in names.items() if not isinstance(m, nn.ModuleList)
        })
    # Whole tensors: (B * H * W) tokens of the stage times the features.
    tokens = [2 * 56 * 56, 2 * 28 * 28, 2 * 14 * 14, 2 * 7 * 7]
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n.startswith('stages.'):
            assert numel[n] == tokens[int(n.split('.')[1])] * \
                m.out_features, n
    for a, b in zip(got, expected):  # module calls == fast paths
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_plain_refuses_what_it_cannot_see_through():
    lin = nn.Linear(4, 4)
    assert fast_paths.plain(lin)

    class MyLinear(nn.Linear):
        pass

    assert not fast_paths.plain(MyLinear(4, 4))
    for register in (lin.register_forward_hook, lin.register_forward_pre_hook,
                     lin.register_full_backward_hook):
        handle = register(lambda *args: None)
        assert not fast_paths.plain(lin)
        handle.remove()
        assert fast_paths.plain(lin)
    handle = nn.modules.module.register_module_forward_pre_hook(
        lambda *args: None)
    assert not fast_paths.plain(lin)
    handle.remove()

    class Scale(nn.Module):

        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(lin, 'weight', Scale())
    assert not fast_paths.plain(lin)
    # A submodule counts: a swapped layer inside an FFN.
    ffn = nn.Sequential(
        nn.Sequential(nn.Linear(4, 8), nn.GELU()), MyLinear(8, 4))
    assert not fast_paths.plain(ffn)


# ------------------------------------------------- fast paths == modules
FAST_PATHS = ('cpe_folded', 'norm_ffn_saving', 'norm_ffn_chunked',
              'norm_attn_chunked', 'window_msa_chunked', 'channel_attn_t')


def count_fast_paths(monkeypatch) -> Counter:
    """Count the calls in which each fast path ran (returned a result)."""
    taken = Counter()
    for name in FAST_PATHS:

        def wrapped(*args, _fn=getattr(fast_paths, name), _name=name):
            out = _fn(*args)
            taken[_name] += out is not None
            return out

        monkeypatch.setattr(fast_paths, name, wrapped)
    return taken


@pytest.mark.parametrize('hook_norm1', [False, True])
@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_fast_paths_equal_module_calls(dtype, hook_norm1, monkeypatch):
    """The gate of every fast path: outputs (inference and training) and all
    gradients equal the plain module calls, in fp32 and under bf16 autocast. A
    hook on each ``norm1`` makes the half-block attention path decline: then
    the attention modules' own fast paths run.

    Under autocast two bf16 computations that sum in another order differ by a
    few bf16 steps: there the inference outputs must also be as close to the
    fp32 forward as those of the module calls are.
    """
    model = small_model()
    if hook_norm1:
        for name, m in model.named_modules():
            if name.endswith('norm1'):
                m.register_forward_hook(lambda *args: None)
    x = torch.randn(2, 3, 224, 224)
    # bf16: one rounding step of a value up to ~8 is 1/32.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is None else \
        dict(rtol=5e-2, atol=1e-1)
    mean_tol = 5e-7 if dtype is None else 1.5e-2
    with torch.no_grad():
        exact = model.eval()(x)  # fp32, fast paths: checked against below
    taken = count_fast_paths(monkeypatch)
    results = []
    for fast in (True, False):
        if not fast:
            module_calls_only(monkeypatch)
        with torch.autocast(
                'cpu', dtype=dtype or torch.bfloat16, enabled=dtype
                is not None):
            model.eval()
            with torch.no_grad():
                infer = model(x)
            model.train()
            outs = model(x)
        loss = sum((o.float() *
                    torch.linspace(-1, 1, o.shape[1]).view(1, -1, 1, 1)).sum()
                   for o in outs)
        model.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((infer, outs, grads))
        if fast:  # every fast path that may run in this precision ran
            expected = set(FAST_PATHS) - ({
                'norm_attn_chunked'
            } if hook_norm1 else {'window_msa_chunked', 'channel_attn_t'})
            if dtype is not None:  # 1 + w would be rounded
                expected.discard('cpe_folded')
                # fp32 only (slower in bf16: see fast_paths.channel_attn_t)
                expected.discard('channel_attn_t')
            assert {n for n in FAST_PATHS if taken[n]} == expected, taken
    (infer_f, outs_f, grads_f), (infer_m, outs_m, grads_m) = results
    for a, b in zip(infer_f + outs_f, infer_m + outs_m):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), **tol)
        assert (a.float() - b.float()).abs().mean() <= mean_tol
    if dtype is not None:
        for a, b, ref in zip(infer_f, infer_m, exact):
            fast_err = (a.float() - ref).abs()
            module_err = (b.float() - ref).abs()
            assert fast_err.mean() <= 1.1 * module_err.mean()
            assert fast_err.max() <= 1.5 * module_err.max()
    if dtype is None:
        for n, g in grads_m.items():
            scale = g.abs().max().item()
            err = (grads_f[n] - g).abs().max().item()
            # fp32 sums in another order: relative to the gradient's scale.
            assert err <= 1e-4 * scale + 1e-6, (n, err, scale)
        return
    # bf16: every gradient as close to the fp32 one as the module calls'
    # (the training FFN sums its weight and norm gradients in fp32: closer).
    module_calls_only(monkeypatch)
    model.zero_grad()
    sum((o * torch.linspace(-1, 1, o.shape[1]).view(1, -1, 1, 1)).sum()
        for o in model.train()(x)).backward()
    for n, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        fast_err = (grads_f[n] - p.grad).abs().max().item()
        module_err = (grads_m[n] - p.grad).abs().max().item()
        assert fast_err <= 1.1 * module_err + 1e-3 * scale, \
            (n, fast_err, module_err, scale)


def test_chunked_paths_default_by_cpu():
    """The chunked inference paths are on by default only with AVX-512
    (measured slower than the module calls on an AVX2 CPU);
    DAVIT_EXT_FAST_PATHS_ON switches them on, DAVIT_EXT_FAST_PATHS_OFF switches
    any off, and a wrong name is one clear error."""
    chunked = {
        'norm_ffn_chunked', 'norm_attn_chunked', 'window_msa_chunked',
        'channel_attn_t'
    }
    assert set(fast_paths.CHUNKED) == chunked
    assert fast_paths.default_off('AVX512') == frozenset()
    assert fast_paths.default_off('AVX2') == chunked
    assert fast_paths.default_off('DEFAULT') == chunked
    code = ('import json, davit_ext.models.fast_paths as f; '
            'print(json.dumps([f.cpu_capability(), sorted(f.OFF)]))')

    def run(**extra):
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith('DAVIT_EXT_FAST_PATHS')
        }
        env.update(ATEN_CPU_CAPABILITY='avx2', **extra)
        return subprocess.run([sys.executable, '-c', code],
                              env=env,
                              capture_output=True,
                              text=True)

    def off(**extra):
        done = run(**extra)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    assert off() == ['AVX2', sorted(chunked)]
    assert off(DAVIT_EXT_FAST_PATHS_ON='all') == ['AVX2', []]
    assert off(
        DAVIT_EXT_FAST_PATHS_ON='channel_attn_t',
        DAVIT_EXT_FAST_PATHS_OFF='cpe_folded') == [
            'AVX2',
            sorted(chunked - {'channel_attn_t'} | {'cpe_folded'})
        ]
    bad = run(DAVIT_EXT_FAST_PATHS_ON='norm_fnn')
    assert bad.returncode != 0
    assert "DAVIT_EXT_FAST_PATHS_ON: unknown fast path(s) ['norm_fnn']" in \
        bad.stderr


def test_fast_paths_turned_off(monkeypatch):
    """``turned_off`` (and DAVIT_EXT_FAST_PATHS_OFF) make the named paths
    decline, so the module calls run; unknown names are one clear error."""
    model = small_model().eval()
    x = torch.randn(1, 3, 224, 224)
    taken = count_fast_paths(monkeypatch)
    with torch.no_grad():
        with fast_paths.turned_off('norm_ffn_chunked', 'cpe_folded'):
            off = model(x)
        assert taken['norm_ffn_chunked'] == taken['cpe_folded'] == 0
        assert fast_paths.OFF == frozenset()
        before = taken['norm_attn_chunked']
        on = model(x)
        both = taken['norm_attn_chunked'] - before  # window + channel halves
    assert taken['norm_ffn_chunked'] > 0 and taken['cpe_folded'] > 0
    torch.testing.assert_close(off, on, rtol=1e-5, atol=1e-5)
    # channel_attn_t also switches the channel half inside norm_attn_chunked
    before = taken['norm_attn_chunked']
    with torch.no_grad(), fast_paths.turned_off('channel_attn_t'):
        off = model(x)
    assert 0 < taken['norm_attn_chunked'] - before == both // 2  # window
    assert taken['channel_attn_t'] == 0
    torch.testing.assert_close(off, on, rtol=1e-5, atol=1e-5)
    with pytest.raises(
            ValueError,
            match=r'turned_off: unknown fast path\(s\) '
            r"\['norm_fnn'\]; choose from linear, cpe_folded"):
        with fast_paths.turned_off('norm_fnn'):
            pass
    with pytest.raises(ValueError, match='DAVIT_EXT_FAST_PATHS_OFF: unknown'):
        fast_paths._parse_names(['linear', 'x'], 'DAVIT_EXT_FAST_PATHS_OFF')


def test_cpe_fold_equals_module_call():
    from davit_ext.models.davit import ConvPosEnc
    torch.manual_seed(0)
    cpe = ConvPosEnc(8)
    x = torch.randn(2, 5, 6, 8, requires_grad=True)
    folded = fast_paths.cpe_folded(cpe.proj, x)
    plain = x + cpe.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(folded, plain, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(plain)
    a = torch.autograd.grad(folded, [x, cpe.proj.weight, cpe.proj.bias], g)
    b = torch.autograd.grad(plain, [x, cpe.proj.weight, cpe.proj.bias], g)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    # Not under autocast: 1 + w would be rounded, x turned half.
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert fast_paths.cpe_folded(cpe.proj, x) is None
        assert cpe(x).dtype == torch.float32


@pytest.mark.parametrize('features', [(24, 40), (40, 24)])
@pytest.mark.parametrize('onednn', [True, False])
@pytest.mark.parametrize('bias', [True, False])
def test_linear_function_equals_f_linear(bias, onednn, features, monkeypatch):
    """LinearFunction (the attention linears' fp32 CPU training path) gives
    F.linear's output and gradients: 4100 rows (weight gradient summed over
    three chunks), a non-contiguous input, with and without bias, and only some
    inputs needing a gradient; a layer wider out than in (its weight gradient
    is computed transposed, see ``_weight_grad``) and one narrower.

    fast_paths.linear is the module call wherever a hook is registered.
    """
    torch.manual_seed(0)
    fan_in, fan_out = features
    firsts = []  # shapes of the first operand of each oneDNN linear
    if not onednn:
        monkeypatch.setattr(fast_paths, 'ONEDNN_LINEAR', None)
    elif fast_paths.ONEDNN_LINEAR is None:
        pytest.skip('this PyTorch has no oneDNN')
    else:
        real = fast_paths.ONEDNN_LINEAR

        def recorded(a, *args):
            firsts.append(tuple(a.shape))
            return real(a, *args)

        monkeypatch.setattr(fast_paths, 'ONEDNN_LINEAR', recorded)
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    x = torch.randn(4100, 2 * fan_in)[:, ::2].requires_grad_()
    grad = torch.randn(4100, fan_out)
    expected = torch.autograd.grad(layer(x), [x, *layer.parameters()], grad)
    got = torch.autograd.grad(
        fast_paths.LinearFunction.apply(x, layer.weight, layer.bias),
        [x, *layer.parameters()], grad)
    # Weight and bias gradients are fp32 sums over 4100 rows (|values| up to
    # ~300) in another order: relative tolerance 1e-4 of each value.
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    (gw, ) = torch.autograd.grad(
        fast_paths.LinearFunction.apply(x.detach(), layer.weight, layer.bias),
        [layer.weight], grad)
    torch.testing.assert_close(gw, expected[1], rtol=1e-4, atol=1e-4)
    if onednn:  # weight gradients: 3 chunks of rows, 2 backward passes
        chunks = [a for a in firsts if a[1] in (1366, 1367)]
        # each with the narrower operand transposed (the one copied)
        assert chunks == [(min(fan_in, fan_out), n)
                          for n in (1367, 1367, 1366)] * 2, firsts
    with torch.no_grad():
        torch.testing.assert_close(
            fast_paths.linear(layer, x), layer(x), rtol=1e-5, atol=1e-5)
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    fast_paths.linear(layer, x)
    assert calls == [1]


def test_fast_paths_without_onednn_equal_module_calls(monkeypatch):
    """DAVIT_EXT_ONEDNN=0 (or a PyTorch without oneDNN): the fast paths run
    with addmm and still equal the module calls, in inference and training."""
    monkeypatch.setattr(fast_paths, 'ONEDNN_LINEAR', None)
    model = small_model()
    x = torch.randn(2, 3, 112, 112)
    results = []
    for fast in (True, False):
        if not fast:
            module_calls_only(monkeypatch)
        with torch.no_grad():
            infer = model.eval()(x)
        outs = model.train()(x)
        model.zero_grad()
        sum(o.square().sum() for o in outs).backward()
        results.append(
            (infer + outs, [p.grad.clone() for p in model.parameters()]))
    (outs_f, grads_f), (outs_m, grads_m) = results
    for a, b in zip(outs_f, outs_m):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_f, grads_m):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6


def test_double_backward_raises_not_silently_wrong():
    """The training FFN's and the fp32 linears' backward are
    once_differentiable: asking for a second derivative raises instead of
    returning a wrong one."""
    model = small_model().train()
    ffn_in = torch.randn(2, 3, 3, 16, requires_grad=True)
    block = model.stages[0].blocks[0].spatial_block
    out = fast_paths.norm_ffn_saving(block.norm2, block.ffn, ffn_in)
    assert out is not None
    (g, ) = torch.autograd.grad(out.square().sum(), ffn_in, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable'):
        g.sum().backward()
    lin = block.attn.w_msa.qkv
    (g, ) = torch.autograd.grad(
        fast_paths.linear(lin, ffn_in).square().sum(),
        ffn_in,
        create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable'):
        g.sum().backward()
    # The whole model: raises too (also SDPA has no double backward on CPU).
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    (gx, ) = torch.autograd.grad(
        model(x)[-1].square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


# ------------------------------------------------------------- adapters
def test_peft_lora_trains_every_adapter_and_train_equals_eval():
    peft = pytest.importorskip('peft')
    model = small_model()
    n_linear = sum(
        isinstance(m, nn.Linear) and n.startswith('stages.')
        for n, m in model.named_modules())
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.,
        target_modules=r'.*\.(qkv|attn\.proj|w_msa\.proj|layers\.0\.0|'
        r'layers\.1)')
    lora = peft.get_peft_model(model, config)
    adapters = {n: p for n, p in lora.named_parameters() if 'lora_' in n}
    assert len(adapters) == 2 * n_linear == 80
    with torch.no_grad():  # B starts at zero: make every adapter matter
        for n, p in adapters.items():
            if 'lora_B' in n:
                p.normal_(std=0.05)
    x = torch.randn(2, 3, 224, 224)
    lora.train()
    out_train = lora(x)
    sum(o.square().mean() for o in out_train).backward()
    trained = [
        n for n, p in adapters.items()
        if p.grad is not None and p.grad.abs().sum() > 0
    ]
    assert len(trained) == len(adapters)
    lora.eval()
    with torch.no_grad():
        out_eval = lora(x)
    for a, b in zip(out_train, out_eval):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- int8
def timm_pair(arch, num_classes=10):
    """Our classifier with the original forward (``official=True``) and timm's
    DaVit, with the same random weights: the same function."""
    timm = pytest.importorskip('timm')
    from mmpretrain.models import ImageClassifier

    from davit_ext.weights.layouts import mmpretrain_to_timm
    torch.manual_seed(0)
    n = len(arch['depths'])
    ours = ImageClassifier(
        backbone=dict(
            type='davit_ext.DaViT',
            arch=dict(arch),
            drop_path_rate=0.,
            official=True),
        head=dict(
            type='LinearClsHead',
            num_classes=num_classes,
            in_channels=arch['embed_dims'] * 2**(n - 1)))
    with torch.no_grad():  # non-trivial norms and head
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
        ours.head.fc.weight.normal_(std=0.5)
    ref = timm.models.davit.DaVit(
        depths=tuple(arch['depths']),
        embed_dims=tuple(arch['embed_dims'] * 2**i for i in range(n)),
        num_heads=tuple(arch['num_heads']),
        num_classes=num_classes)
    ref.load_state_dict(mmpretrain_to_timm(ours.state_dict(), n), strict=True)
    return ref.eval(), ours.eval()


def test_quantize_dynamic_error_within_timm():
    """int8 logit error of ours and of timm's DaViT, same weights.

    timm's DaViT, like ours, has every linear layer as an ``nn.Linear``, so
    ``quantize_dynamic`` quantizes all of them in both (mmpretrain's FFN layers
    are mmcv ``Linear`` subclasses that it skips: half its layers, so its error
    measures less quantization). Every quantized Linear sees the same input in
    both models (to fp32 rounding), but a 1e-6 change of an activation can move
    a value across an int8 rounding step and the difference grows from layer to
    layer: the two errors are draws of one distribution. Hence the margin of
    the bf16 bounds.
    """
    ref, ours = timm_pair(ARCH32)
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        fp32 = ours(x, mode='tensor')
        torch.testing.assert_close(ref(x), fp32, rtol=1e-4, atol=1e-4)
    errors, quantized = [], []
    for model, call in ((ref, lambda m: m(x)),
                        (ours, lambda m: m(x, mode='tensor'))):
        linears = sum(type(m) is nn.Linear for m in model.modules())
        q = torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear}, dtype=torch.qint8)
        assert not any(type(m) is nn.Linear for m in q.modules())
        quantized.append(
            (linears,
             sum(
                 isinstance(m, torch.ao.nn.quantized.dynamic.Linear)
                 for m in q.modules())))
        with torch.no_grad():
            err = (call(q) - fp32).abs()
        errors.append((err.mean().item(), err.max().item()))
    print('int8 |logit error| (mean, max): timm, ours', errors)
    # 5 blocks x 2 halves x (qkv, proj, fc1, fc2) + the head, all int8
    assert quantized == [(41, 41), (41, 41)]
    (ref_mean, ref_max), (mean, max_) = errors
    assert 0 < mean <= 1.05 * ref_mean, errors
    assert max_ <= 1.2 * ref_max, errors


# -------------------------------------------------------------- autocast
def test_bf16_autocast_logits_and_dtypes_like_mmpretrain():
    """Error against each model's own fp32 forward, same weights and input; and
    the same dtype of every stage output (the residual stream)."""
    ref, ours = build_pair(ARCH32, 256, out_indices=(0, 1, 2, 3))
    x = torch.randn(4, 3, 224, 224)
    errors, dtypes = [], []
    for model in (ref, ours):
        with torch.no_grad():
            fp32 = model(x, mode='tensor')
            with torch.autocast('cpu', dtype=torch.bfloat16):
                bf16 = model(x, mode='tensor')
                feats = model.backbone(x)
        err = (bf16.float() - fp32).abs()
        errors.append((err.mean().item(), err.max().item()))
        dtypes.append([f.dtype for f in feats])
    (ref_mean, ref_max), (mean, max_) = errors
    assert 0 < mean <= 1.05 * ref_mean, errors
    assert max_ <= 1.2 * ref_max, errors
    assert dtypes[0] == dtypes[1], dtypes


def test_bf16_autocast_gradients_like_mmpretrain():
    """Gradients under bf16 autocast: as close to each model's own fp32
    gradients as mmpretrain's are (median and worst parameter), and close to
    mmpretrain's bf16 gradients (bf16 tolerance, plus mmpretrain's own error
    where its bf16 gradient is far from its fp32 one: its first-stage LayerNorm
    gradients are bf16 sums over all tokens, ours fp32 sums)."""
    ref, ours = build_pair(ARCH32, 256, drop_path_rate=0.)
    x = torch.randn(2, 3, 224, 224)
    target = torch.randn(2, 1000)
    grads = {}
    for name, model in (('ref', ref), ('ours', ours)):
        model.train()
        for amp in (False, True):
            model.zero_grad()
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                logits = model(x, mode='tensor')
            (logits.float() * target).sum().backward()
            grads[name, amp] = {
                n: p.grad.clone()
                for n, p in model.named_parameters()
            }
    rel = {'ref': [], 'ours': []}
    for n, g32 in grads['ref', False].items():
        scale = g32.abs().max().item()
        assert grads['ours', True][n].dtype == torch.float32
        for name in rel:
            err = (grads[name, True][n] - grads[name, False][n]).abs().max()
            rel[name].append(err.item() / scale)
        cross = (grads['ours', True][n] - grads['ref', True][n]).abs().max()
        assert cross.item() <= (0.25 + rel['ref'][-1]) * scale, n
    assert torch.tensor(rel['ours']).median() <= \
        1.1 * torch.tensor(rel['ref']).median(), rel
    assert max(rel['ours']) <= 1.2 * max(rel['ref']), rel


class MaxNumel(TorchDispatchMode):
    """Largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


@pytest.mark.parametrize('grad', [True, False])
def test_channel_attention_makes_no_per_sample_weight_copies(grad):
    from davit_ext.models.davit import ChannelAttention
    B, C = 16, 32
    attn = ChannelAttention(C, 4)
    x = torch.randn(B, 2, 2, C, requires_grad=grad)
    with MaxNumel() as mode, torch.set_grad_enabled(grad):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = attn(x)
        if grad:
            out.float().sum().backward()
    # Weights and activations are all far below B copies of the weight.
    assert mode.max < B * 3 * C * C // 4, mode.max


# -------------------------------------------------------------- CPU amp
def test_cpu_amp_optim_wrapper_runs_forward_in_bf16():
    from mmengine.registry import DefaultScope

    from davit_ext.registry import MODELS, OPTIM_WRAPPERS
    with DefaultScope.overwrite_default_scope('davit_ext'):
        model = MODELS.build(
            dict(
                type='ImageClassifier',
                backbone=dict(type='DaViT', arch=SMALL),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead', num_classes=3, in_channels=128)))
        wrapper = OPTIM_WRAPPERS.build(
            dict(
                type='CPUAmpOptimWrapper',
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
    seen = []
    model.head.fc.register_forward_hook(
        lambda m, a, out: seen.append(out.dtype))
    from mmpretrain.structures import DataSample
    data = dict(
        inputs=[torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)] * 2,
        data_samples=[DataSample().set_gt_label(i) for i in (0, 2)])
    before = model.head.fc.weight.detach().clone()
    log = model.train_step(data, wrapper)
    assert seen == [torch.bfloat16]
    assert torch.isfinite(log['loss'])
    assert model.head.fc.weight.dtype == torch.float32
    assert not torch.equal(model.head.fc.weight, before)
    with pytest.raises(ValueError, match='dtype must be bfloat16'):
        OPTIM_WRAPPERS.build(
            dict(
                type='davit_ext.CPUAmpOptimWrapper',
                dtype='float16',
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))


@pytest.mark.parametrize('training', [False, True])
def test_compile_fullgraph_sees_the_module_calls(training):
    """Dynamo captures the whole forward in one graph (fullgraph) through the
    module calls, and the captured graph equals eager."""
    model = small_model().train(training)
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    with torch.no_grad():
        for a, b in zip(compiled(x), model(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
