# DaViT-Small with the original model's forward (github.com/dingmyu/davit, as
# in timm): the stem pads 3 pixels on every side and the output LayerNorm is
# applied after global average pooling, so the backbone returns normalised
# (B, C) features and the classifier has no neck. Same layers, same state
# dict and same published weights as davit-small_4xb256_in1k.py; only the
# forward differs, and so do the logits.
_base_ = './davit-small_4xb256_in1k.py'

model = dict(backbone=dict(official=True), neck=None)
