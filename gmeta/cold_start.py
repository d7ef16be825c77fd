"""The cold-start results table: ERM, ERM fine-tuned per task and four MAML variants on
MovieLens (user cold start) and on the synthetic ads-CVR set, over several seeds.

    python -m gmeta.cold_start --movielens data/movielens/raw --out runs/cold_start

For each data set the shards are prepared once (one fixed split of the tasks into train,
val and test); then for every seed (``train.seed``: initialisation and task order) each
model is trained in this process (one rank) and scored on the test tasks:

- ERM: plain training on all rows of the training tasks, no adaptation at test time;
- ERM + fine-tuning: the same ERM model, fine-tuned on each test task's support rows with
  the inner loop's SGD (dense layers and embedding rows); learning rates and number of steps
  chosen on the validation tasks, per seed;
- MAML adapting the dense layers only (MeLU-style: embeddings fixed in the inner loop);
- MAML adapting the dense layers and the embedding rows the task looks up;
  both first and second order; the number of inner steps at test time chosen on the
  validation tasks (among FINE_TUNE_STEPS), the learning rates those of meta-training.

Every figure of the table comes from one run of this module with fixed seeds; the table
gives the mean and the standard deviation over the seeds, and results.json every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("gmeta.cold_start")


@dataclass
class Variant:
    name: str
    slug: str  # its runs' directory
    overrides: list[str] = field(default_factory=list)
    fine_tune: bool = False  # evaluate the ERM model of this seed with per-task fine-tuning


VARIANTS = [
    Variant("ERM", "erm", ["meta.algorithm=erm"]),
    Variant("ERM + fine-tuning", "erm", ["meta.algorithm=erm"], fine_tune=True),
    Variant("MAML dense only (MeLU-style), 1st order", "maml_dense_fo",
            ["meta.adapt_embeddings=false", "meta.first_order=true"]),
    Variant("MAML dense only (MeLU-style), 2nd order", "maml_dense_so",
            ["meta.adapt_embeddings=false", "meta.first_order=false"]),
    Variant("MAML dense + embeddings, 1st order", "maml_full_fo",
            ["meta.adapt_embeddings=true", "meta.first_order=true"]),
    Variant("MAML dense + embeddings, 2nd order", "maml_full_so",
            ["meta.adapt_embeddings=true", "meta.first_order=false"]),
]
# fine-tuning grid: (dense lr, embedding-row lr); the steps are read off one curve per lr
FINE_TUNE_LRS = [(0.01, 0.05), (0.03, 0.15), (0.1, 0.5), (0.3, 1.5), (1.0, 5.0)]
FINE_TUNE_STEPS = [1, 2, 3, 5]
METRICS = ("auc", "gauc", "logloss")


@dataclass
class Dataset:
    name: str
    config: Path
    overrides: list[str]
    raw: Path | None = None  # None: generated (gmeta synth)


def _train(config: Path, overrides: list[str]) -> Path:
    """Train in this process as a one-rank job; returns the checkpoint."""
    from gmeta import train
    from gmeta.config import load_config

    cfg = load_config(config, overrides)
    result = train.main(cfg)  # a one-process group of its own, destroyed at the end
    # with validation during training (train.val_every_steps), the best validated weights
    return Path(result.get("best_checkpoint") or Path(cfg.train.output_dir) / "checkpoint")


def _evaluate(ckpt: Path, shards: Path, *, split: Literal["eval", "val"] = "eval", lrs: tuple | None = None,
              steps: list[int] | None = None) -> dict:
    """Evaluation report of a checkpoint on a split, adapted with K of ``steps`` (the largest
    is the report's own K, the rest its K curve). ``lrs``: (dense lr, embedding lr) to adapt
    an ERM model with, dense layers and embedding rows (per-task fine-tuning)."""
    from gmeta.checkpoint import load_unsharded
    from gmeta.evaluate import evaluate

    model, cfg, _ = load_unsharded(ckpt)
    cfg.eval.split = split
    cfg.eval.curve_steps = list(steps or [0])
    if lrs is not None:  # score the ERM model as an adapted one
        cfg.meta.algorithm = "maml"
        cfg.meta.inner_lr, cfg.meta.embedding_inner_lr = lrs
        cfg.meta.adapt_dense = ["dense_arch", "over_arch"]
        cfg.meta.adapt_embeddings = True
    if steps:
        cfg.meta.inner_steps = max(steps)
    report = evaluate(model, cfg, shards)
    assert report is not None  # one process (one rank, no process group): evaluate returns the report
    return report


def _scores(report: dict, name: str) -> dict[str, float]:
    return {m: float(report[f"{name}_{m}"]) for m in METRICS}


def _adapted(ckpt: Path, shards: Path, lr_grid: list) -> dict:
    """Inner steps K (and, fine-tuning an ERM model, the learning rates) with the best AUC
    on the validation tasks, then scored on the test tasks. ``lr_grid``: [None] keeps the
    learning rates the model was meta-trained with."""
    from gmeta.report import NonFiniteScores

    best: tuple[float, tuple[float, float] | None, int] | None = None
    for lrs in lr_grid:
        try:
            curve = _evaluate(ckpt, shards, split="val", lrs=lrs, steps=FINE_TUNE_STEPS)["auc_vs_k"]
        except NonFiniteScores as e:  # these rates diverge on the validation tasks: not a choice
            log.info("%s: rates %s left out: %s", ckpt, lrs, e)
            continue
        for k, auc in zip(curve["k"], curve["auc"]):
            if k > 0 and (best is None or auc > best[0]):
                best = (auc, lrs, k)
    if best is None:
        raise NonFiniteScores(f"{ckpt}: every setting of {lr_grid} diverged on the validation tasks")
    _, lrs, k = best
    out = _scores(_evaluate(ckpt, shards, lrs=lrs, steps=[k]), "maml")
    out["inner_steps"] = k
    if lrs is not None:
        out.update(inner_lr=lrs[0], embedding_inner_lr=lrs[1])
    return out


def _prepare(ds: Dataset, out: Path) -> Path:
    from gmeta.config import load_config
    from gmeta.io.prepare import prepare

    cfg = load_config(ds.config, ds.overrides)
    if cfg.model.objective != "binary":
        raise ValueError(f"{ds.name}: the table reports AUC, GAUC and logloss; model.objective must be binary, "
                         f"got {cfg.model.objective!r}")
    raw = ds.raw
    if raw is None:
        from gmeta.synth import generate

        raw = out / "raw"
        generate(cfg, raw)
    shards = out / "shards"
    m = prepare(cfg, raw, shards)
    log.info("%s: %s", ds.name, {k: v["tasks"] for k, v in m["splits"].items()})
    return shards


def run(datasets: list[Dataset], seeds: list[int], out: Path, variants: list[Variant] = VARIANTS) -> dict:
    """Train and score every variant on every data set for every seed; returns the results."""
    results: dict = {"seeds": seeds, "datasets": {}}
    for ds in datasets:
        base = out / ds.name.lower().replace(" ", "_")
        shards = _prepare(ds, base)
        runs: dict[str, list[dict]] = {v.name: [] for v in variants}
        oracle = None
        for seed in seeds:
            trained: dict[str, Path] = {}  # slug -> checkpoint of this seed
            for v in variants:
                t0 = time.perf_counter()
                if v.slug not in trained:
                    trained[v.slug] = _train(ds.config, ds.overrides + v.overrides + [
                        f"data.shards_dir={shards}", f"train.seed={seed}", "train.eval_at_end=false",
                        f"train.output_dir={base}/{v.slug}/seed{seed}", "tracking.enabled=false",
                        "train.nproc_per_node=1"])
                if v.fine_tune:
                    scores = _adapted(trained[v.slug], shards, FINE_TUNE_LRS)
                elif "meta.algorithm=erm" in v.overrides:
                    report = _evaluate(trained[v.slug], shards)
                    scores = _scores(report, "erm")
                    if "oracle_auc" in report:  # true probabilities of the same test tasks: one value
                        oracle = float(report["oracle_auc"])
                else:
                    scores = _adapted(trained[v.slug], shards, [None])
                scores["seconds"] = round(time.perf_counter() - t0, 1)
                runs[v.name].append(scores)
                log.info("%s seed %d %s: %s", ds.name, seed, v.name, scores)
        results["datasets"][ds.name] = {"runs": runs, "oracle_auc": oracle}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def format_table(results: dict) -> str:
    """Markdown: one row per data set and model, mean ± standard deviation over the seeds."""
    n = len(results["seeds"])
    lines = ["| data set | model | AUC | GAUC | logloss |", "|---|---|---|---|---|"]
    for ds, r in results["datasets"].items():
        for name, runs in r["runs"].items():
            cells = [_mean_sd([x[m] for x in runs]) for m in METRICS]
            lines.append(f"| {ds} | {name} | " + " | ".join(cells) + " |")
        if r["oracle_auc"] is not None:
            lines.append(f"| {ds} | oracle (true probabilities) | {r['oracle_auc']:.4f} | | |")
    lines.append(f"\nMean ± standard deviation over {n} seed(s) ({', '.join(map(str, results['seeds']))}); "
                 "test tasks only (user- or campaign-cold).")
    return "\n".join(lines)


def _datasets(args) -> list[Dataset]:
    out = []
    if args.movielens:
        out.append(Dataset("MovieLens-100K" if "100k" in str(args.movielens).lower() else "MovieLens",
                           ROOT / "configs" / "movielens.yaml", list(args.movielens_override),
                           raw=Path(args.movielens)))
    if args.ads_tasks:
        out.append(Dataset("synthetic ads-CVR", ROOT / "configs" / "ads_cvr.yaml",
                           [f"synth.num_tasks={args.ads_tasks}", "data.split.val_fraction=0.05",
                            *args.ads_override]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmeta.cold_start", description=__doc__.split("\n\n")[0])
    p.add_argument("--movielens", default=str(ROOT / "data" / "movielens" / "raw"),
                   help="MovieLens files (see data.source.format: movielens); '' to skip")
    p.add_argument("--ads-tasks", type=int, default=20000, help="synthetic ads-CVR tasks (0 to skip)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "runs" / "cold_start"))
    p.add_argument("--movielens-override", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--ads-override", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("-v", "--verbose", action="store_true", help="show torchrec's planner, fbgemm and torch output")
    args = p.parse_args(argv)
    from gmeta.logs import setup_logging

    # the root logger at INFO printed torchrec's planner table and fbgemm's lines for every model trained
    setup_logging(args.verbose or None)
    from gmeta.parallel.dist import configure_threads

    # once, for the whole table: every model is trained and scored in this one process
    # (train.main sets it again, to the same value unless a config sets train.threads)
    configure_threads(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run(_datasets(args), args.seeds, out)
    table = format_table(results)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\n{results['seconds']:.0f}s; every run: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
