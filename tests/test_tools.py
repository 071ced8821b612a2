"""tools/: train -> checkpoint -> resume -> test on a tiny CustomDataset made
here, exact resume, 2-process CPU dist_train/dist_test, the clear errors,
and the digits export of the demo."""
import importlib.util
import json
import os
import os.path as osp
import re
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
TIMEOUT = 600

TINY_CONFIG = """
_base_ = [{base!r}]
# embed 16, depths [1, 1, 1, 1], window 4; drop path, Mixup/CutMix and a
# random flip so that resuming must restore every random generator.
model = dict(
    backbone=dict(arch=dict(embed_dims=16, num_heads=[1, 1, 2, 2]),
                  drop_path_rate=0.1),
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
param_scheduler = [dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True,
                        begin=0, end=2, convert_to_iter_based=True)]
train_cfg = dict(max_epochs=2, val_interval=1)
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=3),
                     logger=dict(interval=1))
"""


def _env():
    env = dict(os.environ)
    env['PATH'] = osp.dirname(sys.executable) + os.pathsep + env['PATH']
    env.pop('LOCAL_RANK', None)
    # sleeping (not spinning) OpenMP threads: much faster on a busy machine
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    return env


def _run(args, cwd):
    """Run a command line; returns (status, stdout + stderr, stderr)."""
    proc = subprocess.run(
        args,
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr, proc.stderr


def _python_tool(name, *args):
    return [sys.executable, osp.join(ROOT, 'tools', name)] + list(args)


def _free_port():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _val_top1(log, epoch):
    m = re.findall(
        rf'Epoch\(val\) \[{epoch}\]\[\d+/\d+\]\s+'
        r'accuracy/top1: ([\d.]+)', log)
    assert len(m) == 1, log[-3000:]
    return float(m[0])


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _load(path):
    from davit_ext.weights import load_checkpoint_file
    return load_checkpoint_file(path, map_location='cpu')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A 2-class CustomDataset of real handwritten digits and a config.

    scikit-learn's digits (offline), 3 against 8, as 32x32 RGB: 8 training and
    20 held-out images per class. Unlike noise of two brightnesses, the classes
    take learning, so top-1 is graded and tells weights apart.
    """
    return make_tiny(tmp_path_factory.mktemp('tiny'))


def make_tiny(root):
    """The data and config of the ``tiny`` fixture, made in ``root``."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for label, digit in enumerate((3, 8)):
        index = np.flatnonzero(digits.target == digit)
        for split, chosen in (('train', index[:8]), ('val', index[8:28])):
            folder = root / 'data' / split / str(label)
            folder.mkdir(parents=True)
            for i in chosen:
                grey = np.rint(digits.data[i] * (255. / 16.)).astype(np.uint8)
                Image.fromarray(grey.reshape(8, 8)).resize(
                    (32, 32),
                    Image.BICUBIC).convert('RGB').save(folder / f'{i}.png')
    config = root / 'tiny_config.py'
    config.write_text(
        TINY_CONFIG.format(base=BASE_CONFIG, data=str(root / 'data')))
    return SimpleNamespace(root=root, config=str(config))


@pytest.fixture(scope='module')
def runs(tiny):
    """2 epochs straight (A); 1 epoch then --resume CKPT for the 2nd (B)."""
    a, b = str(tiny.root / 'A'), str(tiny.root / 'B')
    rc, log_a, _ = _run(
        _python_tool('train.py', tiny.config, '--work-dir', a), tiny.root)
    assert rc == 0, log_a[-3000:]
    rc, log_b1, _ = _run(
        _python_tool('train.py', tiny.config, '--work-dir', b, '--cfg-options',
                     'train_cfg.max_epochs=1'), tiny.root)
    assert rc == 0, log_b1[-3000:]
    assert sorted(f for f in os.listdir(b) if f.endswith('.pth')) == \
        ['epoch_1.pth']
    rc, log_b2, _ = _run(
        _python_tool('train.py', tiny.config, '--work-dir', b, '--resume',
                     osp.join(b, 'epoch_1.pth')), tiny.root)
    assert rc == 0, log_b2[-3000:]
    return SimpleNamespace(a=a, b=b, log_a=log_a, log_b2=log_b2)


def test_resume_gives_the_same_weights_and_optimizer(runs):
    assert 'resumed epoch: 1, iter: 4' in runs.log_b2
    straight = _load(osp.join(runs.a, 'epoch_2.pth'))
    resumed = _load(osp.join(runs.b, 'epoch_2.pth'))
    assert straight['state_dict'].keys() == resumed['state_dict'].keys()
    for key, value in straight['state_dict'].items():
        assert torch.equal(value, resumed['state_dict'][key]), key
    assert _equal(straight['optimizer'], resumed['optimizer'])
    assert _equal(straight['param_schedulers'], resumed['param_schedulers'])
    assert straight['meta']['epoch'] == resumed['meta']['epoch'] == 2
    assert straight['meta']['iter'] == resumed['meta']['iter'] == 8
    # the weights did change over the second epoch
    first = _load(osp.join(runs.b, 'epoch_1.pth'))
    assert not torch.equal(first['state_dict']['head.fc.weight'],
                           resumed['state_dict']['head.fc.weight'])


def test_test_tool_evaluates_the_checkpoint(runs, tiny):
    out = str(tiny.root / 'metrics.json')
    rc, log, _ = _run(
        _python_tool('test.py', tiny.config,
                     osp.join(runs.b, 'epoch_2.pth'), '--work-dir',
                     str(tiny.root / 'T'), '--out', out, '--out-item',
                     'metrics'), tiny.root)
    assert rc == 0, log[-3000:]
    with open(out) as f:
        metrics = json.load(f)
    # same weights, same images as the straight run's last validation
    assert metrics['accuracy/top1'] == _val_top1(runs.log_a, 2)
    # ... on a set where top-1 is graded (40 images: steps of 2.5 %) and
    # moved with the weights, so that the equality says which were used
    assert 0 < metrics['accuracy/top1'] < 100
    assert _val_top1(runs.log_a, 1) != _val_top1(runs.log_a, 2)


def _published_style(runs, tiny):
    """B's final weights as a published checkpoint: state_dict + meta."""
    path = str(tiny.root / 'published_style.pth')
    if not osp.exists(path):
        ckpt = _load(osp.join(runs.b, 'epoch_2.pth'))
        torch.save(
            {
                'state_dict': ckpt['state_dict'],
                'meta': {
                    'dataset_meta': ckpt['meta']['dataset_meta']
                }
            }, path)
    return path


def test_test_tool_on_a_published_style_checkpoint(runs, tiny):
    out = str(tiny.root / 'published_metrics.json')
    rc, log, _ = _run(
        _python_tool('test.py', tiny.config,
                     _published_style(runs, tiny), '--work-dir',
                     str(tiny.root / 'P'), '--out', out, '--out-item',
                     'metrics'), tiny.root)
    assert rc == 0, log[-3000:]
    with open(out) as f:
        assert json.load(f)['accuracy/top1'] == _val_top1(runs.log_a, 2)


def test_resume_from_weights_only_is_refused(call, runs, tiny):
    path = _published_style(runs, tiny)
    work = tiny.root / 'E6'
    code, _, err = call('train', tiny.config, '--work-dir', str(work),
                        '--resume', path)
    assert code == 2
    assert _one_line(err) == (
        f'checkpoint {path} holds weights but not the training state needed '
        'to resume (epoch, iter, message_hub missing): it was not saved by '
        'an mmengine training run. To start training from these weights, '
        f'pass them as --cfg-options load_from={path} instead of --resume.')
    assert not work.exists()


def test_dist_train_and_dist_test_on_two_cpu_processes(runs, tiny):
    work = str(tiny.root / 'D')
    rc, log, _ = _run_dist_train(tiny, work)
    assert rc == 0, log[-3000:]
    assert 'Distributed training: True' in log
    assert 'GPU number: 2' in log  # mmengine's name for the world size
    # 16 images, 4 per process and step: 2 steps per epoch with 2 processes
    assert 'Epoch(train) [2][2/2]' in log
    assert '[1][3/4]' not in log
    assert osp.isfile(osp.join(work, 'epoch_2.pth'))
    ckpt = _load(osp.join(work, 'epoch_2.pth'))
    assert len(ckpt['random_states']) == 2  # one per rank

    rc, log_t, _ = _run_dist_test(tiny, work)
    assert rc == 0, log_t[-3000:]
    lines = [ln for ln in log_t.splitlines() if 'accuracy/top1' in ln]
    assert len(lines) == 1, log_t[-3000:]  # printed once, not per rank
    top1 = float(re.search(r'accuracy/top1: ([\d.]+)', lines[0]).group(1))
    assert top1 == _val_top1(log, 2)


def _run_dist_train(tiny, work):
    return _run([
        'env', f'PORT={_free_port()}', 'bash',
        osp.join(ROOT, 'tools', 'dist_train.sh'), tiny.config, '2',
        '--work-dir', work
    ], tiny.root)


def _run_dist_test(tiny, work):
    return _run([
        'env', f'PORT={_free_port()}', 'bash',
        osp.join(ROOT, 'tools', 'dist_test.sh'), tiny.config,
        osp.join(work, 'epoch_2.pth'), '2', '--work-dir',
        str(tiny.root / 'DT')
    ], tiny.root)


# --------------------------------------------------------------------------
# Clear errors, before any work is done or any file written
# --------------------------------------------------------------------------


def _one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith('error: ')
    return lines[0][len('error: '):]


def test_missing_data_root(call, tiny):
    work = tiny.root / 'E1'
    missing = str(tiny.root / 'no_such_data')
    code, _, err = call('train', tiny.config, '--work-dir', str(work),
                        '--cfg-options',
                        f'train_dataloader.dataset.data_root={missing}')
    assert code == 2
    assert _one_line(err) == (
        f'train_dataloader.dataset: data root {missing!r} does not exist '
        f"(resolved to {missing!r}). Prepare the dataset as in mmpretrain's "
        'dataset preparation guide (https://mmpretrain.readthedocs.io/en/'
        'latest/user_guides/dataset_prepare.html), i.e. DATA_ROOT/'
        '<data_prefix>/<class name>/<image> (or an ann_file listing "path '
        'label" lines), or point the config at it with --cfg-options '
        'train_dataloader.dataset.data_root=PATH.')
    assert not work.exists()


def test_imagenet_config_without_imagenet(call, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = call(
        'test', osp.join(ROOT, 'configs/davit/davit-tiny_4xb256_in1k.py'),
        'whatever.pth')
    assert code == 2
    msg = _one_line(err)
    assert msg.startswith("test_dataloader.dataset: data root 'data/imagenet'"
                          ' does not exist')
    assert 'DATA_ROOT/train/<wnid>/*.JPEG' in msg
    assert not (tmp_path / 'work_dirs').exists()


def test_missing_checkpoint(call, tiny):
    missing = str(tiny.root / 'nope' / 'epoch_9.pth')
    code, _, err = call('test', tiny.config, missing, '--work-dir',
                        str(tiny.root / 'E2'))
    assert code == 2
    assert _one_line(err) == (
        f'checkpoint {missing!r} does not exist (looked in {missing!r}). '
        'Check the path, or give an http(s) URL of a published checkpoint.')
    assert not (tiny.root / 'E2').exists()


def test_truncated_checkpoint_stops_resume_and_keeps_the_work_dir(
        call, runs, tiny):
    work = tiny.root / 'E3'
    work.mkdir()
    data = open(osp.join(runs.b, 'epoch_1.pth'), 'rb').read()
    (work / 'epoch_1.pth').write_bytes(data[:len(data) // 3])
    (work / 'notes.txt').write_text('keep me')
    before = sorted(os.listdir(work))
    code, _, err = call('train', tiny.config, '--work-dir', str(work),
                        '--resume', str(work / 'epoch_1.pth'))
    assert code == 2
    assert _one_line(err).startswith(
        f'cannot read checkpoint {work / "epoch_1.pth"}: the file is '
        'truncated, damaged or not a torch checkpoint')
    assert sorted(os.listdir(work)) == before
    assert (work / 'notes.txt').read_text() == 'keep me'


def test_checkpoint_that_does_not_fit_the_model(call, runs, tiny):
    ckpt = osp.join(runs.b, 'epoch_2.pth')
    code, _, err = call('test', tiny.config, ckpt, '--work-dir',
                        str(tiny.root / 'E4'), '--cfg-options',
                        'model.head.num_classes=3')
    assert code == 2
    assert _one_line(err) == (
        f'checkpoint {ckpt} does not fit the model of tiny_config.py: '
        '2 shape mismatch(es): head.fc.weight (checkpoint (2, 128), model '
        '(3, 128)), head.fc.bias (checkpoint (2,), model (3,)). Use a '
        'checkpoint saved from this config (same arch and num_classes); '
        'DaViT weights in the timm or official layout must be converted '
        'first (tools/model_converters/davit_to_mmpretrain.py).')
    assert not (tiny.root / 'E4').exists()


def test_missing_config(call, tmp_path):
    code, _, err = call('train', str(tmp_path / 'nope.py'))
    assert code == 2
    assert _one_line(err).startswith(
        f"config file {str(tmp_path / 'nope.py')!r} does not exist")


class _Payload:

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path, ))


def test_malicious_checkpoint_refused_by_test_tool(tiny):
    marker = tiny.root / 'payload_ran'
    evil = str(tiny.root / 'evil.pth')
    torch.save({'state_dict': {}, 'meta': _Payload(str(marker))}, evil)
    rc, _, err = _run(
        _python_tool('test.py', tiny.config, evil, '--work-dir',
                     str(tiny.root / 'E5')), tiny.root)
    assert rc == 2
    assert not marker.exists()
    msg = _one_line(err)
    assert msg.startswith(f'refused to load checkpoint {evil}: it contains '
                          'a pickled object')
    assert 'posix.mkdir' in msg
    assert not (tiny.root / 'E5').exists()


def test_dist_scripts_explain_their_arguments():
    rc, out, _ = _run(['bash', osp.join(ROOT, 'tools', 'dist_train.sh')], ROOT)
    assert rc == 2
    assert out.strip().endswith(
        'dist_train.sh CONFIG GPUS [tools/train.py options]')
    rc, out, _ = _run(
        ['bash', osp.join(ROOT, 'tools', 'dist_test.sh'), 'a.py'], ROOT)
    assert rc == 2
    assert 'CONFIG CHECKPOINT GPUS' in out


def test_cpu_config_adaptation_and_launcher_errors(monkeypatch):
    from mmengine.config import Config

    from davit_ext.cli import dist as runtime
    monkeypatch.setattr(runtime, 'has_cuda', lambda: False)
    cfg = Config(
        dict(
            launcher='pytorch',
            env_cfg=dict(dist_cfg=dict(backend='nccl')),
            train_dataloader=dict(pin_memory=True)))
    notes = runtime.adapt_config_to_device(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg == dict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=False,
        device_ids=None)
    assert cfg.train_dataloader.pin_memory is False
    assert notes == [
        "env_cfg.dist_cfg.backend: 'nccl' -> 'gloo'",
        'model_wrapper_cfg.device_ids: None (CPU DDP)'
    ]
    for var in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('LOCAL_RANK', '0')
    with pytest.raises(runtime.LauncherError) as err:
        runtime.init_distributed('pytorch', {'backend': 'gloo'})
    assert str(err.value) == (
        'the launcher environment is incomplete: RANK, WORLD_SIZE, '
        'MASTER_ADDR, MASTER_PORT not set. Start distributed jobs with '
        'torchrun, e.g. bash tools/dist_train.sh CONFIG NUM_PROCESSES.')


def test_adapt_config_to_device_without_and_with_cuda(monkeypatch):
    """runtime.adapt_config_to_device, case by case: nccl -> gloo (noted), CPU
    backends kept, a DDP wrapper without device_ids for launched runs, no
    pinned memory; with CUDA nothing changes."""
    import copy

    from mmengine.config import Config

    from davit_ext.cli import dist as runtime
    monkeypatch.setattr(runtime, 'has_cuda', lambda: False)

    def adapt(**cfg):
        cfg = Config(cfg)
        return cfg, runtime.adapt_config_to_device(cfg)

    # a launched nccl run: gloo, a CPU DDP wrapper, no pinned memory
    cfg, notes = adapt(
        launcher='slurm',
        find_unused_parameters=True,
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend='nccl')),
        train_dataloader=dict(batch_size=2, pin_memory=True),
        val_dataloader=dict(batch_size=3, pin_memory=False),
        test_dataloader=dict(batch_size=4, pin_memory=True))
    assert notes == [
        "env_cfg.dist_cfg.backend: 'nccl' -> 'gloo'",
        'model_wrapper_cfg.device_ids: None (CPU DDP)'
    ]
    assert cfg.env_cfg.to_dict() == dict(
        cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
    assert cfg.model_wrapper_cfg.to_dict() == dict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=True,
        device_ids=None)
    assert cfg.train_dataloader.to_dict() == dict(
        batch_size=2, pin_memory=False)
    assert cfg.val_dataloader.to_dict() == dict(batch_size=3, pin_memory=False)
    assert cfg.test_dataloader.to_dict() == dict(
        batch_size=4, pin_memory=False)

    # CPU backends stay, without a note; launcher none gets no wrapper
    for backend in ('gloo', 'mpi'):
        cfg, notes = adapt(
            launcher='none',
            env_cfg=dict(dist_cfg=dict(backend=backend)),
            train_dataloader=dict(pin_memory=True))
        assert notes == [], backend
        assert cfg.env_cfg.dist_cfg.backend == backend
        assert 'model_wrapper_cfg' not in cfg
        assert cfg.train_dataloader.pin_memory is False
        cfg, notes = adapt(
            launcher='mpi', env_cfg=dict(dist_cfg=dict(backend=backend)))
        assert notes == ['model_wrapper_cfg.device_ids: None (CPU DDP)']
        assert cfg.env_cfg.dist_cfg.backend == backend
        assert cfg.model_wrapper_cfg.device_ids is None

    # the user's own DDP wrapper keeps its other keys, loses its GPU ids
    cfg, notes = adapt(
        launcher='pytorch',
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        model_wrapper_cfg=dict(
            type='MMDistributedDataParallel',
            find_unused_parameters=True,
            broadcast_buffers=True,
            static_graph=True,
            device_ids=[0]))
    assert notes == ['model_wrapper_cfg.device_ids: None (CPU DDP)']
    assert cfg.model_wrapper_cfg.to_dict() == dict(
        type='MMDistributedDataParallel',
        find_unused_parameters=True,
        broadcast_buffers=True,
        static_graph=True,
        device_ids=None)
    # ... and a wrapper that takes no device_ids is left alone
    fsdp = dict(type='MMFullyShardedDataParallel', use_orig_params=True)
    cfg, notes = adapt(
        launcher='pytorch',
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        model_wrapper_cfg=fsdp)
    assert notes == [] and cfg.model_wrapper_cfg.to_dict() == fsdp

    # with CUDA: nothing changes, nothing is noted
    monkeypatch.setattr(runtime, 'has_cuda', lambda: True)
    for launcher in ('none', 'pytorch'):
        original = dict(
            launcher=launcher,
            env_cfg=dict(dist_cfg=dict(backend='nccl')),
            train_dataloader=dict(pin_memory=True))
        cfg, notes = adapt(**copy.deepcopy(original))
        assert notes == []
        assert cfg.to_dict() == original


