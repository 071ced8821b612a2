"""ONNX export of the classifier (both modes), checked with onnxruntime.

One dynamic export per forward mode (a small custom arch: the export is the
slow part), then every size runs from that one file.
"""
import contextlib
import importlib.util
import io
import os.path as osp

import numpy as np
import pytest
import torch

import davit_ext  # noqa: F401

ort = pytest.importorskip('onnxruntime')
onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxscript')  # torch's exporter needs it

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py')
SMALL_ARCH = dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])
# (N, H, W): square, batch > 1, non-square, odd, odd non-square, smaller
# than one window at every stage (stem map 5x6 < 7x7), one pixel, and a size
# whose every stage map is a multiple of the window (no padding at all).
SIZES = [(1, 64, 64), (3, 96, 128), (2, 75, 51), (1, 225, 225), (1, 97, 131),
         (2, 17, 23), (1, 1, 1), (1, 224, 224)]


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


@pytest.fixture(
    scope='module', params=[False, True], ids=['standard', 'official'])
def exported(request, tmp_path_factory):
    """(model, onnx file, tool output): one dynamic export per mode."""
    official = request.param
    tmp_path = tmp_path_factory.mktemp('official' if official else 'std')
    cfg = small_config(tmp_path, official)
    ckpt, model = random_checkpoint(cfg, tmp_path)
    assert type(model.backbone).__module__ == 'davit_ext.models.davit'
    assert model.backbone.official is official
    onnx_file = str(tmp_path / 'small.onnx')
    # The example size is odd: nothing may depend on it.
    args = [
        cfg, ckpt, '--output-file', onnx_file, '--shape', '70', '90',
        '--dynamic-export', '--verify'
    ]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = tool.main(args)
    out = buf.getvalue()
    assert rc == 0, out
    return model, onnx_file, out


def test_verify_prints_every_size(exported):
    _, _, out = exported
    lines = [line for line in out.splitlines() if line.startswith('verify')]
    assert [line.split(':')[0] for line in lines] == [
        'verify 1x3x70x90 (--shape)', 'verify 3x3x70x90 (batch > 1)',
        'verify 2x3x200x300 (non-square)', 'verify 1x3x225x225 (odd)',
        'verify 1x3x97x131 (odd, non-square)',
        'verify 1x3x24x24 (smaller than a window, stem map 6x6)'
    ]
    assert all(line.endswith(' ok') for line in lines), out
    assert 'opset 18' in out and 'dynamo=True' in out


def test_graph_is_dynamic_opset_18(exported):
    _, onnx_file, _ = exported
    model = onnx.load(onnx_file)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[''] == 18
    assert model.producer_name == 'pytorch'
    assert model.producer_version == torch.__version__
    (inp, ) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == 'input' and len(dims) == 4
    assert dims[1].dim_value == 3
    # Batch, height and width are named symbols, not numbers.
    assert all(dims[i].dim_param for i in (0, 2, 3)), dims
    assert [o.name for o in model.graph.output] == ['logits']


def test_one_file_matches_pytorch_at_every_size(exported):
    torch_model, onnx_file, _ = exported
    session = ort.InferenceSession(
        onnx_file, providers=['CPUExecutionProvider'])
    g = torch.Generator().manual_seed(1)
    for n, h, w in SIZES:
        x = torch.randn(n, 3, h, w, generator=g)
        with torch.no_grad():
            expected = torch_model(x, mode='tensor').numpy()
        got = session.run(['logits'], {'input': x.numpy()})[0]
        assert got.shape == (n, 10)
        scale = np.abs(expected).max()
        diff = np.abs(got - expected).max()
        print(f'{n}x3x{h}x{w}: max |logit diff| {diff:.2e} (logits up to '
              f'{scale:.2f})')
        assert scale > 0.1  # logits are not trivially zero
        assert diff <= 1e-4 * max(1., scale), (n, h, w, diff, scale)


def test_verify_catches_a_different_model(exported, capsys):
    torch_model, onnx_file, _ = exported
    other = tool.LogitsOnly(torch_model).eval()
    with torch.no_grad():
        other.classifier.head.fc.bias.add_(0.5)
    try:
        with pytest.raises(
                AssertionError, match='differ beyond the limit '
                'at 1x3x40x40'):
            tool.verify(other, onnx_file, [(1, 40, 40)])
    finally:
        with torch.no_grad():
            other.classifier.head.fc.bias.sub_(0.5)
    assert 'FAILED' in capsys.readouterr().out


