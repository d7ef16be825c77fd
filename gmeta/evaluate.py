"""Cold-start evaluation: adapt on each held-out task's support rows, score its query rows.

One process with the tables loaded unsharded from the checkpoint (DCP reshards, so a
checkpoint written by any number of training processes loads), or N processes under
torchrun with the tables sharded as in training: each rank scores its share of the tasks
and rank 0 gathers the predictions and computes the report.

The report (JSON, Markdown, HTML and PNG plots, all logged to MLflow), for model.objective
"binary":
- AUC, GAUC (task-weighted), logloss and calibration (mean predicted vs. observed rate) of
  the adapted model (K inner steps), the same model without adaptation, an ERM baseline
  and the oracle (true probabilities, synthetic data) where available;
- AUC, GAUC and logloss per cold-start bucket (support-set size);
- the same against the number of inner steps K (``eval.curve_steps``);
- reliability bins (predicted vs. observed rate) per scorer.

For "regression": RMSE, MAE and mean predicted vs. observed value of each scorer, and RMSE
and MAE per bucket and against K; no reliability bins.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gmeta import metrics
from gmeta.config import Config
from gmeta.io.prepare import load_manifest
from gmeta.io.reader import TaskReader
from gmeta.models.dlrm import MetaDLRM, dense_autocast, model_device
from gmeta.parallel.layout import layout_of
from gmeta.parallel.maml import adapt_and_query
from gmeta.types import TaskBatch

log = logging.getLogger(__name__)

SCORERS = ("maml", "no_adapt", "erm", "oracle")


def _binary_partial(y: np.ndarray, p: np.ndarray, g: np.ndarray) -> dict[str, float]:
    return {"auc": metrics.auc(y, p), "gauc": metrics.gauc(y, p, g), "logloss": metrics.logloss(y, p)}


def _regression_partial(y: np.ndarray, p: np.ndarray, g: np.ndarray) -> dict[str, float]:
    return {"rmse": metrics.rmse(y, p), "mae": metrics.mae(y, p)}


@dataclass(frozen=True)
class _Objective:
    """What the report of one model.objective holds and shows."""

    summarize: Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]  # (y, p, task) of a scorer
    partial: Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]  # per bucket and per K
    columns: tuple[tuple[str, str, str], ...]  # overall table: (header, metric, format)
    main: str  # metric of the bucket table and plots; the K curve is report[f"{main}_vs_k"]
    curve: tuple[str, ...]  # metrics of the K table, K plot and logged curves


_OBJECTIVES = {
    "binary": _Objective(
        metrics.summarize, _binary_partial,
        (("AUC", "auc", ".4f"), ("GAUC", "gauc", ".4f"), ("logloss", "logloss", ".4f"),
         ("pred. rate", "pred_rate", ".4f"), ("obs. rate", "obs_rate", ".4f"), ("calibration", "calibration", ".3f")),
        "auc", ("auc", "gauc")),
    "regression": _Objective(
        lambda y, p, g: metrics.summarize_regression(y, p), _regression_partial,
        (("RMSE", "rmse", ".4f"), ("MAE", "mae", ".4f"), ("mean pred.", "pred_mean", ".4f"),
         ("mean obs.", "obs_mean", ".4f")),
        "rmse", ("rmse", "mae")),
}


def _objective(report: dict) -> _Objective:
    return _OBJECTIVES[report.get("objective", "binary")]  # reports older than the key are binary


def _inner(model) -> MetaDLRM:
    return model.module if hasattr(model, "module") else model


def predict_queries(model, cfg: Config, batch: TaskBatch, steps: list[int]) -> dict[int, np.ndarray]:
    """Predictions (``DLRMHead.predict``: probabilities, or values for regression) of the
    batch's query rows (query-block order) after K inner steps on each task's support rows,
    for every K in ``steps`` (0: no adaptation). One lookup and one layout serve every K.
    ``model``: a MetaDLRM, or one sharded by torchrec (then every rank must call this for
    the same number of batches)."""
    inner = _inner(model)
    m = cfg.meta
    batch = batch.to(model_device(model), non_blocking=True)  # (nothing to do when it is there already)
    layout = layout_of(batch, inner.pooling, m.size_buckets)
    with torch.no_grad():
        rows = inner.lookup(layout)
    # Inner gradients are taken with respect to the looked-up rows: make them a leaf.
    rows = rows.detach().requires_grad_(True)
    lr, emb_lr = inner.inner_lrs(m.inner_lr, m.embedding_inner_lr)
    out = {}
    with torch.enable_grad(), dense_autocast(cfg, rows.device):
        for k in steps:
            logits_q, _, _ = adapt_and_query(
                inner.head, rows, batch, layout, steps=k, lr=lr, emb_lr=emb_lr, adapt_dense=m.adapt_dense,
                adapt_embeddings=m.adapt_embeddings, first_order=True, fast_weights=m.fast_weights)
            out[k] = inner.head.predict(logits_q.detach().float()).cpu().numpy()
    return out


def predict_query(model, cfg: Config, batch: TaskBatch, steps: int) -> np.ndarray:
    """``predict_queries`` for one K."""
    return predict_queries(model, cfg, batch, [steps])[steps]


@dataclass
class Predictions:
    """Query rows of the evaluated tasks, and each scorer's predictions for them."""

    labels: list[np.ndarray] = field(default_factory=list)
    task_ids: list[np.ndarray] = field(default_factory=list)  # task of each row
    support_size: list[np.ndarray] = field(default_factory=list)  # support rows of its task, per row
    scores: dict[str, list[np.ndarray]] = field(default_factory=dict)  # scorer or "k=<K>" -> per batch

    def add(self, name: str, preds: np.ndarray) -> None:
        self.scores.setdefault(name, []).append(preds)

    def merge(self, others: list[Predictions]) -> Predictions:
        out = Predictions()
        for p in others:
            out.labels += p.labels
            out.task_ids += p.task_ids
            out.support_size += p.support_size
            for k, v in p.scores.items():
                out.scores.setdefault(k, []).extend(v)
        return out


