"""Next-day evaluation: each daily model scored on the tasks that are new the next day.

A model trained on the partitions up to day d (incrementally with ``train.continue_from``,
or from scratch on all of them) is judged as it would serve: on day d+1, the first partition
after the last it trained on, and only on the tasks of that day that no earlier partition
holds (new campaigns: ``gmeta.io.partitions.new_task_ids``). Each task adapts on its support
rows and is scored on its query rows, as ``gmeta evaluate`` scores held-out tasks. The tasks
of every split of day d+1 but ``val`` are scored (no model has seen that day; ``val`` is kept
for choices).

``gmeta evaluate --next-day CKPT [CKPT ...]`` scores one checkpoint per day and writes the
series: ``next_day.json`` and ``next_day.md`` (a row per day), ``next_day.png`` (AUC and
GAUC over days), and in MLflow one parent run with a child run per day.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from gmeta.config import Config
from gmeta.io.errors import PrepareError
from gmeta.scoring import Predictions
from gmeta.storage import location

log = logging.getLogger(__name__)

# the metrics of a day's row: of the model's own scorer, and of no_adapt for a meta-learned one
_METRICS = ("auc", "gauc", "logloss")


def only_tasks(pred: Predictions, keep: np.ndarray) -> Predictions:
    """The rows of ``pred`` whose task is in ``keep``."""
    out = Predictions()
    for i, tasks in enumerate(pred.task_ids):
        sel = np.isin(tasks, keep)
        out.labels.append(pred.labels[i][sel])
        out.task_ids.append(tasks[sel])
        out.support_size.append(pred.support_size[i][sel])
        for k, v in pred.scores.items():
            out.scores.setdefault(k, []).append(v[i][sel])
    return out


def trained_through(meta: dict, path: Path) -> str:
    """The last partition a checkpoint trained on (``partitions`` of its meta.json)."""
    days = meta.get("partitions") or []
    if not days:
        raise PrepareError(f"{path}: trained on no partition of a partitioned data set (its meta.json lists none): "
                           "next-day evaluation needs a model trained on data.partitions")
    return max(days)


def score_next_day(path: Path, *, splits: tuple[str, ...] = ("train", "eval"), inner_steps: int | None = None,
                   shards_dir: str | Path | None = None) -> dict:
    """One checkpoint on the new tasks of the partition after the last it trained on: the
    report of ``gmeta evaluate`` for those tasks, with ``day``, ``trained_through``,
    ``new_tasks``; ``{"day": None, ...}`` when no later partition exists yet."""
    from gmeta.checkpoint import config_of, load_unsharded, read_meta, resolve
    from gmeta.evaluation.report import build_report
    from gmeta.io import partitions as parts
    from gmeta.io.features import id_hash_of
    from gmeta.io.manifest import MANIFEST, check_schema, load_manifest
    from gmeta.scoring import collect, inner_steps_for

    path = resolve(path)
    meta = read_meta(path)
    trained = config_of(path, meta)
    root = location(shards_dir or trained.data.shards_dir)
    if not parts.is_partitioned(root):
        raise PrepareError(f"{root}: not a partitioned data set; {path} was trained on {trained.data.shards_dir} "
                           "(pass the partitioned data set with --shards)")
    last = trained_through(meta, path)
    day = parts.next_after(root, last)
    row: dict = {"checkpoint": str(path), "trained_through": last, "day": day, "step": int(meta.get("step", 0))}
    if day is None:
        log.info("next day: %s trained through %s, the last partition of %s: nothing to score yet", path, last, root)
        return row
    manifest = load_manifest(root, day)
    where = parts.partition_dir(root, day) / MANIFEST
    check_schema(manifest, trained, where, f"{path}'s")
    ours, theirs = id_hash_of(meta, f"{path}/meta.json"), id_hash_of(manifest, str(where))
    if ours != theirs:
        raise PrepareError(f"{where}: ids hashed with id_hash {theirs}, {path}'s tables with {ours}")
    chosen = [s for s in splits if manifest["splits"].get(s, {}).get("tasks")]
    new = parts.new_task_ids(root, day, tuple(chosen)) if chosen else np.zeros(0, np.int64)
    row.update(new_tasks=int(len(new)), tasks_of_day=int(sum(manifest["splits"][s]["tasks"] for s in chosen)))
    if not len(new):
        log.warning("next day: %s has no new task in splits %s: nothing to score for %s", day, chosen, path)
        return row
    model, cfg, _ = load_unsharded(path)
    cfg.data.shards_dir, cfg.data.partitions = str(root), day
    preds = []
    for s in chosen:
        cfg.eval.split = s  # type: ignore[assignment]  # (any split of the day: no model has seen it)
        preds.append(collect(model, cfg, root, inner_steps=inner_steps))
    pred = only_tasks(Predictions().merge(preds), new)
    report = build_report(pred, cfg, inner_steps=inner_steps, algorithm=cfg.meta.algorithm)
    report["split"] = "+".join(chosen)
    row["report"] = report
    row["inner_steps"] = inner_steps_for(cfg, inner_steps)
    row.update(_main_metrics(report, cfg))
    return row


def _main_metrics(report: dict, cfg: Config) -> dict:
    own = "erm" if cfg.meta.algorithm == "erm" else "maml"
    out = {"scorer": own, "tasks": report["tasks"], "query_rows": report["query_rows"]}
    for m in _METRICS:
        if f"{own}_{m}" in report:
            out[m] = report[f"{own}_{m}"]
        if own == "maml" and f"no_adapt_{m}" in report:
            out[f"no_adapt_{m}"] = report[f"no_adapt_{m}"]
    return out


def format_series(series: dict) -> str:
    """The series as a markdown table, a row per day."""
    lines = ["| day | trained through | checkpoint step | new tasks | query rows | scorer | AUC | GAUC | logloss "
             "| AUC no adaptation | GAUC no adaptation |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "-" if v is None else f"{v:.4f}"

    for r in series["days"]:
        if r.get("day") is None:
            lines.append(f"| (none after {r['trained_through']}) | {r['trained_through']} | {r['step']} | - | - | - "
                         "| - | - | - | - | - |")
            continue
        lines.append(f"| {r['day']} | {r['trained_through']} | {r['step']} | {r.get('new_tasks', 0):,} "
                     f"| {int(r.get('query_rows', 0)):,} | {r.get('scorer', '-')} | {f(r.get('auc'))} "
                     f"| {f(r.get('gauc'))} | {f(r.get('logloss'))} | {f(r.get('no_adapt_auc'))} "
                     f"| {f(r.get('no_adapt_gauc'))} |")
    return "\n".join(lines)


def plot_series(series: dict, path: Path) -> Path:
    """AUC and GAUC of the model's scorer over the evaluated days."""
    from gmeta.evaluation import plots

    rows = [r for r in series["days"] if r.get("auc") is not None]
    return plots.over_days([r["day"] for r in rows], {"AUC": [r["auc"] for r in rows],
                                                       "GAUC": [r.get("gauc") for r in rows]}, path,
                           title="next-day evaluation: new tasks of each day")


