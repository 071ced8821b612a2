"""The offline demo behind ``bash tools/run_demo.sh`` (run from the repo root).

1. Builds the three ImageNet DaViT configs and prints their parameters and
   FLOPs next to the published numbers.
2. Exports scikit-learn's 1,797 handwritten digits (shipped inside its
   wheel, no download) to data/digits in mmpretrain's CustomDataset layout,
   1,442 train / 355 held-out images.
3. Trains configs/digits/davit-mini_1xb64_digits32.py with tools/train.py.
4. Evaluates the held-out split with tools/test.py.
5. Classifies one held-out image with mmpretrain's ``inference_model``.

Prints the held-out top-1 (the demo fails below 95 %) and the wall time.
Nothing needs the network. Each run trains into a new folder
work_dirs/digits_demo/<time>, so earlier results are kept.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time
import warnings

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = 'configs/digits/davit-mini_1xb64_digits32.py'
MODEL_NAME = 'davit-mini_1xb64_digits32'
DATA = 'data/digits'
TARGET_TOP1 = 95.0


def banner(text):
    print(f'\n=== {text} ===', flush=True)


def run(args):
    """Run a tool as a user would; stop the demo if it fails."""
    print('$ ' + ' '.join(args), flush=True)
    proc = subprocess.run([sys.executable] + args, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f'demo stopped: {args[0]} exited with status '
                         f'{proc.returncode} (its message is above).')


def classify(checkpoint, image):
    """mmpretrain's inference_model, by model name, on our checkpoint."""
    warnings.filterwarnings('ignore', message='Fail to import ``MultiScale')
    from mmpretrain import inference_model
    from mmpretrain.apis.model import ModelHub

    import davit_ext  # noqa: F401  (safe checkpoint loading included)
    if not ModelHub.has(MODEL_NAME):
        ModelHub.register_model_index(
            osp.join(ROOT, 'configs', 'digits', 'metafile.yml'),
            config_prefix=ROOT)
    return inference_model(
        MODEL_NAME, image, pretrained=checkpoint, device='cpu')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--skip-table',
        action='store_true',
        help='skip step 1 (the published params/FLOPs table)')
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    start = time.time()
    times = {}

    if not args.skip_table:
        banner('1/5 ImageNet configs vs the published table')
        t = time.time()
        run(['tools/analysis_tools/check_published.py'])
        times['table'] = time.time() - t

    banner('2/5 Export scikit-learn digits to ' + DATA)
    t = time.time()
    run(['tools/dataset_converters/digits_to_folder.py', DATA])
    times['export'] = time.time() - t

    work_dir = osp.join('work_dirs', 'digits_demo',
                        time.strftime('%Y%m%d_%H%M%S'))
    banner(f'3/5 Train {CONFIG} (work dir {work_dir})')
    t = time.time()
    run(['tools/train.py', CONFIG, '--work-dir', work_dir])
    times['train'] = time.time() - t
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()

    banner('4/5 Evaluate the held-out split with tools/test.py')
    t = time.time()
    metrics_file = osp.join(work_dir, 'test_metrics.json')
    run([
        'tools/test.py', CONFIG, checkpoint, '--work-dir',
        osp.join(work_dir, 'test'), '--out', metrics_file, '--out-item',
        'metrics'
    ])
    times['test'] = time.time() - t
    with open(metrics_file) as f:
        top1 = float(json.load(f)['accuracy/top1'])

    banner('5/5 Classify one held-out image with inference_model')
    t = time.time()
    label = sorted(os.listdir(osp.join(DATA, 'val')))[3]
    name = sorted(os.listdir(osp.join(DATA, 'val', label)))[0]
    image = osp.join(DATA, 'val', label, name)
    result = classify(checkpoint, image)
    times['infer'] = time.time() - t
    print(f'\n{image} (true digit {label}): predicted '
          f'{result["pred_class"]} with score {result["pred_score"]:.3f}')

    wall = time.time() - start
    passed = top1 >= TARGET_TOP1
    banner('Demo summary')
    print(f'checkpoint       : {checkpoint}')
    print(f'held-out top-1   : {top1:.2f} % on 355 images '
          f'({"PASS" if passed else "FAIL"}: target >= {TARGET_TOP1:.0f} %)')
    print(f'inference        : {image} -> {result["pred_class"]}')
    print('step times       : ' + ', '.join(f'{k} {v:.0f} s'
                                            for k, v in times.items()))
    print(f'demo wall time   : {wall:.0f} s ({wall / 60:.1f} min)', flush=True)
    return 0 if passed else 1


if __name__ == '__main__':
    sys.exit(main())
