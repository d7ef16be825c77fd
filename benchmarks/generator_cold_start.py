"""New ids scored with and without the id generator, on the same held-out tasks.

    python -m benchmarks.generator_cold_start CHECKPOINT [CHECKPOINT ...] [--split eval] [--steps 0 2]

Scores the query rows of the held-out tasks (``--split``, shards as each checkpoint's
config names them, or ``--shards``) with every checkpoint after K inner steps for each K of
``--steps`` (0: zero-shot, the start row alone), and reports AUC and GAUC (per task) over
the query rows whose id of the generator's feature (``--feature``, default ad_id) is new to
the first checkpoint (its ``DefaultRows`` mask), and over all query rows. A checkpoint
without a generator scores new ids from the default row: that is the baseline row of the
table, the ratio column compares every row with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from gmeta.checkpoint import load_unsharded
from gmeta.io.reader import TaskReader
from gmeta.metrics import auc, gauc
from gmeta.scoring import predict_queries


def score(paths: list[str], shards: str | None, split: str, steps: list[int], feature: str,
          max_tasks: int = 0) -> list[dict]:
    models = [load_unsharded(p) for p in paths]
    first, cfg, _ = models[0]
    known = getattr(first.default_rows, f"known_{feature}", None)
    if known is None:
        raise SystemExit(f"{paths[0]}: feature {feature!r} has no default row (min_count / holdout_share): no "
                         "id of it is new to the model")
    shards = shards or cfg.data.shards_dir
    reader = TaskReader(shards, split, cfg.eval.tasks_per_batch, shuffle=False, drop_last=False, num_workers=0,
                        max_tasks=max_tasks, size_buckets=cfg.meta.size_buckets)
    labels, tasks, new = [], [], []
    preds: dict[tuple[int, int], list[np.ndarray]] = {}
    for batch in reader:
        s = batch.num_support
        jt = batch.sparse.to_dict()[feature]
        ids = jt.values()[jt.offsets()[s]:]  # single-valued: one id per query row
        new.append((~known[ids]).numpy())
        labels.append(batch.labels[s:].numpy())
        q = (batch.query_offsets[1:] - batch.query_offsets[:-1]).numpy()
        tasks.append(np.repeat(batch.task_ids.numpy(), q))
        for i, (model, mcfg, _) in enumerate(models):
            for k, p in predict_queries(model, mcfg, batch, steps).items():
                preds.setdefault((i, k), []).append(p)
    y, g, is_new = np.concatenate(labels), np.concatenate(tasks), np.concatenate(new)
    out = []
    for (i, k), parts in sorted(preds.items()):
        p = np.concatenate(parts)
        out.append({"checkpoint": paths[i], "generator": models[i][1].generator.feature or "-", "k": k,
                    "new_rows": int(is_new.sum()), "rows": len(y),
                    "new_auc": auc(y[is_new], p[is_new]), "new_gauc": gauc(y[is_new], p[is_new], g[is_new]),
                    "auc": auc(y, p), "gauc": gauc(y, p, g)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--shards", default=None)
    ap.add_argument("--split", default="eval", choices=["eval", "val"])
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--feature", default="ad_id")
    ap.add_argument("--max-tasks", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the rows to this file")
    a = ap.parse_args()
    torch.set_grad_enabled(True)
    rows = score(a.checkpoints, a.shards, a.split, a.steps, a.feature, a.max_tasks)
    base = {r["k"]: r for r in rows if r["checkpoint"] == a.checkpoints[0]}
    print(f"{'checkpoint':<40} {'gen':>6} {'K':>2} {'new rows':>8} {'new AUC':>8} {'new GAUC':>8} "
          f"{'x first':>7} {'AUC':>7} {'GAUC':>7}")
    for r in rows:
        ratio = r["new_gauc"] / base[r["k"]]["new_gauc"]
        print(f"{Path(r['checkpoint']).parent.name + '/' + Path(r['checkpoint']).name:<40} {r['generator']:>6} "
              f"{r['k']:>2} {r['new_rows']:>8} {r['new_auc']:>8.4f} {r['new_gauc']:>8.4f} {ratio:>7.3f} "
              f"{r['auc']:>7.4f} {r['gauc']:>7.4f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
