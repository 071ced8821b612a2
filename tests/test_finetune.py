"""Fine-tuning: load_from with a new head, another arch refused (load_from,
get_model, inference_model, image_demo), layer-wise lr decay through
get_layer_depth, contiguous stage outputs, the custom fine-tune config."""
import functools
import importlib.util
import os.path as osp
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from PIL import Image

from davit_ext.errors import CheckpointMismatchError
from davit_ext.models.davit import DaViT
from davit_ext.registry import HOOKS, MODELS
from davit_ext.weights import fit_pretrained, fit_warning, load_checkpoint_file

# the strict policy (resume, test, export) of the one fit function
check_state_dict_fits = functools.partial(fit_pretrained, strict=True)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MINI = dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
TINY_CFG = """
_base_ = [{base!r}]
model = dict(
    backbone=dict(arch=dict(embed_dims=16, num_heads=[1, 1, 2, 2])),
    head=dict(num_classes=3, in_channels=128))
data_preprocessor = dict(num_classes=3)
train_dataloader = dict(batch_size=6, dataset=dict(data_root={data!r}))
val_dataloader = dict(batch_size=6, dataset=dict(data_root={data!r}))
test_dataloader = val_dataloader
param_scheduler = []
train_cfg = dict(max_epochs=1, val_interval=1)
default_hooks = dict(checkpoint=dict(interval=1), logger=dict(interval=1))
custom_hooks = [dict(type='SnapshotForTest')]
"""


def _tool(name):
    spec = importlib.util.spec_from_file_location(
        f'_finetune_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@HOOKS.register_module(name='SnapshotForTest', force=True)
class _Snapshot(Hook):
    """Keeps the weights training starts from and the loss of each step."""
    seen = {}

    def before_train(self, runner):
        self.seen['start'] = {
            k: v.clone()
            for k, v in runner.model.state_dict().items()
        }
        self.seen['losses'] = []
        self.seen['lr_scale'] = {
            g['param_name']: g['lr_scale']
            for g in runner.optim_wrapper.optimizer.param_groups
            if 'lr_scale' in g
        }

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        self.seen['losses'].append(float(outputs['loss']))


def _classifier(num_classes, arch=MINI):
    model = MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(type='davit_ext.DaViT', arch=arch, window_size=4),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=num_classes,
                in_channels=arch['embed_dims'] * 8)))
    model.init_weights()
    return model


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """3 classes of 32x32 noise (6 train, 3 val images) and checkpoints."""
    root = tmp_path_factory.mktemp('finetune')
    rng = np.random.default_rng(0)
    for split, n in (('train', 2), ('val', 1)):
        for label in range(3):
            folder = root / 'data' / split / str(label)
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(
                    80 * label, 80 * label + 90, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f'{i}.png')
    config = root / 'cfg.py'
    config.write_text(
        TINY_CFG.format(
            base=osp.join(ROOT, 'configs/digits/davit-mini_1xb64_digits32.py'),
            data=str(root / 'data')))
    torch.manual_seed(0)
    published = root / 'in1k.pth'  # published layout: 1000 classes
    state = _classifier(1000).state_dict()
    torch.save({'state_dict': state, 'meta': {}}, published)
    other = root / 'other_arch.pth'  # embed 24: another arch
    torch.save(
        {
            'state_dict': _classifier(1000, dict(MINI,
                                                 embed_dims=24)).state_dict()
        }, other)
    return SimpleNamespace(
        root=root,
        config=str(config),
        published=str(published),
        state=state,
        other=str(other))


