"""The ImageNet configs, their bases, the metafile and the demo config."""
import os.path as osp

import pytest
import yaml
from mmengine.config import Config
from mmengine.registry import init_default_scope

import davit_ext  # noqa: F401
from davit_ext.models.davit import DaViT
from davit_ext.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
URL = ('https://download.openmmlab.com/mmclassification/v0/davit/'
       'davit-{}_3rdparty_in1k_20221116-{}.pth')
PUBLISHED = {
    # size: (arch, drop_path_rate, head in_channels, params, hash, top1, top5)
    'tiny': ('t', 0.1, 768, 28_360_168, '700fdf7d', 82.24, 96.13),
    'small': ('s', 0.2, 768, 49_745_896, '51a849a6', 83.61, 96.75),
    'base': ('b', 0.4, 1024, 87_954_408, '19e0d956', 84.09, 96.82),
}
OFFICIAL_TOP1 = {'tiny': 82.8, 'small': 84.2, 'base': 84.6}


def _config(rel):
    return Config.fromfile(osp.join(ROOT, rel))


@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
def test_imagenet_config_builds_our_davit_with_published_params(size):
    arch, dpr, in_ch, params, *_ = PUBLISHED[size]
    cfg = _config(f'configs/davit/davit-{size}_4xb256_in1k.py')
    assert cfg.default_scope == 'davit_ext'
    assert cfg.model.backbone == dict(
        type='DaViT', arch=arch, out_indices=(3, ), drop_path_rate=dpr)
    assert cfg.model.neck == dict(type='GlobalAveragePooling')
    assert cfg.model.head == dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=in_ch,
        loss=dict(
            type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'))
    assert cfg.model.train_cfg == dict(augments=[
        dict(type='Mixup', alpha=0.8),
        dict(type='CutMix', alpha=1.0)
    ])
    assert cfg.train_dataloader.batch_size == 256
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    assert type(model.backbone) is DaViT
    assert sum(p.numel() for p in model.parameters()) == params


def test_mmpretrain_get_model_builds_our_backbone_from_a_config_path():
    # mmpretrain builds under its own scope; the model's _scope_ wins.
    from mmpretrain import get_model
    model = get_model(
        osp.join(ROOT, 'configs/davit/davit-tiny_4xb256_in1k.py'))
    assert type(model.backbone) is DaViT


def test_dataset_base():
    cfg = _config('configs/_base_/datasets/imagenet_bs256_davit_224.py')
    assert cfg.data_preprocessor == dict(
        num_classes=1000,
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=True)
    train = cfg.train_dataloader.dataset.pipeline
    assert [t['type'] for t in train] == [
        'LoadImageFromFile', 'RandomResizedCrop', 'RandomFlip', 'RandAugment',
        'RandomErasing', 'PackInputs'
    ]
    assert train[1] == dict(
        type='RandomResizedCrop',
        scale=224,
        backend='pillow',
        interpolation='bicubic')
    assert train[2] == dict(
        type='RandomFlip', prob=0.5, direction='horizontal')
    assert train[3] == dict(
        type='RandAugment',
        policies='timm_increasing',
        num_policies=2,
        total_level=10,
        magnitude_level=9,
        magnitude_std=0.5,
        hparams=dict(pad_val=[104, 116, 124], interpolation='bicubic'))
    assert train[4]['erase_prob'] == 0.25
    assert train[4]['fill_color'] == [103.53, 116.28, 123.675]
    assert cfg.test_dataloader.dataset.pipeline == [
        dict(type='LoadImageFromFile'),
        dict(
            type='ResizeEdge',
            scale=236,
            edge='short',
            backend='pillow',
            interpolation='bicubic'),
        dict(type='CenterCrop', crop_size=224),
        dict(type='PackInputs'),
    ]
    assert cfg.train_dataloader.dataset.type == 'ImageNet'
    assert cfg.train_dataloader.dataset.data_root == 'data/imagenet'
    assert cfg.val_dataloader.dataset.split == 'val'
    assert cfg.val_evaluator == dict(type='Accuracy', topk=(1, 5))


def test_schedule_and_runtime_bases():
    cfg = _config('configs/_base_/schedules/imagenet_bs1024_adamw_swin.py')
    assert cfg.optim_wrapper.optimizer == dict(
        type='AdamW', lr=1e-3, weight_decay=0.05, eps=1e-8, betas=(0.9, 0.999))
    pw = cfg.optim_wrapper.paramwise_cfg
    assert (pw.norm_decay_mult, pw.bias_decay_mult,
            pw.flat_decay_mult) == (0.0, 0.0, 0.0)
    assert pw.custom_keys == {
        '.absolute_pos_embed': dict(decay_mult=0.0),
        '.relative_position_bias_table': dict(decay_mult=0.0)
    }
    assert cfg.param_scheduler == [
        dict(
            type='LinearLR',
            start_factor=1e-3,
            by_epoch=True,
            end=20,
            convert_to_iter_based=True),
        dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=20)
    ]
    assert cfg.train_cfg == dict(by_epoch=True, max_epochs=300, val_interval=1)
    assert cfg.auto_scale_lr == dict(base_batch_size=1024)

    rt = _config('configs/_base_/default_runtime.py')
    assert rt.default_scope == 'davit_ext'
    assert rt.env_cfg.dist_cfg == dict(backend='nccl')
    assert rt.default_hooks.checkpoint == dict(
        type='CheckpointHook', interval=1)


