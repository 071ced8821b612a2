"""Reading a config file: a mistake in it is one line naming the file and the
line."""
import ast
import os.path as osp
import traceback
from typing import Any, Callable, List, Optional

from davit_ext.errors import ConfigError

__all__ = ['load_config', 'check_config_path']


def check_config_path(path: str) -> str:
    """Return ``path`` if it is a config file, else raise ConfigError."""
    if not osp.isfile(path):
        raise ConfigError(
            f'config file {path!r} does not exist (resolved to '
            f'{osp.abspath(path)!r}). Configs live under configs/, e.g. '
            f'configs/davit/davit-tiny_4xb256_in1k.py.')
    return path


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


def _clean(err: BaseException) -> str:
    msg = str(err.args[0]) if isinstance(err, KeyError) and err.args \
        else str(err)
    return ' '.join(msg.split())  # one line
