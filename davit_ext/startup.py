"""Checks of what a user gives the tools, and a guard on the work_dir.

The tools call these before mmengine's runner starts, so that a mistake
(a config with a syntax error, ``--cfg-options`` without ``=``, a misspelt or
out-of-range model argument, ``batch_size=0``, an ``--out`` file of the wrong
kind, a resume with nothing left to train) stops the run with one line saying
what was wrong and what to do, before any work is done or anything written.
What cannot be checked beforehand is covered by :class:`WorkDirGuard`: if the
run fails before it starts training/testing, the work_dir is left as it was.

Every check raises :class:`~davit_ext.preflight.ConfigError`, which the tools
print as one line and turn into exit status 2.
"""
import argparse
import ast
import difflib
import inspect
import logging
import os
import os.path as osp
import re
import shutil
import sys
import traceback
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from mmengine.config import DictAction

from davit_ext.preflight import ConfigError, check_config_path

__all__ = [
    'ToolArgumentParser', 'CfgOptionsAction', 'load_config',
    'check_model_builds', 'check_dataloaders', 'check_output_file',
    'check_resume_has_work', 'WorkDirGuard'
]

# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------


def merge_cfg_options(cfg, options, config_path: str) -> None:
    """Apply ``--cfg-options`` (parsed by :class:`CfgOptionsAction`) to
    ``cfg``; a KEY path that does not fit the config raises one
    :class:`ConfigError`."""
    if options is None:
        return
    try:
        cfg.merge_from_dict(options)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(
            f'--cfg-options cannot be applied to {config_path}: '
            f'{err}. Check the KEY paths against the config.') from None


def load_config(path: str, loader: Optional[Callable[[str], Any]] = None):
    """Read a config file; a mistake in it raises one :class:`ConfigError`.

    Args:
        path (str): The config file.
        loader (callable, optional): Reads the file; defaults to
            ``mmengine.Config.fromfile``.

    Returns:
        What ``loader`` returns.
    """
    if loader is None:
        from mmengine.config import Config
        loader = Config.fromfile
    check_config_path(path)
    try:
        return loader(path)
    except SyntaxError as err:
        # mmengine parses without a file name ('<unknown>'): find the file,
        # the config or one of its _base_ files, and the line ourselves.
        found = _find_syntax_error(path, set()) or err
        where = found.filename if found.filename not in (None,
                                                         '<unknown>') else path
        text = (found.text or '').strip()
        raise ConfigError(
            f'config {where}, line {found.lineno}: invalid Python syntax '
            f'({found.msg})' + (f': {text}' if text else '') +
            '. Fix that line (or the one above it).') from None
    except ConfigError:
        raise
    except Exception as err:
        line = _line_in(err, path)
        raise ConfigError(
            f'config {path}{line} cannot be read: {type(err).__name__}: '
            f'{_clean(err)}. Fix the config (its _base_ files included).'
        ) from None


def _find_syntax_error(path: str, seen: set) -> Optional[SyntaxError]:
    """The first syntax error of ``path`` or of its ``_base_`` files."""
    path = osp.abspath(path)
    if path in seen or not osp.isfile(path) or not path.endswith('.py'):
        return None
    seen.add(path)
    with open(path, encoding='utf-8') as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as err:
        return err
    for base in _base_files(tree):
        found = _find_syntax_error(osp.join(osp.dirname(path), base), seen)
        if found is not None:
            return found
    return None


