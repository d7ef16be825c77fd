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
    """Group AUC: per-task AUC averaged with weights = task rows, over tasks with both classes."""
    order = np.argsort(groups, kind="stable")
    g, lab, sc = groups[order], labels[order], scores[order]
    bounds = np.flatnonzero(np.diff(g)) + 1
    total = weight = 0.0
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(g)]])):
        y = lab[lo:hi]
        if 0 < y.sum() < len(y):
            total += roc_auc_score(y, sc[lo:hi]) * (hi - lo)
            weight += hi - lo
    return float(total / weight) if weight else float("nan")


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
