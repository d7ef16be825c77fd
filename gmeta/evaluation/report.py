"""The evaluation report: metrics of each scorer (the adapted model, the same without
adaptation, ERM, the oracle) over the held-out query rows, per cold-start bucket, against
K, and reliability bins. Numbers only; ``gmeta.evaluation.render`` shows them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gmeta import metrics
from gmeta.config import Config
from gmeta.scoring import Predictions, inner_steps_for

SCORERS = ("maml", "no_adapt", "erm", "erm_ft", "oracle")  # erm_ft: ERM fine-tuned per task


def _binary_partial(y: np.ndarray, p: np.ndarray, g: np.ndarray) -> dict[str, float]:
    return {"auc": metrics.auc(y, p), "gauc": metrics.gauc(y, p, g), "logloss": metrics.logloss(y, p)}


def _regression_partial(y: np.ndarray, p: np.ndarray, g: np.ndarray) -> dict[str, float]:
    return {"rmse": metrics.rmse(y, p), "mae": metrics.mae(y, p)}


@dataclass(frozen=True)
class Objective:
    """What the report of one model.objective holds and shows."""

    summarize: Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]  # (y, p, task) of a scorer
    partial: Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]  # per bucket and per K
    columns: tuple[tuple[str, str, str], ...]  # overall table: (header, metric, format)
    main: str  # metric of the bucket table and plots; the K curve is report[f"{main}_vs_k"]
    curve: tuple[str, ...]  # metrics of the K table, K plot and logged curves


OBJECTIVES = {
    "binary": Objective(
        metrics.summarize, _binary_partial,
        # GAUC first: the ranking within a task, what adaptation is for (AUC pools every task's rows)
        (("GAUC", "gauc", ".4f"), ("AUC", "auc", ".4f"), ("logloss", "logloss", ".4f"),
         ("pred. rate", "pred_rate", ".4f"), ("obs. rate", "obs_rate", ".4f"), ("calibration", "calibration", ".3f")),
        "auc", ("auc", "gauc")),
    "regression": Objective(
        lambda y, p, g: metrics.summarize_regression(y, p), _regression_partial,
        (("RMSE", "rmse", ".4f"), ("MAE", "mae", ".4f"), ("mean pred.", "pred_mean", ".4f"),
         ("mean obs.", "obs_mean", ".4f")),
        "rmse", ("rmse", "mae")),
}


def objective_of(report: dict) -> Objective:
    return OBJECTIVES[report.get("objective", "binary")]  # reports older than the key are binary


def _bucket_label(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else f"{lo}-{hi - 1}"


class NonFiniteScores(ValueError):
    """Some predictions are NaN or infinite: the adaptation diverged (too high an inner rate)."""


def build_report(pred: Predictions, cfg: Config, *, inner_steps: int | None = None,
                 algorithm: str = "maml") -> dict:
    """Metrics of gathered predictions. Flat keys ``<scorer>_<metric>`` (scorer: maml,
    no_adapt, erm, oracle; metric for model.objective "binary": auc, gauc, logloss,
    pred_rate, obs_rate, calibration; for "regression": rmse, mae, pred_mean, obs_mean),
    plus ``buckets``, the K curve (``auc_vs_k`` / ``rmse_vs_k``) and, binary only,
    ``reliability``."""
    steps = inner_steps_for(cfg, inner_steps)
    obj = OBJECTIVES[cfg.model.objective]
    y = np.concatenate(pred.labels)
    g = np.concatenate(pred.task_ids)
    sup = np.concatenate(pred.support_size)
    curve = {k: np.concatenate(v) for k, v in pred.scores.items()}
    bad = sorted(k for k, v in curve.items() if not np.isfinite(v).all())
    if bad:
        raise NonFiniteScores(f"predictions are not finite for {', '.join(bad)} (K inner steps): the adaptation "
                              f"diverged; lower meta.inner_lr / meta.embedding_inner_lr or the inner steps")
    per_label: dict[str, float] = {}
    if y.ndim == 2:  # several labels: each label's metrics, suffixed; the rest of the report is the first's
        per_label = label_metrics(y, curve, g, cfg, steps, algorithm)
        y = y[:, 0]
        curve = {k: v[:, 0] if v.ndim == 2 else v for k, v in curve.items()}
    # the model's own scorer(s): an ERM checkpoint without adaptation is the ERM column
    named: dict[str, np.ndarray] = {}
    if algorithm != "erm":  # adapted (maml, reptile): the "maml" scorer is the model after K steps
        named["maml"], named["no_adapt"] = curve[f"k={steps}"], curve["k=0"]
    else:
        named["erm"] = curve["k=0"]
    for extra in ("erm", "erm_ft", "oracle"):
        if extra in curve:
            named[extra] = curve[extra]
    report: dict = {"tasks": float(len(np.unique(g))), "query_rows": float(len(y)), "inner_steps": float(steps),
                    "algorithm": algorithm, "objective": cfg.model.objective, "split": cfg.eval.split}
    for name, p in named.items():
        for k, v in obj.summarize(y, p, g).items():
            report[f"{name}_{k}"] = v
    if per_label:
        report["labels"] = cfg.features.label_names()
        report.update(per_label)
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


def _scorers(curve: dict[str, np.ndarray], steps: int, algorithm: str) -> dict[str, np.ndarray]:
    """The report's scorers of several labels' predictions ``[rows, L]`` (a scorer of one
    column, the oracle's true probability, scores the first label only)."""
    named = {"maml": curve[f"k={steps}"], "no_adapt": curve["k=0"]} if algorithm != "erm" else {"erm": curve["k=0"]}
    named.update({k: curve[k] for k in ("erm", "erm_ft") if k in curve})
    return {k: v for k, v in named.items() if v.ndim == 2}


def label_metrics(y: np.ndarray, curve: dict[str, np.ndarray], g: np.ndarray, cfg: Config, steps: int,
                  algorithm: str) -> dict[str, float]:
    """Each scorer's metrics of each label of ``y`` ``[rows, L]``, as ``<scorer>_<metric>_<label>``
    (``maml_auc_conversion``). model.arch esmm, whose second prediction is pCTCVR: also
    ``<scorer>_ctcvr_auc`` (pCTCVR against the conversion label, every row) and
    ``<scorer>_cvr_auc`` (pCVR = pCTCVR / pCTR against it, on the clicked rows only, the
    rows a CVR model is judged on)."""
    obj = OBJECTIVES[cfg.model.objective]
    labels = cfg.features.label_names()
    if y.shape[1] != len(labels):
        raise ValueError(f"{y.shape[1]} labels per row, the config names {labels} (features.labels)")
    out: dict[str, float] = {}
    for name, p in _scorers(curve, steps, algorithm).items():
        for i, label in enumerate(labels):
            out.update({f"{name}_{k}_{label}": v for k, v in obj.summarize(y[:, i], p[:, i], g).items()})
        if cfg.model.arch == "esmm":
            out[f"{name}_ctcvr_auc"] = metrics.auc(y[:, 1], p[:, 1])
            clicked = y[:, 0] == 1
            out[f"{name}_cvr_auc"] = metrics.auc(y[clicked, 1], p[clicked, 1] / np.maximum(p[clicked, 0], 1e-30))
    return out


def flat_metrics(report: dict) -> dict[str, float]:
    """The report as MLflow metrics (without the K curve, logged with step = K)."""
    out = {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for b in report.get("buckets", []):
        tag = "support_" + b["support"].replace("+", "_plus")
        out.update({f"{tag}/{k}": float(v) for k, v in b.items() if k != "support"})
    for f, v in report.get("new_ids", {}).items():
        out[f"new_ids/{f}"] = float(v["occurrences"])
    return out
