"""The warm-up protocol of item cold start: the split (data.split.rule warmup) and the
evaluate mode (eval.protocol warmup, gmeta.warmup)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gmeta.config import ConfigError, load_config
from gmeta.io.features import task_uniform
from gmeta.io.prepare import prepare

TINY = """
features:
  task_key: ad_id
  timestamp: ts
  label: label
  true_prob: ""
  sparse:
    - {name: ad_id, num_embeddings: 500}
    - {name: user_id, num_embeddings: 200}
  dense: [x]
data:
  split: {rule: warmup, warmup_train_rows: 10, warmup_rows: 2, val_fraction: 0.5, max_support: 8, max_query: 8,
          min_support: 2, min_query: 2, seed: 3}
model: {embedding_dim: 4, dense_arch: [4], over_arch: [8]}
meta: {tasks_per_batch: 4, inner_steps: 1}
train: {output_dir: runs/tiny}
tracking: {enabled: false}
"""

# ad id -> rows: 100 and 101 train the base model (more than N = 10 rows), 200-207 are
# evaluation ids (7 = 3K + 1 to 10 rows), 300 and 301 are too cold (6 rows < 3K + 1)
ROWS = {100: 12, 101: 11, 200: 10, 201: 7, 202: 8, 203: 9, 204: 7, 205: 10, 206: 7, 207: 8, 300: 6, 301: 1}


def tiny_config(tmp_path: Path, overrides: list[str] | None = None):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return load_config(path, overrides or [])


def write_tiny(path: Path, rows: dict[int, int] = ROWS, seed: int = 0) -> Path:
    """One Parquet file, rows of all ids interleaved and out of time order; each row's
    label 1 on even times, and ``x`` = its time (so a test can tell which rows are where)."""
    rng = np.random.default_rng(seed)
    ad, ts = [], []
    for a, n in rows.items():
        ad += [a] * n
        ts += (1000 * a + 10 * rng.permutation(n)).tolist()  # distinct times, shuffled
    order = rng.permutation(len(ad))
    ad_a, ts_a = np.array(ad)[order], np.array(ts)[order]
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"ad_id": ad_a, "ts": ts_a, "label": ((ts_a // 10) % 2 == 0).astype(np.int64),
                             "user_id": rng.integers(0, 50, len(ad_a)), "x": ts_a.astype(np.float64)}),
                   path / "part-0.parquet")
    return path


def records(shards: Path, split: str) -> dict[int, tuple[list[int], list[int]]]:
    """{ad id: (support timestamps, query timestamps)} of a split's records, as written."""
    out = {}
    for f in sorted((shards / split).glob("*.parquet")):
        for rec in pq.read_table(f).to_pylist():
            out[rec["task_key"]] = (rec["support"]["timestamp"], rec["query"]["timestamp"])
    return out


def test_warmup_split_assigns_ids_by_row_count(tmp_path):
    cfg = tiny_config(tmp_path)
    raw = write_tiny(tmp_path / "raw")
    m = prepare(cfg, raw, tmp_path / "shards")
    times = {a: sorted(1000 * a + 10 * i for i in range(n)) for a, n in ROWS.items()}
    train, val, test = (records(tmp_path / "shards", s) for s in ("train", "val", "eval"))
    assert set(train) == {100, 101}
    # training ids: split by the time rule (support_ratio 0.5), every row written
    for a in (100, 101):
        s, q = train[a]
        assert s + q == times[a] and len(s) == round(ROWS[a] * 0.5)
    # evaluation ids: support = the first 3K = 6 rows in time order (a, b, c), query = the rest
    cold = [200, 201, 202, 203, 204, 205, 206, 207]
    u = dict(zip(cold, task_uniform(np.array(cold), 3)))
    assert set(val) == {a for a in cold if u[a] < 0.5} and set(test) == {a for a in cold if u[a] >= 0.5}
    assert val and test  # (both splits have ids at this seed: the test checks both)
    for a in cold:
        s, q = (val | test)[a]
        assert s == times[a][:6] and q == times[a][6:]  # also beyond max_query 8: the whole rest
    # too cold ids: left out and counted
    assert m["dropped_tasks"]["too_few_warmup_rows"] == 2
    assert m["rows"]["dropped"]["too_few_warmup_rows"] == 7
    assert m["splits"]["train"]["tasks"] == 2 and m["input_tasks"] == len(ROWS)


def test_warmup_split_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.split.warmup_train_rows: must be >= 3 \\* data.split.warmup_rows"):
        tiny_config(tmp_path, ["data.split.warmup_train_rows=6"])
    with pytest.raises(ConfigError, match="data.split.warmup_rows: must be >= 1"):
        tiny_config(tmp_path, ["data.split.warmup_rows=0"])
    with pytest.raises(ConfigError, match="features.task_key: data.split.rule warmup: the task key must be a "
                                          "sparse feature"):
        tiny_config(tmp_path, ["features.task_key=campaign"])
    # the task key as a feature is for the warm-up rule only
    with pytest.raises(ConfigError, match="clash with task key"):
        tiny_config(tmp_path, ["data.split.rule=time"])
