"""Registry nodes of the ``davit_ext`` scope.

Every node is a child of the mmpretrain node of the same name, so under
``default_scope='davit_ext'`` a config's ``type='DaViT'`` resolves to our
backbone while every other name (``ImageClassifier``, ``ImageNet``,
``PackInputs``, ``Accuracy``, hooks, ...) falls through to mmpretrain and then
to mmengine. From another scope (mmdet, mmseg) a config reaches our backbone
with ``type='DaViT', _scope_='davit_ext'`` or ``type='davit_ext.DaViT'``; the
latter resolves through mmengine's import-by-name fallback (``davit_ext``
exports ``DaViT``), since its scoped lookup searches only the root's direct
children and this node is a grandchild.
"""
from mmengine.registry import Registry
from mmengine.registry import root as _root
from mmpretrain import registry as _mmpretrain

__all__ = [
    'RUNNERS', 'RUNNER_CONSTRUCTORS', 'LOOPS', 'HOOKS', 'LOG_PROCESSORS',
    'OPTIMIZERS', 'OPTIM_WRAPPERS', 'OPTIM_WRAPPER_CONSTRUCTORS',
    'PARAM_SCHEDULERS', 'DATASETS', 'DATA_SAMPLERS', 'TRANSFORMS', 'MODELS',
    'MODEL_WRAPPERS', 'WEIGHT_INITIALIZERS', 'BATCH_AUGMENTS', 'TASK_UTILS',
    'METRICS', 'EVALUATORS', 'VISUALIZERS', 'VISBACKENDS', 'TOKENIZER',
    'FUNCTIONS'
]

SCOPE = 'davit_ext'


def _child(name: str, locations=()) -> Registry:
    # ``locations`` lets mmengine import our modules lazily when a config
    # switches to this scope before ``import davit_ext`` ran.
    return Registry(
        name.lower(),
        parent=getattr(_mmpretrain, name),
        scope=SCOPE,
        locations=list(locations))


RUNNERS = _child('RUNNERS')
RUNNER_CONSTRUCTORS = _child('RUNNER_CONSTRUCTORS')
LOOPS = _child('LOOPS')
HOOKS = _child('HOOKS')
LOG_PROCESSORS = _child('LOG_PROCESSORS')
OPTIMIZERS = _child('OPTIMIZERS')
OPTIM_WRAPPERS = _child('OPTIM_WRAPPERS')
OPTIM_WRAPPER_CONSTRUCTORS = _child('OPTIM_WRAPPER_CONSTRUCTORS')
PARAM_SCHEDULERS = _child('PARAM_SCHEDULERS')
DATASETS = _child('DATASETS')
DATA_SAMPLERS = _child('DATA_SAMPLERS')
TRANSFORMS = _child('TRANSFORMS')
MODELS = _child('MODELS', locations=['davit_ext.models'])
MODEL_WRAPPERS = _child('MODEL_WRAPPERS')
WEIGHT_INITIALIZERS = _child('WEIGHT_INITIALIZERS')
BATCH_AUGMENTS = _child('BATCH_AUGMENTS')
TASK_UTILS = _child('TASK_UTILS')
METRICS = _child('METRICS')
EVALUATORS = _child('EVALUATORS')
VISUALIZERS = _child('VISUALIZERS')
VISBACKENDS = _child('VISBACKENDS')
TOKENIZER = _child('TOKENIZER')

# mmpretrain has no function registry: ours is a child of mmengine's root
# one. It holds what configs name as functions (the FSDP wrap policy), and
# lets mmengine's FSDP wrapper find a ``davit_ext`` scope there.
FUNCTIONS = Registry(
    'function',
    parent=_root.FUNCTIONS,
    scope=SCOPE,
    locations=['davit_ext.engine'])
