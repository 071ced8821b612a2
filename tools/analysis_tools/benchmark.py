"""Benchmark our DaViT against mmpretrain's and timm's with the same weights.

Candidates (one classifier each, 1000 classes unless ``--num-classes``):

- ``ours``          our backbone, mmpretrain forward (``ImageClassifier`` with
                    the GAP neck and ``LinearClsHead``)
- ``ours-official`` our backbone, ``official=True`` (the original/timm forward)
- ``mmpretrain``    mmpretrain's ``DaViT`` in the same ``ImageClassifier``
- ``timm``          timm's ``DaVit``
- ``ours+compile``  ``ours`` under ``torch.compile(fullgraph=True)``
                    (``--compile``, inference only; with ``--compile-train``
                    also the training step)
- ``mmpretrain+compile``, ``timm+compile``  the peers compiled the same way
                    (``--compile-peers``, with ``--compile``; inference
                    only): compiled ours is compared with compiled peers,
                    not with eager ones
- ``ours-cp``       ``ours`` with ``with_cp=True`` (``--with-cp``, training
                    step and memory only)
- ``ours-off``      ``ours`` with the fast paths named by ``--fast-paths-off``
                    switched off (``davit_ext.models.fast_paths.turned_off``):
                    an A/B of those paths on your CPU, in the same run
- ``<model>+onnxruntime``, ``<model>+openvino``, ``<model>+openvino-bf16``
                    (``--onnxruntime`` / ``--openvino``; ``--onnx`` is
                    ``--onnxruntime``): each of ``--runtime-models`` (ours
                    and the peers) exported the same way by
                    ``tools/deployment/pytorch2onnx.py`` (dynamic N, H, W;
                    ``-static`` rows: fixed at the run's input, see
                    ``--export-shapes``; the peers static by default) and
                    run on the CPU by onnxruntime (fp32) or, read by
                    ``openvino.Core.read_model``, by OpenVINO (fp32, and bf16
                    where the CPU has it) with ``--threads`` threads
                    (inference only). Each is checked against the fp32
                    logits of the model it came from (1e-4, bf16 5e-2, times
                    the logits' scale where above 1), and ours' rows are
                    compared with the peer's graph in the same runtime and
                    precision (its static one where it has no dynamic one).

The machine's limit: once per run and precision the tool times one large
GEMM (``--peak-size``, 2048^3 by default) with ``torch.mm`` and oneDNN's
linear and keeps the faster as the peak; every inference row then gets
``GFLOP/s`` (the model's FLOPs per image, counted once by
``torch.utils.flop_counter``, times img/s) and ``% peak`` (that over the
peak of the row's precision).

``--sizes 224 384 512 768 1024 600x1000`` runs a size sweep instead:
inference img/s, tokens/s and peak memory of the eager candidates at each
size (batch ``--sweep-batch``), a JSON and a PNG plot.

Every candidate gets the weights of ``ours`` (renamed to timm's layout for
timm), with random LayerNorm affines and biases so that a tensor landing in
the wrong place shows. Before any timing the logits are compared: ``ours`` vs
``mmpretrain``, ``ours-official`` vs ``timm``, ``ours+compile`` and
``ours-off`` vs ``ours``, each compiled peer vs the peer.
A disagreement stops the run (``--no-check`` skips the comparison). A peer
that is not installed, or that refuses the input size (mmpretrain raises on
maps that do not fit its windows), is left out with a note.

Timing is interleaved (every candidate once per round, in a balanced order:
see ``round_orders``) after ``--warmup`` rounds, so that a drift of the
machine's speed hits every candidate alike; the table reports
medians and ratios of ours to each peer. Measured:

- inference: ``model.eval()`` under ``torch.inference_mode()``, img/s;
- training step: forward + cross-entropy + backward + ``AdamW.step()``, img/s;
- peak memory of one training step (and of one inference forward), measured
  in a separate, untimed pass:

  - CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated
    before the step;
  - CPU: the highest sum of live bytes that PyTorch's CPU allocator handed
    out during the step, above what was live when it started, from the
    allocation/free events of ``torch.profiler`` (``profile_memory=True``).
    It is the CPU counterpart of ``max_memory_allocated``: activations kept
    for backward, gradients and temporaries; parameters and AdamW state
    existing before the step are not counted. Memory outside that allocator
    (oneDNN scratch, Python objects) is not counted either. Unlike the
    process's max RSS, it does not depend on what ran before in the process.

Every run prints the CPU model and the flags that decide its fp32/bf16
speed (``avx512_bf16``, ``amx_bf16``, ...) and says plainly when a
``--dtype bf16`` run is on a CPU without bf16 instructions (autocast is then
emulated and slow). ``--train-batch`` sets the batch of the training step and
its memory apart from the inference batch.

``--profile N`` (CPU) then profiles each eager candidate's inference and
training step with ``torch.profiler`` and prints the share of self CPU time
spent in matrix products (``GEMM_OPS``) and its top N ops: what explains the
ratios.

Example (the README's Performance table)::

    python tools/analysis_tools/benchmark.py --arch t --batch 8 --threads 2 \
        --compile --with-cp --profile 8 --json work_dirs/benchmark_tiny.json

This is a tool, not a test: timings on a shared machine are noisy, only
ratios from one interleaved run mean anything.
"""
import argparse
import atexit
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ARCHS = {
    't': dict(embed_dims=96, depths=[1, 1, 3, 1], num_heads=[3, 6, 12, 24]),
    's': dict(embed_dims=96, depths=[1, 1, 9, 1], num_heads=[3, 6, 12, 24]),
    'b': dict(embed_dims=128, depths=[1, 1, 9, 1], num_heads=[4, 8, 16, 32]),
}
ARCHS.update(tiny=ARCHS['t'], small=ARCHS['s'], base=ARCHS['b'])
DTYPES = dict(fp32=None, bf16=torch.bfloat16, fp16=torch.float16)
# Candidates compared with each other before timing: (ours, reference).
CHECK_PAIRS = [('ours', 'mmpretrain'), ('ours-official', 'timm'),
               ('ours+compile', 'ours'), ('ours-off', 'ours'),
               ('mmpretrain+compile', 'mmpretrain'), ('timm+compile', 'timm')]
COMPILED = '+compile'  # suffix of the compiled candidates
OFF_NAME = 'ours-off'

