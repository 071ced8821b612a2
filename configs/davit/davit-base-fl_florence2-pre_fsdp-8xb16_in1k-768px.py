# Fine-tune Florence-2-base's DaViT tower (arch base-fl) on ImageNet-1k at
# 768x768, sharded: mmengine's FlexibleRunner with FSDP over 8 GPUs x 16
# images. Same model, data and schedule as the DDP config it inherits; see
# docs/large_models.md (the strategy is that of the huge-fl FSDP config).
#   bash tools/dist_train.sh \
#       configs/davit/davit-base-fl_florence2-pre_fsdp-8xb16_in1k-768px.py 8
_base_ = './davit-base-fl_florence2-pre_8xb16_in1k-768px.py'

runner_type = 'FlexibleRunner'
strategy = dict(
    type='davit_ext.FSDPStrategy',
    model_wrapper=dict(
        auto_wrap_policy=dict(
            type='davit_ext.davit_wrap_policy', wrap='block')),
    state_dict_cfg='full')
