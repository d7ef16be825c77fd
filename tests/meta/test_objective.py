"""model.objective: the head's loss and predictions, the per-task losses of the inner and
outer loop, and a regression run end to end (prepare, MAML training, evaluation report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from gmeta import metrics
from gmeta.checkpoint import load_unsharded
from gmeta.config import Config, config_from_dict, load_config, to_dict
from gmeta.evaluation.render import log_report
from gmeta.evaluation.report import build_report
from gmeta.io.prepare import prepare
from gmeta.io.reader import TaskReader
from gmeta.meta.base import task_losses
from gmeta.meta.erm import erm_loss
from gmeta.models.dlrm import DLRMHead, build_model
from gmeta.parallel.dist import free_port
from gmeta.scoring import collect
from gmeta.tracking import NullTracker
from gmeta.training.run import main as train_main


def _head(objective: str) -> DLRMHead:
    torch.manual_seed(0)
    return DLRMHead(num_dense=2, num_sparse=1, embedding_dim=3, dense_sizes=[4], over_sizes=[4], objective=objective)


def test_regression_head_loss_is_squared_error_and_predicts_outputs():
    head = _head("regression")
    out, y = torch.tensor([[0.5, 3.0, -1.0]]), torch.tensor([[1.0, 4.5, -1.0]])
    torch.testing.assert_close(head.pointwise_loss(out, y), torch.tensor([[0.25, 2.25, 0.0]]))
    assert head.predict(out) is out


def test_binary_head_loss_is_bce_on_logits_and_predicts_probabilities():
    head = _head("binary")
    out, y = torch.tensor([[0.5, 3.0, -1.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    expected = -(y * torch.log(torch.sigmoid(out)) + (1 - y) * torch.log(1 - torch.sigmoid(out)))
    torch.testing.assert_close(head.pointwise_loss(out, y), expected)
    torch.testing.assert_close(head.predict(out), torch.sigmoid(out))
    assert DLRMHead(2, 1, 3, [4], [4]).objective == "binary"


@pytest.mark.parametrize("objective", ["binary", "regression"])
def test_task_losses_are_masked_means_per_task(objective):
    head = _head(objective)
    out = torch.tensor([[0.2, -1.0, 7.0], [1.5, 9.0, 9.0]])
    y = torch.tensor([[1.0, 0.0, 5.0], [0.0, 3.0, 3.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])  # padding holds junk
    count = torch.tensor([2.0, 1.0])
    if objective == "binary":
        def loss(o, t):
            return float(F.binary_cross_entropy_with_logits(torch.tensor(o), torch.tensor(t)))
    else:
        def loss(o, t):
            return (o - t) ** 2
    expected = torch.tensor([(loss(0.2, 1.0) + loss(-1.0, 0.0)) / 2, loss(1.5, 0.0)])
    torch.testing.assert_close(task_losses(head, out, y, mask, count), expected)


@pytest.mark.parametrize("objective", ["binary", "regression"])
def test_erm_loss_is_the_mean_loss_of_the_objective(debug_config_path, debug_data, objective):
    model = build_model(load_config(debug_config_path, [f"model.objective={objective}"]))
    batch = next(iter(TaskReader(debug_data["shards"], "train", 4, shuffle=False)))
    out = erm_loss(model.head, model.lookup(batch.layout), batch, batch.layout)
    logits = model(batch.sparse, batch.dense)
    loss = F.binary_cross_entropy_with_logits if objective == "binary" else F.mse_loss
    torch.testing.assert_close(out.loss, loss(logits, batch.labels))


def test_model_objective_comes_from_the_config_and_defaults_to_binary(debug_config_path):
    cfg = load_config(debug_config_path, ["model.objective=regression"])
    assert build_model(cfg).head.objective == "regression"
    old = to_dict(cfg)
    del old["model"]["objective"]  # a checkpoint's config from before the key existed
    assert build_model(config_from_dict(old)).head.objective == "binary"


# ------------------------------------------------------------------------------------------
# regression end to end
# ------------------------------------------------------------------------------------------


def _ratings(path: Path, num_tasks: int = 160, seed: int = 0) -> None:
    """Row-level data where each task has its own level: label = task offset + 0.3 x + noise.
    Without its support rows a held-out task's offset is unknown (one level fits all)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(12, 40, num_tasks)
    offset = rng.normal(3.0, 1.0, num_tasks)
    task = np.repeat(np.arange(num_tasks), sizes)
    x = rng.normal(size=len(task))
    pd.DataFrame({"task": task, "ts": np.arange(len(task)), "item": rng.integers(0, 40, len(task)), "x": x,
                  "label": offset[task] + 0.3 * x + 0.1 * rng.normal(size=len(task))}).to_parquet(path)


