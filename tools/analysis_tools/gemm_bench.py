"""fp32 GEMM speed on this CPU: PyTorch's eager ``addmm`` against oneDNN's.

Our fast paths send their fp32 GEMMs to oneDNN
(``torch.ops.mkldnn._linear_pointwise``) where PyTorch's eager fp32 matmul
calls MKL/BLAS (see ``davit_ext/models/fast_paths.py``). Whether that pays
depends on the CPU: this tool times both on the linear layers of a DaViT
(forward, and the input and weight gradients of a training step, 2048 rows at
a time as our training paths run them) and prints GFLOP/s and the ratio, so
you can decide whether to keep it or set ``DAVIT_EXT_ONEDNN=0``.

Example::

    python tools/analysis_tools/gemm_bench.py --arch t --threads 2
"""
import argparse
import os.path as osp
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from benchmark import arch_settings, cpu_model_and_flags  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', default='t', help='t, s, b, or a JSON dict')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument(
        '--rows', type=int, default=2048, help='rows (tokens) per GEMM')
    p.add_argument('--iters', type=int, default=20)
    return p.parse_args(argv)


def seconds(fn: Callable, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    onednn = getattr(torch.ops.mkldnn, '_linear_pointwise', None) \
        if torch.backends.mkldnn.is_available() else None
    if onednn is None:
        raise SystemExit('error: this PyTorch has no oneDNN '
                         '(torch.backends.mkldnn.is_available() is False)')
    cpu, flags = cpu_model_and_flags()
    print(f"CPU: {cpu}; flags: {' '.join(flags)}; "
          f'{torch.get_num_threads()} threads; torch {torch.__version__}')
    arch = arch_settings(args.arch)
    rows, rows_out = args.rows, []
    print(f'{"layer (in -> out)":22s} {"GEMM":7s} {"addmm GF/s":>10s} '
          f'{"oneDNN GF/s":>11s} {"ratio":>6s}')
    for i in range(len(arch['depths'])):
        C = arch['embed_dims'] * 2**i
        for name, k, n in (('qkv', C, 3 * C), ('proj', C, C),
                           ('fc1', C, 4 * C), ('fc2', 4 * C, C)):
            x, w = torch.randn(rows, k), torch.randn(n, k)
            g = torch.randn(rows, n)
            cases = (
                ('forward', lambda: torch.mm(x, w.t()),
                 lambda: onednn(x, w, None, 'none', [], '')),
                ('grad_x', lambda: torch.mm(g, w),
                 lambda: onednn(g, w.t(), None, 'none', [], '')),
                # As fast_paths._weight_grad: the narrower operand is the
                # transposed input that oneDNN copies.
                ('grad_w', lambda: torch.mm(g.t(), x),
                 (lambda: onednn(x.t(), g.t(), None, 'none', [], '').t())
                 if n > k else
                 (lambda: onednn(g.t(), x.t(), None, 'none', [], ''))),
            )
            for kind, ref, new in cases:
                assert torch.allclose(ref(), new(), rtol=1e-4, atol=1e-3)
                flop = 2 * rows * k * n / 1e9
                a = flop / seconds(ref, args.iters)
                b = flop / seconds(new, args.iters)
                label = f'stage {i} {name} ({k}->{n})'
                print(f'{label:22s} {kind:7s} {a:10.0f} {b:11.0f} '
                      f'{b / a:6.2f}')
                rows_out.append(
                    dict(
                        stage=i,
                        layer=name,
                        gemm=kind,
                        addmm_gflops=a,
                        onednn_gflops=b))
    ratios = [r['onednn_gflops'] / r['addmm_gflops'] for r in rows_out]
    print(f'oneDNN / addmm: median {statistics.median(ratios):.2f}x, '
          f'range {min(ratios):.2f}-{max(ratios):.2f}x')
    return rows_out


if __name__ == '__main__':
    main()
