"""Set-up of davit_ext: DaViT for mmpretrain in its own registry scope."""
import os
import os.path as osp
import shutil
import sys
import sysconfig
from importlib import metadata
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = osp.dirname(osp.abspath(__file__))
# Configs and the metafile are data of the package (like mmpretrain's .mim
# folder) so that the model hub finds them in a wheel install too.
MIM_FILES = ['configs', 'model-index.yml', 'tools']


def read_version() -> str:
    scope = {}
    with open(osp.join(HERE, 'davit_ext', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def has_full_mmcv() -> bool:
    """True if a full (compiled) ``mmcv`` distribution is installed.

    mmcv and mmcv-lite both provide the ``mmcv`` module: requiring mmcv-lite
    next to a user's full mmcv would overwrite it, so we only ask for mmcv-lite
    when no full mmcv is there. pip builds in an isolated environment unless
    told otherwise, where the import path has none of the installed
    packages: the site-packages of the interpreter that runs this (the one
    pip installs into) are searched too.
    """
    try:
        metadata.version('mmcv')
        return True
    except metadata.PackageNotFoundError:
        pass
    paths = {sysconfig.get_paths()[key] for key in ('purelib', 'platlib')}
    return any((dist.metadata['Name'] or '').lower() == 'mmcv'
               for dist in metadata.distributions(path=sorted(paths)))


def requirements():
    reqs = [
        # torch >= 2.6: safe weights_only loading (CVE-2025-32434).
        'torch>=2.6',
        'torchvision',
        'mmengine>=0.10.7,<1.0',
        'mmpretrain>=1.2.0,<2.0',
        # Florence-2 towers (florence2://): Hugging Face's cache, offline
        # mode and revisions.
        'huggingface_hub>=0.34',
        # mmengine 0.10.7 imports pkg_resources (to resolve mmpretrain::
        # bases, among others), which setuptools >= 81 no longer ships.
        'setuptools<81',
    ]
    reqs.append(
        'mmcv>=2.0.0,<2.3.0' if has_full_mmcv() else 'mmcv-lite>=2.0.0,<2.3.0')
    return reqs


class BuildWithMim(build_py):
    """Copy configs/, tools/ and model-index.yml into davit_ext/.mim."""

    def run(self):
        super().run()
        dst_root = osp.join(self.build_lib, 'davit_ext', '.mim')
        for name in MIM_FILES:
            src = osp.join(HERE, name)
            if not osp.exists(src):
                continue
            dst = osp.join(dst_root, name)
            if osp.isdir(dst):
                shutil.rmtree(dst)
            os.makedirs(dst_root, exist_ok=True)
            if osp.isdir(src):
                shutil.copytree(
                    src, dst, ignore=shutil.ignore_patterns('__pycache__'))
            else:
                shutil.copyfile(src, dst)


def link_mim_for_develop():
    """Editable installs: point davit_ext/.mim/* at the source folders.

    Links are made for every entry of MIM_FILES, even one that does not exist
    yet, so files added after the install are found too (davit_ext.hub also
    falls back to the source tree). A copied folder left by an earlier non-
    editable build is replaced by a link.
    """
    mim = osp.join(HERE, 'davit_ext', '.mim')
    os.makedirs(mim, exist_ok=True)
    for name in MIM_FILES:
        src, dst = osp.join(HERE, name), osp.join(mim, name)
        if osp.islink(dst):
            continue
        if osp.isdir(dst):
            shutil.rmtree(dst)
        elif osp.lexists(dst):
            os.remove(dst)
        os.symlink(osp.relpath(src, mim), dst)


if 'develop' in sys.argv or 'editable_wheel' in sys.argv:
    link_mim_for_develop()

setup(
    name='davit_ext',
    version=read_version(),
    description='DaViT (Dual Attention Vision Transformers) for mmpretrain',
    long_description=open(osp.join(HERE, 'README.md')).read() if osp.exists(
        osp.join(HERE, 'README.md')) else '',
    long_description_content_type='text/markdown',
    keywords='computer vision, image classification, DaViT, mmpretrain',
    packages=find_packages(exclude=('configs', 'tools', 'tests', 'demo')),
    include_package_data=True,
    package_data={'davit_ext': ['.mim/**/*', '.mim/*']},
    cmdclass={'build_py': BuildWithMim},
    python_requires='>=3.8',
    install_requires=requirements(),
    extras_require={
        'tests': [
            'pytest',
            'timm>=1.0',
            'scikit-learn',
            'onnx',
            'onnxruntime',
            'onnxscript',
            'openvino',
            'nncf',
            'pre-commit',
            'safetensors',
            'peft',
            # Oracle of Florence-2's transformers-native layout (its own
            # Florence2 model, since 4.56).
            'transformers>=4.56'
        ],
        # .safetensors checkpoints (e.g. Florence-2's model.safetensors).
        'safetensors': ['safetensors'],
        # tools/deployment/pytorch2onnx.py (onnxruntime: --verify) and
        # pytorch2openvino.py, quantize_openvino.py (nncf: static int8)
        'deploy': ['onnx', 'onnxscript', 'onnxruntime', 'openvino', 'nncf'],
        # Detection and segmentation (configs/det, configs/seg). Both need
        # mmcv < 2.2 with its compiled ops, which PyPI has as source only:
        # install it first with tools/install_mmcv.sh.
        'det': ['mmdet==3.3.0', 'pycocotools', 'shapely', 'terminaltables'],
        'seg': ['mmsegmentation==1.2.2', 'ftfy', 'regex', 'prettytable'],
        # DeepSpeedStrategy configs (docs/large_models.md). mmengine 0.10.7
        # imports deepspeed.runtime.fp16.onebit, gone from deepspeed 0.19.7.
        'deepspeed': ['deepspeed>=0.13.2,<0.19.7'],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'License :: OSI Approved :: Apache Software License',
        'Operating System :: OS Independent',
    ],
    license='Apache License 2.0',
    zip_safe=False,
)
