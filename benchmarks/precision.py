"""Mixed precision and cold-start quality: MAML on configs/ads_cvr.yaml (synthetic ads-CVR,
one process, one epoch) trained and evaluated on the held-out test tasks with fp32
throughout, fp16 embedding tables (model.embedding_dtype), bf16 autocast of the dense head
(model.dense_autocast), and both. Prints AUC / GAUC of each and the difference to fp32,
a second fp32 seed (the spread that the differences are to be read against), table memory,
and training tasks/s (on this machine's device: on a CPU without bf16
instructions autocast is slower, on a GPU it is the point).

    python -m benchmarks.precision [--steps 0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import emit, prepared_workdir, train_run
from gmeta.checkpoint import load_unsharded
from gmeta.evaluation.evaluate import evaluate
from gmeta.logs import setup_logging

SETTINGS = {
    "fp32": [],
    "fp32 seed 1": ["train.seed=1"],  # the seed-to-seed spread, to read the differences against
    "fp16 tables": ["model.embedding_dtype=fp16"],
    "bf16 head": ["model.dense_autocast=bf16"],
    "fp16 + bf16": ["model.embedding_dtype=fp16", "model.dense_autocast=bf16"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: one epoch)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench-precision"))
    args = ap.parse_args()
    setup_logging(False)  # torchrec's planner quiet, as under gmeta's commands
    work = Path(args.workdir)
    cfg = prepared_workdir(work)
    res = {}
    for name, extra in SETTINGS.items():
        over = [*extra, f"train.max_steps={args.steps}", "train.log_every=100"]
        metrics = train_run(cfg, work, "precision-" + name.replace(" ", "_").replace("+", "and"), 1, over)
        model, mcfg, _ = load_unsharded(work / ("run-precision-" + name.replace(" ", "_").replace("+", "and"))
                                        / "checkpoint")
        report = evaluate(model, mcfg, work / "data/ads_cvr/shards")
        table_mib = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                        if n.startswith("sparse_arch.")) / 2**20
        res[name] = {"auc": report["maml_auc"], "gauc": report["maml_gauc"], "table_mib": table_mib,
                     "tasks_per_s": metrics["train/tasks_per_s_total"]}
        base = res["fp32"]
        print(f"{name:12s}: AUC {report['maml_auc']:.4f} ({report['maml_auc'] - base['auc']:+.4f}) GAUC "
              f"{report['maml_gauc']:.4f} ({report['maml_gauc'] - base['gauc']:+.4f}); tables {table_mib:6.1f} MiB; "
              f"{res[name]['tasks_per_s']:6.0f} tasks/s ({res[name]['tasks_per_s'] / base['tasks_per_s']:.2f}x fp32)",
              flush=True)
    emit("precision", res)


if __name__ == "__main__":
    main()
