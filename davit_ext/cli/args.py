"""Command-line parsing shared by the tools (mmpretrain's flags).

:func:`common_parser` holds what ``tools/train.py`` and ``tools/test.py``
share (config, ``--work-dir``, ``--cfg-options``, ``--launcher``,
``--local-rank``) as an argparse parent parser; :func:`apply_common` applies
it to a config.
"""
import argparse
import os
import os.path as osp
from copy import deepcopy
from typing import Any, Optional

from mmengine.config import DictAction

from davit_ext.errors import ConfigError

__all__ = [
    'ToolArgumentParser', 'CfgOptionsAction', 'common_parser', 'apply_common',
    'merge_cfg_options', 'OUR_HOOKS'
]

#: Hooks every run needs (the runtime base lists them in ``custom_hooks``).
OUR_HOOKS = ('RandomStateHook', 'FitLoadFromHook', 'NonFiniteLossHook',
             'UnreadableImageHook', 'PreemptionHook')


class ToolArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f'error: {message} (see {self.prog} --help)\n')


class CfgOptionsAction(DictAction):
    """mmengine's ``DictAction`` that refuses an item it cannot parse with one
    line (``DictAction`` itself fails with "not enough values to unpack" on a
    missing ``=``, and recurses without end on some values, e.g. ``"dict(a=1,
    b=2)"``)."""

    def __call__(self,
                 parser: argparse.ArgumentParser,
                 namespace: argparse.Namespace,
                 values: Any,
                 option_string: Optional[str] = None) -> None:
        for item in values:
            if '=' not in item:
                raise argparse.ArgumentError(
                    self, f'{item!r} has no value: write KEY=VALUE, e.g. '
                    f'{item}=... (lists as KEY="[a,b]")')
            try:
                super().__call__(parser, namespace, [item], option_string)
            except (AssertionError, RecursionError, ValueError) as err:
                raise argparse.ArgumentError(
                    self, f'cannot parse {item!r} ({type(err).__name__}): '
                    'write KEY=VALUE with a number, a string, or a list/tuple'
                    ' as KEY="[a,b]" (no spaces); set dicts key by key, e.g.'
                    ' train_cfg.max_iters=8') from None


def common_parser(config_help: str) -> argparse.ArgumentParser:
    """The arguments both tools take, as a parent parser."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('config', help=config_help)
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=CfgOptionsAction,
        help='override config settings, key=value pairs, e.g. '
        'train_cfg.max_epochs=10 or model.backbone.arch=s; lists as '
        'key="[a,b]" (quotes needed, no white space)')
    parser.add_argument(
        '--no-pin-memory',
        action='store_true',
        help='disable pin_memory in the dataloaders')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (torchrun sets LOCAL_RANK)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def merge_cfg_options(cfg, options, config_path: str) -> None:
    """Apply ``--cfg-options`` to ``cfg``; a KEY path that does not fit the
    config raises one :class:`ConfigError`."""
    if options is None:
        return
    try:
        cfg.merge_from_dict(options)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(
            f'--cfg-options cannot be applied to {config_path}: '
            f'{err}. Check the KEY paths against the config.') from None


def apply_common(cfg: Any,
                 args: argparse.Namespace,
                 loaders=('train_dataloader', 'val_dataloader',
                          'test_dataloader'),
                 persistent_workers: Optional[bool] = None) -> None:
    """The launcher, the work_dir (default ``./work_dirs/<config name>``),
    dataloader defaults as mmpretrain's tools (or, for mmdet/mmseg configs,
    theirs) set them, then ``--cfg-options`` (the command line wins)."""
    from mmengine.config import ConfigDict
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    defaults = dict(pin_memory=True)
    if cfg.get('default_scope', None) in (None, 'mmpretrain', 'davit_ext'):
        # mmpretrain's tools stack classification batches; mmdet's and
        # mmseg's keep mmengine's default (pseudo_collate: images of
        # different sizes).
        defaults['collate_fn'] = dict(type='default_collate')
    if persistent_workers is not None:
        defaults['persistent_workers'] = persistent_workers
    for field in loaders:
        if cfg.get(field, None) is None:
            continue
        loader = ConfigDict(deepcopy(defaults))
        loader.update(cfg[field])
        if loader.get('num_workers', 0) == 0 and 'persistent_workers' in \
                loader:
            loader['persistent_workers'] = False  # torch refuses it
        if args.no_pin_memory:
            loader['pin_memory'] = False
        if getattr(args, 'no_persistent_workers', False):
            loader['persistent_workers'] = False
        cfg[field] = loader
    merge_cfg_options(cfg, args.cfg_options, args.config)
    # A config that sets its own custom_hooks replaces the base's list: the
    # fit policy and exact resume must not silently go with it.
    hooks = list(cfg.get('custom_hooks', None) or [])
    for name in OUR_HOOKS:
        if not any(str(h.get('type', '')).endswith(name) for h in hooks):
            hooks.append(dict(type=f'davit_ext.{name}'))
    cfg.custom_hooks = hooks
