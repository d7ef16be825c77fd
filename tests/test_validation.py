"""Training driven by validation: periodic scoring of a fixed validation subset, the best
weights kept, early stopping; the learning-rate schedule and gradient clipping."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from gmeta.config import ConfigError, OptimConfig, load_config
from gmeta.training.run import lr_factor
from tests.conftest import DEBUG_CONFIG
from tests.support.cli import run_gmeta
from tests.support.multiprocess import run_gmeta_ranks


@pytest.fixture(scope="module")
def val_shards(debug_val_shards) -> Path:
    """The debug data prepared with validation tasks."""
    return debug_val_shards


def _train(out: Path, shards: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess | None:
    args = ["train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", str(nproc), f"data.shards_dir={shards}",
            f"train.output_dir={out}", "train.eval_at_end=false", "tracking.enabled=false",
            "data.split.val_fraction=0.15", *extra]
    if nproc > 1:  # the job's workers (what is checked is what they compute, not their launch)
        run_gmeta_ranks(args, nproc, cwd=out.parent)
        return None
    proc = run_gmeta(args, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _val_score(ckpt: Path, shards: Path, max_tasks: int) -> float:
    from gmeta.checkpoint import load_unsharded
    from gmeta.evaluation.evaluate import evaluate

    model, cfg, _ = load_unsharded(ckpt)
    cfg.eval.split, cfg.eval.max_tasks, cfg.eval.curve_steps = "val", max_tasks, [0]
    report = evaluate(model, cfg, shards)
    assert report is not None
    return float(report["maml_gauc"])


def test_lr_schedule_warms_up_then_decays():
    o = OptimConfig(warmup_steps=4, lr_decay="linear", min_lr_factor=0.1)
    assert [lr_factor(s, 14, o) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 14, o) == 1.0 and lr_factor(13, 14, o) == pytest.approx(0.1)
    assert lr_factor(9, 14, o) == pytest.approx(1 - 0.9 * 5 / 9)
    c = OptimConfig(lr_decay="cosine")
    assert lr_factor(0, 11, c) == 1.0 and lr_factor(5, 11, c) == pytest.approx(0.5) and lr_factor(10, 11, c) == 0.0
    assert lr_factor(7, 11, OptimConfig()) == 1.0
    assert lr_factor(3, 11, c) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_early_stopping_keeps_the_best_weights(val_shards, tmp_path):
    # a high learning rate: validation GAUC stops improving within a few validations
    proc = _train(tmp_path / "run", val_shards, "train.val_every_steps=4", "train.val_max_tasks=64",
                  "train.early_stopping_patience=2", "optim.dense_lr=0.05", "optim.embedding_lr=0.5",
                  "train.epochs=3")
    meta = json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())
    val = meta["validation"]
    assert val["metric"] == "gauc" and val["stopped_early"] and val["since_best"] == 2
    assert meta["step"] == val["best_step"] + 2 * 4 < 3 * 40  # stopped before the 3 epochs' 120 steps
    best = json.loads((tmp_path / "run" / "best" / "meta.json").read_text())
    assert best["step"] == val["best_step"] and not best["training_state"]
    # the kept weights score what was logged as the best; the last weights score worse
    assert _val_score(tmp_path / "run" / "best", val_shards, 64) == pytest.approx(val["best"], abs=1e-9)
    assert _val_score(tmp_path / "run" / "checkpoint", val_shards, 64) < val["best"]
    assert "early stop at step" in proc.stderr


def test_validation_on_two_ranks_scores_the_same_subset(val_shards, tmp_path):
    """Validation is collective (each rank scores a share): its figure is the one a single
    process gets from the kept weights."""
    _train(tmp_path / "run", val_shards, "train.val_every_steps=5", "train.val_max_tasks=48", "train.max_steps=10",
           "optim.warmup_steps=3", "optim.lr_decay=cosine", "optim.grad_clip_norm=1.0", nproc=2)
    val = json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())["validation"]
    assert val["best_step"] in (5, 10)
    assert _val_score(tmp_path / "run" / "best", val_shards, 48) == pytest.approx(val["best"], abs=1e-9)


def test_grad_clipping_bounds_the_dense_update(debug_data):
    """One SGD step with clipping moves the dense weights by at most lr x the clip norm."""
    import torch.distributed as dist

    from gmeta.io.reader import TaskReader
    from gmeta.models.dlrm import build_model
    from gmeta.parallel.dist import DenseGradSync, init_distributed
    from gmeta.parallel.sharding import shard_model
    from gmeta.training.step import train_step

    cfg = load_config(DEBUG_CONFIG, ["optim.grad_clip_norm=0.01"])
    env = init_distributed()
    try:
        torch.manual_seed(0)
        model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, env.device)
        params = model.module.dense_parameters()
        opt = torch.optim.SGD(params, lr=1.0)
        before = torch.cat([p.detach().reshape(-1).clone() for p in params])
        batch = next(iter(TaskReader(debug_data["shards"], "train", 16, seed=0)))
        train_step(model, batch, cfg, DenseGradSync(params), opt)
        moved = torch.cat([p.detach().reshape(-1) for p in params]) - before
        assert 0 < moved.norm() <= 0.01 + 1e-6
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("overrides, message", [
    (["train.early_stopping_patience=2"], "train.early_stopping_patience: needs train.val_every_steps > 0"),
    (["train.val_metric=rmse"], "train.val_metric: 'rmse' is not a metric of model.objective binary"),
    (["optim.min_lr_factor=2"], r"optim.min_lr_factor: must be in \[0, 1\]"),
])
def test_validation_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEBUG_CONFIG, overrides)


def test_validation_without_validation_tasks_is_an_error(debug_data, tmp_path):
    proc = run_gmeta(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1",
                      f"data.shards_dir={debug_data['shards']}", f"train.output_dir={tmp_path / 'run'}",
                      "tracking.enabled=false", "train.val_every_steps=5"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.val_every_steps:" in proc.stderr and "data.split.val_fraction > 0" in proc.stderr
    assert "Traceback" not in proc.stderr  # an error of the config, told in one line


def test_resumed_run_keeps_its_validation_history_and_best(val_shards, tmp_path):
    common = ["train.val_every_steps=4", "train.val_max_tasks=32", "train.checkpoint_every_steps=4"]
    _train(tmp_path / "run", val_shards, *common, "train.max_steps=8")
    first = json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())["validation"]
    _train(tmp_path / "run", val_shards, *common, "train.max_steps=16", "train.resume=auto")
    val = json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())["validation"]
    history = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [4, 8, 12, 16]
    assert val["best"] == max(h["gauc"] for h in history) >= first["best"]
    assert val["best_step"] == max(history, key=lambda h: h["gauc"])["step"]
    best_meta = json.loads((tmp_path / "run" / "best" / "meta.json").read_text())
    assert best_meta["step"] == val["best_step"]


def test_weights_from_another_run_are_validated_before_the_first_step(val_shards, tmp_path):
    """train.init_from: the starting weights are scored at step 0 and compete for best/ (a
    run that never beats them keeps them); a run from scratch starts at its first
    validation step (test above: steps 4, 8, ...)."""
    common = ["train.val_every_steps=4", "train.val_max_tasks=32"]
    _train(tmp_path / "base", val_shards, *common, "train.max_steps=8")
    # rates too small to move a float32 weight: every validation scores the start, and a tie
    # keeps the earlier weights, here the start's
    _train(tmp_path / "run", val_shards, *common, "train.max_steps=8", "optim.dense_lr=1e-30",
           "optim.embedding_lr=1e-30", f"train.init_from={tmp_path / 'base' / 'checkpoint'}")
    history = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 4, 8]
    assert history[0]["gauc"] == pytest.approx(_val_score(tmp_path / "base" / "checkpoint", val_shards, 32), abs=1e-9)
    val = json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())["validation"]
    assert [h["gauc"] for h in history] == [history[0]["gauc"]] * 3 and val["best"] == history[0]["gauc"]
    assert val["best_step"] == 0
    assert json.loads((tmp_path / "run" / "best" / "meta.json").read_text())["step"] == 0
    assert _val_score(tmp_path / "run" / "best", val_shards, 32) == pytest.approx(history[0]["gauc"], abs=1e-9)


def _one_step_moves(debug_data, schedule: bool) -> tuple[float, float]:
    """(table change, dense change) of one step, with or without a 1000-step warm-up."""
    import torch.distributed as dist

    from gmeta.io.reader import TaskReader
    from gmeta.models.dlrm import build_model
    from gmeta.parallel.dist import DenseGradSync, init_distributed
    from gmeta.parallel.sharding import shard_model
    from gmeta.training.run import LrSchedule
    from gmeta.training.step import train_step

    cfg = load_config(DEBUG_CONFIG, ["optim.warmup_steps=1000"] if schedule else [])
    env = init_distributed()
    try:
        torch.manual_seed(0)
        model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, env.device)
        params = model.module.dense_parameters()
        opt = torch.optim.Adam(params, lr=cfg.optim.dense_lr)
        if schedule:
            LrSchedule(opt, model.fused_optimizer, cfg, 2000).apply(0)  # factor 1/1000
        key = "sparse_arch.ec.embeddings.t_user_id.weight"
        table0 = model.state_dict()[key].local_shards()[0].tensor.clone()
        dense0 = torch.cat([p.detach().reshape(-1).clone() for p in params])
        batch = next(iter(TaskReader(debug_data["shards"], "train", 16, seed=0)))
        train_step(model, batch, cfg, DenseGradSync(params), opt)
        table = model.state_dict()[key].local_shards()[0].tensor
        dense = torch.cat([p.detach().reshape(-1) for p in params])
        return float((table - table0).abs().max()), float((dense - dense0).abs().max())
    finally:
        dist.destroy_process_group()


def test_warm_up_scales_both_optimizers_steps(debug_data):
    # Adam's and row-wise Adagrad's first steps are about lr x sign(gradient): 1/1000 of the rate, 1/1000 the step
    t1, d1 = _one_step_moves(debug_data, False)
    t2, d2 = _one_step_moves(debug_data, True)
    assert t2 == pytest.approx(t1 / 1000, rel=0.05) and d2 == pytest.approx(d1 / 1000, rel=0.05)
