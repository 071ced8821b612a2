"""The core: our DaViT against mmpretrain's (oracle) and its own contract."""
import pytest
import torch
from mmengine.analysis import get_model_complexity_info
from mmengine.registry import DefaultScope
from mmpretrain.models.backbones.davit import DaViT as MMPretrainDaViT
from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS

from davit_ext.models import DaViT
from davit_ext.registry import MODELS

ARCHS = {'tiny': 768, 'small': 768, 'base': 1024}
PUBLISHED = {  # mmpretrain 1.2 metafile: params, FLOPs
    'tiny': (28_360_168, 4_539_698_688),
    'small': (49_745_896, 8_799_942_144),
    'base': (87_954_408, 15_509_702_656),
}
SMALL_ARCH = dict(embed_dims=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])


def classifier_cfg(arch, in_channels, **backbone):
    return dict(
        type='ImageClassifier',
        backbone=dict(type='DaViT', arch=arch, **backbone),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead', num_classes=1000, in_channels=in_channels))


def build_pair(arch, in_channels, **backbone):
    """mmpretrain's classifier and ours, with the same random weights."""
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        ref = MMPRETRAIN_MODELS.build(
            classifier_cfg(arch, in_channels, **backbone))
    with DefaultScope.overwrite_default_scope('davit_ext'):
        ours = MODELS.build(classifier_cfg(arch, in_channels, **backbone))
    assert type(ref.backbone) is MMPretrainDaViT
    assert type(ours.backbone) is DaViT
    with torch.no_grad():  # non-trivial norms, so a swapped one shows
        for name, p in ref.named_parameters():
            if 'norm' in name:
                p.add_(torch.randn_like(p) * 0.2)
        ref.head.fc.weight.normal_(std=0.5)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval()
    ours.eval()
    return ref, ours


# ------------------------------------------------------------ registry
def test_scope_resolution(davit_scope):
    from mmpretrain.models import GlobalAveragePooling, ImageClassifier
    assert MODELS.scope == 'davit_ext'
    assert MODELS.parent is MMPRETRAIN_MODELS
    assert MODELS.get('DaViT') is DaViT
    assert MODELS.get('ImageClassifier') is ImageClassifier
    assert MODELS.get('GlobalAveragePooling') is GlobalAveragePooling
    model = MODELS.build(classifier_cfg('t', 768))
    assert type(model.backbone) is DaViT


def test_scoped_name_from_mmpretrain_scope():
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        assert MMPRETRAIN_MODELS.get('DaViT') is MMPretrainDaViT
        assert MMPRETRAIN_MODELS.get('davit_ext.DaViT') is DaViT
        model = MMPRETRAIN_MODELS.build(
            dict(
                type='ImageClassifier',
                backbone=dict(type='davit_ext.DaViT', arch=SMALL_ARCH),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead', num_classes=3, in_channels=128)))
    assert type(model.backbone) is DaViT


def test_other_registries_fall_through(davit_scope):
    from mmpretrain.datasets import ImageNet, PackInputs
    from mmpretrain.evaluation import Accuracy

    from davit_ext.registry import DATASETS, HOOKS, METRICS, TRANSFORMS
    assert DATASETS.get('ImageNet') is ImageNet
    assert TRANSFORMS.get('PackInputs') is PackInputs
    assert METRICS.get('Accuracy') is Accuracy
    assert HOOKS.get('CheckpointHook').__name__ == 'CheckpointHook'


# ---------------------------------------------------- published numbers
@pytest.mark.parametrize('arch', list(ARCHS))
def test_params_and_flops_match_published(arch, davit_scope):
    model = MODELS.build(classifier_cfg(arch, ARCHS[arch])).eval()
    params, flops = PUBLISHED[arch]
    assert sum(p.numel() for p in model.parameters()) == params
    counted = get_model_complexity_info(
        model, input_shape=(3, 224, 224), show_table=False,
        show_arch=False)['flops']
    # 0.017 % off on this stack (mmengine counts a few small ops the
    # published figure does not); a dropped or halved attention count is not.
    assert abs(counted - flops) / flops < 5e-4, counted


def test_state_dict_layout_is_mmpretrain():
    ref = MMPretrainDaViT(arch='tiny', out_indices=(3, ))
    ours = DaViT(arch='tiny')
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    our_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    # + head.fc.{weight, bias}: the 212 tensors of a published tiny checkpoint
    assert len(our_shapes) + 2 == 212


# ------------------------------------------------- equality with oracle
@pytest.mark.parametrize('arch', list(ARCHS))
def test_features_and_logits_equal_mmpretrain(arch):
    """All four stage outputs and the logits, at sizes where maps fit."""
    ref, ours = build_pair(arch, ARCHS[arch], out_indices=(0, 1, 2, 3))
    for h, w in [(224, 224), (256, 256), (384, 384), (256, 320)]:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            feats_ref, feats_ours = ref.backbone(x), ours.backbone(x)
            logits_ref = ref.head(ref.neck(feats_ref))
            logits_ours = ours.head(ours.neck(feats_ours))
        assert len(feats_ref) == len(feats_ours) == 4
        for fa, fb in zip(feats_ref, feats_ours):
            # float32 sums in another order over up to 11 blocks: relative.
            torch.testing.assert_close(fb, fa, rtol=1e-4, atol=1e-4)
        assert logits_ref.std() > 0.3  # the comparison means something
        assert (logits_ref - logits_ours).abs().max() <= 1e-4, (arch, h, w)


def test_default_classifier_equal_mmpretrain():
    """The plain config (out_indices=(3,)) through ImageClassifier."""
    ref, ours = build_pair('tiny', 768)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = ref(x, mode='tensor'), ours(x, mode='tensor')
    assert (a - b).abs().max() <= 1e-4


# ---------------------------------------------------------- input sizes
@pytest.mark.parametrize('size, maps', [((160, 160), [(40, 40), (20, 20),
                                                      (10, 10), (5, 5)]),
                                        ((192, 192), [(48, 48), (24, 24),
                                                      (12, 12), (6, 6)]),
                                        ((64, 64), [(16, 16), (8, 8), (4, 4),
                                                    (2, 2)]),
                                        ((225, 225), [(57, 57), (29, 29),
                                                      (15, 15), (8, 8)]),
                                        ((200, 300), [(50, 75), (25, 38),
                                                      (13, 19), (7, 10)]),
                                        ((256, 309), [(64, 78), (32, 39),
                                                      (16, 20), (8, 10)]),
                                        ((32, 32), [(8, 8), (4, 4), (2, 2),
                                                    (1, 1)])])
def test_any_input_size(size, maps):
    model = DaViT(arch='tiny', out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *size))
    assert [tuple(o.shape[2:]) for o in outs] == maps
    assert [o.shape[1] for o in outs] == [96, 192, 384, 768]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('size', [(160, 160), (64, 64), (225, 225),
                                  (200, 300)])
def test_mmpretrain_cannot_run_these_sizes(size):
    ref = MMPretrainDaViT(arch='tiny')
    ref.eval()
    with pytest.raises(AssertionError), torch.no_grad():
        ref(torch.randn(1, 3, *size))


def test_padding_does_not_leak_across_samples():
    """Padded zeros are per sample: a batch equals its samples run alone."""
    model = DaViT(
        arch=SMALL_ARCH, window_size=4, out_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(3, 3, 45, 70)
    with torch.no_grad():
        batch = model(x)
        single = model(x[1:2])
    for b, s in zip(batch, single):
        torch.testing.assert_close(b[1:2], s, atol=1e-5, rtol=1e-5)


def test_pad_small_map_false_shrinks_window():
    torch.manual_seed(0)
    pad = DaViT(arch=SMALL_ARCH, out_indices=(3, )).eval()
    shrink = DaViT(arch=SMALL_ARCH, out_indices=(3, ), pad_small_map=False)
    shrink.load_state_dict(pad.state_dict())
    shrink.eval()
    x = torch.randn(1, 3, 64, 64)  # last stage 2x2 < window 7
    with torch.no_grad():
        a, b = pad(x)[0], shrink(x)[0]
        # Same as padded when the map already fills the window: 224 -> 7x7.
        y = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(pad(y)[0], shrink(y)[0])
    assert a.shape == b.shape == (1, 128, 2, 2)
    assert (a - b).abs().max() > 1e-3  # attends over 4 tokens, not 49


# -------------------------------------------------------------- errors
@pytest.mark.parametrize('bad, shape', [
    (torch.randn(3, 64, 64), '(3, 64, 64)'),
    (torch.randn(1, 1, 64, 64), '(1, 1, 64, 64)'),
    (torch.randn(0, 3, 64, 64), '(0, 3, 64, 64)'),
])
def test_bad_input_raises_clear_error(bad, shape):
    model = DaViT(arch=SMALL_ARCH).eval()
    with pytest.raises(ValueError) as e:
        model(bad)
    msg = str(e.value)
    assert 'shape (N, 3, H, W)' in msg and shape in msg


@pytest.mark.parametrize('kwargs, message', [
    (dict(arch='tinyy'), "unknown arch 'tinyy'; choose one of ['b', 'base',"),
    (dict(arch=dict(embed_dims=32, depths=[1, 1])),
     "missing keys ['num_heads']"),
    (dict(arch=dict(embed_dims=32, depths=[1, 1], num_heads=[1, 2, 4])),
     'got 2 depths and 3 num_heads'),
    (dict(arch=dict(embed_dims=30, depths=[1, 1], num_heads=[4, 4])),
     'stage 0 has 30 channels, not divisible by its 4 heads'),
    (dict(arch='t', out_indices=(4, )),
     'out_indices entry 4 is out of range for 4 stages'),
    (dict(arch='t',
          out_indices=(-5, )), 'out_indices entry -5 is out of range'),
    (dict(arch='t', frozen_stages=4), 'frozen_stages must be in [-1, 3]'),
    (dict(arch='t', stage_cfgs=dict(depth=3)),
     "stage_cfgs keys ['depth'] are not supported"),
    (dict(arch='t', stage_cfgs=[{}, {}]), 'stage_cfgs has 2 entries'),
])
def test_bad_config_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError) as e:
        DaViT(**kwargs)
    assert message in str(e.value)


# ------------------------------------------------------------ contract
def test_train_eval_return_module():
    model = DaViT(arch=SMALL_ARCH)
    assert model.train() is model
    assert model.eval() is model


def test_out_indices_negative_and_order():
    model = DaViT(arch=SMALL_ARCH, out_indices=(-1, 1)).eval()
    assert model.out_indices == (1, 3)
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128]
    assert set(
        k.split('.')[0] for k in model.state_dict()
        if k.startswith('norm')) == {'norm1', 'norm3'}


def test_out_after_downsample():
    model = DaViT(
        arch=SMALL_ARCH, out_indices=(0, 1, 2, 3),
        out_after_downsample=True).eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(32, 8, 8), (64, 4, 4),
                                                  (128, 2, 2), (128, 2, 2)]


