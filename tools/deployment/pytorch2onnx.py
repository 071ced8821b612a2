#!/usr/bin/env python
"""Export a DaViT (or any mmpretrain) image classifier to ONNX.

    python tools/deployment/pytorch2onnx.py CONFIG CHECKPOINT \\
        --output-file davit.onnx [--shape H W] [--dynamic-export] [--verify]

CONFIG is a config file or a model name (``davit-tiny_3rdparty_in1k``,
``...-official``); CHECKPOINT a local file or URL. The graph maps a batch of
*preprocessed* images to logits::

    input  float32 (N, 3, H, W): RGB, (pixel - mean) / std with the config's
           data_preprocessor mean/std (ImageNet's for our configs)
    logits float32 (N, num_classes)

``--dynamic-export`` makes N, H and W dynamic: one file runs every batch and
image size. The stem padding, the padding of odd maps before each downsample
and the padding of maps to a multiple of the window (or up to the window when
smaller) are computed in the graph from the input's shape, in both forwards
(default and ``official=True``). Without it the graph takes
``(1, 3, *--shape)`` only.

Exporter: torch's maintained exporter (``torch.onnx.export(...,
dynamo=True)``: ``torch.export`` with dynamic shapes, ops translated by
onnxscript), opset 18 by default (``--opset`` 18 to 23). The legacy
TorchScript exporter is not used: it traces sizes as constants, so its graph
only runs at the example's size.

``--verify`` runs the written file in onnxruntime and compares its logits
with PyTorch's at several sizes: with ``--dynamic-export`` the ``--shape``
size at batch 1 and 3, a non-square, an odd and an odd non-square size and
one smaller than a window (``--verify-sizes`` replaces that list); it prints
each difference and fails when one exceeds ``--tolerance`` (1e-4) times the
logits' scale where that is above 1. The file is written only when the export
(and ``--verify``, if asked) succeeded; an existing file is not touched
otherwise.
"""
import argparse
import os
import os.path as osp
import sys
import tempfile
import warnings
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch

EXPORTER = 'torch.onnx.export(dynamo=True) (torch.export + onnxscript)'
# torch's exporter implements its ops from opset 18 on (torchlib); below it
# relies on a version converter that fails on this graph's ops. 23 is the
# newest opset torch 2.14's exporter writes and onnxruntime 1.2x reads.
MIN_OPSET, MAX_OPSET = 18, 23
DEFAULT_OPSET = 18
INPUT, OUTPUT = 'input', 'logits'


def _size_triple(text: str) -> Tuple[int, int, int]:
    """``'NxHxW'`` -> (N, H, W), for ``--verify-sizes``."""
    try:
        n, h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected NxHxW (e.g. 2x200x300); got {text!r}')
    if min(n, h, w) < 1:
        raise argparse.ArgumentTypeError(
            f'batch, height and width must be >= 1; got {text!r}')
    return n, h, w


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export an mmpretrain/davit_ext classifier to ONNX')
    parser.add_argument('config', help='config file or model name')
    parser.add_argument('checkpoint', help='checkpoint file or URL')
    parser.add_argument(
        '--output-file', required=True, help='where to write the .onnx file')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        default=[224, 224],
        metavar=('H', 'W'),
        help='input height and width of the example (and of the graph '
        'without --dynamic-export); default: 224 224')
    parser.add_argument(
        '--dynamic-export',
        action='store_true',
        help='make batch, height and width dynamic')
    parser.add_argument(
        '--opset',
        type=int,
        default=DEFAULT_OPSET,
        help=f'ONNX opset, {MIN_OPSET}..{MAX_OPSET} '
        f'(default: {DEFAULT_OPSET})')
    parser.add_argument(
        '--verify',
        action='store_true',
        help='check the ONNX logits against PyTorch with onnxruntime')
    parser.add_argument(
        '--verify-sizes',
        type=_size_triple,
        nargs='+',
        metavar='NxHxW',
        help='sizes --verify checks with --dynamic-export (default: see '
        'the module docstring)')
    parser.add_argument(
        '--tolerance',
        type=float,
        default=1e-4,
        help='largest |logit difference| --verify accepts, times the '
        'logits\' scale where it exceeds 1 (default: 1e-4)')
    args = parser.parse_args(argv)
    # Checked before anything is built or exported.
    if min(args.shape) < 1:
        parser.error(f'--shape must be positive; got {args.shape}')
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        parser.error(f'--opset {args.opset} is not supported: the exporter '
                     f'({EXPORTER}) writes opsets {MIN_OPSET} to '
                     f'{MAX_OPSET}; leave --opset out for {DEFAULT_OPSET}.')
    if args.verify_sizes and not args.dynamic_export:
        parser.error('--verify-sizes needs --dynamic-export (a static graph '
                     'runs at (1, 3, *--shape) only)')
    return args


