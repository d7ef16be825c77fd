"""The id generator trained alone (generator.mode base_fixed) on 2 CPU ranks equals one
process on the global batch, and leaves every table shard and the head untouched."""

from __future__ import annotations

import copy

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from gmeta.config import load_config
from gmeta.io.reader import TaskReader
from gmeta.layout import layout_of
from gmeta.meta.generator import generator_terms
from gmeta.models.dlrm import build_model, lookup_rows
from gmeta.parallel.dist import DenseGradSync, broadcast_params
from gmeta.parallel.sharding import shard_model
from gmeta.training.step import train_step
from tests.parallel.test_distributed import _local_table_shards
from tests.support.multiprocess import run_ranks

WORLD = 2


def _base_fixed_step_equals_reference(rank, world, cfg_path, shards):
    cfg = load_config(cfg_path, [
        "model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]", "meta.tasks_per_batch=3",
        "features.sparse.ad_id.min_count=1", "generator.feature=ad_id", "generator.attributes=[advertiser_id]",
        "generator.hidden=[3]", "generator.mode=base_fixed", "train.init_from=unused", "generator.cold_weight=0.3",
        "generator.warmup_lr=0.7", "optim.embedding_optimizer=sgd", "optim.embedding_lr=0.5"])
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    inner = model.module
    g = torch.Generator().manual_seed(3)
    known = torch.rand(2000, generator=g) < 0.5
    inner.set_known_ids({"ad_id": known})
    with torch.no_grad():
        for p in inner.generator.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    full = {f["name"]: torch.randn(f["num_embeddings"] + int(f["name"] == "ad_id"), 4, generator=g) * 0.3
            for f in inner.features}
    with torch.no_grad():  # known tables, written into this rank's shards
        for name, r0, c0, t in _local_table_shards(model):
            t.copy_(full[name][r0: r0 + t.shape[0], c0: c0 + t.shape[1]])
    # the default row, looked up by every rank together (generator.train_ids all starts every id from it)
    torch.testing.assert_close(inner.default_row(1), full["ad_id"][2000], rtol=0, atol=0)
    tables_before = [t.clone() for *_, t in _local_table_shards(model)]
    head_before = copy.deepcopy(inner.head.state_dict())
    dense_params = inner.dense_parameters()
    assert len(dense_params) == len(list(inner.generator.parameters()))  # the generator alone is trained
    broadcast_params(dense_params)
    ref_gen = copy.deepcopy(inner.generator)
    opt = torch.optim.SGD(dense_params, lr=0.5)
    ref_opt = torch.optim.SGD(ref_gen.parameters(), lr=0.5)
    sync = DenseGradSync(dense_params)
    readers = [TaskReader(shards, "train", 3, rank=r, world_size=world, seed=5) for r in range(world)]
    iters = [iter(r) for r in readers]
    for _ in range(2):
        batches = [next(it) for it in iters]
        train_step(model, batches[rank], cfg, sync, opt)
        ref_opt.zero_grad()
        cold, warm, s_total, q_total = 0.0, 0.0, 0, 0
        for b in batches:  # one process on the global batch: sums of row losses over all its rows
            layout = layout_of(b, inner.pooling, cfg.meta.size_buckets)
            per = inner.table_ids(layout).to_dict()
            emb = {n: JaggedTensor(values=full[n][per[n].values()], lengths=per[n].lengths()) for n in full}
            rows, new = ref_gen.generated_rows(lookup_rows(emb, inner.features), layout, known)
            t = generator_terms(inner.head, rows, new, b, layout, 1, warmup_lr=0.7, frozen_head=True)
            cold = cold + t["cold"] * b.num_support
            warm = warm + t["warm"] * b.num_query
            s_total, q_total = s_total + b.num_support, q_total + b.num_query
        (0.3 * cold / s_total + 0.7 * warm / q_total).backward()
        ref_opt.step()
    for p, r in zip(inner.generator.parameters(), ref_gen.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-5)
    assert not torch.equal(inner.generator.mlp[-1].weight, torch.zeros_like(inner.generator.mlp[-1].weight))
    after = [t for *_, t in _local_table_shards(model)]
    assert len(after) == len(tables_before) > 0
    for t, before in zip(after, tables_before):
        assert torch.equal(t, before)
    for k, v in inner.head.state_dict().items():
        assert torch.equal(v, head_before[k]), k


def test_base_fixed_generator_step_on_two_ranks_equals_one_process(debug_config_path, debug_data):
    run_ranks(_base_fixed_step_equals_reference, WORLD, str(debug_config_path), str(debug_data["shards"]))
