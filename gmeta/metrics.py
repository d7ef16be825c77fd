"""Offline metrics: ranking and calibration for CTR/CVR models, errors for regression."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

# the direction of each metric a run or a search can be judged by
HIGHER_IS_BETTER = {"auc": True, "gauc": True, "logloss": False, "rmse": False, "mae": False}

# Why a metric comes out NaN: it cannot be computed on these rows. Reports show
# "n/a (<reason>)" instead of a bare nan (see ``not_available``).
NAN_REASONS = {
    "auc": "one class",  # AUC needs positive and negative rows
    "gauc": "no task with both classes",
    "calibration": "no positive labels",  # predicted / observed rate with an observed rate of 0
}


def not_available(metric: str) -> str:
    """How a report shows ``metric`` (``auc``, or a report key such as ``maml_auc``) when it
    is NaN."""
    for name, reason in NAN_REASONS.items():
        if metric == name or metric.endswith("_" + name):
            return f"n/a ({reason})"
    return "n/a"


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Group AUC: per-task AUC averaged with weights = task rows, over tasks with both classes.

    Every task's AUC at once, from the rank sums of its positives (ties at their mid-rank, as
    ``roc_auc_score`` counts them): a loop of ``roc_auc_score`` over thousands of tasks spent
    most of an evaluation's metric time in its per-call input checks."""
    labels, scores, groups = np.asarray(labels), np.asarray(scores), np.asarray(groups)
    if not np.isfinite(scores).all():
        raise ValueError("gauc: the scores hold NaN or infinity")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("gauc: labels must be 0 or 1")
    n = len(labels)
    if n == 0:
        return float("nan")
    order = np.lexsort((scores, groups))  # by task, then score
    g, s, y = groups[order], scores[order], labels[order].astype(np.float64)
    new_task = np.r_[True, g[1:] != g[:-1]]
    task = np.cumsum(new_task) - 1
    rank = np.arange(n) - np.flatnonzero(new_task)[task]  # 0-based, within the task
    new_run = new_task | np.r_[True, s[1:] != s[:-1]]  # runs of tied scores within a task
    run = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    lengths = np.diff(np.r_[starts, n])
    mid = (rank[starts] + (lengths - 1) / 2.0 + 1.0)[run]  # 1-based mid-rank of each row's tie run
    rows = np.bincount(task).astype(np.float64)
    pos = np.bincount(task, weights=y)
    neg = rows - pos
    both = (pos > 0) & (neg > 0)
    if not both.any():
        return float("nan")
    rank_sum = np.bincount(task, weights=mid * y)[both]
    per_task = (rank_sum - pos[both] * (pos[both] + 1) / 2) / (pos[both] * neg[both])
    return float((per_task * rows[both]).sum() / rows[both].sum())


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1]))


def calibration(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Mean predicted vs. observed rate, and their ratio (1 = calibrated on average)."""
    pred, obs = float(np.mean(probs)), float(np.mean(labels))
    return {"pred_rate": pred, "obs_rate": obs, "calibration": pred / obs if obs > 0 else float("nan")}


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int) -> list[dict[str, float]]:
    """Predicted vs. observed rate in ``bins`` bins of equal row count by predicted value
    (CTR/CVR predictions crowd near 0, where equal-width bins would hold nearly every row)."""
    order = np.argsort(probs, kind="stable")
    out = []
    for part in np.array_split(order, bins):
        if len(part):
            out.append({"rows": float(len(part)), "pred": float(probs[part].mean()), "obs": float(labels[part].mean())})
    return out


def summarize(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """AUC, GAUC, logloss and calibration of one scorer."""
    return {"auc": auc(labels, probs), "gauc": gauc(labels, probs, groups), "logloss": logloss(labels, probs),
            **calibration(labels, probs)}


def rmse(labels: np.ndarray, preds: np.ndarray) -> float:
    return float(np.sqrt(np.mean((preds - labels) ** 2)))


def mae(labels: np.ndarray, preds: np.ndarray) -> float:
    return float(np.mean(np.abs(preds - labels)))


def summarize_regression(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """RMSE, MAE, and mean predicted vs. observed value of one scorer."""
    return {"rmse": rmse(labels, preds), "mae": mae(labels, preds), "pred_mean": float(np.mean(preds)),
            "obs_mean": float(np.mean(labels))}
