# AdamW schedule of Swin/DaViT for a total batch of 1024 (e.g. 4 GPUs x 256):
# lr = 5e-4 per 512 images, 20 epochs of linear warm-up, then cosine decay to
# 1e-5 over the remaining 280 epochs.
optim_wrapper = dict(
    optimizer=dict(
        type='AdamW',
        lr=5e-4 * 1024 / 512,
        weight_decay=0.05,
        eps=1e-8,
        betas=(0.9, 0.999)),
    # No weight decay on norms, biases, 1-d parameters and position tables.
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={
            '.absolute_pos_embed': dict(decay_mult=0.0),
            '.relative_position_bias_table': dict(decay_mult=0.0),
        }),
)

param_scheduler = [
    # Warm-up, stepped every iteration.
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        end=20,
        convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=20),
]

train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
val_cfg = dict()
test_cfg = dict()

# `tools/train.py --auto-scale-lr` rescales lr linearly from this batch size
# to the real total (GPUs x batch_size).
auto_scale_lr = dict(base_batch_size=1024)