def test_load_from_new_head_trains_from_the_checkpoint(data, davit_scope):
    work = data.root / 'work'
    _tool('train').main([
        data.config, '--work-dir',
        str(work), '--no-validate', '--cfg-options',
        f'load_from={data.published}'
    ])
    start = _Snapshot.seen['start']
    backbone = [k for k in data.state if k.startswith('backbone.')]
    assert len(backbone) == 146
    for key in backbone:
        assert torch.equal(start[key], data.state[key]), key
    # the new 3-class head starts from its own initialisation
    assert start['head.fc.weight'].shape == (3, 128)
    assert torch.equal(start['head.fc.bias'], torch.zeros(3))
    # one step was trained and changed the weights
    assert len(_Snapshot.seen['losses']) == 1
    assert np.isfinite(_Snapshot.seen['losses'][0])
    trained = load_checkpoint_file(str(work / 'epoch_1.pth'))['state_dict']
    assert not torch.equal(
        trained['backbone.patch_embed.projection.weight'],
        data.state['backbone.patch_embed.projection.weight'])
    # one warning naming the head keys, in the run's log; mmengine's own
    # mismatch warning is not printed on top of it
    log = open(next(work.glob('*/*.log'))).read()
    warning = (f'load_from {data.published}: loaded 146 tensor(s); 2 keep '
               'their initialisation (a new head is expected when '
               'fine-tuning): head.fc.weight (checkpoint (1000, 128), model '
               '(3, 128)), head.fc.bias (checkpoint (1000,), model (3,)).')
    assert log.count(warning) == 1, log
    assert 'do not match exactly' not in log


def test_load_from_another_arch_is_refused(data, capsys, davit_scope):
    work = data.root / 'refused'
    with pytest.raises(SystemExit) as exc:
        _tool('train').main([
            data.config, '--work-dir',
            str(work), '--cfg-options', f'load_from={data.other}'
        ])
    assert exc.value.code == 2
    msg = _one_line(capsys.readouterr().err)
    assert msg.startswith(
        f'error: checkpoint {data.other} does not fit the backbone of the '
        'model of cfg.py: it was trained with another arch (144 tensor(s) of '
        'another shape: backbone.patch_embed.projection.weight (checkpoint '
        '(24, 3, 7, 7), model (16, 3, 7, 7)), ')
    assert msg.endswith(
        'Fine-tuning may change the head (num_classes), not the backbone: '
        'use weights of the same arch (e.g. a davit-tiny checkpoint for '
        'arch="tiny"), or set model.backbone.arch to the checkpoint\'s arch.')
    assert not work.exists()


def test_init_cfg_of_another_arch_is_refused(data, capsys, davit_scope):
    work = data.root / 'refused_init'
    with pytest.raises(SystemExit) as exc:
        _tool('train').main([
            data.config, '--work-dir',
            str(work), '--cfg-options',
            'model.backbone.init_cfg.type=Pretrained',
            f'model.backbone.init_cfg.checkpoint={data.other}',
            'model.backbone.init_cfg.prefix=backbone'
        ])
    assert exc.value.code == 2
    msg = _one_line(capsys.readouterr().err)
    # refused by the backbone itself, as the runner's init_weights loads it
    assert msg.startswith(
        'error: the weights being loaded do not fit the backbone of this '
        'DaViT: it was trained with another arch (144 tensor(s) of another '
        'shape: patch_embed.projection.weight (checkpoint (24, 3, 7, 7), '
        'model (16, 3, 7, 7)), ')
    assert not work.exists()
    # the same arch passes; a prefix the checkpoint lacks is one line too
    for prefix, code in (('backbone', 0), ('model', 2)):
        try:
            _tool('train').main([
                data.config, '--work-dir',
                str(work), '--cfg-options', 'train_cfg.max_epochs=0',
                'model.backbone.init_cfg.type=Pretrained',
                f'model.backbone.init_cfg.checkpoint={data.published}',
                f'model.backbone.init_cfg.prefix={prefix}'
            ])
            status = 0
        except SystemExit as exc:
            status = exc.code
        assert status == code, prefix
    assert 'model. is not in the pretrained model' in _one_line(
        capsys.readouterr().err)
    # the runs' loggers write to this test's captured streams: not later
    from mmengine.logging import MMLogger
    MMLogger._instance_dict.clear()