def test_frozen_stages_like_mmpretrain():
    for frozen in (0, 2):
        ref = MMPretrainDaViT(
            arch='tiny', frozen_stages=frozen, out_indices=(0, 1, 2, 3))
        ours = DaViT(
            arch='tiny', frozen_stages=frozen, out_indices=(0, 1, 2, 3))
        ref.train()
        ours.train()
        frozen_ref = {
            n
            for n, p in ref.named_parameters() if not p.requires_grad
        }
        frozen_ours = {
            n
            for n, p in ours.named_parameters() if not p.requires_grad
        }
        assert frozen_ours == frozen_ref
        assert any(n.startswith(f'stages.{frozen}.') for n in frozen_ours)
        assert not any(
            n.startswith(f'stages.{frozen + 1}.') for n in frozen_ours)
        assert not ours.stages[frozen].training
        assert ours.stages[frozen + 1].training


def test_norm_eval_keeps_batchnorm_in_eval():
    model = DaViT(
        arch=SMALL_ARCH,
        norm_cfg=dict(type='BN'),
        norm_eval=True,
        out_indices=(0, 3))
    model.train()
    assert isinstance(model.norm0, torch.nn.BatchNorm2d)
    assert not model.norm0.training and not model.norm3.training
    assert model.stages[0].training
    before = model.norm0.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.norm0.running_mean, before)
    model = DaViT(arch=SMALL_ARCH, norm_cfg=dict(type='BN'), out_indices=0)
    model.train()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(model.norm0.running_mean, before)


