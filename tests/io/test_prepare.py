"""prepare: the task shards it writes and its errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gmeta.config import load_config
from gmeta.io.errors import PrepareError
from gmeta.io.manifest import load_manifest
from gmeta.io.prepare import prepare
from gmeta.io.reader import ShardError, TaskReader


def test_manifest_counts_and_checksums(debug_data, debug_config_path):
    cfg = load_config(debug_config_path)
    m = load_manifest(debug_data["shards"])
    raw = json.loads((debug_data["raw"] / "_synth.json").read_text())
    assert m["input_rows"] == raw["rows"] and m["input_tasks"] == raw["tasks"]
    kept = m["splits"]["train"]["tasks"] + m["splits"]["eval"]["tasks"]
    assert kept + sum(m["dropped_tasks"].values()) == m["input_tasks"]
    assert 0.1 < m["splits"]["eval"]["tasks"] / kept < 0.3  # eval_fraction 0.2
    for split in ("train", "eval"):
        files = m["splits"][split]["files"]
        assert sum(f["tasks"] for f in files) == m["splits"][split]["tasks"]
        for f in files:
            assert len(f["sha256"]) == 64
            t = pq.read_table(debug_data["shards"] / f["path"])
            assert t.num_rows == f["tasks"]
    assert m["cardinality"]["user_id"]["num_embeddings"] == 2000
    assert m["cardinality"]["user_id"]["distinct_raw"] == len(
        np.unique(pq.read_table(debug_data["raw"]).column("user_id").to_numpy()))
    assert m["split_rule"]["rule"] == "time" and m["schema"]["has_true_prob"]
    assert [s["name"] for s in m["schema"]["sparse"]] == [s.name for s in cfg.features.sparse]


def test_records_hold_whole_tasks_split_by_time(debug_data, debug_config_path):
    cfg = load_config(debug_config_path)
    sp = cfg.data.split
    raw = pq.read_table(debug_data["raw"]).to_pandas()
    sizes = raw.groupby("campaign_id").size()
    t = pq.read_table(debug_data["shards"] / "train" / "part-00000.parquet").slice(0, 50).to_pylist()
    for rec in t:
        s, q = rec["support"], rec["query"]
        assert sp.min_support <= len(s["label"]) <= sp.max_support
        assert sp.min_query <= len(q["label"]) <= sp.max_query
        assert max(s["timestamp"]) < min(q["timestamp"])  # support strictly earlier
        assert len(s["label"]) + len(q["label"]) <= sizes[rec["task_key"]]
        assert all(0 <= i < 2000 for i in s["user_id"] + q["user_id"])
        assert all(len(d) == 3 for d in s["dense"])
        # labels match the raw rows with the same timestamps
        rows = raw[raw.campaign_id == rec["task_key"]].set_index("ts")
        assert sorted(rows.loc[s["timestamp"], "label"].tolist()) == sorted(int(x) for x in s["label"])


def test_prepare_is_deterministic(debug_data, debug_config_path, tmp_path):
    cfg = load_config(debug_config_path)
    m2 = prepare(cfg, debug_data["raw"], tmp_path / "again")
    m1 = load_manifest(debug_data["shards"])
    sums = [[f["sha256"] for f in m["splits"]["train"]["files"]] for m in (m1, m2)]
    assert sums[0] == sums[1]


def test_ratio_rule_and_dropped_counts(debug_data, debug_config_path, tmp_path):
    cfg = load_config(debug_config_path, ["data.split.rule=ratio", "data.split.min_query=40",
                                          "data.split.max_query=60"])
    m = prepare(cfg, debug_data["raw"], tmp_path / "ratio")
    assert m["dropped_tasks"]["query_too_small"] > 0
    kept = m["splits"]["train"]["tasks"] + m["splits"]["eval"]["tasks"]
    assert kept + sum(m["dropped_tasks"].values()) == m["input_tasks"]


def test_bad_inputs_name_the_file(debug_data, debug_config_path, tmp_path):
    cfg = load_config(debug_config_path)
    # missing column
    raw = pq.read_table(debug_data["raw"])
    p = tmp_path / "raw_missing"
    p.mkdir()
    pq.write_table(raw.drop_columns(["site_id"]), p / "x.parquet")
    with pytest.raises(PrepareError, match=r"missing column\(s\) \['site_id'\]"):
        prepare(cfg, p, tmp_path / "o1")
    # NaN in a dense feature
    p2 = tmp_path / "raw_nan"
    p2.mkdir()
    bid = raw.column("bid_price").to_numpy().copy()
    bid[5] = np.nan
    pq.write_table(raw.set_column(raw.schema.get_field_index("bid_price"), "bid_price", pa.array(bid)),
                   p2 / "x.parquet")
    with pytest.raises(PrepareError, match=r"x.parquet: row 5: column 'bid_price' has a NaN"):
        prepare(cfg, p2, tmp_path / "o2")
    with pytest.raises(PrepareError, match="input not found"):
        prepare(cfg, tmp_path / "nothing", tmp_path / "o3")
    # corrupt shard
    shards = tmp_path / "shards"
    shutil.copytree(debug_data["shards"], shards)
    f = shards / "train" / "part-00000.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ShardError, match="part-00000.parquet"):
        next(iter(TaskReader(shards, "train", 4, shuffle=False)))
    # missing manifest
    with pytest.raises(PrepareError, match="manifest.json: not found"):
        TaskReader(tmp_path, "train", 4)


def _task_rows(shards, split):
    """{task_key: [(timestamp, label), ...] of every record of the task, sorted} for a split."""
    out: dict = {}
    for path in sorted((shards / split).glob("*.parquet")):
        for rec in pq.read_table(path).to_pylist():
            rows = [(t, float(y)) for side in ("support", "query")
                    for t, y in zip(rec[side]["timestamp"], rec[side]["label"])]
            out.setdefault(rec["task_key"], []).append(sorted(rows))
    return out


@pytest.mark.parametrize("split_args", [["data.split.max_support=16", "data.split.max_query=16"],
                                        ["data.split.max_task_rows=40", "data.split.query_size=8",
                                         "data.split.max_support=32", "data.split.max_query=8"]])
def test_long_training_tasks_are_chunked_into_tasks_that_keep_every_row(debug_data, debug_config_path, tmp_path,
                                                                       split_args):
    drop = load_config(debug_config_path, ["data.split.val_fraction=0.1", *split_args])
    chunk = load_config(debug_config_path, ["data.split.val_fraction=0.1", *split_args,
                                            "data.split.long_train_tasks=chunk"])
    md, mc = prepare(drop, debug_data["raw"], tmp_path / "drop"), prepare(chunk, debug_data["raw"], tmp_path / "chunk")
    size = chunk.data.split.max_task_rows or 32
    raw = pq.read_table(debug_data["raw"]).to_pandas()
    by_task = {k: sorted(zip(g.ts.tolist(), g.label.astype(float).tolist())) for k, g in raw.groupby("campaign_id")}
    train = _task_rows(tmp_path / "chunk", "train")
    cut = 0
    for key, chunks in train.items():
        n = len(by_task[key])
        assert len(chunks) == -(-n // size)  # the fewest chunks of at most `size` rows ...
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 1  # ... of nearly equal sizes
        assert sorted(r for c in chunks for r in c) == by_task[key]  # every row, once
        cut += len(chunks) > 1
    assert cut == mc["chunked_tasks"]["tasks"] > 0
    assert mc["chunked_tasks"]["into"] == sum(len(c) for c in train.values() if len(c) > 1)
    assert mc["splits"]["train"]["tasks"] == sum(map(len, train.values()))
    # held-out tasks are what the drop policy writes, the same tasks with the same rows
    for split in ("eval", "val"):
        assert _task_rows(tmp_path / "chunk", split) == _task_rows(tmp_path / "drop", split)
    assert mc["input_tasks"] == md["input_tasks"] == raw.campaign_id.nunique()
    assert not md["chunked_tasks"]["tasks"]
    # every training row is written; what is dropped is held-out rows only
    held_out = sum(mc["rows"]["written"][s] for s in ("eval", "val"))
    assert mc["rows"]["written"]["train"] + held_out + sum(mc["rows"]["dropped"].values()) == len(raw)
    assert mc["rows"]["written"]["train"] == sum(len(by_task[k]) for k in train)