def test_fit_policy(data):
    model = _classifier(3)
    # another depth: same shapes where keys are shared, one more block
    deeper = _classifier(3, dict(MINI, depths=[1, 1, 2, 1])).state_dict()
    with pytest.raises(CheckpointMismatchError) as exc:
        fit_pretrained(model, deeper, 'deep.pth', 'M')
    assert '32 backbone tensor(s) the model does not have: ' \
        'backbone.stages.2.blocks.1.spatial_block.cpe1.proj.weight' \
        in str(exc.value)
    # no shared key (e.g. the timm layout)
    with pytest.raises(CheckpointMismatchError) as exc:
        fit_pretrained(model, {'stem.conv.weight': torch.zeros(1)}, 'x.pth',
                       'M')
    assert str(exc.value).startswith(
        'checkpoint x.pth does not fit M: none of its 1 keys is a key of the '
        'model (checkpoint: stem.conv.weight; model: '
        'backbone.patch_embed.projection.weight, '
        'backbone.patch_embed.projection.bias, ... (')
    # a backbone-only checkpoint: the head stays, new output norms too
    four = MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='davit_ext.DaViT',
                arch=MINI,
                window_size=4,
                out_indices=(2, 3)),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=3, in_channels=128)))
    only = {k: v for k, v in data.state.items() if k.startswith('backbone.')}
    fit = fit_pretrained(four, {'module.' + k: v
                                for k, v in only.items()}, 'b.pth')
    assert fit.kept_keys == [
        'backbone.norm2.weight', 'backbone.norm2.bias', 'head.fc.weight',
        'head.fc.bias'
    ]
    assert fit.ignored == [] and len(fit.loaded) == 146
    assert fit_warning(fit, 'b.pth') == (
        'load_from b.pth: loaded 146 tensor(s); 4 keep their initialisation '
        '(a new head is expected when fine-tuning): backbone.norm2.weight '
        '(not in the checkpoint), backbone.norm2.bias (not in the '
        'checkpoint), head.fc.weight (not in the checkpoint), head.fc.bias '
        '(not in the checkpoint).')
    # the same weights fit exactly: nothing to say
    assert fit_warning(fit_pretrained(model, model.state_dict(), 'a'),
                       'a') is None


def _refusal(call, *args, **kwargs):
    """The message of the CheckpointMismatchError ``call`` raises."""
    with pytest.raises(CheckpointMismatchError) as exc:
        call(*args, **kwargs)
    return str(exc.value)


QKV = 'backbone.stages.1.blocks.0.channel_block.attn.qkv.weight'  # (96, 32)


