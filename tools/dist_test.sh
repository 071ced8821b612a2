#!/usr/bin/env bash
# Distributed testing with torchrun: one process per GPU (per CPU worker on
# machines without CUDA, where tools/test.py switches to gloo by itself).
#
#   bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py options]
#
# CHECKPOINT is a path or an http(s) URL. Multi-node: see tools/dist_train.sh.
set -e

. "$(dirname "$0")/launch_checks.sh"  # need_int

if [ $# -lt 3 ]; then
  echo "usage: bash $0 CONFIG CHECKPOINT GPUS [tools/test.py options]" >&2
  exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
need_int GPUS "$GPUS" 1 " (processes on this node, e.g. bash tools/dist_test.sh CONFIG CHECKPOINT 2)"
need_int NNODES "$NNODES" 1 ""
need_int NODE_RANK "$NODE_RANK" 0 " (this node's index, 0..NNODES-1)"
need_int PORT "$PORT" 1 " (a free TCP port)"

PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
python "$(dirname "$0")/launch.py" \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$(dirname "$0")/test.py" \
    "$CONFIG" \
    "$CHECKPOINT" \
    --launcher pytorch "${@:4}"