def run_next_day(checkpoints: list[str | Path], *, out_dir: str | Path, inner_steps: int | None = None,
                 shards_dir: str | Path | None = None, tracking: bool = True, tracking_uri: str = "",
                 run_name: str = "next-day") -> dict:
    """``gmeta evaluate --next-day``: score each checkpoint on its next day's new tasks,
    write the series' files to ``out_dir`` and, with ``tracking``, log a parent MLflow run
    with a child run per day (metrics at step = the day's index). Returns the series."""
    from gmeta.checkpoint import config_of, read_meta, resolve
    from gmeta.storage import local_dir
    from gmeta.tracking import resolve_tracking_uri

    if not checkpoints:
        raise ValueError("--next-day: give at least one checkpoint")
    rows = [score_next_day(location(c), inner_steps=inner_steps, shards_dir=shards_dir) for c in checkpoints]
    rows.sort(key=lambda r: (r["trained_through"], r["checkpoint"]))
    days = [r["day"] for r in rows if r.get("day")]
    if len(set(days)) != len(days):
        raise ValueError(f"--next-day: several checkpoints evaluate the same day ({sorted(days)}): give one "
                         "checkpoint per day (a series compares days)")
    series: dict = {"days": rows}
    first = resolve(checkpoints[0])
    meta0 = read_meta(first)
    cfg0 = config_of(first, meta0)
    parent = None
    if tracking:  # the parent run first: the series' files name it
        from gmeta.tracking import make_tracker

        uri = resolve_tracking_uri(cfg0.tracking.uri, tracking_uri or meta0.get("tracking_uri", ""))
        parent = make_tracker(True, uri, cfg0.tracking.experiment, run_name=run_name)
        series["mlflow_run_id"] = parent.run_id
    with local_dir(location(out_dir)) as d:
        d.mkdir(parents=True, exist_ok=True)
        (d / "next_day.json").write_text(json.dumps(series, indent=2, default=_json_default))
        (d / "next_day.md").write_text(format_series(series) + "\n")
        files = [d / "next_day.json", d / "next_day.md"]
        if any(r.get("auc") is not None for r in rows):
            files.append(plot_series(series, d / "next_day.png"))
        if parent is not None:
            _track(parent, series, files, uri, cfg0.tracking.experiment, run_name)
    log.info("next-day evaluation of %d checkpoint(s): %s", len(rows), out_dir)
    return series


def _track(parent, series: dict, files: list[Path], uri: str, experiment: str, run_name: str) -> None:
    """The parent run gets the series' metrics (step = the day's index) and files, then a
    child run per day goes under it. (MLflow's active run is one per process: the parent
    ends before its children start, each tagged with its id.)"""
    from gmeta.tracking import make_tracker

    parent.set_tags({"gmeta.kind": "next_day_series"})
    rows = [r for r in series["days"] if r.get("day") is not None]
    metrics = [{k: r[k] for k in ("auc", "gauc", "logloss", "no_adapt_auc", "no_adapt_gauc", "new_tasks", "tasks")
                if r.get(k) is not None} for r in rows]
    for i, m in enumerate(metrics):
        parent.log_metrics({f"next_day/{k}": v for k, v in m.items()}, step=i)
    for f in files:
        parent.log_artifact(f, "next_day")
    parent_id = parent.run_id
    parent.finish()
    for r, m in zip(rows, metrics):
        child = make_tracker(True, uri, experiment, run_name=f"{run_name} {r['day']}", parent_run_id=parent_id)
        child.log_params({"day": r["day"], "trained_through": r["trained_through"], "checkpoint": r["checkpoint"]})
        child.log_metrics({f"next_day/{k}": v for k, v in m.items()})
        child.finish()


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
