"""Damaged shard files: every one reads or fails with a ShardError, never hangs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gmeta.config import load_config
from gmeta.io.block import ShardError
from gmeta.io.reader import TaskReader
from tests.conftest import DEBUG_CONFIG
from tests.support.fuzz import SETTINGS, time_limit


def _tiny_shards(root: Path, fmt: str) -> Path:
    from gmeta.io.prepare import prepare
    from gmeta.io.synth import generate

    cfg = load_config(DEBUG_CONFIG, ["synth.num_tasks=40", "data.tasks_per_shard=1000", "data.tasks_per_row_group=16",
                                     "data.split.eval_fraction=0.0", f"data.format={fmt}"])
    generate(cfg, root / "raw")
    prepare(cfg, root / "raw", root / "shards")
    return root / "shards"


@pytest.fixture(scope="module", params=["parquet", "webdataset"])
def tiny_shards(request, tmp_path_factory) -> Path:
    return _tiny_shards(tmp_path_factory.mktemp(f"fuzz-{request.param}"), request.param)


def _mutate(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "zero", "append"]))
    n = len(data)
    if kind == "truncate":
        return data[: draw(st.integers(0, n - 1))]
    if kind == "zero":
        return b""
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 16))):
            i = draw(st.integers(0, n - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    start = draw(st.integers(0, n - 1))
    chunk = draw(st.binary(min_size=1, max_size=256))
    buf[start: start + len(chunk)] = chunk
    return bytes(buf[:n])


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_damaged_shards_read_or_fail_with_shard_error(tiny_shards, data):
    shard = next(p for p in sorted((tiny_shards / "train").iterdir()) if p.suffix in (".parquet", ".tar"))
    original = shard.read_bytes()
    damaged = _mutate(original, data.draw)
    shard.write_bytes(damaged)
    try:
        with time_limit(20):
            try:
                # verify=False: the reading itself must cope (the sha256 check would stop most first)
                reader = TaskReader(tiny_shards, "train", 8, shuffle=False, drop_last=False, num_workers=0,
                                    verify=False)
                for batch in reader:  # what comes out passed the reader's checks
                    assert np.isfinite(batch.dense.numpy()).all()
                    assert set(np.unique(batch.labels.numpy())) <= {0.0, 1.0}
            except ShardError as e:
                assert str(tiny_shards) in str(e)
    finally:
        shard.write_bytes(original)
