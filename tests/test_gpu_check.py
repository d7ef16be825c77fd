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
