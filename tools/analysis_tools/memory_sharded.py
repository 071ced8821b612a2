"""Memory per process of one training step, unsharded vs FSDP, on CPUs.

    python tools/analysis_tools/memory_sharded.py [--arch huge-fl]
        [--procs 2] [--size 64] [--batch 2] [--wrap block]

Runs the model of the arch's Florence-2 fine-tuning config
(configs/davit/davit-{arch}_florence2-pre_8xb16_in1k-768px.py, random
weights: nothing is downloaded) for one training step with AdamW (forward,
cross-entropy, backward, optimizer step) at a small input, first as one plain
process, then as ``--procs`` processes (gloo) with FSDP as
``davit_ext.FSDPStrategy`` wraps it (one unit per DaViT block, full
sharding, fp32). For each process it prints:

- ``state``: bytes of the parameters, gradients and AdamW state this process
  holds after the step (its shards under FSDP);
- ``RSS before``: the resident memory before the step, the model built
  and wrapped (what was freed handed back with ``malloc_trim``): libraries,
  model, shards;
- ``step peak``: the peak resident memory (RSS) during the step (``VmHWM``
  reset through ``/proc/self/clear_refs``);
- ``peak``: the peak RSS of the whole process (``ru_maxrss``), model
  building included: every process builds the whole model before FSDP
  shards it, as mmengine's strategies do.

Activations are small at ``--size 64``: at 768 px they add to every row (and
with_cp, the huge-fl config's gradient checkpointing, cuts them). The
processes run one after the other; ``--procs`` processes run together.
"""
import argparse
import json
import os
import os.path as osp
import socket
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = 'configs/davit/davit-{arch}_florence2-pre_8xb16_in1k-768px.py'
GIB = 1024**3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--arch', default='huge-fl', choices=['base-fl', 'huge-fl'])
    parser.add_argument(
        '--procs', type=int, default=2, help='FSDP processes (default 2)')
    parser.add_argument(
        '--size',
        type=int,
        default=64,
        help='input side in pixels (default 64)')
    parser.add_argument(
        '--batch', type=int, default=2, help='images per process (default 2)')
    parser.add_argument('--wrap', default='block', choices=['block', 'stage'])
    parser.add_argument(
        '--worker', choices=['plain', 'fsdp'], help=argparse.SUPPRESS)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _status_kib(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak():
    """Make VmHWM the current RSS (Linux >= 4.0)."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(args):
    import ctypes
    import resource
    from functools import partial

    import torch
    import torch.nn.functional as F
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    import davit_ext  # noqa: F401
    from davit_ext.engine.fsdp import davit_wrap_policy
    from davit_ext.registry import MODELS

    torch.set_num_threads(1)
    fsdp = args.worker == 'fsdp'
    if fsdp:
        import torch.distributed as dist
        dist.init_process_group('gloo')
    cfg = Config.fromfile(osp.join(ROOT, CONFIG.format(arch=args.arch)))
    cfg.model.backbone.pop('init_cfg', None)  # random weights
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('davit_ext'):
        model = MODELS.build(cfg.model)
    model.train()
    if fsdp:
        from mmengine.model import MMFullyShardedDataParallel
        model = MMFullyShardedDataParallel(
            model,
            auto_wrap_policy=partial(davit_wrap_policy, wrap=args.wrap),
            device_id='cpu',
            use_orig_params=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size)
    label = torch.arange(args.batch) % cfg.model.head.num_classes
    # Hand what building and wrapping freed back to the system (glibc keeps
    # it otherwise), so that the RSS below counts what the step needs.
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    _reset_peak()
    before = _status_kib('VmRSS') * 1024
    logits = model(x, mode='tensor')
    F.cross_entropy(logits, label).backward()
    optimizer.step()
    params = [p for p in model.parameters()]
    state = [
        v for s in optimizer.state.values() for v in s.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    ]
    row = dict(
        params=_bytes(params),
        grads=_bytes(p.grad for p in params if p.grad is not None),
        adam=_bytes(state),
        before=before,
        step_peak=_status_kib('VmHWM') * 1024,
        peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        numel=sum(p.numel() for p in params))
    rows = [row]
    if fsdp:
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
        if int(os.environ['RANK']) != 0:
            return
    with open(args.out, 'w') as f:
        json.dump(rows, f)


def _free_port():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _run(args, mode, out):
    script = osp.abspath(__file__)
    common = [
        '--arch', args.arch, '--size',
        str(args.size), '--batch',
        str(args.batch), '--wrap', args.wrap, '--worker', mode, '--out', out
    ]
    if mode == 'plain':
        cmd = [sys.executable, script] + common
    else:
        cmd = [
            sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node',
            str(args.procs), '--master_port',
            str(_free_port()), script
        ] + common
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        return json.load(f)


def _cpu():
    name, flags = '?', []
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name') and name == '?':
                name = line.split(':', 1)[1].strip()
            elif line.startswith('flags') and not flags:
                flags = line.split(':', 1)[1].split()
    simd = [f for f in flags if f.startswith(('avx', 'amx'))]
    return f'{name}, {os.cpu_count()} cores ({" ".join(simd)})'


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import tempfile

    import torch
    print(f'arch {args.arch}, input {args.batch}x3x{args.size}x{args.size} '
          f'per process, one AdamW step, fp32; torch {torch.__version__}; '
          f'CPU: {_cpu()}')
    with tempfile.TemporaryDirectory() as tmp:
        plain = _run(args, 'plain', osp.join(tmp, 'plain.json'))
        sharded = _run(args, 'fsdp', osp.join(tmp, 'fsdp.json'))
    print(f'{plain[0]["numel"] / 1e6:.1f} M parameters')
    print('| run | process | params | grads | AdamW state | params+grads+'
          'AdamW | RSS before | step peak RSS | peak RSS |')
    print('|---|---|---|---|---|---|---|---|---|')
    for name, rows in (('1 process, unsharded', plain),
                       (f'FSDP, {args.procs} processes (per {args.wrap})',
                        sharded)):
        for rank, r in enumerate(rows):
            total = r['params'] + r['grads'] + r['adam']
            print(f'| {name} | {rank} | {r["params"] / GIB:.2f} GiB | '
                  f'{r["grads"] / GIB:.2f} GiB | {r["adam"] / GIB:.2f} GiB | '
                  f'{total / GIB:.2f} GiB ({total} B) | '
                  f'{r["before"] / GIB:.2f} GiB | '
                  f'{r["step_peak"] / GIB:.2f} GiB | '
                  f'{r["peak"] / GIB:.2f} GiB ({r["peak"]} B) |')


if __name__ == '__main__':
    main()
