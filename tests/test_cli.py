"""The command line around the work: which shards evaluate/predict read, thread counts,
quiet output by default (--verbose for the libraries' own), and how reports show metrics
that cannot be computed."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from gmeta import cli
from gmeta.config import load_config
from gmeta.evaluation.render import format_table, write_report
from gmeta.evaluation.report import build_report, flat_metrics
from gmeta.io.manifest import load_manifest
from gmeta.parallel import dist as gdist
from gmeta.scoring import Predictions
from tests.conftest import DEBUG_CONFIG


@pytest.fixture
def keep_threads():
    """configure_threads changes this process's torch threads: put them back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _config_file(tmp_path, shards_dir: str, **sections) -> str:
    """The debug config with data.shards_dir replaced, plus a quick evaluation."""
    data = yaml.safe_load(DEBUG_CONFIG.read_text())
    data["data"]["shards_dir"] = shards_dir
    data["eval"] = {"curve_steps": [0], "max_tasks": 24}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ------------------------------------------------------------------ 1. shards of the checkpoint


def test_evaluate_reads_the_checkpoints_shards_not_the_config_files(debug_checkpoint, debug_data, tmp_path,
                                                                     caplog, capsys, monkeypatch, keep_threads):
    caplog.set_level(logging.INFO, logger="gmeta")
    monkeypatch.setattr(gdist, "_threads_logged", None)  # an earlier test may have set 1 thread already
    config = _config_file(tmp_path, str(tmp_path / "no" / "such" / "shards"), train={"threads": 1})
    rc = cli.main(["evaluate", "--config", config, "--checkpoint", str(debug_checkpoint), "--no-tracking",
                   "--out", str(tmp_path / "eval")])
    assert rc == 0, caplog.text
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["tasks"] == min(24, load_manifest(debug_data["shards"])["splits"]["eval"]["tasks"])
    assert f"shards {debug_data['shards']} (the checkpoint's data.shards_dir" in caplog.text
    # evaluation settings still come from --config, and so does train.threads
    assert report["auc_vs_k"]["k"] == [0, 2]
    assert "threads: 1 per process (train.threads)" in caplog.text
    # the report table is printed once (stdout), not logged as well
    out = capsys.readouterr().out
    assert out.count("| model |") == 1 and "| model |" not in caplog.text


