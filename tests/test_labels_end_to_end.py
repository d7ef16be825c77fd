"""Click and conversion end to end: gmeta synth's conversion column, prepared with both
labels, each multi-task head of configs/ads_cvr_{esmm,mmoe}.yaml trained over the debug
config's sizes, evaluated per label (logged to MLflow) and predicted with a score per label,
the same scores in evaluation and batch prediction."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gmeta import metrics
from gmeta.checkpoint import load_unsharded
from gmeta.config import load_config
from gmeta.evaluation.evaluate import run_evaluate
from gmeta.evaluation.render import format_table
from gmeta.inference.predict import run_predict
from gmeta.scoring import collect
from tests.support.cli import run_gmeta

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "ads_cvr_debug.yaml"


def _funnel_overrides(arch: str) -> list[str]:
    """The labels and head of configs/ads_cvr_<arch>.yaml, over the debug config's sizes."""
    cfg = load_config(ROOT / "configs" / f"ads_cvr_{arch}.yaml")
    assert cfg.model.arch == arch and cfg.synth.conversion == "conversion"
    return [f"synth.conversion={cfg.synth.conversion}", f"features.labels=[{', '.join(cfg.features.labels)}]",
            f"features.label_weights=[{', '.join(map(str, cfg.features.label_weights))}]",
            f"model.arch={arch}", f"model.experts={cfg.model.experts}", "model.expert_arch=[16]"]


@pytest.fixture(scope="module")
def funnel(tmp_path_factory) -> dict[str, Path]:
    """The debug data with gmeta synth's conversion column, prepared with both labels."""
    base = tmp_path_factory.mktemp("funnel")
    for cmd, arg in (("synth", "raw"), ("prepare", "shards")):
        extra = ["--input", str(base / "raw")] if cmd == "prepare" else []
        p = run_gmeta([cmd, "--config", str(DEBUG), *extra, "--out", str(base / arg), *_funnel_overrides("esmm")])
        assert p.returncode == 0, p.stderr[-3000:]
    return {"raw": base / "raw", "shards": base / "shards"}


def test_synth_writes_conversions_only_after_clicks(funnel):
    raw = pd.read_parquet(funnel["raw"])
    assert set(raw["conversion"].unique()) == {0, 1}
    assert not ((raw["conversion"] == 1) & (raw["label"] == 0)).any()
    clicked = raw[raw["label"] == 1]
    assert 0.05 < clicked["conversion"].mean() < 0.95
    # the per-campaign hidden terms: conversion rates given a click differ between campaigns
    # more than binomial noise alone would spread them
    by = clicked.groupby("campaign_id")["conversion"].agg(["mean", "size"])
    by = by[by["size"] >= 15]
    p = clicked["conversion"].mean()
    assert by["mean"].var() > 2 * (p * (1 - p) / by["size"]).mean()
    # the other columns are those written without it
    plain = funnel["raw"].parent / "plain"
    assert run_gmeta(["synth", "--config", str(DEBUG), "--out", str(plain)]).returncode == 0
    assert pd.read_parquet(plain).equals(raw.drop(columns="conversion"))


@pytest.mark.parametrize("arch", ["esmm", "mmoe"])
def test_multitask_model_trains_evaluates_per_label_and_predicts_a_score_per_label(funnel, tmp_path, arch):
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a few steps: what is checked is each label's evaluation, logging and prediction of the same weights
    p = run_gmeta(["train", "--config", str(DEBUG), "--nproc-per-node", "1", f"data.shards_dir={funnel['shards']}",
                   f"train.output_dir={out}", "train.max_steps=6", "train.eval_at_end=true", "tracking.enabled=true",
                   f"tracking.uri={uri}",
                   *_funnel_overrides(arch)])
    assert p.returncode == 0, p.stderr[-4000:]
    ckpt = out / "checkpoint"
    model, cfg, _ = load_unsharded(ckpt)
    assert type(model.head).arch == arch and cfg.features.label_names() == ["label", "conversion"]

    report = run_evaluate(ckpt, shards_dir=str(funnel["shards"]), tracking=False, out_dir=tmp_path / "eval")
    assert report is not None and report["labels"] == ["label", "conversion"]
    scored = collect(model, cfg, funnel["shards"])
    y = np.concatenate(scored.labels)
    s = np.concatenate(scored.scores[f"k={cfg.meta.inner_steps}"])
    g = np.concatenate(scored.task_ids)
    assert y.shape == s.shape == (len(g), 2)
    for i, label in enumerate(["label", "conversion"]):
        assert report[f"maml_auc_{label}"] == pytest.approx(metrics.auc(y[:, i], s[:, i]), abs=1e-9)
        assert report[f"maml_gauc_{label}"] == pytest.approx(metrics.gauc(y[:, i], s[:, i], g), abs=1e-9)
        assert report[f"maml_logloss_{label}"] == pytest.approx(metrics.logloss(y[:, i], s[:, i]), abs=1e-6)
        assert 0.0 < report[f"no_adapt_auc_{label}"] < 1.0
    # the unsuffixed names keep meaning the first label's
    assert report["maml_auc"] == report["maml_auc_label"] and report["maml_gauc"] == report["maml_gauc_label"]
    if arch == "esmm":  # pCTCVR over every row, pCVR = pCTCVR / pCTR over the clicked rows
        assert bool((s[:, 1] <= s[:, 0] + 1e-6).all())  # pCTCVR = pCTR x pCVR <= pCTR
        assert report["maml_ctcvr_auc"] == report["maml_auc_conversion"]
        clicked = y[:, 0] == 1
        assert report["maml_cvr_auc"] == pytest.approx(metrics.auc(y[clicked, 1], s[clicked, 1] / s[clicked, 0]))
        assert "pCTCVR AUC" in format_table(report)
    else:
        assert "maml_ctcvr_auc" not in report
    assert "| maml | conversion |" in format_table(report)

    # MLflow: training's evaluation at the end logged every label's metrics
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    logged = {k for r in runs for k in r.data.metrics}
    assert any(k.endswith("maml_auc_conversion") for k in logged), sorted(logged)[:40]

    run_predict(ckpt, tmp_path / "p", shards_dir=str(funnel["shards"]), progress=False)
    pred = pq.read_table(tmp_path / "p").to_pandas().sort_values(["task_id", "row"]).reset_index(drop=True)
    assert {"score_label", "score_conversion", "label_label", "label_conversion"} <= set(pred.columns)
    assert "score" not in pred.columns
    if arch == "esmm":  # pCVR = pCTCVR / pCTR, as raw-row scoring and the pyfunc model give it
        np.testing.assert_allclose(pred["score_pcvr"], pred["score_conversion"] / pred["score_label"], rtol=1e-5)
    else:
        assert "score_pcvr" not in pred.columns
    ev = pd.DataFrame({"task_id": g, "score_label": s[:, 0], "score_conversion": s[:, 1], "y": y[:, 1]})
    ev["row"] = ev.groupby("task_id").cumcount()
    merged = pred.merge(ev, on=["task_id", "row"], suffixes=("", "_eval"))
    assert len(merged) == len(pred) == len(ev) > 0
    for col in ("score_label", "score_conversion"):
        np.testing.assert_allclose(merged[col], merged[col + "_eval"], atol=1e-6)
    np.testing.assert_array_equal(merged["label_conversion"], merged["y"])
