"""Smoke test of tools/analysis_tools/benchmark.py: it runs and writes JSON.

Not a speed test: a tiny custom arch, batch 2, three timed rounds. What it does
check for real is that the peers get the same weights (the tool's output checks
pass), that each figure the README quotes is there, and that every img/s and
ratio is recomputed exactly from the raw timings in the JSON (a swapped or
inverted ratio, a mean for a median, a wrong batch fails).
"""
import importlib.util
import json
import math
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
        '--fast-paths-off', 'norm_ffn_saving', '--profile', '5', '--peak-size',
        '128', '--json',
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


def davit_flops(embed, depths, heads, H, W, classes, window=7):
    """FLOPs (2 x multiply-adds of convolutions and matrix products) of the
    DaViT classifier on one H x W image, counted by hand: the oracle of the
    tool's count.

    Window attention runs on maps padded to whole windows.
    """
    h, w = math.ceil(H / 4), math.ceil(W / 4)
    total = 2 * h * w * embed * 3 * 49  # 7x7 stem conv
    C = embed
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        N = h * w
        Np = math.ceil(h / window) * math.ceil(w / window) * window**2
        per_block = (
            4 * 2 * N * C * 9  # four depthwise 3x3 position encodings
            + 2 * Np * C * 4 * C + 4 * Np * window**2 * C  # window attention
            + 2 * N * C * 4 * C + 4 * N * C * (C // nh)  # channel attention
            + 2 * 16 * N * C * C)  # two FFNs (C -> 4C -> C)
        total += depth * per_block
        if i < len(depths) - 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            total += 2 * h * w * 2 * C * C * 4  # 2x2 stride-2 conv
            C *= 2
    return total + 2 * C * classes  # head


def test_flop_count_against_a_count_by_hand(result):
    arch = json.loads(TINY)
    assert result['meta']['flops_per_image'] == davit_flops(
        arch['embed_dims'], arch['depths'], arch['num_heads'], 112, 112, 1000)
    # DaViT-T at 224: the 4.5 G multiply-adds of the paper
    assert davit_flops(96, [1, 1, 3, 1], [3, 6, 12, 24], 224, 224,
                       1000) == pytest.approx(
                           2 * 4.52e9, rel=0.01)


def test_peak_and_gflops_columns_follow_from_the_json(result):
    """GFLOP/s = FLOPs per image x img/s; % peak = GFLOP/s over the measured
    GEMM peak of the row's precision (the faster of the timed kernels)."""
    flops = result['meta']['flops_per_image']
    peaks = result['meta']['gemm_peak']
    assert set(peaks) == {'fp32'}
    peak = peaks['fp32']
    assert peak['size'] == 128 and peak['gflops'] == max(
        peak['kernels'].values()) > 0
    assert peak['kernel'] in peak['kernels']
    checked = 0
    for name, res in result['results'].items():
        if 'infer_img_s' not in res:
            assert 'infer_gflops' not in res  # ours-cp: training only
            continue
        assert res['precision'] == 'fp32'
        assert res['infer_gflops'] == pytest.approx(
            flops * res['infer_img_s'] / 1e9, rel=1e-12)
        assert res['infer_pct_peak'] == pytest.approx(
            100 * res['infer_gflops'] / peak['gflops'], rel=1e-12)
        checked += 1
    assert checked == 4  # ours, ours-official, timm, ours-off


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


def test_size_sweep(tmp_path):
    """``--sizes``: per size the tokens, FLOPs (the count by hand), img/s from
    the timings, tokens/s and peak memory of each candidate; a peer that
    refuses a size is left out there with a note; JSON and PNG written."""
    pytest.importorskip('timm')
    out = tmp_path / 'sweep.json'
    result = load_tool().main([
        '--arch', TINY, '--sizes', '56', '48x80', '--iters', '2', '--warmup',
        '0', '--threads', '1', '--no-official', '--json',
        str(out)
    ])
    with open(out) as f:
        assert json.load(f)['sweep'] == result['sweep']
    arch = json.loads(TINY)
    (square, wide) = result['sweep']
    assert square['size'] == [56, 56] and wide['size'] == [48, 80]
    assert square['tokens'] == 14 * 14 and wide['tokens'] == 12 * 20
    for point in result['sweep']:
        h, w = point['size']
        assert point['flops_per_image'] == davit_flops(arch['embed_dims'],
                                                       arch['depths'],
                                                       arch['num_heads'], h, w,
                                                       1000)
        assert set(point['results']) == {'ours', 'timm'}
        for res in point['results'].values():
            img_s = 1 / statistics.median(res['infer_s'])  # batch 1
            assert res['infer_img_s'] == pytest.approx(img_s, rel=1e-12)
            assert res['tokens_s'] == pytest.approx(
                img_s * point['tokens'], rel=1e-12)
            assert res['infer_peak_mb'] > 0
    # activations grow with the map
    assert wide['results']['ours']['infer_peak_mb'] > \
        square['results']['ours']['infer_peak_mb']
    assert any(
        n.startswith('mmpretrain at 56x56: cannot run')
        for n in result['notes'])
    png = tmp_path / 'sweep.png'
    if importlib.util.find_spec('matplotlib'):
        assert result['plot'] == str(png)
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with pytest.raises(SystemExit, match='--sizes: expected S or HxW'):
        load_tool().main(['--arch', TINY, '--sizes', '0x5'])


@pytest.mark.parametrize('n', [1, 2, 3, 4, 5, 6, 7])
def test_round_orders_balance_first_and_predecessor(n):
    """One cycle of orders balances first place and predecessors.

    Every candidate runs once per round, first equally often, and right after
    each other candidate equally often (plain rotation gives n - 1 rounds of n
    with the same predecessor).
    """
    import collections
    orders = load_tool().round_orders(n)
    assert len(orders) == (n if n % 2 == 0 else 2 * n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    first = collections.Counter(order[0] for order in orders)
    assert set(first) == set(range(n))
    assert len(set(first.values())) == 1
    after = collections.Counter(
        (a, b) for order in orders for a, b in zip(order, order[1:]))
    assert set(after) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(after.values())) <= 1


def test_time_interleaved_runs_the_balanced_orders():
    """The timed rounds follow round_orders from its first order."""
    import torch
    tool = load_tool()
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in 'abc'}
    times = tool.time_interleaved(fns, 6, 2, torch.device('cpu'))
    assert {k: len(v) for k, v in times.items()} == {'a': 6, 'b': 6, 'c': 6}
    timed = calls[2 * 3:]
    expected = ['abc'[i] for order in tool.round_orders(3) for i in order]
    assert timed == expected
