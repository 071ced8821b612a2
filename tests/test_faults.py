"""Training through the faults of real runs, with tools/train.py on tiny data:
a non-finite loss, unreadable images, SIGTERM/SIGUSR1 (preemption) and a failed
checkpoint save, on one process and on 2 CPU processes (gloo).

Faults are made real and deterministic by a probe hook imported by the training
process (``custom_imports``): it sends the real signal to its own process after
a given iteration, multiplies the head's output by NaN in given iterations, or
lowers the process's file-size limit before a checkpoint is written (the write
then fails midway with EFBIG, as from the OS). Single- process runs go through
tools/train.py's main() in this process (the ``call`` fixture), the distributed
ones through tools/dist_train.sh.
"""
import errno
import os
import os.path as osp
import re
import resource
import shutil
import signal

import pytest
import torch
from test_tools import _equal, _free_port, _load, _one_line, _run, make_tiny

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

PROBE = """
import os
import resource
import signal

from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class DavitExtTestFaultProbe(Hook):
    priority = 'VERY_HIGH'  # before the hooks under test

    def __init__(self, signal_at=None, signal_name='SIGTERM', nan_at=(),
                 rank=None, fsize_at_epoch=None):
        self.signal_at = signal_at
        self.signal_name = signal_name
        self.nan_at = set(nan_at)
        self.rank = rank
        self.fsize_at_epoch = fsize_at_epoch
        self.poison = False

    def _mine(self):
        return self.rank is None or get_rank() == self.rank

    def before_train(self, runner):
        model = getattr(runner.model, 'module', runner.model)

        def forward(module, inputs, output):
            return output * float('nan') if self.poison else output

        model.head.fc.register_forward_hook(forward)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.poison = runner.iter + 1 in self.nan_at and self._mine()

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == self.signal_at and self._mine():
            os.kill(os.getpid(), getattr(signal, self.signal_name))

    def after_train_epoch(self, runner):
        if runner.epoch + 1 == self.fsize_at_epoch and get_rank() == 0:
            # the next checkpoint fails midway: half of the last one fits
            size = os.path.getsize(os.path.join(runner.work_dir,
                                                'epoch_1.pth'))
            resource.setrlimit(resource.RLIMIT_FSIZE,
                               (size // 2, resource.RLIM_INFINITY))
"""


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """Digits 3 against 8 (8 training, 20 held-out images per class, 32x32), a
    copy with one truncated training image and one with a val file that is not
    an image, the tiny config of test_tools and a probe config."""
    made = make_tiny(tmp_path_factory.mktemp('faults'))
    root = made.root
    bad = root / 'data_bad'
    shutil.copytree(root / 'data', bad)
    first = sorted(os.listdir(bad / 'train' / '1'))[0]
    made.bad_image = bad / 'train' / '1' / first
    made.bad_image.write_bytes(made.bad_image.read_bytes()[:200])
    made.bad_index = len(os.listdir(bad / 'train' / '0'))  # class 0 first
    badval = root / 'data_badval'
    shutil.copytree(root / 'data', badval)
    made.bad_val = badval / 'val' / '0' / sorted(
        os.listdir(badval / 'val' / '0'))[0]
    made.bad_val.write_text('not an image')
    probe_dir = root / 'probe'
    probe_dir.mkdir()
    (probe_dir / 'davit_ext_fault_probe.py').write_text(PROBE)
    made.probe_dir = str(probe_dir)
    made.probe = str(root / 'probe_config.py')
    with open(made.probe, 'w') as f:
        f.write(f"""
_base_ = [{made.config!r}]
custom_imports = dict(imports=['davit_ext', 'davit_ext_fault_probe'],
                      allow_failed_imports=False)
custom_hooks = [dict(type='DavitExtTestFaultProbe')]
""")
    return made


@pytest.fixture
def probe_path(tiny, monkeypatch):
    monkeypatch.syspath_prepend(tiny.probe_dir)
    monkeypatch.setenv(
        'PYTHONPATH',
        os.pathsep.join(
            p for p in (tiny.probe_dir, os.environ.get('PYTHONPATH')) if p))


def _same_training_state(a, b):
    a, b = _load(a), _load(b)
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), key
    assert _equal(a['optimizer'], b['optimizer'])
    assert _equal(a['param_schedulers'], b['param_schedulers'])
    assert a['meta']['iter'] == b['meta']['iter']


