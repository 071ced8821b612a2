"""Images that cannot be read: one message naming the file, or skipped.

:class:`LoadImageFromFile` is mmcv's transform (same arguments, same result
for a readable image) registered under the same name in the davit_ext scope,
so configs with ``default_scope='davit_ext'`` build it from
``type='LoadImageFromFile'``. A file that is missing, truncated or not an
image raises :class:`~davit_ext.errors.UnreadableImageError` with the path,
the dataset index and what to do, instead of an ``AssertionError`` from deep
in the pipeline. :func:`scan_dataset` finds every such file before a run.
"""
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, List, Optional, Tuple

import mmcv
import torch
from mmcv.transforms import LoadImageFromFile as _MMCVLoadImageFromFile
from mmengine import fileio
from mmengine.logging import print_log

from davit_ext.errors import UnreadableImageError
from davit_ext.registry import TRANSFORMS

__all__ = ['LoadImageFromFile', 'configure_loaders', 'scan_dataset']

HELP = ('tools/analysis_tools/check_dataset.py CONFIG lists every unreadable '
        'one')


def why_unreadable(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return 'the file does not exist'
    if isinstance(err, AssertionError) or 'failed to load image' in str(err):
        return ('it cannot be decoded (truncated, empty, or not an image '
                'under an image name)')
    return f'{type(err).__name__}: {err}'


@TRANSFORMS.register_module(name='LoadImageFromFile')
class LoadImageFromFile(_MMCVLoadImageFromFile):
    """mmcv's ``LoadImageFromFile`` whose failure names the file.

    Set by :class:`~davit_ext.engine.faults.UnreadableImageHook` on the
    training pipeline: ``skip_unreadable`` (return ``None``, which makes the
    dataset draw another image, after a warning) and ``counts`` (a shared
    tensor counting skipped files, one slot per loader worker).
    """
    skip_unreadable = False
    counts: Optional[torch.Tensor] = None
    where = 'dataset'

    def transform(self, results: dict) -> Optional[dict]:
        try:
            return super().transform(results)
        except Exception as err:
            path = results.get('img_path')
            index = results.get('sample_idx')
            at = f'{self.where} index {index}' if index is not None else \
                self.where
            reason = why_unreadable(err)
            if self.skip_unreadable:
                self._count()
                print_log(
                    f'skipped unreadable image {path} ({at}): {reason}.',
                    logger='current',
                    level=30)
                return None
            raise UnreadableImageError(
                f'cannot read image {path} ({at}): {reason}. Replace or '
                f'remove the file ({HELP}), or skip unreadable training '
                'images with tools/train.py --skip-unreadable.') from None

    def _count(self) -> None:
        if self.counts is None:
            return
        info = torch.utils.data.get_worker_info()
        slot = info.id if info is not None else self.counts.numel() - 1
        self.counts[slot] += 1


def _leaf_datasets(dataset: Any) -> Iterator[Any]:
    """Datasets under wrappers (ConcatDataset, RepeatDataset, ...)."""
    if hasattr(dataset, 'datasets'):
        for sub in dataset.datasets:
            yield from _leaf_datasets(sub)
    elif hasattr(dataset, 'dataset'):
        yield from _leaf_datasets(dataset.dataset)
    else:
        yield dataset


def _loaders(dataset: Any) -> List[LoadImageFromFile]:
    pipeline = getattr(dataset, 'pipeline', None)
    transforms = getattr(pipeline, 'transforms', None) or []
    return [t for t in transforms if isinstance(t, LoadImageFromFile)]


def configure_loaders(dataset: Any,
                      skip: bool,
                      counts: Optional[torch.Tensor],
                      where: str = 'dataset') -> int:
    """Set the skip option on every davit_ext ``LoadImageFromFile`` of
    ``dataset`` (through wrappers); returns how many there are."""
    found = 0
    for leaf in _leaf_datasets(dataset):
        for transform in _loaders(leaf):
            transform.skip_unreadable = skip
            transform.counts = counts
            transform.where = where
            found += 1
    return found


def _reader(dataset: Any) -> Callable[[str], None]:
    """Read and decode a file as the dataset's pipeline would."""
    loaders = [
        t for t in
        getattr(getattr(dataset, 'pipeline', None), 'transforms', None) or []
        if isinstance(t, _MMCVLoadImageFromFile)
    ]
    color_type = loaders[0].color_type if loaders else 'color'
    backend = loaders[0].imdecode_backend if loaders else 'cv2'
    backend_args = loaders[0].backend_args if loaders else None

    def read(path: str) -> None:
        data = fileio.get(path, backend_args=backend_args)
        img = mmcv.imfrombytes(data, flag=color_type, backend=backend)
        if img is None:
            raise AssertionError(f'failed to load image: {path}')

    return read


def scan_dataset(
    dataset: Any,
    where: str,
    workers: int = 8,
    shard: Tuple[int, int] = (0, 1),
    progress: Optional[Callable[[int, int], None]] = None
) -> Tuple[int, List[Tuple[str, int, str, str]]]:
    """Read and decode every image of ``dataset`` as its pipeline would.

    Args:
        dataset: A built mmengine dataset (its ``get_data_info`` gives
            ``img_path``).
        where (str): Its name in messages, e.g. ``'train_dataloader.dataset'``.
        workers (int): Reading threads.
        shard (tuple): ``(i, n)``: check the indices ``i, i+n, ...`` only.
        progress (callable): Called with (done, total) now and then.

    Returns:
        The number of images checked and the unreadable ones as
        ``(where, index, path, reason)``.
    """
    found: List[Tuple[str, int, str, str]] = []
    checked = 0
    offset = 0
    for leaf in _leaf_datasets(dataset):
        read = _reader(leaf)
        indices = [
            i for i in range(len(leaf)) if (offset + i) % shard[1] == shard[0]
        ]
        offset += len(leaf)

        def check(i: int) -> Optional[Tuple[str, int, str, str]]:
            path = leaf.get_data_info(i).get('img_path')
            if path is None:
                return None
            try:
                read(path)
            except Exception as err:
                return (where, i, str(path), why_unreadable(err))
            return None

        with ThreadPoolExecutor(max(1, workers)) as pool:
            for n, problem in enumerate(pool.map(check, indices), 1):
                if problem is not None:
                    found.append(problem)
                if progress is not None and (n % 1000 == 0
                                             or n == len(indices)):
                    progress(checked + n, len(indices))
        checked += len(indices)
    return checked, found


def describe_problem(problem: Tuple[str, int, str, str]) -> str:
    where, index, path, reason = problem
    return f'{path} ({where} index {index}): {reason}'
