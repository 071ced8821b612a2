"""Train a model with an mmengine config (mmpretrain's command line).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]]
        [--resume-finished-ok] [--amp] [--no-validate] [--auto-scale-lr]
        [--check-data] [--skip-unreadable] [--skip-nonfinite]
        [--cfg-options K=V ...] [--launcher none|pytorch|slurm|mpi]

What davit_ext adds (docs/train_test.md): checkpoints are read safely
(davit_ext.weights); without CUDA the run uses gloo and CPU DDP
(davit_ext.cli.dist); a mistake stops the run with one line and the work_dir
as it was (davit_ext.cli); ``load_from``/``--resume`` go through the fit
policy and resuming restores the random generators (the runtime base's
``custom_hooks``, davit_ext.engine.hooks). Faults (docs/train_test.md,
"Faults"): a non-finite loss stops the run (status 3), an unreadable image
too (status 2), a failed save keeps the previous checkpoint (status 74),
SIGTERM/SIGUSR1 save a resumable checkpoint (status 75).
"""
import os.path as osp
import warnings

# Noise here: mmcv-lite lacks a compiled op classification never uses;
# mmengine imports the deprecated pkg_resources to look for packages.
warnings.filterwarnings('ignore', message='Fail to import ``MultiScale')
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')


def parse_args(argv=None):
    from davit_ext.cli.args import ToolArgumentParser, common_parser, parse
    parser = ToolArgumentParser(
        prog=osp.basename(__file__),
        description='Train a model',
        parents=[common_parser('train config file path')])
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
        '--check-data',
        action='store_true',
        help='read every training (and validation) image first and stop if '
        'any cannot be read (with --skip-unreadable: warn and go on)')
    parser.add_argument(
        '--skip-unreadable',
        action='store_true',
        help='skip training images that cannot be read (a warning each, a '
        'count per epoch) instead of stopping')
    parser.add_argument(
        '--skip-nonfinite',
        action='store_true',
        help='skip the optimizer step of an iteration whose loss is NaN/inf '
        '(counted in the log) instead of stopping')
    parser.add_argument(
        '--no-persistent-workers',
        action='store_true',
        help='disable persistent_workers in the dataloaders')
    return parse(parser, argv)


def merge_args(cfg, args):
    """Apply the command line to the config (the CLI wins)."""
    import torch

    from davit_ext.cli.args import apply_common
    from davit_ext.errors import ConfigError

    if args.no_validate:
        cfg.val_cfg = None
        cfg.val_dataloader = None
        cfg.val_evaluator = None
    if args.amp:
        if torch.cuda.is_available():
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
        else:
            # mmengine's AmpOptimWrapper is CUDA-only: bf16 autocast on CPU.
            cfg.optim_wrapper.type = 'davit_ext.CPUAmpOptimWrapper'
            cfg.optim_wrapper.pop('loss_scale', None)
    if args.resume is not None:
        cfg.resume = True
        cfg.load_from = None if args.resume == 'auto' else args.resume
    if args.auto_scale_lr:
        if not cfg.get('auto_scale_lr'):
            raise ConfigError(
                f'--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=N)'
                f' in the config {args.config}: add it, with N the total '
                f'batch size its learning rate was set for.')
        cfg.auto_scale_lr.enable = True
    apply_common(cfg, args, persistent_workers=True)
    for hook in cfg.custom_hooks:
        kind = str(hook.get('type', ''))
        if args.skip_nonfinite and kind.endswith('NonFiniteLossHook'):
            hook['skip'] = True
        if args.skip_unreadable and kind.endswith('UnreadableImageHook'):
            hook['skip'] = True
    return cfg


def main(argv=None):
    args = parse_args(argv)
    from davit_ext.cli import run_tool
    run_tool(lambda: _train(args))


def _train(args):
    import sys

    import davit_ext  # noqa: F401  (registers our modules and mmpretrain's)
    from davit_ext.cli import build_runner, checks, dist
    from davit_ext.cli.config import load_config
    from davit_ext.cli.workdir import WorkDirGuard
    from davit_ext.errors import ConfigError, NothingToResume

    cfg = merge_args(load_config(args.config), args)
    checks.check_strategy(cfg, 'train')
    for note in dist.adapt_config_to_device(cfg):
        # Distributed runs say what changed (SyncBN -> BN changes the
        # statistics); a single process only switches backends it never uses.
        if cfg.launcher != 'none' and dist.process_rank() == 0:
            print(f'no CUDA here: {note}', file=sys.stderr, flush=True)
    loaders = ['train_dataloader']
    if cfg.get('val_cfg') is not None and cfg.get('val_dataloader'):
        loaders.append('val_dataloader')
    checks.check_datasets(cfg, loaders)
    checks.check_dataloaders(cfg, loaders)
    checks.check_checkpoint_exists(
        cfg.get('load_from'), folder=checks.saves_checkpoint_folders(cfg))
    if not cfg.get('resume'):
        checks.check_checkpoint_exists(checks.backbone_init_checkpoint(cfg))
    dist.init_distributed(cfg.launcher, cfg.env_cfg.get('dist_cfg', {}))
    if args.check_data:
        from davit_ext.cli.datacheck import check_data
        check_data(cfg, loaders, skip=args.skip_unreadable)
    try:
        with WorkDirGuard(cfg) as guard:
            runner = build_runner(cfg, guard)
            try:
                runner.train()
            finally:
                _restore_signal_handlers(runner)
    except NothingToResume as done:
        if not args.resume_finished_ok:
            raise ConfigError(f'{done}; with --resume-finished-ok this exits '
                              'with status 0 instead.') from None
        print(f'{done}. Nothing was done.', file=sys.stderr, flush=True)


def _restore_signal_handlers(runner):
    """A run that stopped on an exception did not reach the hooks'
    after_train: put back the signal handlers PreemptionHook set."""
    for hook in runner.hooks:
        restore = getattr(hook, 'restore_handlers', None)
        if callable(restore):
            restore()


if __name__ == '__main__':
    main()
    from davit_ext.cli import dist
    dist.close_distributed()  # a distributed worker ends here
