# Fine-tune Florence-2-large's DaViT tower (arch huge-fl) on ImageNet-1k at
# 256x256 with window 8: 8 GPUs x 16 images.
_base_ = './davit-base-fl_florence2-pre_8xb16_in1k-256px.py'

model = dict(
    backbone=dict(
        arch='huge-fl',
        drop_path_rate=0.2,
        init_cfg=dict(
            checkpoint='florence2://huggingface.co/microsoft/Florence-2-large/'
            'resolve/main/pytorch_model.bin')),
    head=dict(in_channels=2048))
