#!/usr/bin/env bash
# Transfer demo (see tools/run_transfer_demo.py): pretrain the mini DaViT on
# the digits 0-4, fine-tune it on 10 images per digit 5-9, train the same
# model from scratch on the same images, and print both held-out top-1s.
set -euo pipefail
cd "$(dirname "$0")/.."
# Idle OpenMP threads sleep instead of spinning (busy 2-core machines).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
. tools/setup_env.sh
python tools/run_transfer_demo.py "$@"
