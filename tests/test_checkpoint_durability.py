"""Checkpoints against machine crashes and damaged files: fsync before publishing, resume
passing over a damaged newest checkpoint, and the swap of checkpoint/ and best/ with a
copy loadable at every moment."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from gmeta import checkpoint
from gmeta.checkpoint import CheckpointError, load_unsharded, read_meta
from gmeta.config import load_config
from gmeta.training.run import _resume_path
from tests.conftest import DEBUG_CONFIG

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_process(tmp_path):
    """A process group of one (gloo): checkpoint.save is collective."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def model_cfg(debug_checkpoint):
    model, cfg, _ = load_unsharded(debug_checkpoint)
    return model, cfg


def _with_step(src: Path, dst: Path, step: int) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["step"] = step
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


# ------------------------------------------------------------------ fsync

def test_files_and_directories_reach_the_disk_before_meta_json_and_before_the_rename(
        one_process, model_cfg, tmp_path, monkeypatch):
    model, cfg = model_cfg
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_open = os.fsync, Path.rename, os.open

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(self, target):
        events.append(("rename", str(target)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(os, "open", real_open)
    path = tmp_path / "out" / "checkpoint"
    checkpoint.save(model, cfg, path, {"step": 1}, rank_state={"reader": {}, "rng": {}})
    tmp = str(tmp_path / "out" / "checkpoint.tmp")
    rename_at = events.index(("rename", str(path)))
    meta_at = events.index(("fsync", f"{tmp}/meta.json"))
    before = [p for kind, p in events[:meta_at] if kind == "fsync"]
    # the rank's own file and DCP's files (.metadata written as .metadata.tmp and renamed),
    # then the directory naming them, all before meta.json
    assert f"{tmp}/rank-0.json" in before and f"{tmp}/.metadata.tmp" in before
    assert any(p.endswith(".distcp") for p in before)
    last_name = max(i for i, (kind, p) in enumerate(events[:meta_at]) if kind == "rename" or p.endswith(".json"))
    assert ("fsync", tmp) in events[last_name:meta_at]
    # meta.json's name (the directory again) before the rename, the parent after it
    assert ("fsync", tmp) in events[meta_at:rename_at]
    assert ("fsync", str(tmp_path / "out")) in events[rename_at:]
    assert read_meta(path)["step"] == 1


# ------------------------------------------------------------------ the checkpoint/ and best/ swap

def test_a_crash_between_the_two_renames_leaves_a_loadable_checkpoint(one_process, model_cfg, tmp_path,
                                                                       monkeypatch, caplog):
    model, cfg = model_cfg
    best = tmp_path / "best"
    checkpoint.save(model, cfg, best, {"step": 1}, rank_state=None)
    real_rename = Path.rename

    def crash_on_publish(self, target):  # the machine stops after moving the old copy aside
        if Path(target) == best:
            raise SystemExit("crash")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_publish)
    with pytest.raises(SystemExit):
        checkpoint.save(model, cfg, best, {"step": 2}, rank_state=None)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not best.exists()  # the window: neither best/ nor a rename of the new one
    with caplog.at_level(logging.WARNING, logger="gmeta.checkpoint"):
        loaded, _, meta = load_unsharded(best)
    assert meta["step"] == 1 and "best.old" in caplog.text  # the previous best, which the run's state matches
    assert read_meta(best)["step"] == 1
    # the next save completes the swap and replaces it
    checkpoint.save(model, cfg, best, {"step": 3}, rank_state=None)
    assert read_meta(best)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("best")) == ["best"]


def test_first_save_interrupted_after_its_meta_json_loads_the_new_copy(debug_checkpoint, tmp_path):
    _with_step(debug_checkpoint, tmp_path / "best.tmp", 7)  # no best/ ever published, no aside copy
    assert read_meta(tmp_path / "best")["step"] == 7
    assert load_unsharded(tmp_path / "best")[2]["step"] == 7


# ------------------------------------------------------------------ resume passes over damaged checkpoints

