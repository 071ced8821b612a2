"""The transfer demo behind ``bash tools/run_transfer_demo.sh``.

Does pretraining help a DaViT learn new classes from a few images? On
scikit-learn's handwritten digits (offline, inside its wheel):

1. Exports the digits to data/digits (tools/dataset_converters/
   digits_to_folder.py) and writes CustomDataset annotation files under
   data/digits/transfer/: the digits 0-4 (train/held-out), and the digits
   5-9 with only ``--shots`` training images per class (the first ones of
   each class in the export's order) plus all their held-out images.
2. Pretrains the mini DaViT on the digits 0-4 with tools/train.py.
3. Fine-tunes it on the few 5-9 images with tools/train.py: backbone from
   step 2 (``init_cfg=dict(type='Pretrained', prefix='backbone')``), a new
   5-class head.
4. Trains the same model from scratch on the same images with the same
   schedule (same config but the initial weights).
5. Evaluates both on the held-out 5-9 images with tools/test.py and prints
   the two top-1 figures (step 2's own held-out top-1 is in its log).

Each run writes into a new folder work_dirs/transfer_demo/<time>.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DATA = 'data/digits'
PRETRAIN = 'configs/digits/davit-mini_1xb64_digits0to4.py'
SCRATCH = 'configs/digits/davit-mini_1xb10_digits5to9-10shot.py'
FINETUNE = ('configs/digits/'
            'davit-mini_digits0to4-pre_1xb10_digits5to9-10shot.py')
OLD, NEW = '01234', '56789'


def banner(text: str) -> None:
    print(f'\n=== {text} ===', flush=True)


def run(args) -> None:
    """Run a tool as a user would; stop the demo if it fails."""
    print('$ ' + ' '.join(args), flush=True)
    proc = subprocess.run([sys.executable] + args, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f'demo stopped: {args[0]} exited with status '
                         f'{proc.returncode} (its message is above).')


def write_annotations(data: str, shots: int) -> dict:
    """CustomDataset ann files of the two tasks; returns image counts."""
    out = osp.join(data, 'transfer')
    os.makedirs(out, exist_ok=True)
    counts = {}

    def write(name, split, digits, limit=None):
        lines = []
        for label, digit in enumerate(digits):
            files = sorted(os.listdir(osp.join(data, split, digit)))
            lines += [f'{digit}/{f} {label}' for f in files[:limit]]
        with open(osp.join(out, name), 'w') as f:
            f.write('\n'.join(lines) + '\n')
        counts[name] = len(lines)

    write('digits0to4_train.txt', 'train', OLD)
    write('digits0to4_val.txt', 'val', OLD)
    write('digits5to9_10shot_train.txt', 'train', NEW, shots)
    write('digits5to9_val.txt', 'val', NEW)
    return counts


def train(config: str, work_dir: str, options=()) -> str:
    """Train ``config`` into ``work_dir``; return its last checkpoint."""
    extra = ['--cfg-options'] + list(options) if options else []
    run(['tools/train.py', config, '--work-dir', work_dir] + extra)
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def train_and_test(config: str, work_dir: str, options=()) -> float:
    """Train ``config`` into ``work_dir``, test its last checkpoint with
    tools/test.py and return the held-out top-1 (%)."""
    checkpoint = train(config, work_dir, options)
    metrics = osp.join(work_dir, 'test_metrics.json')
    run([
        'tools/test.py', config, checkpoint, '--work-dir',
        osp.join(work_dir, 'test'), '--out', metrics, '--out-item', 'metrics'
    ])
    with open(metrics) as f:
        return float(json.load(f)['accuracy/top1'])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--shots',
        type=int,
        default=10,
        help='labelled training images per new class (default 10; the '
        'configs are named for 10)')
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    start = time.time()

    banner('1/4 Export the digits; annotation files of the two tasks')
    run(['tools/dataset_converters/digits_to_folder.py', DATA])
    counts = write_annotations(DATA, args.shots)
    for name, n in counts.items():
        print(f'{DATA}/transfer/{name}: {n} images')

    work = osp.join('work_dirs', 'transfer_demo',
                    time.strftime('%Y%m%d_%H%M%S'))
    banner(f'2/4 Pretrain on the digits 0-4 ({work}/pretrain)')
    pretrained = train(PRETRAIN, osp.join(work, 'pretrain'))

    banner(f'3/4 Fine-tune on {args.shots} images per digit 5-9')
    t = time.time()
    top1_ft = train_and_test(
        FINETUNE, osp.join(work, 'finetune'),
        [f'model.backbone.init_cfg.checkpoint={pretrained}'])
    time_ft = time.time() - t

    banner(f'4/4 Same model from scratch on the same {args.shots} images '
           'per digit')
    t = time.time()
    top1_scratch = train_and_test(SCRATCH, osp.join(work, 'scratch'))
    time_scratch = time.time() - t

    wall = time.time() - start
    n_train = counts['digits5to9_10shot_train.txt']
    n_val = counts['digits5to9_val.txt']
    banner('Transfer summary')
    print(f'pretrained on the digits 0-4 : {counts["digits0to4_train.txt"]} '
          f'images, {pretrained}')
    print(f'digits 5-9, {n_train} training images, top-1 on {n_val} '
          f'held-out images:')
    print(f'  fine-tuned from 0-4        : {top1_ft:.2f} % '
          f'({time_ft:.0f} s)')
    print(f'  from scratch (same budget) : {top1_scratch:.2f} % '
          f'({time_scratch:.0f} s)')
    print(f'work dirs                    : {work}/{{pretrain,finetune,'
          f'scratch}}')
    print(
        f'demo wall time               : {wall:.0f} s ({wall / 60:.1f} min)',
        flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
