"""The meta step at speed, on one process (the inner loop never communicates).

Three models, each with its own data:

- ``ads_cvr``: configs/ads_cvr.yaml (7 sparse features, one multi-hot, dim 16, small MLPs),
  meta-batches of real synthetic campaigns from the reader (power-law task sizes).
- ``criteo``: a Criteo-shaped DLRM: 13 dense and 26 sparse features, dim 32, dense arch
  13 -> 256 -> 32, over arch 383 -> 512 -> 256 -> 1; N = 128 tasks of 20 support + 20
  query rows, ids drawn from a skewed distribution over tables of 50,000 rows.
- ``criteo_narrow``: the same features, narrower and with shorter tasks: dim 16, dense
  arch 13 -> 128 -> 16, over arch 367 -> 256 -> 128 -> 1; N = 128 tasks of 10 + 10 rows.

Contenders on the same model, weights, rows and hyperparameters (K inner steps adapting
the dense arch, the over arch and the task's embedding rows), first and second order,
alternated call by call so that drift of a shared machine hits all alike:

  gmeta          the meta step as training runs it (meta.fast_weights=auto: per layer and
                 size bucket the cheaper of implicit and materialised fast weights)
  gmeta-imp      gmeta with implicit fast weights in every layer
  gmeta-mat      gmeta with materialised per-task weights ``[N, out, in]`` in every layer
  loop           per-task ``torch.func.functional_call`` + ``autograd.grad`` (benchmarks/contenders.py)
  vmap           ``torch.func.vmap`` over a per-task ``torch.func.grad`` inner loop, every
                 task padded to the batch's largest
  vmap-bucketed  the same, one vmap per size bucket of gmeta's layout (meta.size_buckets),
                 each padded to its own largest task
  erm            a plain training step of the same model on the same rows: the limit
                 MAML's rows/s approach (no inner loop)

Each times the step from the looked-up rows ``[U, D]`` to all gradients (loss, inner loop,
query loss, one backward). Reported: tasks/s, rows/s as a share of ERM's on the same model
and rows, gmeta's speed over every other contender, and peak step memory (the CPU
allocator's peak above the step's start, from torch.profiler's memory events) with the
part of gmeta's that is ERM's own (the activations of every row kept for the backward).
Then the full training step (torchrec lookup with its fused update, dense Adam) of gmeta
MAML vs ERM, and the rows sent to the embedding tables per meta-batch: every id
occurrence (before deduplication) vs the distinct (feature, id) pairs sent now.

Every model with each head of ``--archs`` (model.arch: dlrm, dcn_v2, deepfm, wide_deep, mmoe, esmm,
din; the same features, sizes and rows, the over arch the deep tower; every layer of the head
adapted, meta.adapt_dense all), named ``<model>_<arch>`` in the figures (the DLRM's plain
``<model>``). The multi-task heads (mmoe, esmm) train two labels on the same rows, the click
label and a conversion that follows a fifth of the clicks; ERM, the loop and vmap train both
alike. DIN (the Criteo-shaped models only: the ads_cvr shards hold no sequence) adds a
behaviour sequence ``hist`` of max_length T = 10 sharing the table of its candidate ``C1``
(``features.sparse[].table``), each row's list of 0 to 10 ids (uniform, so most rows end
early and leave padding cells) drawn as C1's are; the attention MLP is the default
``model.attention_arch`` [32] (4D -> 32 -> 1), and the over arch reads 28 vectors side by
side, the dense arch's output, the 26 features' cells (C1's among them) and the interest:
896 -> 512 -> 256 -> 1 on ``criteo``, 448 -> 256 -> 128 -> 1 on ``criteo_narrow``. A row has
C = 26 + 10 cells (``layout.num_cells``), which the contenders pool into as gmeta does; the
other columns are the same rows as the other heads'.

    python benchmarks/meta_step.py [--repeats 7] [--threads 1 2] [--models ads_cvr criteo criteo_narrow]
                                   [--archs dlrm dcn_v2 deepfm wide_deep mmoe esmm din]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import emit, ensure_data
from benchmarks.contenders import bucket_views, loop_loss, task_views, vmap_bucketed_loss, vmap_loss
from benchmarks.memory import saved_bytes
from gmeta.config import Config, SparseFeature, load_config, validate
from gmeta.io.batch import task_batch
from gmeta.io.reader import TaskReader
from gmeta.layout import layout_of
from gmeta.meta.erm import erm_loss
from gmeta.meta.fast_weights import choose_fast_weights
from gmeta.meta.maml import maml_loss
from gmeta.models.dlrm import build_model
from gmeta.models.heads import HEADS
from gmeta.parallel.dist import DenseGradSync, free_port
from gmeta.parallel.sharding import shard_model
from gmeta.training.step import train_step
from gmeta.types import TaskBatch

CRITEO_TABLE = 50_000
CRITEO_TASKS = 128  # N, the tasks of a Criteo-shaped meta-batch
# Criteo-shaped model sizes: embedding dim, dense arch, over arch, support = query rows per task
CRITEO = {"criteo": (32, [256], [512, 256], 20), "criteo_narrow": (16, [128], [256, 128], 10)}


def criteo_config(size: str = "criteo") -> Config:
    """The Criteo-shaped model of ``CRITEO[size]`` (its task length: ``CRITEO[size][3]``)."""
    dim, dense_arch, over_arch, _ = CRITEO[size]
    sparse = ", ".join(f"{{name: C{i}, num_embeddings: {CRITEO_TABLE}}}" for i in range(1, 27))
    dense = ", ".join(f"I{i}" for i in range(1, 14))
    return load_config(None, [f"features.sparse=[{sparse}]", f"features.dense=[{dense}]",
                              f"model.embedding_dim={dim}", f"model.dense_arch={dense_arch}",
                              f"model.over_arch={over_arch}", "meta.inner_steps=2",
                              "meta.inner_lr=0.05", "meta.embedding_inner_lr=0.1", "meta.size_buckets=1",
                              "meta.tasks_per_batch=128"])


def _criteo_ids(rng: np.random.Generator, i: int, task: np.ndarray, user_bias: np.ndarray) -> np.ndarray:
    """Ids of the i-th Criteo feature at positions of the given tasks: skewed over the table;
    the first four features take a task's own id 70% of the time, as a user's rows share ids."""
    ids = (CRITEO_TABLE * rng.random(len(task)) ** 3).astype(np.int64)
    if i < 4:
        ids = np.where(rng.random(len(task)) < 0.7, user_bias[task] * (i + 1) % CRITEO_TABLE, ids)
    return ids


def criteo_batch(cfg: Config, n: int, support: int, query: int, seed: int):
    """N tasks of support + query rows shaped like Criteo's (skewed ids, log-scaled counts).
    A sequence feature of ``cfg`` (``max_length`` T, as ``with_arch(cfg, "din")`` adds) gets a
    list per row, of length uniform in 0..T (so rows end early and leave padding cells), its
    ids drawn as its table's feature's are; from a stream of its own, so the other columns
    are those of the same seed without it."""
    rng = np.random.default_rng(seed)
    rows = n * (support + query)
    data: dict = {"task": np.repeat(np.arange(n), support + query),
                  "is_query": np.tile(np.r_[np.zeros(support, bool), np.ones(query, bool)], n),
                  "label": (rng.random(rows) < 0.25).astype(np.float32)}
    for name in cfg.features.dense:
        data[name] = np.log1p(rng.lognormal(1.0, 1.5, rows)).astype(np.float32)
    user_bias = rng.integers(0, CRITEO_TABLE, n)  # a task's rows share some ids, as a user's do
    sparse = cfg.features.sparse
    for i, f in enumerate(sparse):
        if not f.max_length:
            data[f.name] = _criteo_ids(rng, i, data["task"], user_bias)
    seq_rng = np.random.default_rng([seed, 1])
    for f in sparse:
        if f.max_length:
            lengths = seq_rng.integers(0, f.max_length + 1, rows)
            like = next(i for i, g in enumerate(sparse) if g.name == f.table)
            ids = _criteo_ids(seq_rng, like, np.repeat(data["task"], lengths), user_bias)
            data[f.name] = np.split(ids, np.cumsum(lengths)[:-1])  # a list of ids per row
    # max_length and table: the layout gives a sequence its cells (gmeta.layout.cell_widths)
    feats = [{"name": f.name, "num_embeddings": f.num_embeddings, "pooling": f.pooling, "max_length": f.max_length,
              "table": f.table} for f in sparse]
    return task_batch(data, task="task", query="is_query", label="label", sparse=[f.name for f in sparse],
                      dense=list(cfg.features.dense), features=feats, size_buckets=cfg.meta.size_buckets, ids="rows")


def peak_mib(fn) -> float:
    """Peak bytes the CPU allocator holds above the start while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak / 2**20


