#!/usr/bin/env bash
# Set everything up (virtual environment, dependencies) and run the test suite.
set -euo pipefail
# Idle OpenMP threads sleep instead of spinning: spinning threads slow a busy
# 2-core machine down several times over.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
cd "$(dirname "$0")/.."
. tools/setup_env.sh
start=$(date +%s)
python -m pytest -q tests "$@"
echo "test suite wall time: $(( $(date +%s) - start )) s"