def _base_files(tree: ast.Module) -> List[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == '_base_'
                for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return []
            return [value] if isinstance(
                value, str) else [v for v in value if isinstance(v, str)]
    return []


def _line_in(err: BaseException, path: str) -> str:
    """', line N' where the traceback of ``err`` passes through ``path``."""
    path = osp.abspath(path)
    lines = [
        frame.lineno for frame in traceback.extract_tb(err.__traceback__)
        if osp.abspath(frame.filename) == path
    ]
    return f', line {lines[-1]}' if lines else ''


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

_UNEXPECTED = re.compile(
    r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")
_OWN_PREFIX = re.compile(r'(\w+): ')  # our messages start "DaViT: "


def _clean(err: BaseException) -> str:
    msg = str(err.args[0]) if isinstance(err, KeyError) and err.args \
        else str(err)
    return ' '.join(msg.split())  # one line


def check_model_builds(cfg: Any) -> None:
    """Build ``cfg.model`` once; raise :class:`ConfigError` if it cannot be.

    A misspelt argument gets the closest right name; an out-of-range value
    gets the model's own message, with where it is in the config.

    Args:
        cfg (Config): The merged config (``--cfg-options`` applied).
    """
    import gc

    from mmengine.registry import MODELS, init_default_scope

    init_default_scope(cfg.get('default_scope', 'davit_ext'))
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    # The runner builds it again and logs what the build says: not twice.
    disabled = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        model = MODELS.build(model_cfg)
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        raise ConfigError(_describe_build_error(err, cfg)) from None
    finally:
        logging.disable(disabled)
    del model
    gc.collect()


def _describe_build_error(err: BaseException, cfg: Any) -> str:
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


# --------------------------------------------------------------------------
# Dataloaders, output files, resume
# --------------------------------------------------------------------------


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


def check_resume_has_work(cfg: Any, meta: Any, source: str,
                          finished_ok: bool) -> bool:
    """Whether resuming from a checkpoint whose ``meta`` is given leaves
    anything to train under ``cfg.train_cfg``.

    Args:
        cfg (Config): The merged config.
        meta (dict): The checkpoint's ``meta`` (``epoch`` and ``iter`` done).
        source (str): The checkpoint, for the message.
        finished_ok (bool): Nothing to do is fine (``--resume-finished-ok``):
            print why and return False instead of raising.

    Returns:
        bool: True if there is training left to do.
    """
    train_cfg = cfg.get('train_cfg') or {}
    if not isinstance(meta, dict):
        return True
    # which loop mmengine builds: the type's, else by_epoch's
    kind = train_cfg.get('type')
    by_epoch = 'Epoch' in _type_name(kind) if kind else train_cfg.get(
        'by_epoch', True)
    unit = 'epoch' if by_epoch else 'iter'
    done, total = meta.get(unit), train_cfg.get(f'max_{unit}s')
    if not isinstance(done, int) or not isinstance(total, int):
        return True
    if done < total:
        return True
    plural = '' if done == 1 else 's'
    more = done + (1 if unit == 'epoch' else 1000)
    msg = (f'nothing to resume: checkpoint {source} has already done {done} '
           f'{unit}{plural} and train_cfg.max_{unit}s is {total}. To train '
           f'longer, raise it, e.g. --cfg-options train_cfg.max_{unit}s='
           f'{more}')
    if finished_ok:
        print(f'{msg}. Nothing was done.', file=sys.stderr, flush=True)
        return False
    raise ConfigError(f'{msg}; with --resume-finished-ok this exits with '
                      'status 0 instead.')


# --------------------------------------------------------------------------
# The work_dir
# --------------------------------------------------------------------------

_TIMESTAMP = re.compile(r'\d{8}_\d{6}')


def _manager_classes() -> List[type]:
    """mmengine's ``ManagerMixin`` classes (logger, message hub, visualizers,
    default scope), each of which keeps its own instances by name."""
    from mmengine.utils import ManagerMixin
    found, todo = [], [ManagerMixin]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def _manager_instances() -> dict:
    return {
        cls: set(getattr(cls, '_instance_dict', ()))
        for cls in _manager_classes()
    }


def _forget_instances(before: dict) -> None:
    """Drop the named mmengine instances made since ``before``.

    The runner names its logger, message hub and visualizer after the config
    and the second it started. A failed start's visualizer would otherwise be
    handed, with its save_dir in the folder we just removed, to the next run of
    the same config in the same process and second (it then fails writing
    there); its logger would keep that folder's log file open.
    """
    for cls in _manager_classes():
        instances = getattr(cls, '_instance_dict', None)
        if instances is None:
            continue
        for name in list(instances):
            if name in before.get(cls, ()):
                continue
            instance = instances.pop(name)
            if isinstance(instance, logging.Logger):
                for handler in list(instance.handlers):
                    if isinstance(handler, logging.FileHandler):
                        handler.close()
                        instance.removeHandler(handler)


class WorkDirGuard:
    """Leave the work_dir as it was if the run fails before it starts.

    mmengine's runner makes the work_dir and a timestamp folder, and copies
    the config into ``WORK_DIR/<config>.py``, before it builds the
    dataloaders, optimizer and schedulers; an error there would leave an
    empty run behind and overwrite the copy of the previous run's config.
    Used as a context manager around building and running the runner: on an
    exception before :meth:`started` is called, the folders this run made are
    removed and the config copy is put back (rank 0 only), mmengine's named
    instances made by the failed start (logger, visualizer, ...) are dropped,
    and a ``ValueError``/``TypeError``/``KeyError``/``AssertionError`` (a
    config value mmengine or torch refused) becomes one :class:`ConfigError`
    line, unless the environment sets ``DAVIT_EXT_TRACEBACK=1``.

    Args:
        work_dir (str): The run's work_dir.
        config_file (str, optional): The config's path (its base name is the
            copy's name).
    """

    # raised by mmengine/torch while building from config values
    setup_errors = (ValueError, TypeError, KeyError, AssertionError)

    def __init__(self, work_dir: str, config_file: Optional[str]) -> None:
        self.work_dir = osp.abspath(work_dir)
        self.existed = osp.isdir(self.work_dir)
        self.entries = set(os.listdir(self.work_dir) if self.existed else ())
        self.copy = osp.join(self.work_dir, osp.basename(config_file)) \
            if config_file else None
        self.copy_bytes: Optional[bytes] = None
        if self.copy and osp.isfile(self.copy):
            with open(self.copy, 'rb') as f:
                self.copy_bytes = f.read()
        self.config_name = osp.basename(config_file or 'the config')
        self.has_started = False
        self.instances = _manager_instances()

    def started(self) -> None:
        """Training/testing has begun: keep what the run writes from now."""
        self.has_started = True

    def hook(self) -> Any:
        """A hook that calls :meth:`started` at ``before_train`` and
        ``before_test``; register it with priority ``'HIGHEST'``."""
        from mmengine.hooks import Hook

        guard = self

        class _StartedHook(Hook):

            def before_train(self, runner: Any) -> None:
                guard.started()

            def before_test(self, runner: Any) -> None:
                guard.started()

        return _StartedHook()

    def __enter__(self) -> 'WorkDirGuard':
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        from davit_ext.preflight import USER_ERRORS
        from davit_ext.runtime import process_rank
        if kind is None or self.has_started:
            return
        _forget_instances(self.instances)
        if process_rank() == 0:
            self.restore()
        if issubclass(kind, USER_ERRORS) or not issubclass(kind, Exception):
            return  # already one line; or an interrupt
        if issubclass(kind, self.setup_errors) and \
                not os.environ.get('DAVIT_EXT_TRACEBACK'):
            # What fails while the runner builds the loaders, optimizer and
            # schedulers from the config is a config value (lr=-1, an
            # unknown type, ...): one line, as for the checks before.
            raise ConfigError(
                f'the run of {self.config_name} failed while mmengine set it '
                f'up, before its first step: {kind.__name__}: '
                f'{_clean(value)}. Fix the config or --cfg-options; '
                f'{self.work_dir} was left as it was (DAVIT_EXT_TRACEBACK=1 '
                'shows where it failed).') from None
        if process_rank() == 0:
            print(
                f'note: the run failed before it started; {self.work_dir} '
                'was left as it was. The error:',
                file=sys.stderr,
                flush=True)

    def restore(self) -> None:
        """Undo what the failed start wrote."""
        if not self.existed:
            # made by this run: everything in it is from the failed start
            shutil.rmtree(self.work_dir, ignore_errors=True)
            return
        if not osp.isdir(self.work_dir):
            return
        for name in set(os.listdir(self.work_dir)) - self.entries:
            path = osp.join(self.work_dir, name)
            if _TIMESTAMP.fullmatch(name) and osp.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
        if self.copy is None:
            return
        if self.copy_bytes is None:
            if osp.isfile(self.copy):
                os.remove(self.copy)  # this run's copy; there was none
        else:
            with open(self.copy, 'rb') as f:
                changed = f.read() != self.copy_bytes
            if changed:
                with open(self.copy, 'wb') as f:
                    f.write(self.copy_bytes)
