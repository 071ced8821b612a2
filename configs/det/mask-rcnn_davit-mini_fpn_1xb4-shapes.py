# Mask R-CNN with a mini DaViT (embed 32, one block per stage) trained from
# scratch on synthetic shapes: a CPU-sized check that the backbone learns
# boxes and masks through mmdet's own train/test tools.
#
# Data: python tools/dataset_converters/make_shapes.py data/shapes
#   (COCO instances, 3 classes, images of 96..160 px, odd sizes included).
# Run:  python $(dirname $(python -c 'import mmdet;print(mmdet.__file__)'))/\
#       .mim/tools/train.py THIS_CONFIG --work-dir W
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['davit_ext'], allow_failed_imports=False)

classes = ('circle', 'square', 'triangle')
data_root = 'data/shapes/'
img_scale = (160, 160)
max_epochs = 6

model = dict(
    # No padding to a multiple of 32: the backbone, FPN and heads take any
    # size, so the model sees the images as they are.
    data_preprocessor=dict(pad_size_divisor=1),
    backbone=dict(
        _delete_=True,
        type='davit_ext.DaViT',
        arch=dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8]),
        window_size=4,
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3)),
    # Narrow neck and heads: 64 channels are plenty for three flat shapes
    # and keep an iteration well under a second on two CPU cores.
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64),
    rpn_head=dict(
        in_channels=64,
        feat_channels=64,
        # Objects are 10..130 px: anchors of 16..256 px fit them better than
        # the COCO 32..512.
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        # A fixed 2x2 sampling grid per bin bounds the cost of RoIAlign's
        # CPU backward on large RoIs.
        bbox_roi_extractor=dict(
            roi_layer=dict(sampling_ratio=2), out_channels=64),
        bbox_head=dict(
            in_channels=64, fc_out_channels=256, num_classes=len(classes)),
        mask_roi_extractor=dict(
            roi_layer=dict(sampling_ratio=2), out_channels=64),
        mask_head=dict(
            num_convs=2,
            in_channels=64,
            conv_out_channels=64,
            num_classes=len(classes))),
    # At most four objects per image: far fewer proposals and RoIs do.
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100), rcnn=dict(max_per_img=20)))

# dataset settings
backend_args = None
metainfo = dict(classes=classes)
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
# Two CPU cores: load in the main process.
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# schedule: from scratch, so a higher AdamW rate than fine-tuning uses, a
# short warm-up and cosine decay to the end.
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, end=100),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-5,
        by_epoch=True,
        begin=1,
        end=max_epochs,
        convert_to_iter_based=True)
]
auto_scale_lr = dict(base_batch_size=4)

# runtime: one checkpoint, at the end; gloo runs without a GPU.
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
