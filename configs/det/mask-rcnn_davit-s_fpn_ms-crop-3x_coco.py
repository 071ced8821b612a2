# Mask R-CNN, DaViT-S, COCO: as the DaViT-T 3x config with the small arch.
_base_ = './mask-rcnn_davit-t_fpn_ms-crop-3x_coco.py'

pretrained = 'https://download.openmmlab.com/mmclassification/v0/davit/davit-small_3rdparty_in1k_20221116-51a849a6.pth'  # noqa
model = dict(backbone=dict(arch='s', init_cfg=dict(checkpoint=pretrained)))
