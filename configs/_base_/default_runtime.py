# Runtime shared by all davit_ext configs.
# Registries: ``DaViT`` resolves to davit_ext's backbone; every other type
# falls through to mmpretrain, then mmengine.
default_scope = 'davit_ext'
# Imported by mmengine before anything is built, so configs also work from
# plain mmengine/mmpretrain entry points.
custom_imports = dict(imports=['davit_ext'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    # Set enable=True to draw validation predictions.
    visualization=dict(type='VisualizationHook', enable=False),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # davit_ext's tools switch this to 'gloo' (and to CPU devices) when no GPU
    # is present; nothing to edit here for CPU runs.
    dist_cfg=dict(backend='nccl'),
)

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='UniversalVisualizer', vis_backends=vis_backends)

log_level = 'INFO'

# Weights to start from (path or URL), and whether to resume their run.
load_from = None
resume = False

# No fixed seed, non-deterministic kernels allowed (fastest).
randomness = dict(seed=None, deterministic=False)
