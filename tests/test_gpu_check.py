"""benchmarks/gpu_check.py without a GPU: its bench part's contenders with the ``meta``
device standing in for CUDA (no operation mixing devices, nothing read back from the
device), its sync part fed batches whose layouts the reader built, and
scripts/gpu_check.sh on a machine without the wheels it installs."""

from __future__ import annotations

import pytest
import torch

from gmeta.config import load_config
from gmeta.io.reader import TaskReader
from tests.support.device_check import MixedDevices, WrongDevice, meta_stands_in_for_cuda

META = torch.device("meta")


def _batch(cfg, shards, n: int):
    return next(iter(TaskReader(shards, "train", n, seed=0, size_buckets=cfg.meta.size_buckets)))


def _spy_contenders(monkeypatch) -> list[tuple[set[str], set[str]]]:
    """Per ``step_fns`` call: (the contenders it returned, those that were run)."""
    from benchmarks import gpu_check

    real = gpu_check.step_fns
    calls: list[tuple[set[str], set[str]]] = []

    def spied(*args, **kwargs):
        fns = real(*args, **kwargs)
        ran: set[str] = set()
        calls.append((set(fns), ran))

        def wrap(k, fn):
            def go():
                ran.add(k)
                return fn()
            return go
        return {k: wrap(k, fn) for k, fn in fns.items()}

    monkeypatch.setattr(gpu_check, "step_fns", spied)
    return calls


@pytest.mark.parametrize("overrides", [[], ["meta.size_buckets=1", "meta.inner_steps=2"]])
def test_bench_contenders_keep_a_batch_on_its_device(debug_config_path, debug_data, monkeypatch, overrides):
    """The bench part's meta-step race on a device: every contender runs, no operation
    mixes a host tensor into the device's, and no value of the batch is read back."""
    from benchmarks import gpu_check

    cfg = load_config(debug_config_path, overrides)
    calls = _spy_contenders(monkeypatch)
    batch = _batch(cfg, debug_data["shards"], 6)
    with meta_stands_in_for_cuda(), MixedDevices():
        out = gpu_check._contenders("debug", cfg, batch, META, 1)
    assert len(calls) == 2  # second and first order
    for (names, ran), order in zip(calls, ("second", "first")):
        assert {"gmeta", "loop", "vmap", "erm"} <= names and ran == names  # every contender ran
        assert {f"{k}_tasks_per_s" for k in names} <= set(out[order])


def test_the_stand_in_catches_what_fails_on_a_gpu():
    """What the stand-in must refuse: a CPU index into a device tensor, a device tensor
    turned into numpy, a value computed on the device read back."""
    host = torch.arange(4.0)
    with meta_stands_in_for_cuda(), MixedDevices():
        dev = host.to(META)
        assert dev.cpu() is host  # a copy the host made: what a GPU would give back
        with pytest.raises(WrongDevice):
            dev.index_add(0, torch.tensor([0, 1]), torch.ones(2, device=META))
        with pytest.raises(TypeError, match="numpy"):
            dev.numpy()
        with pytest.raises(WrongDevice, match="read back"):
            (dev * 2).cpu()


def _sync_part_on_cpu(rank: int, world: int, shards, work) -> None:
    from benchmarks import gpu_check
    from gmeta.parallel.pipeline import SparseDistPipeline

    (work / "debug-shards").symlink_to(shards)
    started = []
    real = SparseDistPipeline.start

    def start(self, batch):
        lay = batch.layout
        started.append((lay.requested_buckets if lay is not None else None, self.size_buckets))
        return real(self, batch)

    SparseDistPipeline.start = start  # a spawned process of its own: nothing to restore
    gpu_check.part_sync(work, torch.device("cpu"))
    assert len(started) == 2 * 5  # two algorithms, 5 batches each
    assert all(built == wanted for built, wanted in started), started  # no layout rebuilt in the step
    verdicts = [r[3] for r in gpu_check.ROWS if r[0] == "sync" and "set_sync_debug_mode" in r[1]]
    assert verdicts == ["PASS", "PASS"]


def test_sync_part_reads_batches_with_the_configs_layouts(debug_config_path, debug_data, tmp_path):
    """The sync part times the pipeline on batches whose layouts the reader built for
    meta.size_buckets, as training's are: none rebuilt from the device's tensors."""
    from tests.support.multiprocess import run_ranks

    assert load_config(debug_config_path).meta.size_buckets > 1  # else a missing size_buckets goes unseen
    run_ranks(_sync_part_on_cpu, 1, debug_data["shards"], tmp_path)


CARRIED = ["fbgemm-gpu", "torchrec", "tensordict", "pyvers", "webdataset", "braceexpand", "iopath"]
# What gpu_check.sh finds importable (the GPU image's packages, and the carried ones not
# blocked): stand-ins that import at once, as the script tries each module in a python3 of
# its own and the real ones (sklearn, torchmetrics, torchrec) cost seconds apiece. Not numpy,
# which torch imports.
PRESENT = ["pandas", "pyarrow", "sklearn", "scipy", "yaml", "psutil", "tqdm", "fsspec", "cloudpickle",
           "torchmetrics", "pyre_extensions", "typing_inspect", "fbgemm_gpu", "torchrec", "tensordict", "pyvers",
           "webdataset", "braceexpand", "iopath"]


