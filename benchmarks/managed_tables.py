"""Managed-id tables against hashed tables of the same size, side by side in one run.

Two table sizes: configs/ads_cvr_debug.yaml (tables of 8 to 2,000 rows) and
configs/ads_cvr.yaml (8 to 40,000 rows, dim 16). Each is prepared twice from the same raw
data: every sparse feature hashed (``ids: hash``), and every sparse feature managed
(``ids: managed``, the same ``num_embeddings`` as slots). Contenders, full training steps
on one process (DMP over a 1-rank gloo group: the lookup with its fused table update,
backward, dense Adam), alternated call by call over the same cycle of reader batches:

  hashed        ids hashed at prepare time (the baseline)
  managed       eviction_interval 1: each step profiles its ids, admits the new ones,
                resets their rows to the miss row, then remaps
  managed_i10   eviction_interval 10: ids wait up to 10 steps for a slot, on the miss row

for the meta step (MAML, ``meta.algorithm`` of the config) and for ERM. Reported per size
and algorithm: rows/s of each, managed's as a share of hashed's (the target is at least
0.8), the peak memory of one step (the CPU allocator's peak above the step's start) and the
MCH buffers per rank; then, with fresh models, the share of id occurrences that went to
the miss row under each eviction interval over the first ``--pass-batches`` meta-batches
of training (what a larger interval costs in learning: those occurrences train the shared
row instead of their own).

    python benchmarks/managed_tables.py [--repeats 5] [--sizes debug ads_cvr] [--batches 8] [--pass-batches 40]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import ROOT, emit
from benchmarks.meta_step import alternated, peak_mib
from gmeta.config import Config, load_config
from gmeta.io.errors import PrepareError
from gmeta.io.manifest import load_manifest
from gmeta.io.prepare import prepare
from gmeta.io.reader import TaskReader
from gmeta.io.synth import generate
from gmeta.models.dlrm import build_model
from gmeta.models.managed import training_metrics
from gmeta.parallel.dist import DenseGradSync, free_port
from gmeta.parallel.sharding import shard_model
from gmeta.training.step import train_step

SIZES = {"debug": ROOT / "configs" / "ads_cvr_debug.yaml", "ads_cvr": ROOT / "configs" / "ads_cvr.yaml"}


def managed_overrides(cfg: Config, interval: int = 1) -> list[str]:
    out = ["train.pipeline=false"]
    for s in cfg.features.sparse:
        out += [f"features.sparse.{s.name}.ids=managed", f"features.sparse.{s.name}.eviction_interval={interval}"]
    return out


def ensure_shards(workdir: Path, size: str) -> dict[str, tuple[Config, Path]]:
    """The raw data of ``size`` and its shards prepared hashed and managed (cached)."""
    base = load_config(SIZES[size])
    raw = workdir / f"{size}-raw"
    if not (raw / "_synth.json").is_file():
        generate(base, raw)
    out = {}
    for kind, over in (("hashed", []), ("managed", managed_overrides(base))):
        cfg = load_config(SIZES[size], over)
        shards = workdir / f"{size}-{kind}"
        try:
            load_manifest(shards)
        except PrepareError:
            prepare(cfg, raw, shards)
        out[kind] = (cfg, shards)
    return out


def mch_bytes(model) -> int:
    """Bytes of the MCH modules' buffers of a model: saved ones and the history of ids."""
    mcs = model.module.managed.mc.values()
    history = sum(mc._history_accumulator.nbytes for mc in mcs if hasattr(mc, "_history_accumulator"))
    return history + sum(b.numel() * b.element_size() for b in model.module.managed.mc.buffers())


def trainer(cfg: Config, batches: list, algorithm: str):
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    params = model.module.dense_parameters()
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)  # as gmeta train makes it
    sync = DenseGradSync(params)
    c = type(cfg)(**{**cfg.__dict__})
    c.meta = type(cfg.meta)(**{**cfg.meta.__dict__, "algorithm": algorithm})
    cycle = itertools.cycle(batches)
    return model, lambda: train_step(model, next(cycle), c, sync, opt)


