"""The id generator in `gmeta train`: base_fixed mode changes the generator alone (tables and
head bit-identical to the checkpoint it starts from), joint mode under 2 processes logs the
generator's terms to MLflow and evaluates with it, and checkpoints keep it."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import torch

from gmeta.checkpoint import load_unsharded
from tests.conftest import DEBUG_CONFIG
from tests.support.cli import run_gmeta
from tests.support.multiprocess import run_gmeta_ranks

NEW_ADS = ["features.sparse.ad_id.min_count=2", "features.sparse.ad_id.holdout_share=0.2"]
GENERATOR = ["generator.feature=ad_id", "generator.attributes=[advertiser_id]"]


def _train(debug_data, out: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess | None:
    argv = ["train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", str(nproc),
            f"data.shards_dir={debug_data['shards']}", f"train.output_dir={out}", *NEW_ADS, *args]
    if nproc > 1:  # the job's workers (what is checked is what they compute, not their launch)
        run_gmeta_ranks(argv, nproc, cwd=out.parent)
        return None
    proc = run_gmeta(argv, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def base_checkpoint(debug_data, tmp_path_factory) -> Path:
    """A MAML model without generator, new ads mapped to the default row."""
    out = tmp_path_factory.mktemp("generator_base") / "base"
    _train(debug_data, out, "train.max_steps=12", "train.eval_at_end=false", "tracking.enabled=false")
    return out / "checkpoint"


@pytest.fixture(scope="module")
def fixed_run(debug_data, base_checkpoint, tmp_path_factory) -> tuple[Path, str, subprocess.CompletedProcess]:
    """The generator trained alone (base_fixed) on ``base_checkpoint``: (output dir, MLflow URI, process)."""
    out = tmp_path_factory.mktemp("generator_fixed") / "fixed"
    uri = f"sqlite:///{out.parent / 'mlflow.db'}"
    proc = _train(debug_data, out, *GENERATOR, "generator.mode=base_fixed", f"train.init_from={base_checkpoint}",
                  "train.max_steps=8", "train.log_every=4", "train.eval_at_end=false", f"tracking.uri={uri}",
                  "tracking.log_model=false", "tracking.system_metrics_s=0")
    return out, uri, proc


def _metrics(uri: str, run_id: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    return [m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


def test_base_fixed_trains_the_generator_alone(base_checkpoint, fixed_run):
    import json

    out, uri, proc = fixed_run
    assert "generator_cold_loss" in proc.stderr and "generator_warm_loss" in proc.stderr
    base, _, _ = load_unsharded(base_checkpoint)
    trained, cfg, meta = load_unsharded(out / "checkpoint")
    assert cfg.generator.mode == "base_fixed" and trained.generator is not None
    mine = trained.state_dict()
    for name, value in base.state_dict().items():  # every table, the head, the new-id masks
        assert torch.equal(mine[name], value), name
    out_layer = trained.generator.mlp[-1]
    assert float(out_layer.weight.abs().sum()) > 0  # it started at zero: the generator learned
    cold = _metrics(uri, meta["mlflow_run_id"], "train/generator_cold_loss")
    warm = _metrics(uri, meta["mlflow_run_id"], "train/generator_warm_loss")
    assert len(cold) == 2 and len(warm) == 2 and all(v > 0 for v in cold + warm)
    share = _metrics(uri, meta["mlflow_run_id"], "train/generator_new_share")
    assert all(0 < v < 1 for v in share)
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["step"] == 8


def test_the_cold_start_benchmark_scores_new_ids_with_and_without_the_generator(debug_data, base_checkpoint,
                                                                                fixed_run):
    from benchmarks.generator_cold_start import score

    fixed = fixed_run[0] / "checkpoint"
    rows = score([str(base_checkpoint), str(fixed)], str(debug_data["shards"]), "eval", [0, 1], "ad_id", max_tasks=40)
    got = {(r["generator"], r["k"]): r for r in rows}
    assert set(got) == {("-", 0), ("-", 1), ("ad_id", 0), ("ad_id", 1)}
    for r in rows:
        assert 0 < r["new_rows"] < r["rows"] and 0 < r["new_auc"] < 1 and 0 < r["gauc"] < 1
    # one generated row per new ad, the same tables and head: the scores differ on new ads alone
    assert got[("-", 0)]["new_auc"] != got[("ad_id", 0)]["new_auc"]


def test_joint_training_under_two_processes_logs_and_evaluates_with_the_generator(debug_data, tmp_path):
    import json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _train(debug_data, tmp_path / "joint", *GENERATOR, "generator.cold_weight=0.5", "train.max_steps=6",
           "train.log_every=3", "eval.max_tasks=64", f"tracking.uri={uri}", "tracking.log_model=false",
           "tracking.system_metrics_s=0", nproc=2)
    ckpt = tmp_path / "joint" / "checkpoint"
    model, cfg, meta = load_unsharded(ckpt)
    assert meta["world_size"] == 2 and model.generator is not None
    assert float(model.generator.mlp[-1].weight.abs().sum()) > 0
    run = meta["mlflow_run_id"]
    assert len(_metrics(uri, run, "train/generator_cold_loss")) == 2
    assert not _metrics(uri, run, "train/generator_warm_loss")  # joint: the query loss is the warm-up term
    report = json.loads((tmp_path / "joint" / "eval" / "eval_report.json").read_text())
    assert report["new_ids"]["ad_id"]["occurrences"] > 0 and 0.0 < report["maml_auc"] < 1.0


def test_a_checkpoint_keeps_the_generator(debug_data, tmp_path):
    """Saved and loaded in one process: the generator's weights and the scores they give."""
    import torch.distributed as dist

    from gmeta import checkpoint
    from gmeta.config import load_config
    from gmeta.io.reader import TaskReader
    from gmeta.models.dlrm import build_model
    from gmeta.scoring import predict_query

    cfg = load_config(DEBUG_CONFIG, [*NEW_ADS, *GENERATOR, f"data.shards_dir={debug_data['shards']}"])
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.generator.parameters():
            p.normal_(0, 0.5)
    model.set_known_ids({"ad_id": torch.rand(2000) < 0.5})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        checkpoint.save(model, cfg, tmp_path / "ckpt", {"step": 0})
    finally:
        dist.destroy_process_group()
    loaded, loaded_cfg, _ = checkpoint.load_unsharded(tmp_path / "ckpt")
    assert loaded.generator is not None and loaded_cfg.generator.attributes == ["advertiser_id"]
    for (n, a), (m, b) in zip(model.generator.state_dict().items(), loaded.generator.state_dict().items()):
        assert n == m and torch.equal(a, b)
    batch = next(iter(TaskReader(debug_data["shards"], "eval", 8, shuffle=False)))
    model.eval()
    assert (predict_query(model, cfg, batch, 1) == predict_query(loaded, loaded_cfg, batch, 1)).all()


