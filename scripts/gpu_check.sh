#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU, torch with CUDA and no package index:
# installs into /tmp/gmeta-site the wheels scripts/gpu_wheels.sh prepared under .whl/ for
# what the machine lacks (fbgemm-gpu joined from .whl/parts/ first and checked against its
# sha256), then runs benchmarks/gpu_check.py, which prints each figure as it is measured and
# one table at the end (exit status 1 on a FAIL). Where something is missing and no wheel
# for it is here, it says what and how to get it (exit status 2) and installs nothing.
#   bash scripts/gpu_check.sh [--quick] [--parts equal sync serve bench]
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${GMETA_SITE:-/tmp/gmeta-site}
fail() { echo "gpu_check: $*" >&2; exit 2; }

# import name:distribution of what the check needs beyond torch; the image has the first
# group, gpu_wheels.sh carries the second (iopath needs portalocker, which the image has too)
image="numpy:numpy pandas:pandas pyarrow:pyarrow sklearn:scikit-learn scipy:scipy yaml:pyyaml psutil:psutil
  tqdm:tqdm fsspec:fsspec cloudpickle:cloudpickle torchmetrics:torchmetrics
  pyre_extensions:pyre-extensions typing_inspect:typing-inspect"
carried="fbgemm_gpu:fbgemm-gpu torchrec:torchrec tensordict:tensordict pyvers:pyvers webdataset:webdataset
  braceexpand:braceexpand iopath:iopath"
missing() {  # the entries of "$@" whose module does not import (each tried in a process of its own)
  for e in "$@"; do python3 -c "import ${e%%:*}" 2>/dev/null || echo "$e"; done
}

python3 -c 'import torch' 2>/dev/null || fail "python3 ($(command -v python3)) has no torch: run this on the GPU machine's Python, which holds torch with CUDA"
lacking=$(missing $image)
[ -z "$lacking" ] || fail "this machine lacks $(echo $lacking | sed 's/[a-z_]*://g') (not carried by" \
  "scripts/gpu_wheels.sh, which expects the GPU image's packages): install them, or add them to gpu_wheels.sh"
need=$(missing $carried)
if [ -n "$need" ]; then
  pyv=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  torch_v=$(python3 -c 'import torch; print(torch.__version__)')
  how="prepare them on a machine with a package index (GMETA_GPU_TORCH=$torch_v GMETA_GPU_PYTHON=$pyv bash"
  how="$how scripts/gpu_wheels.sh) and copy .whl/ here"
  if [ -f .whl/TARGET ] && [ "$(cat .whl/TARGET)" != "$torch_v" ]; then
    fail ".whl/ was prepared for torch $(cat .whl/TARGET), this machine has torch $torch_v: $how"
  fi
  absent=()
  for e in $need; do
    d=${e#*:}
    if [ "$d" = fbgemm-gpu ]; then
      # the pieces of the split wheel, all there and joined into the wheel that was split
      for pieces in .whl/parts/fbgemm_gpu-*.whl.pieces; do
        [ -e "$pieces" ] || { absent+=("$d (its pieces .whl/parts/fbgemm_gpu-*.whl.part-*)"); break; }
        whl=${pieces%.pieces}
        have=$(ls "$whl".part-* 2>/dev/null | wc -l)
        [ "$have" -eq "$(cat "$pieces")" ] || fail "$(basename "$whl"): $have of $(cat "$pieces") pieces in .whl/parts/;" \
          "copy the rest from the machine that ran scripts/gpu_wheels.sh"
        mkdir -p .whl/big
        cat "$whl".part-* > ".whl/big/$(basename "$whl")"
        (cd .whl/big && sha256sum --quiet -c "../parts/$(basename "$whl").sha256") \
          || fail "$(basename "$whl"): its pieces do not join into the wheel that was split (sha256); copy them again"
      done
    else
      name=${d//-/_}
      ls .whl/py312/"$name"-*.whl >/dev/null 2>&1 || absent+=("$d (.whl/py312/$name-*.whl)")
    fi
  done
  [ ${#absent[@]} -eq 0 ] || fail "this machine lacks $(IFS=,; echo "${absent[*]}" | sed 's/,/, /g'): no wheel" \
    "for it under .whl/; $how"
  made_for=$(cat .whl/PYTHON 2>/dev/null || echo 3.12)
  [ "$made_for" = "$pyv" ] || fail "python3 is $pyv, the wheels under .whl/ are for Python $made_for: $how"
  mkdir -p "$SITE"
  wheels=()
  for e in $need; do
    d=${e#*:}
    name=${d//-/_}
    if [ "$d" = fbgemm-gpu ]; then
      wheels+=(.whl/big/fbgemm_gpu-*.whl)
    elif [ "$d" = torchrec ]; then
      # torchrec's wheel says py311 but is pure Python: unpacked, not installed
      python3 -m zipfile -e .whl/py312/torchrec-*.whl "$SITE"
    else
      wheels+=(.whl/py312/"$name"-*.whl)
    fi
  done
  if [ ${#wheels[@]} -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  still=$(missing $carried)
  [ -z "$still" ] || fail "installed into $SITE, but $(echo $still | sed 's/[a-z_]*://g') still do not import"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch, fbgemm_gpu, torchrec; print("gpu_check: torch", torch.__version__, "fbgemm_gpu", fbgemm_gpu.__version__, "cuda", torch.cuda.is_available())'
exec python3 -m benchmarks.gpu_check "$@"
