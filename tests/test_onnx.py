"""ONNX export of the classifier (both modes), checked with onnxruntime."""
import importlib.util
import os.path as osp

import numpy as np
import pytest
import torch

import davit_ext  # noqa: F401

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnx')

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py')
SMALL_ARCH = dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])


def _load_tool():
    spec = importlib.util.spec_from_file_location('pytorch2onnx_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def small_config(tmp_path, official):
    """Our real config (standard or official), shrunk to a small arch."""
    base = osp.join(
        REPO, 'configs', 'davit', 'davit-tiny_4xb256_in1k'
        f'{"-official" if official else ""}.py')
    path = tmp_path / f'small{"-official" if official else ""}.py'
    path.write_text(f'_base_ = {base!r}\n'
                    'model = dict(backbone=dict(arch=dict(_delete_=True, '
                    f'**{SMALL_ARCH!r})),\n'
                    '    head=dict(num_classes=10, in_channels=256))\n')
    return str(path)


def random_checkpoint(cfg_path, tmp_path):
    from mmengine.registry import DefaultScope

    from davit_ext.registry import MODELS
    cfg = tool.load_model_config(cfg_path)
    model_cfg = cfg.model.copy()
    model_cfg.pop('_scope_')
    with DefaultScope.overwrite_default_scope('davit_ext'):
        model = MODELS.build(model_cfg)
    torch.manual_seed(0)
    model.backbone.init_weights()  # (the classifier's would log)
    # A head that matters: mmpretrain's default init gives tiny logits.
    torch.nn.init.normal_(model.head.fc.weight, std=1.)
    path = tmp_path / 'random.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return str(path), model.eval()


@pytest.mark.parametrize(
    'official', [False, True], ids=['standard', 'official'])
def test_export_dynamic_batch_and_verify(official, tmp_path, capsys):
    cfg = small_config(tmp_path, official)
    ckpt, model = random_checkpoint(cfg, tmp_path)
    assert type(model.backbone).__module__ == 'davit_ext.models.davit'
    assert model.backbone.official is official
    onnx_file = str(tmp_path / 'small.onnx')
    rc = tool.main([
        cfg, ckpt, '--output-file', onnx_file, '--shape', '96', '128',
        '--dynamic-export', '--verify'
    ])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert 'verify: batch 1, 96x128' in out and 'verify: batch 3' in out
    # Independent check: a batch of 2 through onnxruntime vs PyTorch.
    session = ort.InferenceSession(
        onnx_file, providers=['CPUExecutionProvider'])
    (inp, ) = session.get_inputs()
    assert inp.name == 'input' and isinstance(inp.shape[0], str)
    assert inp.shape[1:] == [3, 96, 128]
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = model(x, mode='tensor').numpy()
    got = session.run(['logits'], {'input': x.numpy()})[0]
    assert got.shape == (2, 10)
    diff = np.abs(got - expected).max()
    print(f'\nONNX {"official" if official else "standard"} 96x128 batch 2:'
          f' max |logit diff| {diff:.2e} (max |logit| '
          f'{np.abs(expected).max():.2f})')
    assert diff < 1e-4
    assert np.abs(expected).max() > 0.1  # logits are not trivially zero


def test_static_export_has_fixed_batch(tmp_path):
    cfg = small_config(tmp_path, official=True)
    ckpt, _ = random_checkpoint(cfg, tmp_path)
    onnx_file = str(tmp_path / 'static.onnx')
    assert tool.main(
        [cfg, ckpt, '--output-file', onnx_file, '--shape', '64', '64']) == 0
    session = ort.InferenceSession(
        onnx_file, providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == [1, 3, 64, 64]


def test_checkpoint_of_another_model_fails_clearly(tmp_path, capsys):
    cfg = small_config(tmp_path, official=False)
    ckpt = tmp_path / 'other.pth'
    torch.save({'state_dict': {'head.fc.weight': torch.zeros(10, 256)}}, ckpt)
    rc = tool.main([cfg, str(ckpt), '--output-file', str(tmp_path / 'x.onnx')])
    assert rc == 1
    # (last line: mmengine's logger may complain about pytest's streams)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('error: checkpoint '), err
    assert 'does not fit' in err
    assert 'backbone.patch_embed.projection.weight' in err
    assert not (tmp_path / 'x.onnx').exists()


def test_missing_config_fails_clearly(tmp_path, capsys):
    rc = tool.main([
        str(tmp_path / 'nope.py'), 'x.pth', '--output-file',
        str(tmp_path / 'x.onnx')
    ])
    assert rc == 1
    assert 'No config file at' in capsys.readouterr().err
