#!/usr/bin/env bash
# Create .venv and install gmeta with its pinned dependencies (CPU build of torch).
# Idempotent: does nothing when pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.gmeta-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing gmeta and its dependencies into .venv" >&2
python -m pip install -q --upgrade pip
# gmeta with the pins of pyproject.toml (torch, fbgemm-gpu-cpu, pyarrow, mlflow, ...)
python -m pip install -q -e ".[dev]"
# torchrec without its dependencies: its metadata asks for the CUDA build of fbgemm-gpu,
# which breaks a CPU torch. The pin lives in pyproject.toml [tool.gmeta].no_deps.
nodeps=$(python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml","rb"))["tool"]["gmeta"]["no_deps"]))')
# shellcheck disable=SC2086
python -m pip install -q --no-deps $nodeps
python -c 'import torch, torchrec, fbgemm_gpu; print("setup: torch", torch.__version__, "torchrec", torchrec.__version__)' >&2
echo "$want" > "$stamp"
