# Florence-2-large's DaViT vision tower (arch 'huge-fl': timm's davit_huge_fl)
# as an ImageNet-1k classifier to fine-tune; see davit-base-fl.py. The weights
# are those of microsoft/Florence-2-large.
_base_ = './davit-base-fl.py'

model = dict(
    backbone=dict(
        arch='huge-fl',
        drop_path_rate=0.2,
        init_cfg=dict(
            checkpoint='florence2://huggingface.co/microsoft/Florence-2-large/'
            'resolve/main/pytorch_model.bin')),
    head=dict(in_channels=2048))
