"""Partitioned data sets: gmeta prepare --partition, the index, selections and merged reads."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from gmeta.config import ConfigError, load_config
from gmeta.io import partitions as parts
from gmeta.io.errors import PrepareError
from gmeta.io.id_counts import train_counts
from gmeta.io.manifest import content_hash, load_manifest
from gmeta.io.prepare import prepare
from gmeta.io.reader import TaskReader
from tests.conftest import DEBUG_CONFIG
from tests.support.days import DAYS, prepare_days


@pytest.fixture(scope="module")
def days(debug_data, tmp_path_factory):
    return prepare_days(load_config(DEBUG_CONFIG), debug_data["raw"], tmp_path_factory.mktemp("days"))


def _files(root, name):
    d = parts.partition_dir(root, name)
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in d.rglob("*") if p.is_file()}


def _train_ids(root, chosen, feature):
    """Every occurrence of ``feature`` in the train split's records, read from the shards."""
    out = []
    for name in chosen:
        d = parts.partition_dir(root, name)
        m = json.loads((d / "manifest.json").read_text())
        for f in m["splits"]["train"]["files"]:
            t = pq.read_table(d / f["path"], columns=["support", "query"])
            for side in ("support", "query"):
                ids = pc.list_flatten(pc.struct_field(t.column(side), feature))
                if pa.types.is_list(ids.type):  # multi-hot: a list per row
                    ids = pc.list_flatten(ids)
                out.append(ids.to_numpy())
    return np.concatenate(out)


def test_the_index_lists_every_partition_and_what_is_new(days):
    root = days["root"]
    index = json.loads((root / parts.INDEX).read_text())
    assert [e["name"] for e in index["partitions"]] == list(DAYS)
    first, second = index["partitions"][0], index["partitions"][1]
    # the first day's tasks and ids are all new; on later days, campaigns running on from before are not
    assert first["new_tasks"] == sum(first["tasks"].values())
    assert all(v["new"] == v["distinct"] for v in first["ids"].values())
    assert 0 < second["new_tasks"] < sum(second["tasks"].values())
    assert second["ids"]["hour"]["new"] == 0 and second["ids"]["ad_id"]["new"] > 0
    earlier = parts.task_ids(root, DAYS[0])
    new = parts.new_task_ids(root, DAYS[1])
    assert len(new) == second["new_tasks"]
    assert not np.isin(new, earlier).any()
    # a task trained on the day before is not new; nor is one whose rows the day before were too few for a task
    assert np.isin(np.setdiff1d(parts.task_ids(root, DAYS[1]), earlier), new).sum() < len(new) + 1
    assert len(np.setdiff1d(parts.task_ids(root, DAYS[1]), new)) >= np.isin(parts.task_ids(root, DAYS[1]),
                                                                          earlier).sum()


def test_a_selection_reads_its_partitions_and_their_counts_merge_exactly(days):
    root = days["root"]
    manifests = {n: load_manifest(parts.partition_dir(root, n)) for n in DAYS}
    merged = load_manifest(root, "last:2")
    assert [p["name"] for p in merged["selected_partitions"]] == list(DAYS[1:])
    for split in ("train", "eval"):
        assert merged["splits"][split]["tasks"] == sum(manifests[n]["splits"][split]["tasks"] for n in DAYS[1:])
    got = []
    for batch in TaskReader(root, "train", 8, shuffle=False, drop_last=False, num_workers=0, partitions="last:2"):
        got += batch.task_ids.tolist()
    want = np.concatenate([parts.task_ids(root, n, ("train",)) for n in DAYS[1:]])
    assert sorted(got) == sorted(want.tolist())
    for feature in ("ad_id", "interests"):  # a multi-hot feature too
        ids, counts = train_counts(root, feature, "all")
        occ = _train_ids(root, DAYS, feature)
        u, c = np.unique(occ, return_counts=True)
        assert np.array_equal(ids, u) and np.array_equal(counts, c)
    # the selection's content hash names its partitions and their contents
    assert content_hash(merged) != content_hash(load_manifest(root, "all"))
    assert content_hash(merged) == content_hash(load_manifest(root, f"{DAYS[1]}..{DAYS[2]}"))


