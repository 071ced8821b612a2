# Fine-tune Florence-2-large's DaViT tower (arch huge-fl) on ImageNet-1k at
# 768x768 with DeepSpeed ZeRO stage 3 (parameters, gradients and AdamW state
# partitioned), 8 GPUs x 16 images: mmengine's FlexibleRunner with its
# DeepSpeedStrategy. Needs pip install -e ".[deepspeed]" (deepspeed < 0.19.7:
# mmengine 0.10.7 imports optimizers that deepspeed 0.19.7 removed); on CPU
# processes DeepSpeed compiles a communication op at its first start (a C++
# compiler and ninja). Checkpoints are DeepSpeed folders (epoch_N.pth/, one
# file per rank; the work_dir's zero_to_fp32.py makes one state dict of them);
# see docs/large_models.md for what differs from the FSDP config.
#   bash tools/dist_train.sh CONFIG 8  (CONFIG: this file)
_base_ = './davit-huge-fl_florence2-pre_8xb16_in1k-768px.py'

runner_type = 'FlexibleRunner'
strategy = dict(
    type='DeepSpeedStrategy',
    zero_optimization=dict(
        stage=3, overlap_comm=True, contiguous_gradients=True),
    # the schedule's clip_grad=dict(max_norm=5.0), done by DeepSpeed
    gradient_clipping=5.0)
# DeepSpeed steps the optimizer: the schedule's AdamW and parameter-wise
# rules, without mmengine's clipping (above).
optim_wrapper = dict(
    _delete_=True,
    type='DeepSpeedOptimWrapper',
    optimizer=dict(
        type='AdamW', lr=1e-4, weight_decay=0.05, eps=1e-8,
        betas=(0.9, 0.999)),
    paramwise_cfg=dict(
        norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0))
