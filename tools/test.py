"""Test (and evaluate) a checkpoint with an mmengine config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE]
        [--out-item metrics|pred] [--show-dir DIR] [--show] [--tta]
        [--cfg-options K=V ...] [--launcher none|pytorch|slurm|mpi]

CHECKPOINT is a path or an http(s) URL (downloaded once into torch's hub
cache; a name ending in _<date>-<8 hex>.pth is checked against the file's
sha256). It is read safely and must fit the config's model exactly. Without
CUDA, distributed tests use gloo on CPUs. A mistake stops the test with one
line before anything is evaluated or written (docs/train_test.md).
"""
import os.path as osp
import warnings
from copy import deepcopy

# Noise here: mmcv-lite lacks a compiled op classification never uses;
# mmengine imports the deprecated pkg_resources to look for packages.
warnings.filterwarnings('ignore', message='Fail to import ``MultiScale')
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')


def parse_args(argv=None):
    from davit_ext.cli.args import ToolArgumentParser, common_parser, parse
    parser = ToolArgumentParser(
        prog=osp.basename(__file__),
        description='Test (and evaluate) a model checkpoint',
        parents=[common_parser('test config file path')])
    parser.add_argument('checkpoint', help='checkpoint file path or URL')
    parser.add_argument('--out', help='file to dump the results to')
    parser.add_argument(
        '--out-item',
        choices=['metrics', 'pred'],
        help='what --out holds: the metrics or the predictions '
        '(default: predictions)')
    parser.add_argument(
        '--show-dir', help='save images with their predictions here')
    parser.add_argument(
        '--show',
        action='store_true',
        help='display each prediction in a window')
    parser.add_argument(
        '--interval',
        type=int,
        default=1,
        help='visualize one sample in every N')
    parser.add_argument(
        '--wait-time',
        type=float,
        default=2,
        help='seconds each --show window stays open')
    parser.add_argument(
        '--tta',
        action='store_true',
        help='test-time augmentation: the config\'s tta_model and '
        'tta_pipeline if it has them, else the average of the scores of '
        'the image and its horizontal flip')
    return parse(parser, argv)


def merge_args(cfg, args):
    """Apply the command line to the config (the CLI wins)."""
    from davit_ext.cli.args import apply_common
    from davit_ext.errors import ConfigError

    cfg.load_from = args.checkpoint
    if (args.show or args.show_dir is not None) and args.tta:
        raise ConfigError(
            '--show/--show-dir cannot be combined with --tta: mmpretrain\'s '
            'VisualizationHook draws one view per image and fails on the '
            'augmented views of a TTA batch. Run the test twice: with --tta '
            'for the metrics, with --show-dir for the pictures.')
    if args.show or args.show_dir is not None:
        if 'visualization' not in cfg.get('default_hooks', {}):
            raise ConfigError(
                f'--show/--show-dir need a VisualizationHook: add '
                f'default_hooks=dict(visualization=dict('
                f'type="VisualizationHook")) to {args.config}.')
        vis = cfg.default_hooks.visualization
        vis.enable = True
        vis.show = args.show
        vis.wait_time = args.wait_time
        vis.out_dir = args.show_dir
        vis.interval = args.interval
    apply_common(cfg, args, loaders=('test_dataloader', ))
    return cfg


def apply_tta(cfg):
    """Wrap the model for test-time augmentation."""
    from mmengine.config import ConfigDict

    if 'tta_model' not in cfg:
        cfg.tta_model = dict(type='mmpretrain.AverageClsScoreTTA')
    if 'tta_pipeline' not in cfg:
        test_pipeline = cfg.test_dataloader.dataset.pipeline
        cfg.tta_pipeline = deepcopy(test_pipeline)
        cfg.tta_pipeline[-1] = dict(
            type='TestTimeAug',
            transforms=[[
                dict(type='RandomFlip', prob=1.),
                dict(type='RandomFlip', prob=0.)
            ], [test_pipeline[-1]]])
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def main(argv=None):
    args = parse_args(argv)
    from davit_ext.cli import run_tool
    return run_tool(lambda: _test(args))


def _test(args):
    import sys

    import mmengine
    from mmengine.evaluator import DumpResults

    import davit_ext  # noqa: F401  (registers our modules and mmpretrain's)
    from davit_ext.cli import build_runner, checks, dist
    from davit_ext.cli.config import load_config
    from davit_ext.cli.workdir import WorkDirGuard
    from davit_ext.errors import ConfigError

    if args.out is None and args.out_item is not None:
        raise ConfigError('--out-item needs --out FILE: the file to write '
                          f'the {args.out_item} to.')
    if args.out is not None:
        checks.check_output_file(args.out, args.out_item)  # not after a test
    cfg = merge_args(load_config(args.config), args)
    checks.check_strategy(cfg, 'test')
    for note in dist.adapt_config_to_device(cfg):
        # Distributed runs say what changed (SyncBN -> BN changes the
        # statistics); a single process only switches backends it never uses.
        if cfg.launcher != 'none' and dist.process_rank() == 0:
            print(f'no CUDA here: {note}', file=sys.stderr, flush=True)
    checks.check_datasets(cfg, ['test_dataloader'])
    checks.check_dataloaders(cfg, ['test_dataloader'])
    checks.check_checkpoint_exists(cfg.load_from)
    if args.tta:
        apply_tta(cfg)
    dist.init_distributed(cfg.launcher, cfg.env_cfg.get('dist_cfg', {}))

    with WorkDirGuard(cfg) as guard:
        runner = build_runner(cfg, guard)
        if args.out and args.out_item in ('pred', None):
            runner.test_evaluator.metrics.append(
                DumpResults(out_file_path=args.out))
        metrics = runner.test()
    if args.out and args.out_item == 'metrics':
        mmengine.dump(metrics, args.out)
    return metrics


if __name__ == '__main__':
    main()
    from davit_ext.cli import dist
    dist.close_distributed()  # a distributed worker ends here