def test_adapt_config_to_device_without_dist_cfg(monkeypatch):
    """No env_cfg / dist_cfg in the config: mmengine's default backend (nccl)
    must be switched to gloo as well, as the note says."""
    from mmengine.config import Config

    from davit_ext.cli import dist as runtime
    monkeypatch.setattr(runtime, 'has_cuda', lambda: False)
    for cfg in (dict(launcher='none'),
                dict(launcher='none', env_cfg=dict(cudnn_benchmark=False))):
        cfg = Config(cfg)
        notes = runtime.adapt_config_to_device(cfg)
        assert notes == ["env_cfg.dist_cfg.backend: 'nccl' -> 'gloo'"]
        assert cfg.env_cfg.dist_cfg.backend == 'gloo'
        assert 'model_wrapper_cfg' not in cfg  # launcher none: no wrapper


# --------------------------------------------------------------------------
# The demo's dataset export
# --------------------------------------------------------------------------


def test_digits_export(tmp_path, capsys):
    from sklearn.datasets import load_digits
    convert = _tool_path('dataset_converters/digits_to_folder.py')
    out = tmp_path / 'digits'
    convert.main([str(out), '--size', '8'])
    counts = {
        split: sum(len(os.listdir(out / split / str(c))) for c in range(10))
        for split in ('train', 'val')
    }
    assert counts == {'train': 1442, 'val': 355}
    digits = load_digits()
    # image 0 is the first 0 (train); the 5th zero of the dataset is held out
    zeros = np.flatnonzero(digits.target == 0)
    assert (out / 'train' / '0' / f'{zeros[0]:04d}.png').is_file()
    assert (out / 'val' / '0' / f'{zeros[4]:04d}.png').is_file()
    first = out / 'train' / '0' / f'{zeros[0]:04d}.png'
    pixels = np.asarray(Image.open(first))
    assert pixels.tolist() == np.rint(digits.images[zeros[0]] * 255 /
                                      16).astype(np.uint8).tolist()
    capsys.readouterr()
    convert.main([str(out), '--size', '8'])  # same export: kept
    assert 'already exported (1442 train / 355 val), kept' in \
        capsys.readouterr().out
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'mine.txt').write_text('x')
    with pytest.raises(SystemExit) as exc:
        convert.main([str(other)])
    assert 'is not empty and is not an export with these settings; nothing ' \
           'was written' in str(exc.value)
    assert os.listdir(other) == ['mine.txt']


