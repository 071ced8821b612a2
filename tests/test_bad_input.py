"""Bad input and user mistakes (issue 14): one clear line, exit status 2,
nothing written; plus three forward checks a mutation run showed missing.

The tools run in this process (their ``main()``); only the shell launchers run
as subprocesses (they stop before Python starts).
"""
import importlib.util
import os
import os.path as osp
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from davit_ext.models.davit import DaViT

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
BASE_CONFIG = osp.join(ROOT, 'configs', 'digits',
                       'davit-mini_1xb64_digits32.py')

CONFIG = """
_base_ = [{base!r}]
model = dict(
    backbone=dict(arch=dict(embed_dims=16, num_heads=[1, 1, 2, 2])),
    head=dict(num_classes=2, in_channels=128))
data_preprocessor = dict(num_classes=2)
train_dataloader = dict(batch_size=2, dataset=dict(data_root={data!r}))
val_dataloader = dict(batch_size=2, dataset=dict(data_root={data!r}))
test_dataloader = val_dataloader
param_scheduler = [dict(type='CosineAnnealingLR', by_epoch=True, begin=0,
                        end=2)]
train_cfg = dict(max_epochs=2, val_interval=1)
"""


@pytest.fixture(scope='module')
def tiny(tmp_path_factory, two_class_images):
    """A 2-class CustomDataset of 2 images per split and class, its config and
    a checkpoint of its model that has done 2 epochs (8 iterations)."""
    from mmengine.config import Config

    root = tmp_path_factory.mktemp('bad_input')
    config = root / 'tiny.py'
    config.write_text(CONFIG.format(base=BASE_CONFIG, data=two_class_images))
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('davit_ext')
    cfg = Config.fromfile(str(config))
    model = MODELS.build(
        dict(cfg.model, data_preprocessor=cfg.data_preprocessor))
    ckpt = str(root / 'epoch_2.pth')
    torch.save(
        {
            'state_dict': model.state_dict(),
            'meta': {
                'epoch': 2,
                'iter': 8
            },
            'message_hub': {}
        }, ckpt)
    return root, str(config), ckpt


def _one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith('error: '), err
    return lines[0][len('error: '):]


def _previous_run(work):
    """A work_dir holding an earlier run: its config copy and log folder."""
    work.mkdir()
    (work / 'tiny.py').write_text('# the previous run\n')
    (work / '20000101_000000').mkdir()
    (work / '20000101_000000' / 'log.txt').write_text('old log')
    return sorted(os.listdir(work))


def _unchanged(work, before):
    assert sorted(os.listdir(work)) == before
    assert (work / 'tiny.py').read_text() == '# the previous run\n'
    assert (work / '20000101_000000' / 'log.txt').read_text() == 'old log'


# --------------------------------------------------------------------------
# tools/train.py and tools/test.py
# --------------------------------------------------------------------------


def test_resume_with_nothing_left_to_train(call, tiny):
    root, config, ckpt = tiny
    work = root / 'R'
    code, _, err = call('train', config, '--work-dir', str(work), '--resume',
                        ckpt)
    assert code == 2
    assert _one_line(err) == (
        f'nothing to resume: checkpoint {ckpt} has already done 2 epochs '
        'and train_cfg.max_epochs is 2. To train longer, raise it, e.g. '
        '--cfg-options train_cfg.max_epochs=3; with --resume-finished-ok '
        'this exits with status 0 instead.')
    assert not work.exists()
    # below the checkpoint's epochs, too; and by iterations
    code, _, err = call('train', config, '--work-dir', str(work), '--resume',
                        ckpt, '--cfg-options', 'train_cfg.max_epochs=1')
    assert code == 2 and 'max_epochs is 1.' in _one_line(err)
    by_iter = root / 'tiny_by_iter.py'
    by_iter.write_text("_base_ = ['./tiny.py']\n"
                       'train_cfg = dict(_delete_=True, by_epoch=False, '
                       'max_iters=8, val_interval=4)\n')
    code, _, err = call('train', str(by_iter), '--work-dir', str(work),
                        '--resume', ckpt)
    assert code == 2
    assert _one_line(err).startswith(
        f'nothing to resume: checkpoint {ckpt} has already done 8 iters and '
        'train_cfg.max_iters is 8. To train longer, raise it, e.g. '
        '--cfg-options train_cfg.max_iters=1008;')
    assert not work.exists()


