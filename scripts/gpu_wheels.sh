#!/usr/bin/env bash
# Prepare, on a machine with a package index, what scripts/gpu_check.sh installs on a GPU
# machine without one: the CUDA stack of pyproject.toml [tool.gmeta.stacks.cuda] and what
# benchmarks/gpu_check.py needs beside it that the GPU image lacks, as Python 3.12 wheels
# under .whl/ (git-ignored):
#   .whl/py312/   the small wheels
#   .whl/parts/   fbgemm-gpu's wheel (about 465 MB) split into 55 MB pieces, for transfers
#                 limited in size, with its sha256 and piece count; gpu_check.sh joins them
#   .whl/TARGET, .whl/PYTHON   the torch build and the Python the wheels are for
# The image (torch 2.11.0+cu130, Python 3.12) has numpy, pandas, pyarrow, scikit-learn,
# scipy, pyyaml, psutil, tqdm, fsspec, cloudpickle, portalocker, torchmetrics,
# pyre-extensions and typing-inspect; it lacks fbgemm-gpu, torchrec, tensordict, webdataset
# and iopath (and mlflow, optuna, s3fs, which the check does not use: tracking off, local files).
#   bash scripts/gpu_wheels.sh          download and split
#   bash scripts/gpu_wheels.sh --list   print what would be downloaded, download nothing
# GMETA_GPU_TORCH: the GPU machine's torch.__version__ (default 2.11.0+cu130): the fbgemm-gpu
# wheel must be built for its CUDA. The package index's default fbgemm-gpu build is checked
# against it; another CUDA's build comes from PyTorch's own wheel index for that CUDA (point
# pip at it with PIP_INDEX_URL) or is given as a file: GMETA_FBGEMM_WHEEL=path.whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${GMETA_GPU_PYTHON:-3.12}
TORCH=${GMETA_GPU_TORCH:-2.11.0+cu130}
read -r torch_pin fbgemm torchrec < <(python3 -c 'import tomllib; s = tomllib.load(open("pyproject.toml", "rb"))["tool"]["gmeta"]["stacks"]["cuda"]; print(s["torch"], s["fbgemm"], s["torchrec"])')
if [ "${TORCH%%+*}" != "${torch_pin#torch==}" ] || [[ "$TORCH" != *+cu* ]]; then
  echo "gpu_wheels: GMETA_GPU_TORCH=$TORCH: the cuda stack of pyproject.toml is for $torch_pin with CUDA" \
       "(a version like ${torch_pin#torch==}+cu130); give the GPU machine's torch.__version__" >&2
  exit 2
fi
cuda=${TORCH##*+cu}
cuda_major=${cuda:0:${#cuda}-1}
# what the image lacks, pinned to versions tested with this stack (tensordict 0.15.3 needs torch >= 2.11)
small=("$torchrec" tensordict==0.15.3 pyvers==0.2.3 webdataset==1.0.2 braceexpand==0.1.7 iopath==0.1.10)
if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${small[@]}" "$fbgemm (CUDA $cuda_major build, for torch $TORCH, Python $PYV)"
  exit 0
fi
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" "$@"; }
rm -rf .whl/py312 .whl/big .whl/parts
mkdir -p .whl/py312 .whl/big .whl/parts
if [ -n "${GMETA_FBGEMM_WHEEL:-}" ]; then
  cp "$GMETA_FBGEMM_WHEEL" .whl/big/
else
  get -d .whl/big "$fbgemm"
fi
# fbgemm-gpu's libraries name the CUDA runtime they were linked against (libcudart.so.N)
built=$(python3 - .whl/big/*.whl <<'EOF'
import re, sys, zipfile
found = set()
for name in sys.argv[1:]:
    with zipfile.ZipFile(name) as z:
        for entry in z.namelist():
            if entry.endswith(".so"):
                found.update(re.findall(rb"libcudart\.so\.(\d+)", z.read(entry)))
print(",".join(sorted(v.decode() for v in found)) or "none")
EOF
)
if [ "$built" != "$cuda_major" ]; then
  echo "gpu_wheels: $(basename .whl/big/*.whl) is built for CUDA $built (its libcudart), torch $TORCH needs CUDA" \
       "$cuda_major: download the cu$cuda build of $fbgemm from PyTorch's wheel index for cu$cuda (PIP_INDEX_URL)," \
       "or give it as GMETA_FBGEMM_WHEEL=path.whl" >&2
  exit 2
fi
# iopath publishes a source archive only: built here into a (pure Python) wheel
get -d .whl/py312 "${small[@]:0:5}"
python3 -m pip wheel -q --no-deps -w .whl/py312 "${small[5]}"
for w in .whl/big/*.whl; do
  b=.whl/parts/$(basename "$w")
  split -b 55M "$w" "$b.part-"
  (cd .whl/big && sha256sum "$(basename "$w")") > "$b.sha256"
  ls "$b".part-* | wc -l > "$b.pieces"
done
rm -rf .whl/big
echo "$TORCH" > .whl/TARGET
echo "$PYV" > .whl/PYTHON
ls -la .whl/py312 .whl/parts
