#!/usr/bin/env bash
# Create a virtual environment and install gmeta with one matched torch / fbgemm-gpu /
# torchrec set from pyproject.toml [tool.gmeta.stacks].
#   GMETA_STACK  cpu | cpu-2.11 | cuda   (default: cuda where nvidia-smi sees a GPU, else cpu)
#   GMETA_VENV   the environment's folder (default: .venv)
#   GMETA_WHEELS a folder of wheels to install from without a package index (offline machines)
# Idempotent: does nothing when pyproject.toml and the stack have not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GMETA_VENV:-.venv}
if [ -z "${GMETA_STACK:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GMETA_STACK=cuda; else GMETA_STACK=cpu; fi
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.gmeta-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $GMETA_STACK"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# the stack's three requirements, or an error naming the unknown stack
read -r torch_req fbgemm_req torchrec_req < <(python - "$GMETA_STACK" <<'PYEOF'
import sys, tomllib
stacks = tomllib.load(open("pyproject.toml", "rb"))["tool"]["gmeta"]["stacks"]
name = sys.argv[1]
if name not in stacks:
    sys.exit(f"setup: GMETA_STACK={name!r} is not a stack of pyproject.toml [tool.gmeta.stacks]: {sorted(stacks)}")
s = stacks[name]
print(s["torch"], s["fbgemm"], s["torchrec"])
PYEOF
)
echo "setup: installing gmeta with stack $GMETA_STACK ($torch_req $fbgemm_req $torchrec_req) into $VENV" >&2
pip_args=(-q)
if [ -n "${GMETA_WHEELS:-}" ]; then pip_args+=(--no-index --find-links "$GMETA_WHEELS"); fi
python -m pip install "${pip_args[@]}" --upgrade pip
python -m pip install "${pip_args[@]}" "$torch_req" "$fbgemm_req"
# gmeta and the rest of its dependencies (torch is already there: its range installs nothing)
python -m pip install "${pip_args[@]}" -e ".[dev]"
python -m pip install "${pip_args[@]}" --no-deps "$torchrec_req"
python -c 'import torch, torchrec, fbgemm_gpu; print("setup: torch", torch.__version__, "fbgemm_gpu", fbgemm_gpu.__version__, "torchrec", torchrec.__version__, "cuda", torch.cuda.is_available())' >&2
echo "$want" > "$stamp"
