# UperNet with a mini DaViT (embed 32, one block per stage) trained from
# scratch on synthetic shapes: a CPU-sized check that the backbone learns
# semantic segmentation through mmseg's own train/test tools.
#
# Data: python tools/dataset_converters/make_shapes.py data/shapes
#   (label maps in ann_dir/, 0 = background, images of 96..160 px).
# Run:  python $(dirname $(python -c 'import mmseg;print(mmseg.__file__)'))/\
#       .mim/tools/train.py THIS_CONFIG --work-dir W
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_20k.py',
]

custom_imports = dict(imports=['davit_ext'], allow_failed_imports=False)

classes = ('background', 'circle', 'square', 'triangle')
palette = [[0, 0, 0], [220, 60, 50], [60, 190, 70], [60, 90, 220]]
data_root = 'data/shapes/'
crop_size = (128, 128)
max_iters = 800

# SyncBN needs a process group and a GPU; plain BN trains on one CPU.
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    # Training crops are padded to one size; test images keep their own
    # (odd) sizes, which the backbone takes as they are.
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='davit_ext.DaViT',
        arch=dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8]),
        window_size=4,
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3)),
    # Narrow heads sized to the mini backbone.
    decode_head=dict(
        in_channels=[32, 64, 128, 256],
        channels=64,
        num_classes=len(classes),
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=128,
        channels=32,
        num_classes=len(classes),
        norm_cfg=norm_cfg))

# dataset settings
dataset_type = 'BaseSegDataset'
metainfo = dict(classes=classes, palette=palette)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomResize',
        scale=(160, 160),
        ratio_range=(0.75, 1.25),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.9),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
# Test at the stored size: no resize, no padding.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
_dataset = dict(
    type=dataset_type,
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.png',
    seg_map_suffix='.png')
# Two CPU cores: load in the main process.
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        **_dataset,
        data_prefix=dict(img_path='train', seg_map_path='ann_dir/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        **_dataset,
        data_prefix=dict(img_path='val', seg_map_path='ann_dir/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# schedule: from scratch, so a higher AdamW rate than fine-tuning uses, a
# short warm-up, then poly decay.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, end=50),
    dict(
        type='PolyLR',
        eta_min=1e-5,
        power=1.0,
        begin=50,
        end=max_iters,
        by_epoch=False)
]
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)

# runtime: one checkpoint, at the end; gloo runs without a GPU.
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    # test.py --show-dir draws every image, not every 50th.
    visualization=dict(interval=1))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
