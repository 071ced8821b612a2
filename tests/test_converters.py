"""Checkpoint layouts: official (dingmyu) <-> timm <-> mmpretrain.

timm is the oracle: a randomly initialised timm DaViT, converted by our tool
and loaded into our backbone in official mode, must give timm's logits. timm's
own official->timm filter and mmpretrain's official->mmpretrain script are
second oracles for the official layout's key names.
"""
import argparse
import importlib.util
import os.path as osp

import pytest
import torch

import davit_ext  # noqa: F401
from davit_ext.registry import MODELS
from davit_ext.weights import layouts as C

timm = pytest.importorskip('timm')

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'model_converters', 'davit_to_mmpretrain.py')
SIZES = [(224, 224), (256, 256), (200, 300), (64, 64)]
EMBED = {'tiny': 96, 'small': 96, 'base': 128}


def _load_tool():
    spec = importlib.util.spec_from_file_location('davit_converter_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def build_ours(arch, official=True, num_classes=1000):
    channels = EMBED[arch] * 8
    cfg = dict(
        type='ImageClassifier',
        backbone=dict(type='davit_ext.DaViT', arch=arch, official=official),
        neck=None if official else dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=num_classes,
            in_channels=channels))
    return MODELS.build(cfg).eval()


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def timm_tiny():
    torch.manual_seed(0)
    return timm.create_model('davit_tiny').eval()


def randomise_constant_parameters(model, seed=0):
    """Give every parameter left at a constant init its own random values.

    A fresh timm DaViT has every LayerNorm at weight 1 / bias 0 and every
    Linear bias at 0: a conversion that swapped two norms (norm1/norm2, the
    stem's and a downsample's, ...) or two biases would give the same logits.
    Norm weights become U(0.5, 1.5), biases (and any other constant) move by
    U(-0.5, 0.5), so each tensor is told apart from every other.

    Returns:
        list[str]: The names of the parameters changed.
    """
    gen = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().flatten()
            if not bool((flat == flat[0]).all()):
                continue
            noise = torch.rand(param.shape, generator=gen) - 0.5
            param.add_(noise.to(param.dtype))
            changed.append(name)
    return changed


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_timm_oracle_logits(arch, tmp_path):
    """timm checkpoint -> tool -> our official mode == timm's logits.

    The timm model's constant-initialised parameters (every norm, every Linear
    bias) are randomised first: with norms at 1/0, a conversion that swapped
    two norms would still give timm's logits.
    """
    torch.manual_seed(0)
    ref = timm.create_model(f'davit_{arch}').eval()
    changed = randomise_constant_parameters(ref, seed=0)
    norms = [
        name for name, mod in ref.named_modules()
        if isinstance(mod, torch.nn.LayerNorm)
    ]
    assert norms, 'timm DaViT without LayerNorms?'
    for name in norms:  # every norm (LayerNorm2d too) is randomised
        assert f'{name}.weight' in changed and f'{name}.bias' in changed
    for name, param in ref.named_parameters():  # nothing constant is left
        flat = param.detach().flatten()
        assert not bool((flat == flat[0]).all()), name
    # all norms differ from one another (a swap of two would show)
    weights = [ref.get_parameter(f'{n}.weight') for n in norms]
    assert all(a.shape != b.shape or not torch.equal(a, b)
               for i, a in enumerate(weights) for b in weights[i + 1:])
    src, dst = tmp_path / 'timm.pth', tmp_path / 'mm.pth'
    torch.save({'state_dict_ema': ref.state_dict()}, src)
    assert tool.main([str(src), str(dst)]) == 0
    ckpt = torch.load(dst, map_location='cpu', weights_only=True)
    assert ckpt['meta']['converted_from'] == 'timm'
    ours = build_ours(arch)
    ours.load_state_dict(ckpt['state_dict'], strict=True)
    diffs, scale = {}, 0.
    torch.manual_seed(1)
    with torch.no_grad():
        for h, w in SIZES:
            x = torch.randn(1, 3, h, w)
            expected = ref(x)
            got = ours(x, mode='tensor')
            assert got.shape == expected.shape == (1, 1000)
            diffs[f'{h}x{w}'] = (got - expected).abs().max().item()
            scale = max(scale, expected.abs().max().item())
    print(f'\ntimm oracle davit_{arch}: max |logit diff| ' +
          ', '.join(f'{k}: {v:.2e}'
                    for k, v in diffs.items()) + f' (max |logit| {scale:.2f})')
    assert max(diffs.values()) < 1e-4, diffs


def test_converted_keys_are_our_state_dict(timm_tiny):
    converted = C.timm_to_mmpretrain(timm_tiny.state_dict())
    ours = build_ours('tiny').state_dict()
    assert list(converted) == list(ours)  # same names, same order
    assert len(converted) == 212
    for key, value in converted.items():
        assert value.shape == ours[key].shape, key