def test_re_preparing_a_partition_replaces_only_itself(days, tmp_path):
    root, cfg = days["root"], days["cfg"]
    before = {n: _files(root, n) for n in DAYS}
    hashes = {n: content_hash(load_manifest(parts.partition_dir(root, n))) for n in DAYS}
    # a prepare that fails (a column missing) leaves the partition, and the data set, as they were
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pq.read_table(days["raw"][DAYS[1]]).drop(["ad_id"]), bad / "part-00000.parquet")
    index = (root / parts.INDEX).read_text()
    with pytest.raises(PrepareError, match="ad_id"):
        prepare(cfg, bad, root, partition=DAYS[1])
    assert {n: _files(root, n) for n in DAYS} == before and (root / parts.INDEX).read_text() == index
    assert not parts.staging_dir(root, DAYS[1]).exists()
    # re-prepared from fewer rows: only that partition changes
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    t = pq.read_table(days["raw"][DAYS[1]])
    pq.write_table(t.slice(0, t.num_rows // 2), fewer / "part-00000.parquet")
    prepare(cfg, fewer, root, partition=DAYS[1])
    after = {n: _files(root, n) for n in DAYS}
    assert after[DAYS[0]] == before[DAYS[0]] and after[DAYS[2]] == before[DAYS[2]]
    assert content_hash(load_manifest(parts.partition_dir(root, DAYS[1]))) != hashes[DAYS[1]]
    assert content_hash(load_manifest(parts.partition_dir(root, DAYS[2]))) == hashes[DAYS[2]]
    index = json.loads((root / parts.INDEX).read_text())
    assert index["partitions"][1]["input_rows"] == t.num_rows // 2
    # and back, for the other tests of the module
    prepare(cfg, days["raw"][DAYS[1]], root, partition=DAYS[1])
    assert content_hash(load_manifest(parts.partition_dir(root, DAYS[1]))) == hashes[DAYS[1]]


def test_a_swap_stopped_half_way_is_undone(days, tmp_path):
    root = days["root"]
    target = parts.partition_dir(root, DAYS[2])
    before = _files(root, DAYS[2])
    os.replace(target, root / parts.DIR / f".old-{DAYS[2]}")  # the first rename of a swap, then a crash
    assert DAYS[2] not in parts.names(root)
    parts.recover(root, DAYS[2])
    assert _files(root, DAYS[2]) == before


def test_selections_and_layouts_are_checked(days, tmp_path):
    root, cfg = days["root"], days["cfg"]
    with pytest.raises(PrepareError, match="set data.partitions"):
        load_manifest(root)
    with pytest.raises(PrepareError, match="no partition"):
        load_manifest(root, "2026-11-30..2026-12-02")
    with pytest.raises(PrepareError, match="asks for 4 partitions"):
        load_manifest(root, "last:4")
    assert parts.select(root, "..2026-12-02") == list(DAYS[:2])
    assert parts.select(root, "2026-12-03,2026-12-01") == [DAYS[0], DAYS[2]]
    with pytest.raises(PrepareError, match="holds a partitioned data set"):
        prepare(cfg, days["raw"][DAYS[0]], root)
    with pytest.raises(PrepareError, match="--partition"):
        prepare(cfg, days["raw"][DAYS[0]], root, partition="../x")
    plain = tmp_path / "plain"
    prepare(cfg, days["raw"][DAYS[0]], plain)
    with pytest.raises(PrepareError, match="not partitioned"):
        load_manifest(plain, "all")
    with pytest.raises(PrepareError, match="unpartitioned data set"):
        prepare(cfg, days["raw"][DAYS[0]], plain, partition=DAYS[0])
    for bad in ("last:0", "last:x", "..", "a b"):
        with pytest.raises(ConfigError, match="data.partitions"):
            load_config(DEBUG_CONFIG, [f"data.partitions={bad}"])


def test_partition_dirs_prepares_each_day_directory_once(days, tmp_path):
    from tests.support.cli import run_gmeta

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in DAYS[:2]:
        os.symlink(days["raw"][name], raw / f"dt={name}", target_is_directory=True)
    out = tmp_path / "shards"
    args = ["prepare", "--config", str(DEBUG_CONFIG), "--input", str(raw), "--out", str(out), "--partition-dirs", "dt"]
    p = run_gmeta(args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert parts.names(out) == list(DAYS[:2])
    for name in DAYS[:2]:  # the same partition as prepared one by one
        assert content_hash(load_manifest(parts.partition_dir(out, name))) == \
            content_hash(load_manifest(parts.partition_dir(days["root"], name)))
    before = _files(out, DAYS[0])
    os.symlink(days["raw"][DAYS[2]], raw / f"dt={DAYS[2]}", target_is_directory=True)
    p = run_gmeta([*args, "--new-only"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 partition(s) already in" in p.stdout and parts.names(out) == list(DAYS)
    assert _files(out, DAYS[0]) == before  # left as it was
    p = run_gmeta([*args[:-1], "day"])
    assert p.returncode == 2 and "no day=VALUE directory" in p.stderr
