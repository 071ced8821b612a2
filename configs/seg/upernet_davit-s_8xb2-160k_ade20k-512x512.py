# UperNet, DaViT-S, ADE20K 512x512: as the DaViT-T config with the small arch.
_base_ = './upernet_davit-t_8xb2-160k_ade20k-512x512.py'

pretrained = 'https://download.openmmlab.com/mmclassification/v0/davit/davit-small_3rdparty_in1k_20221116-51a849a6.pth'  # noqa
model = dict(backbone=dict(arch='s', init_cfg=dict(checkpoint=pretrained)))