def test_round_trips_are_bit_identical(timm_tiny):
    sd = timm_tiny.state_dict()
    for via in ('mmpretrain', 'official'):
        back = C.convert(C.convert(sd, via), 'timm')
        assert list(back) == list(sd)
        for key in sd:
            assert back[key] is sd[key] or torch.equal(back[key], sd[key])
            assert back[key].dtype == sd[key].dtype
    mm = C.timm_to_mmpretrain(sd)
    assert list(C.official_to_mmpretrain(C.mmpretrain_to_official(mm))) == \
        list(mm)


def test_round_trip_through_the_tool_files(timm_tiny, tmp_path):
    sd = timm_tiny.state_dict()
    torch.save(sd, tmp_path / 'a.pth')
    assert tool.main([str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth')]) == 0
    assert tool.main(
        [str(tmp_path / 'b.pth'),
         str(tmp_path / 'c.pth'), '--to', 'timm']) == 0
    back = torch.load(tmp_path / 'c.pth', weights_only=True)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # and timm loads it strictly
    timm.create_model('davit_tiny').load_state_dict(back, strict=True)


def test_official_layout_matches_timm_and_mmpretrain_oracles(timm_tiny):
    from timm.models.davit import checkpoint_filter_fn
    sd = timm_tiny.state_dict()
    official = C.timm_to_official(sd)
    assert 'patch_embeds.0.proj.weight' in official
    assert 'main_blocks.2.2.1.cpe.1.proj.bias' in official
    assert 'norms.weight' in official and 'head.bias' in official
    # timm's own official->timm mapping gives back the original keys.
    back = checkpoint_filter_fn(dict(official), timm_tiny)
    assert sorted(back) == sorted(sd)
    assert all(back[k] is sd[k] for k in sd)
    # mmpretrain's own official->mmpretrain script agrees with us.
    path = osp.join(
        osp.dirname(importlib.util.find_spec('mmpretrain').origin), '.mim',
        'tools', 'model_converters', 'davit_to_mmpretrain.py')
    spec = importlib.util.spec_from_file_location('mmpretrain_davit_conv',
                                                  path)
    ref_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_tool)
    expected = ref_tool.convert_davit(official)
    ours = C.official_to_mmpretrain(official)
    assert list(ours) == list(expected)
    assert all(ours[k] is expected[k] for k in ours)


@pytest.mark.parametrize(
    'wrapper', [None, 'state_dict', 'model', 'state_dict_ema', 'ddp'])
def test_official_checkpoint_wrappers(timm_tiny, tmp_path, wrapper):
    official = C.timm_to_official(timm_tiny.state_dict())
    if wrapper is None:
        ckpt = official
    elif wrapper == 'ddp':
        ckpt = {'model': {'module.' + k: v for k, v in official.items()}}
    else:
        ckpt = {wrapper: official, 'epoch': 3}
    torch.save(ckpt, tmp_path / 'off.pth')
    assert tool.main([str(tmp_path / 'off.pth'), str(tmp_path / 'mm.pth')]) \
        == 0
    out = torch.load(tmp_path / 'mm.pth', weights_only=True)
    assert out['meta']['converted_from'] == 'official'
    assert out['meta']['num_stages'] == 4
    build_ours('tiny').load_state_dict(out['state_dict'], strict=True)


def test_detect_layout(timm_tiny):
    sd = timm_tiny.state_dict()
    assert C.detect_layout(sd) == 'timm'
    assert C.detect_layout(C.timm_to_mmpretrain(sd)) == 'mmpretrain'
    assert C.detect_layout(C.timm_to_official(sd)) == 'official'
    assert C.infer_num_stages(sd, 'timm') == 4


def test_unknown_layout_fails_clearly(tmp_path, capsys):
    resnet = {'conv1.weight': torch.zeros(1), 'fc.weight': torch.zeros(1)}
    with pytest.raises(C.UnknownLayoutError) as err:
        C.convert(resnet, 'mmpretrain')
    msg = str(err.value)
    assert "'stem.conv.weight' (timm)" in msg
    assert "'patch_embeds.0.proj.weight' (official)" in msg
    assert 'conv1.weight, fc.weight' in msg
    torch.save(resnet, tmp_path / 'r.pth')
    assert tool.main([str(tmp_path / 'r.pth'), str(tmp_path / 'o.pth')]) == 1
    err = capsys.readouterr().err
    assert 'Not a DaViT state dict of a known layout' in err
    assert not (tmp_path / 'o.pth').exists()


def test_unmapped_keys_are_all_listed(timm_tiny, tmp_path, capsys):
    sd = dict(timm_tiny.state_dict())
    sd['head.extra.weight'] = torch.zeros(1)
    sd['stages.0.blocks.0.0.attn.rel_pos'] = torch.zeros(1)
    with pytest.raises(C.UnmappedKeysError) as err:
        C.timm_to_mmpretrain(sd)
    assert err.value.keys == [
        'head.extra.weight', 'stages.0.blocks.0.0.attn.rel_pos'
    ]
    assert str(err.value) == (
        '2 key(s) of the timm DaViT state dict have no mmpretrain '
        'equivalent: head.extra.weight, stages.0.blocks.0.0.attn.rel_pos')
    torch.save(sd, tmp_path / 'x.pth')
    assert tool.main([str(tmp_path / 'x.pth'), str(tmp_path / 'o.pth')]) == 1
    assert 'head.extra.weight' in capsys.readouterr().err


def test_mmpretrain_norm_of_another_stage_is_unmapped(timm_tiny):
    mm = C.timm_to_mmpretrain(timm_tiny.state_dict())
    mm['backbone.norm1.weight'] = torch.zeros(192)
    with pytest.raises(C.UnmappedKeysError, match='backbone.norm1.weight'):
        C.mmpretrain_to_timm(mm)


def test_pickled_extras_need_allow_pickle(timm_tiny, tmp_path, capsys):
    official = C.timm_to_official(timm_tiny.state_dict())
    torch.save({
        'model': official,
        'args': argparse.Namespace(lr=1e-3)
    }, tmp_path / 'off.pth')
    src, dst = str(tmp_path / 'off.pth'), str(tmp_path / 'mm.pth')
    assert tool.main([src, dst]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'error: refused to load checkpoint {src}: ')
    assert 'not allowed: argparse.Namespace' in err
    assert 'Nothing from the file was executed' in err
    assert err.strip().endswith(
        'If you trust the file, run again with --allow-pickle.')
    assert tool.main([src, dst, '--allow-pickle']) == 0


def test_mmengine_runner_checkpoint_loads_safely(timm_tiny, tmp_path):
    """What mmengine's runner writes (HistoryBuffer, numpy) needs no.

    --allow-pickle.
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer
    buf = HistoryBuffer()
    buf.update(np.float64(0.5))
    mm = C.timm_to_mmpretrain(timm_tiny.state_dict())
    torch.save(
        {
            'state_dict': mm,
            'message_hub': {
                'log': buf
            },
            'meta': {
                'seed': np.int64(3)
            }
        }, tmp_path / 'epoch_1.pth')
    assert tool.main([
        str(tmp_path / 'epoch_1.pth'),
        str(tmp_path / 't.pth'), '--to', 'timm'
    ]) == 0
    back = torch.load(tmp_path / 't.pth', weights_only=True)
    assert list(back) == list(timm_tiny.state_dict())


def test_safetensors_source(timm_tiny, tmp_path):
    safetensors = pytest.importorskip('safetensors.torch')
    safetensors.save_file(timm_tiny.state_dict(),
                          str(tmp_path / 'model.safetensors'))
    assert tool.main(
        [str(tmp_path / 'model.safetensors'),
         str(tmp_path / 'mm.pth')]) == 0
    out = torch.load(tmp_path / 'mm.pth', weights_only=True)['state_dict']
    assert torch.equal(out['head.fc.weight'],
                       timm_tiny.state_dict()['head.fc.weight'])


def test_unwrap_explicit_key_missing():
    from davit_ext.errors import CheckpointMismatchError
    with pytest.raises(CheckpointMismatchError, match="no 'ema' entry"):
        C.unwrap_state_dict({'model': {}}, key='ema')


@pytest.mark.parametrize('name,content', [
    ('notes.pth', b'hello world\n'),
    ('random.pth', bytes(range(256)) * 4),
    ('model.safetensors', b'hello world\n'),
])
def test_non_checkpoint_files_fail_clearly(name, content, tmp_path, capsys):
    """A text or damaged file: one message, exit 1, nothing written (the text
    file used to print "error: 101")."""
    src, dst = tmp_path / name, tmp_path / 'out.pth'
    src.write_bytes(content)
    assert tool.main([str(src), str(dst)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    if name.endswith('.safetensors'):
        assert err.startswith(f'error: {src} is not a valid .safetensors '
                              'file (')
    else:
        assert err.startswith(
            f'error: cannot read checkpoint {src}: the file is truncated, '
            'damaged or not a torch checkpoint (')
        assert err.endswith('Copy or download it again; for a run of your '
                            'own, resume from an earlier epoch_N.pth / '
                            'iter_N.pth in its work_dir.')
    assert not dst.exists()
