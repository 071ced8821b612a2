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

Times come from one process on a possibly shared machine: read shares and
counts, and compare milliseconds only within one run.
"""
import argparse
import collections
import json
import os
import tempfile
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('files', nargs='+', help='ONNX files')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--shape', type=int, nargs=2, default=[224, 224])
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--runs', type=int, default=4)
    p.add_argument('--top', type=int, default=14, help='rows per table')
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


if __name__ == '__main__':
    main()