def bench_size(size: str, workdir: Path, repeats: int, num_batches: int, results: dict, pass_batches: int) -> None:
    data = ensure_shards(workdir, size)
    hcfg, hshards = data["hashed"]
    mcfg, mshards = data["managed"]
    m10 = load_config(SIZES[size], managed_overrides(hcfg, 10))
    n = hcfg.meta.tasks_per_batch
    batches = {k: list(itertools.islice(TaskReader(s, "train", n, seed=0, size_buckets=hcfg.meta.size_buckets),
                                        num_batches))
               for k, s in (("hashed", hshards), ("managed", mshards))}
    # rows per meta-batch of each contender's cycle (the shards of the two may order tasks apart)
    per = {k: sum(b.num_rows for b in v) / num_batches for k, v in batches.items()}
    per["managed_i10"] = per["managed"]
    rows = per["hashed"]
    tables = ", ".join(f"{s.name} {s.num_embeddings:,}" for s in hcfg.features.sparse)
    print(f"[{size}] N={n} tasks, {rows:,.0f} rows per meta-batch on average (hashed; managed "
          f"{per['managed']:,.0f}; {num_batches} batches cycled); "
          f"tables: {tables}; dim {hcfg.model.embedding_dim}")
    for algorithm in (hcfg.meta.algorithm, "erm"):
        made = {"hashed": trainer(hcfg, batches["hashed"], algorithm),
                "managed": trainer(mcfg, batches["managed"], algorithm),
                "managed_i10": trainer(m10, batches["managed"], algorithm)}
        fns = {k: fn for k, (_, fn) in made.items()}
        t = alternated(fns, repeats * num_batches)
        mem = {k: peak_mib(fn) for k, fn in fns.items()}
        res = {f"{k}_rows_per_s": per[k] / v for k, v in t.items()}
        res.update({f"{k}_share_of_hashed": res[f"{k}_rows_per_s"] / res["hashed_rows_per_s"]
                    for k in t if k != "hashed"})
        res.update({f"{k}_peak_mib": v for k, v in mem.items()})
        res["mch_buffers_mib"] = mch_bytes(made["managed"][0]) / 2**20
        results[f"{size}_{algorithm}"] = res
        print(f"  {algorithm:5s} rows/s: " + ", ".join(f"{k} {res[f'{k}_rows_per_s']:,.0f}" for k in t)
              + " | share of hashed: " + ", ".join(f"{k} {res[f'{k}_share_of_hashed']:.2f}" for k in t
                                                   if k != "hashed"))
        print(f"  {algorithm:5s} peak step MiB: " + ", ".join(f"{k} {v:.1f}" for k, v in mem.items())
              + f"; MCH buffers {res['mch_buffers_mib']:.2f} MiB per rank")
    # learning cost of a larger interval: occurrences on the miss row over the first meta-batches of training
    every = list(itertools.islice(TaskReader(mshards, "train", n, seed=0, size_buckets=hcfg.meta.size_buckets),
                                  pass_batches))
    share = {}
    for name, cfg in (("managed", mcfg), ("managed_i10", m10)):
        model, step = trainer(cfg, every, cfg.meta.algorithm)
        for _ in every:
            step()
        metrics = training_metrics(model.module.managed)
        miss = [v for k, v in metrics.items() if k.endswith("/miss_share")]
        share[name] = {k.split("/")[2]: round(v, 4) for k, v in metrics.items() if k.endswith("/miss_share")}
        results[f"{size}_first_pass_{name}_miss_share_mean"] = sum(miss) / len(miss)
    print(f"  first {len(every)} meta-batches of training, share of id occurrences on the miss row per feature:")
    for name, per in share.items():
        print(f"    {name}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in per.items()))
        results[f"{size}_first_pass_{name}_miss_share"] = per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--pass-batches", type=int, default=40, help="meta-batches of the miss-share measure")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench-managed"))
    args = ap.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(args.threads)
    results: dict = {}
    for size in args.sizes:
        bench_size(size, Path(args.workdir), args.repeats, args.batches, results, args.pass_batches)
    emit("managed_tables", results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
