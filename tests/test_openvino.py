"""OpenVINO IR export (tools/deployment/pytorch2openvino.py), checked against
PyTorch with OpenVINO's CPU plugin.

One dynamic export (a small custom arch: the export is the slow part) runs
every size; one static export of the original forward checks the fixed shape.
"""
import contextlib
import importlib.util
import io
import json
import os
import os.path as osp
import statistics
import warnings

import numpy as np
import pytest
import torch

import davit_ext  # noqa: F401

ov = pytest.importorskip('openvino')
pytest.importorskip('onnx')
pytest.importorskip('onnxscript')  # torch's exporter needs it

from test_onnx import SIZES, random_checkpoint, small_config  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'deployment', 'pytorch2openvino.py')


def _load_tool():
    spec = importlib.util.spec_from_file_location('pytorch2openvino_tool',
                                                  TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def run_tool(args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = tool.main(args)
    return rc, buf.getvalue()


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """(model, .xml file, tool output): one dynamic export, verified."""
    tmp_path = tmp_path_factory.mktemp('ov')
    cfg = small_config(tmp_path, official=False)
    ckpt, model = random_checkpoint(cfg, tmp_path)
    xml = str(tmp_path / 'small.xml')
    rc, out = run_tool([
        cfg, ckpt, '--output-file', xml, '--shape', '70', '90',
        '--dynamic-export', '--verify'
    ])
    assert rc == 0, out
    return model, xml, out


def test_verify_prints_every_size(exported):
    _, xml, out = exported
    lines = [line for line in out.splitlines() if line.startswith('verify')]
    assert [line.split(':')[0] for line in lines] == [
        'verify 1x3x70x90 (--shape)', 'verify 3x3x70x90 (batch > 1)',
        'verify 2x3x200x300 (non-square)', 'verify 1x3x225x225 (odd)',
        'verify 1x3x97x131 (odd, non-square)',
        'verify 1x3x24x24 (smaller than a window, stem map 6x6)'
    ]
    assert all(line.endswith(' ok') for line in lines), out
    assert osp.isfile(xml) and osp.isfile(xml[:-4] + '.bin')
    # Nothing else left in the folder (no temporary files).
    assert sorted(
        p for p in os.listdir(osp.dirname(xml))
        if not p.endswith(('.py', '.pth'))) == ['small.bin', 'small.xml']


def test_ir_is_dynamic_with_fp32_weights(exported):
    _, xml, _ = exported
    model = ov.Core().read_model(xml)
    (inp, ) = model.inputs
    shape = inp.get_partial_shape()
    assert shape.rank.get_length() == 4 and shape[1].get_length() == 3
    assert all(shape[i].is_dynamic for i in (0, 2, 3)), shape
    assert model.outputs[0].get_any_name() == 'logits'
    weights = [
        op for op in model.get_ops() if op.get_type_name() == 'Constant'
        and op.get_output_partial_shape(0).rank.get_length() >= 2
    ]
    assert weights
    assert {str(op.get_output_element_type(0))
            for op in weights} == {'<Type: \'float32\'>'}


def test_one_ir_matches_pytorch_at_every_size(exported):
    torch_model, xml, _ = exported
    compiled = tool.compile_model(xml, 'fp32', threads=1)
    g = torch.Generator().manual_seed(1)
    for n, h, w in SIZES:
        x = torch.randn(n, 3, h, w, generator=g)
        with torch.no_grad():
            expected = torch_model(x, mode='tensor').numpy()
        got = compiled({'input': x.numpy()})['logits']
        assert got.shape == (n, 10)
        scale = np.abs(expected).max()
        diff = np.abs(got - expected).max()
        assert scale > 0.1  # logits are not trivially zero
        assert diff <= 1e-4 * max(1., scale), (n, h, w, diff, scale)


def test_bf16_inference_is_close(exported):
    """The precision is chosen at compile time: bf16 GEMMs stay within the
    benchmark's autocast bound of fp32 PyTorch."""
    if 'BF16' not in ov.Core().get_property('CPU',
                                            'OPTIMIZATION_CAPABILITIES'):
        pytest.skip('this CPU has no bf16 instructions')
    torch_model, xml, _ = exported
    compiled = tool.compile_model(xml, 'bf16', threads=1)
    assert compiled.get_property('INFERENCE_PRECISION_HINT') == ov.Type.bf16
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch_model(x, mode='tensor').numpy()
    got = compiled({'input': x.numpy()})['logits']
    diff, scale = np.abs(got - expected).max(), np.abs(expected).max()
    assert 0 < diff <= 5e-2 * max(1., scale), (diff, scale)


def test_verify_catches_a_different_model(exported, capsys):
    torch_model, xml, _ = exported
    other = tool.pytorch2onnx.LogitsOnly(torch_model).eval()
    with torch.no_grad():
        other.classifier.head.fc.bias.add_(0.5)
    try:
        with pytest.raises(AssertionError, match='differ beyond the limit'):
            tool.verify(other, xml, [(1, 40, 40)])
    finally:
        with torch.no_grad():
            other.classifier.head.fc.bias.sub_(0.5)
    assert 'FAILED' in capsys.readouterr().out


def test_static_ir_of_the_original_forward(tmp_path):
    cfg = small_config(tmp_path, official=True)
    ckpt, model = random_checkpoint(cfg, tmp_path)
    xml = str(tmp_path / 'static.xml')
    rc, out = run_tool([
        cfg, ckpt, '--output-file', xml, '--shape', '40', '56', '--batch', '2',
        '--verify'
    ])
    assert rc == 0, out
    assert 'verify 2x3x40x56 (--shape, the only size of a static IR)' in out
    shape = ov.Core().read_model(xml).inputs[0].get_partial_shape()
    assert shape.is_static and shape.to_shape() == [2, 3, 40, 56]


def test_ir_keeps_the_attention_for_the_cpu_plugin(tmp_path):
    """The IR keeps the attention as plain MatMul + Softmax.

    It is read by the ONNX frontend, not ``openvino.convert_model``, which
    fuses the window attention into ScaledDotProductAttention nodes that the
    CPU plugin ran slower than its own fusion of the plain graph (see
    ``pytorch2openvino.convert``).
    """
    cfg = small_config(tmp_path, official=False)
    _, model = random_checkpoint(cfg, tmp_path)
    onnx_file = str(tmp_path / 'static.onnx')
    tool.pytorch2onnx.export(model, onnx_file, (56, 56), False)

    def sdpa(m):
        return sum(op.get_type_name() == 'ScaledDotProductAttention'
                   for op in m.get_ordered_ops())

    assert sdpa(ov.convert_model(onnx_file)) > 0  # what it would fuse
    assert sdpa(tool.convert(onnx_file)) == 0
    xml = str(tmp_path / 'static.xml')
    ov.save_model(tool.convert(onnx_file), xml, compress_to_fp16=False)
    assert sdpa(ov.Core().read_model(xml)) == 0


@pytest.mark.parametrize('bad,message', [
    (['--output-file', 'x.onnx'], '--output-file must end in .xml'),
    (['--output-file', 'x.xml', '--batch', '0'], 'must be positive'),
    (['--output-file', 'x.xml', '--verify-sizes', '1x8x8'
      ], '--verify-sizes needs --dynamic-export'),
])
def test_bad_options_fail_with_one_line(bad, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main([str(tmp_path / 'c.py'), 'x.pth'] + bad)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # argparse's usage, then one line: no traceback
    assert 'error: ' in err[-1] and message in err[-1], err
    assert err[0].startswith('usage: ')


def test_checkpoint_of_another_model_fails_clearly(tmp_path, capsys):
    cfg = small_config(tmp_path, official=False)
    ckpt = tmp_path / 'other.pth'
    torch.save({'state_dict': {'head.fc.weight': torch.zeros(10, 256)}}, ckpt)
    rc = tool.main([cfg, str(ckpt), '--output-file', str(tmp_path / 'x.xml')])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('error: checkpoint ') and 'does not fit' in err
    assert sorted(p.name
                  for p in tmp_path.iterdir()) == ['other.pth', 'small.py']


def test_missing_openvino_fails_clearly(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, 'find_spec', lambda name, *a:
        (None if name == 'openvino' else find_spec(name, *a)))
    rc = tool.main([
        str(tmp_path / 'nope.py'), 'x.pth', '--output-file',
        str(tmp_path / 'x.xml')
    ])
    assert rc == 1
    assert capsys.readouterr().err.strip() == (
        'error: the OpenVINO export needs openvino: pip install openvino '
        '(or pip install "davit_ext[deploy]").')


def test_benchmark_runtime_rows(tmp_path, capsys):
    """The benchmark's ``--onnxruntime --openvino`` rows: ours (dynamic and
    static graphs) and timm's (static) exported the same way, each checked
    against the fp32 forward it came from; every ratio and the % of peak
    recomputed from the JSON."""
    pytest.importorskip('onnxruntime')
    pytest.importorskip('timm')
    spec = importlib.util.spec_from_file_location(
        'benchmark_tool',
        osp.join(REPO, 'tools', 'analysis_tools', 'benchmark.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        out = bench.main([
            '--arch', '{"embed_dims": 16, "depths": [1, 1, 1, 1], '
            '"num_heads": [1, 1, 2, 2]}', '--batch', '2', '--img-size', '56',
            '--threads', '1', '--iters', '2', '--warmup', '0', '--skip',
            'train', 'memory', '--peers', 'timm', '--no-official',
            '--num-classes', '10', '--onnxruntime', '--openvino',
            '--export-shapes', 'dynamic', 'static', '--runtime-models', 'ours',
            'timm', '--peak-size', '128', '--json',
            str(tmp_path / 'rt.json')
        ])
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / 'rt.json') as f:
        assert json.load(f)['results'].keys() == out['results'].keys()
    res = out['results']
    bf16 = 'BF16' in ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')
    precisions = ['fp32', 'bf16'] if bf16 else ['fp32']
    rows = {
        bench.runtime_name(m, rt, p, s)
        for m, shapes in (('ours', ('dynamic', 'static')), ('timm',
                                                            ('static', )))
        for rt in ('onnxruntime', 'openvino')
        for p in (precisions if rt == 'openvino' else ['fp32']) for s in shapes
    }
    assert rows <= set(res) and 'ours+openvino-static' in rows
    checks = {c['pair']: c for c in out['checks']}
    for name in rows:
        source = res[name]['source']
        check = checks[f'{name} vs {source} (fp32)']
        assert check['ok'] and check['logit_scale'] > 0.1, check
        bound = 1e-4 if res[name]['precision'] == 'fp32' else 5e-2
        assert check['atol'] == pytest.approx(bound *
                                              max(1., check['logit_scale']))
        assert res[name]['infer_img_s'] == pytest.approx(
            2 / statistics.median(res[name]['infer_s']), rel=1e-12)
        peak = out['meta']['gemm_peak'][res[name]['precision']]['gflops']
        assert res[name]['infer_pct_peak'] == pytest.approx(
            100 * out['meta']['flops_per_image'] * res[name]['infer_img_s'] /
            1e9 / peak,
            rel=1e-12)
        assert res[name]['infer_img_s_vs_eager'] == pytest.approx(
            res[name]['infer_img_s'] / res[source]['infer_img_s'], rel=1e-12)
    # ours' rows against timm's graph in the same runtime and precision (its
    # static graph: timm is exported static only by default)
    for name in rows:
        if res[name]['source'] != 'ours':
            continue
        other = bench.runtime_name('timm', res[name]['runtime'],
                                   res[name]['precision'], 'static')
        assert res[name]['vs_rows'] == {'timm': other}
        assert res[name]['infer_img_s_vs_timm'] == pytest.approx(
            res[name]['infer_img_s'] / res[other]['infer_img_s'], rel=1e-12)
        if res[name]['shapes'] == 'dynamic':
            static = name + '-static'
            assert res[name]['infer_img_s_vs_static'] == pytest.approx(
                res[name]['infer_img_s'] / res[static]['infer_img_s'],
                rel=1e-12)
    assert not any('_vs_' in k and k != 'infer_img_s_vs_eager'
                   for k in res['timm+openvino-static'])
    printed = capsys.readouterr().out
    assert 'ours+openvino: inference ' in printed
    assert 'x timm+openvino-static' in printed


def test_static_int8_tool(tmp_path):
    """tools/deployment/quantize_openvino.py on a small model and a small image
    folder whose labels are the fp32 model's own predictions (so fp32 top-1 is
    100 % by construction): the reported int8 top-1 is recomputed from the
    written int8 IR; a loss over --max-loss writes nothing."""
    pytest.importorskip('nncf')
    from PIL import Image
    spec = importlib.util.spec_from_file_location(
        'quantize_openvino_tool',
        osp.join(REPO, 'tools', 'deployment', 'quantize_openvino.py'))
    qtool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qtool)
    base = small_config(tmp_path, official=False)
    ckpt, model = random_checkpoint(base, tmp_path)
    mean, std = 127.5, 64.
    g = torch.Generator().manual_seed(3)
    data = tmp_path / 'data'
    (data / 'img').mkdir(parents=True)
    images = []
    for i in range(24):
        img = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8)
        Image.fromarray(img.numpy()).save(data / 'img' / f'{i}.png')
        images.append(img)
    # mmcv loads BGR; to_rgb=True turns it back into the saved RGB
    x = (torch.stack(images).permute(0, 3, 1, 2).float() - mean) / std
    with torch.no_grad():
        labels = model(x, mode='tensor').argmax(1).tolist()
    (data / 'ann.txt').write_text(''.join(f'{i}.png {y}\n'
                                          for i, y in enumerate(labels)))
    cfg = tmp_path / 'int8_cfg.py'
    loader = (f'dict(_delete_=True, batch_size=8, num_workers=0, dataset=dict('
              f"type='CustomDataset', data_root={str(data)!r}, "
              "ann_file='ann.txt', data_prefix='img', pipeline=[dict("
              "type='LoadImageFromFile'), dict(type='PackInputs')]), "
              "sampler=dict(type='DefaultSampler', shuffle=False))")
    cfg.write_text(f'_base_ = {base!r}\n'
                   f'data_preprocessor = dict(num_classes=10, mean=[{mean}] '
                   f'* 3, std=[{std}] * 3, to_rgb=True)\n'
                   f'train_dataloader = {loader}\n'
                   f'test_dataloader = {loader}\n')
    xml = tmp_path / 'int8.xml'
    rc = qtool.main([
        str(cfg), ckpt, '--output-file',
        str(xml), '--calib-size', '16', '--max-loss', '100', '--json',
        str(tmp_path / 'int8.json')
    ])
    assert rc == 0
    with open(tmp_path / 'int8.json') as f:
        report = json.load(f)
    assert report['top1']['pytorch_fp32'] == 100.
    assert report['top1']['openvino_fp32'] == 100.
    assert report['test_images'] == 24 and report['calib_images'] == 16
    assert report['fake_quantize_ops'] > 0
    int8 = tool.compile_model(str(xml), 'fp32', threads=1)
    got = int8({'input': x.numpy()})['logits'].argmax(1)
    assert report['top1']['openvino_int8'] == pytest.approx(100. * float(
        (got == np.array(labels)).mean()))
    assert report['int8_loss_points'] == pytest.approx(
        100. - report['top1']['openvino_int8'])
    # A loss over the limit: refused, nothing written
    xml2 = tmp_path / 'refused.xml'
    rc = qtool.main([
        str(cfg), ckpt, '--output-file',
        str(xml2), '--calib-size', '8', '--max-loss', '-1'
    ])
    assert rc == 1 and not xml2.exists()
    assert not (tmp_path / 'refused.bin').exists()


