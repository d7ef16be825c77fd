"""Evaluation report, distributed evaluation, batch prediction with resume, and the pyfunc
model, on a briefly trained debug checkpoint."""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist

from gmeta.checkpoint import load_sharded, load_unsharded
from gmeta.evaluation.evaluate import evaluate, run_evaluate
from gmeta.inference import predict as predict_mod
from gmeta.inference.predict import PredictError, run_predict
from gmeta.io.manifest import load_manifest
from gmeta.scoring import collect
from tests.support.multiprocess import run_ranks


def _read_predictions(out) -> pd.DataFrame:
    return pq.read_table(out).to_pandas().sort_values(["task_id", "row"]).reset_index(drop=True)


def test_report_contents(debug_checkpoint, debug_data, tmp_path):
    report = run_evaluate(debug_checkpoint, shards_dir=str(debug_data["shards"]), tracking=False,
                          out_dir=tmp_path / "eval", inner_steps=2)
    manifest = load_manifest(debug_data["shards"])
    assert report["tasks"] == manifest["splits"]["eval"]["tasks"]
    assert report["query_rows"] == manifest["splits"]["eval"]["query_rows"]
    for scorer in ("maml", "no_adapt", "oracle"):
        for metric in ("auc", "gauc", "logloss", "pred_rate", "obs_rate", "calibration"):
            assert np.isfinite(report[f"{scorer}_{metric}"]), (scorer, metric)
        assert report[f"{scorer}_calibration"] == pytest.approx(report[f"{scorer}_pred_rate"]
                                                                / report[f"{scorer}_obs_rate"])
    # the curve holds K = 0 (no adaptation) and K = 2 (the adapted model) among eval.curve_steps
    curve = report["auc_vs_k"]
    assert curve["k"] == [0, 1, 2, 3, 5]
    assert curve["auc"][0] == report["no_adapt_auc"] and curve["auc"][2] == report["maml_auc"]
    assert report["maml_auc"] > report["no_adapt_auc"]  # adaptation helps even after 40 steps
    # buckets partition the tasks and rows by support size
    buckets = report["buckets"]
    assert sum(b["tasks"] for b in buckets) == report["tasks"]
    assert sum(b["query_rows"] for b in buckets) == report["query_rows"]
    assert [b["support"] for b in buckets] == ["8-15", "16-31", "32-63"]
    assert set(report["reliability"]) == {"maml", "no_adapt", "oracle"}
    files = {p.name for p in (tmp_path / "eval").iterdir()}
    assert files == {"eval_report.json", "eval_report.md", "eval_report.html", "auc_vs_k.png",
                     "auc_by_support_size.png", "calibration.png"}
    assert json.loads((tmp_path / "eval" / "eval_report.json").read_text())["maml_auc"] == report["maml_auc"]
    md = (tmp_path / "eval" / "eval_report.md").read_text()
    assert f"| maml | {report['maml_gauc']:.4f} | {report['maml_auc']:.4f} |" in md and "| 8-15 |" in md
    html = (tmp_path / "eval" / "eval_report.html").read_text()
    assert "<table>" in html and 'src="auc_vs_k.png"' in html
    assert (tmp_path / "eval" / "auc_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _evaluate_on_ranks(rank, world, ckpt, shards, out):
    model, cfg, _ = load_sharded(ckpt, __import__("torch").device("cpu"))
    report = evaluate(model, cfg, shards, inner_steps=2)
    if rank == 0:
        out.write_text(json.dumps(report))
    else:
        assert report is None
    assert dist.get_world_size() == world


def test_distributed_evaluation_equals_single_process(debug_checkpoint, debug_data, tmp_path):
    model, cfg, _ = load_unsharded(debug_checkpoint)
    single = evaluate(model, cfg, debug_data["shards"], inner_steps=2)
    run_ranks(_evaluate_on_ranks, 2, debug_checkpoint, debug_data["shards"], tmp_path / "r.json")
    two = json.loads((tmp_path / "r.json").read_text())
    assert two["processes"] == 2 and two["tasks"] == single["tasks"]
    for key in ("maml_auc", "maml_gauc", "maml_logloss", "no_adapt_auc", "oracle_auc", "maml_calibration"):
        assert two[key] == pytest.approx(single[key], abs=1e-6), key
    assert two["auc_vs_k"]["auc"] == pytest.approx(single["auc_vs_k"]["auc"], abs=1e-6)


def test_predict_writes_every_query_row_once_with_evaluate_scores(debug_checkpoint, debug_data, tmp_path):
    summary = run_predict(debug_checkpoint, tmp_path / "p", shards_dir=str(debug_data["shards"]), inner_steps=2,
                          rows_per_part=1000, progress=False)
    manifest = load_manifest(debug_data["shards"])
    df = _read_predictions(tmp_path / "p")
    assert len(df) == summary["rows"] == manifest["splits"]["eval"]["query_rows"]
    assert df["task_id"].nunique() == manifest["splits"]["eval"]["tasks"]
    assert not df.duplicated(["task_id", "row"]).any()
    assert summary["parts"] == len(list((tmp_path / "p").glob("part-*.parquet"))) >= 3
    # the same scores as evaluation's adapted model, row for row
    model, cfg, _ = load_unsharded(debug_checkpoint)
    pred = collect(model, cfg, debug_data["shards"], inner_steps=2)
    ev = pd.DataFrame({"task_id": np.concatenate(pred.task_ids), "score": np.concatenate(pred.scores["k=2"])})
    ev["row"] = ev.groupby("task_id").cumcount()
    merged = df.merge(ev, on=["task_id", "row"], suffixes=("", "_eval"))
    assert len(merged) == len(df)
    np.testing.assert_allclose(merged["score"], merged["score_eval"], atol=1e-6)
    # keys are the task keys of the raw data
    raw = pd.read_parquet(debug_data["raw"])
    assert set(df["task_key"]) <= set(raw["campaign_id"])
    # nothing is overwritten: a second run into the same directory is refused
    with pytest.raises(PredictError, match="--resume"):
        run_predict(debug_checkpoint, tmp_path / "p", shards_dir=str(debug_data["shards"]), progress=False)


class _Crash(RuntimeError):
    pass


def test_predict_resumes_after_interruptions_without_duplicates(debug_checkpoint, debug_data, tmp_path,
                                                                 monkeypatch):
    kw = dict(shards_dir=str(debug_data["shards"]), inner_steps=1, tasks_per_batch=16, rows_per_part=700,
              progress=False)
    run_predict(debug_checkpoint, tmp_path / "whole", **kw)
    whole = _read_predictions(tmp_path / "whole")

    real_predict, real_write = predict_mod.predict_query, predict_mod.write_atomic
    calls = {"n": 0}

    def crash_in_batch(*a, **k):  # dies while scoring the 5th batch
        calls["n"] += 1
        if calls["n"] == 5:
            raise _Crash
        return real_predict(*a, **k)

    monkeypatch.setattr(predict_mod, "predict_query", crash_in_batch)
    with pytest.raises(_Crash):
        run_predict(debug_checkpoint, tmp_path / "p", **kw)
    monkeypatch.setattr(predict_mod, "predict_query", real_predict)

    writes = {"n": 0}

    def crash_before_progress(path, write):  # a part renamed into place, its progress never written
        if path.name == predict_mod.PROGRESS:
            writes["n"] += 1
            if writes["n"] == 2:
                raise _Crash
        return real_write(path, write)

    monkeypatch.setattr(predict_mod, "write_atomic", crash_before_progress)
    with pytest.raises(_Crash):
        run_predict(debug_checkpoint, tmp_path / "p", resume=True, **kw)
    monkeypatch.setattr(predict_mod, "write_atomic", real_write)
    state = json.loads((tmp_path / "p" / predict_mod.PROGRESS).read_text())
    assert len(list((tmp_path / "p").glob("part-*.parquet"))) == state["parts"] + 1  # one orphan part

    summary = run_predict(debug_checkpoint, tmp_path / "p", resume=True, **kw)
    assert summary["complete"]
    resumed = _read_predictions(tmp_path / "p")
    pd.testing.assert_frame_equal(resumed, whole)
    # a finished output resumes to nothing; other settings are refused
    assert run_predict(debug_checkpoint, tmp_path / "p", resume=True, **kw)["new_rows"] == 0
    with pytest.raises(PredictError, match="same checkpoint"):
        run_predict(debug_checkpoint, tmp_path / "p", resume=True, **{**kw, "inner_steps": 3})


def test_pyfunc_round_trip_scores_equal_predict(debug_checkpoint, debug_data, tmp_path):
    from gmeta.inference.pyfunc import log_model
    from gmeta.inference.serving import assign_roles

    cfg = load_unsharded(debug_checkpoint)[1]
    run_predict(debug_checkpoint, tmp_path / "p", shards_dir=str(debug_data["shards"]), inner_steps=2,
                progress=False)
    pred = _read_predictions(tmp_path / "p")
    keys = list(pred["task_key"].unique()[:5])
    raw = pd.read_parquet(debug_data["raw"])
    rows = assign_roles(raw[raw["campaign_id"].isin(keys)].reset_index(drop=True), cfg)
    rows.loc[rows["role"] == "query", "label"] = np.nan  # unknown at serving time

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("pyfunc", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp):
        model, cfg, _ = load_unsharded(debug_checkpoint)
        uri = log_model(debug_checkpoint, cfg, model)
    loaded = mlflow.pyfunc.load_model(uri)
    assert loaded.metadata.get_input_schema() is not None
    out = loaded.predict(rows, params={"inner_steps": 2})
    assert list(out.index) == list(rows.index)
    assert out["score"][rows["role"] != "query"].isna().all()
    q = rows.assign(score=out["score"])[rows["role"] == "query"].sort_values(["campaign_id", "ts"])
    q["row"] = q.groupby("campaign_id").cumcount()
    merged = q.merge(pred, left_on=["campaign_id", "row"], right_on=["task_key", "row"], suffixes=("", "_predict"))
    assert len(merged) == len(q) == int(pred["task_key"].isin(keys).sum())
    np.testing.assert_allclose(merged["score"], merged["score_predict"], atol=1e-5)
    # bad input names the column
    with pytest.raises(Exception, match="role"):
        loaded.predict(rows.drop(columns=["role"]))


def test_diverged_adaptation_is_a_clear_error():
    """NaN predictions (an inner rate that diverges) name the K, not a metric library's error."""
    import numpy as np

    from gmeta.config import Config
    from gmeta.evaluation.report import NonFiniteScores, build_report
    from gmeta.scoring import Predictions

    pred = Predictions(labels=[np.array([0.0, 1.0, 1.0])], task_ids=[np.array([1, 1, 2])],
                       support_size=[np.array([4, 4, 9])],
                       scores={"k=0": [np.array([0.2, 0.7, 0.6])], "k=2": [np.array([0.1, np.nan, 0.5])]})
    cfg = Config()
    cfg.meta.inner_steps = 2
    with pytest.raises(NonFiniteScores, match=r"not finite for k=2 .*lower meta.inner_lr"):
        build_report(pred, cfg)
    pred.scores["k=2"] = [np.array([0.1, 0.9, 0.5])]
    assert build_report(pred, cfg)["maml_auc"] == 1.0


def test_baseline_fine_tuned_per_task_is_chosen_on_validation_tasks(debug_checkpoint, debug_val_shards, tmp_path,
                                                                     caplog):
    """``gmeta evaluate --baseline``: ERM as it is and ERM fine-tuned on each task's support
    rows, its K and rates chosen on the validation split (never the test tasks)."""
    from gmeta.evaluation.finetune import FINE_TUNE_LRS, STEPS
    from tests.conftest import DEBUG_CONFIG
    from tests.support.cli import run_gmeta

    shards = debug_val_shards
    proc = run_gmeta(
        ["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", f"data.shards_dir={shards}",
         f"train.output_dir={tmp_path / 'erm'}", "meta.algorithm=erm", "train.max_steps=30", "train.eval_at_end=false",
         "tracking.enabled=false", "data.split.val_fraction=0.15"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    erm = tmp_path / "erm" / "checkpoint"
    # the MAML checkpoint was trained on shards without a val split; the same eval_fraction
    # and seed hold out the same test tasks in both, so scoring it on these is sound
    report = run_evaluate(debug_checkpoint, shards_dir=str(shards), tracking=False,
                          out_dir=tmp_path / "eval", baseline=erm, allow_other_shards=True)
    for scorer in ("maml", "erm", "erm_ft"):
        assert 0.5 < report[f"{scorer}_gauc"] < 1 and np.isfinite(report[f"{scorer}_auc"]), scorer
    assert report["erm_ft_auc"] != report["erm_auc"]  # fine-tuning changed the predictions
    choice = report["erm_ft_choice"]
    assert any(f"inner_lr {a:g}, embedding_inner_lr {b:g}" in choice for a, b in FINE_TUNE_LRS), choice
    # K from the grid, or beyond it where the grid was widened (the best lay at its edge)
    k = re.match(r"K=(\d+), ", choice)
    assert k and (int(k.group(1)) in STEPS or int(k.group(1)) > max(STEPS)) and "validation gauc" in choice, choice
    table = (tmp_path / "eval" / "eval_report.md").read_text()
    assert "| erm_ft |" in table and "erm_ft: the ERM baseline fine-tuned" in table
    assert "| model | GAUC | AUC | logloss |" in table  # GAUC leads
    # shards without a validation split: no fine-tuned baseline (its choice would need the test tasks);
    # scored on 16 of their tasks (gmeta evaluate --config's eval settings): what is checked is what it leaves out
    from gmeta.config import load_config

    few = load_config(DEBUG_CONFIG, ["eval.max_tasks=16"])
    with caplog.at_level("WARNING"):
        no_val = run_evaluate(debug_checkpoint, tracking=False, out_dir=tmp_path / "eval2", baseline=erm,
                              allow_other_shards=True, cfg_override=few)
    assert "erm_auc" in no_val and "erm_ft_auc" not in no_val
    assert "ERM fine-tuned per task is left out" in caplog.text