def _pointer(work):
    with open(osp.join(work, 'last_checkpoint')) as f:
        return f.read().strip()


@pytest.fixture(scope='module')
def straight(tiny, tmp_path_factory):
    """2 epochs of 4 iterations without interruption (the oracle), in this
    process as the interrupted runs."""
    from conftest import _tool
    from mmengine.logging import MMLogger
    work = str(tiny.root / 'straight')
    MMLogger._instance_dict.clear()
    old = os.environ.get('LOCAL_RANK')
    os.environ['LOCAL_RANK'] = '0'
    try:
        _tool('train').main([tiny.config, '--work-dir', work, '--no-validate'])
    except SystemExit as exc:  # pragma: no cover - shown by the assert
        assert exc.code == 0
    finally:
        if old is None:
            os.environ.pop('LOCAL_RANK')
    return work


# --------------------------------------------------------------- preemption


@pytest.mark.parametrize('name, at, where', [
    ('SIGTERM', 6, 'epoch 2, batch 2/4'),
    ('SIGUSR1', 4, 'epoch 1, batch 4/4'),
])
def test_signal_saves_a_checkpoint_and_resume_is_exact(name, at, where, call,
                                                       tiny, straight,
                                                       probe_path):
    work = str(tiny.root / f'preempt_{name}')
    handler = signal.getsignal(getattr(signal, name))
    code, out, err = call('train', tiny.probe, '--work-dir', work,
                          '--no-validate', '--cfg-options',
                          f'custom_hooks.0.signal_at={at}',
                          f'custom_hooks.0.signal_name={name}')
    saved = osp.join(work, f'preempt_iter_{at}.pth')
    assert code == 75, err[-3000:]
    assert err.strip() == (
        f'stopped: {name} received: training stopped after iteration {at} '
        f'({where}) and saved {saved}. Continue with: tools/train.py CONFIG '
        '--resume (same work_dir); exit status 75.')
    assert signal.getsignal(getattr(signal, name)) == handler
    assert _pointer(work) == saved
    ckpt = _load(saved)
    assert ckpt['meta']['iter'] == at
    assert ckpt['train_position']['epoch'] == (at - 1) // 4
    assert ckpt['train_position']['batch'] == (at - 1) % 4 + 1
    assert len(ckpt['random_states']) == 1
    assert not osp.exists(osp.join(work, 'epoch_2.pth'))

    code, out, err = call('train', tiny.probe, '--work-dir', work,
                          '--no-validate', '--resume')
    assert code == 0, err[-3000:]
    if at % 4:  # resumed in the middle of the epoch, at the next batch
        assert f'Epoch(train) [2][{at % 4 + 1}/4]' in out
        assert f'Epoch(train) [2][{at % 4}/4]' not in out
    _same_training_state(
        osp.join(straight, 'epoch_2.pth'), osp.join(work, 'epoch_2.pth'))
    assert not osp.exists(saved)  # outdated by epoch_2.pth, removed
    assert _pointer(work) == osp.join(work, 'epoch_2.pth')


# ---------------------------------------------------------- non-finite loss


def test_nonfinite_loss_stops_before_anything_is_saved(call, tiny, straight):
    """A std of 0 from epoch 2 on: the resumed run stops at its first step with
    one message; epoch_1.pth and last_checkpoint stay as they were."""
    work = tiny.root / 'nan'
    work.mkdir()
    shutil.copy(osp.join(straight, 'epoch_1.pth'), work)
    (work / 'last_checkpoint').write_text(str(work / 'epoch_1.pth'))
    before = (work / 'epoch_1.pth').read_bytes()
    code, _, err = call('train', tiny.config, '--work-dir', str(work),
                        '--resume', '--no-validate', '--cfg-options',
                        'data_preprocessor.std=[0,0,0]')
    assert code == 3
    assert _one_line(err) == (
        'non-finite loss at iteration 5 (epoch 2, batch 1/4): loss=nan (not '
        'finite: loss). Training stopped and this state was not saved; the '
        f'last checkpoint, {work / "epoch_1.pth"}, is from before it. Likely '
        'causes: data_preprocessor.std is [0, 0, 0]: a std of 0 '
        'divides the images by zero; fix it; a learning rate too high for '
        'this batch size (optim_wrapper.optimizer.lr; --auto-scale-lr); data '
        'normalisation (data_preprocessor mean/std, images that are blank or '
        'of another value range); fp16 overflow under --amp (the loss scaler '
        'skips steps with overflowing gradients but cannot fix a non-finite '
        'loss: lower the lr or train in bf16/fp32). To skip such steps '
        'instead: tools/train.py --skip-nonfinite.')
    assert sorted(f for f in os.listdir(work) if not f[0].isdigit()) == [
        'epoch_1.pth', 'last_checkpoint', 'tiny_config.py'
    ]
    assert (work / 'epoch_1.pth').read_bytes() == before
    assert _pointer(work) == str(work / 'epoch_1.pth')
    assert 'non-finite loss at iteration 5' in _log_files(work)


