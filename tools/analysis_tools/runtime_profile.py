"""What ONNX Runtime and OpenVINO make of exported graphs, side by side.

    python tools/analysis_tools/runtime_profile.py A.onnx B.onnx ... \\
        [--batch 1] [--shape 224 224] [--threads 2] [--runs 4]

For each file (e.g. ours and timm's graph of the same weights, written by
``tools/deployment/pytorch2onnx.py`` or the benchmark's ``--onnxruntime``
export):

- the ONNX graph's node count and op types (Transpose, MatMul, ...);
- ONNX Runtime: the node types of its optimized graph (what it fused:
  Gemm from MatMul + Add, FusedMatMul, LayerNormalization, ...) and each op
  type's share of the kernel time (session profiling, ``--runs`` runs);
- OpenVINO (CPU, f32 and bf16): the executed layers of its runtime model by
  type and kernel (``Subgraph``: its fused element-wise/attention snippets;
  ``Reorder``: layout conversions; ``MVN``: a fused LayerNorm), with counts
  and milliseconds per inference (perf counters averaged over ``--runs``).

``--gemm`` adds, per OpenVINO precision, the distance to the machine's
limit: each executed GEMM layer (``FullyConnected``, ``MatMul``,
``Convolution``; depthwise ``GroupConvolution`` is not one) with its FLOPs
(from the runtime model's shapes) and GFLOP/s, grouped by shape, next to the
large-GEMM peak of ``tools/analysis_tools/benchmark.py`` (``--peak-size``).
The line ``GEMM ceiling`` is the GEMM layers' FLOPs over their time: what the
model would reach if every other layer took no time, so a target above it
needs faster GEMM kernels, not a different graph.

Times come from one process on a possibly shared machine: read shares and
counts, and compare milliseconds only within one run.
"""
import argparse
import collections
import json
import math
import os
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

# OpenVINO CPU layer types that are matrix products (FLOPs counted).
GEMM_LAYERS = ('FullyConnected', 'MatMul', 'Convolution')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('files', nargs='+', help='ONNX files')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--shape', type=int, nargs=2, default=[224, 224])
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--runs', type=int, default=4)
    p.add_argument('--top', type=int, default=14, help='rows per table')
    p.add_argument(
        '--gemm',
        action='store_true',
        help='OpenVINO: GEMM layers by shape, their GFLOP/s against the '
        'large-GEMM peak, and the GEMM ceiling')
    p.add_argument(
        '--peak-size',
        type=int,
        default=2048,
        help='with --gemm: side of the GEMM timed for the peak (0: none)')
    return p.parse_args(argv)


def onnx_ops(path: str) -> collections.Counter:
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)


