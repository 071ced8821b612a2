"""Smoke test of tools/analysis_tools/benchmark.py: it runs and writes JSON.

Not a speed test: a tiny custom arch, batch 2, three timed rounds. What it does
check for real is that the peers get the same weights (the tool's output checks
pass), that each figure the README quotes is there, and that every img/s and
ratio is recomputed exactly from the raw timings in the JSON (a swapped or
inverted ratio, a mean for a median, a wrong batch fails).
"""
import importlib.util
import json
import os.path as osp
import statistics

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = '{"embed_dims": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}'
BATCH, ITERS = 2, 3


def load_tool():
    path = osp.join(ROOT, 'tools', 'analysis_tools', 'benchmark.py')
    spec = importlib.util.spec_from_file_location('davit_benchmark', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def result(tmp_path_factory):
    pytest.importorskip('timm')
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    load_tool().main([
        '--arch', TINY, '--batch',
        str(BATCH), '--img-size', '112', '--iters',
        str(ITERS), '--warmup', '0', '--threads', '1', '--with-cp',
        '--fast-paths-off', 'norm_ffn_saving', '--profile', '5', '--json',
        str(out)
    ])
    with open(out) as f:
        return json.load(f)


def test_json_fields(result):
    assert set(result) >= {'meta', 'config', 'checks', 'notes', 'results'}
    assert result['meta']['torch'] and result['meta']['threads'] == 1
    res = result['results']
    assert {'ours', 'ours-official', 'timm', 'ours-cp'} <= set(res)
    for name in ('ours', 'ours-official', 'timm'):
        for key in ('infer_img_s', 'train_img_s', 'train_peak_mb',
                    'infer_peak_mb'):
            assert res[name][key] > 0, (name, key)
        assert len(res[name]['infer_s']) == ITERS
        assert len(res[name]['train_s']) == ITERS
    assert res['ours']['infer_img_s_vs_timm'] > 0
    assert res['ours-cp']['train_peak_mb'] > 0
    assert 'infer_img_s' not in res['ours-cp']
    assert 0 < res['ours-cp']['train_peak_vs_ours']


def test_throughput_and_ratios_follow_from_the_timings(result):
    res = result['results']
    assert result['config']['batch'] == BATCH
    for name in ('ours', 'ours-official', 'timm'):
        for key in ('infer', 'train'):
            times = res[name][f'{key}_s']
            assert res[name][f'{key}_img_s'] == pytest.approx(
                BATCH / statistics.median(times), rel=1e-12)
    peers = [p for p in ('mmpretrain', 'timm') if p in res]
    assert 'timm' in peers
    checked = 0
    for name in ('ours', 'ours-official'):
        for peer in peers:
            for metric in ('infer_img_s', 'train_img_s'):  # higher: better
                assert res[name][f'{metric}_vs_{peer}'] == pytest.approx(
                    res[name][metric] / res[peer][metric], rel=1e-12)
                checked += 1
            for metric in ('train_peak_mb', 'infer_peak_mb'):  # lower
                assert res[name][f'{metric}_vs_{peer}'] == pytest.approx(
                    res[peer][metric] / res[name][metric], rel=1e-12)
                checked += 1
    assert checked == 8 * len(peers)
    # ours-cp trains only: its ratios are about training
    assert res['ours-cp']['train_img_s_vs_timm'] == pytest.approx(
        res['ours-cp']['train_img_s'] / res['timm']['train_img_s'], rel=1e-12)
    assert res['ours-cp']['train_peak_vs_ours'] == pytest.approx(
        res['ours-cp']['train_peak_mb'] / res['ours']['train_peak_mb'],
        rel=1e-12)
    # peers get no ratios of their own
    assert not any('_vs_' in k for p in peers for k in res[p])


def test_profile_shares(result):
    prof = result['results']['ours']['infer_profile']
    shares = dict(prof['ops'])
    assert sum(shares.values()) == pytest.approx(1.0)
    # The linear layers run as addmm: part of the GEMM share.
    assert 0 < shares['aten::addmm'] <= prof['gemm_share'] < 1
    assert 'infer_profile' in result['results']['timm']
    assert 'infer_profile' not in result['results']['ours-cp']
    # The training step: its backward ran (conv backward), and the GEMM
    # share counts its matrix products.
    train = result['results']['ours']['train_profile']
    shares = dict(train['ops'])
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares['aten::convolution_backward'] > 0
    assert 'aten::convolution_backward' not in dict(prof['ops'])
    assert 0 < shares['aten::mm'] <= train['gemm_share'] < 1
    assert 'train_profile' in result['results']['timm']


def test_outputs_checked_before_timing(result):
    checks = {c['pair']: c for c in result['checks']}
    assert checks['ours-official vs timm']['ok']
    # Not zero either: the peer really ran on the same input.
    assert checks['ours-official vs timm']['logit_scale'] > 0
    # mmpretrain's DaViT refuses a 112x112 input (a 4x4 last map): the tool
    # leaves it out with a note instead of failing.
    if 'mmpretrain' not in result['results']:
        assert any(n.startswith('mmpretrain') for n in result['notes'])


def test_memory_figure_counts_activations(result):
    # Checkpointing keeps fewer activations: a lower training peak.
    res = result['results']
    assert res['ours-cp']['train_peak_mb'] < res['ours']['train_peak_mb']


def test_fast_paths_off_candidate(result):
    """ours-off is ours with the named fast paths off: same logits (checked
    before timing), and without the memory-saving FFN a higher training peak;
    the switch does not outlive the run."""
    from davit_ext.models import fast_paths
    checks = {c['pair']: c for c in result['checks']}
    assert checks['ours-off vs ours']['ok']
    assert checks['ours-off vs ours']['logit_scale'] > 0
    res = result['results']
    assert res['ours-off']['train_peak_mb'] > res['ours']['train_peak_mb']
    assert res['ours-off']['infer_img_s'] > 0
    assert 'ours-off: ours with fast paths off: norm_ffn_saving' in \
        result['notes']
    assert fast_paths.OFF == frozenset()


def test_bad_arch_is_a_clear_error():
    with pytest.raises(SystemExit, match='--arch'):
        load_tool().main(['--arch', 'nope'])


def test_gemm_bench_runs_and_checks_both_gemms(capsys):
    """tools/analysis_tools/gemm_bench.py: addmm and oneDNN agree on every
    GEMM of a linear's training step (the tool asserts it) and it reports
    each one's GFLOP/s."""
    import torch
    if not torch.backends.mkldnn.is_available():
        pytest.skip('this PyTorch has no oneDNN')
    path = osp.join(ROOT, 'tools', 'analysis_tools', 'gemm_bench.py')
    spec = importlib.util.spec_from_file_location('davit_gemm_bench', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(['--arch', TINY, '--rows', '64', '--iters', '1'])
    # 4 stages x 4 linears x (forward, grad_x, grad_w)
    assert len(rows) == 48
    assert {r['gemm'] for r in rows} == {'forward', 'grad_x', 'grad_w'}
    assert all(r['addmm_gflops'] > 0 and r['onednn_gflops'] > 0 for r in rows)
    assert 'oneDNN / addmm: median' in capsys.readouterr().out


def test_compiled_peers_are_compared_with_compiled_ours(
        tmp_path, monkeypatch, capsys):
    """``--compile-peers``: each peer is compiled as ours is (fullgraph, after
    the same checks), and ours+compile's ratios against the compiled peers
    follow from the timings; a peer that does not compile is left out with a
    note. ``torch.compile`` is replaced by a stand-in that records its calls
    (inductor would take minutes here): this tests the tool, not inductor.
    """
    pytest.importorskip('timm')
    import torch
    calls = []

    def stand_in(model, **kwargs):
        timm_model = type(model.model).__module__.startswith('timm')
        calls.append(('timm' if timm_model else 'mm', kwargs['fullgraph']))
        if timm_model:

            def broken(*args, **kwargs):
                raise RuntimeError('graph break (stand-in)')

            return broken
        return model

    monkeypatch.setattr(torch, 'compile', stand_in)
    out = tmp_path / 'compiled.json'
    result = load_tool().main([
        '--arch', TINY, '--batch',
        str(BATCH), '--iters',
        str(ITERS), '--warmup', '0', '--threads', '1', '--no-official',
        '--train-iters', '1', '--skip', 'memory', '--compile',
        '--compile-peers', '--json',
        str(out)
    ])
    # ours, then mmpretrain, then timm, all fullgraph
    assert calls == [('mm', True), ('mm', True), ('timm', True)]
    res = result['results']
    assert 'mmpretrain+compile' in res and 'timm+compile' not in res
    assert ('timm+compile: compiling (fullgraph=True) or its first call '
            'failed (RuntimeError: graph break (stand-in)), left out'
            ) in result['notes']
    checks = {c['pair']: c for c in result['checks']}
    assert checks['mmpretrain+compile vs mmpretrain']['ok']
    ours = res['ours+compile']
    assert ours['infer_img_s_vs_mmpretrain+compile'] == pytest.approx(
        ours['infer_img_s'] / res['mmpretrain+compile']['infer_img_s'],
        rel=1e-12)
    assert 'infer_img_s_vs_timm+compile' not in ours
    # inference only: the training step is timed for the eager candidates
    assert 'train_img_s' in res['mmpretrain']
    assert 'train_img_s' not in res['mmpretrain+compile']
    assert 'train_img_s' not in ours
    printed = capsys.readouterr().out
    assert 'ours+compile vs the compiled peers (ratios > 1: ours better): ' \
        'inference ' in printed
    with pytest.raises(SystemExit, match='--compile-peers needs --compile'):
        load_tool().main(['--arch', TINY, '--compile-peers'])
    with pytest.raises(SystemExit, match='without --compile-train'):
        load_tool().main([
            '--arch', TINY, '--compile', '--compile-train', '--compile-peers'
        ])
    import torch._inductor.config as inductor_config
    assert not inductor_config.freezing  # not left on by the failed compile
