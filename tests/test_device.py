"""Device-correctness without a GPU: the dense part of gmeta (head, Meta-SGD rates, the
batch and its layout, the meta step, its backward, the cross-rank agreement) placed on the
``meta`` device, every operation checked for an operand left on another device."""

from __future__ import annotations

import pytest
import torch

from gmeta.config import load_config
from gmeta.io.reader import TaskReader
from gmeta.layout import layout_of
from gmeta.models.dlrm import build_model
from gmeta.training.step import agree_across_ranks, meta_step
from tests.support.device_check import DeviceCheck, WrongDevice

META = torch.device("meta")


def _batch(cfg, shards):
    reader = TaskReader(shards, "train", cfg.meta.tasks_per_batch, seed=0, size_buckets=cfg.meta.size_buckets)
    return next(iter(reader))


def _step_on(device, cfg, batch, move_batch=True):
    model = build_model(cfg)  # head initialised on the host, as training does before sharding
    model.dense_to(device)
    for name, p in model.named_parameters():
        if not name.startswith("sparse_arch."):
            assert p.device == device, name
    b = batch.to(device) if move_batch else batch
    layout = layout_of(batch, model.pooling, cfg.meta.size_buckets)
    rows = torch.randn(layout.num_unique, cfg.model.embedding_dim, device=device, requires_grad=True)
    check = DeviceCheck(device)
    with check:
        out = meta_step(model, b, cfg, rows)
        agree_across_ranks(out.loss, out.terms)  # on the device, read nothing back
        out.loss.backward()
    return check, model


@pytest.mark.parametrize("overrides", [
    ["meta.algorithm=maml", "meta.first_order=false"],
    ["meta.algorithm=maml", "meta.first_order=true", "meta.size_buckets=2"],
    ["meta.algorithm=maml", "meta.fast_weights=implicit"],
    ["meta.algorithm=maml", "meta.fast_weights=materialized", "meta.meta_sgd=true"],
    ["meta.algorithm=erm"],
    ["meta.algorithm=reptile", "meta.dense_adaptation=bias"],
    ["meta.algorithm=maml", "meta.dense_adaptation=film", "meta.meta_sgd=true", "meta.adapt_features=[ad_id]"],
])
def test_meta_step_and_backward_stay_on_the_model_device(debug_config_path, debug_data, overrides):
    cfg = load_config(debug_config_path, overrides)
    check, model = _step_on(META, cfg, _batch(cfg, debug_data["shards"]))
    assert not check.wrong  # (the check raises at the first wrong operand)
    grads = [p.grad for n, p in model.named_parameters() if not n.startswith("sparse_arch.")]
    if "meta.algorithm=reptile" in overrides:  # only what adapts moves (here: the biases)
        grads = [g for g in grads if g is not None]
    assert grads and all(g is not None and g.device == META for g in grads)


def test_the_check_catches_a_batch_left_on_the_host(debug_config_path, debug_data):
    cfg = load_config(debug_config_path, ["meta.algorithm=maml"])
    with pytest.raises(WrongDevice, match="expected meta"):
        _step_on(META, cfg, _batch(cfg, debug_data["shards"]), move_batch=False)