def ort_profile(path: str, x, threads: int, runs: int):
    """(op types of the optimized graph, kernel-time share per op type)."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = os.path.join(tmp, 'opt.onnx')
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, 'prof')
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        session = ort.InferenceSession(
            path, opts, providers=['CPUExecutionProvider'])
        fused = onnx_ops(opts.optimized_model_filepath)
        for _ in range(runs):
            session.run(None, {session.get_inputs()[0].name: x})
        with open(session.end_profiling()) as f:
            events = json.load(f)
    times = collections.Counter()
    for e in events:
        if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time'):
            times[e['args']['op_name']] += e['dur']
    total = sum(times.values()) or 1
    return fused, {k: v / total for k, v in times.items()}


def ov_profile(path: str, x, precision: str, threads: int, runs: int):
    """{(layer type, kernel): [count, ms per inference]} of OpenVINO's CPU
    plugin."""
    import openvino as ov
    compiled = ov.Core().compile_model(
        path, 'CPU', {
            'INFERENCE_PRECISION_HINT': precision,
            'PERF_COUNT': 'YES',
            'INFERENCE_NUM_THREADS': str(threads),
            'NUM_STREAMS': '1'
        })
    request = compiled.create_infer_request()
    request.infer({0: x})
    layers = collections.defaultdict(lambda: [0, 0.])
    for _ in range(runs):
        request.infer({0: x})
        for p in request.profiling_info:
            if p.status == p.Status.EXECUTED:
                entry = layers[(p.node_type, p.exec_type)]
                entry[0] += 1
                entry[1] += p.real_time.total_seconds() * 1e3
    return {k: (n // runs, ms / runs) for k, (n, ms) in layers.items()}


def gemm_flops(layer_type: str, inputs: Sequence[Sequence[int]],
               output: Sequence[int]) -> int:
    """2 x multiply-adds of one OpenVINO CPU layer that is a matrix product (0
    for other layer types).

    ``FullyConnected``: input (..., K), output (..., N). ``MatMul``: output
    (..., M, N); K is what is left of the first input once its batch dims
    and M are divided out (either orientation). ``Convolution``: weights
    (C_out, C_in, kh, kw), each output element C_in * kh * kw products.
    """
    if layer_type not in GEMM_LAYERS:
        return 0
    out = math.prod(output)
    if layer_type == 'FullyConnected':
        return 2 * out * inputs[0][-1]
    if layer_type == 'MatMul':
        a = inputs[0]
        return 2 * out * math.prod(a) // (math.prod(a[:-2]) * output[-2])
    return 2 * out * math.prod(inputs[1][1:])


def ov_layers(path: str, x, precision: str, threads: int,
              runs: int) -> List[Dict]:
    """Executed layers of OpenVINO's CPU plugin: name, type, kernel,
    milliseconds per inference (mean of ``runs``) and GEMM FLOPs."""
    import openvino as ov
    core = ov.Core()
    model = core.read_model(path)
    model.reshape(list(x.shape))
    compiled = core.compile_model(
        model, 'CPU', {
            'INFERENCE_PRECISION_HINT': precision,
            'PERF_COUNT': 'YES',
            'INFERENCE_NUM_THREADS': str(threads),
            'NUM_STREAMS': '1'
        })
    shapes = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        # None for a shape left dynamic (none should be after the reshape).
        ins = [
            list(op.input(i).get_partial_shape().to_shape())
            if op.input(i).get_partial_shape().is_static else None
            for i in range(op.get_input_size())
        ]
        out = op.output(0).get_partial_shape() \
            if op.get_output_size() else None
        shapes[op.get_friendly_name()] = (ins, list(
            out.to_shape()) if out is not None and out.is_static else None)
    request = compiled.create_infer_request()
    request.infer({0: x})
    layers = {}
    for _ in range(runs):
        request.infer({0: x})
        for p in request.profiling_info:
            if p.status != p.Status.EXECUTED:
                continue
            layer = layers.setdefault(
                p.node_name,
                dict(
                    name=p.node_name,
                    type=p.node_type,
                    kernel=p.exec_type,
                    ms=0.))
            layer['ms'] += p.real_time.total_seconds() * 1e3 / runs
    for layer in layers.values():
        ins, out = shapes.get(layer['name'], ([], None))
        known = out is not None and len(ins) >= 2 and None not in ins[:2]
        layer['flops'] = gemm_flops(layer['type'], ins, out) if known else 0
        layer['shape'] = _gemm_shape(layer['type'], ins, out)
    return list(layers.values())


def _gemm_shape(layer_type: str, ins, out) -> str:
    if layer_type not in GEMM_LAYERS or out is None or len(ins) < 2 or \
            None in ins[:2]:
        return ''
    if layer_type == 'FullyConnected':
        return f'M={math.prod(out[:-1])} K={ins[0][-1]} N={out[-1]}'
    if layer_type == 'MatMul':
        return f'{tuple(ins[0])} x {tuple(ins[1])}'
    return f'{tuple(ins[1])} -> {tuple(out[1:])}'


def gemm_summary(layers: List[Dict]) -> Dict:
    """Total and GEMM milliseconds, GEMM FLOPs and the GEMM ceiling (GFLOP/s of
    the GEMM layers alone)."""
    total = sum(layer['ms'] for layer in layers)
    gemm = [layer for layer in layers if layer['flops']]
    ms = sum(layer['ms'] for layer in gemm)
    flops = sum(layer['flops'] for layer in gemm)
    return dict(
        total_ms=total,
        gemm_ms=ms,
        gemm_flops=flops,
        ceiling_gflops=flops / ms / 1e6 if ms else 0.)


def peaks(size: int) -> Dict[str, float]:
    """The benchmark's large-GEMM peak (GFLOP/s) per OpenVINO precision."""
    if not size:
        return {}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from benchmark import gemm_peak
    out = {}
    for precision, name in (('f32', 'fp32'), ('bf16', 'bf16')):
        got = gemm_peak(name, size, torch.device('cpu'))
        if got:
            out[precision] = got['gflops']
    return out