def test_resume_finished_ok_exits_0_and_says_so(call, tiny):
    root, config, ckpt = tiny
    work = root / 'R2'
    code, out, err = call('train', config, '--work-dir', str(work), '--resume',
                          ckpt, '--resume-finished-ok')
    assert code == 0
    assert err.strip() == (
        f'nothing to resume: checkpoint {ckpt} has already done 2 epochs '
        'and train_cfg.max_epochs is 2. To train longer, raise it, e.g. '
        '--cfg-options train_cfg.max_epochs=3. Nothing was done.')
    assert not work.exists()


@pytest.mark.parametrize('out, item, message', [
    ('m.txt', 'metrics', '--out {out}: cannot write the metrics as .txt; '
     'give a file ending in .json, .yaml, .yml, .pickle, .pkl.'),
    ('res.txt', None, '--out {out}: the predictions are written as a '
     'pickle, so the file name must end in .pkl or .pickle (for the metrics '
     'as .json or .yaml, add --out-item metrics).'),
    ('res.json', 'pred', '--out {out}: the predictions are written as a '
     'pickle, so the file name must end in .pkl or .pickle (for the metrics '
     'as .json or .yaml, add --out-item metrics).'),
    ('a_file/res.pkl', None, '--out {out}: {folder} is a file, not a '
     'folder; choose another path.'),
])
def test_test_tool_checks_out_before_it_starts(call, tiny, out, item, message):
    root, config, _ = tiny
    work = root / 'T'
    out = str(root / out)
    # the checkpoint need not exist: --out is checked first
    argv = [config, str(root / 'absent.pth'), '--work-dir', str(work)]
    argv += ['--out', out] + (['--out-item', item] if item else [])
    (root / 'a_file').write_text('in the way')
    code, _, err = call('test', *argv)
    assert code == 2
    assert _one_line(err) == message.format(out=out, folder=osp.dirname(out))
    assert not work.exists()


def test_out_in_a_folder_still_to_make_is_fine(tmp_path):
    from davit_ext.cli.checks import check_output_file
    check_output_file(str(tmp_path / 'new' / 'deeper' / 'res.pkl'), None)
    check_output_file(str(tmp_path / 'new' / 'm.json'), 'metrics')
    assert os.listdir(tmp_path) == []  # and nothing made by the check


