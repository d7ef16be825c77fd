#!/usr/bin/env bash
# Prepare, on a machine with a package index, what scripts/gpu_check.sh installs on a GPU
# machine without one: the CUDA stack of pyproject.toml [tool.gmeta.stacks.cuda] for
# Python 3.12 and what gmeta needs beside it, as wheels under .whl/ (git-ignored):
#   .whl/py312/   the small wheels (about 50 MB)
#   .whl/parts/   fbgemm-gpu's wheel (about 465 MB) split into 55 MB pieces, for transfers
#                 limited in size; gpu_check.sh joins them again
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${GMETA_GPU_PYTHON:-3.12}
read -r fbgemm torchrec < <(python3 -c 'import tomllib; s = tomllib.load(open("pyproject.toml", "rb"))["tool"]["gmeta"]["stacks"]["cuda"]; print(s["fbgemm"], s["torchrec"])')
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" "$@"; }
mkdir -p .whl/py312 .whl/big .whl/parts
# torchrec's and tensordict's own needs, and gmeta's that a bare torch machine lacks
get -d .whl/py312 "$torchrec" tensordict==0.15.3 "pyvers>=0.2,<0.3" cloudpickle pyre-extensions typing-inspect \
  mypy-extensions torchmetrics==1.0.3 lightning-utilities iopath portalocker pyyaml tqdm psutil scikit-learn scipy \
  joblib threadpoolctl narwhals
get -d .whl/big "$fbgemm"
rm -f .whl/parts/*
for w in .whl/big/*.whl; do split -b 55M "$w" ".whl/parts/$(basename "$w").part-"; done
ls -la .whl/py312 .whl/parts
