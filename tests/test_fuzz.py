"""Fuzzing (hypothesis) of what users hand to gmeta: task shards and config files.

Every damaged shard must either read as valid batches or fail with ShardError naming the
file; every config must load or fail with ConfigError naming the key or file. Never any
other exception, never a hang (each example runs under an alarm)."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmeta.config import Config, ConfigError, load_config
from gmeta.io.block import ShardError
from gmeta.io.reader import TaskReader
from tests.conftest import DEBUG_CONFIG

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                        HealthCheck.too_slow], derandomize=True)


@contextmanager
def time_limit(seconds: int):
    def fail(*_):
        raise TimeoutError(f"no result within {seconds}s: a hang")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _tiny_shards(root: Path, fmt: str) -> Path:
    from gmeta.io.prepare import prepare
    from gmeta.synth import generate

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
                reader = TaskReader(tiny_shards, "train", 8, shuffle=False, drop_last=False, num_workers=0)
                for batch in reader:  # what comes out passed the reader's checks
                    assert np.isfinite(batch.dense.numpy()).all()
                    assert set(np.unique(batch.labels.numpy())) <= {0.0, 1.0}
            except ShardError as e:
                assert str(tiny_shards) in str(e)
    finally:
        shard.write_bytes(original)


# ------------------------------------------------------------------ config files

_KEYS = {
    "meta": ["algorithm", "tasks_per_batch", "inner_steps", "inner_lr", "first_order", "adapt_dense",
             "adapt_embeddings", "embedding_inner_lr", "meta_sgd", "size_buckets"],
    "optim": ["dense_lr", "embedding_optimizer", "embedding_lr", "dense_weight_decay"],
    "train": ["epochs", "max_steps", "log_every", "seed", "nproc_per_node", "output_dir", "resume",
              "checkpoint_every_steps", "checkpoint_every_minutes", "keep_checkpoints", "on_nonfinite_loss"],
    "data": ["format", "tasks_per_shard", "num_workers", "shuffle_buffer", "on_bad_task", "split"],
    "model": ["embedding_dim", "dense_arch", "over_arch"],
    "features": ["task_key", "sparse", "dense", "label"],
    "sharding": ["sharding_type", "tables", "memory_budget_mb"],
    "eval": ["inner_steps", "curve_steps", "support_buckets", "calibration_bins"],
    "tracking": ["uri", "experiment", "system_metrics_s", "log_model"],
}
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=8)


@st.composite
def _config_docs(draw):
    base = yaml.safe_load(DEBUG_CONFIG.read_text())
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(_KEYS) + ["bogus"]))
        key = draw(st.sampled_from(_KEYS.get(section, ["x"]) + ["unknown_key"]))
        if draw(st.booleans()) and isinstance(base.get(section), dict):
            base[section][key] = draw(_values)
        else:
            base[section] = draw(_values)
    return base


@settings(max_examples=300, **SETTINGS)
@given(doc=_config_docs())
def test_config_documents_load_or_fail_with_config_error(tmp_path, doc):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    with time_limit(10):
        try:
            assert isinstance(load_config(path), Config)
        except ConfigError as e:
            assert str(e)


@settings(max_examples=300, **SETTINGS)
@given(text=st.text(max_size=200), override=st.text(max_size=40))
def test_config_text_and_overrides_load_or_fail_with_config_error(tmp_path, text, override):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    with time_limit(10):
        for args in ((path, []), (DEBUG_CONFIG, [override])):
            try:
                load_config(*args)
            except ConfigError as e:
                assert str(e)
