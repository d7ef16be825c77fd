#!/usr/bin/env bash
# The whole test suite: lint, then pytest (unit, 2-process gloo, end-to-end CLI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check gmeta tests benchmarks
python -m pytest -q "$@"