def test_explicit_shards_win_over_the_checkpoints(debug_checkpoint, debug_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gmeta")
    copy = tmp_path / "copy"
    shutil.copytree(debug_data["shards"], copy)
    config = _config_file(tmp_path, str(tmp_path / "no" / "such" / "shards"))
    rc = cli.main(["evaluate", "--config", config, "--checkpoint", str(debug_checkpoint), "--no-tracking",
                   "--out", str(tmp_path / "eval"), f"data.shards_dir={copy}"])
    assert rc == 0, caplog.text
    assert f"evaluate: shards {copy} (override data.shards_dir)" in caplog.text
    # an override naming missing shards is used too, and fails naming them
    missing = tmp_path / "missing"
    assert cli.main(["evaluate", "--checkpoint", str(debug_checkpoint), "--no-tracking",
                     "--out", str(tmp_path / "eval2"), f"data.shards_dir={missing}"]) == 2
    # --shards, for predict as well (predict: the checkpoint's own otherwise)
    caplog.clear()
    assert cli.main(["predict", "--checkpoint", str(debug_checkpoint), "--out", str(tmp_path / "p"),
                     "--shards", str(copy), "--max-tasks", "8"]) == 0
    assert f"predict: shards {copy} (--shards)" in caplog.text
    caplog.clear()
    assert cli.main(["predict", "--checkpoint", str(debug_checkpoint), "--out", str(tmp_path / "p2"),
                     "--max-tasks", "8"]) == 0
    assert f"predict: shards {debug_data['shards']} (the checkpoint's data.shards_dir" in caplog.text


# ------------------------------------------------------------------ 2. threads


@pytest.mark.parametrize("cores,local,requested,expected,why", [
    (2, "2", 0, 1, "2 cores / 2 local processes"),
    (2, None, 0, 2, "2 cores / 1 local process"),
    (16, "3", 0, 5, "16 cores / 3 local processes"),
    (2, "4", 0, 1, "2 cores / 4 local processes"),  # never 0
    (2, "2", 3, 3, "train.threads"),  # asked for: honoured even above cores / processes
])
def test_configure_threads(monkeypatch, caplog, keep_threads, cores, local, requested, expected, why):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(gdist, "_threads_logged", None)
    caplog.set_level(logging.INFO, logger="gmeta")
    assert gdist.configure_threads(requested) == expected
    assert torch.get_num_threads() == expected
    assert f"threads: {expected} per process ({why})" in caplog.text
    caplog.clear()
    gdist.configure_threads(requested)  # cold_start trains many times in one process: logged once
    assert "threads:" not in caplog.text


def test_usable_cores_falls_back_to_cpu_count(monkeypatch):
    def no_affinity(pid):
        raise AttributeError("sched_getaffinity")

    monkeypatch.setattr(os, "sched_getaffinity", no_affinity, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert gdist.usable_cores() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert gdist.threads_per_process(0) == (1, "6 cores / 4 local processes")


# ------------------------------------------------------------------ 3. quiet by default


def _train(debug_data, tmp_path, *extra: str, tracking: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GMETA_VERBOSE", "TORCH_CPP_LOG_LEVEL", "MLFLOW_LOGGING_LEVEL", "MLFLOW_TRACKING_URI")}
    tmp_path.mkdir(parents=True)
    track = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics_s=1"] if tracking \
        else ["tracking.enabled=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "gmeta.cli", *extra, "train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", "1",
         f"data.shards_dir={debug_data['shards']}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
         "train.eval_at_end=false", "train.threads=1", *track],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_training_is_quiet_by_default_and_verbose_on_request(debug_data, tmp_path):
    quiet = _train(debug_data, tmp_path / "quiet", tracking=True).stderr
    lines = quiet.splitlines()
    # torchrec's planner (table and warnings), fbgemm's loader/TBE lines, torchrec's
    # FutureWarning, torch's is_fx_tracing warning, MLflow's monitor lines and model-logging
    # warnings: none of them
    for marker in ("Planner Statistics", "torchrec", "fbgemm", "FutureWarning", "is_fx_tracing", "Warning",
                   "system_metrics_monitor", "CloudPickle"):
        assert marker not in quiet, (marker, quiet)
    assert "gmeta.training.run: model logged as" in quiet
    # gmeta's own lines stay: threads, start, one log step, stall, checkpoint
    assert "threads: 1 per process (train.threads)" in quiet
    assert "gmeta.training.run: training maml" in quiet and "gmeta.training.run: checkpoint:" in quiet
    assert len(lines) <= 12, quiet
    assert all(" gmeta." in line for line in lines), quiet

    verbose = _train(debug_data, tmp_path / "verbose", "--verbose").stderr
    assert "Planner Statistics" in verbose and "fbgemm_gpu" in verbose and "is_fx_tracing" in verbose
    assert "gmeta.training.run: training maml" in verbose
    assert len(verbose.splitlines()) > 50


def test_verbose_flag_before_or_after_the_subcommand(monkeypatch):
    p = cli._parser()
    assert p.parse_args(["--verbose", "train", "--config", "c.yaml"]).verbose
    assert p.parse_args(["evaluate", "--checkpoint", "x", "-v"]).verbose
    assert not p.parse_args(["predict", "--checkpoint", "x", "--out", "o"]).verbose
    # torchrun's workers learn it from the environment
    from gmeta.logs import VERBOSE_ENV, setup_logging, verbose_from_env

    monkeypatch.setenv(VERBOSE_ENV, "0")  # (setenv: both are restored after the test)
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "ERROR")
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # restored after the test
    assert not verbose_from_env()
    setup_logging(True)
    assert os.environ[VERBOSE_ENV] == "1" and verbose_from_env() and setup_logging() is True
    assert logging.getLogger("torchrec").getEffectiveLevel() <= logging.INFO
    setup_logging(False)
    assert logging.getLogger("torchrec").getEffectiveLevel() == logging.ERROR


# ------------------------------------------------------------------ 3. metrics that cannot be computed


def _predictions(tasks: list[tuple[int, list[int]]]) -> Predictions:
    """One task per (support rows, query labels); every scorer predicts the same noise."""
    rng = np.random.default_rng(0)
    pred = Predictions()
    for tid, (support, labels) in enumerate(tasks):
        n = len(labels)
        pred.labels.append(np.array(labels, dtype=np.float32))
        pred.task_ids.append(np.full(n, tid))
        pred.support_size.append(np.full(n, support))
        for name in ("k=0", "k=2", "oracle"):
            pred.add(name, rng.uniform(0.05, 0.95, n).astype(np.float32))
    return pred


def _cfg():
    cfg = load_config(DEBUG_CONFIG)
    cfg.eval.support_buckets = [8, 16]
    cfg.eval.curve_steps = [0, 2]
    return cfg


def test_report_shows_metrics_of_one_class_as_not_available(tmp_path):
    # the 16+ bucket holds negatives only: its AUC (and GAUC) cannot be computed
    pred = _predictions([(10, [1, 0, 1, 0, 0]), (12, [0, 1, 1, 0]), (20, [0, 0, 0]), (30, [0, 0, 0, 0])])
    report = build_report(pred, _cfg(), inner_steps=2)
    assert math.isnan(report["buckets"][1]["maml_auc"]) and math.isfinite(report["maml_auc"])
    table = format_table(report)
    assert "| 16+ | 2 | n/a (one class) | n/a (one class) | n/a (one class) |" in table, table
    assert "nan" not in table.lower().replace("n/a", "")
    files = write_report(report, tmp_path)

    def no_nan(token):
        raise AssertionError(f"bare {token} in eval_report.json")

    saved = json.loads((tmp_path / "eval_report.json").read_text(), parse_constant=no_nan)
    assert saved["buckets"][1]["maml_auc"] == "n/a (one class)"
    assert saved["buckets"][1]["maml_gauc"] == "n/a (no task with both classes)"
    assert saved["maml_auc"] == report["maml_auc"]
    assert "n/a (one class)" in (tmp_path / "eval_report.md").read_text()
    html = (tmp_path / "eval_report.html").read_text()
    assert "<td>n/a (one class)</td>" in html and "nan" not in html.replace("n/a", "")
    assert format_table(saved) == table  # a report read back from the JSON shows the same
    assert all(f.is_file() for f in files)
    assert isinstance(flat_metrics(report)["support_16_plus/maml_auc"], float)  # MLflow gets numbers


def test_report_shows_gauc_without_any_two_class_task_as_not_available(tmp_path):
    # both classes overall (AUC fine), but never within one task (no GAUC)
    pred = _predictions([(10, [1, 1, 1]), (12, [0, 0, 0]), (20, [1, 1]), (30, [0, 0, 0, 0])])
    report = build_report(pred, _cfg(), inner_steps=2)
    table = format_table(report)
    row = next(line for line in table.splitlines() if line.startswith("| maml |"))
    # GAUC is the first column, AUC the second
    assert row.split(" | ")[1] == "n/a (no task with both classes)" and "nan" not in row, row
    assert f"| maml | n/a (no task with both classes) | {report['maml_auc']:.4f} |" in table
    assert "| GAUC | n/a (no task with both classes) | n/a (no task with both classes) |" in table, table