def test_metafile_and_model_index():
    with open(osp.join(ROOT, 'model-index.yml')) as f:
        assert yaml.safe_load(f) == {'Import': ['configs/davit/metafile.yml']}
    with open(osp.join(ROOT, 'configs/davit/metafile.yml')) as f:
        meta = yaml.safe_load(f)
    # The Florence-2 towers' entries: tests/test_florence2.py.
    models = {
        m['Name']: m
        for m in meta['Models'] if 'florence2' not in m['Name']
    }
    assert sorted(models) == sorted(
        [f'davit-{s}_3rdparty_in1k' for s in PUBLISHED] +
        [f'davit-{s}_3rdparty_in1k-official' for s in PUBLISHED])
    for size, (_, _, _, params, sha, top1, top5) in PUBLISHED.items():
        ours = models[f'davit-{size}_3rdparty_in1k']
        official = models[f'davit-{size}_3rdparty_in1k-official']
        assert ours['Weights'] == official['Weights'] == URL.format(size, sha)
        assert ours['Metadata']['Parameters'] == params
        assert ours['Results'][0]['Metrics'] == {
            'Top 1 Accuracy': top1,
            'Top 5 Accuracy': top5
        }
        assert official['Results'][0]['Metrics'] == {
            'Top 1 Accuracy': OFFICIAL_TOP1[size]
        }
        assert ours['Config'] == f'configs/davit/davit-{size}_4xb256_in1k.py'
        assert official['Config'] == \
            f'configs/davit/davit-{size}_4xb256_in1k-official.py'
        assert osp.isfile(osp.join(ROOT, ours['Config']))
    text = open(osp.join(ROOT, 'configs/davit/metafile.yml')).read()
    assert 'NOT measured here' in text


def test_digits_config_inherits_the_davit_bases():
    text = open(osp.join(
        ROOT, 'configs/digits/davit-mini_1xb64_digits32.py')).read()
    assert "'../_base_/models/davit/davit-tiny.py'" in text
    assert "'../_base_/default_runtime.py'" in text
    cfg = _config('configs/digits/davit-mini_1xb64_digits32.py')
    assert cfg.default_scope == 'davit_ext'
    assert cfg.model.backbone.arch == dict(
        embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])
    assert cfg.model.train_cfg == {}  # no Mixup/CutMix
    assert cfg.train_dataloader.dataset.type == 'CustomDataset'
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    assert type(model.backbone) is DaViT
    assert model.head.fc.out_features == 10
