"""Checks davit_ext's tools run before any work is done or any file written.

Each problem raises one exception whose message says what is wrong, where, and
what to do; the tools print it alone (no traceback) and exit with status 2.
:data:`USER_ERRORS` lists the exception types concerned.
"""
import gc
import os.path as osp
from typing import Any, Iterator, Optional, Sequence, Tuple

from davit_ext.checkpoint import (CheckpointError, check_state_dict_fits,
                                  load_checkpoint_file)
from davit_ext.runtime import LauncherError


class CheckpointStateError(CheckpointError):
    """A checkpoint lacks the training state that resuming needs."""


__all__ = [
    'ConfigError', 'DatasetNotFoundError', 'CheckpointStateError',
    'USER_ERRORS', 'check_datasets', 'check_checkpoint', 'check_backbone_init',
    'check_config_path', 'run_tool', 'DATASET_PREPARE_URL'
]

DATASET_PREPARE_URL = ('https://mmpretrain.readthedocs.io/en/latest/'
                       'user_guides/dataset_prepare.html')


class ConfigError(ValueError):
    """The config or a command-line option cannot work as given."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's root, annotation file or image folder does not exist."""


USER_ERRORS: Tuple[type, ...] = (CheckpointError, LauncherError,
                                 DatasetNotFoundError, ConfigError)


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


def check_checkpoint(cfg: Any,
                     checkpoint: str,
                     strict: bool = True,
                     resume: bool = False) -> Optional[dict]:
    """Load ``checkpoint`` (path or URL) safely and check it fits the model of
    ``cfg``.

    Args:
        cfg (Config): The run's config (its ``model``).
        checkpoint (str): Path or URL.
        strict (bool): Same keys and shapes (resume, test). Otherwise the
            fine-tuning policy of :func:`davit_ext.finetune.fit_pretrained`
            (``load_from``): the head may differ, the backbone may not.
        resume (bool): The checkpoint must also hold the training state
            mmengine resumes.

    Returns:
        dict | None: The checkpoint's ``meta`` (None if it has none).

    Raises:
        CheckpointError: a subclass saying what does not fit and what to do.
    """
    from mmengine.registry import MODELS, init_default_scope

    from davit_ext.finetune import fit_pretrained

    ckpt = load_checkpoint_file(checkpoint, map_location='cpu')
    if resume:
        _check_training_state(ckpt, checkpoint)
    init_default_scope(cfg.get('default_scope', 'davit_ext'))
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = MODELS.build(model_cfg)
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    name = f'the model of {_config_name(cfg)}'
    try:
        if strict:
            check_state_dict_fits(
                model, ckpt, checkpoint, strict=True, model_name=name)
        else:
            fit_pretrained(model, ckpt, checkpoint, model_name=name)
    finally:
        del model, ckpt
        gc.collect()
    return meta if isinstance(meta, dict) else None


def check_backbone_init(cfg: Any) -> None:
    """Check ``model.backbone.init_cfg=dict(type='Pretrained', ...)`` before
    the run: the checkpoint (after its ``prefix``) must be the backbone's arch
    (:func:`davit_ext.finetune.fit_pretrained`; output norms may be new).

    Args:
        cfg (Config): The run's config.

    Raises:
        CheckpointError: a subclass saying what does not fit and what to do.
    """
    from mmengine.registry import MODELS, init_default_scope

    from davit_ext.checkpoint import CheckpointMismatchError
    from davit_ext.finetune import fit_pretrained, state_dict_of

    backbone = cfg.model.get('backbone')
    init = backbone.get('init_cfg') if backbone else None
    if not isinstance(init, dict) or init.get('type') != 'Pretrained' or \
            not init.get('checkpoint'):
        return
    source = init['checkpoint']
    state = state_dict_of(
        load_checkpoint_file(source, map_location='cpu'), source)
    prefix = init.get('prefix')
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        state = {
            k[len(prefix):]: v
            for k, v in state.items() if k.startswith(prefix)
        }
        if not state:
            raise CheckpointMismatchError(
                f'checkpoint {source} has no key starting with {prefix!r} '
                f'(model.backbone.init_cfg.prefix): set the prefix its '
                f'backbone keys have (\'backbone\' for mmpretrain '
                f'classifiers), or none for a bare backbone state dict.')
    init_default_scope(cfg.get('default_scope', 'davit_ext'))
    model_cfg = backbone.copy()
    model_cfg.pop('init_cfg')
    if '_scope_' in cfg.model and '_scope_' not in model_cfg:
        model_cfg['_scope_'] = cfg.model['_scope_']
    model = MODELS.build(model_cfg)
    try:
        fit_pretrained(
            model,
            state,
            source,
            model_name=f'the model of {_config_name(cfg)}',
            backbone_prefix='')
    finally:
        del model, state
        gc.collect()


def _check_training_state(ckpt: Any, source: str) -> None:
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    missing = [
        k for k in ('epoch', 'iter')
        if not isinstance(meta, dict) or k not in meta
    ]
    if not isinstance(ckpt, dict) or 'message_hub' not in ckpt:
        missing.append('message_hub')
    if missing:
        raise CheckpointStateError(
            f'checkpoint {source} holds weights but not the training state '
            f'needed to resume ({", ".join(missing)} missing): it was not '
            f'saved by an mmengine training run. To start training from '
            f'these weights, pass them as --cfg-options load_from={source} '
            f'instead of --resume.')


def _config_name(cfg: Any) -> str:
    name: Optional[str] = getattr(cfg, 'filename', None)
    return osp.basename(name) if name else 'the config'


def check_config_path(path: str) -> str:
    """Return ``path`` if it is a config file, else raise ConfigError."""
    if not osp.isfile(path):
        raise ConfigError(
            f'config file {path!r} does not exist (resolved to '
            f'{osp.abspath(path)!r}). Configs live under configs/, e.g. '
            f'configs/davit/davit-tiny_4xb256_in1k.py.')
    return path


def run_tool(main: Any) -> Any:
    """Call ``main()``; a :data:`USER_ERRORS` exception becomes one line on
    stderr (printed by rank 0 only in distributed runs) and exit status 2."""
    import sys

    from davit_ext.runtime import process_rank
    try:
        return main()
    except USER_ERRORS as err:
        if process_rank() == 0:
            print(f'error: {err}', file=sys.stderr, flush=True)
        raise SystemExit(2) from None
