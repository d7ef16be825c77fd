"""The meta step at speed, on one process (the inner loop never communicates):

1. gmeta's vectorized MAML step vs. a per-task loop (learn2learn/higher style: per task,
   clone the dense weights and the task's looked-up embedding rows, adapt, accumulate the
   query loss; one backward), same model, data and hyperparameters: tasks/s at
   N = 8, 32, 128 tasks per meta-batch, first and second order.
2. Meta overhead: rows/s of a MAML training step (first order, K = 1; and second order)
   over rows/s of an ERM training step on the same model and rows.

    python benchmarks/meta_step.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import emit, ensure_data
from gmeta.io.reader import TaskReader
from gmeta.models.dlrm import Lookup, build_model
from gmeta.parallel.dist import DenseGradSync, free_port
from gmeta.parallel.maml import adapt_and_query
from gmeta.parallel.sharding import shard_model
from gmeta.train import train_step
from gmeta.types import TaskBatch


def per_task_views(batch: TaskBatch, lookup: Lookup, num_features: int):
    """Index plans to cut a batch and its lookup into one-task pieces (data preparation,
    not timed); the gathers themselves happen inside the timed loop."""
    s_total = batch.num_support
    so, qo = batch.support_offsets.tolist(), batch.query_offsets.tolist()
    row_of_occ = lookup.slot // num_features
    views = []
    for t in range(batch.num_tasks):
        rows = torch.cat([torch.arange(so[t], so[t + 1]), s_total + torch.arange(qo[t], qo[t + 1])])
        new_row = torch.full((lookup.num_rows,), -1, dtype=torch.long)
        new_row[rows] = torch.arange(len(rows))
        occ = (new_row[row_of_occ] >= 0).nonzero().squeeze(1)
        cells = (rows.unsqueeze(1) * num_features + torch.arange(num_features)).reshape(-1)
        sub = TaskBatch(sparse=batch.sparse, dense=batch.dense[rows], labels=batch.labels[rows],
                        support_offsets=torch.tensor([0, so[t + 1] - so[t]]),
                        query_offsets=torch.tensor([0, qo[t + 1] - qo[t]]), task_ids=batch.task_ids[t: t + 1])
        slot = new_row[row_of_occ[occ]] * num_features + lookup.feature[occ]
        views.append((sub, occ, slot, cells, len(rows)))
    return views


def loop_loss(head, lookup: Lookup, views, nf: int, kw: dict) -> torch.Tensor:
    """Per-task loop: each task adapts its own clone of the weights, one after another."""
    losses = []
    for sub, occ, slot, cells, n in views:
        lk = Lookup(lookup.values[occ], slot, lookup.feature[occ], lookup.ids[occ], lookup.scale[cells], n)
        _, ql, _ = adapt_and_query(head, lk, sub, num_features=nf, **kw)
        losses.append(ql)
    return torch.cat(losses).mean()


def vec_loss(head, lookup: Lookup, batch: TaskBatch, nf: int, kw: dict, buckets: int) -> torch.Tensor:
    _, ql, _ = adapt_and_query(head, lookup, batch, num_features=nf, size_buckets=buckets, **kw)
    return ql.mean()


def meta_step(inner, batch: TaskBatch, views, kw: dict, buckets: int = 2) -> None:
    """Lookup, meta-loss (vectorized when ``views`` is None, else the per-task loop), backward."""
    nf = inner.num_features
    lookup = inner.lookup(batch.sparse)
    if views is None:
        loss = vec_loss(inner.head, lookup, batch, nf, kw, buckets)
    else:
        loss = loop_loss(inner.head, lookup, views, nf, kw)
    loss.backward()
    for p in inner.head.parameters():
        p.grad = None


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median seconds per call of two functions, calls alternated so that drift of a shared,
    noisy machine hits both sides alike."""
    fn_a(), fn_b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg, _, shards = ensure_data(work, 20_000)
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    inner = model.module
    nf = inner.num_features
    m = cfg.meta
    results = {}
    print(f"model: ads_cvr.yaml (embedding dim {cfg.model.embedding_dim}, dense {cfg.model.dense_arch}, over "
          f"{cfg.model.over_arch}), K={m.inner_steps}, adapting {m.adapt_dense} + embedding rows")
    for n in (8, 32, 128):
        batch = next(iter(TaskReader(shards, "train", n, seed=0)))
        for first_order in (False, True):
            kw = dict(steps=m.inner_steps, lr=m.inner_lr, emb_lr=m.embedding_inner_lr, adapt_dense=m.adapt_dense,
                      adapt_embeddings=m.adapt_embeddings, first_order=first_order)

            with torch.no_grad():  # per-task index plans: data preparation, not timed
                views = per_task_views(batch, inner.lookup(batch.sparse), nf)
            t_vec, t_loop = timed_pair(lambda b=batch, k=kw: meta_step(inner, b, None, k, m.size_buckets),
                                       lambda b=batch, k=kw, v=views: meta_step(inner, b, v, k), args.repeats)
            order = "first" if first_order else "second"
            results[f"N{n}_{order}"] = {"gmeta_tasks_per_s": n / t_vec, "loop_tasks_per_s": n / t_loop,
                                        "ratio": t_loop / t_vec}
            print(f"N={n:4d} {order:6s} order: gmeta {n / t_vec:8.0f} tasks/s, per-task loop {n / t_loop:7.0f} "
                  f"tasks/s, ratio {t_loop / t_vec:5.1f}x")

    # meta overhead: full training steps (lookup, loss, backward, fused table update, Adam)
    batch = next(iter(TaskReader(shards, "train", 32, seed=1)))
    params = inner.dense_parameters()
    opt = torch.optim.Adam(params, lr=1e-4)
    sync = DenseGradSync(params)

    def step_fn(overrides: dict):
        c = type(cfg)(**{**cfg.__dict__})
        c.meta = type(cfg.meta)(**{**cfg.meta.__dict__, **overrides})
        return lambda: train_step(model, batch, c, sync, opt)

    erm_step = step_fn({"algorithm": "erm"})
    t_erm, t_fo = timed_pair(erm_step, step_fn({"algorithm": "maml", "first_order": True, "inner_steps": 1}),
                             args.repeats)
    t_erm2, t_so = timed_pair(erm_step, step_fn({"algorithm": "maml", "first_order": False, "inner_steps": 1}),
                              args.repeats)
    r = batch.num_rows
    print(f"training step rows/s (N=32), each paired with ERM: ERM {r / t_erm:8.0f} vs MAML first-order K=1 "
          f"{r / t_fo:8.0f} (ratio {t_erm / t_fo:.2f}, target >= 0.5); ERM {r / t_erm2:8.0f} vs second-order K=1 "
          f"{r / t_so:8.0f} (ratio {t_erm2 / t_so:.2f}, target >= 0.33)")
    results["overhead"] = {"erm_rows_per_s": r / t_erm, "fomaml_k1_rows_per_s": r / t_fo,
                           "maml2_k1_rows_per_s": r / t_so, "ratio_first_order": t_erm / t_fo,
                           "ratio_second_order": t_erm2 / t_so}
    emit("meta_step", results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