def _eval_steps(cfg: Config, inner_steps: int | None) -> int:
    return cfg.meta.inner_steps if inner_steps is None or inner_steps < 0 else inner_steps


def collect(model, cfg: Config, shards_dir: str | Path, *, inner_steps: int | None = None,
            baseline: tuple[MetaDLRM, Config] | None = None, rank: int = 0, world_size: int = 1) -> Predictions:
    """Score this rank's share of the held-out tasks (split ``eval.split``) with every scorer
    and every K of the curve."""
    steps = _eval_steps(cfg, inner_steps)
    split = cfg.eval.split
    if not load_manifest(shards_dir)["splits"].get(split, {}).get("tasks"):
        raise ValueError(f"{shards_dir}: split {split!r} (eval.split) has no tasks to evaluate"
                         + (" (prepared with data.split.val_fraction > 0?)" if split == "val" else ""))
    reader = TaskReader(shards_dir, split, cfg.eval.tasks_per_batch, rank=rank, world_size=world_size,
                        shuffle=False, drop_last=False, num_workers=min(cfg.data.num_workers, 1),
                        on_bad_task=cfg.data.on_bad_task, max_tasks=cfg.eval.max_tasks,
                        size_buckets=cfg.meta.size_buckets)
    ks = sorted(set(cfg.eval.curve_steps) | {steps, 0})
    n_batches = len(reader)
    device = model_device(model)
    if world_size > 1:  # sharded lookups are collective: every rank runs as many batches
        t = torch.tensor([n_batches], device=device)  # NCCL reduces device tensors only
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n_batches = int(t)
    out = Predictions()
    last = None
    it = iter(reader)
    for _ in range(n_batches):
        batch = next(it, None)
        own = batch is not None
        batch = batch if own else last  # ran out: repeat the last batch for the collectives, drop it
        if batch is None:
            raise ValueError(f"{shards_dir}: rank {rank} has no tasks of split {split!r} to evaluate")
        last = batch
        batch = batch.to(device)
        scored = {f"k={k}": p for k, p in predict_queries(model, cfg, batch, ks).items()}
        base = predict_query(baseline[0], baseline[1], batch, 0) if baseline is not None else None
        if not own:
            continue
        for name, preds in scored.items():
            out.add(name, preds)
        if base is not None:
            out.add("erm", base)
        s = batch.num_support
        q_counts = (batch.query_offsets[1:] - batch.query_offsets[:-1]).cpu().numpy()
        s_counts = (batch.support_offsets[1:] - batch.support_offsets[:-1]).cpu().numpy()
        out.labels.append(batch.labels[s:].cpu().numpy())
        out.task_ids.append(np.repeat(batch.task_ids.cpu().numpy(), q_counts))
        out.support_size.append(np.repeat(s_counts, q_counts))
        if batch.true_prob is not None:
            out.add("oracle", batch.true_prob[s:].cpu().numpy())
    return out


