"""The ImageNet configs, their bases, the metafile and the demo config."""
import os.path as osp

import mmpretrain
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


MMPRETRAIN_CONFIGS = osp.join(
    osp.dirname(mmpretrain.__file__), '.mim', 'configs', 'davit')
# Every way our ImageNet configs differ from those mmpretrain 1.2 ships for
# DaViT (key: (ours, mmpretrain's)); anything else must be equal.
MISSING = '<missing>'
INTENDED = {
    # our scope, so that type='DaViT' is our backbone
    'default_scope': ('davit_ext', 'mmpretrain'),
    'model._scope_': ('davit_ext', MISSING),
    'custom_imports.imports': (['davit_ext'], MISSING),
    'custom_imports.allow_failed_imports': (False, MISSING),
    # our hooks, declared by our runtime base
    'custom_hooks.#len': (5, MISSING),
    'custom_hooks.0.type': ('davit_ext.RandomStateHook', MISSING),
    'custom_hooks.1.type': ('davit_ext.FitLoadFromHook', MISSING),
    'custom_hooks.2.type': ('davit_ext.NonFiniteLossHook', MISSING),
    'custom_hooks.2.skip': (False, MISSING),
    'custom_hooks.3.type': ('davit_ext.UnreadableImageHook', MISSING),
    'custom_hooks.3.skip': (False, MISSING),
    'custom_hooks.4.type': ('davit_ext.PreemptionHook', MISSING),
    'custom_hooks.4.signals': (['SIGTERM', 'SIGUSR1'], MISSING),
    # checkpoints written atomically (the same arguments)
    'default_hooks.checkpoint.type':
    ('davit_ext.SafeCheckpointHook', 'CheckpointHook'),
}
ARCH_ALIAS = {'small': ('s', 'small'), 'base': ('b', 'base')}
OFFICIAL = {
    # the original forward: pooled, normalised features, no neck
    'model.backbone.official': (True, MISSING),
    'model.neck': (None, MISSING),
    'model.neck.type': (MISSING, 'GlobalAveragePooling'),
}


def _flat(value, prefix=''):
    """{'a.b.0.c': leaf} of a config (lists of scalars stay whole)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f'{prefix}{k}.'))
        return out
    if isinstance(value, (list, tuple)) and any(
            isinstance(v, (dict, list, tuple)) for v in value):
        out = {f'{prefix}#len': len(value)}
        for i, v in enumerate(value):
            out.update(_flat(v, f'{prefix}{i}.'))
        return out
    return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


def _differences(ours, theirs):
    a, b = _flat(ours.to_dict()), _flat(theirs.to_dict())
    # What our configs inherit through 'mmpretrain::' bases carries
    # _scope_='mmpretrain' (mmengine marks what comes from another package);
    # the same types are built either way.
    a = {
        k: v
        for k, v in a.items()
        if not (k.endswith('._scope_') and v == 'mmpretrain')
    }
    return {
        k: (a.get(k, MISSING), b.get(k, MISSING))
        for k in sorted(set(a) | set(b))
        if a.get(k, MISSING) != b.get(k, MISSING)
    }


@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
@pytest.mark.parametrize('official', [False, True])
def test_configs_equal_mmpretrains_but_for_the_intended(size, official):
    """Key by key against mmpretrain's shipped configs (which also holds our
    _base_ dataset, schedule and runtime to mmpretrain's recipe)."""
    suffix = '-official' if official else ''
    ours = _config(f'configs/davit/davit-{size}_4xb256_in1k{suffix}.py')
    theirs = Config.fromfile(
        osp.join(MMPRETRAIN_CONFIGS, f'davit-{size}_4xb256_in1k.py'))
    expected = dict(INTENDED)
    if size in ARCH_ALIAS:  # 's' and 'small' name the same arch
        expected['model.backbone.arch'] = ARCH_ALIAS[size]
        assert DaViT.arch_zoo['s'] is DaViT.arch_zoo['small']
        assert DaViT.arch_zoo['b'] is DaViT.arch_zoo['base']
    if official:
        expected.update(OFFICIAL)
    assert _differences(ours, theirs) == expected


def test_runtime_base_scope_and_cpu_fallback():
    rt = _config('configs/_base_/default_runtime.py')
    assert rt.default_scope == 'davit_ext'
    assert rt.env_cfg.dist_cfg == dict(backend='nccl')  # tools switch to gloo
    checkpoint = dict(rt.default_hooks.checkpoint)
    assert checkpoint.pop('_scope_', 'mmpretrain') == 'mmpretrain'
    assert checkpoint == dict(type='davit_ext.SafeCheckpointHook', interval=1)
    assert rt.custom_hooks == [
        dict(type='davit_ext.RandomStateHook'),
        dict(type='davit_ext.FitLoadFromHook'),
        dict(type='davit_ext.NonFiniteLossHook', skip=False),
        dict(type='davit_ext.UnreadableImageHook', skip=False),
        dict(type='davit_ext.PreemptionHook', signals=['SIGTERM', 'SIGUSR1'])
    ]


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
