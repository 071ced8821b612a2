# Florence-2-large's DaViT vision tower (arch 'huge-fl') without a head, for
# features at Florence-2's 768x768 with window 12:
#   model = get_model('davit-huge-fl_florence2-pre_3rdparty',
#                     pretrained=True)
#   feats = model.extract_feat(images)  # ((B, 2048), ) pooled, normalised
# The pretrained weights: microsoft/Florence-2-large (converted when
# loaded, see davit_ext/weights/florence2.py).
model = dict(
    _scope_='davit_ext',
    type='ImageClassifier',
    backbone=dict(
        type='DaViT', arch='huge-fl', official=True, drop_path_rate=0.0),
    neck=None,
    head=None)

data_preprocessor = dict(
    # Florence-2's (ImageNet's) RGB normalisation.
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True,
)

test_pipeline = [
    dict(type='LoadImageFromFile'),
    # Florence-2's processor resizes to 768x768 (no crop).
    dict(
        type='Resize',
        scale=(768, 768),
        backend='pillow',
        interpolation='bicubic'),
    dict(type='PackInputs'),
]

default_scope = 'davit_ext'
