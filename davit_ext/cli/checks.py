"""Checks the tools run on what a user gives them, before any work is done.

Cheap checks only (paths, sizes, option values): whatever needs the model or
the checkpoint is checked by the run itself, which builds the model once and
reads the checkpoint once (:class:`~davit_ext.engine.hooks.FitLoadFromHook`;
:func:`describe_build_error` words what fails while the model is built).
Each problem raises one exception whose message says what is wrong, where,
and what to do.
"""
import difflib
import inspect
import os
import os.path as osp
import re
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from davit_ext.errors import (CheckpointNotFoundError, ConfigError,
                              DatasetNotFoundError)
from davit_ext.weights.safe_load import check_checkpoint_file
from .config import _clean

__all__ = [
    'check_datasets', 'check_dataloaders', 'check_output_file',
    'describe_build_error', 'check_checkpoint_exists',
    'backbone_init_checkpoint', 'check_strategy', 'saves_checkpoint_folders',
    'DATASET_PREPARE_URL'
]

DATASET_PREPARE_URL = ('https://mmpretrain.readthedocs.io/en/latest/'
                       'user_guides/dataset_prepare.html')


def _datasets(cfg: Any, where: str) -> Iterator[Tuple[Any, str]]:
    """Leaf dataset configs, through wrappers (Repeat/Concat/ClassBalanced)."""
    if 'datasets' in cfg:
        for i, sub in enumerate(cfg['datasets']):
            yield from _datasets(sub, f'{where}.datasets[{i}]')
    elif 'dataset' in cfg and isinstance(cfg['dataset'], dict):
        yield from _datasets(cfg['dataset'], f'{where}.dataset')
    else:
        yield cfg, where


def _join(root: str, path: str) -> str:
    return path if not root or osp.isabs(path) else osp.join(root, path)


def _missing(kind: str, path: str, ds: Any, where: str, option: str) -> str:
    layout = _layout_hint(ds)
    return (f'{where}: {kind} {path!r} does not exist (resolved to '
            f'{osp.abspath(path)!r}). Prepare the dataset as in mmpretrain\'s '
            f'dataset preparation guide ({DATASET_PREPARE_URL}){layout}, or '
            f'point the config at it with --cfg-options {option}=PATH.')


def _layout_hint(ds: Any) -> str:
    kind = str(ds.get('type', ''))
    if kind.endswith('ImageNet'):
        return (', i.e. DATA_ROOT/train/<wnid>/*.JPEG and '
                'DATA_ROOT/val/<wnid>/*.JPEG (or meta/{train,val}.txt)')
    if kind.endswith('CustomDataset'):
        return (', i.e. DATA_ROOT/<data_prefix>/<class name>/<image> '
                '(or an ann_file listing "path label" lines)')
    return ''


def check_datasets(cfg: Any, loaders: Sequence[str]) -> None:
    """Raise :class:`DatasetNotFoundError` if a dataset's files are absent.

    Checks, for each ``cfg[loader].dataset`` (through dataset wrappers):
    ``data_root``; ``ann_file`` and ``data_prefix`` (a string or the
    ``img_path`` of a dict), relative to ``data_root``; and for datasets given
    as ``split=...`` (ImageNet), the split's image folder.
    """
    for loader in loaders:
        loader_cfg = cfg.get(loader)
        if not loader_cfg or 'dataset' not in loader_cfg:
            continue
        for ds, where in _datasets(loader_cfg['dataset'], f'{loader}.dataset'):
            root = ds.get('data_root') or ''
            if root and not osp.isdir(root):
                raise DatasetNotFoundError(
                    _missing('data root', root, ds, where,
                             f'{where}.data_root'))
            ann = ds.get('ann_file') or ''
            if ann and not osp.isfile(_join(root, ann)):
                raise DatasetNotFoundError(
                    _missing('annotation file', _join(root, ann), ds, where,
                             f'{where}.ann_file'))
            prefix = ds.get('data_prefix') or ''
            if isinstance(prefix, dict):
                prefix = prefix.get('img_path') or prefix.get('img') or ''
            if not prefix and ds.get('split') and not ann:
                prefix = ds['split']
            if prefix and not osp.isdir(_join(root, prefix)):
                raise DatasetNotFoundError(
                    _missing('image folder', _join(root, prefix), ds, where,
                             f'{where}.data_root'))


