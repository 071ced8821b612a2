# Fine-tune the published ImageNet-1k DaViT-T on your own images
# (8 GPUs x 32 images; other counts: tools/train.py --auto-scale-lr).
#
# Data, in mmpretrain's CustomDataset layout (set data_root below or with
# --cfg-options):
#   data/custom/train/<class name>/<image>    data/custom/val/<class>/<image>
# or annotation files of "relative/path label" lines: add
# ann_file='meta/train.txt' (and 'meta/val.txt') to the datasets below.
# Set num_classes to your number of classes.
#
# Backbone: the published checkpoint (init_cfg, prefix 'backbone'; the 1000-
# class head is not loaded); a new head of num_classes; layer-wise learning
# rate decay (0.75 per block from the head down to the stem); AdamW with a
# fine-tuning learning rate, 2 warm-up epochs, cosine decay over 30 epochs.
_base_ = [
    '../_base_/models/davit/davit-tiny.py',
    '../_base_/default_runtime.py',
]

num_classes = 10
pretrained = ('https://download.openmmlab.com/mmclassification/v0/davit/'
              'davit-tiny_3rdparty_in1k_20221116-700fdf7d.pth')

model = dict(
    backbone=dict(
        drop_path_rate=0.1,
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone')),
    head=dict(num_classes=num_classes),
    # No Mixup/CutMix: small datasets fine-tune better without them.
    train_cfg=dict(_delete_=True))

# dataset settings
dataset_type = 'CustomDataset'
data_root = 'data/custom'
data_preprocessor = dict(
    num_classes=num_classes,
    # ImageNet's RGB mean/std, as the checkpoint was trained with.
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='RandomResizedCrop',
        scale=224,
        backend='pillow',
        interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
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

train_dataloader = dict(
    batch_size=32,
    num_workers=4,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix='train',
        pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
val_dataloader = dict(
    batch_size=64,
    num_workers=4,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix='val',
        pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
# top-5 needs at least 5 classes: use topk=(1, 5) when you have them.
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# optimizer: layer-wise lr decay through DaViT.get_layer_depth (stem depth
# 0, one depth per block, head last); no weight decay on norms and biases.
optim_wrapper = dict(
    optimizer=dict(
        type='AdamW',
        lr=5e-4 * 256 / 512,
        weight_decay=0.05,
        eps=1e-8,
        betas=(0.9, 0.999)),
    constructor='LearningRateDecayOptimWrapperConstructor',
    paramwise_cfg=dict(
        layer_decay_rate=0.75,
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0),
    clip_grad=dict(max_norm=5.0),
)

max_epochs = 30
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        end=2,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-6,
        by_epoch=True,
        begin=2,
        end=max_epochs,
        convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=256)

default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=1, max_keep_ckpts=2, save_best='auto'))