def test_init_from_a_checkpoint_without_the_default_row_names_the_difference(base_checkpoint):
    """The generator replaces the default row: its base must have one as this config does."""
    from gmeta.checkpoint import CheckpointError, load_init
    from gmeta.config import load_config
    from gmeta.models.dlrm import build_model

    cfg = load_config(DEBUG_CONFIG)  # ad_id without min_count: no default row
    want = r"train.init_from: .* \('ad_id', 2001, 'hash', ''\).* \('ad_id', 2000, 'hash', ''\).*default row"
    with pytest.raises(CheckpointError, match=want):
        load_init(base_checkpoint, build_model(cfg), cfg)


def test_serving_scores_new_ads_from_the_generated_row(debug_data, fixed_run):
    """Raw rows as the pyfunc model scores them (``score_rows``): campaigns with no support
    rows are scored zero-shot from the generated rows, as the plain forward scores them."""
    import numpy as np
    import pandas as pd

    from gmeta.inference.serving import assign_roles, featurise_rows, score_rows

    model, cfg, meta = load_unsharded(fixed_run[0] / "checkpoint")
    rows = pd.read_parquet(debug_data["raw"])
    rows = rows[rows["campaign_id"].isin(sorted(rows["campaign_id"].unique())[:30])]
    df = assign_roles(rows, cfg).reset_index(drop=True)
    cold = df["campaign_id"].isin(sorted(df["campaign_id"].unique())[:6])
    df.loc[cold, "role"] = "query"  # six new campaigns: no support rows
    kw = dict(column_types=meta.get("input_columns"), id_hash=meta["id_hash"])
    got = score_rows(model, cfg, df, 2, **kw)["score"].to_numpy()
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.generator.mlp[-1].weight.zero_()
        zeroed.generator.mlp[-1].bias.zero_()
    default = score_rows(zeroed, cfg, df, 2, **kw)["score"].to_numpy()
    q = (df["role"] == "query").to_numpy()
    assert np.isfinite(got[q]).all() and not np.allclose(got[q & cold.to_numpy()], default[q & cold.to_numpy()])
    batches = featurise_rows(df, cfg, **kw)
    zero_shot = [(b, pos) for b, pos in batches if b.num_support == 0]
    assert zero_shot
    for batch, positions in zero_shot:
        with torch.no_grad():
            want = torch.sigmoid(model(batch.sparse, batch.dense)).numpy()
        np.testing.assert_allclose(got[positions], want, rtol=1e-5, atol=1e-6)