def test_skip_nonfinite_skips_and_counts_the_steps(call, tiny, probe_path):
    work = str(tiny.root / 'nan_skip')
    code, out, err = call('train', tiny.probe, '--work-dir', work,
                          '--no-validate', '--skip-nonfinite', '--cfg-options',
                          'custom_hooks.0.nan_at=[2,5]')
    assert code == 0, err[-3000:]
    log = out + err
    assert 'non-finite loss at iteration 2 (epoch 1, batch 2/4): loss=nan: ' \
        'the step was skipped (1 so far).' in log
    assert 'non-finite loss at iteration 5 (epoch 2, batch 1/4): loss=nan: ' \
        'the step was skipped (2 so far).' in log
    assert 'epoch 2: 1 step(s) with a non-finite loss skipped (2 in all).' \
        in log
    ckpt = _load(osp.join(work, 'epoch_2.pth'))
    # AdamW stepped 6 times in 8 iterations: the 2 NaN steps changed nothing
    steps = {float(s['step']) for s in ckpt['optimizer']['state'].values()}
    assert steps == {6.0}
    assert all(
        bool(torch.isfinite(v).all()) for v in ckpt['state_dict'].values()
        if v.is_floating_point())


# -------------------------------------------------------- unreadable images


def test_unreadable_training_image_is_one_line(call, tiny):
    """Read by a loader worker: the message survives the way back."""
    work = tiny.root / 'img'
    code, _, err = call(
        'train', tiny.config, '--work-dir', str(work), '--no-validate',
        '--cfg-options', 'train_dataloader.num_workers=2',
        f'train_dataloader.dataset.data_root='
        f'{tiny.root / "data_bad"}')
    assert code == 2
    assert _one_line(err) == (
        f'cannot read image {tiny.bad_image} (train_dataloader.dataset index '
        f'{tiny.bad_index}): it cannot be decoded (truncated, empty, or not '
        'an image under an image name). Replace or remove the file '
        '(tools/analysis_tools/check_dataset.py CONFIG lists every '
        'unreadable one), or skip unreadable training images with '
        'tools/train.py --skip-unreadable.')


def test_skip_unreadable_warns_and_counts(call, tiny):
    """Counted across 2 loader worker processes."""
    work = tiny.root / 'img_skip'
    code, out, err = call(
        'train', tiny.config, '--work-dir', str(work), '--no-validate',
        '--skip-unreadable', '--cfg-options', 'train_cfg.max_epochs=1',
        'train_dataloader.num_workers=2',
        f'train_dataloader.dataset.data_root='
        f'{tiny.root / "data_bad"}')
    assert code == 0, err[-3000:]
    # the worker's warning went to the run's log file (its console output is
    # the forked process's, not this test's capture)
    log = _log_files(work)
    assert (f'skipped unreadable image {tiny.bad_image} (train_dataloader.'
            f'dataset index {tiny.bad_index}): it cannot be decoded') in log
    assert 'epoch 1: 1 unreadable training image(s) skipped' in out + err
    assert osp.isfile(work / 'epoch_1.pth')


def _log_files(work):
    return ''.join(
        open(osp.join(folder, name)).read()
        for folder, _, names in os.walk(work) for name in names
        if name.endswith('.log'))