def _gpu_check_sh(tmp_path, blocked: list[str], whl: dict[str, bytes] | None = None):
    """scripts/gpu_check.sh in a copy of the repository's scripts, on a machine (this one,
    its torch real) where the modules ``blocked`` do not import and the others of PRESENT
    do, with the files ``whl`` under .whl/."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(root / "scripts" / "gpu_check.sh", repo / "scripts")
    for name, data in (whl or {}).items():
        (repo / ".whl" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / ".whl" / name).write_bytes(data)
    block = tmp_path / "block"
    for m in blocked:
        (block / m).mkdir(parents=True)
        (block / m / "__init__.py").write_text("raise ImportError('not on this machine')\n")
    for m in set(PRESENT) - set(blocked):
        (block / m).mkdir(parents=True)
        (block / m / "__init__.py").write_text("")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")  # this venv's, with torch
    (bindir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(block),
           "GMETA_SITE": str(tmp_path / "site")}
    return subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_check_sh_without_the_wheels_says_what_is_missing(tmp_path):
    p = _gpu_check_sh(tmp_path, ["fbgemm_gpu", "torchrec", "tensordict", "pyvers", "webdataset", "braceexpand",
                                 "iopath"])
    assert p.returncode == 2, p.stdout + p.stderr
    msg = p.stderr.strip()
    assert msg.startswith("gpu_check: this machine lacks fbgemm-gpu (its pieces .whl/parts/fbgemm_gpu-*.whl.part-*)")
    for d in CARRIED[1:]:
        assert f"{d} (.whl/py312/{d}-*.whl)" in msg
    assert "no wheel for it under .whl/" in msg and "bash scripts/gpu_wheels.sh) and copy .whl/ here" in msg
    assert "ERROR" not in p.stderr and "Traceback" not in p.stderr  # nothing ran pip
    assert not (tmp_path / "site").exists()


def test_gpu_check_sh_names_pieces_missing_or_broken(tmp_path):
    import hashlib

    name = "fbgemm_gpu-1.6.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    whole = b"0123456789" * 10
    files = {f"parts/{name}.pieces": b"3\n", f"parts/{name}.part-aa": whole[:40],
             f"parts/{name}.sha256": f"{hashlib.sha256(whole).hexdigest()}  {name}\n".encode()}
    p = _gpu_check_sh(tmp_path / "few", ["fbgemm_gpu"], files)
    assert p.returncode == 2 and f"gpu_check: {name}: 1 of 3 pieces in .whl/parts/" in p.stderr, p.stderr
    files.update({f"parts/{name}.part-ab": whole[40:80], f"parts/{name}.part-ac": whole[80:-1]})  # one byte short
    p = _gpu_check_sh(tmp_path / "short", ["fbgemm_gpu"], files)
    assert p.returncode == 2 and f"{name}: its pieces do not join into the wheel that was split" in p.stderr, p.stderr


def _gpu_wheels_sh(tmp_path, *args, **env):
    import os
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(root / "scripts" / "gpu_wheels.sh", repo / "scripts")
    shutil.copy(root / "pyproject.toml", repo)
    return subprocess.run(["bash", str(repo / "scripts" / "gpu_wheels.sh"), *args], cwd=tmp_path,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_gpu_wheels_sh_carries_what_the_image_lacks(tmp_path):
    p = _gpu_wheels_sh(tmp_path, "--list")
    assert p.returncode == 0, p.stderr
    listed = p.stdout.splitlines()
    names = {line.split("==")[0] for line in listed}
    assert names == set(CARRIED)  # what gpu_check.sh installs when missing
    assert "fbgemm-gpu==1.6.0 (CUDA 13 build, for torch 2.11.0+cu130, Python 3.12)" in listed
    assert "torchrec==1.6.1" in listed
    p = _gpu_wheels_sh(tmp_path / "cu126", "--list", GMETA_GPU_TORCH="2.11.0+cu126")
    assert "fbgemm-gpu==1.6.0 (CUDA 12 build, for torch 2.11.0+cu126, Python 3.12)" in p.stdout.splitlines()
    p = _gpu_wheels_sh(tmp_path / "other", "--list", GMETA_GPU_TORCH="2.13.0+cu130")
    assert p.returncode == 2 and "the cuda stack of pyproject.toml is for torch==2.11.0" in p.stderr


def test_gpu_wheels_sh_refuses_an_fbgemm_build_for_another_cuda(tmp_path):
    import zipfile

    whl = tmp_path / "fbgemm_gpu-1.6.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(whl, "w") as z:  # the NEEDED entry of a CUDA 12 build
        z.writestr("fbgemm_gpu/fbgemm_gpu_py.so", b"\x7fELF...libc10_cuda.so\x00libcudart.so.12\x00...")
    p = _gpu_wheels_sh(tmp_path, GMETA_FBGEMM_WHEEL=str(whl))
    assert p.returncode == 2, p.stdout + p.stderr
    assert (f"{whl.name} is built for CUDA 12 (its libcudart), torch 2.11.0+cu130 needs CUDA 13: download the "
            "cu130 build of fbgemm-gpu==1.6.0") in p.stderr
    assert not (tmp_path / "repo" / ".whl" / "parts" / f"{whl.name}.part-aa").exists()
