"""`gmeta` CLI end to end on the debug config: synth, prepare, 2-process MAML and ERM
training, evaluation, and what MLflow holds afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ads_cvr_debug.yaml"


def gmeta(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "gmeta.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)
    assert proc.returncode == 0, f"gmeta {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_train_evaluate_and_mlflow_end_to_end(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gmeta("synth", "--config", str(CONFIG), cwd=tmp_path)
    gmeta("prepare", "--config", str(CONFIG), cwd=tmp_path)
    assert (tmp_path / "data/ads_cvr_debug/shards/manifest.json").is_file()

    gmeta("train", "--config", str(CONFIG), "--nproc-per-node", "2", "--tracking-uri", uri,
          "train.output_dir=runs/maml", cwd=tmp_path)
    gmeta("train", "--config", str(CONFIG), "--nproc-per-node", "2", "--tracking-uri", uri,
          "meta.algorithm=erm", "train.output_dir=runs/erm", "train.eval_at_end=false", cwd=tmp_path)
    maml_ckpt, erm_ckpt = tmp_path / "runs/maml/checkpoint", tmp_path / "runs/erm/checkpoint"
    meta = json.loads((maml_ckpt / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["algorithm"] == "maml" and meta["step"] > 0

    out = gmeta("evaluate", "--config", str(CONFIG), "--checkpoint", str(maml_ckpt), "--baseline", str(erm_ckpt),
                cwd=tmp_path).stdout
    assert "| maml |" in out and "| erm |" in out and "| oracle |" in out
    report = json.loads((tmp_path / "runs/maml/eval_report.json").read_text())
    # cold start: adapting on the support set must beat the plain ERM model and no adaptation
    assert report["maml_auc"] > report["erm_auc"] + 0.02, report
    assert report["maml_auc"] > report["no_adapt_auc"] + 0.02, report
    assert report["oracle_auc"] > report["maml_auc"], report
    assert report["tasks"] == json.loads(
        (tmp_path / "data/ads_cvr_debug/shards/manifest.json").read_text())["splits"]["eval"]["tasks"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("gmeta-ads-cvr-debug")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # one run per `gmeta train`, rank 0 only
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["meta.algorithm"] == "maml" and run.data.params["meta.inner_steps"] == "2"
    assert run.data.tags["gmeta.world_size"] == "2"
    for key in ("train/query_loss", "train/support_loss", "train/tasks_per_s", "train/rows_per_s",
                "train/data_stall_share", "train/skipped_bad_tasks",
                "eval/maml_auc", "eval/maml_gauc", "eval/maml_logloss", "eval/no_adapt_auc", "eval/erm_auc",
                "eval/oracle_auc"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "train/query_loss")
    assert len(history) >= 3
    assert run.data.metrics["eval/maml_auc"] == pytest.approx(report["maml_auc"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "manifest.json", "eval_report.json", "eval_report.md"} <= artifacts
