"""Device and distributed set-up for davit_ext's tools, with or without GPU.

mmengine assumes a GPU once a launcher is used: ``init_dist`` calls
``torch.cuda.set_device`` for every launcher and the runner wraps the model in
DDP with CUDA ``device_ids``, whatever ``env_cfg.dist_cfg.backend`` says. On a
machine without CUDA, :func:`adapt_config_to_device` switches a config to the
``gloo`` backend and a CPU DDP wrapper, and :func:`init_distributed` starts the
process group itself (the runner then sees it and does not call ``init_dist``).
On a machine with CUDA both leave everything to mmengine.
"""
import datetime
import os
import subprocess
from typing import Dict, List

import torch
import torch.distributed as torch_dist

from davit_ext.errors import LauncherError

__all__ = [
    'has_cuda', 'adapt_config_to_device', 'init_distributed', 'process_rank',
    'uses_flexible_runner', 'strategy_name'
]

#: Model wrappers that take DDP's ``device_ids`` argument.
_DDP_WRAPPERS = ('MMDistributedDataParallel', 'DistributedDataParallel',
                 'mmengine.MMDistributedDataParallel')


def has_cuda() -> bool:
    return torch.cuda.is_available()


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 if none);
    usable before the process group exists."""
    for var in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'):
        if os.environ.get(var, '').isdigit():
            return int(os.environ[var])
    return 0


def adapt_config_to_device(cfg) -> List[str]:
    """Make ``cfg`` run on this machine; returns what was changed.

    Without CUDA: ``env_cfg.dist_cfg.backend`` becomes ``gloo`` (unless it
    already names a CPU backend), distributed runs get a DDP wrapper without
    ``device_ids``, SyncBN layers of distributed runs become BN (torch's
    SyncBatchNorm takes GPU tensors only; on one process it is BN already) and
    dataloaders stop pinning memory (nothing to pin for). With CUDA nothing
    changes.
    """
    if has_cuda():
        return []
    notes = []
    # ConfigDict.setdefault stores a converted copy of its default: read the
    # stored one back, or the switch would be noted but lost.
    cfg.setdefault('env_cfg', {})
    env_cfg = cfg['env_cfg']
    env_cfg.setdefault('dist_cfg', {})
    dist_cfg = env_cfg['dist_cfg']
    if dist_cfg.get('backend', 'nccl') not in ('gloo', 'mpi'):
        notes.append(f'env_cfg.dist_cfg.backend: '
                     f"{dist_cfg.get('backend', 'nccl')!r} -> 'gloo'")
        dist_cfg['backend'] = 'gloo'
    if cfg.get('launcher', 'none') != 'none' and uses_flexible_runner(cfg):
        notes += _strategy_to_cpu(cfg)
        synced = _sync_bn_to_bn(cfg.get('model'), 'model')
        if synced:
            notes.append(f"{', '.join(synced)}: 'SyncBN' -> 'BN' (statistics "
                         'per process: SyncBatchNorm needs a GPU)')
    elif cfg.get('launcher', 'none') != 'none':
        wrapper = cfg.get('model_wrapper_cfg')
        if wrapper is None:
            wrapper = dict(
                type='MMDistributedDataParallel',
                broadcast_buffers=False,
                find_unused_parameters=cfg.get('find_unused_parameters',
                                               False))
        if wrapper.get('type', 'MMDistributedDataParallel') in _DDP_WRAPPERS:
            wrapper['device_ids'] = None
            notes.append('model_wrapper_cfg.device_ids: None (CPU DDP)')
        cfg.model_wrapper_cfg = wrapper
        synced = _sync_bn_to_bn(cfg.get('model'), 'model')
        if synced:
            notes.append(f"{', '.join(synced)}: 'SyncBN' -> 'BN' (statistics "
                         'per process: SyncBatchNorm needs a GPU)')
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(key)
        if loader and loader.get('pin_memory'):
            loader['pin_memory'] = False
    return notes


def uses_flexible_runner(cfg) -> bool:
    """Whether ``cfg`` runs with mmengine's ``FlexibleRunner`` (it names it as
    ``runner_type`` or sets a ``strategy``, which only that runner takes)."""
    return cfg.get('runner_type') == 'FlexibleRunner' or \
        cfg.get('strategy') is not None


def strategy_name(cfg) -> str:
    """The class name of the FlexibleRunner's strategy, without a scope (its
    default for distributed runs is ``DDPStrategy``)."""
    strategy = cfg.get('strategy') or {}
    kind = strategy.get(
        'type', 'DDPStrategy'
        if cfg.get('launcher', 'none') != 'none' else 'SingleDeviceStrategy')
    name = kind if isinstance(kind, str) else kind.__name__
    return name.rsplit('.', 1)[-1]


def _strategy_to_cpu(cfg) -> List[str]:
    """A FlexibleRunner strategy for CPU processes (distributed runs).

    mmengine's DDPStrategy and FSDPStrategy give the wrapper the CUDA device
    ``LOCAL_RANK`` (``device_ids``/``device_id``), whatever the backend: here
    the wrapper gets the CPU instead, and a strategy's ``sync_bn`` is dropped
    (SyncBatchNorm needs a GPU).
    """
    from davit_ext.errors import ConfigError
    name = strategy_name(cfg)
    if cfg.get('strategy') is None:
        cfg.strategy = dict(type='DDPStrategy')
    strategy = cfg.strategy
    notes = []
    if strategy.get('sync_bn') is not None:
        notes.append(f"strategy.sync_bn: {strategy['sync_bn']!r} -> None "
                     '(statistics per process: SyncBatchNorm needs a GPU)')
        strategy['sync_bn'] = None
    if name == 'DDPStrategy':
        wrapper = strategy.get('model_wrapper') or dict(
            type='MMDistributedDataParallel', broadcast_buffers=False)
        wrapper['device_ids'] = None
        strategy['model_wrapper'] = wrapper
        notes.append('strategy.model_wrapper.device_ids: None (CPU DDP)')
    elif name == 'FSDPStrategy':
        wrapper = strategy.get('model_wrapper') or dict(
            type='MMFullyShardedDataParallel')
        if wrapper.get('cpu_offload'):
            raise ConfigError(
                'strategy.model_wrapper.cpu_offload moves parameters from the '
                'GPU to the CPU and this machine has no CUDA: remove it (or '
                '--cfg-options strategy.model_wrapper.cpu_offload=None).')
        # FSDP's device_id names the compute device; mmengine passes the
        # CUDA index LOCAL_RANK.
        wrapper['device_id'] = 'cpu'
        strategy['model_wrapper'] = wrapper
        notes.append("strategy.model_wrapper.device_id: 'cpu' (CPU FSDP)")
    elif name not in ('SingleDeviceStrategy', 'DeepSpeedStrategy'):
        # DeepSpeed picks its CPU accelerator (gloo) by itself.
        raise ConfigError(
            f'strategy {name} needs CUDA and this machine has none: on CPU '
            'processes use davit_ext.FSDPStrategy, DeepSpeedStrategy or '
            'DDPStrategy (see docs/large_models.md).')
    return notes


def _sync_bn_to_bn(node, path: str) -> List[str]:
    """Switch every ``type='SyncBN'`` under ``node`` to ``'BN'``; returns the
    paths of the switched entries."""
    changed = []
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN'):
            node['type'] = 'BN'
            changed.append(path)
        for key, value in node.items():
            changed += _sync_bn_to_bn(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            changed += _sync_bn_to_bn(value, f'{path}[{i}]')
    return changed


def _require(names: List[str], how: str) -> Dict[str, str]:
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise LauncherError(
            f'the launcher environment is incomplete: {", ".join(missing)} '
            f'not set. {how}')
    return {n: os.environ[n] for n in names}


def init_distributed(launcher: str, dist_cfg: dict) -> None:
    """Start the process group on a CPU-only machine (no-op otherwise).

    Same environment contract as mmengine's ``init_dist``:

    - ``pytorch``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
      ``MASTER_PORT`` (torchrun sets them; see tools/dist_train.sh);
    - ``slurm``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_NODELIST`` (srun
      sets them); ``MASTER_PORT`` defaults to 29500, ``MASTER_ADDR`` to the
      first node of the job;
    - ``mpi``: ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}`` and ``MASTER_ADDR``.
    """
    if launcher == 'none' or has_cuda() or torch_dist.is_initialized():
        return
    kwargs = {}
    if dist_cfg.get('timeout') is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
    backend = dist_cfg.get('backend', 'gloo')
    if launcher == 'pytorch':
        _require(
            ['RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'],
            'Start distributed jobs with torchrun, e.g. '
            'bash tools/dist_train.sh CONFIG NUM_PROCESSES.')
    elif launcher == 'slurm':
        env = _require(['SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST'],
                       'Start slurm jobs with srun, e.g. '
                       'bash tools/slurm_train.sh PARTITION JOB CONFIG.')
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            os.environ['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {env["SLURM_NODELIST"]} | head -n1')
        os.environ['WORLD_SIZE'] = env['SLURM_NTASKS']
        os.environ['RANK'] = env['SLURM_PROCID']
        os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
    elif launcher == 'mpi':
        env = _require([
            'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE',
            'OMPI_COMM_WORLD_LOCAL_RANK', 'MASTER_ADDR'
        ], 'Start MPI jobs with mpirun and export MASTER_ADDR.')
        os.environ.setdefault('MASTER_PORT', '29500')
        os.environ['WORLD_SIZE'] = env['OMPI_COMM_WORLD_SIZE']
        os.environ['RANK'] = env['OMPI_COMM_WORLD_RANK']
        os.environ['LOCAL_RANK'] = env['OMPI_COMM_WORLD_LOCAL_RANK']
    else:
        raise LauncherError(f'unknown launcher {launcher!r}: use one of '
                            f'none, pytorch, slurm, mpi.')
    torch_dist.init_process_group(backend=backend, **kwargs)


def close_distributed(status: int = 0) -> None:
    """End a distributed worker that has finished its work (or stopped on a
    fault): destroy the process group, flush the logs and leave with
    ``status`` without the interpreter's teardown (no-op without a process
    group).

    With the teardown, a CPU (gloo) worker of ``tools/dist_test.sh`` died now
    and then after its work was done: ``terminate called without an active
    exception`` (SIGABRT), so torchrun reported a failed run; destroying the
    process group first did not prevent it. Call it after success, or after
    a fault every rank agreed on (:class:`~davit_ext.errors.TrainingFault`).
    """
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    import logging
    import sys
    torch_dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
