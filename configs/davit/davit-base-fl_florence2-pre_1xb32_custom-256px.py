# Fine-tune Florence-2-base's DaViT tower on YOUR classes (a folder per
# class) at 256x256, window 8, on one GPU. Edit data_root and num_classes:
#
#   data/my_dataset/train/<class name>/*.jpg
#   data/my_dataset/val/<class name>/*.jpg
#
#   python tools/train.py \
#       configs/davit/davit-base-fl_florence2-pre_1xb32_custom-256px.py \
#       --cfg-options model.head.num_classes=<N> \
#       data_preprocessor.num_classes=<N>
#
# Offline, convert the tower first and point the backbone at it:
#   --cfg-options model.backbone.init_cfg.checkpoint=tower.pth
_base_ = [
    '../_base_/models/davit/davit-base-fl.py',
    '../_base_/schedules/finetune_adamw_30e.py',
    '../_base_/default_runtime.py',
]

num_classes = 10  # your number of classes
img_size = 256

model = dict(
    backbone=dict(window_size=8),
    head=dict(num_classes=num_classes),
    # Small datasets: no Mixup/CutMix.
    train_cfg=dict(_delete_=True))

dataset_type = 'CustomDataset'
data_root = 'data/my_dataset'
data_preprocessor = dict(
    num_classes=num_classes,
    # Florence-2's (ImageNet's) RGB normalisation.
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='RandomResizedCrop',
        scale=img_size,
        backend='pillow',
        interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='ResizeEdge',
        scale=round(img_size / 0.95),
        edge='short',
        backend='pillow',
        interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=img_size),
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
    batch_size=32,
    num_workers=4,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix='val',
        pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

auto_scale_lr = dict(base_batch_size=32)
optim_wrapper = dict(optimizer=dict(lr=5e-5))
