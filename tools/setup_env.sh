# Source this file (". tools/setup_env.sh"): it makes sure a virtual environment
# is active (creating .venv when none is), then installs davit_ext and its test
# extras into it. Idempotent: a second run only checks what is there.
# With DAVIT_EXT_DENSE=1 it also installs the detection/segmentation stack:
# compiled mmcv 2.1.0 (tools/install_mmcv.sh; the wheel we know for torch
# 2.14.1 / CPython 3.11, where ../shared/wheels has it, saves the 11-minute
# build), mmdet and mmsegmentation.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv || return 1
  fi
  . .venv/bin/activate
fi
# torchvision's wheel must match torch's exactly; this pair works on CPU-only
# machines (see README). Installed only when the venv has no working pair.
if ! python -c "import torch, torchvision.ops" >/dev/null 2>&1; then
  python -m pip install -q torch==2.14.1 torchvision==0.29.1 || return 1
fi
# Compiled mmcv goes in before davit_ext: setup.py asks for mmcv-lite only
# where no full mmcv is installed, and the two share one `mmcv` folder.
extras=tests
if [ "${DAVIT_EXT_DENSE:-0}" = 1 ]; then
  bash tools/install_mmcv.sh \
    --prefer-wheel ../shared/wheels/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl \
    || return 1
  extras=tests,det,seg
fi
# mmengine 0.10.7 imports pkg_resources, which setuptools >= 81 no longer
# has (torch 2.14 asks for >= 77.0.3): pinned in the same resolve.
python -m pip install -q -e ".[$extras]" "setuptools>=77.0.3,<81" || return 1
if [ "${DAVIT_EXT_DENSE:-0}" = 1 ]; then
  python -c "import davit_ext, mmcv.ops, mmdet.models, mmseg.models" || {
    echo "setup_env: the dense-prediction stack does not import (above);" \
      "rerun 'bash tools/install_mmcv.sh'" >&2
    return 1
  }
fi
