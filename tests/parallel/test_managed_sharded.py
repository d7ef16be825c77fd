"""Managed-id tables on 2 CPU ranks over gloo: the replicated remapping equals one process
profiling every rank's ids in rank order; evicted rows reset on the rank that holds them;
checkpoints of 2 ranks load in 1 process and back with every id on the same embedding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from gmeta.config import load_config
from gmeta.io.reader import TaskReader
from gmeta.layout import layout_of
from gmeta.models.dlrm import build_model
from gmeta.models.managed import ManagedIds, _grow_history
from gmeta.parallel.dist import DenseGradSync
from gmeta.parallel.sharding import shard_model
from gmeta.training.step import train_step
from tests.parallel.test_distributed import _local_table_shards, _start_from_known_tables
from tests.support.multiprocess import run_ranks
from tests.support.reference import task_query_losses
from tests.test_managed_tables import MANAGED
from tests.test_managed_tables import managed_data as managed_data_fixture  # noqa: F401  (a fixture)

WORLD = 2
# ad_id of 9 slots: more ads than slots, so steps evict and ids miss
SMALL = ["model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]", "meta.tasks_per_batch=3",
         "meta.inner_steps=1", "meta.inner_lr=0.3", "meta.adapt_embeddings=false", "optim.embedding_optimizer=sgd",
         "optim.embedding_lr=0.5", "features.sparse.ad_id.num_embeddings=9"]
BUFFERS = ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping", "_mch_counts", "_mch_last_access_iter")


def _remapped(batch, ref: ManagedIds):
    """``batch`` with its managed ids replaced by the reference's slots (no layout: the
    reference builds its own from table rows)."""
    kjt = batch.sparse
    values, bounds, keys = kjt.values(), kjt.offset_per_key(), kjt.keys()
    segs = []
    for i, k in enumerate(keys):
        seg = values[bounds[i]: bounds[i + 1]]
        if k in ref.names:
            seg = ref.module_of(k).remap({k: JaggedTensor(values=seg, lengths=seg.new_tensor([seg.numel()]))})[k]
            seg = seg.values()
        segs.append(seg)
    out = KeyedJaggedTensor(keys=keys, values=torch.cat(segs), lengths=kjt.lengths(), stride=kjt.stride())
    return dataclasses.replace(batch, sparse=out, layout=None)


def _two_ranks_equal_one_process(rank, world, cfg_path, shards, sharding_type, ckpt_dir):
    from gmeta import checkpoint
    from gmeta.checkpoint import load_unsharded

    cfg = load_config(cfg_path, MANAGED + SMALL + [f"sharding.sharding_type={sharding_type}"])
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    features = model.module.features
    tables, dense_params, ref_head, ref_tables = _start_from_known_tables(model)
    ref = ManagedIds(features)  # one process: profiles rank 0's then rank 1's distinct ids
    opt = torch.optim.SGD(dense_params, lr=0.5)
    ref_opt = torch.optim.SGD(list(ref_head.parameters()), lr=0.5)
    sync = DenseGradSync(dense_params)
    iters = [iter(TaskReader(shards, "train", 3, rank=r, world_size=world, seed=5)) for r in range(world)]
    m = cfg.meta
    kw = dict(steps=m.inner_steps, lr=m.inner_lr, emb_lr=m.embedding_inner_lr, adapt_dense=m.adapt_dense,
              adapt_embeddings=m.adapt_embeddings, first_order=m.first_order)
    seen: dict[str, set[int]] = {n: set() for n in ref.names}
    evicted = 0
    for _ in range(2):
        batches = [next(it) for it in iters]
        out = train_step(model, batches[rank], cfg, sync, opt)
        with torch.no_grad():  # the reference's admission: every rank's distinct ids, in rank order
            for n in ref.names:
                ids = torch.cat([b.sparse[n].values().unique() for b in batches])
                seen[n] |= set(ids.tolist())
                mc = ref.module_of(n)
                _grow_history(mc, ids.numel())
                mc.profile({n: JaggedTensor(values=ids, lengths=ids.new_tensor([ids.numel()]))})
                slots = mc.evict()
                if slots is not None:
                    if n == "ad_id":
                        evicted += slots.numel()
                    ref_tables[n][slots] = ref_tables[n][ref.slots[n] - 1].clone()
        ref_opt.zero_grad()
        for t in ref_tables.values():
            t.grad = None
        parts = []  # (loss sum, weight) per rank's batch
        for b in batches:
            per_task = torch.stack(task_query_losses(ref_head, ref_tables, features, _remapped(b, ref), **kw))
            q = torch.diff(b.query_offsets).to(per_task.dtype) if m.query_weighting == "row" \
                else torch.ones_like(per_task)
            parts.append(((per_task * q).sum(), q.sum()))
        loss = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        mine = parts[rank][0] / parts[rank][1]  # what this rank's step returns
        loss.backward()
        ref_opt.step()
        with torch.no_grad():
            for t in ref_tables.values():
                t -= cfg.optim.embedding_lr * t.grad
        torch.testing.assert_close(out.loss.detach(), mine.detach(), rtol=0, atol=1e-5)
    assert evicted > 8  # the second step took slots from ids of the first
    for n in ref.names:
        for b in BUFFERS:
            assert torch.equal(getattr(model.module.managed.module_of(n), b), getattr(ref.module_of(n), b)), (n, b)
    for p, r in zip(dense_params, ref_head.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-5)
    for name, r0, c0, t in _local_table_shards(model):
        torch.testing.assert_close(t, ref_tables[name][r0: r0 + t.shape[0], c0: c0 + t.shape[1]].detach(),
                                   rtol=0, atol=1e-5)

    # the 2-rank checkpoint in one process: every id seen on the embedding the ranks trained
    checkpoint.save(model, cfg, ckpt_dir, {"id_hash": 2})
    one, _, _ = load_unsharded(ckpt_dir)
    for n in ref.names:
        ids = torch.tensor(sorted(seen[n]))
        slots = one.managed.module_of(n).remap({n: JaggedTensor(values=ids, lengths=ids.new_tensor([len(ids)]))})
        ref_slots = ref.module_of(n).remap({n: JaggedTensor(values=ids, lengths=ids.new_tensor([len(ids)]))})
        assert torch.equal(slots[n].values(), ref_slots[n].values())
        w = one.sparse_arch.ec.embeddings[f"t_{n}"].weight.detach()
        torch.testing.assert_close(w[slots[n].values()], ref_tables[n].detach()[ref_slots[n].values()],
                                   rtol=0, atol=1e-5)
    # ... and back into 2 ranks: the same rows for the same ids
    again, _, _ = checkpoint.load_sharded(ckpt_dir, torch.device("cpu"))
    layout = layout_of(batches[rank], model.module.pooling, 1)
    with torch.no_grad():
        torch.testing.assert_close(again.module.lookup(layout), one.lookup(layout), rtol=0, atol=0)
    dist.barrier()


@pytest.mark.parametrize("sharding_type", ["row_wise", "column_wise"])
def test_managed_tables_on_two_ranks_equal_one_process_and_reload_anywhere(
        debug_config_path, managed_data_fixture, sharding_type, tmp_path):  # noqa: F811  (the fixture)
    run_ranks(_two_ranks_equal_one_process, WORLD, str(debug_config_path), str(managed_data_fixture), sharding_type,
              str(tmp_path / "ckpt"))


def _reset_on_the_owning_rank(rank, world, cfg_path):
    cfg = load_config(cfg_path, MANAGED + ["optim.embedding_optimizer=rowwise_adagrad",
                                           "sharding.sharding_type=row_wise"])
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    ec = model.module.sparse_arch.ec
    state = ec.fused_optimizer.state_dict()["state"]
    moments = [s.tensor for v in state.values() for st in v.values() if hasattr(st, "local_shards")
               for s in st.local_shards()]
    assert moments
    for t in moments:
        t.fill_(1.0)
    miss = cfg.features.sparse[1].num_embeddings - 1
    full = {}
    for name, r0, _, t in _local_table_shards(model):
        if name == "ad_id":
            full[r0] = t
    miss_row = torch.zeros(cfg.model.embedding_dim)
    for r0, t in full.items():
        if r0 <= miss < r0 + t.shape[0]:
            miss_row = t[miss - r0].clone()
    dist.all_reduce(miss_row)
    model.module.managed.reset_rows(ec, {"ad_id": torch.tensor([3, 1500])})
    state = next(v for k, v in ec.fused_optimizer.state_dict()["state"].items()
                 if k.endswith("embeddings.t_ad_id.weight"))
    (mom,) = [s for st in state.values() for s in st.local_shards()]
    r0, n = mom.metadata.shard_offsets[0], mom.tensor.shape[0]
    for r0w, t in full.items():
        for row in (3, 1500):
            if r0w <= row < r0w + t.shape[0]:
                torch.testing.assert_close(t[row - r0w], miss_row)
    for row in (3, 1500, 4):
        if r0 <= row < r0 + n:
            assert float(mom.tensor[row - r0]) == (1.0 if row == 4 else 0.0)


def test_reset_rows_writes_the_miss_row_and_zeroes_the_state_on_the_owning_rank(debug_config_path):
    run_ranks(_reset_on_the_owning_rank, WORLD, str(debug_config_path))
