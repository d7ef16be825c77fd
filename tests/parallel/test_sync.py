"""A training step reads nothing back from the device, and a non-finite step changes nothing."""

from __future__ import annotations

import pytest
import torch

from gmeta.config import load_config
from gmeta.io.reader import TaskReader
from gmeta.models.dlrm import build_model
from gmeta.parallel.dist import DenseGradSync, broadcast_params
from gmeta.parallel.pipeline import SparseDistPipeline
from gmeta.parallel.sharding import shard_model
from gmeta.train import run_steps
from tests.support.multiprocess import run_ranks
from tests.support.sync_counter import SyncCounter

OVERRIDES = ["model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]", "meta.tasks_per_batch=4",
             "meta.size_buckets=2"]


def _setup(cfg):
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    params = model.module.dense_parameters()
    broadcast_params(params)
    return model, params, DenseGradSync(params), torch.optim.Adam(params, lr=1e-2, fused=True)


def _count_syncs(rank, world, cfg_path, shards, overrides):
    cfg = load_config(cfg_path, OVERRIDES + overrides)
    model, params, sync, opt = _setup(cfg)
    it = iter(TaskReader(shards, "train", cfg.meta.tasks_per_batch, rank=rank, world_size=world, seed=2,
                         size_buckets=cfg.meta.size_buckets))
    steps = run_steps(model, cfg, sync, opt, lambda: next(it, None), 3, SparseDistPipeline(model.module, 2))
    next(steps)  # warm-up: fbgemm copies its feature dims to the host once
    with SyncCounter() as c:
        outs = [out for _, out in steps]
    assert len(outs) == 2
    assert not c.syncs, "\n".join(f"{call} at {where}: {line}" for call, where, line in c.syncs)
    # what remains is torchrec reading the id all-to-all's split sizes, one batch ahead
    assert all(call == "tolist" and "torchrec" in where for call, where, _ in c.input_dist), c.input_dist
    # and the probe sees a real read-back when there is one
    with SyncCounter() as probe:
        float(outs[-1].loss)
    assert len(probe.syncs) == 1


@pytest.mark.parametrize("overrides", [["meta.first_order=false", "meta.inner_steps=2"],
                                       ["meta.algorithm=erm"], ["meta.meta_sgd=true", "meta.first_order=true"]])
def test_training_steps_read_nothing_back_from_the_device(debug_config_path, debug_data, overrides):
    """Two ranks, the pipelined trainer: lookup (id and embedding all-to-alls), inner loop,
    query loss, backward with the fused table update, dense all-reduce and Adam."""
    run_ranks(_count_syncs, 2, debug_config_path, debug_data["shards"], overrides)


def _nan_step_changes_nothing(rank, world, cfg_path, shards):
    import gmeta.train as train

    cfg = load_config(cfg_path, OVERRIDES)
    model, params, sync, opt = _setup(cfg)
    batches = iter(TaskReader(shards, "train", cfg.meta.tasks_per_batch, rank=rank, world_size=world, seed=2,
                              size_buckets=cfg.meta.size_buckets))
    train.train_step(model, next(batches), cfg, sync, opt)  # a real step first: optimizer state exists

    def local(t):
        """A plain copy of a tensor, or of this rank's shards of a ShardedTensor."""
        if hasattr(t, "local_shards"):
            return torch.cat([s.tensor.detach().reshape(-1) for s in t.local_shards()]) if t.local_shards() \
                else torch.zeros(0)
        return t.detach().clone()

    def snapshot():
        fused = model.fused_optimizer.state_dict()["state"]
        return ({k: local(v) for k, v in model.state_dict().items() if hasattr(v, "shape")},
                {k: {n: local(t) for n, t in s.items() if hasattr(t, "shape")} for k, s in fused.items()},
                {i: {n: local(t) for n, t in s.items()} for i, s in opt.state_dict()["state"].items()})

    before = snapshot()
    real = train.meta_step
    bad_rank = 1  # the loss is NaN on one rank only: no rank may update

    def nan_on_one_rank(*a, **kw):
        out = real(*a, **kw)
        if rank == bad_rank:
            out.loss = out.loss * float("nan")
        return out

    train.meta_step = nan_on_one_rank
    try:
        out = train.train_step(model, next(batches), cfg, sync, opt)
    finally:
        train.meta_step = real
    assert bool(out.skipped)
    after = snapshot()
    for a, b in zip(before, after):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], dict):
                for n in a[k]:
                    assert torch.equal(a[k][n], b[k][n]), (k, n)
            else:
                assert torch.equal(a[k], b[k]), k
    out = train.train_step(model, next(batches), cfg, sync, opt)  # and training goes on
    assert not bool(out.skipped)
    moved = snapshot()[0]
    assert any(not torch.equal(v, after[0][k]) for k, v in moved.items())


def test_nonfinite_step_leaves_tables_weights_and_optimizer_state_unchanged(debug_config_path, debug_data):
    run_ranks(_nan_step_changes_nothing, 2, debug_config_path, debug_data["shards"])
