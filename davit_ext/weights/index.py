"""davit_ext's model index (``model-index.yml`` and the metafiles it names).

Read once, lazily: names, configs (absolute paths), weights URLs and the
``SHA256`` metadata that downloads are checked against. The index and configs
are package data: ``davit_ext/.mim`` in a wheel (see setup.py), or the source
tree of an editable install.
"""
import os.path as osp
from typing import Dict, List, Optional, Tuple

__all__ = ['MODEL_INDEX', 'mim_root', 'load_models', 'sha256_of_weights']

MODEL_INDEX = 'model-index.yml'
_PACKAGE_DIR = osp.dirname(osp.dirname(osp.abspath(__file__)))
# Our metainfo by lower-case name, filled on first use.
_models: Optional[Dict[str, object]] = None


def mim_root() -> str:
    """The folder holding ``model-index.yml`` and ``configs/``."""
    candidates = [osp.join(_PACKAGE_DIR, '.mim'), osp.dirname(_PACKAGE_DIR)]
    for root in candidates:
        if osp.isfile(osp.join(root, MODEL_INDEX)) and \
                osp.isdir(osp.join(root, 'configs')):
            return root
    raise FileNotFoundError(
        f'davit_ext cannot find its {MODEL_INDEX} and configs/ (looked in '
        f'{" and ".join(candidates)}). The package was installed without its '
        'data: reinstall it with "pip install davit_ext-*.whl" or, from a '
        'source checkout, "pip install -e .".')


def load_models() -> Dict[str, object]:
    """Our model index by lower-case name; config paths made absolute."""
    global _models
    if _models is None:
        from modelindex.load_model_index import load
        root = mim_root()
        index = load(osp.join(root, MODEL_INDEX))
        index.build_models_with_collections()
        models = {}
        for metainfo in index.models:
            if metainfo.config is not None and not osp.isabs(metainfo.config):
                metainfo.config = osp.join(root, metainfo.config)
            models[metainfo.name.lower()] = metainfo
        _models = models
    return _models


def model_names() -> List[str]:
    return sorted(load_models())


def sha256_of_weights(url: str) -> Optional[Tuple[str, str]]:
    """``(SHA256, origin)`` of the index entry whose ``Weights`` is ``url``."""
    try:
        models = load_models()
    except (ImportError, OSError):  # no model index: no hash from it
        return None
    for metainfo in models.values():
        if metainfo.weights != url or metainfo.metadata is None:
            continue
        data = getattr(metainfo.metadata, 'data', None)
        sha = data.get('SHA256') if isinstance(data, dict) else None
        if sha:
            return (str(sha).lower(),
                    f"davit_ext's model index ({metainfo.name})")
    return None
