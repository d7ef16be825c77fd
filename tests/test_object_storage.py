"""Task shards, checkpoints, reports and predictions in an object store: a local
S3-compatible server (moto), reached through the usual AWS environment variables."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager

import pandas as pd
import pytest
import torch

from gmeta.checkpoint import read_meta
from gmeta.cli import main as cli_main
from gmeta.config import load_config
from gmeta.io.errors import PrepareError
from gmeta.io.manifest import load_manifest
from gmeta.io.prepare import prepare
from gmeta.io.reader import TaskReader, task_keys
from gmeta.storage import StorageError, location
from tests.conftest import DEBUG_CONFIG
from tests.support.multiprocess import run_gmeta_ranks


def _batches(shards, split="train", workers=0):
    reader = TaskReader(shards, split, 5, seed=2, num_workers=workers)
    return [(b.task_ids.tolist(), b.labels, b.dense) for b in reader]


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_prepare_writes_shards_to_s3_that_read_as_local_ones(debug_data, tmp_path, s3_bucket, fmt):
    cfg = load_config(DEBUG_CONFIG, [f"data.format={fmt}"])
    local, remote = tmp_path / "shards", f"{s3_bucket}/shards"
    want = prepare(cfg, debug_data["raw"], local)
    got = prepare(cfg, debug_data["raw"], remote)
    assert got["splits"] == want["splits"] and load_manifest(remote)["splits"] == want["splits"]
    names = sorted(p.name for p in location(remote).joinpath("train").iterdir())
    assert names == sorted(p.name for p in (local / "train").iterdir()) and names
    assert task_keys(remote, "eval") == task_keys(local, "eval")
    for workers in (0, 2):
        a, b = _batches(local, workers=workers), _batches(remote, workers=workers)
        assert len(a) == len(b) > 0
        for (ia, la, da), (ib, lb, db) in zip(a, b):
            assert ia == ib
            torch.testing.assert_close(la, lb)
            torch.testing.assert_close(da, db)
    # preparing again replaces the shards: no file of the first run is left over
    prepare(load_config(DEBUG_CONFIG, [f"data.format={fmt}", "data.split.eval_fraction=0.5"]), debug_data["raw"],
            remote)
    again = load_manifest(remote)
    listed = {f["path"] for s in again["splits"].values() for f in s["files"]}
    stored = {f"{s}/{p.name}" for s in again["splits"] for p in location(remote).joinpath(s).iterdir()}
    assert listed == stored


def test_a_missing_bucket_or_denied_access_is_an_error_naming_the_url(debug_data, s3_bucket, capsys):
    cfg = load_config(DEBUG_CONFIG)
    with pytest.raises(StorageError, match=r"prepare --out .*s3://gmeta-no-such-bucket/x: bucket "
                                           r"'gmeta-no-such-bucket' does not exist \(endpoint http://127"):
        prepare(cfg, debug_data["raw"], "s3://gmeta-no-such-bucket/x")
    with pytest.raises(StorageError, match=r"task shards: s3://gmeta-no-such-bucket/x: bucket .* does not exist"):
        load_manifest("s3://gmeta-no-such-bucket/x")
    with pytest.raises(PrepareError, match=rf"{s3_bucket}/x/manifest.json: not found; run `gmeta prepare`"):
        load_manifest(f"{s3_bucket}/x")
    # the command line (in this process: an exception escaping it would fail the test): the
    # error, naming the config key
    capsys.readouterr()
    rc = cli_main(["train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", "1",
                   f"data.shards_dir={debug_data['shards']}", "train.output_dir=s3://gmeta-no-such-bucket/r",
                   "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "gmeta train: train.output_dir: s3://gmeta-no-such-bucket/r: bucket 'gmeta-no-such-bucket' does not exist" \
        in err
    with _auth_enforced(), pytest.raises(StorageError, match=rf"checkpoint: {s3_bucket}/ck: access to bucket "
                                                            r".* denied .*AWS_ACCESS_KEY_ID"):
        read_meta(f"{s3_bucket}/ck")


@contextmanager
def _auth_enforced():
    """The server checks credentials (the test ones belong to no user): every request is denied."""
    import moto.settings
    import s3fs

    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")


def _gmeta(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "gmeta.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _gmeta_here(*args) -> None:
    """The same command line in this process: a one-process command (or one that spawns its
    own workers) needs no interpreter of its own, whose imports cost seconds; the S3 listings
    are read afresh, as a new process would."""
    from tests.support.s3 import _clear_fsspec_cache

    _clear_fsspec_cache()
    assert cli_main([str(a) for a in args]) == 0


def _parts(out) -> pd.DataFrame:
    out = location(out)
    with_sources = [pd.read_parquet(p.open("rb")) for p in sorted(out.glob("part-*.parquet"))]
    return pd.concat(with_sources).reset_index(drop=True)


def test_prepare_train_evaluate_predict_end_to_end_in_s3(debug_data, tmp_path, s3_bucket):
    shards, run = f"{s3_bucket}/shards", f"{s3_bucket}/run"
    _gmeta_here("prepare", "--config", DEBUG_CONFIG, "--input", debug_data["raw"], "--out", shards,
                "data.split.val_fraction=0.1")
    train = ["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "2", f"data.shards_dir={shards}",
             f"train.output_dir={run}", "data.split.val_fraction=0.1", "train.checkpoint_every_steps=4",
             "train.val_every_steps=4", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    # its workers forked from the fork server; the resume below is a real launch of `gmeta train`
    run_gmeta_ranks([*train, "train.max_steps=8"], 2)
    stored = {str(p)[len(run) + 1:] for p in location(run).rglob("*") if p.is_file()}
    assert {"checkpoint/meta.json", "checkpoint/rank-1.json", "checkpoints/step-00000004/meta.json",
            "best/meta.json", "validation.jsonl", "learning_curves.png", "eval/eval_report.json"} <= stored
    assert not any(".tmp" in s for s in stored)
    assert read_meta(f"{run}/checkpoint")["step"] == 8
    resumed = _gmeta(*train, "train.max_steps=12", "train.resume=auto")  # continues from the S3 checkpoint
    assert f"resumed from {run}/checkpoint at step 8" in resumed.stderr
    assert read_meta(f"{run}/checkpoint")["step"] == 12
    assert len((location(run) / "validation.jsonl").read_text().splitlines()) == 3  # steps 4, 8, 12
    report = json.loads((location(run) / "eval" / "eval_report.json").read_text())
    assert report["checkpoint"] == f"{run}/best"
    _gmeta_here("evaluate", "--checkpoint", f"{run}/checkpoint", "--out", f"{s3_bucket}/eval", "--no-tracking")
    assert json.loads((location(s3_bucket) / "eval" / "eval_report.json").read_text())["checkpoint"] == \
        f"{run}/checkpoint"
    # batch prediction from the shards in S3 to S3, equal to the same to local disk
    _gmeta_here("predict", "--checkpoint", f"{run}/checkpoint", "--out", f"{s3_bucket}/pred")
    _gmeta_here("predict", "--checkpoint", f"{run}/checkpoint", "--out", tmp_path / "pred")
    pd.testing.assert_frame_equal(_parts(f"{s3_bucket}/pred"), _parts(tmp_path / "pred"))
    # and from raw logs in S3, with 2 worker processes, to S3
    raw = location(f"{s3_bucket}/logs")
    for f in sorted(debug_data["raw"].glob("*.parquet"))[:2]:
        raw.fs.put_file(str(f), (raw / f.name).path)
    _gmeta_here("predict", "--checkpoint", f"{run}/checkpoint", "--input", f"{s3_bucket}/logs",
                "--out", f"{s3_bucket}/raw-pred", "--nproc-per-node", "2")
    _gmeta_here("predict", "--checkpoint", f"{run}/checkpoint", "--input", f"{s3_bucket}/logs",
                "--out", tmp_path / "raw-pred")
    a = _parts(f"{s3_bucket}/raw-pred").sort_values("input_row").reset_index(drop=True)
    b = _parts(tmp_path / "raw-pred").sort_values("input_row").reset_index(drop=True)
    assert len(a) > 0 and not a["input_row"].duplicated().any()
    pd.testing.assert_frame_equal(a, b)
    progress = json.loads((location(s3_bucket) / "raw-pred" / "_progress.json").read_text())
    assert progress["complete"] and progress["rows"] == len(a)
