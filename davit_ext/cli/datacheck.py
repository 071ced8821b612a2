"""``tools/train.py --check-data`` and
``tools/analysis_tools/check_dataset.py``: read every image of a config's
datasets, as their pipelines would, before a long run."""
import sys
import time
from typing import Any, List, Sequence, Tuple

from davit_ext.engine.data import describe_problem, scan_dataset
from davit_ext.errors import UnreadableImageError

__all__ = ['scan_config', 'check_data']


def _build(cfg: Any, loader: str) -> Any:
    from mmengine.registry import DATASETS, init_default_scope
    init_default_scope(cfg.get('default_scope', 'davit_ext'))
    return DATASETS.build(cfg[loader]['dataset'])


def scan_config(cfg: Any,
                loaders: Sequence[str],
                workers: int = 8,
                quiet: bool = False) -> Tuple[int, List[tuple]]:
    """Scan ``cfg[loader].dataset`` for each loader; returns (images checked,
    problems as ``(where, index, path, reason)``).

    In a started distributed job each rank reads its share and the results are
    gathered, so every rank returns the same.
    """
    import torch.distributed as torch_dist
    rank, world = 0, 1
    if torch_dist.is_available() and torch_dist.is_initialized():
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    checked, problems = 0, []
    for loader in loaders:
        if not cfg.get(loader) or 'dataset' not in cfg[loader]:
            continue
        where = f'{loader}.dataset'
        dataset = _build(cfg, loader)
        start = time.time()

        def progress(done, total, where=where, start=start):
            if not quiet and rank == 0 and time.time() - start > 5:
                print(
                    f'checking {where}: {done}/{total} images',
                    file=sys.stderr,
                    flush=True)

        n, found = scan_dataset(
            dataset,
            where,
            workers=workers,
            shard=(rank, world),
            progress=progress)
        checked += n
        problems += found
    if world > 1:
        gathered = [None] * world
        torch_dist.all_gather_object(gathered, (checked, problems))
        checked = sum(c for c, _ in gathered)
        problems = sorted(p for _, ps in gathered for p in ps)
    return checked, problems


def check_data(cfg: Any, loaders: Sequence[str], skip: bool) -> None:
    """``--check-data``: raise :class:`UnreadableImageError` naming the
    unreadable images (or, with ``skip``, warn and go on)."""
    checked, problems = scan_config(cfg, loaders)
    from .dist import process_rank
    if not problems:
        if process_rank() == 0:
            print(
                f'--check-data: all {checked} images can be read.',
                file=sys.stderr,
                flush=True)
        return
    shown = '; '.join(describe_problem(p) for p in problems[:3])
    more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
    train_only = all(p[0].startswith('train_') for p in problems)
    if skip and train_only:
        if process_rank() == 0:
            print(
                f'warning: --check-data: {len(problems)} of {checked} '
                f'training images cannot be read and will be skipped: '
                f'{shown}{more}.',
                file=sys.stderr,
                flush=True)
        return
    raise UnreadableImageError(
        f'--check-data: {len(problems)} of {checked} images cannot be read: '
        f'{shown}{more}. Replace or remove them '
        '(tools/analysis_tools/check_dataset.py CONFIG lists all), or skip '
        'unreadable training images with --skip-unreadable.')
