"""Train a model with an mmengine config (mmpretrain's command line).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]]
        [--resume-finished-ok]
        [--amp] [--no-validate] [--auto-scale-lr] [--cfg-options K=V ...]
        [--launcher none|pytorch|slurm|mpi]

davit_ext additions, all automatic:
- checkpoints (``--resume``, ``load_from``) are read with weights_only=True
  and an allowlist (davit_ext.checkpoint); URLs are checked against the
  sha256 in their name;
- without CUDA the run uses the gloo backend and CPU DDP (davit_ext.runtime);
- missing data, a missing/damaged/mismatched checkpoint, or an impossible
  option stop the run with one message before anything is written
  (davit_ext.preflight, davit_ext.startup): a config with a syntax error,
  --cfg-options without '=', a misspelt or out-of-range model argument,
  batch_size=0, a --resume with nothing left to train (max_epochs/max_iters
  already reached: exit status 2, or 0 with --resume-finished-ok);
- an error while the runner starts (before the first training step) leaves
  the work_dir as it was: no new timestamp folder, the previous run's
  config copy kept (davit_ext.startup.WorkDirGuard);
- the random generators are saved with every checkpoint and restored on
  resume (davit_ext.hooks.RandomStateHook);
- ``load_from`` may hold another head (num_classes): every tensor that fits
  is loaded and one warning lists those that keep their initialisation; a
  backbone of another arch is refused (davit_ext.finetune).
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
        prog=osp.basename(__file__), description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from this checkpoint (path or URL); without a value, '
        'from the latest checkpoint in the work directory')
    parser.add_argument(
        '--resume-finished-ok',
        action='store_true',
        help='with --resume: if the checkpoint already reached '
        'train_cfg.max_epochs (max_iters), say so and exit with status 0 '
        '(default: status 2, as nothing would be trained)')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='automatic mixed precision training: fp16 AmpOptimWrapper on '
        'a GPU, bf16 autocast (CPUAmpOptimWrapper) on a CPU')
    parser.add_argument(
        '--no-validate',
        action='store_true',
        help='do not evaluate checkpoints during training')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate by the real total batch size over '
        'auto_scale_lr.base_batch_size')
    parser.add_argument(
        '--no-pin-memory',
        action='store_true',
        help='disable pin_memory in the dataloaders')
    parser.add_argument(
        '--no-persistent-workers',
        action='store_true',
        help='disable persistent_workers in the dataloaders')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=CfgOptionsAction,
        help='override config settings, key=value pairs, e.g. '
        'train_cfg.max_epochs=10 or model.backbone.arch=s; lists as '
        'key="[a,b]" (quotes needed, no white space)')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (torchrun sets LOCAL_RANK)
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

    if args.no_validate:
        cfg.val_cfg = None
        cfg.val_dataloader = None
        cfg.val_evaluator = None

    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        import torch
        if torch.cuda.is_available():
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
        else:
            # mmengine's AmpOptimWrapper is CUDA-only: bf16 autocast on CPU.
            cfg.optim_wrapper.type = 'davit_ext.CPUAmpOptimWrapper'
            cfg.optim_wrapper.pop('loss_scale', None)

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    if args.auto_scale_lr:
        if not cfg.get('auto_scale_lr'):
            raise ConfigError(
                f'--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=N)'
                f' in the config {args.config}: add it, with N the total '
                f'batch size its learning rate was set for.')
        cfg.auto_scale_lr.enable = True

    defaults = ConfigDict(
        pin_memory=True,
        persistent_workers=True,
        collate_fn=dict(type='default_collate'))
    for field in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        if cfg.get(field, None) is None:
            continue
        loader = deepcopy(defaults)
        loader.update(cfg[field])
        if loader.get('num_workers', 0) == 0:
            loader['persistent_workers'] = False  # torch refuses it
        if args.no_pin_memory:
            loader['pin_memory'] = False
        if args.no_persistent_workers:
            loader['persistent_workers'] = False
        cfg[field] = loader

    merge_cfg_options(cfg, args.cfg_options, args.config)

    # Saves/restores the random generators so that resuming is exact.
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(
            str(h.get('type', '')).endswith('RandomStateHook') for h in hooks):
        hooks.append(dict(type='davit_ext.RandomStateHook'))
    # load_from under the fine-tuning policy: a new head loads with one
    # warning, another backbone arch is refused (resume stays strict).
    if not any(
            str(h.get('type', '')).endswith('FitLoadFromHook') for h in hooks):
        hooks.append(dict(type='davit_ext.FitLoadFromHook'))
    cfg.custom_hooks = hooks
    return cfg


def preflight(cfg, args):
    """Everything that can be checked before the runner touches the disk.

    Returns False when there is nothing to train (a finished resume with
    --resume-finished-ok).
    """
    from mmengine.runner import find_latest_checkpoint

    from davit_ext.preflight import (check_backbone_init, check_checkpoint,
                                     check_datasets)
    from davit_ext.startup import (check_dataloaders, check_model_builds,
                                   check_resume_has_work)

    loaders = ['train_dataloader']
    if cfg.get('val_cfg') is not None and cfg.get('val_dataloader'):
        loaders.append('val_dataloader')
    check_datasets(cfg, loaders)
    check_dataloaders(cfg, loaders)
    check_model_builds(cfg)

    source = None
    if cfg.get('resume') and cfg.get('load_from'):
        source = cfg.load_from
    elif cfg.get('resume'):
        source = find_latest_checkpoint(cfg.work_dir) \
            if osp.isdir(cfg.work_dir) else None
    elif cfg.get('load_from'):
        # Fine-tuning may replace the head, not the backbone.
        check_checkpoint(cfg, cfg.load_from, strict=False)
    if not cfg.get('resume'):
        # model.backbone.init_cfg=dict(type='Pretrained'): the same arch.
        check_backbone_init(cfg)
    if source is not None:
        meta = check_checkpoint(cfg, source, strict=True, resume=True)
        return check_resume_has_work(cfg, meta, source,
                                     args.resume_finished_ok)
    return True


def main(argv=None):
    args = parse_args(argv)

    from davit_ext.preflight import run_tool
    run_tool(lambda: _train(args))


def _train(args):
    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    import davit_ext  # noqa: F401  (registers our modules and mmpretrain's)
    import davit_ext.hooks  # noqa: F401
    from davit_ext import checkpoint, runtime
    from davit_ext.startup import WorkDirGuard, load_config

    checkpoint.install()
    cfg = load_config(args.config, Config.fromfile)
    cfg = merge_args(cfg, args)
    runtime.adapt_config_to_device(cfg)
    if not preflight(cfg, args):
        return
    runtime.init_distributed(cfg.launcher, cfg.env_cfg.get('dist_cfg', {}))

    with WorkDirGuard(cfg.work_dir, cfg.filename) as guard:
        if 'runner_type' not in cfg:
            runner = Runner.from_cfg(cfg)
        else:
            runner = RUNNERS.build(cfg)
        runner.register_hook(guard.hook(), priority='HIGHEST')
        runner.train()


if __name__ == '__main__':
    main()
    from davit_ext import runtime
    runtime.close_distributed()  # a distributed worker ends here
