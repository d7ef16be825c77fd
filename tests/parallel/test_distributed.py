"""2 CPU ranks over gloo against a single-process reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from gmeta.config import load_config
from gmeta.io.dynamic import DynamicTaskReader
from gmeta.io.reader import TaskReader
from gmeta.models.dlrm import build_model
from gmeta.parallel.dist import DenseGradSync, broadcast_params
from gmeta.parallel.sharding import shard_model
from gmeta.training.step import train_step
from tests.support.multiprocess import run_ranks
from tests.support.reference import erm_row_losses, reptile_directions, task_query_losses

WORLD = 2


def _local_table_shards(dmp):
    """(feature name, row offset, col offset, local tensor) for every shard on this rank."""
    for key, value in dmp.state_dict().items():
        if not key.startswith("sparse_arch.ec.embeddings."):
            continue
        name = key.split(".")[3][len("t_"):]
        for shard in value.local_shards():
            r0, c0 = shard.metadata.shard_offsets
            yield name, r0, c0, shard.tensor


def _full_tables(features, dim, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {f["name"]: torch.randn(f["num_embeddings"], dim, generator=g) * 0.3 for f in features}


def _start_from_known_tables(model):
    """Write known tables into this rank's shards and rank 0's dense weights into every rank;
    return (full tables, dense parameters, a copy of the head and leaf copies of the tables
    for a single-process reference)."""
    tables = _full_tables(model.module.features, 4)
    with torch.no_grad():  # known initial tables, written into this rank's shards
        for name, r0, c0, t in _local_table_shards(model):
            t.copy_(tables[name][r0: r0 + t.shape[0], c0: c0 + t.shape[1]])
    dense_params = list(model.module.head.parameters())
    broadcast_params(dense_params)
    ref_tables = {k: v.clone().requires_grad_() for k, v in tables.items()}
    for f in model.module.features:  # a feature sharing a table reads (and trains) the owner's
        if f.get("table"):
            tables[f["name"]], ref_tables[f["name"]] = tables[f["table"]], ref_tables[f["table"]]
    return tables, dense_params, copy.deepcopy(model.module.head), ref_tables


def _plan_types(model) -> dict[str, str]:
    return {name[len("t_"):]: ps.sharding_type for module in model.plan.plan.values()
            for name, ps in module.items()}


def _maml_step_equals_reference(rank, world, cfg_path, shards, first_order, sharding_type, extra=(),
                                expect_plan=None, algorithm="maml", pads=(), sizes=(3, 3)):
    """``pads``: (step, rank) pairs where that rank has no data left and trains a pad
    (dynamic sharding's end of an epoch); the reference steps on the other ranks' batches.
    ``sizes``: each rank's tasks per batch (train.adaptive_batch's unequal shares)."""
    cfg = load_config(cfg_path, [
        "model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]", "meta.tasks_per_batch=3",
        "meta.inner_steps=2", "meta.inner_lr=0.3", "meta.embedding_inner_lr=0.6", f"meta.first_order={first_order}",
        "optim.embedding_optimizer=sgd", "optim.embedding_lr=0.5", f"sharding.sharding_type={sharding_type}",
        f"meta.algorithm={algorithm}", *extra])
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    if expect_plan:
        plan = _plan_types(model)
        assert {k: plan[k] for k in expect_plan} == expect_plan, plan
    features = model.module.features
    tables, dense_params, ref_head, ref_tables = _start_from_known_tables(model)
    lr_dense = 0.5
    opt = torch.optim.SGD(dense_params, lr=lr_dense)
    sync = DenseGradSync(dense_params, bucket_bytes=256)  # several buckets
    ref_opt = torch.optim.SGD(list(ref_head.parameters()), lr=lr_dense)
    readers = [TaskReader(shards, "train", sizes[r], rank=r, world_size=world, seed=5) for r in range(world)]
    iters = [iter(r) for r in readers]
    m = cfg.meta
    kw = dict(steps=m.inner_steps, lr=m.inner_lr, emb_lr=m.embedding_inner_lr, adapt_dense=m.adapt_dense,
              adapt_embeddings=m.adapt_embeddings, first_order=m.first_order)
    adagrad_state: dict[str, torch.Tensor] = {}
    pad = DynamicTaskReader(shards, "train", 3, nonce="unused", rank=rank, world_size=world, seed=5).pad_batch()
    for step in range(2):
        batches = [next(it) for it in iters]
        train_step(model, pad if (step, rank) in pads else batches[rank], cfg, sync, opt, pad=(step, rank) in pads)
        batches = [b for r, b in enumerate(batches) if (step, r) not in pads]
        ref_opt.zero_grad()
        for t in ref_tables.values():
            t.grad = None
        if algorithm == "erm":  # reference: the mean over every row of the global batch
            assert len(batches) < world or batches[0].num_rows != batches[1].num_rows  # else a per-rank mean passes
            torch.cat([erm_row_losses(ref_head, ref_tables, features, b) for b in batches]).mean().backward()
        elif algorithm == "reptile":  # reference: the mean over every task of the global batch of (shared - adapted)
            dirs = [(reptile_directions(ref_head, ref_tables, features, b, steps=m.inner_steps, lr=m.inner_lr,
                                        emb_lr=m.embedding_inner_lr, adapt_dense=m.adapt_dense,
                                        adapt_embeddings=m.adapt_embeddings), b.num_tasks) for b in batches]
            total = sum(n for _, n in dirs)
            named = dict(ref_head.named_parameters()) | ref_tables
            for name, p in named.items():
                p.grad = sum(d[name] * n for d, n in dirs) / total
        else:  # reference: one process, every task of every rank, real per-task fast weights
            losses, q_rows = [], []
            for b in batches:
                losses += task_query_losses(ref_head, ref_tables, features, b, **kw)
                q_rows += torch.diff(b.query_offsets).tolist()
            per_task = torch.stack(losses)
            if m.query_weighting == "row":  # every query row of the global batch counts once
                q = torch.tensor(q_rows, dtype=per_task.dtype)
                loss = (per_task * q).sum() / q.sum()
            else:
                loss = per_task.mean()
            if m.erm_weight:  # plus the unadapted loss over every row of the global batch
                loss = loss + m.erm_weight * torch.cat([erm_row_losses(ref_head, ref_tables, features, b)
                                                        for b in batches]).mean()
            loss.backward()
        ref_opt.step()
        with torch.no_grad():
            owners = {f["name"] for f in features if not f.get("table")}  # each table once
            for name, t in ((n, t) for n, t in ref_tables.items() if n in owners):
                if cfg.optim.embedding_optimizer == "sgd":
                    t -= cfg.optim.embedding_lr * t.grad
                    continue
                # row-wise Adagrad with an L2 penalty on the rows the global batch looks up (and
                # only those: fbgemm's penalty is lazy), whatever their gradient
                assert cfg.optim.embedding_optimizer == "rowwise_adagrad"
                touched = torch.zeros(t.shape[0], dtype=torch.bool)
                for b in batches:
                    touched[b.sparse.to_dict()[name].values()] = True
                g = t.grad + cfg.optim.embedding_weight_decay * t * touched[:, None]
                state = adagrad_state.setdefault(name, torch.zeros(t.shape[0]))
                state += (g * g).mean(1)
                t -= cfg.optim.embedding_lr * g / (state.sqrt()[:, None] + 1e-8) * touched[:, None]
    for p, r in zip(dense_params, ref_head.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-5)
    moved = 0.0
    for name, r0, c0, t in _local_table_shards(model):
        ref = ref_tables[name][r0: r0 + t.shape[0], c0: c0 + t.shape[1]].detach()
        torch.testing.assert_close(t, ref, rtol=0, atol=1e-5)
        moved += float((ref - tables[name][r0: r0 + t.shape[0], c0: c0 + t.shape[1]]).abs().sum())
    assert moved > 0  # the step did update this rank's rows


@pytest.mark.parametrize("first_order, sharding_type", [
    (False, "table_wise"), (True, "table_wise"), (False, "row_wise"), (False, "column_wise")])
def test_maml_step_on_two_ranks_equals_single_process_reference(debug_config_path, debug_data, first_order,
                                                                sharding_type):
    run_ranks(_maml_step_equals_reference, WORLD, str(debug_config_path), str(debug_data["shards"]),
              first_order, sharding_type)


def test_erm_step_on_two_ranks_equals_one_process_on_the_global_batch(debug_config_path, debug_data):
    # ranks hold different numbers of rows: each rank's loss is weighted by its share of the global rows
    run_ranks(_maml_step_equals_reference, WORLD, str(debug_config_path), str(debug_data["shards"]), False,
              "table_wise", (), None, "erm")


@pytest.mark.parametrize("outer", [["meta.erm_weight=0.7"], ["meta.query_weighting=row", "meta.erm_weight=0.3"]])
def test_maml_with_erm_term_and_row_weighting_on_two_ranks_equals_reference(debug_config_path, debug_data, outer):
    # the query term weighs tasks (or query rows), the ERM term rows: each by its own global count
    run_ranks(_maml_step_equals_reference, WORLD, str(debug_config_path), str(debug_data["shards"]), False,
              "table_wise", outer)


@pytest.mark.parametrize("algorithm", ["erm", "maml"])
def test_embedding_weight_decay_on_two_ranks_equals_rowwise_adagrad_with_l2_reference(debug_config_path, debug_data,
                                                                                       algorithm):
    # fbgemm's fused row-wise Adagrad, L2 mode: the penalty reaches only the rows a step touches
    extra = ("optim.embedding_optimizer=rowwise_adagrad", "optim.embedding_lr=0.2", "optim.embedding_weight_decay=0.5")
    run_ranks(_maml_step_equals_reference, WORLD, str(debug_config_path), str(debug_data["shards"]), False,
              "table_wise", extra, None, algorithm)


@pytest.mark.parametrize("algorithm, extra", [
    ("maml", ()), ("erm", ()),
    ("maml", ("optim.embedding_optimizer=rowwise_adagrad", "optim.embedding_weight_decay=0.5"))])
def test_a_rank_out_of_data_pads_and_the_steps_equal_one_process_on_the_real_batches(debug_config_path, debug_data,
                                                                                     algorithm, extra):
    # dynamic sharding's end of an epoch: rank 1 has no batch at step 0, rank 0 none at step 1;
    # a pad looks nothing up, so not even table weight decay (applied to looked-up rows) moves
    run_ranks(_maml_step_equals_reference, WORLD, str(debug_config_path), str(debug_data["shards"]), False,
              "row_wise", extra, None, algorithm, ((0, 1), (1, 0)))


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_unequal_shares_of_the_global_batch_equal_one_process_on_it(debug_config_path, debug_data, algorithm):
    # train.adaptive_batch: a fast rank takes 5 tasks, a slow one 1; the step is one process's on all 6
    run_ranks(_maml_step_equals_reference, WORLD, str(debug_config_path), str(debug_data["shards"]), False,
              "row_wise", (), None, algorithm, (), (5, 1))


def test_embedding_weight_decay_needs_an_optimizer_that_has_one(debug_config_path):
    from gmeta.config import ConfigError
    from gmeta.parallel.sharding import make_planner

    cfg = load_config(debug_config_path, ["optim.embedding_optimizer=sgd", "optim.embedding_weight_decay=0.1"])
    with pytest.raises(ConfigError, match="optim.embedding_weight_decay: fbgemm's 'sgd' has no weight decay"):
        make_planner(build_model(cfg, device=torch.device("meta")), cfg, "cpu", 1, 1)


def test_reptile_step_on_two_ranks_equals_single_process_reference(debug_config_path, debug_data):
    run_ranks(_maml_step_equals_reference, WORLD, str(debug_config_path), str(debug_data["shards"]), False,
              "table_wise", ("meta.inner_steps=2",), None, "reptile")


def test_per_table_sharding_and_memory_budget_equal_reference(debug_config_path, debug_data):
    # user_id/ad_id tables (2000 x 4 floats = 31 KiB) exceed a 0.02 MiB budget: row-wise;
    # site_id is column-wise by override; the rest table-wise by default
    extra = ["sharding.memory_budget_mb=0.02", "sharding.tables=[{name: site_id, sharding_type: column_wise}]"]
    expect = {"user_id": "row_wise", "ad_id": "row_wise", "site_id": "column_wise", "hour": "table_wise"}
    run_ranks(_maml_step_equals_reference, WORLD, str(debug_config_path), str(debug_data["shards"]), False,
              "table_wise", extra, expect)


def _dense_identical(rank, world, cfg_path, shards, algorithm):
    cfg = load_config(cfg_path, [f"meta.algorithm={algorithm}", "meta.tasks_per_batch=8"])
    torch.manual_seed(rank)  # different seeds: broadcast must still make ranks agree
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    dense_params = list(model.module.head.parameters())
    broadcast_params(dense_params)
    opt = torch.optim.Adam(dense_params, lr=1e-2)
    sync = DenseGradSync(dense_params)
    start = [p.detach().clone() for p in dense_params]
    reader = TaskReader(shards, "train", 8, rank=rank, world_size=world, seed=1)
    for i, batch in enumerate(reader):
        if i == 6:
            break
        train_step(model, batch, cfg, sync, opt)
    flat = torch.cat([p.detach().reshape(-1) for p in dense_params])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    for other in gathered[1:]:
        assert torch.equal(other, gathered[0])
    assert not torch.equal(flat, torch.cat([s.reshape(-1) for s in start]))


@pytest.mark.parametrize("algorithm", ["maml", "erm"])
def test_dense_parameters_identical_on_all_ranks(debug_config_path, debug_data, algorithm):
    run_ranks(_dense_identical, WORLD, str(debug_config_path), str(debug_data["shards"]), algorithm)


def _grad_sync_mean(rank, world):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7)),
              torch.nn.Parameter(torch.randn(2, 2))]
    sync = DenseGradSync(params, bucket_bytes=40)  # one bucket per parameter or so
    assert len(sync.buckets) >= 2
    for step in range(2):
        x = torch.arange(3.0) + rank + step
        loss = (params[0] @ x).pow(2).sum() + (params[1] * (rank + 1)).sum()
        if rank == 0:  # params[2] gets a gradient on rank 0 only
            loss = loss + params[2].pow(3).sum()
        loss.backward()
        # rank 0: every bucket started during backward; rank 1: the first bucket (params[2],
        # no gradient there) holds back the others, which start in order in wait()
        assert all(x is not None for x in sync.launched) == (rank == 0)
        assert (sync.launched[0] is None) == (rank == 1)
        sync.wait()
        # hand-computed mean over ranks
        grads = []
        for r in range(world):
            xr = torch.arange(3.0) + r + step
            g0 = 2 * (params[0].detach() @ xr).unsqueeze(1) * xr.unsqueeze(0)
            g1 = torch.full((7,), float(r + 1))
            g2 = 3 * params[2].detach() ** 2 if r == 0 else torch.zeros(2, 2)
            grads.append((g0, g1, g2))
        for i, p in enumerate(params):
            want = sum(g[i] for g in grads) / world
            torch.testing.assert_close(p.grad, want)
            p.grad = None


def test_dense_grad_sync_equals_hand_computed_mean(debug_config_path):
    run_ranks(_grad_sync_mean, WORLD)


def _every_embedding_optimizer_trains(rank, world, cfg_path, shards):
    from gmeta.config import ConfigError

    cfg = load_config(cfg_path, ["optim.embedding_optimizer=adam"])
    with pytest.raises(ConfigError, match="optim.embedding_optimizer: 'adam' has a fused kernel in fbgemm on GPU"):
        shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    for name in ("sgd", "adagrad", "rowwise_adagrad"):
        cfg = load_config(cfg_path, [f"optim.embedding_optimizer={name}", "meta.tasks_per_batch=4"])
        torch.manual_seed(0)
        model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
        before = {n: t.clone() for n, _, _, t in _local_table_shards(model)}
        params = model.module.dense_parameters()
        broadcast_params(params)
        sync, opt = DenseGradSync(params), torch.optim.Adam(params, lr=1e-3)
        for i, batch in enumerate(TaskReader(shards, "train", 4, rank=rank, world_size=world, seed=1)):
            if i == 2:
                break
            out = train_step(model, batch, cfg, sync, opt)
            assert torch.isfinite(out.loss)
        changed = sum(int(not torch.equal(before[n], t)) for n, _, _, t in _local_table_shards(model))
        assert changed > 0, name


def test_every_fused_embedding_optimizer_trains(debug_config_path, debug_data):
    run_ranks(_every_embedding_optimizer_trains, WORLD, str(debug_config_path), str(debug_data["shards"]))


@pytest.mark.parametrize("arch", [
    ["model.arch=dcn_v2", "model.cross_layers=2", "model.cross_rank=3", "model.cross_structure=parallel"],
    ["model.arch=deepfm"], ["model.arch=wide_deep"]], ids=["dcn_v2", "deepfm", "wide_deep"])
def test_each_head_on_two_ranks_equals_single_process_reference(debug_config_path, debug_data, arch):
    # second order, every layer of the head and every row adapted, tables sharded row-wise
    run_ranks(_maml_step_equals_reference, WORLD, str(debug_config_path), str(debug_data["shards"]), False,
              "row_wise", arch)


def test_din_on_two_ranks_equals_single_process_reference(debug_config_path, seq_data):
    # a behaviour sequence sharing ad_id's table (one sharded table, two features), second
    # order, every layer (the attention's included) and every row adapted
    from tests.support.sequences import seq_overrides

    run_ranks(_maml_step_equals_reference, WORLD, str(debug_config_path), str(seq_data["pq"]), False,
              "row_wise", [*seq_overrides(debug_config_path), "model.arch=din", "model.attention_arch=[3]"],
              {"ad_id": "row_wise"})


@pytest.mark.parametrize("arch", [["model.arch=mmoe", "model.experts=3", "model.expert_arch=[6]"],
                                  ["model.arch=esmm"]], ids=["mmoe", "esmm"])
def test_each_multitask_head_on_two_ranks_equals_single_process_reference(debug_config_path, two_label_data, arch):
    # two labels weighted unequally, second order, every layer and row adapted, tables sharded row-wise
    run_ranks(_maml_step_equals_reference, WORLD, str(debug_config_path), str(two_label_data["shards"]), False,
              "row_wise", [*arch, "features.labels=[label, conversion]", "features.label_weights=[1.0, 0.6]"])
