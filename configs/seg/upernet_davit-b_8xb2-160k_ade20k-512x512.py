# UperNet, DaViT-B, ADE20K 512x512: as the DaViT-T config with the base arch
# (embed 128: wider head inputs).
_base_ = './upernet_davit-t_8xb2-160k_ade20k-512x512.py'

pretrained = 'https://download.openmmlab.com/mmclassification/v0/davit/davit-base_3rdparty_in1k_20221116-19e0d956.pth'  # noqa
model = dict(
    backbone=dict(arch='b', init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