def test_static_export_has_fixed_shape(tmp_path):
    cfg = small_config(tmp_path, official=True)
    ckpt, _ = random_checkpoint(cfg, tmp_path)
    onnx_file = str(tmp_path / 'static.onnx')
    assert tool.main(
        [cfg, ckpt, '--output-file', onnx_file, '--shape', '40', '56']) == 0
    session = ort.InferenceSession(
        onnx_file, providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == [1, 3, 40, 56]


@pytest.mark.parametrize('opset', ['5', '17', '24'])
def test_unsupported_opset_fails_before_any_work(opset, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main([
            str(tmp_path / 'nope.py'), 'nope.pth', '--output-file',
            str(tmp_path / 'x.onnx'), '--opset', opset
        ])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        f'error: --opset {opset} is not supported: the exporter '
        '(torch.onnx.export(dynamo=True) (torch.export + onnxscript)) '
        'writes opsets 18 to 23; leave --opset out for 18.'), err
    # argparse's usage lines, then the one message: no traceback.
    assert err[0].startswith('usage: ')
    assert all(line.startswith(' ') for line in err[1:-1]), err
    assert not (tmp_path / 'x.onnx').exists()


def test_checkpoint_of_another_model_fails_clearly(tmp_path, capsys):
    cfg = small_config(tmp_path, official=False)
    ckpt = tmp_path / 'other.pth'
    torch.save({'state_dict': {'head.fc.weight': torch.zeros(10, 256)}}, ckpt)
    out_file = tmp_path / 'x.onnx'
    out_file.write_bytes(b'previous export')
    rc = tool.main([cfg, str(ckpt), '--output-file', str(out_file)])
    assert rc == 1
    # (last line: mmengine's logger may complain about pytest's streams)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('error: checkpoint '), err
    assert 'does not fit' in err
    assert 'backbone.patch_embed.projection.weight' in err
    # Nothing lost: the previous file is untouched, no temporary left.
    assert out_file.read_bytes() == b'previous export'
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'other.pth', 'small.py', 'x.onnx'
    ]


def test_missing_checkpoint_fails_clearly(tmp_path, capsys):
    cfg = small_config(tmp_path, official=False)
    rc = tool.main([
        cfg,
        str(tmp_path / 'missing.pth'), '--output-file',
        str(tmp_path / 'x.onnx')
    ])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('error: ') and 'missing.pth' in err, err
    assert not (tmp_path / 'x.onnx').exists()


def test_missing_config_fails_clearly(tmp_path, capsys):
    rc = tool.main([
        str(tmp_path / 'nope.py'), 'x.pth', '--output-file',
        str(tmp_path / 'x.onnx')
    ])
    assert rc == 1
    assert 'No config file at' in capsys.readouterr().err


def test_benchmark_onnxruntime_row(capsys):
    """The benchmark's ``--onnx`` candidate: same weights, checked, timed."""
    spec = importlib.util.spec_from_file_location(
        'benchmark_tool',
        osp.join(REPO, 'tools', 'analysis_tools', 'benchmark.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        out = bench.main([
            '--arch', '{"embed_dims": 16, "depths": [1, 1, 1, 1], '
            '"num_heads": [1, 1, 2, 2]}', '--batch', '2', '--img-size', '45',
            '61', '--threads', '1', '--iters', '2', '--warmup', '0', '--skip',
            'train', 'memory', '--peers', '--no-official', '--num-classes',
            '10', '--onnx'
        ])
    finally:
        torch.set_num_threads(threads)
    (check, ) = out['checks']
    assert check['pair'] == 'ours+onnxruntime vs ours (fp32)' and check['ok']
    assert check['max_abs_diff'] <= 1e-4 * max(1., check['logit_scale'])
    res = out['results']['ours+onnxruntime']
    assert len(res['infer_s']) == 2 and res['infer_img_s'] > 0
    assert res['compile_s']['onnx export'] > 0
    assert 'train_img_s' not in res and 'infer_peak_mb' not in res
    printed = capsys.readouterr().out
    ratio = res['infer_img_s'] / out['results']['ours']['infer_img_s']
    assert f'ours+onnxruntime: inference {ratio:.2f}x ours' in printed


def test_missing_exporter_package_fails_clearly(tmp_path, capsys, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, 'find_spec', lambda name, *a:
        (None if name == 'onnxscript' else find_spec(name, *a)))
    rc = tool.main([
        str(tmp_path / 'nope.py'), 'x.pth', '--output-file',
        str(tmp_path / 'x.onnx')
    ])
    assert rc == 1
    assert capsys.readouterr().err.strip() == (
        'error: the ONNX export needs onnxscript: pip install onnxscript '
        '(or pip install "davit_ext[deploy]").')