def load_model_config(config: str):
    """A Config from a file, or from our model hub for a model name."""
    from davit_ext.hub import load_config
    if config.endswith('.py'):
        if not osp.isfile(config):
            raise FileNotFoundError(f'No config file at {config!r}.')
        return load_config(config)
    from mmpretrain.apis import ModelHub
    return ModelHub.get(config).config  # clear error for unknown names


def build_classifier(cfg, checkpoint: str) -> torch.nn.Module:
    """Build ``cfg.model`` in its scope and load ``checkpoint`` strictly."""
    from mmengine.registry import DefaultScope

    from davit_ext.registry import MODELS
    from davit_ext.weights import fit_pretrained, load_checkpoint_file
    from davit_ext.weights.layouts import unwrap_state_dict
    model_cfg = cfg.model.copy()
    scope = model_cfg.pop('_scope_', cfg.get('default_scope', 'davit_ext'))
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(model_cfg)
    # Safe loading (weights_only, sha256-checked downloads, clear offline
    # message), then a strict fit with every mismatch listed.
    ckpt = load_checkpoint_file(checkpoint, map_location='cpu')
    fit_pretrained(model, ckpt, checkpoint, 'the config\'s model', strict=True)
    model.load_state_dict(
        unwrap_state_dict(ckpt, source=checkpoint), strict=True)
    return model.eval()


