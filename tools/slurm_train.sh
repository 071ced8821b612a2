#!/usr/bin/env bash
# Training on a slurm cluster with srun (one task per GPU).
#
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#   bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG [WORK_DIR] [train.py options]
#
# e.g. GPUS=16 bash tools/slurm_train.sh gpu davit-t \
#          configs/davit/davit-tiny_4xb256_in1k.py work_dirs/davit-t
#
# Preemption and time limits. On SIGTERM (what slurm sends a preempted or
# cancelled job, KillWait/GraceTime seconds before SIGKILL) or SIGUSR1, every
# task finishes its iteration, a resumable checkpoint is saved
# (WORK_DIR/preempt_iter_N.pth, last_checkpoint points at it) and the tasks
# exit with status 75; `--resume` continues exactly there, and starts afresh
# when WORK_DIR has no checkpoint yet, so a requeued job can always pass it:
#
#   # in an sbatch script:
#   #SBATCH --requeue                  # preemption may requeue the job
#   #SBATCH --signal=USR1@120          # USR1 to the tasks 120 s before the
#                                      # time limit (srun: SRUN_ARGS=--signal=..)
#   bash tools/slurm_train.sh PARTITION JOB CONFIG WORK_DIR --resume
#   [ $? -eq 75 ] && scontrol requeue "$SLURM_JOB_ID"   # time limit: go again
#
# (or let slurm requeue on that status: RequeueExit=75 in slurm.conf). Other
# statuses: 2 bad input or an unreadable image, 3 a non-finite loss, 74 a
# checkpoint that could not be written (docs/train_test.md, "Faults").
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