PEERS = ('mmpretrain', 'timm')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        '--arch',
        default='t',
        help='t/s/b (tiny/small/base) or a JSON dict with embed_dims, '
        'depths, num_heads')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument(
        '--train-batch',
        type=int,
        default=None,
        help='batch of the training step and its memory (default: --batch)')
    p.add_argument(
        '--img-size',
        type=int,
        nargs='+',
        default=[224],
        help='H [W] of the input (default 224)')
    p.add_argument(
        '--threads',
        type=int,
        default=2,
        help='torch.set_num_threads (CPU); 0 keeps the default')
    p.add_argument('--device', default='cpu')
    p.add_argument(
        '--dtype',
        choices=sorted(DTYPES),
        default='fp32',
        help='bf16/fp16 run the forward under autocast')
    p.add_argument(
        '--channels-last',
        action='store_true',
        help='model and input in channels_last memory format')
    p.add_argument(
        '--compile',
        action='store_true',
        help='add ours+compile: torch.compile(fullgraph=True), inductor; on '
        'CPU with freezing (weights folded and prepacked) for inference')
    p.add_argument(
        '--compile-train',
        action='store_true',
        help='with --compile, also time the compiled training step')
    p.add_argument(
        '--compile-peers',
        action='store_true',
        help='with --compile, also compile the peers the same way '
        '(mmpretrain+compile, timm+compile; inference only, not with '
        '--compile-train): the fair comparison for ours+compile')
    p.add_argument(
        '--compile-mode',
        default=None,
        help='torch.compile mode, e.g. '
        'max-autotune')
    p.add_argument(
        '--onnxruntime',
        '--onnx',
        action='store_true',
        help='add <model>+onnxruntime rows: each of --runtime-models '
        'exported to ONNX (tools/deployment/pytorch2onnx.py) and run by '
        'onnxruntime (CPU, fp32, inference)')
    p.add_argument(
        '--openvino',
        action='store_true',
        help='add <model>+openvino rows (fp32) and <model>+openvino-bf16 '
        '(where the CPU has bf16): the same ONNX files read by OpenVINO\'s '
        'ONNX frontend (tools/deployment/pytorch2openvino.convert)')
    p.add_argument(
        '--export-shapes',
        nargs='+',
        choices=['dynamic', 'static'],
        default=['dynamic'],
        help='runtime rows: graphs with dynamic N, H, W (default) and/or '
        'static at the run\'s input (rows named ...-static)')
    p.add_argument(
        '--peer-export-shapes',
        nargs='+',
        choices=['dynamic', 'static'],
        default=['static'],
        help='shapes of the peers\' runtime graphs (default static: '
        'timm\'s DaViT did not finish a dynamic torch.export in minutes); '
        'ours\' dynamic rows are compared with the peer\'s static graph '
        'where the peer has no dynamic one')
    p.add_argument(
        '--runtime-models',
        nargs='+',
        default=['ours', 'timm', 'mmpretrain'],
        help='candidates exported for the runtime rows (default: ours timm '
        'mmpretrain)')
    p.add_argument(
        '--runtime-precisions',
        nargs='+',
        choices=['fp32', 'bf16', 'int8'],
        default=['fp32', 'bf16'],
        help='OpenVINO precisions (bf16 only where the CPU has it; int8: '
        'static int8 by NNCF post-training quantization calibrated on '
        '--int8-calib random batches like the timed input, the other ops in '
        'bf16 where the CPU has it: a speed figure; for accuracy see '
        'tools/deployment/quantize_openvino.py)')
    p.add_argument('--int8-calib', type=int, default=8)
    p.add_argument(
        '--onnx-dir',
        default=None,
        help='keep the runtime rows\' ONNX files here (<model>-<shapes>.onnx;'
        ' e.g. for tools/analysis_tools/runtime_profile.py)')
    p.add_argument(
        '--with-cp',
        action='store_true',
        help='add ours-cp (with_cp=True) to the training step and memory')
    from davit_ext.models.fast_paths import FAST_PATH_NAMES
    p.add_argument(
        '--fast-paths-off',
        nargs='+',
        default=None,
        choices=FAST_PATH_NAMES,
        metavar='NAME',
        help='add ours-off: ours with these fast paths switched off, to '
        'compare them with the module calls on your CPU; NAME from: ' +
        ', '.join(FAST_PATH_NAMES))
    p.add_argument(
        '--peers',
        nargs='*',
        default=list(PEERS),
        help='peers to compare with (default: mmpretrain timm)')
    p.add_argument(
        '--no-official', action='store_true', help='leave out ours-official')
    p.add_argument('--iters', type=int, default=10, help='timed rounds')
    p.add_argument('--warmup', type=int, default=2, help='untimed rounds')
    p.add_argument(
        '--train-iters',
        type=int,
        default=None,
        help='timed training rounds (default: --iters)')
    p.add_argument(
        '--skip',
        nargs='*',
        default=[],
        choices=['infer', 'train', 'memory'],
        help='parts to skip')
    p.add_argument('--drop-path-rate', type=float, default=0.1)
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument(
        '--atol',
        type=float,
        default=None,
        help='max |logit difference| allowed by the checks (default 1e-4 '
        'for fp32; under autocast 5e-2 times max(1, the largest |logit|), '
        'since two half-precision forwards differ relative to the scale)')
    p.add_argument('--no-check', action='store_true')
    p.add_argument(
        '--profile',
        type=int,
        default=0,
        metavar='N',
        help='CPU: after timing, profile each eager candidate\'s inference '
        'and training step (torch.profiler, self CPU time) and print its GEMM '
        'share and top N ops')
    p.add_argument(
        '--peak-size',
        type=int,
        default=2048,
        metavar='N',
        help='side of the square GEMM timed once per run and precision to '
        'measure the machine\'s peak GFLOP/s (0: skip the peak and the %% '
        'of peak column)')
    p.add_argument(
        '--sizes',
        nargs='+',
        default=None,
        metavar='S|HxW',
        help='size sweep instead of the single-size table: inference img/s, '
        'tokens/s and peak memory of the eager candidates at each input '
        'size (e.g. 224 384 512 768 1024 600x1000), at --sweep-batch')
    p.add_argument(
        '--sweep-batch',
        type=int,
        default=1,
        help='batch of the size sweep (default 1)')
    p.add_argument(
        '--plot',
        default=None,
        help='size sweep: write a PNG plot here (default: the --json path '
        'with .png; needs matplotlib)')
    p.add_argument('--json', default=None, help='write the results here')
    return p.parse_args(argv)


def parse_size(text: str) -> Tuple[int, int]:
    """``'512'`` -> (512, 512); ``'600x1000'`` -> (600, 1000)."""
    try:
        parts = [int(v) for v in text.lower().split('x')]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise SystemExit(f'--sizes: expected S or HxW with positive sizes '
                         f'(e.g. 512 or 600x1000); got {text!r}')
    return parts[0], parts[1]


# --------------------------------------------------------------- building
def arch_settings(arch: str) -> Dict:
    if arch.lower() in ARCHS:
        return dict(ARCHS[arch.lower()])
    try:
        cfg = json.loads(arch)
    except json.JSONDecodeError:
        raise SystemExit(f'--arch: expected one of {sorted(ARCHS)} or a JSON '
                         f'dict; got {arch!r}')
    return dict(
        embed_dims=int(cfg['embed_dims']),
        depths=list(cfg['depths']),
        num_heads=list(cfg['num_heads']))


