"""Sharded training through mmengine's FlexibleRunner:
``davit_ext.FSDPStrategy`` with one FSDP unit per DaViT block, trained by
``tools/dist_train.sh`` on 2 CPU processes (gloo), resumed with ``--resume``,
and compared with the same config trained by plain DDP; the configs and the
one-line errors.

Oracles: a resumed run equals the uninterrupted one bit for bit (weights,
optimizer, schedulers); the FSDP run equals the DDP run (same data, same
random draws) up to float rounding, with the optimizer's parameter-wise rules
(no weight decay on 1-d parameters) and gradient clipping of the DDP run.
"""
import os
import os.path as osp
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
BASE_CONFIG = osp.join(ROOT, 'configs', 'digits',
                       'davit-mini_1xb64_digits32.py')

# The digits tiny config of test_tools (2 classes, 8 training images each:
# 2 steps per epoch on 2 processes x 4 images), with gradient checkpointing
# inside the FSDP units (with_cp) and gradient clipping that bites
# (max_norm below the gradient norms of these steps).
DDP_CONFIG = """
_base_ = [{base!r}]
model = dict(
    backbone=dict(arch=dict(embed_dims=16, num_heads=[1, 1, 2, 2]),
                  drop_path_rate=0.1, with_cp=True),
    head=dict(num_classes=2, in_channels=128),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8),
                             dict(type='CutMix', alpha=1.0)]))
data_preprocessor = dict(num_classes=2)
train_dataloader = dict(
    batch_size=4,
    dataset=dict(data_root={data!r}, pipeline=[
        dict(type='LoadImageFromFile'),
        dict(type='RandomFlip', prob=0.5, direction='horizontal'),
        dict(type='PackInputs')]))
val_dataloader = dict(batch_size=4, dataset=dict(data_root={data!r}))
test_dataloader = val_dataloader
optim_wrapper = dict(clip_grad=dict(max_norm=1.0))
param_scheduler = [dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True,
                        begin=0, end=2, convert_to_iter_based=True)]
train_cfg = dict(max_epochs=2, val_interval=2)
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=3),
                     logger=dict(interval=1))
"""
FSDP_CONFIG = """
_base_ = [{base!r}]
strategy = dict(
    type='davit_ext.FSDPStrategy',
    model_wrapper=dict(
        auto_wrap_policy=dict(type='davit_ext.davit_wrap_policy',
                              wrap='block')),
    state_dict_cfg='full')
"""


