#!/usr/bin/env bash
# Run the pre-commit hooks (flake8, isort, yapf, codespell, ...) on every
# file, as CI does; fails on any finding. Needs a venv with pre-commit (made by
# tools/setup_env.sh) and PyPI access the first time (hook environments).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v pre-commit >/dev/null 2>&1; then
  . tools/setup_env.sh
fi
pre-commit run --all-files --show-diff-on-failure
