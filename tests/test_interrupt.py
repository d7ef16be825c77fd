"""Ctrl-C during ``gmeta train``: every rank stops after the same step, a training checkpoint
of that step is written, one short message says where it is and how to resume, and no
traceback is printed; an error of the workers is printed once."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gmeta.checkpoint import complete_checkpoints
from gmeta.cli import resume_command
from tests.conftest import DEBUG_CONFIG
from tests.support.cli import run_gmeta

ROOT = Path(__file__).resolve().parents[1]


def _cmd(nproc: int, shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gmeta.cli", "train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", str(nproc),
            f"data.shards_dir={shards}", f"train.output_dir={out}", "tracking.enabled=false",
            "train.eval_at_end=false", *extra]


def _interrupt(nproc: int, shards: Path, out: Path, group: bool) -> tuple[subprocess.CompletedProcess, int]:
    """Train (long), wait for its first periodic checkpoint, then SIGINT: to the whole
    process group (a terminal's Ctrl-C) or to the ``gmeta train`` process only."""
    cmd = _cmd(nproc, shards, out, "train.epochs=200", "train.checkpoint_every_steps=3", "train.log_every=1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoints" / "step-00000003" / "meta.json").is_file():
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.2)
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), proc.pid


def _check_stopped(done: subprocess.CompletedProcess, out: Path) -> int:
    """The interrupted run's message and checkpoint; returns the step it stopped after."""
    assert done.returncode == 130, done.stderr[-4000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-4000:]
    found = re.findall(r"gmeta train: interrupted after step (\d+); checkpoint: (\S+)\n", done.stderr)
    assert len(found) == 1, done.stderr[-4000:]  # said once, not once per rank
    step, path = int(found[0][0]), Path(found[0][1])
    assert step >= 3
    assert path == out / "checkpoints" / f"step-{step:08d}"
    assert (step, path) in complete_checkpoints(out / "checkpoints")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == step
    assert meta["world_size"] >= 1 and not (out / "checkpoint").exists()  # no final checkpoint: it did not finish
    hint = re.findall(r"to resume: (.+)\n", done.stderr)
    assert len(hint) == 1 and hint[0] == resume_command(done.args[3:]), done.stderr[-4000:]
    return step


def _resume(hint_args: list[str], step: int, nproc: int) -> subprocess.CompletedProcess:
    """The printed resume command, told to stop two steps later (one process: run in this one)."""
    args = [*hint_args, f"train.max_steps={step + 2}"]
    if nproc == 1:
        done = run_gmeta(args, cwd=ROOT)
    else:
        done = subprocess.run([sys.executable, "-m", "gmeta.cli", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.parametrize("nproc, group", [(2, True), (1, False)])
def test_ctrl_c_checkpoints_at_the_interrupt_and_says_how_to_resume(debug_data, tmp_path, nproc, group):
    out = tmp_path / "run"
    done, _ = _interrupt(nproc, debug_data["shards"], out, group)
    step = _check_stopped(done, out)
    hint = re.findall(r"to resume: (.+)\n", done.stderr)[0]
    args = shlex.split(hint)
    assert args[0] == "gmeta" and "--resume" in args and args[args.index("--resume") + 1] == "auto"
    resumed = _resume(args[1:], step, nproc)
    assert f"at step {step}" in resumed.stderr, resumed.stderr[-3000:]
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["step"] == step + 2
    if nproc == 2:
        # an error of both workers (the output directory holds a run, and no --resume): said once, no
        # torchrun failure report
        again = subprocess.run(_cmd(2, debug_data["shards"], out), cwd=ROOT, capture_output=True, text=True,
                               timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert again.returncode == 2, again.stderr[-4000:]
        assert again.stderr.count("holds checkpoints of an earlier run") == 1, again.stderr[-4000:]
        assert "Traceback" not in again.stderr and "ChildFailedError" not in again.stderr, again.stderr[-4000:]


def test_sigint_to_the_launcher_only_reaches_the_workers(debug_data, tmp_path):
    """``kill -INT`` of the ``gmeta train --nproc-per-node 2`` process alone: it forwards it."""
    out = tmp_path / "run"
    done, _ = _interrupt(2, debug_data["shards"], out, group=False)
    _check_stopped(done, out)


def test_resume_command_replaces_any_resume():
    assert resume_command(["train", "--config", "c.yaml", "--resume", "none", "a.b=1"]) == \
        "gmeta train --resume auto --config c.yaml a.b=1"
    assert resume_command(["-v", "train", "--resume=/x/step-1", "--config", "c y.yaml"]) == \
        "gmeta -v train --resume auto --config 'c y.yaml'"


def test_agreed_stop_is_read_one_step_late_on_a_gpu_without_a_device_read():
    """On a GPU the agreed flag is copied to pinned memory behind an event and read at the
    next step (every rank alike); the CPU stands in here, with an event that records calls."""
    import torch

    from gmeta.training.step import AgreedStop
    from tests.support.sync_counter import SyncCounter

    class Event:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def record(self) -> None:
            self.calls.append("record")

        def synchronize(self) -> None:
            self.calls.append("synchronize")

    now = AgreedStop(torch.device("cpu"))
    late = AgreedStop(torch.device("cpu"))
    late.event = event = Event()  # type: ignore[assignment]
    flags = [torch.tensor(v) for v in (False, False, True, False)]
    with SyncCounter() as c:
        assert [now(f) for f in flags] == [False, False, True, False]
        assert [late(f) for f in flags] == [False, False, False, True]
    assert not c.syncs, c.syncs
    assert event.calls == ["record"] + ["synchronize", "record"] * 3  # each read waits for the previous copy only
