"""Generate a small synthetic shapes dataset for detection and segmentation.

Each image has 1-4 filled shapes (circle, square, triangle; one colour
family per class) on a noisy, shaded background. Widths and heights are drawn
from ``--min-size``..``--max-size`` (odd sizes included), so most are not
multiples of 32. Shapes may overlap; a later shape hides the earlier one, and
every annotation describes the visible part only, pixel-exact (no
anti-aliasing). Written under OUT_DIR::

    train/*.png, val/*.png                    images
    annotations/instances_{train,val}.json    COCO instances (RLE masks)
    ann_dir/{train,val}/*.png                 label maps: 0 background,
                                              1..K the classes (mmseg)
    shapes.json                               how the folder was made

Usage::

    python tools/dataset_converters/make_shapes.py data/shapes \
        [--num-train 400] [--num-val 60] [--seed 0] [--overwrite]

The same arguments always give the same files.
"""
import argparse
import json
import os
import os.path as osp
import shutil
import sys

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CLASSES = ('circle', 'square', 'triangle')
# Base RGB colour per class; each shape jitters it, so colour alone is a
# strong but not a perfect cue.
COLOURS = ((220, 60, 50), (60, 190, 70), (60, 90, 220))
MARKER = 'shapes.json'
SUBDIRS = ('train', 'val', 'annotations', 'ann_dir')
# A shape hidden below this fraction of its own area is redrawn elsewhere:
# slivers are unfair targets for a model this small.
MIN_VISIBLE = 0.5


def _background(rng, h, w):
    """Smooth random shading plus pixel noise, uint8 (h, w, 3)."""
    base = rng.uniform(70, 180, size=3)
    # Shading: a bilinear upsampling of a coarse random grid.
    coarse = rng.uniform(-40, 40, size=(3, 3, 3)).astype(np.float32)
    shade = np.array(
        Image.fromarray(coarse[..., 0]).resize((w, h), Image.BILINEAR))
    img = base[None, None, :] + shade[..., None] + rng.normal(
        0, 12, size=(h, w, 3))
    return np.clip(img, 0, 255)