def _bucket_label(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else f"{lo}-{hi - 1}"


def build_report(pred: Predictions, cfg: Config, *, inner_steps: int | None = None,
                 algorithm: str = "maml") -> dict:
    """Metrics of gathered predictions. Flat keys ``<scorer>_<metric>`` (scorer: maml,
    no_adapt, erm, oracle; metric for model.objective "binary": auc, gauc, logloss,
    pred_rate, obs_rate, calibration; for "regression": rmse, mae, pred_mean, obs_mean),
    plus ``buckets``, the K curve (``auc_vs_k`` / ``rmse_vs_k``) and, binary only,
    ``reliability``."""
    steps = _eval_steps(cfg, inner_steps)
    obj = _OBJECTIVES[cfg.model.objective]
    y = np.concatenate(pred.labels)
    g = np.concatenate(pred.task_ids)
    sup = np.concatenate(pred.support_size)
    curve = {k: np.concatenate(v) for k, v in pred.scores.items()}
    # the model's own scorer(s): an ERM checkpoint without adaptation is the ERM column
    named: dict[str, np.ndarray] = {}
    if algorithm == "maml":
        named["maml"], named["no_adapt"] = curve[f"k={steps}"], curve["k=0"]
    else:
        named["erm"] = curve["k=0"]
    for extra in ("erm", "oracle"):
        if extra in curve:
            named[extra] = curve[extra]
    report: dict = {"tasks": float(len(np.unique(g))), "query_rows": float(len(y)), "inner_steps": float(steps),
                    "algorithm": algorithm, "objective": cfg.model.objective, "split": cfg.eval.split}
    for name, p in named.items():
        for k, v in obj.summarize(y, p, g).items():
            report[f"{name}_{k}"] = v
    edges = list(cfg.eval.support_buckets)
    buckets = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        sel = (sup >= lo) & (sup < hi if hi is not None else True)
        if not sel.any():
            continue
        b = {"support": _bucket_label(lo, hi), "tasks": float(len(np.unique(g[sel]))), "query_rows": float(sel.sum())}
        for name, p in named.items():
            b.update({f"{name}_{k}": v for k, v in obj.partial(y[sel], p[sel], g[sel]).items()})
        buckets.append(b)
    report["buckets"] = buckets
    ks = sorted(int(k[2:]) for k in curve if k.startswith("k="))
    per_k = [obj.partial(y, curve[f"k={k}"], g) for k in ks]
    report[f"{obj.main}_vs_k"] = {"k": ks, **{m: [c[m] for c in per_k] for m in per_k[0]}}
    if cfg.model.objective == "binary":
        report["reliability"] = {name: metrics.reliability(y, p, cfg.eval.calibration_bins)
                                 for name, p in named.items()}
    return report


def evaluate(model, cfg: Config, shards_dir: str | Path, *, inner_steps: int | None = None,
             baseline: tuple[MetaDLRM, Config] | None = None) -> dict:
    """Evaluate in this process (or, under an initialised process group, on every rank
    together: the report is complete on rank 0, None elsewhere)."""
    t0 = time.perf_counter()
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    pred = collect(model, cfg, shards_dir, inner_steps=inner_steps, baseline=baseline, rank=rank, world_size=world)
    if distributed:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(pred, parts, dst=0)
        if rank != 0:
            return None
        pred = Predictions().merge(parts)
    report = build_report(pred, cfg, inner_steps=inner_steps, algorithm=cfg.meta.algorithm)
    report["processes"] = float(world)
    report["seconds"] = time.perf_counter() - t0
    return report


def flat_metrics(report: dict) -> dict[str, float]:
    """The report as MLflow metrics (without the K curve, logged with step = K)."""
    out = {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for b in report.get("buckets", []):
        tag = "support_" + b["support"].replace("+", "_plus")
        out.update({f"{tag}/{k}": float(v) for k, v in b.items() if k != "support"})
    return out


def _cell(value, metric: str, fmt: str = ".4f") -> str:
    """A metric as the report shows it; one that could not be computed (NaN: e.g. the AUC of
    rows of one class) as "n/a (<reason>)", not a bare nan."""
    if isinstance(value, str):  # already "n/a (...)": a report read back from eval_report.json
        return value
    if value is None or math.isnan(value):
        return metrics.not_available(metric)
    return format(value, fmt)


def _json_ready(value, key: str = ""):
    """The report for eval_report.json: NaN metrics as "n/a (<reason>)" (a bare NaN is not
    even valid JSON), the rest as is."""
    if isinstance(value, dict):
        return {k: _json_ready(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v, key) for v in value]  # the K curve: {"auc": [...], ...}
    if isinstance(value, float) and math.isnan(value):
        return metrics.not_available(key)
    return value


def format_table(report: dict) -> str:
    """Markdown: overall table, the main metric (AUC, or RMSE for regression) per
    support-size bucket, and the curve metrics vs. K. Metrics that could not be computed
    show as "n/a (<reason>)"."""
    obj = _objective(report)
    names = [n for n in SCORERS if f"{n}_{obj.main}" in report]
    lines = ["| model | " + " | ".join(h for h, _, _ in obj.columns) + " |", "|---|" + "---|" * len(obj.columns)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_cell(report[f"{n}_{m}"], m, fmt) for _, m, fmt in obj.columns)
                     + " |")
    lines.append(f"\n{int(report['tasks'])} held-out tasks, {int(report['query_rows'])} query rows, "
                 f"{int(report['inner_steps'])} inner steps")
    main = obj.main.upper()
    if report.get("buckets"):
        lines += ["", f"{main} by support-set size (cold-start bucket):", "",
                  "| support rows | tasks | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for b in report["buckets"]:
            lines.append(f"| {b['support']} | {int(b['tasks'])} | "
                         + " | ".join(_cell(b[f"{n}_{obj.main}"], obj.main) for n in names) + " |")
    c = report.get(f"{obj.main}_vs_k")
    if c:
        lines += ["", f"{main} vs. inner steps K:", "", "| K | " + " | ".join(str(k) for k in c["k"]) + " |",
                  "|---|" + "---|" * len(c["k"])]
        lines += [f"| {m.upper()} | " + " | ".join(_cell(v, m) for v in c[m]) + " |" for m in obj.curve]
    return "\n".join(lines)


def format_html(report: dict, plots: list[str]) -> str:
    """A standalone HTML page: the Markdown tables as HTML tables and the plots inline."""
    body, table = [], []

    def flush():
        if table:
            head, *rows = [[c.strip() for c in r.strip("|").split("|")] for r in table if not r.startswith("|---")]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
            table.clear()

    for line in format_table(report).splitlines():
        if line.startswith("|"):
            table.append(line)
        else:
            flush()
            if line.strip():
                body.append(f"<p>{html.escape(line.strip())}</p>")
    flush()
    body += [f'<p><img src="{html.escape(p)}" alt="{html.escape(p)}"></p>' for p in plots]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>gmeta evaluation</title>"
            f"<style>{style}</style></head><body><h1>Cold-start evaluation</h1>{''.join(body)}</body></html>\n")


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """eval_report.{json,md,html} and the PNG plots into ``out_dir``; returns the files."""
    from gmeta import plots

    obj = _objective(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [plots.metric_vs_steps(report, out / f"{obj.main}_vs_k.png", obj.curve),
             plots.metric_by_bucket(report, out / f"{obj.main}_by_support_size.png", obj.main)]
    if "reliability" in report:
        files.append(plots.calibration(report, out / "calibration.png"))
    (out / "eval_report.json").write_text(json.dumps(_json_ready(report), indent=2))
    (out / "eval_report.md").write_text(format_table(report) + "\n")
    (out / "eval_report.html").write_text(format_html(report, [p.name for p in files]))
    return [out / "eval_report.json", out / "eval_report.md", out / "eval_report.html", *files]


def log_report(tracker, report: dict, files: list[Path], step: int) -> None:
    """Metrics (eval/...), the K curves (``eval/<metric>_vs_k``, metric history with step = K)
    and the files."""
    tracker.log_metrics({f"eval/{k}": v for k, v in flat_metrics(report).items()}, step=step)
    obj = _objective(report)
    c = report[f"{obj.main}_vs_k"]
    for i, k in enumerate(c["k"]):
        tracker.log_metrics({f"eval/{m}_vs_k": c[m][i] for m in obj.curve}, step=k)
    for f in files:
        tracker.log_artifact(f, "eval")


def resolve_checkpoint(checkpoint: str | Path | None, run_id: str, tracking_uri: str) -> Path:
    """The checkpoint to evaluate: given, or the one a training run references (tag
    ``gmeta.checkpoint``)."""
    from gmeta.checkpoint import CheckpointError

    if checkpoint:
        return Path(checkpoint)
    if not run_id:
        raise CheckpointError("give --checkpoint or --run-id")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from gmeta.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri("", tracking_uri)
    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as e:
        raise CheckpointError(f"run {run_id} not found at {uri}: {e.message}") from None
    path = run.data.tags.get("gmeta.checkpoint")
    if not path:
        raise CheckpointError(f"run {run_id} at {uri} references no checkpoint (tag gmeta.checkpoint)")
    return Path(path)


def choose_shards(shards_dir: str | Path | None, why: str, cfg: Config, checkpoint: str | Path,
                  command: str = "evaluate") -> Path:
    """The task shards to score: ``shards_dir`` when given (``why`` says by what: --shards, an
    override), else those the checkpoint was trained on (data.shards_dir of its saved config),
    not the data.shards_dir of a --config file, which may name other data. Logs the choice."""
    from gmeta.io.prepare import MANIFEST, PrepareError

    if shards_dir:
        shards = Path(shards_dir)
    else:
        shards, why = Path(cfg.data.shards_dir), "the checkpoint's data.shards_dir: the shards it was trained on"
        if not (shards / MANIFEST).is_file():
            raise PrepareError(f"{shards / MANIFEST}: not found; {checkpoint} was trained on {shards} (its saved "
                               "data.shards_dir, relative to the directory training ran in); pass --shards DIR "
                               "or data.shards_dir=DIR to score other shards")
    if os.environ.get("RANK", "0") == "0":  # one line, not one per rank
        log.info("%s: shards %s (%s)", command, shards, why)
    return shards


def run_evaluate(checkpoint: str | Path | None = None, *, run_id: str = "", cfg_override: Config | None = None,
                 baseline: str | Path | None = None, shards_dir: str | None = None, shards_why: str = "--shards",
                 tracking: bool = True, tracking_uri: str = "", out_dir: str | Path | None = None,
                 inner_steps: int | None = None, split: str | None = None) -> dict | None:
    """``gmeta evaluate``: load the checkpoint (sharded under torchrun, else unsharded),
    evaluate, write the report files and log them to the checkpoint's MLflow run.
    ``shards_dir``: the shards to evaluate on (``shards_why``: who chose them, for the log);
    None: the checkpoint's own (``choose_shards``). Returns the report on rank 0, None on
    other ranks."""
    from gmeta.checkpoint import load_sharded, load_unsharded
    from gmeta.parallel.dist import configure_threads, init_distributed, under_torchrun
    from gmeta.tracking import make_tracker

    path = resolve_checkpoint(checkpoint, run_id, tracking_uri)
    if cfg_override is not None:  # before loading: loading is compute too
        configure_threads(cfg_override.train.threads)
    env = init_distributed() if under_torchrun() else None
    try:
        if env is not None:
            model, cfg, meta = load_sharded(path, env.device)
        else:
            model, cfg, meta = load_unsharded(path)
        if cfg_override is None:
            configure_threads(cfg.train.threads)
        else:  # evaluation settings come from --config; the data from the checkpoint (choose_shards)
            cfg.eval = cfg_override.eval
        cfg.data.shards_dir = str(choose_shards(shards_dir, shards_why, cfg, path))
        if inner_steps is not None:
            cfg.eval.inner_steps = inner_steps
        if split is not None:
            cfg.eval.split = split
        base = None
        if baseline:
            bmodel, bcfg, _ = load_unsharded(baseline)
            base = (bmodel, bcfg)
        report = evaluate(model, cfg, cfg.data.shards_dir, inner_steps=cfg.eval.inner_steps, baseline=base)
    finally:
        if env is not None:
            dist.destroy_process_group()
    if report is None:
        return None
    report["checkpoint"] = str(path)
    files = write_report(report, out_dir or path.parent / "eval")
    # the table itself is the caller's to show (gmeta evaluate prints it on stdout): logging it
    # too printed it twice
    log.info("evaluation of %s: report in %s", path, files[0].parent)
    run = meta.get("mlflow_run_id", "")
    if tracking and run:
        uri = tracking_uri or meta.get("tracking_uri", "")
        tracker = make_tracker(True, uri, cfg.tracking.experiment, run_id=run)
        log_report(tracker, report, files, step=int(meta.get("step", 0)))
        tracker.finish()
    return report