def test_fit_refuses_one_backbone_tensor_of_another_shape():
    torch.manual_seed(0)
    model = _classifier(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = dict(model.state_dict())  # same keys, one tensor reshaped
    ckpt[QKV] = torch.zeros(96, 24)
    msg = _refusal(fit_pretrained, model, {'state_dict': ckpt}, 'bad.pth', 'M')
    assert msg.startswith(
        'checkpoint bad.pth does not fit the backbone of M: it was trained '
        'with another arch (1 tensor(s) of another shape: '
        f'{QKV} (checkpoint (96, 24), model (96, 32))). ')
    assert 'missing' not in msg and 'does not have' not in msg
    # the strict (resume/test) policy names it in its own words
    msg = _refusal(check_state_dict_fits, model, ckpt, 'bad.pth', 'M')
    assert msg.startswith(
        'checkpoint bad.pth does not fit M: 1 shape mismatch(es): '
        f'{QKV} (checkpoint (96, 24), model (96, 32)). '), msg
    # a whole backbone of another embed dim: the first tensor is named
    other = _classifier(3, dict(MINI, embed_dims=24)).state_dict()
    msg = _refusal(fit_pretrained, model, other, 'e24.pth', 'M')
    assert msg.startswith(
        'checkpoint e24.pth does not fit the backbone of M: it was trained '
        'with another arch (144 tensor(s) of another shape: '
        'backbone.patch_embed.projection.weight (checkpoint (24, 3, 7, 7), '
        'model (16, 3, 7, 7)), backbone.patch_embed.projection.bias '
        '(checkpoint (24,), model (16,)), ')
    # nothing was loaded by the checks
    assert all(
        torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # an output norm of another shape is "head": kept, not refused
    ckpt = dict(model.state_dict())
    ckpt['backbone.norm3.weight'] = torch.ones(64)
    fit = fit_pretrained(model, ckpt, 'n.pth')
    assert fit.kept == [
        'backbone.norm3.weight (checkpoint (64,), model '
        '(128,))'
    ]
    assert fit.kept_keys == ['backbone.norm3.weight']
    assert len(fit.loaded) == 147 and fit.ignored == []


def test_fit_keeps_a_head_of_another_num_classes():
    torch.manual_seed(0)
    model = _classifier(3)
    ckpt = _classifier(10).state_dict()
    fit = fit_pretrained(model, {'state_dict': ckpt, 'meta': {}}, 'p.pth')
    assert fit.kept == [
        'head.fc.weight (checkpoint (10, 128), model (3, 128))',
        'head.fc.bias (checkpoint (10,), model (3,))'
    ]
    assert fit.kept_keys == ['head.fc.weight', 'head.fc.bias']
    assert fit.loaded == [k for k in ckpt if not k.startswith('head.')]
    assert len(fit.loaded) == 146 and fit.ignored == []
    assert fit_warning(fit, 'p.pth') == (
        'load_from p.pth: loaded 146 tensor(s); 2 keep their initialisation '
        '(a new head is expected when fine-tuning): head.fc.weight '
        '(checkpoint (10, 128), model (3, 128)), head.fc.bias (checkpoint '
        '(10,), model (3,)).')
    # resuming/testing stays strict about the head
    msg = _refusal(check_state_dict_fits, model, ckpt, 'p.pth', 'M')
    assert msg.startswith(
        'checkpoint p.pth does not fit M: 2 shape mismatch(es): '
        'head.fc.weight (checkpoint (10, 128), model (3, 128)), '
        'head.fc.bias (checkpoint (10,), model (3,)). '), msg


def test_fit_refuses_a_checkpoint_without_a_shared_key():
    model = _classifier(3)
    renamed = {'model.' + k: v for k, v in model.state_dict().items()}
    msg = _refusal(fit_pretrained, model, renamed, 'r.pth', 'M')
    assert msg.startswith(
        'checkpoint r.pth does not fit M: none of its 148 keys is a key of '
        'the model (checkpoint: model.backbone.patch_embed.projection.weight,'
        ' model.backbone.patch_embed.projection.bias, ... (146 more); model: '
        'backbone.patch_embed.projection.weight, '
        'backbone.patch_embed.projection.bias, ... (146 more)). ')
    # strictly, every key is both missing and unexpected
    msg = _refusal(check_state_dict_fits, model, renamed, 'r.pth', 'M')
    assert msg.startswith('checkpoint r.pth does not fit M: 148 key(s) of M '
                          'are missing: backbone.patch_embed.projection.'
                          'weight, '), msg
    assert '; 148 key(s) are not in M: model.backbone.' in msg


def test_fit_refuses_a_backbone_missing_tensors():
    model = _classifier(3, dict(MINI, depths=[1, 1, 2, 1]))
    shallower = _classifier(3).state_dict()  # stage 2 has one block less
    msg = _refusal(fit_pretrained, model, shallower, 's.pth', 'M')
    assert msg.startswith(
        'checkpoint s.pth does not fit the backbone of M: it was trained '
        'with another arch (32 backbone tensor(s) missing from the '
        'checkpoint: backbone.stages.2.blocks.1.spatial_block.cpe1.proj.'
        'weight, backbone.stages.2.blocks.1.spatial_block.cpe1.proj.bias, '
        'backbone.stages.2.blocks.1.spatial_block.norm1.weight, ... (29 '
        'more)). ')
    # one tensor less is enough, and only the head left is refused too
    ckpt = dict(_classifier(3).state_dict())
    del ckpt[QKV]
    msg = _refusal(fit_pretrained, _classifier(3), ckpt, 'o.pth', 'M')
    assert f'(1 backbone tensor(s) missing from the checkpoint: {QKV}). ' \
        in msg
    head_only = {k: v for k, v in ckpt.items() if k.startswith('head.')}
    msg = _refusal(fit_pretrained, _classifier(3), head_only, 'h.pth', 'M')
    assert '(144 backbone tensor(s) missing from the checkpoint: ' in msg


def test_backbone_refuses_weights_of_another_arch_itself():
    """DaViT._load_from_state_dict: whatever loads the weights, non-strict
    included, another arch is refused before anything is copied."""
    torch.manual_seed(0)
    model = DaViT(arch=MINI, window_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = DaViT(arch=dict(MINI, embed_dims=24), window_size=4)
    msg = _refusal(model.load_state_dict, other.state_dict(), strict=False)
    assert msg.startswith(
        'the weights being loaded do not fit the backbone of this DaViT: it '
        'was trained with another arch (144 tensor(s) of another shape: '
        'patch_embed.projection.weight (checkpoint (24, 3, 7, 7), model '
        '(16, 3, 7, 7)), ')
    assert all(
        torch.equal(v, before[k]) for k, v in model.state_dict().items())
    deeper = DaViT(arch=dict(MINI, depths=[1, 1, 2, 1]), window_size=4)
    msg = _refusal(model.load_state_dict, deeper.state_dict(), strict=False)
    assert '(32 backbone tensor(s) the model does not have: ' \
        'stages.2.blocks.1.spatial_block.cpe1.proj.weight, ' in msg
    # inside a classifier: named by its prefix
    msg = _refusal(
        _classifier(3).load_state_dict,
        _classifier(3, dict(MINI, embed_dims=24)).state_dict(),
        strict=False)
    assert msg.startswith('the weights being loaded do not fit the backbone '
                          'of this DaViT (backbone): it was trained with '
                          'another arch (144 tensor(s) of another shape: '
                          'backbone.patch_embed.projection.weight ')
    # the same arch loads (the check does not refuse everything), and a
    # state dict of only the output norm is not checked
    same = DaViT(arch=MINI, window_size=4)
    model.load_state_dict(same.state_dict(), strict=True)
    assert all(
        torch.equal(v,
                    same.state_dict()[k])
        for k, v in model.state_dict().items())
    norm = {'norm3.weight': torch.full((128, ), 2.)}
    model.load_state_dict(norm, strict=False)
    assert torch.equal(model.norm3.weight, norm['norm3.weight'])


def test_resume_and_test_stay_strict(data, davit_scope):
    from davit_ext.registry import MODELS
    cfg = Config.fromfile(data.config)
    model = MODELS.build(cfg.model)
    ckpt = load_checkpoint_file(data.published)
    with pytest.raises(CheckpointMismatchError, match='2 shape mismatch'):
        fit_pretrained(model, ckpt, data.published, strict=True)
    fit_pretrained(model, ckpt, data.published)


def test_wrong_arch_refused_by_get_model_and_inference_model(
        data, capsys, tmp_path):
    from mmpretrain import get_model, inference_model

    import davit_ext  # noqa: F401
    expected = (
        'the weights being loaded do not fit the backbone of this DaViT '
        '(backbone): it was trained with another arch (')
    with pytest.raises(CheckpointMismatchError) as exc:
        get_model('davit-tiny_3rdparty_in1k', pretrained=data.published)
    assert str(exc.value).startswith(expected)
    # 144 of DaViT-T's tensors differ in shape, 64 are missing (stage 2)
    assert '(checkpoint (16, 3, 7, 7), model (96, 3, 7, 7))' in str(exc.value)
    assert '64 backbone tensor(s) missing from the checkpoint' \
        in str(exc.value)
    image = tmp_path / 'img.png'
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    with pytest.raises(CheckpointMismatchError, match=re.escape(expected)):
        inference_model(
            'davit-tiny_3rdparty_in1k', str(image), pretrained=data.published)
    # the demo: one line, status 1
    sys.path.insert(0, osp.join(ROOT, 'demo'))
    try:
        from image_demo import main
    finally:
        sys.path.pop(0)
    assert main([
        str(image), 'davit-tiny_3rdparty_in1k', '--pretrained', data.published,
        '--device', 'cpu'
    ]) == 1
    assert _one_line(capsys.readouterr().err).startswith('error: ' + expected)
    # the same arch loads (mmengine's non-strict loader, new head)
    model = get_model(
        'davit-tiny_3rdparty_in1k',
        pretrained=data.published,
        backbone=dict(arch=dict(MINI, _delete_=True), window_size=4),
        head=dict(in_channels=128))
    assert torch.equal(
        model.state_dict()['backbone.stages.1.blocks.0.channel_block.attn.'
                           'qkv.weight'],
        data.state['backbone.stages.1.blocks.0.channel_block.attn.qkv.weight'])


def test_layer_wise_lr_decay_through_the_constructor():
    from mmpretrain.engine.optimizers import \
        LearningRateDecayOptimWrapperConstructor
    arch = dict(MINI, depths=[1, 1, 2, 1])  # 5 blocks: 7 depths
    model = _classifier(3, arch)
    wrapper = LearningRateDecayOptimWrapperConstructor(
        dict(
            type='OptimWrapper',
            optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.05)),
        dict(layer_decay_rate=0.5))(
            model)
    lrs = {
        g['param_name']: (g['layer_id'], g['lr'])
        for g in wrapper.optimizer.param_groups
    }
    assert len(lrs) == len(list(model.parameters()))
    expect = {
        'backbone.patch_embed.projection.weight': (0, 0.5**6),
        'backbone.stages.0.blocks.0.spatial_block.attn.w_msa.qkv.weight':
        (1, 0.5**5),
        'backbone.stages.0.downsample.projection.weight': (1, 0.5**5),
        'backbone.stages.1.blocks.0.channel_block.norm1.bias': (2, 0.5**4),
        'backbone.stages.2.blocks.0.channel_block.ffn.layers.1.weight':
        (3, 0.5**3),
        'backbone.stages.2.blocks.1.spatial_block.cpe1.proj.weight':
        (4, 0.5**2),
        'backbone.stages.2.downsample.norm.weight': (4, 0.5**2),
        'backbone.stages.3.blocks.0.spatial_block.norm2.weight': (5, 0.5),
        'backbone.norm3.weight': (6, 1.0),
        'head.fc.weight': (6, 1.0),
    }
    for name, (depth, lr) in expect.items():
        assert lrs[name] == (depth, pytest.approx(lr)), name
    # in parameter order, the lr never decreases from the stem to the head
    order = [lrs[n][1] for n, _ in model.named_parameters()]
    assert order == sorted(order) and order[0] < order[-1]


@pytest.mark.parametrize('norm_cfg', [dict(type='LN'), dict(type='BN')])
def test_stage_outputs_are_contiguous(norm_cfg):
    torch.manual_seed(0)
    model = DaViT(
        arch=MINI, window_size=4, out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        outs = model(x)
    shapes = [(2, 16, 16, 12), (2, 32, 8, 6), (2, 64, 4, 3), (2, 128, 2, 2)]
    assert [tuple(o.shape) for o in outs] == shapes
    assert all(o.is_contiguous() for o in outs)
    # the values are the map's: a norm over the channels of the last stage
    stage3 = outs[3].view(2, 128, -1)
    if norm_cfg['type'] == 'LN':
        assert torch.allclose(stage3.mean(1), torch.zeros(2, 4), atol=1e-5)


def test_finetune_config_runs_one_iteration(data, tmp_path, davit_scope):
    """The custom config: real DaViT-T from a (local) checkpoint, one step at
    224x224 on two images of the tiny folders."""
    torch.manual_seed(0)
    tiny = MODELS.build(
        Config.fromfile(
            osp.join(ROOT, 'configs/davit/davit-tiny_4xb256_in1k.py')).model)
    tiny.init_weights()
    ckpt = tmp_path / 'davit-tiny.pth'
    torch.save({'state_dict': tiny.state_dict()}, ckpt)
    config = tmp_path / 'mine.py'  # what a user writes for 3 classes
    base = osp.join(ROOT, 'configs/davit/davit-tiny_in1k-pre_8xb32_custom.py')
    config.write_text(f"""
_base_ = [{base!r}]
model = dict(backbone=dict(init_cfg=dict(checkpoint={str(ckpt)!r})),
             head=dict(num_classes=3))
data_preprocessor = dict(num_classes=3)
train_dataloader = dict(
    batch_size=2, num_workers=0, sampler=dict(shuffle=False),
    dataset=dict(data_root={str(data.root / 'data')!r}, indices=2))
train_cfg = dict(max_epochs=1)
custom_hooks = [dict(type='SnapshotForTest')]
default_hooks = dict(logger=dict(interval=1))
""")
    _tool('train').main(
        [str(config), '--work-dir',
         str(tmp_path / 'work'), '--no-validate'])
    start = _Snapshot.seen['start']
    for key, value in tiny.state_dict().items():
        if key.startswith('backbone.'):
            assert torch.equal(start[key], value), key
    assert start['head.fc.weight'].shape == (3, 768)
    assert len(_Snapshot.seen['losses']) == 1  # 2 images, batch 2
    assert all(np.isfinite(_Snapshot.seen['losses']))
    # layer-wise lr decay: 8 depths for DaViT-T, the stem at 0.75 ** 7
    scale = _Snapshot.seen['lr_scale']
    assert scale['backbone.patch_embed.projection.weight'] == \
        pytest.approx(0.75**7)
    assert scale['backbone.stages.2.blocks.2.channel_block.attn.qkv.weight'] \
        == pytest.approx(0.75**2)
    assert scale['head.fc.weight'] == 1.0
