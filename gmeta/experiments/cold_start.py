"""The cold-start results table: ERM, ERM fine-tuned per task and the meta-learning variants
on MovieLens (user cold start; click and rating) and on the synthetic ads-CVR set, each
searched with the same budget on the validation tasks, then trained over several seeds and
scored on the test tasks.

    python -m gmeta.experiments.cold_start --movielens data/movielens/raw --trials 12 --out runs/cold_start

For each data set the shards are prepared once (one fixed split of the tasks into train,
validation and test). Then for every variant:

1. search (``--trials`` N > 0): an Optuna sweep (``gmeta.training.sweep``) of N trials over the data
   set config's ``sweep.params``, less the keys the variant fixes and, for ERM, the keys of
   meta-learning; each trial scored by its best validation metric (GAUC, or RMSE for the
   rating objective) on the validation tasks. Every variant gets the same N;
2. for every seed (``train.seed``: initialisation and task order) the best configuration is
   trained in this process (one rank; the weights of its best validation kept);
3. at test time, on the validation tasks again: ERM fine-tuned per task chooses its K and
   rates on a grid (``gmeta.evaluation.finetune.FINE_TUNE_LRS`` x ``STEPS``); an adapted model its K
   and its rates scaled by ``RATE_SCALES`` (``STEPS``); then the test tasks are scored once.

The table gives each row's mean and standard deviation over the seeds and its search
budget; results.json holds every run, the choices made and whether one lies at the edge
of its grid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("gmeta.experiments.cold_start")


@dataclass
class Variant:
    name: str
    slug: str  # its runs' directory
    overrides: list[str] = field(default_factory=list)
    fine_tune: bool = False  # the ERM model of this seed, fine-tuned per task
    erm: bool = False  # a plain model: no adaptation of its own, no meta-learning keys searched
    task_rows: bool = False  # adapt the rows of the data set's task-side features only (Dataset.task_features)

    def overrides_for(self, ds: Dataset) -> list[str]:
        if not self.task_rows:
            return list(self.overrides)
        return [*self.overrides, f"meta.adapt_features=[{', '.join(ds.task_features)}]"]


_MAML = ["meta.algorithm=maml", "meta.adapt_embeddings=true", "meta.first_order=false"]
VARIANTS = [
    Variant("ERM", "erm", ["meta.algorithm=erm"], erm=True),
    Variant("ERM + fine-tuning", "erm", ["meta.algorithm=erm"], fine_tune=True, erm=True),
    Variant("MAML (dense + embeddings, 2nd order)", "maml", [*_MAML, "meta.adapt_dense=[all]",
                                                             "meta.dense_adaptation=weights"]),
    Variant("MAML, ANIL (last layer + embeddings)", "anil", [*_MAML, "meta.adapt_dense=[last]",
                                                             "meta.dense_adaptation=weights"]),
    Variant("MAML, FiLM of every layer + embeddings", "film", [*_MAML, "meta.adapt_dense=[all]",
                                                               "meta.dense_adaptation=film"]),
    Variant("MAML, biases + embeddings", "bias", [*_MAML, "meta.adapt_dense=[all]",
                                                  "meta.dense_adaptation=bias"]),
    Variant("MAML, ANIL + the task side's rows", "anil_task", [*_MAML, "meta.adapt_dense=[last]",
                                                              "meta.dense_adaptation=weights"], task_rows=True),
    Variant("Reptile (dense + embeddings)", "reptile", ["meta.algorithm=reptile", "meta.adapt_embeddings=true",
                                                        "meta.adapt_dense=[all]",
                                                        "meta.dense_adaptation=weights"]),
]
BY_SLUG: dict[str, Variant] = {}  # erm_ft: ERM + fine-tuning
for _v in VARIANTS:
    BY_SLUG.setdefault(_v.slug + ("_ft" if _v.fine_tune else ""), _v)
METRICS = {"binary": ("gauc", "auc", "logloss"), "regression": ("rmse", "mae")}
# keys of a search space that only meta-learning uses (left out of ERM's search)
_META_KEYS = ("meta.", "train.pretrain_epochs")


@dataclass
class Dataset:
    name: str
    config: Path
    overrides: list[str]
    raw: Path | None = None  # None: generated (gmeta synth)
    val_every_steps: int = 6  # validations during training: what a trial is scored by, and the best weights kept
    # features that describe the task itself (the user; the campaign's ad and advertiser):
    # the rows a "task side" variant adapts, leaving the other side's (items, users) shared
    task_features: list[str] = field(default_factory=list)
    # generated data: the config gmeta synth writes it with, when not ``config`` (a warm-up
    # config keys tasks by ad, the generator by campaign); the synth.* overrides apply to it
    synth_config: Path | None = None
    # the warm-up table's id generator (``generator.*`` overrides: its feature and the id's
    # attributes), trained per seed with generator.mode base_fixed on the ERM base model, or
    # jointly with a model of its own (``generator_joint``)
    generator: list[str] = field(default_factory=list)
    generator_joint: bool = False


def _train(config: Path, overrides: list[str]) -> Path:
    """Train in this process as a one-rank job; returns the checkpoint."""
    from gmeta.config import load_config
    from gmeta.training import run as train

    cfg = load_config(config, overrides)
    result = train.main(cfg)  # a one-process group of its own, destroyed at the end
    # with validation during training (train.val_every_steps), the best validated weights
    return Path(result.get("best_checkpoint") or Path(cfg.train.output_dir) / "checkpoint")


def _evaluate(ckpt: Path, shards: Path, *, split: str = "eval", adapt: tuple[float, float, int] | None = None,
              fine_tune: bool = False) -> dict:
    """Evaluation report of a checkpoint on a split; ``adapt``: (inner lr, embedding lr, K)
    to adapt it with (``fine_tune``: an ERM model, all its dense layers and rows)."""
    from gmeta.checkpoint import load_unsharded
    from gmeta.evaluation.evaluate import evaluate
    from gmeta.evaluation.finetune import adapting

    model, cfg, _ = load_unsharded(ckpt)
    if adapt is not None:
        cfg = adapting(cfg, *adapt, fine_tune=fine_tune)
    else:
        cfg.eval.curve_steps = [0]
    cfg.eval.split = split  # type: ignore[assignment]
    report = evaluate(model, cfg, shards)
    assert report is not None  # one process (one rank, no process group): evaluate returns the report
    return report


def _scores(report: dict, name: str, objective: str) -> dict[str, float]:
    """Scorer ``name``'s metrics of ``report``; with several labels (``report["labels"]``),
    also each label's, keyed ``<metric>_<label>``, and ESMM's pCTCVR AUC (``ctcvr_auc``)."""
    out = {m: float(report[f"{name}_{m}"]) for m in METRICS[objective]}
    for label in report.get("labels", []):
        out.update({f"{m}_{label}": float(report[f"{name}_{m}_{label}"]) for m in METRICS[objective]})
    if f"{name}_ctcvr_auc" in report:
        out["ctcvr_auc"] = float(report[f"{name}_ctcvr_auc"])
    return out


def _label_columns(runs: dict[str, list[dict]], metrics: tuple[str, ...]) -> list[str]:
    """The per-label columns of a data set's rows (``_scores``), in label then metric order:
    none for one label."""
    keys = {k for rs in runs.values() for x in rs for k in x}
    labels = [k[len(metrics[0]) + 1:] for k in sorted(keys) if k.startswith(f"{metrics[0]}_")]
    return [f"{m}_{label}" for label in labels for m in metrics] + (["ctcvr_auc"] if "ctcvr_auc" in keys else [])


def _adapted(ckpt: Path, shards: Path, objective: str, *, fine_tune: bool) -> dict:
    """K and the inner rates chosen on the validation tasks (``gmeta.evaluation.finetune.choose``),
    then the test tasks scored once with them."""
    from gmeta.checkpoint import load_unsharded
    from gmeta.evaluation.evaluate import evaluate
    from gmeta.evaluation.finetune import choose
    from gmeta.evaluation.report import NonFiniteScores

    model, cfg, _ = load_unsharded(ckpt)
    c = choose(evaluate, model, cfg, shards, fine_tune=fine_tune)
    try:
        out: dict = _scores(_evaluate(ckpt, shards, adapt=(c.inner_lr, c.embedding_inner_lr, c.steps),
                                      fine_tune=fine_tune), "maml", objective)
    except NonFiniteScores as e:  # chosen on validation, diverged on some test task: the row's figure
        log.warning("%s: %s diverged on the test tasks: %s", ckpt, c.describe(), e)
        out = {**dict.fromkeys(METRICS[objective], float("nan")), "diverged": True}
    out.update(inner_steps=c.steps, inner_lr=c.inner_lr, embedding_inner_lr=c.embedding_inner_lr,
               val_metric=c.value, at_edge=c.at_edge)
    return out


def _prepare(ds: Dataset, out: Path) -> Path:
    from gmeta.config import load_config
    from gmeta.io.manifest import MANIFEST, load_manifest
    from gmeta.io.prepare import prepare

    cfg = load_config(ds.config, ds.overrides)
    shards = out / "shards"
    # what the shards were made from: a table continued in the same --out reuses them (the
    # runs it already has were trained on them), and makes them again if any of it changed
    made_from = {"config": str(ds.config), "overrides": list(ds.overrides), "raw": str(ds.raw)}
    stamp = out / "prepared.json"
    if (shards / MANIFEST).is_file() and stamp.is_file() and json.loads(stamp.read_text()) == made_from:
        m = load_manifest(shards)
        log.info("%s: shards %s reused (%s)", ds.name, shards, stamp)
    else:
        if stamp.is_file() and any(d.is_dir() and d.name not in ("raw", "shards") for d in out.iterdir()):
            # its searches and seeds were made on the shards of another config: refuse to mix them
            raise ValueError(f"{out}: made from {stamp.read_text().strip()}, not from {json.dumps(made_from)}; "
                             "its runs would be scored on other shards: pass another --out, or remove "
                             f"{out} to start this data set again")
        stamp.unlink(missing_ok=True)
        raw = ds.raw
        if raw is None:
            from gmeta.io.synth import generate

            raw = out / "raw"
            generate(load_config(ds.synth_config, [o for o in ds.overrides if o.startswith("synth.")])
                     if ds.synth_config else cfg, raw)
        m = prepare(cfg, raw, shards)
        stamp.write_text(json.dumps(made_from, indent=2))
    log.info("%s: %s", ds.name, {k: v["tasks"] for k, v in m["splits"].items()})
    if not m["splits"].get("val", {}).get("tasks"):
        raise ValueError(f"{ds.name}: no validation tasks (data.split.val_fraction): every choice of the table is "
                         "made on them")
    return shards


def _space(ds: Dataset, v: Variant, fixed: list[str]):
    """The variant's search space: the data set's sweep.params less the keys it fixes (and,
    for ERM, the keys of meta-learning)."""
    from gmeta.config import load_config

    cfg = load_config(ds.config, [*ds.overrides, *fixed])
    set_keys = {o.split("=", 1)[0] for o in v.overrides_for(ds)}
    return [p for p in cfg.sweep.params
            if p.key not in set_keys and not (v.erm and p.key.startswith(_META_KEYS))]


def _search(ds: Dataset, v: Variant, fixed: list[str], out: Path, trials: int) -> tuple[list[str], dict]:
    """The variant's best overrides after ``trials`` trials on the validation tasks, and
    what was searched ({"trials": 0} when nothing was)."""
    return _sweep(f"{ds.name} / {v.name}", ds.config, [*ds.overrides, *v.overrides_for(ds), *fixed],
                  _space(ds, v, fixed), out, trials)


def _sweep(what: str, config_path: Path, overrides: list[str], space: list, out: Path,
           trials: int) -> tuple[list[str], dict]:
    """The best overrides of ``space`` after ``trials`` trials of the config (its overrides
    applied) on the validation ids, and what was searched ({"trials": 0} when nothing was)."""
    from gmeta.config import dump_yaml, load_config
    from gmeta.training.sweep import run_sweep

    if trials <= 0 or not space:
        return [], {"trials": 0, "keys": []}
    cfg = load_config(config_path, overrides)
    cfg.sweep.params = space
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"  # the searched run's own config: its fixed keys and its space
    config.write_text(dump_yaml(cfg))
    summary = run_sweep(config, [], out, trials=trials)
    best = summary.get("best")
    if best is None:
        raise RuntimeError(f"{what}: no trial of the search completed ({out / 'trials.md'})")
    done = sum(1 for t in summary["trials"] if t["state"] in ("COMPLETE", "PRUNED"))
    return [f"{k}={val}" for k, val in best["params"].items()], {
        "trials": done, "keys": [p.key for p in space], "metric": summary["metric"], "best": best}


def _previous(out: Path, seeds: list[int]) -> dict:
    """results.json of an earlier run into the same ``out`` (one cut short, or one of other
    data sets or rows), its runs of these seeds only; else a new, empty one."""
    path = out / "results.json"
    if not path.is_file():
        return {"seeds": seeds, "datasets": {}}
    old = json.loads(path.read_text())
    for entry in old.get("datasets", {}).values():
        for name in list(entry.get("runs", {})):
            entry["runs"][name] = [x for x in entry["runs"][name] if x.get("seed") in seeds]
    old["seeds"] = seeds
    return old


def run(datasets: list[Dataset], seeds: list[int], out: Path, variants: list[Variant] = VARIANTS,
        trials: int = 0) -> dict:
    """Search, train and score every variant on every data set for every seed; returns the
    results. Into an ``out`` that holds an earlier run's results.json, the table
    grows: rows and data sets not run now are kept, and a row whose search found the same
    overrides keeps the seeds it has (a run cut short continues: searches resume their
    Optuna study, a seed cut mid-training resumes from its last checkpoint)."""
    from gmeta.config import load_config

    results = _previous(out, seeds)
    results["trials"] = trials

    def save() -> None:  # after every seed scored: a cut run loses at most the one in progress
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(out / "results.json")

    for ds in datasets:
        base = out / ds.name.lower().replace(" ", "_").replace("(", "").replace(")", "")
        objective = load_config(ds.config, ds.overrides).model.objective
        shards = _prepare(ds, base)
        fixed = [f"data.shards_dir={shards}", "train.eval_at_end=false", "tracking.enabled=false",
                 "train.nproc_per_node=1", "sweep.nproc_per_trial=1", f"train.val_every_steps={ds.val_every_steps}"]
        entry = results["datasets"].setdefault(ds.name, {"runs": {}, "search": {}, "oracle_auc": None})
        entry["objective"] = objective
        searched: dict[str, dict] = {}
        best_overrides: dict[str, list[str]] = {}
        for v in variants:
            if v.slug not in best_overrides:
                t0 = time.perf_counter()
                best_overrides[v.slug], info = _search(ds, v, fixed, base / v.slug / "search", trials)
                info["seconds"] = round(time.perf_counter() - t0, 1)
                searched[v.slug] = info
                log.info("%s %s: searched %s -> %s", ds.name, v.slug, info, best_overrides[v.slug])
        for v in variants:
            old = entry["search"].get(v.name, {})
            if old.get("overrides") != best_overrides[v.slug]:  # searched anew: its old seeds go
                entry["runs"][v.name] = []
            else:
                entry["runs"].setdefault(v.name, [])
            entry["search"][v.name] = {**searched[v.slug], "overrides": best_overrides[v.slug]}
        for seed in seeds:
            trained: dict[str, Path] = {}  # slug -> checkpoint of this seed
            for v in variants:
                runs = entry["runs"][v.name]
                have = next((x for x in runs if x.get("seed") == seed), None)
                if have is not None:
                    if have.get("checkpoint"):
                        trained.setdefault(v.slug, Path(have["checkpoint"]))
                    log.info("%s seed %d %s: kept from %s", ds.name, seed, v.name, out / "results.json")
                    continue
                t0 = time.perf_counter()
                if v.slug not in trained:
                    trained[v.slug] = _train(ds.config, [
                        *ds.overrides, *v.overrides_for(ds), *best_overrides[v.slug], *fixed, f"train.seed={seed}",
                        f"train.output_dir={base}/{v.slug}/seed{seed}", "train.resume=auto"])
                if v.erm and not v.fine_tune:
                    report = _evaluate(trained[v.slug], shards)
                    scores: dict = _scores(report, "erm", objective)
                    if "oracle_auc" in report:  # true probabilities of the same test tasks: one value
                        entry["oracle_auc"] = float(report["oracle_auc"])
                else:
                    scores = _adapted(trained[v.slug], shards, objective, fine_tune=v.fine_tune)
                scores.update(seed=seed, checkpoint=str(trained[v.slug]), seconds=round(time.perf_counter() - t0, 1))
                runs.append(scores)
                runs.sort(key=lambda x: seeds.index(x["seed"]) if x.get("seed") in seeds else len(seeds))
                log.info("%s seed %d %s: %s", ds.name, seed, v.name, scores)
                save()
        save()
    for ds, entry in results["datasets"].items():  # rows kept from earlier runs that lack some of these seeds
        for name, runs in list(entry["runs"].items()):
            if {x.get("seed") for x in runs} != set(seeds):
                log.warning("%s / %s: has seeds %s, not %s: left out of the table (run it again with --variants)",
                            ds, name, sorted(x.get("seed") for x in runs), seeds)
                del entry["runs"][name]
    save()
    return results


def _mean_sd(values: list[float]) -> str:
    if any(v != v for v in values):  # NaN: the adaptation diverged on the test tasks in some seed
        return f"diverged ({sum(v != v for v in values)} of {len(values)} seeds)"
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _budget(v_name: str, r: dict) -> str:
    s = r.get("search", {}).get(v_name, {})
    n = s.get("trials", 0)
    out = f"{n} trials" if n else "none"
    runs = r["runs"][v_name]
    if runs and "inner_steps" in runs[0]:
        out += "; K, rates on val" + (" (at an edge)" if any(x.get("at_edge") for x in runs) else "")
    return out


def _column_head(column: str) -> str:
    """``gauc`` -> GAUC, ``auc_conversion`` -> AUC (conversion), ``ctcvr_auc`` -> pCTCVR AUC."""
    if column == "ctcvr_auc":
        return "pCTCVR AUC"
    metric, _, label = column.partition("_")  # (metric names hold no "_"; labels may)
    head = metric.upper() if metric != "logloss" else "logloss"
    return f"{head} ({label})" if label else head


def format_table(results: dict) -> str:
    """Markdown, one table per objective: one row per data set and model, mean ± standard
    deviation over the seeds, and the search budget of the row."""
    n = len(results["seeds"])
    out = []
    for objective in ("binary", "regression"):
        sets = {k: r for k, r in results["datasets"].items() if r.get("objective", "binary") == objective}
        if not sets:
            continue
        metrics = METRICS[objective]
        # one table per set of columns: several labels add each label's metrics (and pCTCVR's AUC)
        groups: dict[tuple[str, ...], list[str]] = {}
        for ds, r in sets.items():
            groups.setdefault((*metrics, *_label_columns(r["runs"], metrics)), []).append(ds)
        for columns, names in groups.items():
            heads = [_column_head(c) for c in columns]
            lines = ["| data set | model | search | " + " | ".join(heads) + " |",
                     "|---|---|---|" + "---|" * len(columns)]
            for ds in names:
                r = sets[ds]
                for name, runs in r["runs"].items():
                    cells = [_mean_sd([x[c] for x in runs]) for c in columns]
                    lines.append(f"| {ds} | {name} | {_budget(name, r)} | " + " | ".join(cells) + " |")
                if r.get("oracle_auc") is not None:  # the true probability of the first label
                    lines.append(f"| {ds} | oracle (true probabilities) | | | {r['oracle_auc']:.4f} |"
                                 + " |" * (len(columns) - 2))
            out.append("\n".join(lines))
    out.append(f"Mean ± standard deviation over {n} seed(s) ({', '.join(map(str, results['seeds']))}); test tasks "
               "only (user- or campaign-cold). Search: Optuna trials per row on the validation tasks (the same "
               "number for every row), then K and the inner rates on the validation tasks.")
    return "\n\n".join(out)


# ---------------------------------------------------------------- the warm-up table
# The warm-up table of item cold start (``python -m gmeta.experiments.cold_start --warmup``): one row
# per method of ``gmeta.evaluation.warmup`` (the model's initial row, a random initial row, the
# meta-learner's own inner loop, ERM fine-tuned, the generated row of an id generator trained
# on the ERM model), one column per stage (cold, a, a+b, a+b+c),
# mean ± standard deviation over the seeds; on the synthetic ads set (task = ad) and on
# MovieLens (task = movie), each prepared under ``data.split.rule: warmup``. ``--attributes``:
# the new ids' attributes as features of every model ("head"), or read by the generator alone
# ("generator": every base model without them, the generator their one way into the model).
#
# The machinery of the cold-start table (``gmeta.experiments.cold_start``): the shards are prepared once
# per data set; the ERM base model and the meta-learner are each searched with the same number
# of Optuna trials on the validation ids, then trained once per seed; the generator (a data set
# with ``Dataset.generator``) is trained per seed on that seed's ERM model with the ERM's
# settings and ``GENERATOR_TRAINING`` (generator.mode base_fixed, generator.train_ids all:
# every training id taken for new, as Meta-Embedding trains on old items; 10 epochs at dense
# rate 0.01, the weights of the best validation kept; the generator's own settings at their
# defaults, or searched: ``GENERATOR_SPACE``); the warm-up evaluation chooses every rate and
# step count on the validation ids again and scores the test ids once. With
# ``Dataset.generator_joint`` the generator is instead trained jointly with a model of its own
# (``GENERATOR_JOINT``: ERM's searched settings, the offset added to every id's row), from
# scratch per seed, its settings searched in ``GENERATOR_JOINT_SPACE``.
GENERATOR_TRAINING = ["generator.mode=base_fixed", "generator.train_ids=all",
                      # the generator alone trains (tables and head fixed): more epochs than the
                      # base model and a larger rate, the weights of its best validation kept
                      "train.epochs=10", "optim.dense_lr=0.01"]
# The generator's own settings, searched with as many trials as each base model (``--trials``)
# on an ERM base model trained at the search's seed (train.seed as configured, not a scored
# seed); a trial is scored by the validation ids' AUC with their generated rows, no update
# (the ERM scorer of validation during training: the cold stage).
GENERATOR_SPACE: list[tuple[str, dict[str, Any]]] = [
    ("optim.dense_lr", dict(low=1e-3, high=0.1, log=True)),
    ("generator.cold_weight", dict(low=0.0, high=1.0)),  # 0: the warm-up term alone; 1: cold alone
    ("generator.warmup_lr", dict(low=0.01, high=1.0, log=True)),
    ("generator.hidden", dict(choices=["[16]", "[64]", "[64, 32]"])),
]

# Jointly trained: the model learns with it (ERM; the cold-start term on the held-out ids'
# default row + offset), every id of the feature its row + offset (generator.offset_ids all).
GENERATOR_JOINT = ["generator.mode=joint", "generator.offset_ids=all"]
GENERATOR_JOINT_SPACE: list[tuple[str, dict[str, Any]]] = [
    ("optim.dense_lr", dict(low=1e-3, high=0.1, log=True)),
    ("generator.cold_weight", dict(low=0.0, high=1.0)),
    ("generator.hidden", dict(choices=["[]", "[16]", "[64]"])),  # []: one linear layer
]


def _generator_space(joint: bool = False) -> list:
    from gmeta.config import SweepParam

    return [SweepParam(key=k, **kw) for k, kw in (GENERATOR_JOINT_SPACE if joint else GENERATOR_SPACE)]

WARMUP_VARIANTS = [Variant("ERM (base model)", "erm", ["meta.algorithm=erm"], erm=True),
                   Variant("MAML (new id's rows)", "maml", ["meta.algorithm=maml"])]
WARMUP_SHOWN = ("auc", "gauc", "logloss")


def run_warmup_table(datasets: list[Dataset], seeds: list[int], out: Path, trials: int = 0) -> dict:
    """Search, train and score under the warm-up protocol every data set for every seed;
    results.json in ``out`` after each seed. Run again into the same ``out``, seeds already
    scored there are kept (and models trained there continue from their checkpoints)."""
    from gmeta.checkpoint import load_unsharded
    from gmeta.evaluation.evaluate import evaluate
    from gmeta.evaluation.warmup import warmup_report

    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"protocol": "warmup", "seeds": seeds, "trials": trials, "datasets": {}}
    if (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        if old.get("protocol") == "warmup" and old.get("trials") == trials:  # (other trials: other models)
            results["datasets"] = old.get("datasets", {})

    def save() -> None:
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, default=lambda v: None))
        tmp.replace(out / "results.json")

    for ds in datasets:
        base = out / ds.name.lower().replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        shards = _prepare(ds, base)
        fixed = [f"data.shards_dir={shards}", "train.eval_at_end=false", "tracking.enabled=false",
                 "train.nproc_per_node=1", "sweep.nproc_per_trial=1", f"train.val_every_steps={ds.val_every_steps}"]
        entry: dict = results["datasets"].setdefault(ds.name, {"runs": [], "search": {}})
        entry["runs"] = [r for r in entry["runs"] if r["seed"] in seeds]
        best: dict[str, list[str]] = {}
        for v in WARMUP_VARIANTS:
            t0 = time.perf_counter()
            best[v.slug], info = _search(ds, v, fixed, base / v.slug / "search", trials)
            entry["search"][v.name] = {**info, "overrides": best[v.slug], "seconds": round(time.perf_counter() - t0, 1)}
        erm = WARMUP_VARIANTS[0]
        gen_base = [*ds.overrides, *erm.overrides, *best[erm.slug], *fixed, *ds.generator,
                    *(GENERATOR_JOINT if ds.generator_joint else GENERATOR_TRAINING)]
        gen_best: list[str] = []
        gen_dir = "generator-joint" if ds.generator_joint else "generator"
        if ds.generator:
            t0 = time.perf_counter()
            info = {"trials": 0, "keys": []}
            if trials > 0 and ds.generator_joint:
                gen_best, info = _sweep(f"{ds.name} / generator", ds.config, gen_base, _generator_space(joint=True),
                                        base / gen_dir / "search", trials)
            elif trials > 0:
                searched_on = _train(ds.config, [*ds.overrides, *erm.overrides, *best[erm.slug], *fixed,
                                                 "train.resume=auto", f"train.output_dir={base}/generator/search_base"])
                gen_best, info = _sweep(f"{ds.name} / generator", ds.config,
                                        [*gen_base, f"train.init_from={searched_on}"], _generator_space(),
                                        base / "generator" / "search", trials)
            entry["search"]["generator"] = {**info, "overrides": gen_best,
                                            "seconds": round(time.perf_counter() - t0, 1)}
            if gen_best:  # runs of other settings (another search) are not resumed as these
                gen_dir += "-" + hashlib.sha1(" ".join(gen_best).encode()).hexdigest()[:8]
        for seed in seeds:
            if any(r["seed"] == seed for r in entry["runs"]):
                log.info("%s seed %d: scored in an earlier run into %s, kept", ds.name, seed, out)
                continue
            t0 = time.perf_counter()
            per_seed = [f"train.seed={seed}", "train.resume=auto"]
            ckpt = {v.slug: _train(ds.config, [*ds.overrides, *v.overrides, *best[v.slug], *fixed, *per_seed,
                                               f"train.output_dir={base}/{v.slug}/seed{seed}"])
                    for v in WARMUP_VARIANTS}
            if ds.generator:
                start = [] if ds.generator_joint else [f"train.init_from={ckpt['erm']}"]
                ckpt["generator"] = _train(ds.config, [*gen_base, *gen_best, *per_seed, *start,
                                                       f"train.output_dir={base}/{gen_dir}/seed{seed}"])
            model, cfg, _ = load_unsharded(ckpt["maml"])
            bmodel, bcfg, _ = load_unsharded(ckpt["erm"])
            gen = load_unsharded(ckpt["generator"])[:2] if "generator" in ckpt else None
            report = warmup_report(model, cfg, shards, evaluate=evaluate, baseline=(bmodel, bcfg), seed=seed,
                                   generator=gen)
            entry["runs"].append({"seed": seed, "report": report, "seconds": round(time.perf_counter() - t0, 1),
                                  "checkpoints": {k: str(p) for k, p in ckpt.items()}})
            log.info("%s seed %d: warm-up %s", ds.name, seed,
                     {n: {s: c.get("auc") for s, c in e["stages"].items()} for n, e in report["methods"].items()})
            entry["runs"].sort(key=lambda r: r["seed"])
            save()
    save()
    return results


def _warmup_mean_sd(values: list[float | None]) -> str:
    if any(v is None or v != v for v in values):  # a stage a seed did not score, or NaN
        return f"n/a ({sum(v is None or v != v for v in values)} of {len(values)} seeds)"
    return _mean_sd([float(v) for v in values if v is not None])


def format_warmup_table(results: dict) -> str:
    """Markdown of the warm-up table: per data set and metric, a row per method, a column per stage."""
    out = []
    for ds, entry in results["datasets"].items():
        runs = entry["runs"]
        if not runs:
            continue
        first = runs[0]["report"]
        heads = [f"{s} ({n})" for s, n in zip(first["stages"], first["support_rows"])]
        methods: dict[str, str] = {}  # every method of any seed, in order (a seed may lack one: n/a)
        for r in runs:
            methods.update({n: e["label"] for n, e in r["report"]["methods"].items() if n not in methods})
        for metric in WARMUP_SHOWN:
            lines = [f"{ds}, {metric.upper() if metric != 'logloss' else 'logloss'} "
                     f"({int(first.get('tasks', 0))} test ids, K = {first['warmup_rows']}):", "",
                     "| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
            for name, label in methods.items():
                cells = [_warmup_mean_sd([r["report"]["methods"].get(name, {}).get("stages", {}).get(s, {}).get(metric)
                                          for r in runs]) for s in first["stages"]]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
        search = "; ".join(f"{k}: {v.get('trials', 0)} trials" for k, v in entry["search"].items())
        out.append(f"Search ({ds}): {search}, on the validation ids.")
    scored = sorted({r["seed"] for e in results["datasets"].values() for r in e["runs"]})
    out.append(f"Mean ± standard deviation over {len(scored)} seed(s) "
               f"({', '.join(map(str, scored))}); test ids only. Stage: the new id's warm-up rows updated "
               "on (cold: none); the rate and steps of every method at every stage chosen on the validation ids.")
    return "\n\n".join(out)


def movielens_name(raw: Path) -> str:
    """The MovieLens release in ``raw``, from its files: ML-100K (u.data), ML-1M (ratings.dat),
    or a RecBole atomic set by its name (ml-100k.inter)."""
    if (raw / "u.data").is_file():
        return "MovieLens-100K"
    if (raw / "ratings.dat").is_file():
        return "MovieLens-1M"
    inter = sorted(raw.glob("*.inter"))
    if inter:
        stem = inter[0].stem.lower()
        return {"ml-100k": "MovieLens-100K", "ml-1m": "MovieLens-1M"}.get(stem, f"MovieLens ({inter[0].stem})")
    return "MovieLens"


ML_USER_FEATURES = ["gender", "age", "occupation", "zip3"]  # the user's own (task-side) features


def _datasets(args) -> list[Dataset]:
    out = []
    if args.movielens:
        raw = Path(args.movielens)
        name = movielens_name(raw)
        ml = ROOT / "configs" / "movielens.yaml"
        if "click" in args.objectives:
            out.append(Dataset(f"{name} (rating >= 4)", ml, list(args.movielens_override), raw=raw,
                               task_features=ML_USER_FEATURES))
        if "rating" in args.objectives:
            out.append(Dataset(f"{name} (rating)", ml, ["features.label=rating", "model.objective=regression",
                                                         *args.movielens_override], raw=raw,
                               task_features=ML_USER_FEATURES))
    if args.ads_tasks:
        out.append(Dataset("synthetic ads-CVR", ROOT / "configs" / "ads_cvr.yaml",
                           [f"synth.num_tasks={args.ads_tasks}", "data.split.val_fraction=0.05",
                            *args.ads_override], val_every_steps=100, task_features=["ad_id", "advertiser_id"]))
    return out


def _warmup_datasets(args) -> list[Dataset]:
    """The warm-up table's data sets: MovieLens with movies as tasks, the synthetic set with ads.
    ``args.attributes``: "head", the id's attributes are features of every model (the generator
    reads them too); "generator", the generator's alone (``features.sparse[].head: false``: the
    base models do not read them, so a new id learns what they say through its generated row)."""
    joint = getattr(args, "generator_training", "base_fixed") == "joint"

    def attributes(name: str, feature: str, attrs: list[str]) -> tuple[str, list[str], list[str]]:
        gen = [f"generator.feature={feature}", f"generator.attributes=[{', '.join(attrs)}]"]
        if joint:  # another generator: another name, so another directory
            name += ", generator trained jointly"
        if args.attributes == "generator":  # another base model: another name, so another directory
            return f"{name}, attributes the generator's alone", [f"features.sparse.{a}.head=false" for a in attrs], gen
        return name, [], gen

    out = []
    if args.movielens:
        raw = Path(args.movielens)
        name, head, gen = attributes(f"{movielens_name(raw)} (item cold start)", "item_id",
                                     ["genres", "year", "title_words"])
        out.append(Dataset(name, ROOT / "configs" / "movielens_items.yaml", [*head, *args.movielens_override],
                           raw=raw, task_features=["item_id"], generator=gen, generator_joint=joint))
    if args.ads_tasks:
        # the ad's own attributes; not the advertiser (the campaign's: with it, the generator
        # learns each training ad's own row from its advertiser's, and on the validation ads of
        # 2,000 campaigns it scored below the default row)
        name, head, gen = attributes("synthetic ads (ad cold start)", "ad_id",
                                     ["ad_category", "creative_type", "landing_page"])
        out.append(Dataset(name, ROOT / "configs" / "ads_cold_items.yaml",
                           [f"synth.num_tasks={args.ads_tasks}", *head, *args.ads_override], val_every_steps=20,
                           task_features=["ad_id"], synth_config=ROOT / "configs" / "ads_cvr_debug.yaml",
                           generator=gen, generator_joint=joint))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmeta.experiments.cold_start", description=__doc__.split("\n\n")[0])
    p.add_argument("--movielens", default=str(ROOT / "data" / "movielens" / "raw"),
                   help="MovieLens files (see data.source.format: movielens); '' to skip")
    p.add_argument("--objectives", nargs="+", default=["click", "rating"], choices=["click", "rating"],
                   help="MovieLens: the click label (rating >= 4: GAUC, AUC, logloss) and the rating (RMSE, MAE)")
    p.add_argument("--ads-tasks", type=int, default=20000, help="synthetic ads-CVR tasks (0 to skip)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=12, help="search trials per row (the same for every row; 0: none)")
    p.add_argument("--variants", nargs="+", default=list(BY_SLUG), choices=list(BY_SLUG),
                   help="rows of the table (erm_ft: ERM + fine-tuning)")
    p.add_argument("--out", default=str(ROOT / "runs" / "cold_start"))
    p.add_argument("--movielens-override", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--ads-override", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--warmup", action="store_true",
                   help="the warm-up table of item cold start instead (run_warmup_table): movies and ads as tasks, "
                        "configs/movielens_items.yaml and configs/ads_cold_items.yaml; --variants and --objectives "
                        "do not apply")
    p.add_argument("--attributes", choices=["head", "generator"], default="head",
                   help="--warmup: the new ids' attributes as features of every model (head) or the id "
                        "generator's alone (generator: features.sparse[].head false)")
    p.add_argument("--generator-training", choices=["base_fixed", "joint"], default="base_fixed",
                   help="--warmup: the id generator trained on the ERM model, fixed (Meta-Embedding), or jointly "
                        "with a model of its own, its offset added to every id's row (generator.offset_ids all)")
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
    if args.warmup:
        results = run_warmup_table(_warmup_datasets(args), args.seeds, out, trials=args.trials)
        table = format_warmup_table(results)
    else:
        results = run(_datasets(args), args.seeds, out, [BY_SLUG[s] for s in args.variants], trials=args.trials)
        table = format_table(results)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\n{results['seconds']:.0f}s; every run: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