def test_check_data_before_training_and_the_check_tool(call, tiny):
    work = tiny.root / 'img_check'
    data = f'train_dataloader.dataset.data_root={tiny.root / "data_bad"}'
    code, _, err = call('train', tiny.config, '--work-dir', str(work),
                        '--check-data', '--cfg-options', data)
    assert code == 2
    assert _one_line(err) == (
        f'--check-data: 1 of 56 images cannot be read: {tiny.bad_image} '
        f'(train_dataloader.dataset index {tiny.bad_index}): it cannot be '
        'decoded (truncated, empty, or not an image under an image name). '
        'Replace or remove them (tools/analysis_tools/check_dataset.py '
        'CONFIG lists all), or skip unreadable training images with '
        '--skip-unreadable.')
    assert not work.exists()  # stopped before anything was written
    code, out, _ = call('analysis_tools/check_dataset', tiny.config,
                        '--cfg-options', data)
    assert code == 1
    assert out.splitlines() == [
        f'unreadable: {tiny.bad_image} (train_dataloader.dataset index '
        f'{tiny.bad_index}): it cannot be decoded (truncated, empty, or not '
        'an image under an image name)', '1 of 56 images cannot be read.'
    ]
    code, out, _ = call('analysis_tools/check_dataset', tiny.config)
    assert (code, out) == (0, '0 of 56 images cannot be read: all can.\n')


def test_test_tool_names_an_unreadable_image(call, tiny, straight):
    code, _, err = call(
        'test', tiny.config, osp.join(straight, 'epoch_2.pth'), '--work-dir',
        str(tiny.root / 'img_test'), '--cfg-options',
        f'test_dataloader.dataset.data_root={tiny.root / "data_badval"}')
    assert code == 2
    assert _one_line(err).startswith(
        f'cannot read image {tiny.bad_val} (dataset index 0): it cannot be '
        'decoded')


# -------------------------------------------------------------- failed save


def test_failed_save_keeps_the_previous_checkpoint_and_resume_is_exact(
        call, tiny, straight, probe_path):
    """The write of epoch_2.pth fails midway (EFBIG: a file-size limit) with
    max_keep_ckpts=1, where mmengine removes epoch_1.pth first."""
    work = tiny.root / 'save'
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        code, _, err = call('train', tiny.probe, '--work-dir', str(work),
                            '--no-validate', '--cfg-options',
                            'custom_hooks.0.fsize_at_epoch=2',
                            'default_hooks.checkpoint.max_keep_ckpts=1')
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    assert code == 74
    msg = _one_line(err)
    assert re.fullmatch(
        rf'cannot save checkpoint {work / "epoch_2.pth"} \(end of epoch 2, '
        r'iteration 8\): the file is larger \(\d+\.\d MB\) than this process '
        r'may write \(a file-size limit: ulimit -f\)\. Raise the limit\. The '
        rf'previous checkpoint {work / "epoch_1.pth"} and '
        rf'{work / "last_checkpoint"} are intact; after fixing this, '
        r'continue with --resume\.', msg), msg
    assert sorted(f for f in os.listdir(work) if not f[0].isdigit()) == [
        'epoch_1.pth', 'last_checkpoint', 'probe_config.py'
    ]  # no partial file, no temporary file
    assert _pointer(work) == str(work / 'epoch_1.pth')
    _same_training_state(
        osp.join(straight, 'epoch_1.pth'), str(work / 'epoch_1.pth'))

    code, _, err = call('train', tiny.probe, '--work-dir', str(work),
                        '--no-validate', '--resume')
    assert code == 0, err[-3000:]
    _same_training_state(
        osp.join(straight, 'epoch_2.pth'), str(work / 'epoch_2.pth'))


def test_disk_full_says_how_much_was_needed(call, tiny, monkeypatch):
    """ENOSPC after 1 MB of epoch_2.pth (os.write fails as on a full disk)."""
    real_write = os.write
    written = {}

    def full_disk(fd, data):
        # as write(2) on a disk that fills up: a short write, then ENOSPC
        name = os.readlink(f'/proc/self/fd/{fd}')
        if osp.basename(name).startswith('.epoch_2.pth.'):
            room = 2**20 - written.get(name, 0)
            if room == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = real_write(fd, data[:room])
            written[name] = written.get(name, 0) + n
            return n
        return real_write(fd, data)

    if not osp.isdir('/proc/self/fd'):
        pytest.skip('needs /proc to name the written file')
    work = tiny.root / 'full'
    monkeypatch.setattr(os, 'write', full_disk)
    code, _, err = call('train', tiny.config, '--work-dir', str(work),
                        '--no-validate')
    monkeypatch.undo()
    assert code == 74
    size = os.path.getsize(work / 'epoch_1.pth') / 2**20
    msg = _one_line(err)
    assert re.fullmatch(
        rf'cannot save checkpoint {work / "epoch_2.pth"} \(end of epoch 2, '
        r'iteration 8\): no space left on the device: the checkpoint needs '
        rf'{size:.1f} MB; \d+\.\d MB free there now\. Free that much space '
        r'\(or point work_dir / default_hooks\.checkpoint\.out_dir at another'
        rf' disk\)\. The previous checkpoint {work / "epoch_1.pth"} and '
        rf'{work / "last_checkpoint"} are intact; after fixing this, '
        r'continue with --resume\.', msg), msg
    assert list(written.values()) == [2**20]  # it failed midway
    assert not [f for f in os.listdir(work) if f.endswith('.tmp')]