def _run_with_checkpoints(debug_checkpoint, tmp_path) -> tuple[Path, Path, Path]:
    out = tmp_path / "run"
    root = out / "checkpoints"
    root.mkdir(parents=True)
    old = _with_step(debug_checkpoint, root / "step-00000004", 4)
    new = _with_step(debug_checkpoint, root / "step-00000008", 8)
    return out, old, new


@pytest.mark.parametrize("damage", ["truncate_data", "delete_data", "corrupt_metadata", "corrupt_meta_json",
                                    "delete_rank_state"])
def test_resume_auto_passes_over_a_damaged_newest_checkpoint(debug_checkpoint, tmp_path, caplog, damage):
    out, old, new = _run_with_checkpoints(debug_checkpoint, tmp_path)
    cfg = load_config(DEBUG_CONFIG, [f"train.output_dir={out}", "train.resume=auto"])
    assert _resume_path(cfg, out) == new
    data = next(new.glob("*.distcp"))
    if damage == "truncate_data":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "delete_data":
        data.unlink()
    elif damage == "corrupt_metadata":
        (new / ".metadata").write_bytes(os.urandom(200))
    elif damage == "corrupt_meta_json":
        (new / "meta.json").write_text("{\"step\": 8, ")
    else:
        (new / "rank-0.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert _resume_path(cfg, out) == old
    assert "step-00000008" in caplog.text and "damaged" in caplog.text


def test_every_checkpoint_damaged_is_an_error_naming_them(debug_checkpoint, tmp_path):
    out, old, new = _run_with_checkpoints(debug_checkpoint, tmp_path)
    for ck in (old, new):
        (ck / ".metadata").unlink()
    cfg = load_config(DEBUG_CONFIG, [f"train.output_dir={out}", "train.resume=auto"])
    with pytest.raises(CheckpointError, match="step-00000008.*step-00000004"):
        _resume_path(cfg, out)
    cfg.train.resume = str(new)
    with pytest.raises(CheckpointError, match=r"train.resume: .*step-00000008"):
        _resume_path(cfg, out)


def test_prune_keeps_whole_checkpoints_when_the_newest_is_damaged(debug_checkpoint, tmp_path):
    out, old, new = _run_with_checkpoints(debug_checkpoint, tmp_path)
    (new / ".metadata").write_bytes(b"")
    resumed = _with_step(debug_checkpoint, out / "checkpoints" / "step-00000005", 5)
    checkpoint.prune(out / "checkpoints", keep=1)
    assert resumed.is_dir() and not old.exists()  # the newest whole one is kept, not the damaged one
    assert not new.exists() and (out / "checkpoints" / "step-00000008.damaged").is_dir()
    assert checkpoint.complete_checkpoints(out / "checkpoints") == [(5, resumed)]


# slow: two `gmeta train` processes; the default run proves the parts: the damaged newest
# checkpoint passed over (test_resume_auto_passes_over_a_damaged_newest_checkpoint, every
# kind of damage) and `gmeta train --resume auto` under torchrun going on from a checkpoint
# (tests/test_fault_tolerance.py::test_killed_ranks_resume_with_exactly_once_data_and_equal_parameters)
@pytest.mark.slow
def test_training_resumes_past_a_damaged_newest_checkpoint_instead_of_failing(debug_data, tmp_path):
    """What a restart under --max-restarts does: gmeta train --resume auto on an output
    directory whose newest checkpoint is damaged trains on from the one before."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "gmeta.cli", "train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", "1",
            f"data.shards_dir={debug_data['shards']}", f"train.output_dir={out}", "train.eval_at_end=false",
            "tracking.enabled=false", "train.checkpoint_every_steps=3", "train.keep_checkpoints=3"]
    p = subprocess.run([*base, "train.max_steps=7"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    shutil.rmtree(out / "checkpoint")  # as if the run had died after its checkpoint of step 6 (of 3 and 6)
    newest = out / "checkpoints" / "step-00000006"
    data = next(newest.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    p = subprocess.run([*base, "train.max_steps=9", "--resume", "auto"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step-00000006" in p.stderr and "damaged" in p.stderr
    assert read_meta(out / "checkpoint")["step"] == 9
