"""Experiment tracking behind a small interface. Only rank 0 tracks; other ranks get
a ``NullTracker``. The embedded default is MLflow with a SQLite file in the working
directory; ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` point at a shared ``mlflow server``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve_tracking_uri(configured: str = "", cli: str = "") -> str:
    """CLI flag, then tracking.uri, then MLFLOW_TRACKING_URI, then ./mlflow.db (absolute)."""
    uri = cli or configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return uri


class NullTracker:
    run_id = ""
    uri = ""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run. ``run_id`` given: continue that run (e.g. evaluation of a checkpoint)."""

    def __init__(self, uri: str, experiment: str, run_name: str = "", run_id: str = "",
                 system_metrics_s: float = 0, parent_run_id: str = "") -> None:
        import mlflow

        # no per-file progress bars in training logs when a model is logged
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self._mlflow = mlflow
        self.uri = uri
        self.history: dict[str, list[tuple[int, float]]] = {}  # what was logged, for plots
        mlflow.set_tracking_uri(uri)
        if system_metrics_s > 0:  # CPU, memory, disk, network (and GPU) of this process's host
            mlflow.set_system_metrics_sampling_interval(system_metrics_s)
        if run_id:
            run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics_s > 0)
        else:
            mlflow.set_experiment(experiment)
            # nested under parent_run_id (another process's run: MLflow's parent tag)
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
            run = mlflow.start_run(run_name=run_name or None, log_system_metrics=system_metrics_s > 0, tags=tags)
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        log.info("mlflow: run %s at %s", self.run_id, uri)

    def log_params(self, params: dict[str, Any]) -> None:
        items = {k: ("" if v is None else str(v)) for k, v in params.items()}
        keys = sorted(items)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
            self._mlflow.log_params({k: items[k] for k in keys[i: i + 100]})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v == v}  # MLflow rejects NaN on some stores
        if clean:
            self._mlflow.log_metrics(clean, step=step)
            for k, v in clean.items():
                self.history.setdefault(k, []).append((step or 0, v))

    def log_text(self, text: str, name: str) -> None:
        self._mlflow.log_text(text, name)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def make_tracker(enabled: bool, uri: str, experiment: str, run_name: str = "", run_id: str = "",
                 system_metrics_s: float = 0, parent_run_id: str = ""):
    if not enabled:
        return NullTracker()
    return MlflowTracker(uri, experiment, run_name, run_id, system_metrics_s, parent_run_id)


def _git_commit() -> str:
    """Commit of the gmeta source tree, when it is a git checkout ("" otherwise)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    if out.returncode != 0:
        return ""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_tags() -> dict[str, str]:
    """Tags that say what produced a run: gmeta's commit and the versions of its stack."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from gmeta.version import __version__

    tags = {"gmeta.version": __version__, "python.version": platform.python_version()}
    commit = _git_commit()
    if commit:
        tags["gmeta.git_commit"] = commit
    for pkg in ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "pyarrow", "webdataset", "mlflow", "numpy"):
        try:
            tags[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    return tags


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


__all__ = ["MlflowTracker", "NullTracker", "environment_tags", "make_tracker", "resolve_tracking_uri", "ui_command"]