# -------------------------------------------------------------- distributed


def _dist_train(tiny, work, *args, config=None):
    return _run([
        'env', f'PORT={_free_port()}', 'bash',
        osp.join(ROOT, 'tools', 'dist_train.sh'), config or tiny.probe, '2',
        '--work-dir', work, '--no-validate'
    ] + list(args), tiny.root)


def _messages(err):
    """The lines the tools print for a fault (not mmengine's log)."""
    return [
        ln for ln in err.splitlines() if ln.startswith(('error:', 'stopped:'))
    ]


def test_dist_sigterm_on_one_rank_stops_both_and_resume_is_exact(
        tiny, probe_path):
    straight = str(tiny.root / 'dist_straight')
    rc, log, _ = _dist_train(tiny, straight, config=tiny.config)
    assert rc == 0, log[-3000:]
    work = str(tiny.root / 'dist_preempt')
    rc, log, err = _dist_train(tiny, work, '--cfg-options',
                               'custom_hooks.0.signal_at=3',
                               'custom_hooks.0.rank=0')
    saved = osp.join(work, 'preempt_iter_3.pth')
    assert rc == 75, log[-3000:]
    assert _messages(err) == [
        'stopped: SIGTERM received: training stopped after iteration 3 '
        f'(epoch 2, batch 1/2) and saved {saved}. Continue with: '
        'tools/train.py CONFIG --resume (same work_dir); exit status 75.'
    ]
    assert len(_load(saved)['random_states']) == 2  # one per rank
    rc, log, _ = _dist_train(tiny, work, '--resume')
    assert rc == 0, log[-3000:]
    assert 'Epoch(train) [2][2/2]' in log
    _same_training_state(
        osp.join(straight, 'epoch_2.pth'), osp.join(work, 'epoch_2.pth'))


def test_dist_faults_on_one_rank_stop_both_with_one_message(tiny, probe_path):
    # a NaN loss on rank 1 only
    rc, log, err = _dist_train(tiny, str(tiny.root / 'dist_nan'),
                               '--cfg-options', 'custom_hooks.0.nan_at=[2]',
                               'custom_hooks.0.rank=1')
    assert rc == 3, log[-3000:]
    assert len(_messages(err)) == 1, err[-3000:]
    assert _messages(err)[0].startswith(
        'error: non-finite loss at iteration 2 (epoch 1, batch 2/2): '
        'loss=nan on rank 1 (not finite: loss).')
    # an unreadable image, read by one of the ranks
    rc, log, err = _dist_train(
        tiny, str(tiny.root / 'dist_img'), '--cfg-options',
        f'train_dataloader.dataset.data_root={tiny.root / "data_bad"}')
    assert rc == 2, log[-3000:]
    assert _messages(err) == [
        f'error: cannot read image {tiny.bad_image} (train_dataloader.dataset'
        f' index {tiny.bad_index}): it cannot be decoded (truncated, empty, '
        'or not an image under an image name). Replace or remove the file '
        '(tools/analysis_tools/check_dataset.py CONFIG lists every '
        'unreadable one), or skip unreadable training images with '
        'tools/train.py --skip-unreadable.'
    ]
    # the save of epoch 2 fails on rank 0, the only one that writes
    work = str(tiny.root / 'dist_save')
    rc, log, err = _dist_train(tiny, work, '--cfg-options',
                               'custom_hooks.0.fsize_at_epoch=2')
    assert rc == 74, log[-3000:]
    assert len(_messages(err)) == 1, err[-3000:]
    assert _messages(err)[0].startswith(
        f'error: cannot save checkpoint {osp.join(work, "epoch_2.pth")} (end '
        'of epoch 2, iteration 4): the file is larger')
    assert _pointer(work) == osp.join(work, 'epoch_1.pth')
    assert not osp.exists(osp.join(work, 'epoch_2.pth'))
