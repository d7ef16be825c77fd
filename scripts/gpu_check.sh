#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU, torch with CUDA and no package index:
# installs the wheels that scripts/gpu_wheels.sh prepared under .whl/ into /tmp/gmeta-site
# (fbgemm-gpu joined from .whl/parts/ first), then runs benchmarks/gpu_check.py, which
# prints each figure as it is measured and one table at the end (exit status 1 on a FAIL).
#   bash scripts/gpu_check.sh [--quick] [--parts equal sync serve bench]
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${GMETA_SITE:-/tmp/gmeta-site}
if ! python3 -c 'import fbgemm_gpu, torchrec' 2>/dev/null; then
  mkdir -p "$SITE" .whl/big
  for first in .whl/parts/*.part-aa; do
    [ -e "$first" ] || break
    whl=.whl/big/$(basename "$first" .part-aa)
    [ -f "$whl" ] || cat "${first%aa}"* > "$whl"
  done
  # torchrec's wheel says py311 but is pure Python: unpacked, not installed
  wheels=()
  for w in .whl/py312/*.whl .whl/big/*.whl; do
    case "$w" in */torchrec-*) python3 -m zipfile -e "$w" "$SITE" ;; *) wheels+=("$w") ;; esac
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch, fbgemm_gpu, torchrec; print("gpu_check: torch", torch.__version__, "fbgemm_gpu", fbgemm_gpu.__version__, "cuda", torch.cuda.is_available())'
exec python3 -m benchmarks.gpu_check "$@"
