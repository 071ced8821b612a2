"""The offline dense-prediction demo behind ``bash tools/run_dense_demo.sh``.

A mini DaViT (embed 32, one block per stage) learns, from scratch and on two
CPU cores, instance segmentation (Mask R-CNN, mmdet) and semantic
segmentation (UperNet, mmseg) of synthetic shapes, through mmdet's and mmseg's
own ``train.py`` and ``test.py`` (shipped in their ``.mim/tools``):

1. Generate the shapes data (tools/dataset_converters/make_shapes.py).
2. Save an untrained checkpoint of each model (fixed seed).
3. Evaluate both untrained checkpoints with ``test.py``.
4. Train each model with ``train.py``.
5. Evaluate the trained checkpoints with ``test.py --show-dir`` (prediction
   pictures by mmdet's and mmseg's visualizers).

Prints bbox mAP, mask mAP and mIoU, untrained vs trained, the wall time of
each stage and where the pictures are. The tools' full logs go to
WORK_DIR/logs. Nothing needs the network.
"""
import argparse
import glob
import importlib.util
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_CONFIG = 'configs/det/mask-rcnn_davit-mini_fpn_1xb4-shapes.py'
SEG_CONFIG = 'configs/seg/upernet_davit-mini_1xb4-shapes.py'
# (label, task, key in the metrics json that test.py writes)
METRICS = [
    ('bbox mAP', 'det', 'coco/bbox_mAP'),
    ('bbox mAP@50', 'det', 'coco/bbox_mAP_50'),
    ('mask mAP', 'det', 'coco/segm_mAP'),
    ('mask mAP@50', 'det', 'coco/segm_mAP_50'),
    ('mIoU (%)', 'seg', 'mIoU'),
]
# What "learned" means here; the demo fails below these.
TARGETS = {'coco/bbox_mAP': 0.5, 'coco/segm_mAP': 0.5, 'mIoU': 70.0}
# Folders this demo owns under WORK_DIR; a rerun replaces only these.
OWN_DIRS = ('logs', 'checkpoints', 'det_untrained', 'seg_untrained',
            'det_train', 'seg_train', 'det_trained', 'seg_trained')
# mmdet's CocoMetric logs this and returns no numbers when a model detects
# nothing at all; for an untrained model that is an honest AP of 0.
NO_DETECTIONS = 'The testing results of the whole dataset is empty'

# Hidden sub-command of this script: save_untrained() for each
# (config, scope, path, seed) that follows it.
SAVE_UNTRAINED = '--save-untrained'


class DemoError(RuntimeError):
    pass


def tool(package, name):
    """Path of an OpenMMLab package's own tool, e.g. mmdet's train.py."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DemoError(f'{package} is not installed in this Python '
                        f'({sys.executable}); see tools/setup_env.sh '
                        '(DAVIT_EXT_DENSE=1).')
    path = osp.join(osp.dirname(spec.origin), '.mim', 'tools', name)
    if not osp.isfile(path):
        raise DemoError(f'{package} ships no {name} at {path}.')
    return path


def data_options(task, data_root):
    """--cfg-options pointing a config at ``data_root``.

    Config variables are resolved when the file is parsed, so overriding
    ``data_root`` alone would change nothing: each use is set.
    """
    root = data_root.rstrip('/') + '/'
    opts = [
        f'{split}_dataloader.dataset.data_root={root}'
        for split in ('train', 'val', 'test')
    ]
    if task == 'det':
        ann = root + 'annotations/instances_val.json'
        opts += [
            f'{split}_evaluator.ann_file={ann}' for split in ('val', 'test')
        ]
    return opts


class Demo:

    def __init__(self, work_dir, num_stages):
        self.work_dir = work_dir
        self.log_dir = osp.join(work_dir, 'logs')
        self.num_stages = num_stages
        self.stage = 0
        self.times = {}

    def begin(self, name):
        self.stage += 1
        print(f'[{self.stage}/{self.num_stages}] {name} ...', end=' ')
        sys.stdout.flush()
        return time.time()

    def end(self, name, start, log=None):
        took = time.time() - start
        self.times[name] = took
        where = f'  (log: {shown_path(log)})' if log else ''
        print(f'{took:.1f} s{where}', flush=True)

    def run(self, name, args):
        """Run ``python ARGS`` as a user would, its output into a log."""
        log = osp.join(self.log_dir,
                       f'{self.stage + 1:02d}_{name.replace(" ", "_")}.log')
        start = self.begin(name)
        with open(log, 'w') as f:
            f.write('$ ' + ' '.join([sys.executable] + args) + '\n')
            f.flush()
            proc = subprocess.run(
                [sys.executable] + args,
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            print('FAILED', flush=True)
            with open(log) as f:
                tail = f.readlines()[-25:]
            raise DemoError(f'{name}: {osp.basename(args[0])} exited with '
                            f'status {proc.returncode}; last lines of '
                            f'{log}:\n' + ''.join(tail))
        self.end(name, start, log)
        return log


def save_untrained(config, scope, path, seed):
    """Build the config's model, init_weights() with a fixed seed, save."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import set_random_seed
    from mmengine.utils import import_modules_from_strings

    cfg = Config.fromfile(osp.join(ROOT, config))
    import_modules_from_strings(**cfg.get('custom_imports', {}))
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    set_random_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)


def read_metrics(test_dir, log, keys):
    """The metrics test.py dumped to WORK/<timestamp>/<timestamp>.json."""
    found = sorted(
        glob.glob(osp.join(test_dir, '[0-9]*_[0-9]*', '[0-9]*_[0-9]*.json')))
    metrics = {}
    if found:
        with open(found[-1]) as f:
            metrics = json.load(f)
    missing = [k for k in keys if k not in metrics]
    if missing:
        with open(log) as f:
            empty = NO_DETECTIONS in f.read()
        if empty and all(k.startswith('coco/') for k in missing):
            return {**metrics, **{k: 0.0 for k in missing}}, True
        raise DemoError(f'metrics {missing} not found in test.py output '
                        f'({found[-1] if found else "no json in " + test_dir}'
                        f'); see {log}.')
    return metrics, False