def _free_port():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _dist_train(config, work_dir, *args):
    env = dict(os.environ, PORT=str(_free_port()), OMP_NUM_THREADS='1')
    env['PATH'] = osp.dirname(sys.executable) + os.pathsep + env['PATH']
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    env.pop('LOCAL_RANK', None)
    proc = subprocess.run(
        [
            'bash',
            osp.join(ROOT, 'tools', 'dist_train.sh'), config, '2',
            '--work-dir', work_dir
        ] + list(args),
        cwd=osp.dirname(config),
        env=env,
        capture_output=True,
        text=True,
        timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _load(path):
    from davit_ext.weights import load_checkpoint_file
    return load_checkpoint_file(path, map_location='cpu')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """The data (3 against 8 of scikit-learn's digits) and the DDP config."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    root = tmp_path_factory.mktemp('flexible')
    for label, digit in enumerate((3, 8)):
        index = np.flatnonzero(digits.target == digit)
        for split, chosen in (('train', index[:8]), ('val', index[8:12])):
            folder = root / 'data' / split / str(label)
            folder.mkdir(parents=True)
            for i in chosen:
                grey = np.rint(digits.data[i] * (255. / 16.)).astype(np.uint8)
                Image.fromarray(grey.reshape(8, 8)).resize(
                    (32, 32),
                    Image.BICUBIC).convert('RGB').save(folder / f'{i}.png')
    ddp = root / 'ddp.py'
    ddp.write_text(
        DDP_CONFIG.format(base=BASE_CONFIG, data=str(root / 'data')))
    return SimpleNamespace(root=root, ddp=str(ddp))


@pytest.fixture(scope='module')
def runs(tiny):
    """FSDP 2 epochs (A); FSDP resumed from A's epoch 1 (B); DDP (D)."""
    root, ddp = tiny.root, tiny.ddp
    fsdp = root / 'fsdp.py'
    fsdp.write_text(FSDP_CONFIG.format(base=ddp))
    a, b, d = (str(root / name) for name in 'ABD')
    log_a = _dist_train(str(fsdp), a)
    log_b = _dist_train(str(fsdp), b, '--resume', osp.join(a, 'epoch_1.pth'))
    log_d = _dist_train(ddp, d)
    return SimpleNamespace(
        a=a, b=b, d=d, log_a=log_a, log_b=log_b, log_d=log_d)


def _assert_same(x, y, where=''):
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            _assert_same(x[k], y[k], f'{where}.{k}')
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_same(u, v, f'{where}[{i}]')
    else:
        assert x == y, where


def test_fsdp_run_is_sharded_per_block_on_cpu(runs):
    log = runs.log_a
    assert 'Distributed training: True' in log
    assert 'GPU number: 2' in log  # mmengine's name for the world size
    assert "no CUDA here: strategy.model_wrapper.device_id: 'cpu'" in log
    # 4 blocks (depths 1, 1, 1, 1), each its own unit, and the root
    assert 'FSDP units: 1 ImageClassifier, 4 DaViTBlock' in log
    assert 'Epoch(train) [2][2/2]' in log and '[2][3/' not in log


def test_resume_equals_the_uninterrupted_run(runs):
    assert 'resumed epoch: 1, iter: 2' in runs.log_b
    straight = _load(osp.join(runs.a, 'epoch_2.pth'))
    resumed = _load(osp.join(runs.b, 'epoch_2.pth'))
    assert straight['meta']['epoch'] == resumed['meta']['epoch'] == 2
    assert straight['meta']['iter'] == resumed['meta']['iter'] == 4
    _assert_same(straight['state_dict'], resumed['state_dict'], 'state_dict')
    _assert_same(straight['optimizer'], resumed['optimizer'], 'optimizer')
    _assert_same(straight['param_schedulers'], resumed['param_schedulers'],
                 'param_schedulers')
    # the second epoch did train
    first = _load(osp.join(runs.a, 'epoch_1.pth'))
    assert not torch.equal(first['state_dict']['head.fc.weight'],
                           straight['state_dict']['head.fc.weight'])


def test_fsdp_trains_as_ddp_does(runs):
    fsdp = _load(osp.join(runs.a, 'epoch_2.pth'))
    ddp = _load(osp.join(runs.d, 'epoch_2.pth'))
    start = _load(osp.join(runs.a, 'epoch_1.pth'))['state_dict']
    # a full checkpoint: the keys of the unwrapped model, as DDP saves
    assert fsdp['state_dict'].keys() == ddp['state_dict'].keys()
    assert not any('_fsdp' in k for k in fsdp['state_dict'])
    moved = diff = 0.
    for key, value in ddp['state_dict'].items():
        diff = max(diff, (fsdp['state_dict'][key] - value).abs().max().item())
        moved = max(moved, (start[key] - value).abs().max().item())
    assert diff < 1e-5 and moved > 100 * diff, (diff, moved)
    # Adam's moments of the same parameters (DDP numbers them, FSDP names
    # them, in the same order)
    names = [g['params'][0] for g in fsdp['optimizer']['param_groups']]
    assert len(names) == len(ddp['optimizer']['param_groups'])
    for i, name in enumerate(names):
        ours, theirs = fsdp['optimizer']['state'][name], \
            ddp['optimizer']['state'][i]
        for k in ('exp_avg', 'exp_avg_sq'):
            torch.testing.assert_close(
                ours[k], theirs[k], atol=1e-6, rtol=1e-4, msg=name)
        group = fsdp['optimizer']['param_groups'][i]
        other = ddp['optimizer']['param_groups'][i]
        assert (group['weight_decay'], group['lr']) == \
            (other['weight_decay'], other['lr']), name
        # paramwise rules on the real shapes: decay on matrices only
        ndim = fsdp['state_dict'][name].ndim
        assert group['weight_decay'] == (0.05 if ndim > 1 else 0.), name
    # the same gradient norms (clipped by the whole gradient's norm)
    grad_norms = [
        line.split('grad_norm: ')[1].split()[0]
        for line in runs.log_a.splitlines() if 'Epoch(train)' in line
    ]
    assert len(grad_norms) == 4 and all(float(g) > 1. for g in grad_norms)
    assert grad_norms == [
        line.split('grad_norm: ')[1].split()[0]
        for line in runs.log_d.splitlines() if 'Epoch(train)' in line
    ]


DEEPSPEED_CONFIG = """
_base_ = [{base!r}]
strategy = dict(type='DeepSpeedStrategy',
                zero_optimization=dict(stage=3), gradient_clipping=1.0)
optim_wrapper = dict(
    _delete_=True, type='DeepSpeedOptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05, eps=1e-8,
                   betas=(0.9, 0.999)),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0,
                       flat_decay_mult=0.0))
"""


def test_deepspeed_zero3_trains_and_resumes_on_cpu(tiny, runs):
    """Optional (pip install -e ".[deepspeed]"); DeepSpeed compiles its CPU
    communication op at its first start (minutes)."""
    pytest.importorskip('deepspeed')
    config = tiny.root / 'deepspeed.py'
    config.write_text(DEEPSPEED_CONFIG.format(base=tiny.ddp))
    work = str(tiny.root / 'S')
    log = _dist_train(
        str(config), work, '--cfg-options', 'train_cfg.max_epochs=1')
    losses = [
        line.split('loss: ')[1].split()[0] for line in log.splitlines()
        if 'Epoch(train)' in line
    ]
    # ZeRO-3, same rules and clipping: the first steps as DDP's
    assert losses == [
        line.split('loss: ')[1].split()[0] for line in runs.log_d.splitlines()
        if 'Epoch(train) [1]' in line
    ]
    # a checkpoint is a folder of DeepSpeed files, one set per rank
    assert sorted(os.listdir(osp.join(work, 'epoch_1.pth'))) == [
        f'zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt' for r in (0, 1)
        for kind in ('model', 'optim')
    ]
    log = _dist_train(
        str(config), work, '--resume', osp.join(work, 'epoch_1.pth'))
    assert 'resumed epoch: 1, iter: 2' in log
    assert 'Epoch(train) [2][2/2]' in log and '[1][1/2]' not in log
    assert osp.isdir(osp.join(work, 'epoch_2.pth'))


# --------------------------------------------------------------------------
# Configs, CPU adaptation, errors: in this process
# --------------------------------------------------------------------------


def test_deepspeed_config_is_the_ddp_config_with_deepspeed():
    from mmengine.config import Config
    name = 'configs/davit/davit-huge-fl_florence2-pre_%s_in1k-768px.py'
    ds = Config.fromfile(osp.join(ROOT, name % 'deepspeed-zero3-8xb16'))
    ddp = Config.fromfile(osp.join(ROOT, name % '8xb16')).to_dict()
    ds = ds.to_dict()
    assert ds.pop('runner_type') == 'FlexibleRunner'
    strategy = ds.pop('strategy')
    assert strategy['type'] == 'DeepSpeedStrategy'
    assert strategy['zero_optimization']['stage'] == 3
    # clipping and AdamW moved into DeepSpeed's hands, nothing else changed
    ours, theirs = ds.pop('optim_wrapper'), ddp.pop('optim_wrapper')
    assert strategy['gradient_clipping'] == theirs['clip_grad']['max_norm']
    assert ours['type'] == 'DeepSpeedOptimWrapper'
    assert ours['optimizer'] == theirs['optimizer']
    assert ours['paramwise_cfg'] == theirs['paramwise_cfg']
    assert ds == ddp


@pytest.mark.parametrize('arch', ['base-fl', 'huge-fl'])
def test_fsdp_configs_are_their_ddp_configs_with_a_strategy(arch):
    from mmengine.config import Config
    name = f'configs/davit/davit-{arch}_florence2-pre_%s_in1k-768px.py'
    fsdp = Config.fromfile(osp.join(ROOT, name % 'fsdp-8xb16')).to_dict()
    ddp = Config.fromfile(osp.join(ROOT, name % '8xb16')).to_dict()
    assert fsdp.pop('runner_type') == 'FlexibleRunner'
    strategy = fsdp.pop('strategy')
    assert strategy['type'] == 'davit_ext.FSDPStrategy'
    assert strategy['model_wrapper']['auto_wrap_policy'] == dict(
        type='davit_ext.davit_wrap_policy', wrap='block')
    assert fsdp == ddp
    assert fsdp['model']['backbone']['arch'] == arch


def test_wrap_policy_names_our_modules():
    from mmengine.registry import FUNCTIONS

    from davit_ext.engine.fsdp import davit_wrap_policy
    from davit_ext.errors import ConfigError
    from davit_ext.models import DaViT
    model = DaViT(arch='tiny')
    block, stage = model.stages[0].blocks[0], model.stages[0]
    assert FUNCTIONS.get('davit_ext.davit_wrap_policy') is davit_wrap_policy
    assert davit_wrap_policy(block, False, 0)
    assert not davit_wrap_policy(stage, False, 0)
    assert davit_wrap_policy(stage, False, 0, wrap='stage')
    assert davit_wrap_policy(model, True, 0)  # look inside
    with pytest.raises(ConfigError, match="wrap='layer' is not a DaViT unit"):
        davit_wrap_policy(block, False, 0, wrap='layer')


def test_strategies_adapted_to_cpu_processes(monkeypatch):
    from mmengine.config import Config

    from davit_ext.cli import dist
    from davit_ext.errors import ConfigError
    monkeypatch.setattr(dist, 'has_cuda', lambda: False)

    def adapt(**cfg):
        cfg = Config(dict(launcher='pytorch', **cfg))
        return cfg, dist.adapt_config_to_device(cfg)

    cfg, notes = adapt(strategy=dict(type='davit_ext.FSDPStrategy'))
    assert cfg.strategy.model_wrapper == dict(
        type='MMFullyShardedDataParallel', device_id='cpu')
    assert "strategy.model_wrapper.device_id: 'cpu' (CPU FSDP)" in notes
    assert 'model_wrapper_cfg' not in cfg  # the plain Runner's, unused here
    cfg, notes = adapt(runner_type='FlexibleRunner')  # DDPStrategy
    assert cfg.strategy == dict(
        type='DDPStrategy',
        model_wrapper=dict(
            type='MMDistributedDataParallel',
            broadcast_buffers=False,
            device_ids=None))
    cfg, notes = adapt(strategy=dict(type='DDPStrategy', sync_bn='torch'))
    assert cfg.strategy.sync_bn is None
    with pytest.raises(
            ConfigError,
            match='^strategy ColossalAIStrategy '
            'needs CUDA and this machine has none'):
        adapt(strategy=dict(type='ColossalAIStrategy'))
    with pytest.raises(ConfigError, match='cpu_offload moves parameters'):
        adapt(
            strategy=dict(
                type='FSDPStrategy', model_wrapper=dict(cpu_offload=True)))
    # one process: nothing to adapt (the strategy refuses to start, below)
    cfg = Config(dict(launcher='none', strategy=dict(type='FSDPStrategy')))
    dist.adapt_config_to_device(cfg)
    assert 'model_wrapper' not in cfg.strategy


def test_sharding_strategy_without_a_launcher_is_one_line(call, tmp_path):
    config = tmp_path / 'fsdp_config.py'
    config.write_text(f'_base_ = [{BASE_CONFIG!r}]\n'
                      "strategy = dict(type='davit_ext.FSDPStrategy')\n")
    code, _, err = call('train', str(config), '--work-dir',
                        str(tmp_path / 'w'))
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [
        'error: fsdp_config.py runs with FSDPStrategy, which shards the '
        'model across distributed processes: start it with bash '
        'tools/dist_train.sh CONFIG N (N processes; N=1 runs one unsharded '
        'process).'
    ]
    assert not (tmp_path / 'w').exists()
