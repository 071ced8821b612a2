#!/usr/bin/env bash
# The README's first command: set up a fresh clone, then run the offline demo
# (see tools/run_demo.py): published params/FLOPs of the three DaViT configs,
# then a small DaViT trained, tested and used for inference on
# scikit-learn's handwritten digits. Prints the held-out top-1 and wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine
# spinning threads slow training down several times over.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
start=$(date +%s)
. tools/setup_env.sh
echo "set-up: $(( $(date +%s) - start )) s"
status=0
python tools/run_demo.py "$@" || status=$?
echo "total wall time (set-up included): $(( $(date +%s) - start )) s"
exit $status
