# RetinaNet, DaViT-B, COCO: as the DaViT-T 3x config with the base arch
# (embed 128: wider FPN inputs).
_base_ = './retinanet_davit-t_fpn_ms-crop-3x_coco.py'

pretrained = 'https://download.openmmlab.com/mmclassification/v0/davit/davit-base_3rdparty_in1k_20221116-19e0d956.pth'  # noqa
model = dict(
    backbone=dict(arch='b', init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[256, 512, 1024]))
