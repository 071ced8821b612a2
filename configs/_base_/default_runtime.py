# Runtime shared by all davit_ext configs: mmpretrain's default runtime (its
# default_hooks, env_cfg, visualizer, log level, load_from=None, resume=False,
# no fixed seed) with our scope, our imports and our hooks.
# Set default_hooks.visualization.enable=True to draw validation predictions.
# env_cfg.dist_cfg stays backend='nccl': davit_ext's tools switch it to 'gloo'
# (and to CPU devices) when no GPU is present; nothing to edit for CPU runs.
# Dicts inherited from mmpretrain's base carry _scope_='mmpretrain' (mmengine
# adds it to what a config takes from another package); they name mmengine or
# mmpretrain types, which that scope builds the same.
_base_ = 'mmpretrain::_base_/default_runtime.py'

# Registries: ``DaViT`` resolves to davit_ext's backbone; every other type
# falls through to mmpretrain, then mmengine.
default_scope = 'davit_ext'
# Imported by mmengine before anything is built, so configs also work from
# plain mmengine/mmpretrain entry points.
custom_imports = dict(imports=['davit_ext'], allow_failed_imports=False)

# Checkpoints are written atomically (a temporary file renamed over the
# target); a failed save keeps the previous checkpoint and last_checkpoint and
# stops the run with one message (davit_ext.engine.checkpoint).
default_hooks = dict(checkpoint=dict(type='davit_ext.SafeCheckpointHook'))

# RandomStateHook saves and restores every random generator, so that resuming
# is exact; FitLoadFromHook applies load_from under the fine-tuning policy (a
# new head loads with one warning, another backbone arch is refused; resume
# stays strict). The other three handle the faults of real runs
# (docs/train_test.md, "Faults"): a non-finite loss stops the run before
# anything is saved (skip=True: skip such steps), an unreadable image stops it
# with one message naming the file (skip=True: skip such training images),
# SIGTERM/SIGUSR1 save a resumable checkpoint and stop with status 75
# (signals=[] switches that off). A config that sets its own custom_hooks
# replaces this list; tools/train.py adds back those it lacks, with these
# defaults.
custom_hooks = [
    dict(type='davit_ext.RandomStateHook'),
    dict(type='davit_ext.FitLoadFromHook'),
    dict(type='davit_ext.NonFiniteLossHook', skip=False),
    dict(type='davit_ext.UnreadableImageHook', skip=False),
    dict(type='davit_ext.PreemptionHook', signals=['SIGTERM', 'SIGUSR1']),
]
