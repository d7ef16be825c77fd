"""PNG plots of training and evaluation (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

_COLORS = {"maml": "tab:blue", "no_adapt": "tab:gray", "erm": "tab:orange", "oracle": "tab:green"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves(history: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """Losses against training step; ``history``: metric name -> [(step, value)]."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in sorted(history.items()):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name.split("/")[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (binary cross-entropy)")
    ax.set_title("training")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def auc_vs_steps(report: dict, path: str | Path) -> Path:
    """AUC and GAUC of the adapted model against the number of inner steps K, with the
    fixed scorers (ERM, oracle) as horizontal lines."""
    curve = report["auc_vs_k"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(curve["k"], curve["auc"], "o-", color=_COLORS["maml"], label="AUC")
    ax.plot(curve["k"], curve["gauc"], "s--", color=_COLORS["maml"], alpha=0.6, label="GAUC")
    for name in ("erm", "oracle"):
        if f"{name}_auc" in report:
            ax.axhline(report[f"{name}_auc"], color=_COLORS[name], ls=":", label=f"{name} AUC")
    ax.set_xlabel("inner steps K on the support set")
    ax.set_ylabel("query AUC")
    ax.set_title("cold start: AUC vs. adaptation steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def auc_by_bucket(report: dict, path: str | Path) -> Path:
    """Query AUC of each scorer per support-set size bucket (grouped bars)."""
    buckets = report["buckets"]
    names = [n for n in ("maml", "no_adapt", "erm", "oracle") if buckets and f"{n}_auc" in buckets[0]]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(buckets))]
        ax.bar(xs, [b[f"{name}_auc"] for b in buckets], width, label=name, color=_COLORS[name])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(buckets))],
                  [f"{b['support']}\n({int(b['tasks'])} tasks)" for b in buckets], fontsize=8)
    ax.set_xlabel("support rows per task")
    ax.set_ylabel("query AUC")
    values = [b[f"{n}_auc"] for b in buckets for n in names if b[f"{n}_auc"] == b[f"{n}_auc"]]
    ax.set_ylim(min([0.5] + [v - 0.05 for v in values]), 1.0)
    ax.set_title("cold start: AUC by support-set size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, Path(path))


def calibration(report: dict, path: str | Path) -> Path:
    """Reliability diagram: observed rate against mean predicted rate per bin."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    top = 0.0
    for name, bins in report["reliability"].items():
        pred, obs = [b["pred"] for b in bins], [b["obs"] for b in bins]
        ax.plot(pred, obs, "o-", color=_COLORS.get(name), label=name, ms=3)
        top = max(top, *pred, *obs)
    ax.plot([0, top], [0, top], "k:", lw=1)
    ax.set_xlabel("mean predicted rate")
    ax.set_ylabel("observed rate")
    ax.set_title("calibration (equal-count bins)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))
