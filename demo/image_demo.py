#!/usr/bin/env python
"""Classify one image with a DaViT (or any mmpretrain) model.

    python demo/image_demo.py IMG MODEL [--pretrained CKPT] [--device cpu]

MODEL is a model name (``python -c "import davit_ext, mmpretrain;
print(mmpretrain.list_models('davit'))"``) or a config file. Without
``--pretrained`` a model name loads the weights its metafile lists (a
download); pass a local checkpoint file or another URL with ``--pretrained``.
Prints the top-1 prediction as JSON.
"""
import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Image classification demo (davit_ext / mmpretrain)')
    parser.add_argument('img', help='image file')
    parser.add_argument('model', help='model name or config file')
    parser.add_argument(
        '--pretrained',
        default=None,
        help='checkpoint file or URL (default: the weights the metafile '
        "lists for a model name, a config's load_from for a config file)")
    parser.add_argument(
        '--device',
        default=None,
        help='device to run on, e.g. cpu or cuda:0 (default: cuda if '
        'available, else cpu)')
    parser.add_argument(
        '--show', action='store_true', help='show the result in a window')
    parser.add_argument(
        '--show-dir',
        default=None,
        help='save a picture of the result into this folder')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    # mmengine imports the deprecated pkg_resources to look for packages.
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
    import torch
    from mmpretrain import inference_model

    # Our models in mmpretrain's hub; checkpoints load with
    # weights_only=True, downloads are checked against a sha256 where one
    # is known and fail with a clear message offline.
    import davit_ext  # noqa: F401
    from davit_ext.cli.config import load_config as read_config
    from davit_ext.errors import CheckpointDownloadError, ConfigError
    from davit_ext.hub import load_config

    if not Path(args.img).is_file():
        print(f'error: no image file at {args.img!r}', file=sys.stderr)
        return 1
    model = args.model
    if Path(model).suffix == '.py':
        if not Path(model).is_file():
            print(f'error: no config file at {model!r}', file=sys.stderr)
            return 1
        try:
            model = read_config(model, load_config)
        except ConfigError as e:  # e.g. a syntax error: file and line
            print(f'error: {e}', file=sys.stderr)
            return 1
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        result = inference_model(
            model,
            args.img,
            pretrained=args.pretrained or True,
            device=device,
            show=args.show,
            show_dir=args.show_dir)
    except CheckpointDownloadError as e:
        print(
            f'error: {e}\nWith this demo, pass the local file as '
            '--pretrained /path/to/checkpoint.pth.',
            file=sys.stderr)
        return 1
    except (OSError, RuntimeError, ValueError) as e:
        # Unknown model names, unreadable checkpoints: the message says what
        # to do; a traceback would bury it.
        print(f'error: {e}', file=sys.stderr)
        return 1
    result.pop('pred_scores', None)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
