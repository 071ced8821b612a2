#!/usr/bin/env python
"""Export a DaViT (or any mmpretrain) image classifier to OpenVINO IR.

    python tools/deployment/pytorch2openvino.py CONFIG CHECKPOINT \\
        --output-file davit.xml [--shape H W] [--dynamic-export] [--verify]

The model goes through our ONNX export first (``pytorch2onnx.py``: the same
graph, the same dynamic shapes), then OpenVINO's ONNX frontend reads that
graph (``Core.read_model``; see :func:`convert`) and
``openvino.save_model`` writes ``davit.xml`` (the graph) and
``davit.bin`` (the weights, kept in fp32: no fp16 compression, so that the
IR computes what PyTorch computes). Input and output are those of the ONNX
file::

    input  float32 (N, 3, H, W): preprocessed RGB (the config's mean/std)
    logits float32 (N, num_classes)

``--dynamic-export`` makes N, H and W dynamic (one IR for every size);
without it the IR takes ``(--batch, 3, *--shape)`` only, which lets
OpenVINO plan its memory once.

The precision is chosen when the IR is compiled, not here::

    core = openvino.Core()
    compiled = core.compile_model('davit.xml', 'CPU',
                                  {'INFERENCE_PRECISION_HINT': 'bf16'})

(``f32`` for fp32; ``bf16`` runs bf16 GEMMs where the CPU has AVX512-BF16
or AMX.) ``--verify`` compiles the IR for the CPU in f32 and compares its
logits with PyTorch's at the sizes ``pytorch2onnx.py --verify`` uses,
failing above ``--tolerance`` (1e-4) times the logits' scale where that
exceeds 1. The files are written only when the export (and ``--verify``, if
asked) succeeded; existing files are not touched otherwise.
"""
import argparse
import os
import os.path as osp
import shutil
import sys
import tempfile
from typing import Dict, Optional, Sequence, Tuple

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import pytorch2onnx  # noqa: E402

INPUT, OUTPUT = pytorch2onnx.INPUT, pytorch2onnx.OUTPUT
PRECISIONS = {'fp32': 'f32', 'bf16': 'bf16'}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export an mmpretrain/davit_ext classifier to OpenVINO '
        'IR (via our ONNX export)')
    parser.add_argument('config', help='config file or model name')
    parser.add_argument('checkpoint', help='checkpoint file or URL')
    parser.add_argument(
        '--output-file',
        required=True,
        help='where to write the IR: NAME.xml (NAME.bin is written next to '
        'it)')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        default=[224, 224],
        metavar=('H', 'W'),
        help='input height and width of the example (and of the IR without '
        '--dynamic-export); default: 224 224')
    parser.add_argument(
        '--batch',
        type=int,
        default=1,
        help='batch of a static IR (default 1); ignored with '
        '--dynamic-export')
    parser.add_argument(
        '--dynamic-export',
        action='store_true',
        help='make batch, height and width dynamic')
    parser.add_argument(
        '--opset',
        type=int,
        default=pytorch2onnx.DEFAULT_OPSET,
        help='ONNX opset of the intermediate graph '
        f'({pytorch2onnx.MIN_OPSET}..{pytorch2onnx.MAX_OPSET})')
    parser.add_argument(
        '--verify',
        action='store_true',
        help='check the IR\'s logits (OpenVINO CPU, f32) against PyTorch')
    parser.add_argument(
        '--verify-sizes',
        type=pytorch2onnx._size_triple,
        nargs='+',
        metavar='NxHxW',
        help='sizes --verify checks with --dynamic-export')
    parser.add_argument(
        '--tolerance',
        type=float,
        default=1e-4,
        help='largest |logit difference| --verify accepts, times the '
        'logits\' scale where it exceeds 1 (default: 1e-4)')
    args = parser.parse_args(argv)
    if min(args.shape) < 1 or args.batch < 1:
        parser.error(f'--shape and --batch must be positive; got --shape '
                     f'{args.shape} --batch {args.batch}')
    if not args.output_file.endswith('.xml'):
        parser.error(f'--output-file must end in .xml (the IR is NAME.xml '
                     f'and NAME.bin); got {args.output_file!r}')
    if not pytorch2onnx.MIN_OPSET <= args.opset <= pytorch2onnx.MAX_OPSET:
        parser.error(f'--opset {args.opset} is not supported: use '
                     f'{pytorch2onnx.MIN_OPSET} to {pytorch2onnx.MAX_OPSET}.')
    if args.verify_sizes and not args.dynamic_export:
        parser.error('--verify-sizes needs --dynamic-export (a static IR '
                     'runs at (--batch, 3, *--shape) only)')
    return args


def convert(onnx_file: str):
    """The ``openvino.Model`` of an ONNX file, read by OpenVINO's ONNX frontend
    (``Core.read_model``).

    Not ``openvino.convert_model``: that also runs OpenVINO's offline
    transformations, which fuse DaViT's window attention into
    ``ScaledDotProductAttention`` nodes; the CPU plugin then runs them with
    more transposes and reorders than its own fusion of the plain graph (one
    interleaved run, DaViT-T 224x224 batch 8, 2 threads, AMD EPYC Zen 4: bf16
    36.2 against 32.1 img/s, fp32 17.5 against 17.2; timm's graph 32.9 against
    30.6 and 16.8 against 15.4).
    """
    import openvino as ov
    return ov.Core().read_model(onnx_file)


