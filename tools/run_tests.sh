#!/usr/bin/env bash
# Set everything up (virtual environment, dependencies) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/setup_env.sh
start=$(date +%s)
python -m pytest -q tests "$@"
echo "test suite wall time: $(( $(date +%s) - start )) s"
