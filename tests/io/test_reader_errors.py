"""What the reader says about damaged shards (one line, checked against the manifest's
sha256) and about the tasks it leaves out of every epoch."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest

from gmeta.io.manifest import load_manifest
from gmeta.io.reader import ShardError, TaskReader, file_sha256
from tests.conftest import DEBUG_CONFIG


@pytest.fixture
def shards_copy(debug_data, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(debug_data["shards"], out)
    return out


def _break_footer(path) -> None:
    """Parquet's closing magic bytes gone: "magic bytes not found in footer"."""
    data = bytearray(path.read_bytes())
    data[-4:] = b"XXXX"
    path.write_bytes(bytes(data))


def _sha_in_manifest(shards, rel: str, value: str) -> None:
    m = load_manifest(shards)
    for f in m["splits"]["train"]["files"]:
        if f["path"] == rel:
            f["sha256"] = value
    (shards / "manifest.json").write_text(json.dumps(m))


def test_a_shard_changed_after_prepare_is_refused_before_reading(shards_copy):
    path = shards_copy / "train" / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: Parquet alone might read it without a complaint
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError) as e:
        TaskReader(shards_copy, "train", 4)
    msg = str(e.value)
    assert "part-00001.parquet" in msg and "sha256" in msg and "gmeta prepare" in msg and "\n" not in msg
    # each rank checks its share of the files: rank 1 of 2 the odd ones, so rank 0 does not see it
    TaskReader(shards_copy, "train", 4, rank=0, world_size=2)
    with pytest.raises(ShardError, match="part-00001.parquet"):
        TaskReader(shards_copy, "train", 4, rank=1, world_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_shard_is_one_line_naming_file_row_group_and_what_to_do(shards_copy, workers):
    path = shards_copy / "train" / "part-00000.parquet"
    _break_footer(path)
    r = TaskReader(shards_copy, "train", 4, shuffle=False, num_workers=workers, verify=False)
    with pytest.raises(ShardError) as e:
        list(r)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg and "DataLoader worker" not in msg, msg
    assert f"{path} (row group 0)" in msg and "magic bytes" in msg
    assert "sha256" in msg and "gmeta prepare" in msg  # the read error led to the hash check


def test_cli_prints_a_corrupt_shard_as_one_line(shards_copy, tmp_path):
    """Damaged as prepare wrote it (the manifest's sha256 agrees): the failure comes from a
    DataLoader worker, and the command prints one line, not the worker's traceback."""
    path = shards_copy / "train" / "part-00000.parquet"
    _break_footer(path)
    _sha_in_manifest(shards_copy, "train/part-00000.parquet", file_sha256(path))
    p = subprocess.run([sys.executable, "-m", "gmeta.cli", "train", "--config", str(DEBUG_CONFIG),
                        "--nproc-per-node", "1", f"data.shards_dir={shards_copy}", f"train.output_dir={tmp_path / 'o'}",
                        "data.num_workers=2", "tracking.enabled=false", "train.eval_at_end=false",
                        "train.max_steps=200"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr and "worker process" not in p.stderr, p.stderr[-3000:]
    last = err[-1]
    assert last.startswith("gmeta train: ") and "part-00000.parquet (row group" in last and "gmeta prepare" in last


def test_dropped_tasks_are_counted_and_logged_each_epoch(debug_data, caplog):
    n, world, workers = 7, 2, 2
    total = load_manifest(debug_data["shards"])["splits"]["train"]["tasks"]
    with caplog.at_level(logging.INFO, logger="gmeta.io.reader"):
        for epoch in (0, 1):
            seen = []
            for rank in range(world):
                r = TaskReader(debug_data["shards"], "train", n, rank=rank, world_size=world, num_workers=workers,
                               seed=5)
                r.set_epoch(epoch)
                seen += [i for b in r for i in b.task_ids.tolist()]
            true_dropped = total - len(set(seen))
            assert len(seen) == len(set(seen)) and true_dropped > 0
            assert r.dropped_tasks == true_dropped == r.dropped_tasks_total
            logged = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith(f"epoch {epoch}:")]
            assert logged == [f"epoch {epoch}: {true_dropped} of {total} tasks of split 'train' fill no meta-batch "
                              f"and are left out ({world} rank(s) x {workers} reader worker(s), {n} tasks per batch)"]
