"""Test (and evaluate) a checkpoint with an mmengine config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE]
        [--out-item metrics|pred] [--show-dir DIR] [--show] [--tta]
        [--cfg-options K=V ...] [--launcher none|pytorch|slurm|mpi]

CHECKPOINT is a path or an http(s) URL (downloaded once into torch's hub
cache; a name ending in -<8 hex>.pth is checked against the file's sha256).
It is read with weights_only=True and an allowlist, and must fit the
config's model exactly. Without CUDA, distributed tests use gloo on CPUs.

Mistakes stop the test with one line before anything is evaluated or
written: --out must end in .pkl/.pickle for the predictions (or .json,
.yaml, .pkl with --out-item metrics) in an existing folder; a config with a
syntax error, --cfg-options without '=', a misspelt or out-of-range model
argument and batch_size=0 are refused (davit_ext.startup). An error while the
runner starts leaves the work_dir as it was.
"""
import os
import os.path as osp
import sys
import warnings
from copy import deepcopy

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
# mmcv-lite lacks a compiled op classification never uses; its import
# warning is noise here.
warnings.filterwarnings('ignore', message='Fail to import ``MultiScale')


def parse_args(argv=None):
    from davit_ext.startup import CfgOptionsAction, ToolArgumentParser

    parser = ToolArgumentParser(
        prog=osp.basename(__file__),
        description='Test (and evaluate) a model checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file path or URL')
    parser.add_argument(
        '--work-dir', help='the dir to save the evaluation metrics log')
    parser.add_argument('--out', help='file to dump the results to')
    parser.add_argument(
        '--out-item',
        choices=['metrics', 'pred'],
        help='what --out holds: the metrics or the predictions '
        '(default: predictions)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=CfgOptionsAction,
        help='override config settings, key=value pairs, e.g. '
        'test_dataloader.batch_size=32; lists as key="[a,b]" (quotes '
        'needed, no white space)')
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
        '--no-pin-memory',
        action='store_true',
        help='disable pin_memory in the dataloader')
    parser.add_argument(
        '--tta',
        action='store_true',
        help='test-time augmentation: the config\'s tta_model and '
        'tta_pipeline if it has them, else the average of the scores of '
        'the image and its horizontal flip')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def merge_args(cfg, args):
    """Apply the command line to the config (the CLI wins)."""
    from mmengine.config import ConfigDict

    from davit_ext.preflight import ConfigError
    from davit_ext.startup import merge_cfg_options

    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
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

    defaults = ConfigDict(
        pin_memory=True, collate_fn=dict(type='default_collate'))
    if cfg.get('test_dataloader', None) is not None:
        loader = deepcopy(defaults)
        loader.update(cfg.test_dataloader)
        if args.no_pin_memory:
            loader['pin_memory'] = False
        cfg.test_dataloader = loader

    merge_cfg_options(cfg, args.cfg_options, args.config)
    return cfg


def apply_tta(cfg):
    """Wrap the model for test-time augmentation (after the checks, which need
    the plain model)."""
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

    from davit_ext.preflight import run_tool
    run_tool(lambda: _test(args))


def _test(args):
    import mmengine
    from mmengine.config import Config
    from mmengine.evaluator import DumpResults
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    import davit_ext  # noqa: F401  (registers our modules and mmpretrain's)
    from davit_ext import checkpoint, runtime
    from davit_ext.preflight import (ConfigError, check_checkpoint,
                                     check_datasets)
    from davit_ext.startup import (WorkDirGuard, check_dataloaders,
                                   check_model_builds, check_output_file,
                                   load_config)

    if args.out is None and args.out_item is not None:
        raise ConfigError('--out-item needs --out FILE: the file to write '
                          f'the {args.out_item} to.')
    if args.out is not None:
        # now, not after a whole evaluation
        check_output_file(args.out, args.out_item)
    checkpoint.install()
    cfg = load_config(args.config, Config.fromfile)
    cfg = merge_args(cfg, args)
    runtime.adapt_config_to_device(cfg)
    check_datasets(cfg, ['test_dataloader'])
    check_dataloaders(cfg, ['test_dataloader'])
    check_model_builds(cfg)
    check_checkpoint(cfg, cfg.load_from, strict=True)
    if args.tta:
        apply_tta(cfg)
    runtime.init_distributed(cfg.launcher, cfg.env_cfg.get('dist_cfg', {}))

    with WorkDirGuard(cfg.work_dir, cfg.filename) as guard:
        if 'runner_type' not in cfg:
            runner = Runner.from_cfg(cfg)
        else:
            runner = RUNNERS.build(cfg)
        runner.register_hook(guard.hook(), priority='HIGHEST')
        if args.out and args.out_item in ('pred', None):
            runner.test_evaluator.metrics.append(
                DumpResults(out_file_path=args.out))
        metrics = runner.test()
    if args.out and args.out_item == 'metrics':
        mmengine.dump(metrics, args.out)
    return metrics


if __name__ == '__main__':
    main()
    from davit_ext import runtime
    runtime.close_distributed()  # a distributed worker ends here