def _load_analysis_tool(name):
    spec = importlib.util.spec_from_file_location(
        name, osp.join(REPO, 'tools', 'analysis_tools', name + '.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _ThreeGemms(torch.nn.Module):
    """A conv, a linear and a matmul whose FLOPs are known by hand."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 24)

    def forward(self, x):
        x = self.conv(x).flatten(2).transpose(1, 2)  # (1, 256, 8)
        x = self.fc(x)  # (1, 256, 24)
        return torch.relu(x) @ x.transpose(1, 2)  # (1, 256, 256), K = 24


def test_runtime_profile_counts_gemm_flops(tmp_path):
    """--gemm's FLOPs per OpenVINO layer equal the count by hand, and the
    ceiling is their sum over their time."""
    profile = _load_analysis_tool('runtime_profile')
    path = str(tmp_path / 'three.onnx')
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore')
        torch.onnx.export(
            _ThreeGemms().eval(), (x, ), dynamo=True,
            opset_version=18).save(path)
    layers = profile.ov_layers(path, x.numpy(), 'f32', 1, 2)
    by_type = {}
    for layer in layers:
        if layer['flops']:
            by_type[layer['type']] = by_type.get(layer['type'],
                                                 0) + layer['flops']
    assert by_type == {
        'Convolution': 2 * 8 * 16 * 16 * 3 * 3 * 3,
        'FullyConnected': 2 * 256 * 24 * 8,
        'MatMul': 2 * 256 * 256 * 24,
    }
    summary = profile.gemm_summary(layers)
    assert summary['gemm_flops'] == sum(by_type.values())
    assert 0 < summary['gemm_ms'] <= summary['total_ms']
    assert summary['ceiling_gflops'] == pytest.approx(summary['gemm_flops'] /
                                                      summary['gemm_ms'] / 1e6)
    # Either orientation of a MatMul's first input gives the same K.
    assert profile.gemm_flops('MatMul', [[4, 5, 7], [4, 7, 6]], [4, 5, 6]) \
        == profile.gemm_flops('MatMul', [[4, 7, 5], [4, 7, 6]], [4, 5, 6]) \
        == 2 * 4 * 5 * 6 * 7
    assert profile.gemm_flops('GroupConvolution',
                              [[1, 8, 4, 4], [8, 1, 1, 3, 3]],
                              [1, 8, 4, 4]) == 0
