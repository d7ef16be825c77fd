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

    def log_artifact(self, path: str | Path) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run. ``run_id`` given: continue that run (e.g. evaluation of a checkpoint)."""

    def __init__(self, uri: str, experiment: str, run_name: str = "", run_id: str = "") -> None:
        import mlflow

        self._mlflow = mlflow
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        if run_id:
            run = mlflow.start_run(run_id=run_id)
        else:
            mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_name=run_name or None)
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

    def log_text(self, text: str, name: str) -> None:
        self._mlflow.log_text(text, name)

    def log_artifact(self, path: str | Path) -> None:
        self._mlflow.log_artifact(str(path))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def make_tracker(enabled: bool, uri: str, experiment: str, run_name: str = "", run_id: str = ""):
    if not enabled:
        return NullTracker()
    return MlflowTracker(uri, experiment, run_name, run_id)


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


__all__ = ["MlflowTracker", "NullTracker", "make_tracker", "resolve_tracking_uri", "ui_command"]
