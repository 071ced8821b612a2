"""The design rules of docs/architecture.md, checked: which layer may import
which, and one model build and one checkpoint read per tools/train.py start."""
import ast
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PACKAGE = osp.join(ROOT, 'davit_ext')

# What each part of davit_ext may import from davit_ext (besides itself).
# ``errors`` and ``registry`` are leaves: every layer may raise our
# exceptions and register modules; the backbone needs nothing else.
ALLOWED = {
    'errors': set(),
    'compat': set(),
    'registry': set(),
    'version': set(),
    'models': {'errors', 'registry'},
    'weights': {'errors', 'models'},
    'engine': {'errors', 'registry', 'models', 'weights'},
    'analysis': set(),
    'hub': {'weights'},
    'side_effects': {'analysis', 'hub', 'weights'},
    'cli': {'errors', 'registry', 'models', 'weights', 'engine', 'hub'},
}


def _part(path):
    rel = osp.relpath(path, PACKAGE)
    return rel.split(os.sep)[0].replace('.py', '')


def _imports(path):
    """davit_ext parts imported by one file (absolute and relative)."""
    part = _part(path)
    found = set()
    tree = ast.parse(open(path).read(), filename=path)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or '']
                if node.module == 'davit_ext':
                    names = [f'davit_ext.{a.name}' for a in node.names]
            else:
                pkg_dir = osp.dirname(path)
                for _ in range(node.level - 1):
                    pkg_dir = osp.dirname(pkg_dir)
                base = osp.relpath(pkg_dir, ROOT).replace(os.sep, '.')
                mod = f'{base}.{node.module}' if node.module else base
                names = [mod] if node.module else [
                    f'{mod}.{a.name}' for a in node.names
                ]
        for name in names:
            if name.startswith('davit_ext.'):
                other = name.split('.')[1]
                if other != part:
                    found.add(other)
    return found


def _sources():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py') and '.mim' not in folder:
                yield osp.join(folder, name)


def test_each_layer_imports_only_what_is_below_it():
    wrong = []
    for path in _sources():
        part = _part(path)
        if part == '__init__':
            continue  # the package wires the layers together
        assert part in ALLOWED, f'{path}: a new part, add it to ALLOWED'
        extra = _imports(path) - ALLOWED[part]
        if extra:
            wrong.append(f'{osp.relpath(path, ROOT)} imports {sorted(extra)}')
    assert wrong == []


def test_the_checker_sees_imports():
    """The rule above is not vacuous: it finds the imports that exist."""
    assert _imports(osp.join(PACKAGE, 'models',
                             'davit.py')) == {'errors', 'registry'}
    assert _imports(osp.join(PACKAGE, 'weights',
                             'fit.py')) == {'errors', 'models'}
    assert 'weights' in _imports(osp.join(PACKAGE, 'engine', 'hooks.py'))


def test_the_backbone_loads_no_io_code():
    """Imported without the package's wiring (davit_ext/__init__.py), the
    models load only the registry and the errors of davit_ext.

    (mmpretrain's multimodal models are switched off as davit_ext.compat does:
    next to mmdet and transformers 5 mmpretrain.models cannot import
    otherwise.)
    """
    code = f"""
import json, sys, types
from mmpretrain.utils import dependency
dependency.WITH_MULTIMODAL = False
package = types.ModuleType('davit_ext')
package.__path__ = [{PACKAGE!r}]
sys.modules['davit_ext'] = package
from davit_ext.models import DaViT
DaViT(arch='t')
print(json.dumps(sorted(m for m in sys.modules if m.startswith('davit_ext'))))
"""
    out = subprocess.run([sys.executable, '-c', code],
                         capture_output=True,
                         text=True,
                         check=True,
                         timeout=300).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert loaded == [
        'davit_ext', 'davit_ext.errors', 'davit_ext.models',
        'davit_ext.models.davit', 'davit_ext.models.fast_paths',
        'davit_ext.registry'
    ]


CONFIG = """
_base_ = [{base!r}]
model = dict(
    backbone=dict(arch=dict(embed_dims=16, num_heads=[1, 1, 2, 2]){init}),
    head=dict(num_classes=2, in_channels=128))
data_preprocessor = dict(num_classes=2)
train_dataloader = dict(batch_size=2, dataset=dict(data_root={data!r}))
val_dataloader = dict(batch_size=2, dataset=dict(data_root={data!r}))
test_dataloader = val_dataloader
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=True)]
train_cfg = dict(max_epochs=1, val_interval=1)
"""


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory, two_class_images):
    root = tmp_path_factory.mktemp('count')
    os.symlink(two_class_images, root / 'data')
    return root


@pytest.mark.parametrize('how', ['load_from', 'init_cfg'])
def test_a_start_builds_the_model_once_and_reads_the_checkpoint_once(
        how, call, tiny_data, monkeypatch):
    from mmengine.registry import init_default_scope

    from davit_ext.models.davit import DaViT
    from davit_ext.registry import MODELS
    base = osp.join(ROOT, 'configs', 'digits', 'davit-mini_1xb64_digits32.py')
    root = tiny_data
    init = ''
    if how == 'init_cfg':
        init = (", init_cfg=dict(type='Pretrained', checkpoint="
                f"{str(root / 'ck.pth')!r}, prefix='backbone.')")
    config = root / f'{how}.py'
    config.write_text(
        CONFIG.format(base=base, data=str(root / 'data'), init=init))
    # a checkpoint of the same model, another head (num_classes 3)
    init_default_scope('davit_ext')
    torch.manual_seed(0)
    donor = MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='DaViT',
                arch=dict(
                    embed_dims=16, depths=[1] * 4, num_heads=[1, 1, 2, 2]),
                window_size=4),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=3, in_channels=128)))
    torch.save({'state_dict': donor.state_dict()}, root / 'ck.pth')

    builds, reads = [], []
    init_orig = DaViT.__init__
    load_orig = torch.load

    def counting_init(self, *args, **kwargs):
        builds.append(1)
        init_orig(self, *args, **kwargs)

    def counting_load(f, *args, **kwargs):
        reads.append(str(f))
        return load_orig(f, *args, **kwargs)

    monkeypatch.setattr(DaViT, '__init__', counting_init)
    monkeypatch.setattr(torch, 'load', counting_load)
    argv = [str(config), '--work-dir', str(root / f'work_{how}')]
    if how == 'load_from':
        argv += ['--cfg-options', f'load_from={root / "ck.pth"}']
    code, out, err = call('train', *argv)
    assert code == 0, err
    assert len(builds) == 1
    assert reads == [str(root / 'ck.pth')]
    if how == 'load_from':  # the fit policy ran on that one read
        assert 'keep their initialisation' in out + err
    assert osp.isfile(root / f'work_{how}' / 'epoch_1.pth')
