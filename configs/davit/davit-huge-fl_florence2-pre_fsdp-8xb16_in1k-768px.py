# Fine-tune Florence-2-large's DaViT tower (arch huge-fl) on ImageNet-1k at
# 768x768, sharded: mmengine's FlexibleRunner with FSDP over 8 GPUs x 16
# images (fp32 weights, gradients and AdamW state divided among the GPUs;
# gradient checkpointing: with_cp from the base config). Same model, data and
# schedule as the DDP config it inherits; see docs/large_models.md.
#   bash tools/dist_train.sh \
#       configs/davit/davit-huge-fl_florence2-pre_fsdp-8xb16_in1k-768px.py 8
_base_ = './davit-huge-fl_florence2-pre_8xb16_in1k-768px.py'

# tools/train.py builds a FlexibleRunner for a config with a strategy; set
# here too for mmengine's own entry points.
runner_type = 'FlexibleRunner'
strategy = dict(
    # mmengine's FSDPStrategy with the optimizer rules and gradient clipping
    # of an unsharded run (davit_ext/engine/fsdp.py).
    type='davit_ext.FSDPStrategy',
    # One FSDP unit per DaViT block: at most one block's weights are whole at
    # a time (wrap='stage': fewer, larger units).
    model_wrapper=dict(
        auto_wrap_policy=dict(
            type='davit_ext.davit_wrap_policy', wrap='block')),
    # Checkpoints gathered on rank 0 as one file, the same a DDP run saves:
    # tools/test.py, load_from and the unsharded configs read it.
    state_dict_cfg='full')