_UNEXPECTED = re.compile(
    r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")
_OWN_PREFIX = re.compile(r'(\w+): ')  # our messages start "DaViT: "


def describe_build_error(err: BaseException, cfg: Any) -> str:
    msg = _clean(err)
    config = osp.basename(getattr(cfg, 'filename', None) or 'the config')
    head = f'cannot build the model of {config}: '
    match = _UNEXPECTED.search(msg)
    if match:
        key = match.group(2)
        where, node = _find_in(cfg.model, 'model', key=key)
        names = _init_args(node.get('type')) if node else []
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ''
        known = f'; it takes {", ".join(names)}' if names else ''
        kind = _type_name(node.get('type')) if node else match.group(1)
        return (f'{head}{where or "model"}.{key}: {kind} has no argument '
                f"'{key}'{hint}{known}. Fix the key in the config or in "
                '--cfg-options.')
    where, cls = None, None
    own = _OWN_PREFIX.match(msg)
    if own:
        where, node = _find_in(cfg.model, 'model', cls=own.group(1))
        if node is not None:
            cls, msg = own.group(1), msg[own.end():]
    what = (where or 'model') + (f' ({cls})' if cls else '')
    end = '' if msg.endswith('.') else '.'
    return (f'{head}{what}: {msg}{end} Fix the value in the config or in '
            '--cfg-options.')


def _walk(node: Any, path: str) -> Iterator[Tuple[str, Any]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _walk(value, f'{path}[{i}]')


def _type_name(kind: Any) -> str:
    name = kind if isinstance(kind, str) else getattr(kind, '__name__', '')
    return name.split('.')[-1]


def _find_in(model_cfg: Any,
             root: str,
             cls: Optional[str] = None,
             key: Optional[str] = None) -> Tuple[Optional[str], Any]:
    """(config path, dict) of the first dict of ``model_cfg`` with ``type=cls``
    and holding ``key`` (each if given)."""
    for path, node in _walk(model_cfg, root):
        if 'type' not in node:
            continue
        if (cls is None or _type_name(node['type']) == cls) and \
                (key is None or key in node):
            return path, node
    return None, None


def _init_args(kind: Any) -> List[str]:
    """Keyword arguments of the class ``kind`` names, through the ``**kwargs``
    of its ``__init__`` into its bases'."""
    from davit_ext.registry import MODELS  # ours, then mmpretrain's
    obj = MODELS.get(kind) if isinstance(kind, str) else kind
    names: List[str] = []
    for klass in getattr(obj, '__mro__', ()):
        if '__init__' not in vars(klass) or klass is object:
            continue
        params = inspect.signature(vars(klass)['__init__']).parameters
        names += [
            p.name for p in params.values()
            if p.name != 'self' and p.kind not in (
                p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names
        ]
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


def check_dataloaders(cfg: Any, loaders: Sequence[str]) -> None:
    """``batch_size`` (an integer >= 1) and ``num_workers`` (>= 0) of each of
    ``cfg[loader]`` that is set.

    Args:
        cfg (Config): The merged config.
        loaders (Sequence[str]): e.g. ``['train_dataloader']``.
    """
    for loader in loaders:
        loader_cfg = cfg.get(loader)
        if not loader_cfg:
            continue
        size = loader_cfg.get('batch_size', 1)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(
                f'{loader}.batch_size is {size!r}: it must be a whole number'
                f' >= 1 (images per process and step), e.g. --cfg-options '
                f'{loader}.batch_size=32.')
        workers = loader_cfg.get('num_workers', 0)
        if isinstance(workers,
                      bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(
                f'{loader}.num_workers is {workers!r}: it must be a whole '
                f'number >= 0 (0 loads in the main process), e.g. '
                f'--cfg-options {loader}.num_workers=2.')


def check_output_file(path: str, item: Optional[str]) -> None:
    """``tools/test.py --out PATH [--out-item metrics|pred]``: a file that the
    end of the evaluation can write.

    Args:
        path (str): The ``--out`` value.
        item (str, optional): ``'metrics'`` or ``'pred'`` (the default).
    """
    from mmengine.fileio.io import file_handlers

    ext = osp.splitext(path)[1][1:]
    if (item or 'pred') == 'pred':
        # mmengine's DumpResults writes a pickle and checks the name so.
        if ext not in ('pkl', 'pickle'):
            raise ConfigError(
                f'--out {path}: the predictions are written as a pickle, so '
                'the file name must end in .pkl or .pickle (for the metrics '
                'as .json or .yaml, add --out-item metrics).')
    elif ext not in file_handlers:
        raise ConfigError(
            f'--out {path}: cannot write the metrics as '
            f'{"." + ext if ext else "a file without extension"}; give a '
            f'file ending in {", ".join("." + e for e in file_handlers)}.')
    if osp.isdir(path):
        raise ConfigError(f'--out {path} is a folder: give a file in it, '
                          f'e.g. {osp.join(path, "results." + ext)}.')
    # mmengine makes missing folders when it writes: the first existing
    # one on the way must be a writable folder.
    folder = osp.dirname(osp.abspath(path))
    while not osp.exists(folder):
        folder = osp.dirname(folder)
    if not osp.isdir(folder):
        raise ConfigError(f'--out {path}: {folder} is a file, not a folder; '
                          'choose another path.')
    if not os.access(folder, os.W_OK):
        raise ConfigError(f'--out {path}: the folder {folder} is not '
                          'writable; choose another path.')


def check_checkpoint_exists(path: Optional[str], folder: bool = False) -> None:
    """A local checkpoint path names a file (cheap: the run reads it once
    later; URLs and ``scheme://`` names are left to the loaders).

    ``folder``: the strategy saves checkpoints as folders (DeepSpeed): the
    path must exist.
    """
    if not path or '://' in str(path):
        return
    if folder:
        if not osp.exists(str(path)):
            raise CheckpointNotFoundError(
                f'checkpoint {path} does not exist: give the epoch_N.pth / '
                f'iter_N.pth folder the run saved (or --resume alone for the '
                f'latest).')
        return
    check_checkpoint_file(str(path))


def saves_checkpoint_folders(cfg: Any) -> bool:
    """Whether the config's strategy saves a checkpoint as a folder (mmengine's
    DeepSpeedStrategy: DeepSpeed's files, one per rank)."""
    from .dist import strategy_name, uses_flexible_runner
    return uses_flexible_runner(cfg) and \
        strategy_name(cfg) == 'DeepSpeedStrategy'


def backbone_init_checkpoint(cfg: Any) -> Optional[str]:
    """The checkpoint of ``model.backbone.init_cfg=dict(type='Pretrained')``,
    if the config has one."""
    backbone = cfg.get('model', {}).get('backbone') or {}
    init = backbone.get('init_cfg') if isinstance(backbone, dict) else None
    if isinstance(init, dict) and init.get('type') == 'Pretrained':
        return init.get('checkpoint')
    return None


#: FlexibleRunner strategies that shard the model across processes: they
#: need the process group of a distributed launch.
SHARDING_STRATEGIES = ('FSDPStrategy', 'DeepSpeedStrategy',
                       'ColossalAIStrategy')


def check_strategy(cfg: Any, tool: str = 'train') -> None:
    """A sharding strategy (``FSDPStrategy``, ...) is started by a launcher.

    Without one, mmengine starts no process group and FSDP stops deep in its
    set-up; one process under torchrun works (nothing is sharded).
    """
    from .dist import strategy_name, uses_flexible_runner
    if not uses_flexible_runner(cfg) or cfg.get('launcher', 'none') != 'none':
        return
    name = strategy_name(cfg)
    if name in SHARDING_STRATEGIES:
        raise ConfigError(
            f'{osp.basename(cfg.filename or "the config")} runs with '
            f'{name}, which shards the model across distributed processes: '
            f'start it with bash tools/dist_{tool}.sh CONFIG '
            f'{"CHECKPOINT " if tool == "test" else ""}N (N processes; N=1 '
            f'runs one unsharded process).')
