# DaViT-Small on ImageNet-1k: 4 GPUs x 256 images (total batch 1024, the
# schedule's base batch size).
_base_ = [
    '../_base_/models/davit/davit-small.py',
    # ImageNet-1k at 224 (data/imagenet/{train,val}/<wnid>/*.JPEG or
    # meta/{train,val}.txt; see mmpretrain's dataset preparation guide)
    'mmpretrain::_base_/datasets/imagenet_bs256_davit_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    '../_base_/default_runtime.py',
]

train_dataloader = dict(batch_size=256)