def build_mm_classifier(backbone_type: str, arch: Dict, args,
                        **backbone_kwargs) -> nn.Module:
    """An mmpretrain ``ImageClassifier`` around ``backbone_type``."""
    from mmpretrain.models import ImageClassifier
    channels = arch['embed_dims'] * 2**(len(arch['depths']) - 1)
    official = backbone_kwargs.get('official', False)
    return ImageClassifier(
        backbone=dict(
            type=backbone_type,
            arch=dict(arch),
            drop_path_rate=args.drop_path_rate,
            **backbone_kwargs),
        # The official forward pools and normalises in the backbone.
        neck=None if official else dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=args.num_classes,
            in_channels=channels))


def build_timm(arch: Dict, args) -> nn.Module:
    from timm.models.davit import DaVit
    n = len(arch['depths'])
    return DaVit(
        depths=tuple(arch['depths']),
        embed_dims=tuple(arch['embed_dims'] * 2**i for i in range(n)),
        num_heads=tuple(arch['num_heads']),
        drop_path_rate=args.drop_path_rate,
        num_classes=args.num_classes)


class Logits(nn.Module):
    """Uniform call: image batch -> logits (B, num_classes)."""

    def __init__(self, model: nn.Module, mm: bool) -> None:
        super().__init__()
        self.model = model
        self.mm = mm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mm:
            return self.model(x, mode='tensor')
        return self.model(x)


