"""Code of the command-line tools only (``tools/train.py``, ``tools/test.py``,
``demo/``): argument parsing, cheap start-up checks, the work_dir guard and
distributed set-up without a GPU.

Nothing else in davit_ext imports it.
"""
import sys
from typing import Any, Callable

from davit_ext.errors import USER_ERRORS, TrainingFault
from .dist import close_distributed, process_rank

__all__ = ['run_tool', 'build_runner']


def run_tool(main: Callable[[], Any]) -> Any:
    """Call ``main()``; a :data:`~davit_ext.errors.USER_ERRORS` exception
    becomes one line on stderr (rank 0 only) and exit status 2, a
    :class:`~davit_ext.errors.TrainingFault` one line and its own status
    (every rank raises the same fault; docs/train_test.md lists them)."""
    try:
        return main()
    except TrainingFault as err:
        if process_rank() == 0:
            print(f'{err.prefix}{err}', file=sys.stderr, flush=True)
        # A distributed worker leaves without the interpreter's teardown,
        # which can abort a gloo worker (see close_distributed): the status
        # must reach the launcher.
        close_distributed(err.exit_status)
        raise SystemExit(err.exit_status) from None
    except USER_ERRORS as err:
        if process_rank() == 0:
            print(f'error: {err}', file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def build_runner(cfg: Any, guard: Any) -> Any:
    """The runner of ``cfg``, with ``guard``'s started-hook registered.

    mmengine's ``Runner``, or the ``runner_type`` the config names; a config
    with a ``strategy`` (FSDP, DeepSpeed, ...) gets mmengine's
    ``FlexibleRunner``, the runner that takes one.
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from .dist import uses_flexible_runner
    if uses_flexible_runner(cfg) and 'runner_type' not in cfg:
        cfg.runner_type = 'FlexibleRunner'
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else \
        RUNNERS.build(cfg)
    runner.register_hook(guard.hook(), priority='HIGHEST')
    return runner
