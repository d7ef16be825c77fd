"""Cold-start evaluation: adapt on each held-out task's support rows, score its query rows.

Runs on one process with tables loaded unsharded from a checkpoint (DCP reshards), so it
works for a checkpoint written by any number of training processes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from gmeta import metrics
from gmeta.checkpoint import load_unsharded
from gmeta.config import Config
from gmeta.io.reader import TaskReader
from gmeta.models.dlrm import Lookup, MetaDLRM
from gmeta.parallel.maml import adapt_and_query, task_layout
from gmeta.types import TaskBatch

log = logging.getLogger(__name__)


def predict_query(model: MetaDLRM, cfg: Config, batch: TaskBatch, steps: int) -> np.ndarray:
    """Probabilities of the batch's query rows (query-block order) after ``steps`` inner
    steps on each task's support rows (0: no adaptation)."""
    with torch.no_grad():
        lk = model.lookup(batch.sparse)
    # Inner gradients are taken with respect to the looked-up rows: make them a leaf.
    lk = Lookup(lk.values.detach().requires_grad_(True), lk.slot, lk.feature, lk.ids, lk.scale, lk.num_rows)
    layout = task_layout(batch, cfg.meta.size_buckets)
    m = cfg.meta
    lr, emb_lr = model.inner_lrs(m.inner_lr, m.embedding_inner_lr)
    with torch.enable_grad():
        logits_q, _, _ = adapt_and_query(
            model.head, lk, batch, num_features=model.num_features, steps=steps, lr=lr,
            emb_lr=emb_lr, adapt_dense=m.adapt_dense,
            adapt_embeddings=m.adapt_embeddings, first_order=True, layout=layout)
    return torch.sigmoid(logits_q.detach()).cpu().numpy()


def evaluate(model: MetaDLRM, cfg: Config, shards_dir: str | Path, *, inner_steps: int | None = None,
             baseline: tuple[MetaDLRM, Config] | None = None) -> dict[str, float]:
    """Metrics on the held-out split. Keys: ``<scorer>_{auc,gauc,logloss}`` for scorer in
    maml (adapted), no_adapt, erm (baseline or ERM checkpoint), oracle; plus counts."""
    t0 = time.perf_counter()
    steps = cfg.meta.inner_steps if inner_steps is None or inner_steps < 0 else inner_steps
    reader = TaskReader(shards_dir, "eval", cfg.eval.tasks_per_batch, shuffle=False, drop_last=False,
                        num_workers=min(cfg.data.num_workers, 1), on_bad_task=cfg.data.on_bad_task,
                        max_tasks=cfg.eval.max_tasks)
    scorers: list[tuple[str, MetaDLRM, Config, int]] = []
    if cfg.meta.algorithm == "maml":
        scorers += [("maml", model, cfg, steps), ("no_adapt", model, cfg, 0)]
    else:
        scorers.append(("erm", model, cfg, 0))
    if baseline is not None:
        scorers.append(("erm", baseline[0], baseline[1], 0))
    scores: dict[str, list[np.ndarray]] = {name: [] for name, *_ in scorers}
    labels, groups, oracle = [], [], []
    offset = 0
    for batch in reader:
        for name, mdl, c, k in scorers:
            scores[name].append(predict_query(mdl, c, batch, k))
        s = batch.num_support
        labels.append(batch.labels[s:].numpy())
        counts = (batch.query_offsets[1:] - batch.query_offsets[:-1]).numpy()
        groups.append(np.repeat(np.arange(offset, offset + batch.num_tasks), counts))
        offset += batch.num_tasks
        if batch.true_prob is not None:
            oracle.append(batch.true_prob[s:].numpy())
    y = np.concatenate(labels)
    g = np.concatenate(groups)
    out: dict[str, float] = {"tasks": float(offset), "query_rows": float(len(y)), "inner_steps": float(steps)}
    for name, parts in scores.items():
        for k, v in metrics.summarize(y, np.concatenate(parts), g).items():
            out[f"{name}_{k}"] = v
    if oracle:
        for k, v in metrics.summarize(y, np.concatenate(oracle), g).items():
            out[f"oracle_{k}"] = v
    out["seconds"] = time.perf_counter() - t0
    return out


def format_table(result: dict[str, float]) -> str:
    rows = [n for n in ("maml", "no_adapt", "erm", "oracle") if f"{n}_auc" in result]
    lines = ["| model | AUC | GAUC | logloss |", "|---|---|---|---|"]
    for n in rows:
        lines.append(f"| {n} | {result[f'{n}_auc']:.4f} | {result[f'{n}_gauc']:.4f} | {result[f'{n}_logloss']:.4f} |")
    lines.append(f"\n{int(result['tasks'])} held-out tasks, {int(result['query_rows'])} query rows, "
                 f"{int(result['inner_steps'])} inner steps")
    return "\n".join(lines)


def run_evaluate(checkpoint: str | Path, *, cfg_override: Config | None = None, baseline: str | Path | None = None,
                 shards_dir: str | None = None, tracking: bool = True, tracking_uri: str = "") -> dict[str, float]:
    """``gmeta evaluate``: load checkpoint(s), evaluate, write report, log to the training run."""
    from gmeta.tracking import make_tracker

    model, cfg, meta = load_unsharded(checkpoint)
    if cfg_override is not None:  # evaluation settings and data location come from --config
        cfg.eval = cfg_override.eval
        cfg.data.shards_dir = cfg_override.data.shards_dir
    base = None
    if baseline:
        bmodel, bcfg, _ = load_unsharded(baseline)
        base = (bmodel, bcfg)
    result = evaluate(model, cfg, shards_dir or cfg.data.shards_dir, inner_steps=cfg.eval.inner_steps, baseline=base)
    report = Path(checkpoint).parent / "eval_report.json"
    report.write_text(json.dumps(result, indent=2))
    table = format_table(result)
    log.info("evaluation of %s:\n%s", checkpoint, table)
    run_id = meta.get("mlflow_run_id", "")
    if tracking and run_id:
        uri = tracking_uri or meta.get("tracking_uri", "")
        tracker = make_tracker(True, uri, cfg.tracking.experiment, run_id=run_id)
        tracker.log_metrics({f"eval/{k}": v for k, v in result.items()}, step=int(meta.get("step", 0)))
        tracker.log_text(table, "eval_report.md")
        tracker.log_artifact(report)
        tracker.finish()
    return result