def test_with_cp_same_outputs_and_grads():
    torch.manual_seed(0)
    plain = DaViT(
        arch=SMALL_ARCH, drop_path_rate=0.3, out_indices=(1, 3)).train()
    cp = DaViT(
        arch=SMALL_ARCH, drop_path_rate=0.3, out_indices=(1, 3),
        with_cp=True).train()
    cp.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (plain, cp):
        torch.manual_seed(1)  # same drop-path draws
        loss = sum(o.square().mean() for o in model(x))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(
            grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_drop_path_rates_and_behaviour():
    model = DaViT(arch='tiny', drop_path_rate=0.1)
    rates = [b.spatial_block.drop_path for s in model.stages for b in s.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 6).tolist(), abs=1e-7)
    assert [b.channel_block.drop_path for s in model.stages
            for b in s.blocks] == rates
    model = DaViT(arch=SMALL_ARCH, drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    torch.manual_seed(0)
    a = model(x)[0]
    torch.manual_seed(1)
    b = model(x)[0]
    assert (a - b).abs().max() > 1e-3  # stochastic while training
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0], rtol=0, atol=0)


def test_init_weights_trunc_normal_linear():
    model = DaViT(arch=SMALL_ARCH)
    model.init_weights()
    qkv = model.stages[0].blocks[0].spatial_block.attn.w_msa.qkv
    assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.count_nonzero(qkv.bias) == 0


