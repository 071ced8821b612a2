"""Export scikit-learn's handwritten digits to mmpretrain's folder layout.

scikit-learn ships 1,797 8x8 grey images of the digits 0-9 inside its wheel
(``sklearn.datasets.load_digits``), so this works offline. They are written
as PNGs (upsampled, bicubic) in the layout mmpretrain's ``CustomDataset``
reads without annotation files::

    OUT/train/<digit>/<index>.png      1,442 images
    OUT/val/<digit>/<index>.png          355 images (held out)
    OUT/export.json                    how the folder was made

The split is fixed and needs no random state: within each class, in dataset
order, every fifth image (positions 4, 9, 14, ...) is held out.

Usage::

    python tools/dataset_converters/digits_to_folder.py data/digits [--size 32]

Running it again with the same settings leaves a finished export untouched;
a different or partial folder is refused unless ``--overwrite`` is given.
"""
import argparse
import json
import os
import os.path as osp
import shutil
import sys

import numpy as np
from PIL import Image

HOLD_OUT_EVERY = 5
MARKER = 'export.json'


def split_indices(labels: np.ndarray):
    """Return (train, val) index lists: every 5th image of a class is val."""
    train, val = [], []
    seen = {}
    for idx, label in enumerate(labels.tolist()):
        pos = seen.get(label, 0)
        seen[label] = pos + 1
        (val if pos % HOLD_OUT_EVERY == HOLD_OUT_EVERY -
         1 else train).append(idx)
    return train, val


def to_image(pixels: np.ndarray, size: int) -> Image.Image:
    """8x8 ink intensities in 0..16 -> ``size`` x ``size`` 8-bit image."""
    grey = np.clip(np.rint(pixels * (255. / 16.)), 0, 255).astype(np.uint8)
    img = Image.fromarray(grey.reshape(8, 8), mode='L')
    if size != 8:
        img = img.resize((size, size), Image.BICUBIC)
    return img


def export(out_dir: str, size: int = 32, overwrite: bool = False) -> dict:
    """Write the dataset under ``out_dir``; return the export description."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, val = split_indices(digits.target)
    info = dict(
        source='sklearn.datasets.load_digits',
        image_size=size,
        split=f'every {HOLD_OUT_EVERY}th image of each class is held out',
        classes=[str(c) for c in range(10)],
        num_train=len(train),
        num_val=len(val))

    marker = osp.join(out_dir, MARKER)
    if osp.isdir(out_dir) and os.listdir(out_dir):
        if osp.isfile(marker):
            with open(marker) as f:
                if json.load(f) == info:
                    print(f'{out_dir}: digits already exported '
                          f'({len(train)} train / {len(val)} val), kept.')
                    return info
        if not overwrite:
            raise SystemExit(
                f'error: output folder {out_dir!r} is not empty and is not '
                f'an export with these settings; nothing was written. '
                f'Choose another folder, or pass --overwrite to replace it.')
        for sub in ('train', 'val', MARKER):
            path = osp.join(out_dir, sub)
            if osp.isdir(path):
                shutil.rmtree(path)
            elif osp.exists(path):
                os.remove(path)

    for split, indices in (('train', train), ('val', val)):
        for idx in indices:
            label = str(int(digits.target[idx]))
            folder = osp.join(out_dir, split, label)
            os.makedirs(folder, exist_ok=True)
            to_image(digits.images[idx],
                     size).save(osp.join(folder, f'{idx:04d}.png'))
    # Written last: its presence means the export is complete.
    with open(marker, 'w') as f:
        json.dump(info, f, indent=2)
    print(f'{out_dir}: wrote {len(train)} train and {len(val)} held-out '
          f'{size}x{size} digit images.')
    return info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export sklearn digits to a CustomDataset folder.')
    parser.add_argument('out_dir', help='output folder, e.g. data/digits')
    parser.add_argument(
        '--size', type=int, default=32, help='image side (default 32)')
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='replace a folder holding a different export')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.size < 8:
        raise SystemExit(f'error: --size must be at least 8, got {args.size}')
    export(args.out_dir, args.size, args.overwrite)


if __name__ == '__main__':
    sys.exit(main())
