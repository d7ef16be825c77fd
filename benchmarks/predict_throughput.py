"""Batch prediction throughput: ``gmeta predict`` (tasks adapted and scored together in
meta-batches of eval.tasks_per_batch, streamed by background readers, written to Parquet
parts) vs. a naive per-task loop on the same model and tasks (read one task at a time,
adapt it, score it, collect the rows, write them once).

Same checkpoint (configs/ads_cvr.yaml's model, freshly initialised: throughput does not
depend on the weights), same held-out tasks, same inner steps; both measured in one run.

    python benchmarks/predict_throughput.py [--tasks 1000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import emit, ensure_data, fresh_checkpoints
from gmeta import checkpoint
from gmeta.inference.predict import run_predict
from gmeta.io.reader import TaskReader, task_keys
from gmeta.scoring import predict_query


def naive(ckpt: Path, shards: Path, out: Path, tasks: int, steps: int) -> int:
    """One task at a time through the same model; returns the rows scored."""
    model, cfg, _ = checkpoint.load_unsharded(ckpt)
    keys = task_keys(shards, "eval")
    rows = {"task_key": [], "row": [], "score": []}
    for batch in TaskReader(shards, "eval", 1, shuffle=False, drop_last=False, num_workers=0, max_tasks=tasks):
        probs = predict_query(model, cfg, batch, steps)
        rows["task_key"] += [keys[int(batch.task_ids[0])]] * len(probs)
        rows["row"] += list(range(len(probs)))
        rows["score"] += probs.tolist()
    pq.write_table(pa.table(rows), out)
    return len(rows["score"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000, help="held-out tasks to score")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench"))
    args = ap.parse_args()
    work = Path(args.workdir)
    cfg, _, shards = ensure_data(work, 20_000)
    (ckpt,) = fresh_checkpoints(cfg, shards, [work / "predict-bench" / "checkpoint"])
    steps = cfg.meta.inner_steps
    out = work / "predict-bench" / "out"

    results = {}
    for name in ("gmeta", "naive", "gmeta", "naive"):  # alternated: drift of a shared machine hits both
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        if name == "gmeta":
            rows = run_predict(ckpt, out, shards_dir=str(shards), inner_steps=steps, max_tasks=args.tasks,
                               progress=False)["rows"]
        else:
            out.mkdir(parents=True)
            rows = naive(ckpt, shards, out / "naive.parquet", args.tasks, steps)
        dt = time.perf_counter() - t0
        results.setdefault(name, []).append(rows / dt)
        print(f"{name:6s}: {rows} query rows of {args.tasks} tasks in {dt:6.2f}s = {rows / dt:8.0f} rows/s")
    g, n = float(np.median(results["gmeta"])), float(np.median(results["naive"]))
    print(f"gmeta predict {g:.0f} rows/s vs per-task loop {n:.0f} rows/s: {g / n:.1f}x "
          f"(K={steps} inner steps, eval.tasks_per_batch={cfg.eval.tasks_per_batch})")
    emit("predict_throughput", {"gmeta_rows_per_s": g, "naive_rows_per_s": n, "ratio": g / n, "tasks": args.tasks,
                                "inner_steps": steps})


if __name__ == "__main__":
    main()
