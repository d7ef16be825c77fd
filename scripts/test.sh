#!/usr/bin/env bash
# The whole test suite: lint (ruff), type check (mypy), then pytest (unit, 2-process gloo, end-to-end CLI).
#   bash scripts/test.sh [--all] [pytest arguments]
# --all also runs the tests marked slow (GMETA_SLOW=1), which repeat end to end what the default run proves.
# pytest runs in GMETA_TEST_WORKERS processes (pytest-xdist, default 2; 0: in this process alone), each
# taking whole test files (--dist loadfile: a module's fixtures are built once): most tests wait on one
# core (subprocess start, imports, a single-threaded step), so two workers nearly halve the wall time.
set -euo pipefail
if [ "${1:-}" = "--all" ]; then
  export GMETA_SLOW=1
  shift
fi
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check gmeta tests benchmarks scripts
mypy  # [tool.mypy] in pyproject.toml: wrong-argument calls in gmeta/ are errors
python -m pytest -q -n "${GMETA_TEST_WORKERS:-2}" --dist loadfile "$@"