def gemm_report(names: List[str], files: List[str], x, args) -> None:
    """``--gemm``: per precision, each file's GEMM layers by shape and its
    ceiling against the peak."""
    import openvino as ov
    precisions = ['f32']
    if 'BF16' in ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'):
        precisions.append('bf16')
    limit = peaks(args.peak_size)
    for precision in precisions:
        peak = limit.get(precision)
        print()
        print(f'OpenVINO {precision} GEMM layers' +
              (f' (peak {peak:.0f} GFLOP/s, {args.peak_size}^3 GEMM)'
               if peak else ''))
        for name, path in zip(names, files):
            layers = ov_layers(path, x, precision, args.threads, args.runs)
            s = gemm_summary(layers)
            pct = (f' = {100 * s["ceiling_gflops"] / peak:.1f} % of peak'
                   if peak else '')
            print(f'{name}: {s["total_ms"]:.2f} ms, GEMM layers '
                  f'{s["gemm_ms"]:.2f} ms ({s["gemm_ms"] / s["total_ms"]:.0%}'
                  f'), {s["gemm_flops"] / 1e9:.2f} GFLOP; GEMM ceiling '
                  f'{s["ceiling_gflops"]:.0f} GFLOP/s{pct}')
            groups = collections.defaultdict(lambda: [0, 0., 0])
            for layer in layers:
                if layer['flops']:
                    g = groups[(layer['type'], layer['kernel'],
                                layer['shape'])]
                    g[0] += 1
                    g[1] += layer['ms']
                    g[2] += layer['flops']
            rows = [[
                f'{t} {shape}', kernel, n, f'{ms:.2f}',
                f'{fl / ms / 1e6:.0f}' if ms else '-',
                f'{100 * fl / ms / 1e6 / peak:.0f} %' if peak and ms else '-'
            ] for (t, kernel, shape), (n, ms, fl) in sorted(
                groups.items(), key=lambda kv: -kv[1][1])[:args.top]]
            print(
                table('  layer, shape',
                      ['kernel', 'count', 'ms', 'GFLOP/s', '% peak'], rows))


def table(title: str, columns: List[str], rows: List[List[str]]) -> str:
    header = [title] + columns
    widths = [
        max(len(str(r[i])) for r in [header] + rows)
        for i in range(len(header))
    ]
    lines = [' | '.join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append('-+-'.join('-' * w for w in widths))
    lines += [
        ' | '.join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows
    ]
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    import numpy as np
    x = np.random.default_rng(0).standard_normal(
        (args.batch, 3, *args.shape)).astype(np.float32)
    names = [os.path.basename(f) for f in args.files]
    graphs = [onnx_ops(f) for f in args.files]
    ops = sorted(
        set().union(*graphs), key=lambda k: -max(g[k] for g in graphs))
    print(f'input {args.batch}x3x{args.shape[0]}x{args.shape[1]}, '
          f'{args.threads} threads')
    print(
        table('ONNX graph', names,
              [['nodes'] + [sum(g.values())
                            for g in graphs]] + [[k] + [g[k] for g in graphs]
                                                 for k in ops[:args.top]]))
    ort = [ort_profile(f, x, args.threads, args.runs) for f in args.files]
    fused_ops = sorted(
        set().union(*[f for f, _ in ort]),
        key=lambda k: -max(f[k] for f, _ in ort))
    print()
    print(
        table('ORT optimized graph', names,
              [['nodes'] + [sum(f.values()) for f, _ in ort]] +
              [[k] + [f[k] for f, _ in ort] for k in fused_ops[:args.top]]))
    shares = sorted(
        set().union(*[s for _, s in ort]),
        key=lambda k: -max(s.get(k, 0) for _, s in ort))
    print()
    print(
        table('ORT kernel time share', names,
              [[k] + [f'{s.get(k, 0):.1%}' for _, s in ort]
               for k in shares[:args.top]]))
    for precision in ('f32', 'bf16'):
        prof = [
            ov_profile(f, x, precision, args.threads, args.runs)
            for f in args.files
        ]
        keys = sorted(
            set().union(*prof),
            key=lambda k: -max(p.get(k, (0, 0))[1] for p in prof))
        rows = [[f'{k[0]} ({k[1]})'] + [
            f'{p.get(k, (0, 0))[0]} / {p.get(k, (0, 0))[1]:.2f} ms'
            for p in prof
        ] for k in keys[:args.top]]
        rows.append(['total'] + [
            f'{sum(n for n, _ in p.values())} / '
            f'{sum(ms for _, ms in p.values()):.2f} ms' for p in prof
        ])
        print()
        print(table(f'OpenVINO {precision}: layers / time', names, rows))
    if args.gemm:
        gemm_report(names, args.files, x, args)


if __name__ == '__main__':
    main()