class FakeCuda:
    """torch.cuda as a machine with ``count`` GPUs shows it, recording on which GPUs a CUDA
    context is made: by ``set_device``, or on the runtime's default GPU 0 by the first call
    that needs a current device (``current_device``) before any ``set_device``."""

    def __init__(self, monkeypatch, count: int) -> None:
        self.count, self.current, self.contexts = count, None, []
        for name in ("is_available", "device_count", "set_device", "current_device"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def _context(self, index: int) -> None:
        if index not in self.contexts:
            self.contexts.append(index)

    def set_device(self, device) -> None:
        index = device if isinstance(device, int) else torch.device(device).index
        assert 0 <= index < self.count, index
        self.current = index
        self._context(index)

    def current_device(self) -> int:
        if self.current is None:
            self.current = 0
            self._context(0)
        return self.current


class _Stop(Exception):
    pass


@pytest.mark.parametrize("gang", [0, 4])
def test_a_predict_worker_touches_only_its_own_gpu(monkeypatch, gang):
    """Worker slot 6 of a node of 4 workers (node 1's third) on a machine of 4 GPUs: GPU 2
    is made current before any CUDA call, and its models load there; no context on GPU 0."""
    import json

    import gmeta.checkpoint
    import gmeta.inference.workers as workers

    cuda = FakeCuda(monkeypatch, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    spec = {"checkpoints": ["ckpt"], "input": "in", "inner_steps": None, "has_role": True, "gang": gang,
            "gang_timeout_s": 10}
    errors: dict = {}

    class Store:
        def get(self, key):
            return json.dumps(spec).encode()

        def set(self, key, value):
            errors[key] = json.loads(value)

    loaded_on: list = []

    def load(path, device):
        loaded_on.append((device, torch.cuda.current_device()))
        raise _Stop

    def init_group(backend, **kw):
        loaded_on.append(("group", backend, kw["rank"], kw["world_size"]))

    monkeypatch.setattr(workers, "TCPStore", lambda *a, **k: Store())
    monkeypatch.setattr(workers, "load_unsharded", load)
    monkeypatch.setattr(gmeta.checkpoint, "load_sharded", load)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_group)
    monkeypatch.setattr(torch.distributed, "PrefixStore", lambda prefix, store: store)
    assert workers.worker_main("127.0.0.1", 1, 6, 0) == 1
    assert errors["error/6"]["kind"] == "_Stop"  # stopped where the models load
    assert cuda.contexts == [2]
    want = [("group", "nccl", 2, 4)] if gang else []
    assert loaded_on == [*want, (torch.device("cuda", 2), 2)]


def test_predict_workers_load_the_models_not_the_launcher(debug_checkpoint, debug_data, tmp_path, monkeypatch):
    """With worker processes (``--shard-tables`` or not) the launcher reads the checkpoints'
    configs only: it loads no model (a whole one would not fit where the tables are sharded)
    and makes no CUDA context; the workers are started."""
    import pandas as pd

    import gmeta.inference.predict_raw as predict_raw

    cuda = FakeCuda(monkeypatch, 2)
    raw = pd.read_parquet(debug_data["raw"])
    src = tmp_path / "logs"
    src.mkdir()
    raw[raw["campaign_id"].isin(sorted(raw["campaign_id"].unique())[:5])].to_parquet(src / "a.parquet")

    def no_load(*a, **k):
        raise AssertionError("a model loaded in the launcher")

    started: list = []

    def coordinator(spec, *a, **k):
        started.append(spec)
        raise _Stop

    monkeypatch.setattr(predict_raw, "load_unsharded", no_load)
    monkeypatch.setattr(predict_raw, "Coordinator", coordinator)
    for shard_tables in (False, True):
        with pytest.raises(_Stop):
            predict_raw.run_predict_raw(debug_checkpoint, src, tmp_path / f"out-{shard_tables}", nproc=2,
                                        shard_tables=shard_tables, progress=False)
    assert [s["gang"] for s in started] == [0, 2]
    assert cuda.contexts == []


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_planner_takes_the_memory_there_is(debug_config_path, monkeypatch, device):
    """Sharding on a GPU of 141 GiB plans the tables against 141 GiB of GPU memory, not
    torchrec's default 32 GiB; on the CPU against the host's memory shared by the node's
    processes, not torchrec's default 128 GiB."""
    import types

    import psutil

    import gmeta.parallel.sharding as sharding

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(total_memory=141 * gib, index=torch.device(d).index))
    monkeypatch.setattr(sharding.dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(sharding.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    topologies = []

    def planner(topology, **kw):
        topologies.append(topology)
        raise _Stop

    monkeypatch.setattr(sharding, "EmbeddingShardingPlanner", planner)
    cfg = load_config(debug_config_path)
    with pytest.raises(_Stop):
        sharding.shard_model(build_model(cfg, device=META), cfg, torch.device(device, 1 if device == "cuda" else None))
    storage = [d.storage for d in topologies[0].devices]
    assert len(storage) == 2
    host = psutil.virtual_memory().total // 2
    if device == "cuda":
        assert all(s.hbm == 141 * gib and s.ddr == host for s in storage)
    else:
        assert all(s.hbm == 0 and s.ddr == host for s in storage)


def test_a_plan_says_which_gpu_memory_it_assumed(debug_config_path, monkeypatch):
    import types

    from gmeta.parallel.sharding import format_plan, plan_report

    cfg = load_config(debug_config_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = plan_report(cfg, 2, 2, "cuda", 256)
    assert r["hbm_cap_mib"] == 32 * 1024 and r["hbm_cap_from"] == "torchrec's default: no GPU here"
    assert "32.0 GiB of GPU memory per rank (torchrec's default: no GPU here)" in format_plan(r)
    FakeCuda(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=80 * 2**30))
    r = plan_report(cfg, 2, 2, "cuda", 256)
    assert r["hbm_cap_mib"] == 80 * 1024 and r["hbm_cap_from"] == "this machine's GPU"
