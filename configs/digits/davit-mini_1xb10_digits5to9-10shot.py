# Transfer demo, the baseline: the mini DaViT trained from scratch on the
# digits 5-9 with only 10 labelled images per class (50 images), tested on
# all held-out 5-9 images (177). Same model, data and schedule as the
# fine-tuned run (davit-mini_digits0to4-pre_1xb10_digits5to9-10shot.py),
# which only differs by its initial backbone weights.
# Layer-wise lr decay (0.5 per block from the head down to the stem, through
# DaViT.get_layer_depth) is the fine-tuning recipe: pretrained early stages,
# whose features transfer, change least. It is kept here too so that both
# runs have the same optimizer (it also helps from scratch on 50 images).
_base_ = ['./davit-mini_1xb64_digits32.py']

classes = ['5', '6', '7', '8', '9']
model = dict(head=dict(num_classes=len(classes)))
data_preprocessor = dict(num_classes=len(classes))

train_dataloader = dict(
    batch_size=10,
    dataset=dict(
        ann_file='transfer/digits5to9_10shot_train.txt',
        data_prefix='train',
        classes=classes))
val_dataloader = dict(
    dataset=dict(
        ann_file='transfer/digits5to9_val.txt',
        data_prefix='val',
        classes=classes))
test_dataloader = val_dataloader

# 30 epochs of 5 iterations; warm-up over the first 3 epochs.
max_epochs = 30
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-2,
        by_epoch=True,
        end=3,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-5,
        by_epoch=True,
        begin=3,
        end=max_epochs,
        convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(
    constructor='LearningRateDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=0.5))
auto_scale_lr = dict(base_batch_size=10)
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
