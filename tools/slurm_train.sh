#!/usr/bin/env bash
# Training on a slurm cluster with srun (one task per GPU).
#
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#   bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG [WORK_DIR] [train.py options]
#
# e.g. GPUS=16 bash tools/slurm_train.sh gpu davit-t \
#          configs/davit/davit-tiny_4xb256_in1k.py work_dirs/davit-t
set -e

. "$(dirname "$0")/launch_checks.sh"  # need_int

if [ $# -lt 3 ]; then
  echo "usage: bash $0 PARTITION JOB_NAME CONFIG [WORK_DIR] [options]" >&2
  exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=${4:-"work_dirs/$(basename "${CONFIG%.*}")"}
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
need_int GPUS "$GPUS" 1 " (all processes, one per GPU, e.g. GPUS=16 bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG)"
need_int GPUS_PER_NODE "$GPUS_PER_NODE" 1 ""
need_int CPUS_PER_TASK "$CPUS_PER_TASK" 1 ""
set -x
PY_ARGS=${@:5}

PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
srun -p "${PARTITION}" \
    --job-name="${JOB_NAME}" \
    --gres=gpu:"${GPUS_PER_NODE}" \
    --ntasks="${GPUS}" \
    --ntasks-per-node="${GPUS_PER_NODE}" \
    --cpus-per-task="${CPUS_PER_TASK}" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    python -u "$(dirname "$0")/train.py" "${CONFIG}" \
    --work-dir="${WORK_DIR}" --launcher="slurm" ${PY_ARGS}
