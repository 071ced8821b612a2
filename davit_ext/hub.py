"""Serve davit_ext's DaViT models through mmpretrain's model hub.

After ``import davit_ext``, mmpretrain's ``get_model``, ``inference_model``,
``list_models`` and ``ModelHub.get`` resolve

- ``davit-{tiny,small,base}_3rdparty_in1k`` (names mmpretrain also has) and
- ``davit-{tiny,small,base}_3rdparty_in1k-official`` (ours only)

to our metafile and configs, whose classifiers are built in the ``davit_ext``
scope, i.e. with our ``DaViT`` backbone. Every other name stays mmpretrain's.

How: mmpretrain reads its own model index lazily, on the first ``get`` or
``list_models``, and refuses names that are already registered. We therefore
never register before it: :func:`install` wraps that lazy step so that our
entries are added right after mmpretrain's (replacing its DaViT entries),
whichever of ``import mmpretrain`` / ``import davit_ext`` / ``list_models()``
ran first. ``ModelHub.get`` is wrapped too, to mark our configs' model with
``_scope_='davit_ext'``: ``get_model`` builds under the ``mmpretrain`` scope,
where ``type='DaViT'`` would be mmpretrain's backbone.

The model index itself is read by :mod:`davit_ext.weights.index`.
"""
from typing import Dict, List, Optional

from mmengine.config import Config
from mmpretrain.apis.model import ModelHub

from davit_ext.weights.index import load_models, mim_root

__all__ = [
    'SCOPE', 'install', 'uninstall', 'mim_root', 'model_names',
    'is_davit_ext_model', 'load_config'
]

SCOPE = 'davit_ext'

_added = False
# Why our model index could not be read (a broken install), if so.
_load_error: Optional[Exception] = None
# install(keep_mmpretrain_names=True): leave mmpretrain's own names alone.
_keep_mmpretrain_names = False
# mmpretrain's entries we replaced (restored by uninstall), and ours added.
_replaced: Dict[str, object] = {}
_our_entries: Dict[str, object] = {}


def model_names() -> List[str]:
    """Names of the models davit_ext serves, sorted."""
    return sorted(load_models())


def is_davit_ext_model(name: str) -> bool:
    """Whether ``name`` (any case) is one of davit_ext's models."""
    return name.lower() in load_models()


def _add_ours() -> None:
    """Put our entries into ``ModelHub`` (after mmpretrain's are there)."""
    global _added, _load_error
    if _added:
        return
    _added = True
    try:
        models = load_models()
    except FileNotFoundError as e:
        # Leave mmpretrain's hub working; our names raise this in ``get``.
        _load_error = e
        return
    for name, metainfo in models.items():
        # Replaces mmpretrain's entry of the same name, if any: mmpretrain
        # only checks for conflicts when it registers an index, which it has
        # done by now and does once.
        if name in ModelHub._models_dict:
            if _keep_mmpretrain_names:
                continue
            _replaced[name] = ModelHub._models_dict[name]
        ModelHub._models_dict[name] = metainfo
        _our_entries[name] = metainfo


def _scoped(config: Config) -> Config:
    """Build ``config.model`` in the config's scope (ours by default)."""
    model = config.get('model')
    if model is not None and '_scope_' not in model:
        model['_scope_'] = config.get('default_scope', SCOPE)
    return config


def load_config(path: str) -> Config:
    """``Config.fromfile(path)`` with the model marked for its own scope.

    Use it to hand one of our config files to ``get_model``, which builds under
    the ``mmpretrain`` scope otherwise.
    """
    return _scoped(Config.fromfile(path))


def install(keep_mmpretrain_names: bool = False) -> None:
    """Hook our models into mmpretrain's ``ModelHub``.

    Idempotent (the first call's ``keep_mmpretrain_names`` holds until
    :func:`uninstall`).

    Args:
        keep_mmpretrain_names (bool): Leave the names mmpretrain already has
            (``davit-*_3rdparty_in1k``) to mmpretrain's DaViT; only our other
            names (``-official``) are added. Defaults to False.
    """
    global _keep_mmpretrain_names
    register = ModelHub.__dict__['_register_mmpretrain_models'].__func__
    if getattr(register, '_davit_ext', False):
        return
    _keep_mmpretrain_names = keep_mmpretrain_names
    get = ModelHub.__dict__['get'].__func__

    def _register_mmpretrain_models(cls):
        register(cls)  # mmpretrain's own index, once
        _add_ours()

    def get_with_scope(cls, model_name):
        cls._register_mmpretrain_models()
        if _load_error is not None and \
                model_name.lower().startswith('davit'):
            raise _load_error
        metainfo = get(cls, model_name)
        if _load_error is None and \
                _our_entries.get(model_name.lower()) is \
                ModelHub._models_dict.get(model_name.lower()) and \
                isinstance(metainfo.config, Config):
            _scoped(metainfo.config)
        return metainfo

    _register_mmpretrain_models._davit_ext = True
    _register_mmpretrain_models._original = register
    get_with_scope._original = get
    _register_mmpretrain_models.__doc__ = register.__doc__
    get_with_scope.__doc__ = get.__doc__
    ModelHub._register_mmpretrain_models = classmethod(
        _register_mmpretrain_models)
    ModelHub.get = classmethod(get_with_scope)


def uninstall() -> None:
    """Give mmpretrain's ``ModelHub`` back as it was (undo :func:`install`).

    Our entries are removed and mmpretrain's DaViT entries restored.
    """
    global _added
    register = ModelHub.__dict__['_register_mmpretrain_models'].__func__
    if not getattr(register, '_davit_ext', False):
        return
    get = ModelHub.__dict__['get'].__func__
    ModelHub._register_mmpretrain_models = classmethod(register._original)
    ModelHub.get = classmethod(get._original)
    for name, metainfo in _our_entries.items():
        if ModelHub._models_dict.get(name) is metainfo:
            del ModelHub._models_dict[name]
    ModelHub._models_dict.update(_replaced)
    _our_entries.clear()
    _replaced.clear()
    _added = False