def randomize_(model: nn.Module, seed: int) -> None:
    """Random weights everywhere, norms and biases included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith('weight'):  # norm scales
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # biases, norm shifts
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)


def build_candidates(args, notes: List[str]) -> 'OrderedDict[str, nn.Module]':
    """All candidates on CPU in fp32, sharing the weights of ``ours``."""
    import davit_ext  # noqa: F401  (registers our DaViT)
    from davit_ext.weights.layouts import mmpretrain_to_timm
    arch = arch_settings(args.arch)
    models = OrderedDict()
    torch.manual_seed(args.seed)
    ours = build_mm_classifier('davit_ext.DaViT', arch, args)
    randomize_(ours, args.seed)
    state = ours.state_dict()
    models['ours'] = Logits(ours, mm=True)
    if not args.no_official:
        official = build_mm_classifier(
            'davit_ext.DaViT', arch, args, official=True)
        official.load_state_dict(state, strict=True)
        models['ours-official'] = Logits(official, mm=True)
    for peer in args.peers:
        try:
            if peer == 'mmpretrain':
                model = build_mm_classifier('mmpretrain.DaViT', arch, args)
                model.load_state_dict(state, strict=True)
                models[peer] = Logits(model, mm=True)
            elif peer == 'timm':
                model = build_timm(arch, args)
                model.load_state_dict(
                    mmpretrain_to_timm(state, len(arch['depths'])),
                    strict=True)
                models[peer] = Logits(model, mm=False)
            else:
                raise SystemExit(f'--peers: unknown peer {peer!r}; choose '
                                 f'from {PEERS}')
        except ImportError as e:
            notes.append(f'{peer}: not installed ({e}), left out')
    if args.compile:
        models['ours+compile'] = models['ours']  # compiled in prepare()
    if args.with_cp:
        cp = build_mm_classifier('davit_ext.DaViT', arch, args, with_cp=True)
        cp.load_state_dict(state, strict=True)
        models['ours-cp'] = Logits(cp, mm=True)
    return models


# ---------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def autocast(args, device: torch.device):
    dtype = DTYPES[args.dtype]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# CPU flags that decide fp32/bf16 speed, printed with every run.
CPU_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16',
             'amx_tile', 'amx_bf16')


def cpu_model_and_flags() -> (str, List[str]):
    """CPU model name (with vendor, family and model numbers where.

    /proc/cpuinfo gives them: "AMD EPYC" alone does not say which generation)
    and which of ``CPU_FLAGS`` it lists.
    """
    cpu, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key == 'model name' and not flags:
                    cpu = value.strip()
                elif key in ('vendor_id', 'cpu family', 'model'):
                    ids.setdefault(key, value.strip())
                elif key == 'flags':
                    flags = set(value.split())
                    break
    except OSError:
        pass
    if ids:
        cpu += ' (' + ', '.join(f'{k} {v}' for k, v in ids.items()) + ')'
    return cpu, [f for f in CPU_FLAGS if f in flags]


def machine_info(args) -> Dict:
    from davit_ext.models import fast_paths
    cpu, flags = cpu_model_and_flags()
    info = dict(
        cpu=cpu,
        cpu_flags=flags,
        cpu_bf16=fast_paths.cpu_has_bf16(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now().isoformat(timespec='seconds'))
    info['ours_fp32_gemm'] = 'oneDNN' if fast_paths.ONEDNN_LINEAR else \
        'addmm (MKL/BLAS, as the peers)'
    info['cpu_capability'] = fast_paths.cpu_capability()
    info['fast_paths_off'] = sorted(fast_paths.OFF)
    for mod in ('mmpretrain', 'timm', 'mmengine'):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if args.device.startswith('cuda') and torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(torch.device(args.device))
    return info


class Runner:
    """One candidate on the target device: inference and training calls."""

    def __init__(self, name: str, model: nn.Module, args,
                 device: torch.device) -> None:
        self.name = name
        self.args = args
        self.device = device
        self.model = model
        self.infer_fn: Callable = model
        self.train_fn: Callable = model
        self.optimizer = None
        self.compile_s = {}
        self.off: Tuple[str, ...] = ()  # fast paths switched off
        self.precision = args.dtype  # of its GEMMs: which peak applies

    def _paths(self):
        from davit_ext.models import fast_paths
        return fast_paths.turned_off(*self.off)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with torch.inference_mode(), autocast(self.args,
                                              self.device), self._paths():
            return self.infer_fn(x)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with self._paths():
            return self._train_step(x, y)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.train()
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(
                [p for p in self.model.parameters() if p.requires_grad],
                lr=1e-5)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.args, self.device):
            loss = F.cross_entropy(self.train_fn(x).float(), y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def compile_candidate(runner: Runner, x: torch.Tensor, xt: torch.Tensor,
                      y: torch.Tensor, args) -> None:
    """Compile ``runner``'s model; record the time of the first calls.

    Raises what ``torch.compile`` raises (e.g. a graph break under
    ``fullgraph=True``) at the first call.
    """
    import torch._inductor.config as inductor_config
    kwargs = dict(fullgraph=True, mode=args.compile_mode)
    # A separate compiled callable for each use: freezing folds the weights
    # into the inference graph, so that graph cannot be trained.
    if runner.device.type == 'cpu':
        inductor_config.freezing = True
    runner.infer_fn = torch.compile(runner.model, **kwargs)
    t0 = time.perf_counter()
    try:
        runner.infer(x)
    finally:  # a failed compile must not leave freezing on
        inductor_config.freezing = False
    sync(runner.device)
    runner.compile_s['infer'] = time.perf_counter() - t0
    if args.compile_train:
        torch._dynamo.reset()
        runner.train_fn = torch.compile(runner.model, **kwargs)
        state = {k: v.clone() for k, v in runner.model.state_dict().items()}
        t0 = time.perf_counter()
        runner.train_step(xt, y)
        sync(runner.device)
        runner.compile_s['train'] = time.perf_counter() - t0
        runner.model.load_state_dict(state)  # undo the compile step's update
        runner.optimizer = None


def _load_deployment_tool(name: str):
    """``tools/deployment/<name>.py`` as a module."""
    import importlib.util
    folder = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), '..', 'deployment')
    if folder not in sys.path:  # pytorch2openvino imports pytorch2onnx
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, name + '.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


class RuntimeRunner:
    """A candidate exported to ONNX and run by a deployment runtime (CPU): the
    ``Runner.infer`` call.

    ``source`` is the eager candidate it was exported from (``ours``, ``timm``,
    ...): the file is what ``tools/deployment/pytorch2onnx.py`` writes for it
    (dynamic N, H, W, or static at the run's input), run by onnxruntime or,
    read by OpenVINO's ONNX frontend (``pytorch2openvino.convert``), by
    OpenVINO, with torch's thread count (``--threads``).
    """

    def __init__(self, name: str, source: str, runtime: str, precision: str,
                 shapes: str, call: Callable, compile_s: Dict) -> None:
        self.name, self.source, self.runtime = name, source, runtime
        self.precision, self.shapes = precision, shapes
        self.device = torch.device('cpu')
        self.compile_s = compile_s
        self._call = call

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._call(x.contiguous().numpy()))


def runtime_name(source: str, runtime: str, precision: str,
                 shapes: str) -> str:
    """``ours+openvino-bf16-static``: source, runtime, non-fp32 precision,
    static shapes (dynamic is the default, unnamed)."""
    return (f'{source}+{runtime}' +
            ('' if precision == 'fp32' else f'-{precision}') +
            ('-static' if shapes == 'static' else ''))


def ort_session(onnx_file: str, threads: int) -> Callable:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # No busy-waiting after a run: spinning threads take the cores from the
    # candidate timed next.
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    session = ort.InferenceSession(
        onnx_file, options, providers=['CPUExecutionProvider'])
    return lambda x: session.run(None, {'input': x})[0]


def openvino_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 here (AVX512-BF16 or AMX)."""
    import openvino as ov
    caps = ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')
    return 'BF16' in caps


def quantize_int8(ov_model, x: torch.Tensor, batches: int):
    """``ov_model`` with static int8 (NNCF post-training quantization)
    calibrated on ``batches`` random batches shaped and distributed like the
    timed input ``x``."""
    import nncf
    g = torch.Generator().manual_seed(1234)
    data = [torch.randn(x.shape, generator=g).numpy() for _ in range(batches)]
    return nncf.quantize(
        ov_model,
        nncf.Dataset(data),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=batches)


def add_runtime_candidates(runners: Dict, x: torch.Tensor, args,
                           notes: List[str]) -> None:
    """``--onnxruntime`` / ``--openvino``: each source model exported to ONNX
    the same way (once per shape mode) and run by each runtime asked for, in
    fp32, and with OpenVINO in bf16 where the CPU has it; or a note."""
    if args.device != 'cpu':
        notes.append('--onnxruntime/--openvino: CPU only, left out')
        return
    runtimes = []
    for flag, module, runtime in ((args.onnxruntime, 'onnxruntime',
                                   'onnxruntime'), (args.openvino, 'openvino',
                                                    'openvino')):
        if not flag:
            continue
        try:
            __import__(module)
            runtimes.append(runtime)
        except ImportError as e:
            notes.append(f'{runtime}: not installed ({e}), its rows left out')
    if not runtimes:
        return
    onnx_tool = _load_deployment_tool('pytorch2onnx')
    ov_tool = _load_deployment_tool('pytorch2openvino') \
        if 'openvino' in runtimes else None
    ov_precisions = ['fp32']
    if ov_tool is not None and 'bf16' in args.runtime_precisions:
        if openvino_bf16():
            ov_precisions.append('bf16')
        else:
            notes.append('openvino bf16: this CPU has no bf16 instructions '
                         '(OpenVINO\'s CPU capabilities list no BF16), left '
                         'out')
    if ov_tool is not None and 'int8' in args.runtime_precisions:
        try:
            __import__('nncf')
            ov_precisions.append('int8')
        except ImportError as e:
            notes.append(f'openvino int8: nncf not installed ({e}), left out')
    threads = torch.get_num_threads()
    sources = [s for s in args.runtime_models if s in runners]
    for source in args.runtime_models:
        if source not in runners:
            notes.append(f'{source}: not a candidate of this run, its runtime '
                         'rows left out')
    if args.onnx_dir:
        tmp = args.onnx_dir
        os.makedirs(tmp, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix='davit-bench-')
        atexit.register(shutil.rmtree, tmp, True)
    for source in sources:
        model = runners[source].model.eval()
        for shapes in (args.peer_export_shapes
                       if source in PEERS else args.export_shapes):
            onnx_file = os.path.join(tmp, f'{source}-{shapes}.onnx')
            t0 = time.perf_counter()
            try:
                onnx_tool.export(
                    model,
                    onnx_file,
                    x.shape[2:],
                    dynamic=shapes == 'dynamic',
                    batch=x.shape[0])
            except Exception as e:  # a peer whose graph does not export
                first = str(e).strip().splitlines()[0] if str(e) else ''
                notes.append(f'{source}: ONNX export ({shapes} shapes) '
                             f'failed ({type(e).__name__}: {first[:200]}), '
                             'its runtime rows left out')
                continue
            export_s = time.perf_counter() - t0
            for runtime in runtimes:
                precisions = ov_precisions if runtime == 'openvino' else [
                    'fp32'
                ]
                for precision in precisions:
                    name = runtime_name(source, runtime, precision, shapes)
                    t0 = time.perf_counter()
                    if runtime == 'onnxruntime':
                        call = ort_session(onnx_file, threads)
                    elif precision == 'int8':
                        compiled = ov_tool.compile_model(
                            quantize_int8(
                                ov_tool.convert(onnx_file), x,
                                args.int8_calib),
                            'bf16' if 'bf16' in ov_precisions else 'fp32',
                            threads)
                        call = (lambda x, c=compiled: c(x)[0])
                    else:
                        compiled = ov_tool.compile_model(
                            ov_tool.convert(onnx_file), precision, threads)
                        call = (lambda x, c=compiled: c(x)[0])
                    compile_s = {
                        'onnx export': export_s,
                        f'{runtime} load': time.perf_counter() - t0
                    }
                    runners[name] = RuntimeRunner(name, source, runtime,
                                                  precision, shapes, call,
                                                  compile_s)


# ----------------------------------------------------------------- phases
def check_outputs(runners: Dict[str, Runner], x: torch.Tensor, args,
                  notes: List[str]) -> List[Dict]:
    """Logits of each pair must agree; drop peers that cannot run."""
    atol = args.atol
    relative = atol is None and args.dtype != 'fp32'
    if atol is None:
        atol = 1e-4 if args.dtype == 'fp32' else 5e-2
    logits = {}
    for name, runner in list(runners.items()):
        try:
            logits[name] = runner.infer(x).float()
        except Exception as e:  # a peer refusing the input size
            if name not in PEERS:
                raise
            notes.append(f'{name}: cannot run this input '
                         f'({type(e).__name__}: {e}), left out')
            del runners[name]
    checks = []
    for a, b in CHECK_PAIRS:
        if a in logits and b in logits:
            diff = (logits[a] - logits[b]).abs().max().item()
            scale = logits[b].abs().max().item()
            tol = atol * max(1., scale) if relative else atol
            checks.append(
                dict(
                    pair=f'{a} vs {b}',
                    max_abs_diff=diff,
                    logit_scale=scale,
                    atol=tol,
                    ok=diff <= tol))
    # Runtime rows against the fp32 forward of the model they were exported
    # from: 1e-4 (bf16 rows 5e-2) times the logits' scale where above 1.
    fp32 = {}
    for name, runner in runners.items():
        source = getattr(runner, 'source', None)
        if source is None or source not in runners:
            continue
        if source not in fp32:
            if args.dtype == 'fp32':
                fp32[source] = logits[source]
            else:
                with torch.inference_mode():
                    fp32[source] = runners[source].model.eval()(x).float()
        ref = fp32[source]
        diff = (logits[name] - ref).abs().max().item()
        scale = ref.abs().max().item()
        # (int8: a speed row; its accuracy is measured on held-out data by
        # tools/deployment/quantize_openvino.py, random weights and inputs
        # say little about it)
        bound = dict(
            fp32=args.atol or 1e-4, bf16=5e-2).get(runner.precision, 0.5)
        tol = bound * max(1., scale)
        checks.append(
            dict(
                pair=f'{name} vs {source} (fp32)',
                max_abs_diff=diff,
                logit_scale=scale,
                atol=tol,
                ok=diff <= tol))
    return checks


def round_orders(n: int) -> List[List[int]]:
    """Orders of ``n`` candidates for successive rounds, balanced for what runs
    first and for what runs right before what.

    A Williams design: the first row is 0, 1, n-1, 2, n-2, ...; row ``r`` adds
    ``r`` (mod n) to it; an odd ``n`` also takes the rows reversed. Over these
    ``n`` (even) or ``2n`` (odd) rounds each candidate runs first equally often
    and directly after each other candidate equally often. Plain rotation (A B
    C, B C A, ...) would leave each candidate right after the same one in
    almost every round, so that whatever a candidate leaves behind (a runtime's
    threads still busy, a cache full of its data) would fall on the same one
    each time.
    """
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(c + r) % n for c in first] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def time_interleaved(fns: Dict[str, Callable], rounds: int, warmup: int,
                     device: torch.device) -> Dict[str, List[float]]:
    """Seconds per call of each fn, interleaved after warm-up, the rounds in
    the orders of :func:`round_orders` (two copies of the same model measured
    8% apart in a fixed order)."""
    times = {name: [] for name in fns}
    names = list(fns)
    orders = round_orders(len(names))
    for r in range(warmup + rounds):
        # Timed rounds start at the first order (warm-up rounds before it).
        for i in orders[(r - warmup) % len(orders)]:
            name = names[i]
            fn = fns[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def quiet_stderr():
    """Silence the profiler's C++ log lines (one per start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, 'w') as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# Matrix products, whichever library runs them: what no fusion removes.
GEMM_OPS = ('aten::addmm', 'aten::mm', 'aten::bmm', 'aten::baddbmm',
            'aten::addmm_', 'mkl::_mkl_linear', 'mkldnn::_linear_pointwise')


def profile_ops(fn: Callable, rounds: int = 3) -> Dict:
    """Self CPU time shares of the ops ``fn`` runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            fn()
    self_us = {
        e.key: e.self_cpu_time_total
        for e in prof.key_averages() if e.self_cpu_time_total > 0
    }
    total = sum(self_us.values())
    shares = sorted(((k, v / total) for k, v in self_us.items()),
                    key=lambda kv: -kv[1])
    return dict(
        ms_per_round=total / rounds / 1e3,
        gemm_share=sum(v for k, v in shares if k in GEMM_OPS),
        ops=shares)


def peak_memory(fn: Callable, device: torch.device) -> float:
    """Peak bytes allocated by ``fn`` above what was live before (see top)."""
    if device.type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with quiet_stderr(), profile(
            activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == '[memory]' and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return float(peak)


# ------------------------------------------------------- peak and FLOPs
def model_flops(model: nn.Module, size: Tuple[int, int],
                device: torch.device) -> int:
    """FLOPs of one image through ``model``: 2 x the multiply-adds of its
    convolutions and matrix products (``torch.utils.flop_counter``; norms,
    softmax, GELU and additions are not counted, as usual).

    Counted with every fast path off, so that the counter sees the module
    calls' ops (it does not know oneDNN's linear). Every candidate computes the
    same function with the same weights, so one count serves all rows.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from davit_ext.models import fast_paths
    x = torch.zeros(1, 3, *size, device=device)
    with torch.no_grad(), fast_paths.turned_off(
            *fast_paths.FAST_PATH_NAMES), FlopCounterMode(
                display=False) as counter:
        model.eval()(x)
    return int(counter.get_total_flops())


def gemm_peak(precision: str,
              n: int,
              device: torch.device,
              iters: int = 5) -> Dict:
    """GFLOP/s of one large (n x n x n) GEMM in ``precision``: the machine's
    reachable limit for a model whose work is matrix products.

    On CPU both kernels PyTorch has are timed, ``torch.mm`` (MKL in fp32,
    oneDNN in bf16) and oneDNN's linear
    (``torch.ops.mkldnn._linear_pointwise``, what our fast paths and inductor
    call), and the faster one is the peak: the median of ``iters`` calls after
    two warm-up calls.
    """
    dtype = DTYPES[precision] or torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    kernels = {'torch.mm': lambda: torch.mm(a, w.t())}
    onednn = getattr(torch.ops.mkldnn, '_linear_pointwise', None)
    if device.type == 'cpu' and onednn is not None and \
            torch.backends.mkldnn.is_available():
        kernels['oneDNN linear'] = lambda: onednn(a, w, None, 'none', [], '')
    flop = 2. * n**3
    gflops = {}
    for name, fn in kernels.items():
        try:
            times = time_interleaved({name: fn}, iters, 2, device)[name]
        except RuntimeError:  # e.g. no bf16 kernel in this build
            continue
        gflops[name] = flop / statistics.median(times) / 1e9
    if not gflops:
        return {}
    best = max(gflops, key=gflops.get)
    return dict(gflops=gflops[best], kernel=best, size=n, kernels=gflops)


def add_peak_columns(results: Dict, flops: int, peaks: Dict) -> None:
    """``infer_gflops`` = FLOPs per image x img/s; ``infer_pct_peak`` = that
    over the peak of the row's precision, in percent."""
    for res in results.values():
        if not res.get('infer_img_s'):
            continue
        res['infer_gflops'] = flops * res['infer_img_s'] / 1e9
        peak = peaks.get(res.get('precision'), {}).get('gflops')
        if peak:
            res['infer_pct_peak'] = 100. * res['infer_gflops'] / peak


def runtime_ratios(results: Dict) -> None:
    """Runtime rows of ours: ``infer_img_s_vs_<peer>`` against the peer's graph
    in the same runtime, precision and shapes (``vs_rows`` names that row);
    dynamic rows also ``infer_img_s_vs_static`` (their static counterpart) and
    every runtime row ``infer_img_s_vs_eager`` (the eager candidate it was
    exported from)."""
    for name, res in results.items():
        rt = res.get('runtime')
        if rt is None or not res.get('infer_img_s'):
            continue
        eager = results.get(res['source'], {}).get('infer_img_s')
        if eager:
            res['infer_img_s_vs_eager'] = res['infer_img_s'] / eager
        if res['source'] in PEERS:
            continue
        res['vs_rows'] = {}
        for peer in PEERS:
            # The peer's graph of the same shapes, else its static one (at
            # least as fast as a dynamic one: the stricter comparison).
            other = runtime_name(peer, rt, res['precision'], res['shapes'])
            if other not in results:
                other = runtime_name(peer, rt, res['precision'], 'static')
            ref = results.get(other, {}).get('infer_img_s')
            if ref:
                res[f'infer_img_s_vs_{peer}'] = res['infer_img_s'] / ref
                res['vs_rows'][peer] = other
        if res['shapes'] == 'dynamic':
            other = runtime_name(res['source'], rt, res['precision'], 'static')
            ref = results.get(other, {}).get('infer_img_s')
            if ref:
                res['infer_img_s_vs_static'] = res['infer_img_s'] / ref


# ------------------------------------------------------------------ report
def summarize(results: Dict, metric: str, higher_better: bool,
              peers: List[str]) -> None:
    """Add ``{metric}_vs_{peer}`` ratios (>1 means ours is better)."""
    for name, res in results.items():
        # Runtime rows are compared with the same runtime's peer rows
        # (runtime_ratios).
        if name in peers or res.get(metric) is None or 'runtime' in res:
            continue
        for peer in peers:
            ref = results.get(peer, {}).get(metric)
            if ref:
                ratio = res[metric] / ref if higher_better else \
                    ref / res[metric]
                res[f'{metric}_vs_{peer}'] = ratio


def format_table(results: Dict, peers: List[str]) -> str:
    # (title, key, format, with a ratio column per peer)
    cols = [('infer img/s', 'infer_img_s', '{:.2f}', True),
            ('GFLOP/s', 'infer_gflops', '{:.0f}', False),
            ('% peak', 'infer_pct_peak', '{:.1f}', False),
            ('train img/s', 'train_img_s', '{:.2f}', True),
            ('train peak MB', 'train_peak_mb', '{:.0f}', True)]
    header = ['model']
    for title, _, _, ratios in cols:
        header.append(title)
        header += [f'x {p}' for p in peers] if ratios else []
    rows = [header]
    for name, res in results.items():
        row = [name]
        for _, key, fmt, ratios in cols:
            val = res.get(key)
            row.append('-' if val is None else fmt.format(val))
            for p in peers if ratios else ():
                r = res.get(f'{key}_vs_{p}')
                row.append('-' if r is None else f'{r:.2f}')
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        ' | '.join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    ]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    return '\n'.join(lines)


def sweep(args, runners: Dict, device: torch.device, notes: List[str],
          flops_of: Callable) -> List[Dict]:
    """``--sizes``: per input size, the eager candidates' inference timed
    interleaved (``--iters`` rounds after ``--warmup``) and their inference
    peak memory. A candidate that refuses a size (mmpretrain: maps that do
    not fit its windows) or runs out of memory is left out at that size with
    a note. ``tokens`` is the number of tokens of the first stage
    (``ceil(H / 4) * ceil(W / 4)``); ``tokens_s`` = img/s x tokens is flat
    where the cost grows linearly with the tokens."""
    points = []
    g = torch.Generator().manual_seed(args.seed + 2)
    for text in args.sizes:
        h, w = parse_size(text)
        x = torch.randn(args.sweep_batch, 3, h, w, generator=g).to(device)
        tokens = -(-h // 4) * -(-w // 4)
        flops = flops_of((h, w))
        rows = OrderedDict()
        fns = {}
        for name, r in runners.items():
            try:
                r.infer(x)
            except Exception as e:  # a refused size, out of memory
                first = str(e).splitlines()[0] if str(e) else ''
                notes.append(f'{name} at {h}x{w}: cannot run '
                             f'({type(e).__name__}: {first[:120]}), left out')
                continue
            fns[name] = (lambda r=r: r.infer(x))
        times = time_interleaved(fns, args.iters, args.warmup, device)
        for name, t in times.items():
            img_s = args.sweep_batch / statistics.median(t)
            rows[name] = dict(
                infer_s=t,
                infer_img_s=img_s,
                tokens_s=img_s * tokens,
                infer_gflops=flops * img_s / 1e9,
                infer_peak_mb=peak_memory(lambda: runners[name].infer(x),
                                          device) / 2**20)
        points.append(
            dict(
                size=[h, w],
                tokens=tokens,
                flops_per_image=flops,
                results=rows))
        print(
            f'{h}x{w} ({tokens} tokens, {flops / 1e9:.1f} GFLOP/image): ' +
            ', '.join(f"{n} {v['infer_img_s']:.2f} img/s "
                      f"{v['tokens_s'] / 1e3:.1f}k tokens/s "
                      f"{v['infer_peak_mb']:.0f} MB" for n, v in rows.items()),
            flush=True)
    return points


def plot_sweep(points: List[Dict], path: str, title: str) -> Optional[str]:
    """img/s, tokens/s and peak memory against tokens, one line per candidate;
    returns a note instead where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return 'matplotlib is not installed: no plot written'
    names = list(OrderedDict.fromkeys(n for p in points for n in p['results']))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in names:
        pts = sorted(((p['tokens'], p['results'][name])
                      for p in points if name in p['results']),
                     key=lambda tp: tp[0])
        xs = [t for t, _ in pts]
        for ax, key, scale in zip(axes,
                                  ('infer_img_s', 'tokens_s', 'infer_peak_mb'),
                                  (1, 1e-3, 1)):
            ax.plot(xs, [r[key] * scale for _, r in pts], 'o-', label=name)
    for ax, label in zip(axes, ('img/s', 'tokens/s (thousands): flat = '
                                'linear cost', 'inference peak MB')):
        ax.set_xscale('log')
        ax.set_xlabel('tokens (ceil(H/4) x ceil(W/4))')
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale('log')
    axes[2].set_yscale('log')
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main_sweep(args, models: Dict, runners: Dict, device: torch.device,
               notes: List[str]) -> Dict:
    """``--sizes``: the sweep, its JSON and plot."""
    runners = OrderedDict(
        (n, r) for n, r in runners.items() if n not in ('ours-cp', ))
    meta = machine_info(args)
    print(f"CPU: {meta['cpu']}; flags: {' '.join(meta['cpu_flags'])}; "
          f"{meta['threads']} threads, torch {meta['torch']}; DaViT "
          f'{args.arch} {args.dtype}, batch {args.sweep_batch}, medians of '
          f'{args.iters} interleaved rounds after {args.warmup} warm-up')
    points = sweep(
        args, runners, device, notes,
        lambda size: model_flops(models['ours'].model, size, device))
    for note in notes:
        print('note:', note)
    out = dict(
        meta=meta,
        config=dict(vars(args), arch_settings=arch_settings(args.arch)),
        notes=notes,
        sweep=points)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=2)
        print('wrote', args.json)
    plot = args.plot or (os.path.splitext(args.json)[0] +
                         '.png' if args.json else None)
    if plot:
        title = (f'DaViT {args.arch} {args.dtype} batch {args.sweep_batch}, '
                 f"{meta['threads']} threads: {meta['cpu']}")
        problem = plot_sweep(points, plot, title)
        print('note:', problem) if problem else print('wrote', plot)
        out['plot'] = None if problem else plot
    return out


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.compile_train and not args.compile:
        raise SystemExit('--compile-train needs --compile')
    if args.compile_peers and not args.compile:
        raise SystemExit('--compile-peers needs --compile')
    if args.compile_peers and args.compile_train:
        # Compiling a training graph resets dynamo, which would drop the
        # frozen inference graphs compiled before it for other candidates.
        raise SystemExit('--compile-peers compares inference only: run it '
                         'without --compile-train')
    device = torch.device(args.device)
    if device.type == 'cpu' and args.dtype == 'fp16':
        raise SystemExit('--dtype fp16 autocast is for CUDA; use bf16 on CPU')
    size = args.img_size * 2 if len(args.img_size) == 1 else args.img_size
    if len(size) != 2:
        raise SystemExit('--img-size takes H or H W')
    fmt = torch.channels_last if args.channels_last else \
        torch.contiguous_format
    notes: List[str] = []

    models = build_candidates(args, notes)
    runners = OrderedDict()
    for name, model in models.items():
        if name == 'ours+compile':
            continue  # shares the module of ours, added below
        model.to(device=device, memory_format=fmt)
        runners[name] = Runner(name, model, args, device)
    if args.sizes:
        return main_sweep(args, models, runners, device, notes)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(
        args.batch, 3, *size, generator=g).to(
            device=device, memory_format=fmt)
    train_batch = args.train_batch or args.batch
    xt = x if train_batch == args.batch else torch.randn(
        train_batch, 3, *size, generator=g).to(
            device=device, memory_format=fmt)
    y = torch.randint(
        args.num_classes, (train_batch, ), generator=g).to(device)

    if 'ours+compile' in models:
        # A deep copy so that training ours (eager) leaves it untouched.
        import copy
        runner = Runner('ours+compile', copy.deepcopy(models['ours']), args,
                        device)
        compile_candidate(runner, x, xt, y, args)
        runners['ours+compile'] = runner
        for peer in PEERS if args.compile_peers else ():
            if peer not in runners:
                continue
            name = peer + COMPILED
            runner = Runner(name, copy.deepcopy(runners[peer].model), args,
                            device)
            try:
                compile_candidate(runner, x, xt, y, args)
            except Exception as e:  # a graph break, a refused input size
                # (no torch._dynamo.reset(): it would drop the graphs
                # compiled for the other candidates, too)
                first = str(e).splitlines()[0] if str(e) else ''
                notes.append(
                    f'{name}: compiling (fullgraph=True) or its first '
                    f'call failed ({type(e).__name__}: {first}), '
                    'left out')
                continue
            runners[name] = runner
    if args.fast_paths_off:
        import copy
        runner = Runner(OFF_NAME, copy.deepcopy(models['ours']), args, device)
        runner.off = tuple(args.fast_paths_off)
        runners[OFF_NAME] = runner
        notes.append(f'{OFF_NAME}: ours with fast paths off: ' +
                     ', '.join(args.fast_paths_off))
    if args.onnxruntime or args.openvino:
        add_runtime_candidates(runners, x, args, notes)

    checks = []
    if not args.no_check:
        checks = check_outputs(runners, x, args, notes)
        for c in checks:
            print(f"check {c['pair']}: max |diff| {c['max_abs_diff']:.2e} "
                  f"(logits up to {c['logit_scale']:.2f}, atol "
                  f"{c['atol']:.0e}) {'ok' if c['ok'] else 'FAILED'}")
        if not all(c['ok'] for c in checks):
            raise SystemExit('outputs disagree: not timing (see above)')

    results = OrderedDict(
        (name, dict(precision=r.precision)) for name, r in runners.items())
    for name, r in runners.items():
        if isinstance(r, RuntimeRunner):
            results[name].update(
                runtime=r.runtime, source=r.source, shapes=r.shapes)
    for name, runner in runners.items():
        if runner.compile_s:
            results[name]['compile_s'] = runner.compile_s
    # The machine's limit, once per run and precision, and the model's work.
    peaks: Dict[str, Dict] = {}
    flops = model_flops(models['ours'].model, size, device)
    if args.peak_size > 0 and 'infer' not in args.skip:
        for precision in sorted({r.precision for r in runners.values()}):
            if precision in DTYPES:  # (no int8 peak: int8 rows get GFLOP/s)
                peaks[precision] = gemm_peak(precision, args.peak_size, device)
    if 'infer' not in args.skip:
        fns = {
            n: (lambda r=r: r.infer(x))
            for n, r in runners.items() if n != 'ours-cp'
        }
        times = time_interleaved(fns, args.iters, args.warmup, device)
        for n, t in times.items():
            results[n]['infer_s'] = t
            results[n]['infer_img_s'] = args.batch / statistics.median(t)
    trainable = [
        n for n, r in runners.items()
        if (not n.endswith(COMPILED) or args.compile_train)
        and not isinstance(r, RuntimeRunner)
    ]
    if 'train' not in args.skip:
        fns = {
            n: (lambda r=runners[n]: r.train_step(xt, y))
            for n in trainable
        }
        times = time_interleaved(fns, args.train_iters or args.iters,
                                 args.warmup, device)
        for n, t in times.items():
            results[n]['train_s'] = t
            results[n]['train_img_s'] = train_batch / statistics.median(t)
    if 'memory' not in args.skip:
        for n in trainable:
            r = runners[n]
            r.train_step(xt, y)  # AdamW state exists before the measurement
            results[n]['train_peak_mb'] = peak_memory(
                lambda: r.train_step(xt, y), device) / 2**20
        for n, r in runners.items():
            # (torch's allocator only)
            if n != 'ours-cp' and not isinstance(r, RuntimeRunner):
                results[n]['infer_peak_mb'] = peak_memory(
                    lambda: r.infer(x), device) / 2**20

    if args.profile and device.type == 'cpu':
        for n, r in runners.items():
            if n != 'ours-cp' and not n.endswith(COMPILED) and \
                    not isinstance(r, RuntimeRunner):
                results[n]['infer_profile'] = profile_ops(lambda: r.infer(x))
                if 'train' not in args.skip and n in trainable:
                    results[n]['train_profile'] = profile_ops(
                        lambda: r.train_step(xt, y))
    elif args.profile:
        notes.append('--profile reads CPU time: skipped on ' + device.type)

    add_peak_columns(results, flops, peaks)
    runtime_ratios(results)
    peers = [p for p in PEERS if p in results]
    for metric, higher in (('infer_img_s', True), ('train_img_s', True),
                           ('train_peak_mb', False), ('infer_peak_mb', False)):
        summarize(results, metric, higher, peers)
    compiled_peers = [p + COMPILED for p in peers if p + COMPILED in results]
    if 'ours+compile' in results:
        # Compiled ours against compiled peers (inference only: see
        # --compile-peers): ratios > 1, ours is better.
        res = results['ours+compile']
        for peer in compiled_peers:
            ref = results[peer].get('infer_img_s')
            if ref and res.get('infer_img_s'):
                res[f'infer_img_s_vs_{peer}'] = res['infer_img_s'] / ref
    if 'ours-cp' in results and 'train_peak_mb' in results['ours-cp']:
        results['ours-cp']['train_peak_vs_ours'] = \
            results['ours-cp']['train_peak_mb'] / \
            results['ours']['train_peak_mb']

    meta = machine_info(args)
    meta['flops_per_image'] = flops
    meta['gemm_peak'] = peaks
    config = dict(
        vars(args),
        img_size=list(size),
        arch_settings=arch_settings(args.arch))
    hardware = meta['cpu'] if device.type == 'cpu' else meta.get('gpu')
    if device.type == 'cpu':
        print(f"CPU: {meta['cpu']}; flags: {' '.join(meta['cpu_flags'])}; "
              'bf16 instructions: ' + ('yes' if meta['cpu_bf16'] else 'NO'))
        print('fp32 GEMMs of our fast paths: ' + meta['ours_fp32_gemm'])
        print(f"fast paths off in ours ({meta['cpu_capability']}): " +
              (', '.join(meta['fast_paths_off']) or 'none'))
        if args.dtype == 'bf16' and not meta['cpu_bf16']:
            notes.append(
                'this CPU has no bf16 instructions (no avx512_bf16 or '
                'amx_bf16 in /proc/cpuinfo): bf16 autocast runs emulated, '
                'slower than fp32; these bf16 figures say nothing about a '
                'CPU that has them')
    print(f'\nDaViT {args.arch} {size[0]}x{size[1]} batch {args.batch} '
          f'(train {train_batch}) '
          f"{args.dtype}{' channels_last' if args.channels_last else ''} "
          f'on {device}: {hardware}, '
          f"{meta['threads']} threads, torch {meta['torch']}, "
          f"{meta['date']}")
    print(f'medians of {args.iters} interleaved rounds after {args.warmup} '
          'warm-up; ratios > 1 mean ours is better (faster / less memory); '
          'a runtime row (+onnxruntime, +openvino) is compared with the '
          'peer\'s graph in the same runtime, precision and shapes')
    print(f'work: {flops / 1e9:.2f} GFLOP per image (2 x multiply-adds of '
          'the convolutions and matrix products); GFLOP/s = that x infer '
          'img/s; % peak = GFLOP/s over the peak of the row\'s precision')
    for precision, peak in peaks.items():
        if peak:
            kernels = ', '.join(f'{k} {v:.0f}'
                                for k, v in peak['kernels'].items())
            print(f"{precision} GEMM peak: {peak['gflops']:.0f} GFLOP/s "
                  f"({peak['size']}^3 GEMM, {meta['threads']} threads; "
                  f'{kernels})')
    print(format_table(results, peers))
    for name, res in results.items():
        if 'compile_s' in res:
            print(f'{name}: compile time ' +
                  ', '.join(f'{k} {v:.1f} s'
                            for k, v in res['compile_s'].items()))
        if name == 'ours+compile':
            parts = [
                f"inference {res[f'infer_img_s_vs_{peer}']:.2f}x {peer}"
                for peer in compiled_peers if f'infer_img_s_vs_{peer}' in res
            ]
            if parts:
                print(f'{name} vs the compiled peers (ratios > 1: ours '
                      'better): ' + ', '.join(parts))
        if 'infer_img_s_vs_eager' in res and res['source'] not in PEERS:
            parts = [
                f"inference {res['infer_img_s_vs_eager']:.2f}x "
                f"{res['source']} (PyTorch eager)"
            ]
            parts += [
                f"{res[f'infer_img_s_vs_{p}']:.2f}x {row}"
                for p, row in res.get('vs_rows', {}).items()
            ]
            if 'infer_img_s_vs_static' in res:
                parts.append(f"{res['infer_img_s_vs_static']:.2f}x its "
                             'static graph')
            print(f'{name}: ' + ', '.join(parts))
        if name == OFF_NAME:
            ours = results['ours']
            parts = [
                f'{title} {ours[key] / res[key]:.2f}x' if key.endswith('_mb')
                else f'{title} {res[key] / ours[key]:.2f}x'
                for title, key in (('inference', 'infer_img_s'),
                                   ('training', 'train_img_s'),
                                   ('training peak memory', 'train_peak_mb'))
                if res.get(key) and ours.get(key)
            ]
            if parts:
                print(f'{name} (ratios > 1: ours-off better than ours): ' +
                      ', '.join(parts))
        if 'train_peak_vs_ours' in res:
            print(f'{name}: training peak memory '
                  f"{res['train_peak_vs_ours']:.2f}x ours (with_cp=False)")
    for key, title in (('infer_profile', 'inference'), ('train_profile',
                                                        'training step')):
        for name, res in results.items():
            prof = res.get(key)
            if prof:
                top = ', '.join(f'{k} {v:.1%}'
                                for k, v in prof['ops'][:args.profile])
                # Shares only: each profile runs at its own moment, so their
                # absolute times are not comparable (the timed rounds are).
                print(f'profile {name} {title} (self CPU time): '
                      f"GEMM {prof['gemm_share']:.1%}; {top}")
    for note in notes:
        print('note:', note)

    out = dict(
        meta=meta, config=config, checks=checks, notes=notes, results=results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=2)
        print('wrote', args.json)
    return out


if __name__ == '__main__':
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
    main()
