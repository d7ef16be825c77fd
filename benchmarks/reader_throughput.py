"""Reader throughput: gmeta's TaskReader producing collated meta-batches vs. the pipeline
researchers usually write (a map-style torch Dataset over a pandas DataFrame grouped by
task, one task per __getitem__, tensors built from the group, default DataLoader).

Same rows on both sides (the naive side gets the prepared tasks flattened back to rows; its
one-time groupby is excluded from the timing). Prints tasks/s, rows/s and the ratio.

    python benchmarks/reader_throughput.py [--tasks 50000] [--workers 1] [--batch 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import emit, ensure_data
from gmeta.io.manifest import load_manifest
from gmeta.io.reader import TaskReader


def rows_frame(shards: Path) -> pd.DataFrame:
    """The prepared train tasks as one row-level DataFrame (support and query rows)."""
    m = load_manifest(shards)
    frames = []
    for f in m["splits"]["train"]["files"]:
        t = pq.read_table(shards / f["path"])
        for side in ("support", "query"):
            s = t.column(side).combine_chunks()
            fields = {s.type.field(i).name: c for i, c in enumerate(s.flatten())}
            n = fields["label"].value_lengths().to_numpy()
            df = pd.DataFrame({"task_id": np.repeat(t.column("task_id").to_numpy(), n),
                               "is_query": side == "query"})
            for name, col in fields.items():
                flat = col.flatten()
                if name == "dense":
                    d = flat.flatten().to_numpy().reshape(len(flat), -1)
                    for j in range(d.shape[1]):
                        df[f"dense_{j}"] = d[:, j]
                elif name == "interests":
                    df[name] = flat.to_pylist()
                else:
                    df[name] = flat.to_numpy(zero_copy_only=False)
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


class NaiveTaskDataset(Dataset):
    """One task per item, tensors built from the task's rows of a pandas DataFrame."""

    def __init__(self, df: pd.DataFrame, sparse: list[str], dense: list[str]) -> None:
        self.groups = [g for _, g in df.groupby("task_id", sort=False)]  # one-time, not timed
        self.sparse, self.dense = sparse, dense

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        g = self.groups[i]
        out = {}
        for side, part in (("support", g[~g.is_query]), ("query", g[g.is_query])):
            item = {name: torch.tensor(part[name].values) for name in self.sparse}
            ids = part["interests"].tolist()
            item["interests"] = torch.tensor([i for row in ids for i in row])
            item["interests_len"] = torch.tensor([len(row) for row in ids])
            item["dense"] = torch.tensor(part[self.dense].values, dtype=torch.float32)
            item["label"] = torch.tensor(part["label"].values, dtype=torch.float32)
            out[side] = item
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=32, help="tasks per meta-batch (gmeta side)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers, both sides")
    ap.add_argument("--naive-tasks", type=int, default=5000, help="tasks timed on the naive side")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg, raw, shards = ensure_data(work, args.tasks)
    m = load_manifest(shards)
    tasks = m["splits"]["train"]["tasks"]
    rows = m["splits"]["train"]["support_rows"] + m["splits"]["train"]["query_rows"]
    print(f"data: {tasks} train tasks, {rows} rows ({m['input_rows']} input rows)")

    # gmeta: one warm-up batch, then the rest of the epoch
    reader = TaskReader(shards, "train", args.batch, num_workers=args.workers, seed=0)
    it = iter(reader)
    next(it)
    t0 = time.perf_counter()
    n_tasks = n_rows = 0
    for b in it:
        n_tasks += b.num_tasks
        n_rows += b.num_rows
    dt = time.perf_counter() - t0
    g_tps, g_rps = n_tasks / dt, n_rows / dt
    print(f"gmeta TaskReader:  {g_tps:10.0f} tasks/s {g_rps:12.0f} rows/s  ({n_tasks} tasks in {dt:.2f}s, "
          f"{args.batch} tasks per collated meta-batch, {args.workers} worker(s))")

    # naive: pandas groupby Dataset, default DataLoader (one task per item)
    df = rows_frame(shards)
    dense = [c for c in df.columns if c.startswith("dense_")]
    sparse = [f.name for f in cfg.features.sparse if not f.multi_hot]
    ds = NaiveTaskDataset(df, sparse, dense)
    naive = {}
    # torch's default (no workers) and the same workers as gmeta; the ratio is against the faster
    for workers in sorted({0, args.workers}):
        it = iter(DataLoader(ds, batch_size=None, shuffle=True, num_workers=workers))
        next(it)
        t0 = time.perf_counter()
        n_tasks = n_rows = 0
        for item in it:
            n_tasks += 1
            n_rows += len(item["support"]["label"]) + len(item["query"]["label"])
            if n_tasks >= args.naive_tasks:
                break
        dt = time.perf_counter() - t0
        naive[workers] = (n_tasks / dt, n_rows / dt)
        print(f"naive pandas Dataset, {workers} worker(s): {n_tasks / dt:7.0f} tasks/s {n_rows / dt:12.0f} rows/s  "
              f"({n_tasks} tasks in {dt:.2f}s)")
    n_tps, n_rps = max(naive.values())
    print(f"ratio gmeta / naive (faster variant): {g_tps / n_tps:.1f}x tasks/s, {g_rps / n_rps:.1f}x rows/s "
          "(target >= 30x)")
    emit("reader_throughput", {"gmeta_tasks_per_s": g_tps, "gmeta_rows_per_s": g_rps, "naive_tasks_per_s": n_tps,
                               "naive_rows_per_s": n_rps, "ratio_tasks": g_tps / n_tps, "workers": args.workers,
                               "batch": args.batch, "tasks": tasks, "rows": rows})


if __name__ == "__main__":
    main()
