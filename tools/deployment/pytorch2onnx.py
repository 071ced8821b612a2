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

``--dynamic-export`` makes N dynamic. H and W are fixed to ``--shape``
(default 224 224): the window partition and padding sizes are computed from
the input size in Python and are traced as constants. ``--verify`` runs the
file in onnxruntime and compares its logits with PyTorch's (at a second batch
size too when N is dynamic); it fails when they differ by more than
``--tolerance`` (1e-4).

Exporter: torch's TorchScript-based exporter (``dynamo=False``). torch 2.9+
defaults to the torch.export-based exporter, which needs the ``onnxscript``
package (not a dependency of davit_ext); the TorchScript exporter needs
nothing more, handles a dynamic batch through ``dynamic_axes``, and its graph
matches PyTorch to ~1e-7 here.
"""
import argparse
import os
import os.path as osp
import sys
import warnings

import numpy as np
import torch


def parse_args(argv=None):
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
        help='input height and width (default: 224 224)')
    parser.add_argument(
        '--dynamic-export',
        action='store_true',
        help='make the batch dimension dynamic')
    parser.add_argument(
        '--opset', type=int, default=17, help='ONNX opset (default: 17)')
    parser.add_argument(
        '--verify',
        action='store_true',
        help='check the ONNX logits against PyTorch with onnxruntime')
    parser.add_argument(
        '--tolerance',
        type=float,
        default=1e-4,
        help='largest |logit difference| --verify accepts (default: 1e-4)')
    args = parser.parse_args(argv)
    if min(args.shape) < 1:
        parser.error(f'--shape must be positive; got {args.shape}')
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

    from davit_ext.checkpoint import (check_state_dict_fits,
                                      load_checkpoint_file)
    from davit_ext.registry import MODELS
    model_cfg = cfg.model.copy()
    scope = model_cfg.pop('_scope_', cfg.get('default_scope', 'davit_ext'))
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(model_cfg)
    # Safe loading (weights_only, sha256-checked downloads, clear offline
    # message), then a strict fit with every mismatch listed.
    ckpt = load_checkpoint_file(checkpoint, map_location='cpu')
    check_state_dict_fits(
        model, ckpt, checkpoint, strict=True, model_name='the config\'s model')
    state_dict = ckpt.get('state_dict', ckpt)
    model.load_state_dict(
        {
            k[len('module.'):] if k.startswith('module.') else k: v
            for k, v in state_dict.items()
        },
        strict=True)
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


def export(model: torch.nn.Module, output_file: str, shape, dynamic: bool,
           opset: int) -> None:
    dummy = torch.randn(1, 3, *shape)
    dynamic_axes = {'input': {0: 'batch'}, 'logits': {0: 'batch'}} \
        if dynamic else None
    out_dir = osp.dirname(osp.abspath(output_file))
    os.makedirs(out_dir, exist_ok=True)
    with warnings.catch_warnings():
        # Sizes traced as constants (expected: H, W are fixed) and the
        # notice that this is the TorchScript exporter.
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', message='.*legacy TorchScript.*')
        warnings.filterwarnings('ignore', message='.*will be removed.*')
        with torch.no_grad():
            torch.onnx.export(
                model, (dummy, ),
                output_file,
                dynamo=False,
                input_names=['input'],
                output_names=['logits'],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True)


def verify(model: torch.nn.Module, output_file: str, shape, dynamic: bool,
           tolerance: float) -> float:
    """Max |logit difference| onnxruntime vs PyTorch; raise if too large."""
    import onnx
    import onnxruntime as ort
    onnx.checker.check_model(onnx.load(output_file))
    session = ort.InferenceSession(
        output_file, providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(0)
    worst = 0.
    for batch in ((1, 3) if dynamic else (1, )):
        x = torch.randn(batch, 3, *shape, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(['logits'], {'input': x.numpy()})[0]
        if got.shape != expected.shape:
            raise AssertionError(f'ONNX logits have shape {got.shape}, '
                                 f'PyTorch {expected.shape}.')
        diff = float(np.abs(got - expected).max())
        print(f'verify: batch {batch}, {shape[0]}x{shape[1]}: max |logit '
              f'diff| onnxruntime vs PyTorch = {diff:.3e}')
        worst = max(worst, diff)
    if worst > tolerance:
        raise AssertionError(f'ONNX and PyTorch logits differ by {worst:.3e}'
                             f' > {tolerance:g}.')
    return worst


def main(argv=None) -> int:
    args = parse_args(argv)
    import davit_ext  # noqa: F401  (our modules and model names)
    from davit_ext.checkpoint import CheckpointError
    try:
        cfg = load_model_config(args.config)
        model = LogitsOnly(build_classifier(cfg, args.checkpoint)).eval()
    except (CheckpointError, FileNotFoundError, ValueError, KeyError,
            RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    export(model, args.output_file, args.shape, args.dynamic_export,
           args.opset)
    batch = 'N (dynamic)' if args.dynamic_export else '1'
    print(f'Saved {args.output_file}: input ({batch}, 3, '
          f'{args.shape[0]}, {args.shape[1]}) -> logits')
    if args.verify:
        try:
            verify(model, args.output_file, args.shape, args.dynamic_export,
                   args.tolerance)
        except AssertionError as e:
            print(f'error: {e}', file=sys.stderr)
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
