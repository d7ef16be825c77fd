"""The pipelined trainer equals the plain one step for step, and a meta-batch costs exactly
one embedding all-to-all forward and one backward, with no communication in the inner loop."""

from __future__ import annotations

import collections

import torch
import torch.distributed as dist

from gmeta.config import load_config
from gmeta.io.reader import TaskReader
from gmeta.meta.maml import maml_loss
from gmeta.models.dlrm import build_model
from gmeta.parallel.dist import DenseGradSync, broadcast_params
from gmeta.parallel.pipeline import SparseDistPipeline
from gmeta.parallel.sharding import shard_model
from gmeta.training.step import run_steps
from tests.parallel.test_distributed import _full_tables, _local_table_shards
from tests.support.multiprocess import run_ranks

WORLD = 2
OVERRIDES = ["model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]", "meta.tasks_per_batch=4",
             "optim.embedding_optimizer=rowwise_adagrad"]


def _model(cfg):
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    tables = _full_tables(model.module.features, cfg.model.embedding_dim)
    with torch.no_grad():
        for name, r0, c0, t in _local_table_shards(model):
            t.copy_(tables[name][r0: r0 + t.shape[0], c0: c0 + t.shape[1]])
    params = model.module.dense_parameters()
    broadcast_params(params)
    return model, params


def _train(cfg, shards, rank, world, pipelined: bool, steps: int):
    model, params = _model(cfg)
    sync = DenseGradSync(params)
    opt = torch.optim.Adam(params, lr=1e-2)
    it = iter(TaskReader(shards, "train", cfg.meta.tasks_per_batch, rank=rank, world_size=world, seed=2))
    pipe = SparseDistPipeline(model.module) if pipelined else None
    losses = [out.query_loss.detach().clone() for _, out in
              run_steps(model, cfg, sync, opt, lambda: next(it, None), steps, pipe)]
    state = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "local_shards"):  # a sharded table: this rank's shards only
            state[k] = torch.cat([s.tensor.reshape(-1) for s in v.local_shards()]) if v.local_shards() else None
        else:
            state[k] = v.clone()
    return losses, state


def _pipelined_equals_plain(rank, world, cfg_path, shards):
    cfg = load_config(cfg_path, OVERRIDES)
    plain, s_plain = _train(cfg, shards, rank, world, False, 5)
    piped, s_piped = _train(cfg, shards, rank, world, True, 5)
    assert len(plain) == len(piped) == 5
    for a, b in zip(plain, piped):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for k in s_plain:
        if s_plain[k] is not None:
            torch.testing.assert_close(s_plain[k], s_piped[k], rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(plain[0], plain[-1])  # it did train


def test_pipelined_run_equals_plain_run_step_for_step(debug_config_path, debug_data):
    run_ranks(_pipelined_equals_plain, WORLD, str(debug_config_path), str(debug_data["shards"]))


_COLLECTIVES = ("all_to_all_single", "all_to_all", "all_reduce", "all_gather", "all_gather_into_tensor",
                "reduce_scatter_tensor", "broadcast", "barrier", "reduce_scatter")


def _count_collectives() -> collections.Counter:
    calls: collections.Counter = collections.Counter()
    for mod, prefix in ((dist, ""), (dist._functional_collectives, "functional.")):
        for name in _COLLECTIVES:
            orig = getattr(mod, name, None)
            if orig is None:
                continue

            def wrapper(*args, _orig=orig, _key=prefix + name, **kwargs):
                calls[_key] += 1
                return _orig(*args, **kwargs)

            setattr(mod, name, wrapper)
    return calls


def _collective_counts(rank, world, cfg_path, shards):
    cfg = load_config(cfg_path, OVERRIDES + ["meta.inner_steps=3", "meta.first_order=false"])
    model, params = _model(cfg)
    sync = DenseGradSync(params, bucket_bytes=1024)
    opt = torch.optim.Adam(params, lr=1e-2)
    batches = list(TaskReader(shards, "train", 4, rank=rank, world_size=world, seed=2))[:4]
    calls = _count_collectives()
    inner = model.module

    # reference: one plain lookup forward, then one backward, of the sparse arch alone
    lk = inner.lookup(batches[0].layout)
    fwd = dict(calls)
    calls.clear()
    lk.sum().backward()
    bwd = dict(calls)
    calls.clear()
    assert fwd.get("all_to_all_single", 0) > 0 and bwd.get("all_to_all_single", 0) > 0

    # one meta-batch, piece by piece
    m = cfg.meta
    lk = inner.lookup(batches[1].layout)
    assert dict(calls) == fwd, ("lookup", dict(calls), fwd)
    calls.clear()
    out = maml_loss(inner.head, lk, batches[1], batches[1].layout, steps=m.inner_steps,
                    lr=m.inner_lr, emb_lr=m.embedding_inner_lr, adapt_dense=m.adapt_dense,
                    adapt_embeddings=m.adapt_embeddings, first_order=m.first_order)
    assert sum(calls.values()) == 0, ("inner loop + query forward must not communicate", dict(calls))
    out.loss.backward()
    during = calls["all_reduce"]
    sync.wait()
    assert during >= 1  # dense all-reduce buckets started inside backward
    assert calls["all_reduce"] == len(sync.buckets)
    calls["all_reduce"] = 0
    assert {k: v for k, v in calls.items() if v} == bwd, ("backward", dict(calls), bwd)
    opt.step()
    opt.zero_grad()
    calls.clear()

    # pipelined steps: per step exactly one lookup's and one backward's all-to-alls
    it = iter(batches[2:])
    pipe = SparseDistPipeline(inner)
    n = sum(1 for _ in run_steps(model, cfg, sync, opt, lambda: next(it, None), 2, pipe))
    assert n == 2
    assert calls["all_to_all_single"] == 2 * (fwd["all_to_all_single"] + bwd["all_to_all_single"])
    # per step: the dense buckets, and one flag saying whether the loss is finite on every rank
    assert calls["all_reduce"] == 2 * (len(sync.buckets) + 1)
    others = {k: v for k, v in calls.items() if v and k not in ("all_to_all_single", "all_reduce")}
    assert not others, others


def test_collective_counts_per_meta_batch(debug_config_path, debug_data):
    run_ranks(_collective_counts, WORLD, str(debug_config_path), str(debug_data["shards"]))
