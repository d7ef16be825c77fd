"""Each model of ``model.arch`` end to end on the debug data, with the head of its config in
configs/ (ads_cvr_<arch>.yaml): train, evaluate, predict; the checkpoint reloaded scores the
same in evaluation, batch prediction and the pyfunc model (deepfm and wide_deep with the slow
tests)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gmeta.checkpoint import load_unsharded
from gmeta.config import load_config
from gmeta.evaluation.evaluate import run_evaluate
from gmeta.inference.predict import run_predict
from gmeta.scoring import collect
from tests.support.cli import run_gmeta

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "ads_cvr_debug.yaml"


def _head_overrides(arch: str) -> list[str]:
    """The head of configs/ads_cvr_<arch>.yaml (its arch keys), over the debug config's sizes."""
    m = load_config(ROOT / "configs" / f"ads_cvr_{arch}.yaml").model
    assert m.arch == arch
    return [f"model.arch={m.arch}", f"model.cross_layers={m.cross_layers}", f"model.cross_rank={m.cross_rank}",
            f"model.cross_structure={m.cross_structure}", f"model.attention_arch={m.attention_arch}"]


def _din_overrides() -> list[str]:
    """configs/ads_cvr_din.yaml's history (synth) and its sequence feature, over the debug
    config's features."""
    from tests.support.sequences import seq_overrides

    c = load_config(ROOT / "configs" / "ads_cvr_din.yaml")
    seq = c.features.sparse[-1]
    assert seq.max_length and seq.table == "ad_id" and c.synth.history == seq.name
    return [*seq_overrides(DEBUG, f"{{name: {seq.name}, num_embeddings: 2000, multi_hot: true, "
                                  f"max_length: {seq.max_length}, table: ad_id}}"),
            f"synth.history={c.synth.history}", f"synth.history_length={c.synth.history_length}"]


@pytest.fixture(scope="module")
def din_data(tmp_path_factory) -> dict[str, Path]:
    """The debug data with configs/ads_cvr_din.yaml's behaviour histories, synthesised and
    prepared."""
    from gmeta.io.prepare import prepare
    from gmeta.io.synth import generate

    base = tmp_path_factory.mktemp("ads_cvr_debug_din")
    cfg = load_config(DEBUG, _din_overrides())
    generate(cfg, base / "raw")
    prepare(cfg, base / "raw", base / "shards")
    return {"raw": base / "raw", "shards": base / "shards"}


# deepfm and wide_deep take dcn_v2's path through training, evaluation, prediction and
# serving with another head, which tests/meta/test_archs.py checks against the per-task
# reference: they run with the slow tests
@pytest.mark.parametrize("arch", ["dcn_v2", pytest.param("deepfm", marks=pytest.mark.slow),
                                  pytest.param("wide_deep", marks=pytest.mark.slow), "din"])
def test_each_model_trains_evaluates_predicts_and_serves_the_same_scores(request, tmp_path, arch):
    from gmeta.inference.pyfunc import log_model
    from gmeta.inference.serving import assign_roles

    debug_data = request.getfixturevalue("din_data" if arch == "din" else "debug_data")
    data = _din_overrides() if arch == "din" else []
    out = tmp_path / "run"
    # a few steps (as tests/support/heads.py): what is checked is that the same weights score alike everywhere
    p = run_gmeta(["train", "--config", DEBUG, "--nproc-per-node", "1", f"data.shards_dir={debug_data['shards']}",
                   f"train.output_dir={out}", "train.max_steps=6", "train.eval_at_end=false",
                   "tracking.enabled=false", *data, *_head_overrides(arch)])
    assert p.returncode == 0, p.stderr[-4000:]
    ckpt = out / "checkpoint"
    model, cfg, _ = load_unsharded(ckpt)
    assert cfg.model.arch == arch and type(model.head).arch == arch

    report = run_evaluate(ckpt, shards_dir=str(debug_data["shards"]), tracking=False, out_dir=tmp_path / "eval")
    assert report is not None and 0.0 < report["maml_auc"] < 1.0 and np.isfinite(report["maml_logloss"])

    run_predict(ckpt, tmp_path / "p", shards_dir=str(debug_data["shards"]), inner_steps=2, progress=False)
    pred = pq.read_table(tmp_path / "p").to_pandas().sort_values(["task_id", "row"]).reset_index(drop=True)
    scored = collect(model, cfg, debug_data["shards"], inner_steps=2)  # evaluation's adapted scores
    ev = pd.DataFrame({"task_id": np.concatenate(scored.task_ids), "score": np.concatenate(scored.scores["k=2"])})
    ev["row"] = ev.groupby("task_id").cumcount()
    merged = pred.merge(ev, on=["task_id", "row"], suffixes=("", "_eval"))
    assert len(merged) == len(pred) > 0
    np.testing.assert_allclose(merged["score"], merged["score_eval"], atol=1e-6)

    keys = list(pred["task_key"].unique()[:4])
    raw = pd.read_parquet(debug_data["raw"])
    rows = assign_roles(raw[raw["campaign_id"].isin(keys)].reset_index(drop=True), cfg)
    rows.loc[rows["role"] == "query", "label"] = np.nan
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("pyfunc", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp):
        uri = log_model(ckpt, cfg, model)
    served = mlflow.pyfunc.load_model(uri).predict(rows, params={"inner_steps": 2})
    q = rows.assign(score=served["score"])[rows["role"] == "query"].sort_values(["campaign_id", "ts"])
    q["row"] = q.groupby("campaign_id").cumcount()
    both = q.merge(pred, left_on=["campaign_id", "row"], right_on=["task_key", "row"], suffixes=("", "_predict"))
    assert len(both) == len(q) == int(pred["task_key"].isin(keys).sum()) > 0
    np.testing.assert_allclose(both["score"], both["score_predict"], atol=1e-5)
