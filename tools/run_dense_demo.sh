#!/usr/bin/env bash
# Offline dense-prediction demo (see tools/run_dense_demo.py): a mini DaViT
# trained from scratch on synthetic shapes with mmdet's and mmseg's own
# train.py/test.py (Mask R-CNN and UperNet), untrained vs trained metrics,
# stage times and prediction pictures. About 10 minutes on 2 CPU cores.
#
#   bash tools/run_dense_demo.sh [WORK_DIR]    (default work_dirs/dense_demo)
#
# Needs the detection/segmentation stack in the active Python (or in .venv):
# DAVIT_EXT_DENSE=1 . tools/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine
# spinning threads slow training down several times over.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  . .venv/bin/activate
fi
start=$(date +%s)
status=0
python tools/run_dense_demo.py "$@" || status=$?
echo "total wall time: $(( $(date +%s) - start )) s"
exit $status