def shown_path(path):
    """``path`` relative to the repo when inside it, else absolute."""
    rel = osp.relpath(path, ROOT)
    return path if rel.startswith('..') else rel


def pictures(folder):
    return sorted(glob.glob(osp.join(folder, '**', '*.png'), recursive=True))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        'work_dir',
        nargs='?',
        default='work_dirs/dense_demo',
        help='output folder (default work_dirs/dense_demo)')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=60)
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.chdir(ROOT)
    work = osp.abspath(args.work_dir)
    data = osp.join(work, 'data')
    ckpts = osp.join(work, 'checkpoints')
    for sub in OWN_DIRS:
        shutil.rmtree(osp.join(work, sub), ignore_errors=True)
    os.makedirs(osp.join(work, 'logs'))
    os.makedirs(ckpts)
    det_train, det_test = tool('mmdet', 'train.py'), tool('mmdet', 'test.py')
    seg_train, seg_test = tool('mmseg', 'train.py'), tool('mmseg', 'test.py')
    det_opts, seg_opts = data_options('det', data), data_options('seg', data)

    demo = Demo(work, num_stages=8)
    total = time.time()
    print(f'dense demo in {work} (python: {sys.executable})', flush=True)
    demo.run('data', [
        'tools/dataset_converters/make_shapes.py', data, '--num-train',
        str(args.num_train), '--num-val',
        str(args.num_val), '--seed',
        str(args.seed), '--overwrite'
    ])

    # In a child process, like every other stage: mmengine's build logs go
    # to the stage's log, not to the console.
    det_init = osp.join(ckpts, 'mask-rcnn_untrained.pth')
    seg_init = osp.join(ckpts, 'upernet_untrained.pth')
    demo.run('untrained checkpoints', [
        __file__, SAVE_UNTRAINED, DET_CONFIG, 'mmdet', det_init,
        str(args.seed), SEG_CONFIG, 'mmseg', seg_init,
        str(args.seed)
    ])

    tasks = dict(
        det=dict(
            config=DET_CONFIG,
            train=det_train,
            test=det_test,
            init=det_init,
            opts=det_opts),
        seg=dict(
            config=SEG_CONFIG,
            train=seg_train,
            test=seg_test,
            init=seg_init,
            opts=seg_opts))
    for task, job in tasks.items():
        job['keys'] = [k for _, t, k in METRICS if t == task]

    results = {}
    empty_note = False
    for task, job in tasks.items():
        out = osp.join(work, f'{task}_untrained')
        log = demo.run(f'{task} test untrained', [
            job['test'], job['config'], job['init'], '--work-dir', out,
            '--cfg-options', *job['opts']
        ])
        metrics, empty = read_metrics(out, log, job['keys'])
        empty_note |= empty
        results.update({('untrained', k): metrics[k] for k in job['keys']})

    shown = {}
    for task, job in tasks.items():
        train_dir = osp.join(work, f'{task}_train')
        demo.run(f'{task} train', [
            job['train'], job['config'], '--work-dir', train_dir,
            '--cfg-options', *job['opts']
        ])
        with open(osp.join(train_dir, 'last_checkpoint')) as f:
            ckpt = f.read().strip()
        out = osp.join(work, f'{task}_trained')
        show = osp.join(out, 'pictures')
        log = demo.run(f'{task} test trained', [
            job['test'], job['config'], ckpt, '--work-dir', out, '--show-dir',
            show, '--cfg-options', *job['opts']
        ])
        metrics, _ = read_metrics(out, log, job['keys'])
        results.update({('trained', k): metrics[k] for k in job['keys']})
        shown[task] = pictures(show)

    total = time.time() - total
    print(f'\nheld-out images: {args.num_val} (seed {args.seed}); '
          'mini DaViT from scratch, 2 models:')
    print(f'{"metric":<14}{"untrained":>10}{"trained":>10}{"target":>9}')
    failed = []
    for label, _, key in METRICS:
        target = TARGETS.get(key)
        before, after = results[('untrained', key)], results[('trained', key)]
        mark = '' if target is None else f'{target:>9g}'
        print(f'{label:<14}{before:>10.3f}{after:>10.3f}{mark}')
        if target is not None and after < target:
            failed.append(f'{label} {after:.3f} < {target:g}')
    if empty_note:
        print('(untrained Mask R-CNN detected nothing: its AP counts as 0)')
    print('\nwall time per stage:')
    for name, took in demo.times.items():
        print(f'  {name:<24}{took:>7.1f} s')
    print(f'  {"total":<24}{total:>7.1f} s')
    for task in ('det', 'seg'):
        if not shown[task]:
            raise DemoError(f'{task} test.py --show-dir wrote no pictures.')
        folder = osp.dirname(shown[task][0])
        print(f'{task} prediction pictures: {len(shown[task])} in '
              f'{shown_path(folder)}')
    if failed:
        raise DemoError('below target: ' + '; '.join(failed))


if __name__ == '__main__':
    if sys.argv[1:2] == [SAVE_UNTRAINED]:
        jobs = sys.argv[2:]
        for i in range(0, len(jobs), 4):
            config, scope, path, seed = jobs[i:i + 4]
            save_untrained(config, scope, path, int(seed))
            print(f'saved untrained {config} to {path}')
        sys.exit(0)
    try:
        main()
    except DemoError as e:
        sys.exit(f'\ndense demo failed: {e}')
