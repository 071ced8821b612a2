# DaViT-Base classifier for ImageNet-1k: our DaViT backbone (davit_ext scope),
# global average pooling, a linear head trained with label smoothing, and
# Mixup/CutMix batch augmentation.
model = dict(
    # Built in the davit_ext scope from any entry point (also mmpretrain's
    # get_model/init_model, which build under the 'mmpretrain' scope).
    _scope_='davit_ext',
    type='ImageClassifier',
    backbone=dict(
        type='DaViT', arch='b', out_indices=(3, ), drop_path_rate=0.4),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=1024,
        loss=dict(
            type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
    ),
    train_cfg=dict(augments=[
        dict(type='Mixup', alpha=0.8),
        dict(type='CutMix', alpha=1.0),
    ]))
