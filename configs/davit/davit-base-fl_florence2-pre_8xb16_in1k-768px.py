# Fine-tune Florence-2-base's DaViT tower on ImageNet-1k at 768x768 (window
# 12, Florence-2's own resolution): 8 GPUs x 16 images.
_base_ = [
    '../_base_/models/davit/davit-base-fl.py',
    'mmpretrain::_base_/datasets/imagenet_bs256_davit_224.py',
    '../_base_/schedules/finetune_adamw_30e.py',
    '../_base_/default_runtime.py',
]

img_size = 768
# Evaluation resizes the short edge to img_size / 0.95, then crops img_size
# (timm's crop_pct 0.95 for DaViT).
test_resize = round(img_size / 0.95)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='RandomResizedCrop',
        scale=img_size,
        backend='pillow',
        interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(
        type='RandAugment',
        policies='timm_increasing',
        num_policies=2,
        total_level=10,
        magnitude_level=9,
        magnitude_std=0.5,
        hparams=dict(pad_val=[104, 116, 124], interpolation='bicubic')),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='ResizeEdge',
        scale=test_resize,
        edge='short',
        backend='pillow',
        interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=img_size),
    dict(type='PackInputs'),
]

train_dataloader = dict(batch_size=16, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=16, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