class LogitsOnly(torch.nn.Module):
    """``classifier(x, mode='tensor')``: preprocessed images -> logits."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(x, mode='tensor')
        if isinstance(out, (tuple, list)):  # heads with several outputs
            out = out[-1]
        return out


class ExportError(RuntimeError):
    """The exporter failed or wrote a graph that is not what was asked."""


def export(model: torch.nn.Module,
           output_file: str,
           shape: Sequence[int],
           dynamic: bool,
           opset: int = DEFAULT_OPSET,
           batch: int = 1) -> None:
    """Write ``model`` (images -> logits) to ``output_file`` as ONNX.

    Args:
        model (nn.Module): Maps a (N, 3, H, W) batch to (N, classes) logits.
        output_file (str): Path of the .onnx file (weights inside it).
        shape (Sequence[int]): H, W of the example input (and of the graph
            when not ``dynamic``).
        dynamic (bool): Make batch, height and width dynamic.
        opset (int): ONNX opset. Defaults to 18.
        batch (int): Batch of the graph when not ``dynamic``. Defaults to 1.
    """
    import onnx
    if dynamic:
        # Batch 2 in the example: sizes 0/1 would be specialised.
        example = torch.randn(2, 3, *shape)
        Dim = torch.export.Dim
        dynamic_shapes = ({
            0: Dim('batch', min=1),
            2: Dim('height', min=1),
            3: Dim('width', min=1)
        }, )
    else:
        example, dynamic_shapes = torch.randn(batch, 3, *shape), None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings('ignore', category=UserWarning)
        program = torch.onnx.export(
            model, (example, ),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            verbose=False)
    program.save(output_file, external_data=False)
    # torch.export may "refine" a dynamic dim into a constant where the
    # model branches on it; such a graph would fail at other sizes.
    graph = onnx.load(output_file, load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    if dynamic:
        fixed = [
            f'{name}={d.dim_value}'
            for name, d in zip(('batch', '', 'height', 'width'), dims)
            if name and not d.dim_param
        ]
        if fixed:
            raise ExportError(
                'the exporter fixed ' + ', '.join(fixed) + ' instead of '
                'keeping them dynamic: the model branches on the input size '
                'somewhere the graph cannot express.')


def default_verify_sizes(shape: Sequence[int],
                         dynamic: bool) -> List[Tuple[int, int, int, str]]:
    """(N, H, W, what) cases that ``verify`` checks by default."""
    H, W = shape
    if not dynamic:
        return [(1, H, W, '--shape, the only size of a static graph')]
    return [(1, H, W, 'square' if H == W else '--shape'),
            (3, H, W, 'batch > 1'), (2, 200, 300, 'non-square'),
            (1, 225, 225, 'odd'), (1, 97, 131, 'odd, non-square'),
            (1, 24, 24, 'smaller than a window, stem map 6x6')]


def verify(model: torch.nn.Module,
           output_file: str,
           sizes: Sequence[Tuple],
           tolerance: float = 1e-4) -> float:
    """Compare onnxruntime with PyTorch at each size; print every difference.

    Args:
        model (nn.Module): The exported model (images -> logits).
        output_file (str): The .onnx file.
        sizes (Sequence[tuple]): ``(N, H, W)`` or ``(N, H, W, what)`` cases.
        tolerance (float): Largest accepted max |logit difference|, times
            the logits' largest magnitude where it exceeds 1.

    Returns:
        float: The largest difference seen.

    Raises:
        AssertionError: a shape mismatch or a difference over the limit.
    """
    import onnx
    import onnxruntime as ort
    onnx.checker.check_model(output_file)
    session = ort.InferenceSession(
        output_file, providers=['CPUExecutionProvider'])
    return compare_logits(model,
                          lambda x: session.run([OUTPUT], {INPUT: x})[0],
                          sizes, tolerance, 'onnxruntime', 'ONNX')


def compare_logits(model: torch.nn.Module, run: Callable,
                   sizes: Sequence[Tuple], tolerance: float, runtime: str,
                   what: str) -> float:
    """The check behind ``--verify`` of the exporters: ``run`` (a runtime's
    ``numpy images -> numpy logits``) against PyTorch at each size, every
    difference printed; ``runtime``/``what`` name the runtime and its graph in
    the messages. Returns the largest difference.

    Raises:
        AssertionError: a shape mismatch or a difference over
        ``tolerance * max(1, |logits|)``.
    """
    generator = torch.Generator().manual_seed(0)
    worst, failed = 0., []
    for case in sizes:
        n, h, w = case[:3]
        note = f' ({case[3]})' if len(case) > 3 else ''
        x = torch.randn(n, 3, h, w, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = run(x.numpy())
        if got.shape != expected.shape:
            raise AssertionError(f'at {n}x3x{h}x{w} the {what} logits have '
                                 f'shape {got.shape}, PyTorch '
                                 f'{expected.shape}.')
        diff = float(np.abs(got - expected).max())
        scale = float(np.abs(expected).max())
        limit = tolerance * max(1., scale)
        ok = diff <= limit
        print(f'verify {n}x3x{h}x{w}{note}: max |logit diff| {runtime} vs '
              f'PyTorch {diff:.2e} (logits up to {scale:.2f}, limit '
              f'{limit:.1e}) {"ok" if ok else "FAILED"}')
        worst = max(worst, diff)
        if not ok:
            failed.append(f'{n}x3x{h}x{w}')
    if failed:
        raise AssertionError(f'{what} and PyTorch logits differ beyond the '
                             f'limit at {", ".join(failed)} (see above).')
    return worst


def missing_packages(verify: bool) -> List[str]:
    """Packages the export (and ``--verify``) needs that are not installed."""
    import importlib.util
    names = ['onnx', 'onnxscript'] + (['onnxruntime'] if verify else [])
    return [n for n in names if importlib.util.find_spec(n) is None]


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_packages(args.verify)
    if missing:
        print(
            f'error: the ONNX export needs {", ".join(missing)}: '
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
                'a file name such as davit.onnx.')
        cfg = load_model_config(args.config)
        model = LogitsOnly(build_classifier(cfg, args.checkpoint)).eval()
        os.makedirs(out_dir, exist_ok=True)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError,
            RuntimeError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    # Written next to the target, moved there only once all went well.
    fd, tmp = tempfile.mkstemp(suffix='.onnx', prefix='.tmp-', dir=out_dir)
    os.close(fd)
    try:
        try:
            export(model, tmp, args.shape, args.dynamic_export, args.opset)
        except Exception as e:  # the exporter's errors are long: one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ''
            print(
                f'error: ONNX export failed ({type(e).__name__}: {first})',
                file=sys.stderr)
            return 1
        dims = 'N, 3, H, W; all dynamic' if args.dynamic_export else \
            f'1, 3, {args.shape[0]}, {args.shape[1]}'
        print(f'Exported with {EXPORTER}, opset {args.opset}: input '
              f'({dims}) -> logits')
        if args.verify:
            sizes = args.verify_sizes or default_verify_sizes(
                args.shape, args.dynamic_export)
            try:
                verify(model, tmp, sizes, args.tolerance)
            except AssertionError as e:
                print(
                    f'error: {e} {args.output_file} not written.',
                    file=sys.stderr)
                return 1
        # mkstemp makes the file private: give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, args.output_file)
        print(f'Saved {args.output_file}')
        return 0
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


if __name__ == '__main__':
    sys.exit(main())
