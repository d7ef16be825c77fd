#!/usr/bin/env bash
# The whole test suite: lint (ruff), type check (mypy), then pytest (unit, 2-process gloo, end-to-end CLI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check gmeta tests benchmarks scripts
mypy  # [tool.mypy] in pyproject.toml: wrong-argument calls in gmeta/ are errors
python -m pytest -q "$@"