def _shape_mask(rng, cls, h, w):
    """Binary mask (h, w) of one random shape of class ``cls``."""
    side = int(rng.integers(18, max(19, min(h, w) // 2 + 1)))
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    canvas = Image.new('L', (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    if cls == 0:
        draw.ellipse(box, fill=1)
    elif cls == 1:
        # Squares and some rectangles: the class is "axis-aligned box".
        aspect = rng.uniform(0.7, 1.0)
        sh = max(10, int(round(side * aspect)))
        draw.rectangle((x0, y0, x0 + side - 1, y0 + sh - 1), fill=1)
    else:
        apex = x0 + rng.uniform(0.2, 0.8) * (side - 1)
        draw.polygon([(apex, y0), (x0, y0 + side - 1),
                      (x0 + side - 1, y0 + side - 1)],
                     fill=1)
    return np.array(canvas, dtype=bool)


def _make_image(rng, min_size, max_size):
    """One image: (uint8 HxWx3, [(class, visible mask), ...])."""
    h = int(rng.integers(min_size, max_size + 1))
    w = int(rng.integers(min_size, max_size + 1))
    img = _background(rng, h, w)
    num = int(rng.integers(1, 5))
    shapes = []  # (class, full mask), drawn in order
    for _ in range(num):
        for _attempt in range(20):
            cls = int(rng.integers(len(CLASSES)))
            mask = _shape_mask(rng, cls, h, w)
            # Keep every earlier shape mostly visible under the new one.
            hidden = [(m & mask).sum() / m.sum() for _, m in shapes]
            if all(f <= 1 - MIN_VISIBLE for f in hidden):
                shapes.append((cls, mask))
                break
    label = np.zeros((h, w), dtype=np.uint8)
    owner = np.full((h, w), -1, dtype=np.int64)
    for idx, (cls, mask) in enumerate(shapes):
        colour = np.array(COLOURS[cls]) + rng.uniform(-30, 30, size=3)
        # A little texture inside the shape too.
        fill = colour + rng.normal(0, 8, size=(h, w, 3))
        img[mask] = fill[mask]
        label[mask] = cls + 1
        owner[mask] = idx
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    objects = [(cls, owner == idx) for idx, (cls, _) in enumerate(shapes)]
    return img, label, objects


def _coco_annotation(ann_id, img_id, cls, mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, bw, bh = mask_utils.toBbox(rle).tolist()
    rle['counts'] = rle['counts'].decode('ascii')  # JSON needs text
    return dict(
        id=ann_id,
        image_id=img_id,
        category_id=cls + 1,
        bbox=[x, y, bw, bh],
        area=float(mask.sum()),
        iscrowd=0,
        segmentation=rle)


def _check_args(num_train, num_val, min_size, max_size):
    for name, value in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f'{name} must be an integer >= 0, got {value!r}')
    if num_train + num_val == 0:
        raise ValueError('num_train + num_val must be at least 1')
    if not 48 <= min_size <= max_size:
        raise ValueError('image sizes need 48 <= min_size <= max_size, got '
                         f'min_size={min_size}, max_size={max_size}')


def make_shapes(out_dir,
                num_train=400,
                num_val=60,
                seed=0,
                min_size=96,
                max_size=160,
                overwrite=False):
    """Write the dataset under ``out_dir`` and return what was written.

    Returns:
        dict: ``out_dir``, ``classes``, ``num_train``/``num_val`` (images),
        ``num_objects`` per split and the paths of the COCO files
        (``ann_train``/``ann_val``) and label map folders
        (``seg_train``/``seg_val``).
    """
    _check_args(num_train, num_val, min_size, max_size)
    if osp.exists(out_dir) and not osp.isdir(out_dir):
        raise ValueError(f'output {out_dir!r} exists and is not a folder')
    if osp.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(
                f'output folder {out_dir!r} is not empty; nothing was '
                'written. Choose another folder or pass overwrite=True '
                '(--overwrite) to replace the dataset in it.')
        # Only our own entries go: a user's other files stay.
        for sub in SUBDIRS + (MARKER, ):
            path = osp.join(out_dir, sub)
            if osp.isdir(path):
                shutil.rmtree(path)
            elif osp.exists(path):
                os.remove(path)

    rng = np.random.default_rng(seed)
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)]
    info = dict(
        out_dir=out_dir,
        classes=list(CLASSES),
        seed=seed,
        image_sizes=[min_size, max_size],
        num_train=num_train,
        num_val=num_val,
        num_objects={})
    ann_id = 0
    for split, count in (('train', num_train), ('val', num_val)):
        img_dir = osp.join(out_dir, split)
        seg_dir = osp.join(out_dir, 'ann_dir', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(seg_dir, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, label, objects = _make_image(rng, min_size, max_size)
            name = f'{split}_{i:05d}.png'
            Image.fromarray(img).save(osp.join(img_dir, name))
            Image.fromarray(label, mode='L').save(osp.join(seg_dir, name))
            img_id = len(images) + 1
            images.append(
                dict(
                    id=img_id,
                    file_name=name,
                    height=img.shape[0],
                    width=img.shape[1]))
            for cls, mask in objects:
                ann_id += 1
                annotations.append(_coco_annotation(ann_id, img_id, cls, mask))
        ann_file = osp.join(out_dir, 'annotations', f'instances_{split}.json')
        os.makedirs(osp.dirname(ann_file), exist_ok=True)
        with open(ann_file, 'w') as f:
            json.dump(
                dict(
                    images=images,
                    annotations=annotations,
                    categories=categories), f)
        info[f'ann_{split}'] = ann_file
        info[f'seg_{split}'] = seg_dir
        info['num_objects'][split] = len(annotations)
    # Written last: its presence means the dataset is complete.
    with open(osp.join(out_dir, MARKER), 'w') as f:
        json.dump(info, f, indent=2)
    return info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Generate a synthetic shapes dataset (COCO instances '
        'and mmseg label maps).')
    parser.add_argument('out_dir', help='output folder, e.g. data/shapes')
    parser.add_argument(
        '--num-train', type=int, default=400, help='training images')
    parser.add_argument(
        '--num-val', type=int, default=60, help='held-out images')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument(
        '--min-size', type=int, default=96, help='smallest image side')
    parser.add_argument(
        '--max-size', type=int, default=160, help='largest image side')
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='replace the dataset in a non-empty folder')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        info = make_shapes(args.out_dir, args.num_train, args.num_val,
                           args.seed, args.min_size, args.max_size,
                           args.overwrite)
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f'error: {e}')
    print(f'{args.out_dir}: wrote {info["num_train"]} train / '
          f'{info["num_val"]} val images with '
          f'{info["num_objects"].get("train", 0)} / '
          f'{info["num_objects"].get("val", 0)} objects of '
          f'{len(CLASSES)} classes (seed {args.seed}).')


if __name__ == '__main__':
    sys.exit(main())
