"""Resuming a training checkpoint with another number of processes: the data position
(per rank, so not carried over) restarts at the next epoch after a finished one, and at
the beginning of an unfinished one."""

from __future__ import annotations

import json
from pathlib import Path

import gmeta.training.step as gtrain
from gmeta.config import load_config
from gmeta.io.reader import TaskReader
from tests.conftest import DEBUG_CONFIG
from tests.support.cli import run_gmeta
from tests.support.multiprocess import run_gmeta_ranks

ROOT = Path(__file__).resolve().parents[1]
# 64 tasks per batch: 5 steps per epoch in 2 processes, 10 in one
COMMON = ["meta.tasks_per_batch=64", "tracking.enabled=false", "train.eval_at_end=false"]


def _train(nproc: int, args: list[str]) -> None:
    """``gmeta train --nproc-per-node NPROC``'s workers (forked ranks: what they train is what
    is checked here, not torchrun's launch)."""
    run_gmeta_ranks(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", str(nproc), *COMMON, *args], nproc,
                    cwd=ROOT)


def _train_here(args: list[str], monkeypatch) -> list[list[int]]:
    """One process, run in this one (no interpreter to start): the task ids of each step it
    trained, recorded as ``train_step`` returns (as the harness records a worker's)."""
    trained: list[list[int]] = []
    real = gtrain.train_step

    def recorded(model, batch, *a, **k):
        out = real(model, batch, *a, **k)
        trained.append(batch.task_ids.tolist())
        return out

    with monkeypatch.context() as m:
        m.setattr(gtrain, "train_step", recorded)
        proc = run_gmeta(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", *COMMON, *args], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return trained


def _epoch_batches(shards: Path, epoch: int, n: int) -> list[list[int]]:
    """The first ``n`` batches of ``epoch`` of a fresh one-process reader, as training reads them."""
    cfg = load_config(DEBUG_CONFIG, COMMON)
    d = cfg.data
    reader = TaskReader(shards, "train", cfg.meta.tasks_per_batch, num_workers=d.num_workers, seed=cfg.train.seed,
                        shuffle_buffer=d.shuffle_buffer, prefetch_factor=d.prefetch_factor,
                        size_buckets=cfg.meta.size_buckets)
    reader.set_epoch(epoch)
    return [b.task_ids.tolist() for _, b in zip(range(n), reader)]


def test_resume_in_another_world_size_goes_on_at_the_right_epoch(debug_data, tmp_path, monkeypatch):
    shards = debug_data["shards"]
    two = tmp_path / "two"
    # 2 processes, one epoch (5 steps): a mid-epoch checkpoint at step 4, the final one at the epoch's end
    _train(2, [f"data.shards_dir={shards}", f"train.output_dir={two}", "train.max_steps=5",
               "train.checkpoint_every_steps=4"])
    assert json.loads((two / "checkpoint" / "meta.json").read_text())["epoch_done"] is True

    # from the end of epoch 0: one process goes on with epoch 1
    trained = _train_here([f"data.shards_dir={shards}", f"train.output_dir={tmp_path / 'end'}", "train.max_steps=8",
                           f"--resume={two / 'checkpoint'}"], monkeypatch)
    assert trained == _epoch_batches(shards, 1, 3)

    # from step 4 of 5: epoch 0 again, from its beginning
    trained = _train_here([f"data.shards_dir={shards}", f"train.output_dir={tmp_path / 'mid'}", "train.max_steps=7",
                           f"--resume={two / 'checkpoints' / 'step-00000004'}"], monkeypatch)
    assert trained == _epoch_batches(shards, 0, 3)
