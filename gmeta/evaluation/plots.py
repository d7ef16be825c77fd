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


_LOSS = {"binary": "binary cross-entropy", "regression": "squared error"}


def learning_curves(history: dict[str, list[tuple[int, float]]], path: str | Path,
                    objective: str = "binary") -> Path:
    """Losses against training step; ``history``: metric name -> [(step, value)];
    ``objective``: model.objective, which names the loss."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in sorted(history.items()):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name.split("/")[-1])
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({_LOSS[objective]})")
    ax.set_title("training")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def metric_vs_steps(report: dict, path: str | Path, metrics: tuple[str, ...]) -> Path:
    """``metrics`` of the adapted model against the number of inner steps K (the curve
    ``report["<first metric>_vs_k"]``), the first also for the fixed scorers (ERM, oracle)
    as horizontal lines."""
    metric = metrics[0]
    label = metric.upper()
    curve = report[f"{metric}_vs_k"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(curve["k"], curve[metric], "o-", color=_COLORS["maml"], label=label)
    for other in metrics[1:]:
        ax.plot(curve["k"], curve[other], "s--", color=_COLORS["maml"], alpha=0.6, label=other.upper())
    for name in ("erm", "oracle"):
        if f"{name}_{metric}" in report:
            ax.axhline(report[f"{name}_{metric}"], color=_COLORS[name], ls=":", label=f"{name} {label}")
    ax.set_xlabel("inner steps K on the support set")
    ax.set_ylabel(f"query {label}")
    ax.set_title(f"cold start: {label} vs. adaptation steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def metric_by_bucket(report: dict, path: str | Path, metric: str) -> Path:
    """Query ``metric`` of each scorer per support-set size bucket (grouped bars)."""
    buckets = report["buckets"]
    label = metric.upper()
    names = [n for n in ("maml", "no_adapt", "erm", "oracle") if buckets and f"{n}_{metric}" in buckets[0]]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(buckets))]
        ax.bar(xs, [b[f"{name}_{metric}"] for b in buckets], width, label=name, color=_COLORS[name])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(buckets))],
                  [f"{b['support']}\n({int(b['tasks'])} tasks)" for b in buckets], fontsize=8)
    ax.set_xlabel("support rows per task")
    ax.set_ylabel(f"query {label}")
    if metric == "auc":  # AUCs live in [0.5, 1]: zoom in (bars of an error metric keep their zero)
        values = [b[f"{n}_auc"] for b in buckets for n in names if b[f"{n}_auc"] == b[f"{n}_auc"]]
        ax.set_ylim(min([0.5] + [v - 0.05 for v in values]), 1.0)
    ax.set_title(f"cold start: {label} by support-set size")
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


def over_days(days: list[str], series: dict[str, list], path: str | Path, title: str = "") -> Path:
    """Metrics (name -> a value per day, None where missing) against the day."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = list(range(len(days)))
    for name, values in series.items():
        pts = [(i, v) for i, v in zip(x, values) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(days, rotation=30, ha="right")
    ax.set_xlabel("day scored (new tasks)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))
