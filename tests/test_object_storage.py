"""Task shards, checkpoints, reports and predictions in an object store: a local
S3-compatible server (moto), reached through the usual AWS environment variables."""

from __future__ import annotations

import pytest
import torch

from gmeta.config import load_config
from gmeta.io.manifest import load_manifest
from gmeta.io.prepare import prepare
from gmeta.io.reader import TaskReader, task_keys
from gmeta.storage import StorageError, location
from tests.conftest import DEBUG_CONFIG


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


def test_a_missing_bucket_is_an_error_naming_the_url_before_anything_is_read(debug_data, s3_server):
    cfg = load_config(DEBUG_CONFIG)
    with pytest.raises(StorageError, match=r"prepare --out .*s3://gmeta-no-such-bucket/x: bucket "
                                           r"'gmeta-no-such-bucket' does not exist \(endpoint http://127"):
        prepare(cfg, debug_data["raw"], "s3://gmeta-no-such-bucket/x")
    from gmeta.io.errors import PrepareError

    with pytest.raises(PrepareError, match=r"s3://gmeta-no-such-bucket/x/manifest.json: not found"):
        load_manifest("s3://gmeta-no-such-bucket/x")
