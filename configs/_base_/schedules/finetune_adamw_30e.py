# A short AdamW fine-tuning schedule for pretrained towers: lr 1e-4 for a total
# batch of 128, 2 warm-up epochs, cosine decay over 30 epochs. A starting
# point, not a tuned recipe: no accuracy was measured with it here.
optim_wrapper = dict(
    optimizer=dict(
        type='AdamW', lr=1e-4, weight_decay=0.05, eps=1e-8,
        betas=(0.9, 0.999)),
    # No weight decay on norms, biases and other 1-d parameters.
    paramwise_cfg=dict(
        norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0),
    clip_grad=dict(max_norm=5.0),
)

param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        end=2,
        convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=2),
]

train_cfg = dict(by_epoch=True, max_epochs=30, val_interval=1)
val_cfg = dict()
test_cfg = dict()

# `tools/train.py --auto-scale-lr` rescales lr from this total batch size.
auto_scale_lr = dict(base_batch_size=128)