class _FrozenClock:
    """The ``time`` module, except that the runner's timestamp never moves."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def strftime(fmt, *args):
        return '20261125_150446' if fmt == '%Y%m%d_%H%M%S' else \
            time.strftime(fmt, *args)


def test_failed_start_leaves_the_work_dir_as_it_was(call, tiny, monkeypatch):
    """An error only the runner meets (torch refuses lr=-1 when the runner
    builds the optimizer, after it made its log folder and copied the
    config): one line, no new timestamp folder, the old config copy kept."""
    root, config, _ = tiny
    kept = _previous_run(root / 'F')
    # Every start in the same second, as happens in CI: the runner names its
    # logger and visualizer after the config and that second, and must not
    # be handed the instances (and folders) of a start that failed.
    monkeypatch.setattr('mmengine.runner.runner.time', _FrozenClock())
    for work, before in ((root / 'F', kept), (root / 'F2', None)):
        code, _, err = call('train', config, '--work-dir', str(work),
                            '--cfg-options', 'optim_wrapper.optimizer.lr=-1')
        assert code == 2
        assert _one_line(err) == (
            'the run of tiny.py failed while mmengine set it up, before its '
            'first step: ValueError: Invalid learning rate: -1. Fix the '
            f'config or --cfg-options; {work} was left as it was '
            '(DAVIT_EXT_TRACEBACK=1 shows where it failed).')
        if before:
            _unchanged(work, before)
        else:
            assert not work.exists()
    monkeypatch.setenv('DAVIT_EXT_TRACEBACK', '1')
    with pytest.raises(ValueError, match='Invalid learning rate: -1'):
        call('train', config, '--work-dir', str(root / 'F'), '--cfg-options',
             'optim_wrapper.optimizer.lr=-1')
    _unchanged(root / 'F', kept)


def test_failed_start_of_a_test_leaves_the_work_dir_as_it_was(call, tiny):
    root, config, ckpt = tiny
    work = root / 'FT'
    before = _previous_run(work)
    code, _, err = call('test', config, ckpt, '--work-dir', str(work),
                        '--cfg-options', 'test_evaluator.type=NoSuchMetric')
    assert code == 2
    msg = _one_line(err)
    assert msg.startswith(
        'the run of tiny.py failed while mmengine set it up, before its '
        'first step: KeyError: NoSuchMetric is not in the ')
    assert msg.endswith(f'{work} was left as it was (DAVIT_EXT_TRACEBACK=1 '
                        'shows where it failed).')
    _unchanged(work, before)


def test_work_dir_guard(tmp_path):
    from types import SimpleNamespace

    from davit_ext.cli.workdir import WorkDirGuard
    work = tmp_path / 'w'
    before = _previous_run(work)
    cfg = SimpleNamespace(
        work_dir=str(work), filename=str(tmp_path / 'tiny.py'))

    def runner_start():
        (work / '20991231_235959' / 'vis_data').mkdir(
            parents=True, exist_ok=True)
        (work / 'tiny.py').write_text('# this run\n')

    with pytest.raises(RuntimeError):
        with WorkDirGuard(cfg):
            runner_start()
            raise RuntimeError('failed while building the dataloader')
    _unchanged(work, before)
    # once the run has started, what it wrote stays
    with pytest.raises(RuntimeError):
        with WorkDirGuard(cfg) as guard:
            runner_start()
            guard.started()
            raise RuntimeError('failed in epoch 3')
    assert sorted(os.listdir(work)) == sorted(before + ['20991231_235959'])
    assert (work / 'tiny.py').read_text() == '# this run\n'
    # a copy that did not exist before is removed; other new files stay
    (work / 'tiny.py').unlink()
    with pytest.raises(RuntimeError):
        with WorkDirGuard(cfg):
            runner_start()
            (work / 'user_notes.txt').write_text('mine')
            raise RuntimeError('failed')
    assert sorted(os.listdir(work)) == sorted(
        ['20000101_000000', '20991231_235959', 'user_notes.txt'])


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_batch_size_0(call, tiny, tool):
    root, config, ckpt = tiny
    work = root / f'B_{tool}'
    before = _previous_run(work)
    loader = f'{tool}_dataloader'
    argv = [config] + ([ckpt] if tool == 'test' else [])
    code, _, err = call(tool, *argv, '--work-dir', str(work), '--cfg-options',
                        f'{loader}.batch_size=0')
    assert code == 2
    assert _one_line(err) == (
        f'{loader}.batch_size is 0: it must be a whole number >= 1 (images '
        f'per process and step), e.g. --cfg-options {loader}.batch_size=32.')
    _unchanged(work, before)


def test_cfg_options_without_equals(call, tiny):
    root, config, _ = tiny
    code, _, err = call('train', config, '--work-dir', str(root / 'E'),
                        '--cfg-options', 'model.backbone.arch')
    assert code == 2
    assert _one_line(err) == (
        "argument --cfg-options: 'model.backbone.arch' has no value: write "
        'KEY=VALUE, e.g. model.backbone.arch=... (lists as KEY="[a,b]") '
        '(see train.py --help)')


def test_cfg_options_that_do_not_fit_the_config(call, tiny):
    root, config, _ = tiny
    # the backbone's type is a string: it cannot take a key
    code, _, err = call('train', config, '--work-dir', str(root / 'E'),
                        '--cfg-options', 'model.backbone.type.x=1')
    assert code == 2
    msg = _one_line(err)
    assert msg.startswith(f'--cfg-options cannot be applied to {config}: '
                          "type={'x': 1} in child config cannot inherit")
    assert msg.endswith('Check the KEY paths against the config.')
    code, _, err = call('train', config, '--no-such-flag')
    assert code == 2
    assert _one_line(err) == ('unrecognized arguments: --no-such-flag (see '
                              'train.py --help)')
    assert not (root / 'E').exists()


@pytest.mark.parametrize('option, message', [
    ('model.backbone.frozen_stages=7', 'model.backbone (DaViT): '
     'frozen_stages must be in [-1, 3] (-1 freezes nothing); got 7.'),
    ('model.backbone.drop_path_rate=1.5', 'model.backbone (DaViT): '
     'drop_path_rate must be in [0, 1); got 1.5.'),
    ('model.backbone.window_size=0', 'model.backbone (DaViT): window_size '
     'must be an integer >= 1 (stage 0); got 0.'),
])
def test_out_of_range_backbone_arguments(call, tiny, option, message):
    root, config, _ = tiny
    work = root / 'M'
    before = _previous_run(work) if not work.exists() else sorted(
        os.listdir(work))
    code, _, err = call('train', config, '--work-dir', str(work),
                        '--cfg-options', option)
    assert code == 2
    assert _one_line(err) == (
        f'cannot build the model of tiny.py: {message} Fix the value in the '
        'config or in --cfg-options.')
    _unchanged(work, before)


def test_misspelt_backbone_key(call, tiny):
    root, config, ckpt = tiny
    for tool, argv in (('train', [config]), ('test', [config, ckpt])):
        code, _, err = call(tool, *argv, '--work-dir', str(root / 'K'),
                            '--cfg-options', 'model.backbone.archh=s')
        assert code == 2
        msg = _one_line(err)
        # (the list goes on with every argument of DaViT.__init__)
        assert msg.startswith(
            'cannot build the model of tiny.py: model.backbone.archh: DaViT '
            "has no argument 'archh' (did you mean 'arch'?); it takes arch, "
            'patch_size, in_channels, window_size, '), msg
        assert msg.endswith(
            'Fix the key in the config or in --cfg-options.'), msg
        assert not (root / 'K').exists()


def test_backbone_refuses_out_of_range_arguments():
    for kwargs, message in (
        (dict(drop_path_rate=1.5),
         'DaViT: drop_path_rate must be in [0, 1); got 1.5.'),
        (dict(drop_path_rate=-0.1),
         'DaViT: drop_path_rate must be in [0, 1); got -0.1.'),
        (dict(window_size=0),
         'DaViT: window_size must be an integer >= 1 (stage 0); got 0.'),
        (dict(stage_cfgs=[{}, {}, dict(window_size=2.5), {}]),
         'DaViT: window_size must be an integer >= 1 (stage 2); got 2.5.'),
    ):
        with pytest.raises(ValueError) as err:
            DaViT(
                arch=dict(embed_dims=8, depths=[1] * 4, num_heads=[1] * 4),
                **kwargs)
        assert str(err.value) == message


SYNTAX_ERROR = "model = dict(backbone=dict(arch='t')\ntrain_cfg = dict()\n"


def test_config_with_a_syntax_error(call, tiny, tmp_path, capsys):
    _, config, ckpt = tiny
    bad = tmp_path / 'bad.py'
    bad.write_text(f'_base_ = [{config!r}]\n' + SYNTAX_ERROR)
    expected = (f'config {bad}, line 2: invalid Python syntax (\'(\' was '
                "never closed): model = dict(backbone=dict(arch='t'). Fix "
                'that line (or the one above it).')
    code, _, err = call('train', str(bad), '--work-dir', str(tmp_path / 'w'))
    assert code == 2 and _one_line(err) == expected
    code, _, err = call('test', str(bad), ckpt)
    assert code == 2 and _one_line(err) == expected
    # in a _base_ file: that file is named
    child = tmp_path / 'child.py'
    child.write_text("_base_ = ['bad.py']\n")
    code, _, err = call('train', str(child))
    assert code == 2 and _one_line(err) == expected
    # the demo
    spec = importlib.util.spec_from_file_location(
        '_bad_input_demo', osp.join(ROOT, 'demo', 'image_demo.py'))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    img = tmp_path / 'img.png'
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    capsys.readouterr()
    assert demo.main([str(img), str(bad), '--device', 'cpu']) == 1
    assert _one_line(capsys.readouterr().err) == expected


def test_config_that_fails_when_run(call, tmp_path):
    bad = tmp_path / 'name.py'
    bad.write_text('model = dict(type="ImageClassifier")\nx = undefined + 1\n')
    code, _, err = call('train', str(bad))
    assert code == 2
    assert _one_line(err) == (
        f"config {bad}, line 2 cannot be read: NameError: name 'undefined' "
        'is not defined. Fix the config (its _base_ files included).')


# --------------------------------------------------------------------------
# The launchers
# --------------------------------------------------------------------------


def _launch(env, script, *args):
    proc = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', script), *args],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize('gpus', ['two', '0', '-1', '1.5'])
def test_launchers_refuse_a_bad_process_count(gpus):
    hint = ' (processes on this node, e.g. bash tools/{} 2)'
    for script, args, env, example in (
        ('dist_train.sh', ['c.py', gpus], {}, 'dist_train.sh CONFIG'),
        ('dist_test.sh', ['c.py', 'c.pth',
                          gpus], {}, 'dist_test.sh CONFIG CHECKPOINT'),
    ):
        code, out, err = _launch(env, script, *args)
        assert (code, out) == (2, '')
        assert err == (f'error: GPUS must be a whole number >= 1'
                       f"{hint.format(example)}; got '{gpus}'.\n")
    for script, args, usage in (
        ('slurm_train.sh', ['p', 'j', 'c.py'], 'CONFIG'),
        ('slurm_test.sh', ['p', 'j', 'c.py', 'c.pth'], 'CONFIG CHECKPOINT'),
    ):
        code, out, err = _launch({'GPUS': gpus}, script, *args)
        assert (code, out) == (2, '')
        assert err == (
            'error: GPUS must be a whole number >= 1 (all processes, one per '
            f'GPU, e.g. GPUS=16 bash tools/{script} PARTITION JOB_NAME '
            f"{usage}); got '{gpus}'.\n")


def test_launchers_refuse_other_bad_numbers():
    code, _, err = _launch({'NODE_RANK': 'x'}, 'dist_train.sh', 'c.py', '2')
    assert code == 2
    assert err == ('error: NODE_RANK must be a whole number >= 0 (this '
                   "node's index, 0..NNODES-1); got 'x'.\n")
    code, _, err = _launch({'GPUS_PER_NODE': '0'}, 'slurm_train.sh', 'p', 'j',
                           'c.py')
    assert code == 2
    assert err == ('error: GPUS_PER_NODE must be a whole number >= 1; '
                   "got '0'.\n")


# --------------------------------------------------------------------------
# Three forward checks (survivors of a mutation run)
# --------------------------------------------------------------------------


def test_official_mode_at_a_size_not_a_multiple_of_4_matches_timm():
    """The stem pads right/bottom up to a multiple of 4 (then 3 all round):

    226x225 tells the sides apart; timm's port is the oracle.
    """
    timm = pytest.importorskip('timm')
    from davit_ext.registry import MODELS
    from davit_ext.weights import layouts as converters
    torch.manual_seed(0)
    ref = timm.models.davit.DaVit(
        depths=(1, 1, 1, 1),
        embed_dims=(16, 32, 64, 128),
        num_heads=(1, 1, 2, 2),
        num_classes=10).eval()
    ours = MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='davit_ext.DaViT',
                arch=dict(
                    embed_dims=16, depths=[1] * 4, num_heads=[1, 1, 2, 2]),
                official=True),
            head=dict(type='LinearClsHead', num_classes=10,
                      in_channels=128))).eval()
    ours.load_state_dict(
        converters.timm_to_mmpretrain(ref.state_dict()), strict=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for h, w in ((226, 225), (225, 227)):
            x = torch.randn(2, 3, h, w)
            expected = ref(x)
            diff = (ours(x, mode='tensor') - expected).abs().max().item()
            assert diff < 1e-4, (h, w, diff, expected.abs().max().item())


def test_non_strict_check_refuses_a_backbone_tensor_of_the_wrong_shape():
    from davit_ext.errors import CheckpointError
    from davit_ext.weights import fit_pretrained
    model = DaViT(arch=dict(embed_dims=8, depths=[1] * 4, num_heads=[1] * 4))
    state = model.state_dict()
    key = 'patch_embed.projection.weight'
    state[key] = torch.zeros(8, 3, 5, 5)
    del state['norm3.weight']  # missing keys are fine when not strict
    with pytest.raises(CheckpointError) as err:
        fit_pretrained(model, {'state_dict': state}, 'ck.pth')
    assert key in str(err.value)
    assert '(8, 3, 5, 5)' in str(err.value)
    assert '(8, 3, 7, 7)' in str(err.value)


def _window_attention_reference(attn, x, wh, ww):
    """Windows of wh x ww (zero padded right/bottom), softmax attention per
    head with the module's qkv/proj weights, merged and cropped."""
    B, H, W, C = x.shape
    heads = attn.w_msa.num_heads
    pb, pr = -H % wh, -W % ww
    x = F.pad(x, (0, 0, 0, pr, 0, pb))
    out = torch.zeros_like(x)
    for i in range(0, H + pb, wh):
        for j in range(0, W + pr, ww):
            t = x[:, i:i + wh, j:j + ww].reshape(B, wh * ww, C)
            q, k, v = attn.w_msa.qkv(t).reshape(B, wh * ww, 3, heads,
                                                C // heads).permute(
                                                    2, 0, 3, 1, 4)
            a = (q @ k.transpose(-2, -1) * (C // heads)**-0.5).softmax(-1)
            y = (a @ v).transpose(1, 2).reshape(B, wh * ww, C)
            out[:, i:i + wh,
                j:j + ww] = attn.w_msa.proj(y).reshape(B, wh, ww, C)
    return out[:, :H, :W]


@pytest.mark.parametrize('h, w', [(4, 10), (10, 4), (5, 9)])
def test_pad_small_map_false_on_a_non_square_map(h, w):
    """pad_small_map=False shrinks the window to the map, per side: a 4x10 map
    with window 7 attends in 4x7 windows (the 10 columns padded to 14), not in
    4x4 ones."""
    torch.manual_seed(0)
    model = DaViT(
        arch=dict(embed_dims=8, depths=[1] * 4, num_heads=[2] * 4),
        window_size=7,
        pad_small_map=False).eval()
    attn = model.stages[0].blocks[0].spatial_block.attn
    x = torch.randn(2, h, w, 8)
    with torch.no_grad():
        got = attn(x).reshape(2, h, w, 8)
        expected = _window_attention_reference(attn, x, min(7, h), min(7, w))
        wrong = _window_attention_reference(attn, x, min(7, h), min(7, h))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (wrong - expected).abs().max() > 1e-3  # the test can fail
