"""The warm-up table of item cold start (``python -m gmeta.cold_start --warmup``): one row
per method of ``gmeta.warmup`` (the model's initial row, a random initial row, the
meta-learner's own inner loop, ERM fine-tuned), one column per stage (cold, a, a+b, a+b+c),
mean ± standard deviation over the seeds; on the synthetic ads set (task = ad) and on
MovieLens (task = movie), each prepared under ``data.split.rule: warmup``.

The machinery of the cold-start table (``gmeta.cold_start``): the shards are prepared once
per data set; the ERM base model and the meta-learner are each searched with the same number
of Optuna trials on the validation ids, then trained once per seed; the warm-up evaluation
chooses every rate and step count on the validation ids again and scores the test ids once.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from gmeta.cold_start import Dataset, Variant, _prepare, _search, _train

log = logging.getLogger("gmeta.cold_start")

VARIANTS = [Variant("ERM (base model)", "erm", ["meta.algorithm=erm"], erm=True),
            Variant("MAML (new id's rows)", "maml", ["meta.algorithm=maml"])]
SHOWN = ("auc", "gauc", "logloss")


def run_table(datasets: list[Dataset], seeds: list[int], out: Path, trials: int = 0) -> dict:
    """Search, train and score under the warm-up protocol every data set for every seed;
    results.json in ``out`` after each seed."""
    from gmeta.checkpoint import load_unsharded
    from gmeta.warmup import warmup_report

    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"protocol": "warmup", "seeds": seeds, "trials": trials, "datasets": {}}

    def save() -> None:
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, default=lambda v: None))
        tmp.replace(out / "results.json")

    for ds in datasets:
        base = out / ds.name.lower().replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        shards = _prepare(ds, base)
        fixed = [f"data.shards_dir={shards}", "train.eval_at_end=false", "tracking.enabled=false",
                 "train.nproc_per_node=1", "sweep.nproc_per_trial=1", f"train.val_every_steps={ds.val_every_steps}"]
        entry: dict = {"runs": [], "search": {}}
        results["datasets"][ds.name] = entry
        best: dict[str, list[str]] = {}
        for v in VARIANTS:
            t0 = time.perf_counter()
            best[v.slug], info = _search(ds, v, fixed, base / v.slug / "search", trials)
            entry["search"][v.name] = {**info, "overrides": best[v.slug], "seconds": round(time.perf_counter() - t0, 1)}
        for seed in seeds:
            t0 = time.perf_counter()
            ckpt = {v.slug: _train(ds.config, [*ds.overrides, *v.overrides, *best[v.slug], *fixed,
                                               f"train.seed={seed}", f"train.output_dir={base}/{v.slug}/seed{seed}",
                                               "train.resume=auto"]) for v in VARIANTS}
            model, cfg, _ = load_unsharded(ckpt["maml"])
            bmodel, bcfg, _ = load_unsharded(ckpt["erm"])
            report = warmup_report(model, cfg, shards, baseline=(bmodel, bcfg), seed=seed)
            entry["runs"].append({"seed": seed, "report": report, "seconds": round(time.perf_counter() - t0, 1),
                                  "checkpoints": {k: str(p) for k, p in ckpt.items()}})
            log.info("%s seed %d: warm-up %s", ds.name, seed,
                     {n: {s: c.get("auc") for s, c in e["stages"].items()} for n, e in report["methods"].items()})
            save()
    save()
    return results


def _mean_sd(values: list[float]) -> str:
    if any(v is None or v != v for v in values):
        return f"n/a ({sum(v is None or v != v for v in values)} of {len(values)} seeds)"
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def format_table(results: dict) -> str:
    """Markdown: per data set and metric, a row per method, a column per stage."""
    out = []
    for ds, entry in results["datasets"].items():
        runs = entry["runs"]
        if not runs:
            continue
        first = runs[0]["report"]
        heads = [f"{s} ({n})" for s, n in zip(first["stages"], first["support_rows"])]
        for metric in SHOWN:
            lines = [f"{ds}, {metric.upper() if metric != 'logloss' else 'logloss'} "
                     f"({int(first.get('tasks', 0))} test ids, K = {first['warmup_rows']}):", "",
                     "| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
            for name, e in first["methods"].items():
                cells = [_mean_sd([r["report"]["methods"][name]["stages"][s].get(metric) for r in runs])
                         for s in first["stages"]]
                lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
        search = "; ".join(f"{k}: {v.get('trials', 0)} trials" for k, v in entry["search"].items())
        out.append(f"Search ({ds}): {search}, on the validation ids.")
    scored = sorted({r["seed"] for e in results["datasets"].values() for r in e["runs"]})
    out.append(f"Mean ± standard deviation over {len(scored)} seed(s) "
               f"({', '.join(map(str, scored))}); test ids only. Stage: the new id's warm-up rows updated "
               "on (cold: none); the rate and steps of every method at every stage chosen on the validation ids.")
    return "\n\n".join(out)
