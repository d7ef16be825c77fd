"""The baseline a recommender engineer tries first on a rating task: no model, only means.

    python -m benchmarks.bias_baseline SHARDS [--label-column label]

Reads the task shards ``gmeta prepare`` wrote (regression objective) and scores the query
rows of the held-out tasks with
  global   the mean rating of the training rows;
  item     the item's mean training rating, shrunk to the global mean by k_item pseudo-rows;
  item + task offset  that, plus the task's (the user's) mean residual over its own support
           rows, shrunk to 0 by k_task pseudo-rows: the per-task adaptation of a bias model.
The two shrinkage constants are chosen on the validation tasks (RMSE) over a fixed grid and
then scored once on the test tasks, as the cold-start table chooses every model's settings.
Pure numpy over the shards (a groupby of a few thousand rows): nothing here needs a library
beyond pyarrow to read them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

K_ITEM = [0, 1, 2, 5, 10, 20, 50]
K_TASK = [0, 1, 2, 5, 10, 20, 50]


def read_split(shards: Path, split: str, item: str) -> dict[str, np.ndarray]:
    """Every row of a split: task index, side (0 support, 1 query), item id, label."""
    task, side, ids, label = [], [], [], []
    n = 0
    for path in sorted((shards / split).glob("*.parquet")):
        t = pq.read_table(path, columns=["support", "query"])
        for s, name in enumerate(("support", "query")):
            col = t.column(name).combine_chunks()
            lengths = np.diff(col.field("label").offsets.to_numpy())
            task.append(np.repeat(np.arange(n, n + len(lengths)), lengths))
            side.append(np.full(int(lengths.sum()), s))
            ids.append(col.field(item).flatten().to_numpy())
            label.append(col.field("label").flatten().to_numpy().astype(np.float64))
        n += t.num_rows
    return {"task": np.concatenate(task), "side": np.concatenate(side), "item": np.concatenate(ids),
            "label": np.concatenate(label)}


def predict(train: dict, split: dict, k_item: float, k_task: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global, item, item + task offset) predictions of the split's query rows."""
    g = train["label"].mean()
    items, inv = np.unique(train["item"], return_inverse=True)
    sums, counts = np.bincount(inv, train["label"]), np.bincount(inv)
    item_mean = (sums + k_item * g) / (counts + k_item)

    def of(ids: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(items, ids), 0, len(items) - 1)
        return np.where(items[pos] == ids, item_mean[pos], g)  # an item new to training: the global mean

    sup = split["side"] == 0
    resid = split["label"][sup] - of(split["item"][sup])
    n_tasks = int(split["task"].max()) + 1
    offset = np.bincount(split["task"][sup], resid, n_tasks) / (np.bincount(split["task"][sup], None, n_tasks)
                                                                 + k_task + 1e-12)
    q = ~sup
    base = of(split["item"][q])
    return np.full(int(q.sum()), g), base, base + offset[split["task"][q]]


def errors(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    return float(np.sqrt(np.mean((pred - y) ** 2))), float(np.mean(np.abs(pred - y)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards", type=Path)
    ap.add_argument("--item", default="item_id", help="the item feature (default: item_id)")
    args = ap.parse_args(argv)
    train = read_split(args.shards, "train", args.item)
    val, test = read_split(args.shards, "val", args.item), read_split(args.shards, "eval", args.item)
    yv, yt = val["label"][val["side"] == 1], test["label"][test["side"] == 1]
    best_i = min(K_ITEM, key=lambda k: errors(predict(train, val, k, 0)[1], yv)[0])
    best_t = min(K_TASK, key=lambda k: errors(predict(train, val, best_i, k)[2], yv)[0])
    # (the item constant first, then the task's given it: 14 validation scorings, not 49)
    print(f"shards: {args.shards}; chosen on {len(yv)} validation query rows: k_item {best_i}, k_task {best_t}")
    print("| predictor | RMSE (test) | MAE (test) |\n|---|---|---|")
    for name, pred in zip(("global mean", "item mean", "item mean + task offset"),
                          predict(train, test, best_i, best_t)):
        rmse, mae = errors(pred, yt)
        print(f"| {name} | {rmse:.4f} | {mae:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
