# Florence-2-base's DaViT vision tower (arch 'base-fl': timm's davit_base_fl)
# as an ImageNet-1k classifier to fine-tune. The tower is initialised from the
# weights of microsoft/Florence-2-base on Hugging Face: the florence2:// URL
# downloads the whole model's pytorch_model.bin and davit_ext converts its
# vision_tower.* tensors when the weights are loaded (offline: see the
# message, or convert a local copy with
# tools/model_converters/davit_to_mmpretrain.py and set checkpoint= to it).
#
# The original forward (official=True): Florence-2's towers have no output
# norm of their own (an identity one is loaded, then trained), the features
# are pooled before it, so the classifier needs no neck. Window 12 at 768x768
# as in Florence-2; the 256x256 configs set window 8.
model = dict(
    _scope_='davit_ext',
    type='ImageClassifier',
    backbone=dict(
        type='DaViT',
        arch='base-fl',
        official=True,
        out_indices=(3, ),
        drop_path_rate=0.1,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='florence2://huggingface.co/microsoft/Florence-2-base/'
            'resolve/main/pytorch_model.bin',
            prefix='backbone.')),
    neck=None,
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=1024,
        init_cfg=dict(type='TruncNormal', layer='Linear', std=2e-5),
        loss=dict(
            type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
    ),
    train_cfg=dict(augments=[
        dict(type='Mixup', alpha=0.8),
        dict(type='CutMix', alpha=1.0),
    ]))
