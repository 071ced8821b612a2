#!/usr/bin/env bash
# Wheel-install check: build davit_ext's wheel from a clean copy of this work
# tree, install it into a fresh virtual environment (no system site-packages,
# nothing of the source tree on the path) and check from a folder outside the
# source tree that the packaged configs, model index and tools work:
# mmpretrain's list_models/get_model/inference_model serve our DaViT by name
# (with a local random-weights checkpoint, head included, whose predictions
# must equal those of mmpretrain's own DaViT and, in official mode, timm's),
# other mmpretrain names still build, and the converter tool runs from the
# installed package.
#
#   bash tools/check_wheel_install.sh [--keep]
#
# --keep leaves the work folder (source copy, wheel, venv) for inspection.
# Environment: WHEEL_CHECK_DIR (work folder, default: a new temp dir),
# PYTHON (interpreter for the venv, default: python3). Needs PyPI (or a
# mirror) for the wheel's dependencies.
set -euo pipefail
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1
SRC_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WHEEL_CHECK_DIR:-$(mktemp -d -t davit_ext_wheel.XXXXXX)}"
PY="${PYTHON:-python3}"
start=$(date +%s)
cleanup() { [ "$KEEP" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT
step() { echo "[check_wheel_install $(( $(date +%s) - start ))s] $*"; }

mkdir -p "$WORK/src" "$WORK/dist" "$WORK/run"
step "copying the work tree (tracked + untracked, not ignored) to $WORK/src"
if git -C "$SRC_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$SRC_ROOT" && git ls-files -co --exclude-standard -z |
    while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
  (cd "$SRC_ROOT" && tar --exclude=./.venv --exclude=./build \
    --exclude=./dist --exclude='*.egg-info' --exclude=./davit_ext/.mim \
    -cf - .) | tar -xf - -C "$WORK/src"
fi

# Nothing of the source tree (or of a developer's PYTHONPATH) on the path.
unset PYTHONPATH
step "creating a fresh venv"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# The CPU pair the project pins (see tools/setup_env.sh).
"$VPY" -m pip install -qq torch==2.14.1 torchvision==0.29.1

step "building the wheel"
"$VPY" -m pip wheel -qq --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/davit_ext-*.whl)"
step "installing $(basename "$WHEEL")"
"$VPY" -m pip install -qq "$WHEEL"
# timm: the oracle of the official forward (a test extra, not a dependency).
"$VPY" -m pip install -qq "timm>=1.0"
rm -rf "$WORK/src"  # nothing of the source may be used from here on

step "checking from $WORK/run"
cd "$WORK/run"
SRC_ROOT="$SRC_ROOT" WHEEL="$WHEEL" TORCH_HOME="$WORK/torch_home" \
  "$VPY" - <<'PYEOF'
import os
import os.path as osp
import subprocess
import sys
import zipfile

import cv2
import numpy as np
import torch

names = sorted([f'davit-{a}_3rdparty_in1k{s}'
                for a in ('tiny', 'small', 'base') for s in ('', '-official')]
               + [f'davit-{a}-fl_florence2-pre_3rdparty'
                  for a in ('base', 'huge')])

# 1. The wheel holds the model index, metafile, configs and tools.
members = set(zipfile.ZipFile(os.environ['WHEEL']).namelist())
needed = ['davit_ext/.mim/model-index.yml',
          'davit_ext/.mim/configs/davit/metafile.yml',
          'davit_ext/.mim/configs/_base_/default_runtime.py',
          'davit_ext/.mim/tools/model_converters/davit_to_mmpretrain.py',
          'davit_ext/.mim/tools/deployment/pytorch2onnx.py',
          'davit_ext/hub.py', 'davit_ext/weights/layouts.py']
needed += [f'davit_ext/.mim/configs/davit/davit-{a}_4xb256_in1k{s}.py'
           for a in ('tiny', 'small', 'base') for s in ('', '-official')]
missing = [m for m in needed if m not in members]
assert not missing, f'the wheel lacks {missing}'
assert not any('__pycache__' in m for m in members), 'pycache in the wheel'

# 2. The package is the installed one, not the source tree.
import davit_ext  # noqa: E402
from davit_ext import hub  # noqa: E402
pkg = osp.dirname(davit_ext.__file__)
assert 'site-packages' in pkg and not pkg.startswith(os.environ['SRC_ROOT'])
assert hub.mim_root() == osp.join(pkg, '.mim'), hub.mim_root()

# 3. The hub: our names, our backbone, mmpretrain's others.
from mmpretrain import get_model, inference_model, list_models  # noqa: E402
from davit_ext.models.davit import DaViT  # noqa: E402
assert list_models('davit') == names, list_models('davit')
tiny = get_model('davit-tiny_3rdparty_in1k')
official = get_model('davit-tiny_3rdparty_in1k-official')
assert type(tiny.backbone) is DaViT and not tiny.backbone.official
assert type(official.backbone) is DaViT and official.backbone.official
resnet = get_model('resnet18_8xb32_in1k')
assert type(resnet.backbone).__name__ == 'ResNet'

# 4. Inference by name with a local checkpoint of random weights (a non-zero
# head): the same predictions as mmpretrain's own DaViT (its shipped config)
# and, for the official forward, timm's on the same input.
import mmpretrain  # noqa: E402
import timm  # noqa: E402
from mmpretrain.apis import ImageClassificationInferencer  # noqa: E402
from davit_ext.weights.layouts import mmpretrain_to_timm  # noqa: E402
torch.manual_seed(0)
state = tiny.state_dict()
state['head.fc.weight'] = torch.randn(1000, 768) * 0.05
state['head.fc.bias'] = torch.randn(1000) * 0.5
torch.save({'state_dict': state, 'meta': {}}, 'ckpt.pth')
cv2.imwrite('img.png', np.random.default_rng(0).integers(
    0, 255, (120, 160, 3), dtype=np.uint8))
mm_cfg = osp.join(osp.dirname(mmpretrain.__file__), '.mim', 'configs',
                  'davit', 'davit-tiny_4xb256_in1k.py')
ref = ImageClassificationInferencer(mm_cfg, pretrained='ckpt.pth',
                                    device='cpu')
assert type(ref.model.backbone).__module__.startswith('mmpretrain.')
inputs = []
ref.model.backbone.register_forward_pre_hook(
    lambda m, a: inputs.append(a[0].detach().clone()))
expected = {'standard': torch.as_tensor(ref('img.png')[0]['pred_scores'])}
peer = timm.create_model('davit_tiny').eval()
peer.load_state_dict(mmpretrain_to_timm(state), strict=True)
with torch.no_grad():
    expected['official'] = peer(inputs[0]).softmax(-1)[0]
assert (expected['standard'] - expected['official']).abs().max() > 1e-3
for name in ('davit-tiny_3rdparty_in1k', 'davit-tiny_3rdparty_in1k-official'):
    r = inference_model(name, 'img.png', pretrained='ckpt.pth', device='cpu')
    want = expected['official' if name.endswith('official') else 'standard']
    diff = (torch.as_tensor(r['pred_scores']) - want).abs().max().item()
    assert r['pred_label'] == int(want.argmax()), (name, r['pred_label'])
    assert diff < 1e-5, (name, diff)
    print(f'{name}: label {r["pred_label"]} as the oracle, '
          f'max |score diff| {diff:.1e}')

# 5. A packaged tool runs from the installed package.
tool = osp.join(pkg, '.mim', 'tools', 'model_converters',
                'davit_to_mmpretrain.py')
subprocess.run([sys.executable, tool, 'ckpt.pth', 'timm.pth', '--to',
                'timm'], check=True, stdout=subprocess.DEVNULL)
assert 'stem.conv.weight' in torch.load('timm.pth', weights_only=True)
print('wheel check: all good')
PYEOF
step "OK"