def _tool_path(rel):
    spec = importlib.util.spec_from_file_location(
        '_davit_ext_' + rel.replace('/', '_').replace('.py', ''),
        osp.join(ROOT, 'tools', rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Imported by the training subprocess (custom_imports): records, for every
# training step, the dtype of a backbone Linear's output, of the parameters
# and of their gradients, and writes them to OUT as JSON after training.
AMP_PROBE = """
import json

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class DavitExtTestAmpProbe(Hook):

    def __init__(self, out):
        self.out = out
        self.seen = dict(forward=[], params=[], grads=[], iters=0, linear='')

    def before_train(self, runner):
        model = getattr(runner.model, 'module', runner.model)
        name, linear = next(
            (n, m) for n, m in model.backbone.named_modules()
            if isinstance(m, torch.nn.Linear))
        self.seen['linear'] = name

        def forward(module, inputs, output):
            if module.training:  # the training step, not validation
                self.seen['forward'].append(str(output.dtype))

        def grad(param):
            self.seen['grads'].append(str(param.grad.dtype))

        linear.register_forward_hook(forward)
        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(grad)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.seen['iters'] += 1
        model = getattr(runner.model, 'module', runner.model)
        self.seen['params'].extend(str(p.dtype) for p in model.parameters())

    def after_train(self, runner):
        with open(self.out, 'w') as f:
            json.dump(self.seen, f)
"""


def test_amp_trains_on_cpu_in_bf16(tiny, monkeypatch):
    """``--amp`` without a GPU: bf16 autocast (davit_ext.CPUAmpOptimWrapper)
    instead of mmengine's CUDA-only AmpOptimWrapper.

    A hook in the training process checks that the forward of the training step
    really ran in bfloat16 (not float16, not float32) while parameters and
    their gradients stayed float32.
    """
    if torch.cuda.is_available():
        pytest.skip('checks the CPU path')
    probe_dir = tiny.root / 'amp_probe'
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / 'davit_ext_amp_probe.py').write_text(AMP_PROBE)
    monkeypatch.setenv(
        'PYTHONPATH',
        os.pathsep.join(
            p for p in (str(probe_dir), os.environ.get('PYTHONPATH')) if p))
    record = tiny.root / 'amp_dtypes.json'
    config = tiny.root / 'amp_config.py'
    config.write_text(f"""
_base_ = [{tiny.config!r}]
custom_imports = dict(imports=['davit_ext', 'davit_ext_amp_probe'],
                      allow_failed_imports=False)
custom_hooks = [dict(type='DavitExtTestAmpProbe', out={str(record)!r})]
""")
    work = str(tiny.root / 'amp')
    rc, log, _ = _run(
        _python_tool('train.py', str(config), '--work-dir', work, '--amp',
                     '--cfg-options', 'train_cfg.max_epochs=1'), tiny.root)
    assert rc == 0, log[-3000:]
    assert 'CPUAmpOptimWrapper: forward under torch.autocast("cpu", ' \
        'bfloat16)' in log, log[-3000:]
    with open(record) as f:
        seen = json.load(f)
    # 16 training images, batch 4: 4 steps, each one forward of the Linear
    assert seen['iters'] == 4, seen
    assert seen['linear'] == 'stages.0.blocks.0.spatial_block.attn.w_msa.qkv'
    assert seen['forward'] == ['torch.bfloat16'] * 4, seen['forward']
    n_params = len(seen['params']) // 4
    assert n_params > 100
    assert seen['params'] == ['torch.float32'] * (4 * n_params)
    # every trainable parameter got a float32 gradient in every step
    assert seen['grads'] == ['torch.float32'] * (4 * n_params)
    assert osp.exists(osp.join(work, 'epoch_1.pth'))
    state = _load(osp.join(work, 'epoch_1.pth'))['state_dict']
    assert {str(v.dtype) for v in state.values() if v.is_floating_point()} \
        == {'torch.float32'}
    assert _val_top1(log, 1) >= 0