@pytest.mark.parametrize('size', [(64, 64), (96, 128)])
def test_training_gradients_equal_mmpretrain(size):
    """Backward (custom or not) gives mmpretrain's gradients, every param."""
    arch = dict(embed_dims=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
    # Maps below the window (4x4, 2x2) need mmpretrain's pad_small_map.
    ref, ours = build_pair(
        arch,
        256,
        drop_path_rate=0.,
        pad_small_map=True,
        out_indices=(0, 1, 2, 3))
    ref.train()
    ours.train()
    x = torch.randn(2, 3, *size)
    target = torch.randn(2, 1000)
    for model in (ref, ours):
        feats = model.backbone(x)
        logits = model.head(model.neck(feats))
        loss = (logits * target).sum() + sum(f.square().mean() for f in feats)
        loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        expected = ref_grads[name].grad
        assert p.grad is not None and p.grad.shape == expected.shape, name
        # Sums of many terms in another order: compare against the scale.
        error = (p.grad - expected).abs().max().item()
        assert error <= 1e-4 * expected.abs().max().item() + 1e-7, name


@pytest.mark.parametrize('step', [7, 1000])
@pytest.mark.parametrize('bias', [True, False])
def test_norm_ffn_function_equals_plain_ops(step, bias):
    """NormFFNFunction gives the plain ops' output and the gradients of all its
    tensor inputs, also where only some need one; in uneven chunks of 7 rows
    (50 rows) and in one chunk; with and without the linears' biases."""
    from davit_ext.models.fast_paths import NormFFNFunction
    torch.manual_seed(0)
    C = 12
    x = torch.randn(2, 5, 5, C, requires_grad=True)
    params = [
        torch.randn(C) + 1,
        torch.randn(C),
        torch.randn(4 * C, C),
        torch.randn(4 * C) if bias else None,
        torch.randn(C, 4 * C),
        torch.randn(C) if bias else None,
    ]
    tensors = [p.requires_grad_(True) for p in params if p is not None]
    nw, nb, w1, b1, w2, b2 = params
    grad_out = torch.randn(2, 5, 5, C)

    plain = torch.nn.functional.layer_norm(x, (C, ), nw, nb, 1e-5)
    plain = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(plain, w1, b1)),
        w2, b2)
    expected = torch.autograd.grad(plain, [x] + tensors, grad_out)

    def apply(x, *params):
        nw, nb, w1, b1, w2, b2 = params
        return NormFFNFunction.apply(x, nw, nb, 1e-5, w1, b1, w2, b2,
                                     torch.float32, step)

    out = apply(x, *params)
    grads = torch.autograd.grad(out, [x] + tensors, grad_out)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Only some inputs needing a gradient (frozen weights, frozen input).
    frozen = [p if p is None else p.detach() for p in params]
    (gx, ) = torch.autograd.grad(apply(x, *frozen), [x], grad_out)
    torch.testing.assert_close(gx, expected[0], rtol=1e-4, atol=1e-4)
    (gw2, ) = torch.autograd.grad(
        apply(x.detach(), *frozen[:4], w2, frozen[5]), [w2], grad_out)
    want = expected[[t is w2 for t in tensors].index(True) + 1]
    torch.testing.assert_close(gw2, want, rtol=1e-4, atol=1e-4)


def test_inference_chunks_equal_one_pass(monkeypatch):
    """The chunked inference path (FFN and window attention written into one
    output) equals the model run in one pass."""
    from davit_ext.models import fast_paths
    model = DaViT(arch=SMALL_ARCH).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        monkeypatch.setattr(fast_paths, 'chunk_rows', lambda t: None)
        expected = model(x)
        monkeypatch.setattr(fast_paths, 'chunk_rows', lambda t: 100)
        got = model(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
