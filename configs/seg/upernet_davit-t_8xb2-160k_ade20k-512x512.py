# UperNet with a DaViT-T backbone on ADE20K (512x512 crops, 160k iterations),
# the official DaViT recipe: AdamW (lr 6e-5, weight decay 0.01), poly decay
# after a 1500-iteration linear warm-up, drop-path 0.3, 8 GPUs x 2 images.
# mmseg's Swin UperNet config has the same schedule, optimizer and heads.
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'  # noqa

custom_imports = dict(imports=['davit_ext'], allow_failed_imports=False)

pretrained = 'https://download.openmmlab.com/mmclassification/v0/davit/davit-tiny_3rdparty_in1k_20221116-700fdf7d.pth'  # noqa
model = dict(
    backbone=dict(
        _delete_=True,
        type='davit_ext.DaViT',
        arch='t',
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

# The official optimizer has no per-parameter rules (mmseg's Swin config
# exempts norms from weight decay).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01))