def _config(base: Path, *overrides: str) -> Config:
    return load_config(None, [
        "features.task_key=task", "features.timestamp=ts", "features.true_prob=",
        "features.sparse=[{name: item, num_embeddings: 40}]", "features.dense=[x]",
        "data.split.min_support=4", "data.split.max_support=32", "data.split.min_query=4",
        "data.split.max_query=32", "data.split.eval_fraction=0.25", "data.split.val_fraction=0.2",
        "data.tasks_per_shard=100", "data.tasks_per_row_group=32", "data.num_workers=0",
        "model.objective=regression", "model.embedding_dim=4", "model.dense_arch=[8]", "model.over_arch=[8]",
        "meta.tasks_per_batch=8", "meta.inner_steps=1", "meta.first_order=true", "optim.dense_lr=0.02",
        "train.epochs=5", "train.max_steps=30", "train.log_every=10", "tracking.enabled=false",
        "eval.curve_steps=[0, 1, 2]", "eval.support_buckets=[4, 16]", "eval.tasks_per_batch=32",
        f"data.shards_dir={base / 'shards'}", f"train.output_dir={base / 'run'}", *overrides])


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory):
    """Regression shards prepared from row-level Parquet, a short MAML training in this
    process, evaluated at its end: (config, manifest, training result)."""
    base = tmp_path_factory.mktemp("regression")
    _ratings(base / "raw.parquet")
    cfg = _config(base)
    manifest = prepare(cfg, base / "raw.parquet", cfg.data.shards_dir)
    with pytest.MonkeyPatch.context() as mp:  # a one-process group, undone afterwards
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}
        for k, v in env.items():
            mp.setenv(k, v)
        result = train_main(cfg)
    return cfg, manifest, result


class _Recorder(NullTracker):
    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, dict]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, metrics))


def test_regression_report_after_training(regression_run):
    cfg, manifest, result = regression_run
    out = Path(cfg.train.output_dir) / "eval"
    report = json.loads((out / "eval_report.json").read_text())
    assert report["objective"] == "regression" and report["split"] == "eval"
    assert report["tasks"] == manifest["splits"]["eval"]["tasks"]
    # the support rows reveal a held-out task's level: adaptation cuts the error
    assert report["maml_rmse"] < 0.5 * report["no_adapt_rmse"]
    assert report["maml_mae"] < report["no_adapt_mae"]
    assert report["maml_obs_mean"] == report["no_adapt_obs_mean"] > 2
    assert abs(report["maml_pred_mean"] - report["maml_obs_mean"]) < 0.3
    curve = report["rmse_vs_k"]
    assert curve["k"] == [0, 1, 2]
    assert curve["rmse"][0] == report["no_adapt_rmse"] and curve["rmse"][1] == report["maml_rmse"]
    assert max(curve["rmse"][1:]) < curve["rmse"][0] and max(curve["mae"][1:]) < curve["mae"][0]
    assert all(b["maml_rmse"] < b["no_adapt_rmse"] for b in report["buckets"])
    assert sum(b["tasks"] for b in report["buckets"]) == report["tasks"]
    assert "reliability" not in report and not [k for k in report if "auc" in k or "logloss" in k]
    assert result["eval/maml_rmse"] == pytest.approx(report["maml_rmse"])
    assert result["eval/support_16_plus/maml_rmse"] == report["buckets"][-1]["maml_rmse"]

    assert {p.name for p in out.iterdir()} == {"eval_report.json", "eval_report.md", "eval_report.html",
                                                 "rmse_vs_k.png", "rmse_by_support_size.png"}
    md = (out / "eval_report.md").read_text()
    assert "| model | RMSE | MAE | mean pred. | mean obs. |" in md
    assert f"| maml | {report['maml_rmse']:.4f} | {report['maml_mae']:.4f} |" in md
    assert "RMSE by support-set size" in md and "| 4-15 |" in md and "| MAE | " in md
    assert 'src="rmse_vs_k.png"' in (out / "eval_report.html").read_text()

    rec = _Recorder()
    log_report(rec, report, [], step=30)
    assert rec.metrics[0][0] == 30 and rec.metrics[0][1]["eval/maml_rmse"] == report["maml_rmse"]
    assert [s for s, _ in rec.metrics[1:]] == curve["k"]
    assert [m["eval/rmse_vs_k"] for _, m in rec.metrics[1:]] == curve["rmse"]
    assert [m["eval/mae_vs_k"] for _, m in rec.metrics[1:]] == curve["mae"]


def test_regression_checkpoint_predicts_values_not_probabilities(regression_run):
    cfg, _, _ = regression_run
    model, ecfg, _ = load_unsharded(Path(cfg.train.output_dir) / "checkpoint")
    assert model.head.objective == "regression"
    pred = collect(model, ecfg, cfg.data.shards_dir)
    y, p = np.concatenate(pred.labels), np.concatenate(pred.scores["k=1"])
    assert (p > 1).mean() > 0.9 and p.max() > y.mean()
    assert metrics.rmse(y, p) < 0.5 * metrics.rmse(y, np.concatenate(pred.scores["k=0"]))


def test_eval_split_chooses_the_held_out_tasks(regression_run, tmp_path):
    cfg, manifest, _ = regression_run
    model, ecfg, _ = load_unsharded(Path(cfg.train.output_dir) / "checkpoint")
    ecfg.eval.split = "val"
    val = collect(model, ecfg, cfg.data.shards_dir)
    ecfg.eval.split = "eval"
    test = collect(model, ecfg, cfg.data.shards_dir)
    val_tasks, test_tasks = set(np.concatenate(val.task_ids)), set(np.concatenate(test.task_ids))
    assert len(val_tasks) == manifest["splits"]["val"]["tasks"] > 0
    assert len(test_tasks) == manifest["splits"]["eval"]["tasks"] and not val_tasks & test_tasks
    ecfg.eval.split = "val"
    report = build_report(val, ecfg)
    assert report["split"] == "val" and report["query_rows"] == manifest["splits"]["val"]["query_rows"]

    no_val = _config(tmp_path, "data.split.val_fraction=0")
    _ratings(tmp_path / "raw.parquet")
    prepare(no_val, tmp_path / "raw.parquet", no_val.data.shards_dir)
    with pytest.raises(ValueError, match="split 'val' \\(eval.split\\) has no tasks"):
        collect(model, ecfg, no_val.data.shards_dir)
