import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

import davit_ext  # noqa: E402,F401  (registers our modules)


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
