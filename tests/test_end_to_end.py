"""`gmeta` CLI end to end on the debug config: synth, prepare, 2-process MAML and ERM
training into a real ``mlflow server`` on localhost, evaluation by run id, batch prediction,
and what the server holds afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmeta.parallel.dist import free_port
from tests.support.cli import run_gmeta

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ads_cvr_debug.yaml"


def gmeta(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "gmeta.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)
    assert proc.returncode == 0, f"gmeta {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc


def gmeta_here(*args: str, capsys) -> str:
    """A one-process command in this process (the same command line, gmeta.cli.main), without a
    new interpreter's imports, which cost seconds each; returns what it printed."""
    from gmeta.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert rc == 0, f"gmeta {' '.join(args)} failed:\n{out}\n{err[-6000:]}"
    return out


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server (SQLite store, served artifacts) on a free local port."""
    import time
    import urllib.request

    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        # a deadline, not a count of tries: on a busy machine the server takes over a minute to start
        deadline = time.monotonic() + 300
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
            assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            if time.monotonic() > deadline:
                raise AssertionError("mlflow server did not start in 300 s: "
                                     + (tmp_path / "mlflow-server.log").read_text()[-3000:])
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_train_evaluate_predict_into_mlflow_server(tmp_path, mlflow_server, monkeypatch, capsys):
    uri = mlflow_server
    monkeypatch.chdir(tmp_path)  # the config's relative data and output directories
    gmeta_here("synth", "--config", str(CONFIG), capsys=capsys)
    gmeta_here("prepare", "--config", str(CONFIG), capsys=capsys)
    manifest = json.loads((tmp_path / "data/ads_cvr_debug/shards/manifest.json").read_text())

    gmeta("train", "--config", str(CONFIG), "--nproc-per-node", "2", "--tracking-uri", uri,
          "train.output_dir=runs/maml", "tracking.system_metrics_s=1", cwd=tmp_path)
    # the ERM baseline in one process, in this one (tests/support/cli.py): MAML's run above is
    # what shows two ranks logging one run; this one is the baseline MAML must beat
    erm = run_gmeta(["train", "--config", str(CONFIG), "--nproc-per-node", "1", "--tracking-uri", uri,
                     "meta.algorithm=erm", "train.output_dir=runs/erm", "train.eval_at_end=false",
                     "tracking.log_model=false"], cwd=tmp_path)
    assert erm.returncode == 0, erm.stderr[-6000:]
    maml_ckpt, erm_ckpt = tmp_path / "runs/maml/checkpoint", tmp_path / "runs/erm/checkpoint"
    meta = json.loads((maml_ckpt / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["algorithm"] == "maml" and meta["step"] > 0

    # evaluation by run id: the checkpoint is found through the run's tag
    out = gmeta_here("evaluate", "--config", str(CONFIG), "--run-id", meta["mlflow_run_id"], "--tracking-uri", uri,
                     "--baseline", str(erm_ckpt), "--out", "runs/maml/eval_with_erm", capsys=capsys)
    assert "| maml |" in out and "| erm |" in out and "| oracle |" in out
    report = json.loads((tmp_path / "runs/maml/eval_with_erm/eval_report.json").read_text())
    # cold start: adapting on the support set must beat the plain ERM model and no adaptation
    assert report["maml_auc"] > report["erm_auc"] + 0.02, report
    assert report["maml_auc"] > report["no_adapt_auc"] + 0.02, report
    assert report["oracle_auc"] > report["maml_auc"], report
    assert report["tasks"] == manifest["splits"]["eval"]["tasks"]

    pred = gmeta_here("predict", "--checkpoint", str(maml_ckpt), "--out", "preds", capsys=capsys)
    assert f"{manifest['splits']['eval']['query_rows']} query rows" in pred

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("gmeta-ads-cvr-debug")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # one run per `gmeta train`, rank 0 only; evaluation adds to the run
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["meta.algorithm"] == "maml" and run.data.params["meta.inner_steps"] == "2"
    tags = run.data.tags
    assert tags["gmeta.world_size"] == "2" and tags["gmeta.checkpoint"] == str(maml_ckpt.resolve())
    assert tags["version.torch"].startswith("2.") and "version.torchrec" in tags and "version.mlflow" in tags
    for key in ("train/query_loss", "train/support_loss", "train/tasks_per_s", "train/rows_per_s",
                "train/data_stall_share", "train/comm_wait_share", "train/skipped_bad_tasks", "train/tasks_left_out",
                "eval/maml_auc", "eval/maml_gauc", "eval/maml_logloss", "eval/maml_calibration", "eval/no_adapt_auc",
                "eval/erm_auc", "eval/oracle_auc", "eval/support_8-15/maml_auc", "eval/auc_vs_k"):
        assert key in run.data.metrics, key
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "train/query_loss")) >= 3
    curve = client.get_metric_history(run.info.run_id, "eval/auc_vs_k")
    assert sorted({m.step for m in curve}) == [0, 1, 2, 3, 5]
    assert run.data.metrics["eval/maml_auc"] == pytest.approx(report["maml_auc"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "manifest.json", "eval", "plots"} <= artifacts, artifacts
    evals = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/eval_report.json", "eval/eval_report.html", "eval/auc_vs_k.png",
            "eval/auc_by_support_size.png", "eval/calibration.png"} <= evals, evals
    # the model: logged through the server, loadable as a pyfunc
    import mlflow

    models = client.search_logged_models([exp.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == run.info.run_id
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(models[0].model_uri)
    assert "role" in loaded.metadata.get_input_schema().input_names()
