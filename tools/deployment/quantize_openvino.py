#!/usr/bin/env python
"""Static int8 OpenVINO IR of a classifier (NNCF post-training quantization),
with its held-out top-1 next to fp32's.

    python tools/deployment/quantize_openvino.py CONFIG CHECKPOINT \\
        --output-file davit-int8.xml [--calib-size 300] [--json FILE]

1. The model is exported as ``pytorch2openvino.py --dynamic-export`` does
   (our ONNX graph, fp32 IR).
2. ``nncf.quantize`` calibrates the activations' int8 ranges on
   ``--calib-size`` images of the config's *training* split (read with the
   test pipeline: no augmentation) and quantizes the IR
   (``model_type=TRANSFORMER``: NNCF's scheme for attention models).
3. The config's test split is classified by PyTorch (fp32), the fp32 IR and
   the int8 IR (OpenVINO CPU); the three top-1 accuracies and the int8 loss
   are printed (and written to ``--json``).

The int8 IR is written only when it loses at most ``--max-loss`` points of
top-1 against the fp32 IR (default 0.5): a quantized model that got worse is
not shipped. Needs ``openvino`` and ``nncf``.
"""
import argparse
import json
import os
import os.path as osp
import shutil
import sys
import tempfile
from typing import Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import pytorch2onnx  # noqa: E402
import pytorch2openvino  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', help='config file (with train/test data)')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument(
        '--output-file', required=True, help='the int8 IR: NAME.xml')
    p.add_argument(
        '--calib-size',
        type=int,
        default=300,
        help='training images to calibrate on (default 300)')
    p.add_argument(
        '--max-loss',
        type=float,
        default=0.5,
        help='largest top-1 loss (points) of int8 vs the fp32 IR for which '
        'the int8 IR is written (default 0.5)')
    p.add_argument(
        '--threads', type=int, default=0, help='OpenVINO threads (0: all)')
    p.add_argument('--json', default=None, help='write the accuracies here')
    args = p.parse_args(argv)
    if not args.output_file.endswith('.xml'):
        p.error('--output-file must end in .xml (the IR is NAME.xml and '
                f'NAME.bin); got {args.output_file!r}')
    if args.calib_size < 1:
        p.error(f'--calib-size must be >= 1; got {args.calib_size}')
    return args


def batches(cfg,
            split: str,
            limit: int = 0) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(preprocessed images, labels) batches of ``split`` ('train' or 'test'),
    read with the test pipeline and normalised by the config's data
    preprocessor, as in training; at most ``limit`` images (0: all)."""
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner

    from davit_ext.registry import MODELS

    # The runner's preprocessor: the model's own, else the config's
    # top-level one (the runner merges it into the model the same way).
    pre_cfg = dict(
        cfg.model.get('data_preprocessor') or cfg.get('data_preprocessor')
        or {})
    pre_cfg.setdefault('type', 'mmpretrain.ClsDataPreprocessor')
    with DefaultScope.overwrite_default_scope('davit_ext'):
        preprocess = MODELS.build(pre_cfg)
    loader_cfg = cfg.get(f'{split}_dataloader').copy()
    loader_cfg['dataset'] = loader_cfg['dataset'].copy()
    loader_cfg['dataset']['pipeline'] = cfg.test_dataloader.dataset.pipeline
    loader_cfg['sampler'] = dict(type='DefaultSampler', shuffle=False)
    with DefaultScope.overwrite_default_scope(
            cfg.get('default_scope', 'davit_ext')):
        loader = Runner.build_dataloader(loader_cfg)
    out, seen = [], 0
    with torch.no_grad():
        for batch in loader:
            data = preprocess(batch, False)
            x = data['inputs'].float()
            y = torch.cat([s.gt_label for s in data['data_samples']])
            if limit:
                x, y = x[:limit - seen], y[:limit - seen]
            out.append((x.numpy(), y.numpy()))
            seen += len(y)
            if limit and seen >= limit:
                break
    return out


def top1(predict, data) -> float:
    right = total = 0
    for x, y in data:
        right += int((predict(x).argmax(1) == y).sum())
        total += len(y)
    return 100. * right / total


def main(argv=None) -> int:
    args = parse_args(argv)
    import importlib.util
    missing = [
        n for n in ('onnx', 'onnxscript', 'openvino', 'nncf')
        if importlib.util.find_spec(n) is None
    ]
    if missing:
        print(
            f'error: static int8 needs {", ".join(missing)}: pip install '
            f'{" ".join(missing)} (or pip install "davit_ext[deploy]").',
            file=sys.stderr)
        return 1
    import nncf
    import openvino as ov

    import davit_ext  # noqa: F401
    from davit_ext.errors import CheckpointError
    try:
        cfg = pytorch2onnx.load_model_config(args.config)
        classifier = pytorch2onnx.build_classifier(cfg, args.checkpoint)
        calib = batches(cfg, 'train', args.calib_size)
        test = batches(cfg, 'test')
    except (CheckpointError, FileNotFoundError, ValueError, KeyError,
            RuntimeError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    model = pytorch2onnx.LogitsOnly(classifier).eval()
    shape = calib[0][0].shape[2:]
    out_dir = osp.dirname(osp.abspath(args.output_file))
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.tmp-int8-', dir=out_dir)
    try:
        fp32_xml = osp.join(tmp, 'fp32.xml')
        pytorch2openvino.export(model, fp32_xml, shape, dynamic=True)
        fp32_ir = ov.Core().read_model(fp32_xml)
        int8_ir = nncf.quantize(
            fp32_ir,
            nncf.Dataset([x for x, _ in calib]),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calib))
        int8_xml = osp.join(tmp, 'int8.xml')
        ov.save_model(int8_ir, int8_xml, compress_to_fp16=False)
        fp32_c = pytorch2openvino.compile_model(fp32_xml, 'fp32', args.threads)
        int8_c = pytorch2openvino.compile_model(int8_xml, 'fp32', args.threads)
        with torch.no_grad():
            acc: Dict[str, float] = dict(
                pytorch_fp32=top1(lambda x: model(torch.from_numpy(x)).numpy(),
                                  test),
                openvino_fp32=top1(lambda x: fp32_c(x)[0], test),
                openvino_int8=top1(lambda x: int8_c(x)[0], test))
        loss = acc['openvino_fp32'] - acc['openvino_int8']
        n_test = sum(len(y) for _, y in test)
        n_calib = sum(len(y) for _, y in calib)
        print(f'held-out top-1 on {n_test} images: PyTorch fp32 '
              f"{acc['pytorch_fp32']:.2f} %, OpenVINO fp32 "
              f"{acc['openvino_fp32']:.2f} %, OpenVINO int8 "
              f"{acc['openvino_int8']:.2f} % (NNCF, {n_calib} calibration "
              f'images): int8 loses {loss:.2f} points')
        fake_quantize = sum(op.get_type_name() == 'FakeQuantize'
                            for op in int8_ir.get_ops())
        result = dict(
            top1=acc,
            int8_loss_points=loss,
            test_images=n_test,
            calib_images=n_calib,
            fake_quantize_ops=fake_quantize,
            written=loss <= args.max_loss)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(result, f, indent=2)
        if loss > args.max_loss:
            print(
                f'error: int8 loses {loss:.2f} points (> --max-loss '
                f'{args.max_loss}): {args.output_file} not written.',
                file=sys.stderr)
            return 1
        os.replace(
            osp.join(tmp, 'int8.bin'),
            args.output_file[:-len('.xml')] + '.bin')
        os.replace(int8_xml, args.output_file)
        print(f'Saved {args.output_file} ({fake_quantize} FakeQuantize ops)')
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