def export(model: torch.nn.Module,
           xml_file: str,
           shape: Sequence[int],
           dynamic: bool,
           batch: int = 1,
           opset: int = pytorch2onnx.DEFAULT_OPSET) -> None:
    """Write ``model`` (images -> logits) as OpenVINO IR (``xml_file`` and the
    ``.bin`` next to it), via :func:`pytorch2onnx.export`; fp32 weights."""
    import openvino as ov
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = osp.join(tmp, 'model.onnx')
        pytorch2onnx.export(model, onnx_file, shape, dynamic, opset, batch)
        ov.save_model(convert(onnx_file), xml_file, compress_to_fp16=False)


def compile_model(model,
                  precision: str = 'fp32',
                  threads: int = 0,
                  config: Optional[Dict] = None):
    """``model`` (an ``openvino.Model`` or an .xml/.onnx path) compiled for the
    CPU in ``precision`` ('fp32' or 'bf16') with ``threads`` inference threads
    (0: OpenVINO's default), one stream (latency: one request uses every
    thread)."""
    import openvino as ov
    props = {
        'INFERENCE_PRECISION_HINT': PRECISIONS[precision],
        'PERFORMANCE_HINT': 'LATENCY',
        'NUM_STREAMS': '1',
        # OpenVINO pins its threads to cores by default: on a machine whose
        # cores other processes share, the pinned threads wait for them
        # (DaViT-T bf16 ran 1.18x faster unpinned on a shared 2-core EPYC).
        'ENABLE_CPU_PINNING': 'NO',
    }
    if threads:
        props['INFERENCE_NUM_THREADS'] = str(threads)
    props.update(config or {})
    return ov.Core().compile_model(model, 'CPU', props)


def verify(model: torch.nn.Module,
           xml_file: str,
           sizes: Sequence[Tuple],
           tolerance: float = 1e-4) -> float:
    """Compare OpenVINO (CPU, f32) with PyTorch at each size; print every
    difference. Returns the largest; raises AssertionError on a shape.

    mismatch or a difference over ``tolerance * max(1, |logits|)``.
    """
    compiled = compile_model(xml_file, 'fp32')
    return pytorch2onnx.compare_logits(model,
                                       lambda x: compiled({INPUT: x})[OUTPUT],
                                       sizes, tolerance, 'OpenVINO',
                                       'OpenVINO')


def missing_packages() -> list:
    import importlib.util
    return [
        n for n in ('onnx', 'onnxscript', 'openvino')
        if importlib.util.find_spec(n) is None
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_packages()
    if missing:
        print(
            f'error: the OpenVINO export needs {", ".join(missing)}: '
            f'pip install {" ".join(missing)} (or pip install '
            '"davit_ext[deploy]").',
            file=sys.stderr)
        return 1
    import davit_ext  # noqa: F401  (our modules and model names)
    from davit_ext.errors import CheckpointError
    out_dir = osp.dirname(osp.abspath(args.output_file))
    try:
        if osp.isdir(args.output_file):
            raise FileNotFoundError(
                f'--output-file {args.output_file!r} is a directory; give '
                'a file name such as davit.xml.')
        cfg = pytorch2onnx.load_model_config(args.config)
        model = pytorch2onnx.LogitsOnly(
            pytorch2onnx.build_classifier(cfg, args.checkpoint)).eval()
        os.makedirs(out_dir, exist_ok=True)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError,
            RuntimeError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    # Written in a temporary folder next to the target, moved there only
    # once all went well.
    tmp = tempfile.mkdtemp(prefix='.tmp-ov-', dir=out_dir)
    try:
        xml = osp.join(tmp, 'model.xml')
        try:
            export(model, xml, args.shape, args.dynamic_export, args.batch,
                   args.opset)
        except Exception as e:  # the exporters' errors are long: one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ''
            print(
                f'error: OpenVINO export failed ({type(e).__name__}: '
                f'{first})',
                file=sys.stderr)
            return 1
        dims = 'N, 3, H, W; all dynamic' if args.dynamic_export else \
            f'{args.batch}, 3, {args.shape[0]}, {args.shape[1]}'
        print(f'Exported via ONNX (opset {args.opset}) and OpenVINO\'s ONNX '
              f'frontend: input ({dims}) -> logits, fp32 weights')
        if args.verify:
            if args.dynamic_export:
                sizes = args.verify_sizes or \
                    pytorch2onnx.default_verify_sizes(args.shape, True)
            else:
                sizes = [(args.batch, *args.shape,
                          '--shape, the only size of a static IR')]
            try:
                verify(model, xml, sizes, args.tolerance)
            except AssertionError as e:
                print(
                    f'error: {e} {args.output_file} not written.',
                    file=sys.stderr)
                return 1
        target_bin = args.output_file[:-len('.xml')] + '.bin'
        umask = os.umask(0)
        os.umask(umask)
        for src, dst in ((osp.join(tmp, 'model.bin'), target_bin),
                         (xml, args.output_file)):
            os.chmod(src, 0o666 & ~umask)
            os.replace(src, dst)
        print(f'Saved {args.output_file} and {target_bin}')
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
