import importlib.util
import os
import os.path as osp

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Every fast path on, whatever this CPU's default (fast_paths.default_off):
# the tests check that each one runs and equals the module calls.
os.environ.setdefault('DAVIT_EXT_FAST_PATHS_ON', 'all')

import davit_ext  # noqa: E402,F401  (registers our modules)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture
def davit_scope():
    """Build configs under ``default_scope='davit_ext'``, as our configs do."""
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('davit_ext'):
        yield


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a module of single-image checks: as fast, and
    immune to other processes competing for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tool(name):
    """Import tools/<name>.py afresh (its module state starts clean)."""
    spec = importlib.util.spec_from_file_location(
        f'_davit_ext_tool_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def call(capsys, monkeypatch):
    """Run a tool's main() in this process: (status, stdout, stderr)."""
    monkeypatch.setenv('LOCAL_RANK', '0')

    def run(name, *argv):
        # mmengine's logger writes to the sys.stdout it was made with: an
        # earlier test's capture, closed by now. A fresh one per call.
        from mmengine.logging import MMLogger
        MMLogger._instance_dict.clear()
        try:
            _tool(name).main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An offline machine: every download fails as without network, and
    torch.hub's folder is ``tmp_path`` (empty).

    Returns ``tmp_path``.
    """
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError('Name or service not known')

    monkeypatch.setattr(urllib.request, 'urlopen', refuse)
    monkeypatch.setattr(torch.hub, 'urlopen', refuse)  # torch's downloads
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    return tmp_path


@pytest.fixture(scope='session')
def two_class_images(tmp_path_factory):
    """A 2-class CustomDataset folder (``train``/``val``, 2 images of 32x32 per
    split and class); returns its path."""
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp('two_class') / 'data'
    for split in ('train', 'val'):
        for label in (0, 1):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(
                    np.full((32, 32, 3), 100 * label + i,
                            np.uint8)).save(folder / f'{i}.png')
    return str(root)
