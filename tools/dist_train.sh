#!/usr/bin/env bash
# Distributed training with torchrun: one process per GPU (per CPU worker on
# machines without CUDA, where tools/train.py switches to gloo by itself).
#
#   bash tools/dist_train.sh CONFIG GPUS [train.py options]
#
# Multi-node: run it on every node with the same MASTER_ADDR/PORT, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash tools/dist_train.sh CONFIG 8
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash tools/dist_train.sh CONFIG 8
set -e

. "$(dirname "$0")/launch_checks.sh"  # need_int

if [ $# -lt 2 ]; then
  echo "usage: bash $0 CONFIG GPUS [tools/train.py options]" >&2
  exit 2
fi
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
need_int GPUS "$GPUS" 1 " (processes on this node, e.g. bash tools/dist_train.sh CONFIG 2)"
need_int NNODES "$NNODES" 1 ""
need_int NODE_RANK "$NODE_RANK" 0 " (this node's index, 0..NNODES-1)"
need_int PORT "$PORT" 1 " (a free TCP port)"

# exec: a SIGTERM to this script (Kubernetes stops a pod so) reaches torchrun,
# which passes it on to the workers: they save a resumable checkpoint and stop
# (docs/train_test.md, "Faults").
PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
exec python "$(dirname "$0")/launch.py" \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$(dirname "$0")/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