def alternated(fns: dict, repeats: int, drain=lambda: None) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved; ``drain()`` before and
    after each call waits for queued device work (a GPU's, see gpu_check)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            drain()
            t0 = time.perf_counter()
            fn()
            drain()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def step_fns(head, rows, batch, layout, nc: int, kw: dict) -> dict:
    """Each contender's step as a function; ``nc`` the cells per row (``layout.num_cells``)."""
    views, buckets = task_views(batch, layout), bucket_views(batch, layout)
    params = list(head.parameters())

    def run(loss_fn):
        def go():
            loss = loss_fn()
            loss.backward()
            for p in params + [rows]:
                p.grad = None
        return go

    return {
        "gmeta": run(lambda: maml_loss(head, rows, batch, layout, fast_weights="auto", **kw).loss),
        "gmeta-imp": run(lambda: maml_loss(head, rows, batch, layout, fast_weights="implicit", **kw).loss),
        "gmeta-mat": run(lambda: maml_loss(head, rows, batch, layout, fast_weights="materialized", **kw).loss),
        "loop": run(lambda: loop_loss(head, rows, views, nc, kw)),
        "vmap": run(lambda: vmap_loss(head, rows, views, nc, kw)),
        "vmap-bucketed": run(lambda: vmap_bucketed_loss(head, rows, buckets, nc, kw)),
        "erm": run(lambda: erm_loss(head, rows, batch, layout).loss),
    }


def bench_model(name: str, cfg: Config, batch, repeats: int, threads: int, results: dict) -> None:
    torch.manual_seed(0)
    model = build_model(cfg)
    layout = layout_of(batch, model.pooling, cfg.meta.size_buckets, model.cell_widths)
    with torch.no_grad():
        rows = model.lookup(layout)
    rows = rows.detach().requires_grad_(True)
    m = cfg.meta
    n, r = batch.num_tasks, batch.num_rows
    print(f"[{name}, {threads} thread(s)] N={n} tasks, {r} rows, K={m.inner_steps}, adapting {m.adapt_dense} + "
          f"embedding rows; lookup: {layout.slot.numel()} id occurrences, {layout.num_unique} distinct (feature, id) "
          f"sent ({layout.slot.numel() / max(layout.num_unique, 1):.1f}x fewer), {layout.num_groups} task groups")
    for i, b in enumerate(layout.buckets):
        modes = choose_fast_weights(model.head, m.adapt_dense, "auto", m.inner_lr, m.inner_steps, b.s_index.shape[1],
                                    b.q_index.shape[1])
        print(f"  bucket {i}: {b.tasks.shape[0]} tasks padded to {b.s_index.shape[1]} + {b.q_index.shape[1]} rows; "
              f"auto fast weights: " + ", ".join(f"{p[:-1]} {v}" for p, v in modes.items()))
    for first_order in (False, True):
        order = "first" if first_order else "second"
        kw = dict(steps=m.inner_steps, lr=m.inner_lr, emb_lr=m.embedding_inner_lr, adapt_dense=m.adapt_dense,
                  adapt_embeddings=m.adapt_embeddings, first_order=first_order)
        fns = step_fns(model.head, rows, batch, layout, layout.num_cells, kw)
        t = alternated(fns, repeats)
        mem = {k: peak_mib(fn) for k, fn in fns.items()}
        results[f"{name}_t{threads}_{order}"] = res = step_figures(t, mem, n, r)
        # what the backward keeps: ERM's activations of every row vs gmeta's (query rows, the
        # implicit layers' support inputs and output gradients, the task's rows)
        res["gmeta_saved_mib"] = saved_bytes(lambda a=kw: maml_loss(model.head, rows, batch, layout, **a).loss) / 2**20
        res["erm_saved_mib"] = saved_bytes(lambda: erm_loss(model.head, rows, batch, layout).loss) / 2**20
        print(f"  {order:6s} order  tasks/s: " + ", ".join(f"{k} {n / v:,.0f}" for k, v in t.items() if k != "erm")
              + " | gmeta over " + ", ".join(f"{k} {res[f'gmeta_over_{k}']:.2f}x" for k in t if k not in GMETA_SELF))
        print(f"  {order:6s} order  rows/s as a share of ERM's ({r / t['erm']:,.0f} rows/s): "
              + ", ".join(f"{k} {res[f'{k}_share_of_erm']:.2f}" for k in t if k != "erm"))
        print(f"  {order:6s} order  peak step MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in mem.items())
              + f" (gmeta / vmap {res['memory_over_vmap']:.2f}, / vmap-bucketed "
              f"{res['memory_over_vmap-bucketed']:.2f}, / erm {res['memory_over_erm']:.2f}); saved for the "
              f"backward: gmeta {res['gmeta_saved_mib']:.1f} MiB, erm {res['erm_saved_mib']:.1f} MiB")


GMETA_SELF = ("gmeta", "erm")  # no ratio of gmeta over these


def step_figures(t: dict[str, float], mem: dict[str, float], num_tasks: int, num_rows: int) -> dict[str, float]:
    """The figures of one model and order from the contenders' median seconds per step
    ``t`` and peak step MiB ``mem``: tasks/s and rows/s of each, rows/s as a share of ERM's
    on the same rows (the limit MAML approaches), gmeta's speed over each other contender
    and its peak memory over vmap's (padded and bucketed) and ERM's."""
    res = {f"{k}_tasks_per_s": num_tasks / v for k, v in t.items() if k != "erm"}
    res.update({f"{k}_rows_per_s": num_rows / v for k, v in t.items()})
    res.update({f"{k}_share_of_erm": t["erm"] / v for k, v in t.items() if k != "erm"})
    res.update({f"{k}_peak_mib": v for k, v in mem.items()})
    res.update({f"gmeta_over_{k}": v / t["gmeta"] for k, v in t.items() if k not in GMETA_SELF})
    res.update({f"memory_over_{k}": mem["gmeta"] / mem[k] for k in ("vmap", "vmap-bucketed", "erm")})
    return res


def bench_train_step(name: str, cfg: Config, batch, repeats: int, threads: int, results: dict) -> None:
    """Full training steps: sharded lookup with the fused table update, backward, Adam."""
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    params = model.module.dense_parameters()
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)  # as gmeta train makes it
    sync = DenseGradSync(params)

    def with_meta(**overrides):
        c = type(cfg)(**{**cfg.__dict__})
        c.meta = type(cfg.meta)(**{**cfg.meta.__dict__, **overrides})
        return lambda: train_step(model, batch, c, sync, opt)

    t = alternated({"erm": with_meta(algorithm="erm"), "first": with_meta(first_order=True),
                    "second": with_meta(first_order=False)}, repeats)
    r = batch.num_rows
    res = {"erm_rows_per_s": r / t["erm"], "first_rows_per_s": r / t["first"], "second_rows_per_s": r / t["second"],
           "first_over_erm": t["erm"] / t["first"], "second_over_erm": t["erm"] / t["second"]}
    results[f"{name}_t{threads}_train_step"] = res
    print(f"  full training step rows/s (K={cfg.meta.inner_steps}): ERM {r / t['erm']:,.0f}, MAML first order "
          f"{r / t['first']:,.0f} ({res['first_over_erm']:.2f} of ERM), second order {r / t['second']:,.0f} "
          f"({res['second_over_erm']:.2f} of ERM)")


# the multi-task heads train click and conversion together: their batches carry both
MULTI_TASK = ("mmoe", "esmm")
# din's behaviour sequence: its name and max_length T (its candidate: the first sparse feature)
DIN_SEQUENCE, DIN_LENGTH = "hist", 10


def with_arch(cfg: Config, arch: str) -> Config:
    """``cfg`` with the head ``arch`` (model.arch), every layer of it adapted; a multi-task
    head with two labels, the config's label (click) and a conversion; din with a behaviour
    sequence ``hist`` of ``DIN_LENGTH`` ids sharing the table of the candidate, the first
    sparse feature (``criteo_batch`` fills it). Checked as a loaded config is (ConfigError)."""
    out = copy.deepcopy(cfg)
    out.model.arch = arch  # type: ignore[assignment]
    out.meta.adapt_dense = ["all"]
    if arch in MULTI_TASK:
        out.features.labels = [out.features.label, "conversion"]
    if arch == "din":
        cand = out.features.sparse[0]
        out.features.sparse.append(SparseFeature(name=DIN_SEQUENCE, num_embeddings=cand.num_embeddings,
                                                 multi_hot=True, max_length=DIN_LENGTH, table=cand.name))
    validate(out)
    return out


def with_conversion(batch, seed: int):
    """``batch`` with labels ``[R, 2]``: its click label and a conversion, which follows
    only a click (a fifth of them), as in an ads funnel."""
    y = batch.labels
    conversion = y * (torch.rand(y.shape, generator=torch.Generator().manual_seed(seed)) < 0.2).to(y.dtype)
    return dataclasses.replace(batch, labels=torch.stack([y, conversion], dim=-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--models", nargs="+", default=["ads_cvr", *CRITEO], choices=["ads_cvr", *CRITEO])
    ap.add_argument("--archs", nargs="+", default=["dlrm"], choices=list(HEADS))
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench"))
    args = ap.parse_args()
    if "din" in args.archs and "ads_cvr" in args.models:
        ap.error("--archs din: din attends over a behaviour sequence, which the ads_cvr model's shards do not hold; "
                 f"run it on --models {' '.join(CRITEO)}, whose batches are generated with one")
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    # (name, config, batch, the batch of a config with din's sequence or None)
    models: list[tuple[str, Config, TaskBatch, Callable[[Config], TaskBatch] | None]] = []
    if "ads_cvr" in args.models:
        cfg, _, shards = ensure_data(Path(args.workdir), 20_000)
        for n in (32, 128):
            batch = next(iter(TaskReader(shards, "train", n, seed=0, size_buckets=cfg.meta.size_buckets)))
            models.append((f"ads_cvr_N{n}", cfg, batch, None))
    for size in CRITEO:
        if size in args.models:
            cfg, rows = criteo_config(size), CRITEO[size][3]
            make = functools.partial(criteo_batch, n=CRITEO_TASKS, support=rows, query=rows, seed=0)
            models.append((f"{size}_N{CRITEO_TASKS}", cfg, make(cfg), make))
    setups = []
    for arch in args.archs:
        for name, cfg, batch, make in models:
            c = with_arch(cfg, arch)
            if arch == "din":  # the same rows, with the sequence column besides (criteo_batch)
                assert make is not None  # (ads_cvr with din is refused above)
                batch = make(c)
            elif arch in MULTI_TASK:
                batch = with_conversion(batch, seed=0)
            setups.append((name if arch == "dlrm" else name.replace("_N", f"_{arch}_N"), c, batch))
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, cfg, batch in setups:
            bench_model(name, cfg, batch, args.repeats, threads, results)
            if name != "ads_cvr_N128":
                bench_train_step(name, cfg, batch, args.repeats, threads, results)
    emit("meta_step", results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
