"""The task shard reader: batches, epochs, resumption, bad tasks, both formats."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gmeta.config import load_config
from gmeta.io.errors import PrepareError
from gmeta.io.manifest import load_manifest
from gmeta.io.prepare import prepare
from gmeta.io.reader import ShardError, TaskReader


def test_reader_batches_layout(debug_data):
    reader = TaskReader(debug_data["shards"], "train", 4, seed=0)
    batch = next(iter(reader))
    assert batch.num_tasks == 4
    n = batch.num_support + batch.num_query
    assert batch.num_rows == n == batch.dense.shape[0] and batch.dense.shape[1] == 3
    assert batch.sparse.stride() == n
    assert batch.sparse.keys()[:2] == ["user_id", "ad_id"]
    lengths = batch.sparse.to_dict()["user_id"].lengths()
    assert bool((lengths == 1).all())
    assert set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    assert batch.true_prob is not None and batch.true_prob.shape == batch.labels.shape


@pytest.mark.parametrize("workers", [0, 2])
def test_reader_epoch_reads_each_task_once_across_ranks_and_workers(debug_data, workers):
    n, world = 8, 2
    seen = []
    steps = set()
    for rank in range(world):
        r = TaskReader(debug_data["shards"], "train", n, rank=rank, world_size=world, num_workers=workers, seed=3)
        r.set_epoch(1)
        batches = list(r)
        steps.add(len(batches))
        assert len(batches) == len(r) and all(b.num_tasks == n for b in batches)
        seen += [i for b in batches for i in b.task_ids.tolist()]
    total = load_manifest(debug_data["shards"])["splits"]["train"]["tasks"]
    assert len(steps) == 1  # every rank runs the same number of steps
    assert len(seen) == len(set(seen))  # no task twice
    assert len(seen) + r.dropped_tasks == total
    assert r.dropped_tasks < world * max(1, workers) * n  # only batch tails are left out
    # another epoch reshuffles
    r0 = TaskReader(debug_data["shards"], "train", n, rank=0, world_size=world, num_workers=workers, seed=3)
    assert next(iter(r0)).task_ids.tolist() != seen[:n]


@pytest.mark.parametrize("workers", [0, 2])
def test_reader_resumes_exactly_mid_epoch(debug_data, workers):
    kw = dict(num_workers=workers, seed=11, shuffle_buffer=40)
    full = TaskReader(debug_data["shards"], "train", 6, **kw)
    full.set_epoch(2)
    want = [b.task_ids.tolist() for b in full]
    part = TaskReader(debug_data["shards"], "train", 6, **kw)
    part.set_epoch(2)
    got = []
    for i, b in enumerate(part):
        got.append(b.task_ids.tolist())
        if i == 6:
            break
    state = part.state_dict()
    again = TaskReader(debug_data["shards"], "train", 6, **kw)
    again.load_state_dict(state)
    got += [b.task_ids.tolist() for b in again]
    assert sorted(sum(got, [])) == sorted(sum(want, []))  # every task once, none lost or repeated
    assert got == want  # and in the same order as an uninterrupted epoch
    with pytest.raises(ValueError, match="num_workers"):
        TaskReader(debug_data["shards"], "train", 6, num_workers=workers + 1, seed=11).load_state_dict(state)


def test_reader_without_drop_last_keeps_every_task(debug_data):
    r = TaskReader(debug_data["shards"], "eval", 50, shuffle=False, drop_last=False)
    ids = [i for b in r for i in b.task_ids.tolist()]
    assert len(ids) == load_manifest(debug_data["shards"])["splits"]["eval"]["tasks"] == len(set(ids))


def test_too_few_tasks_for_batch_is_an_error(debug_data):
    with pytest.raises(ShardError, match="meta.tasks_per_batch"):
        TaskReader(debug_data["shards"], "eval", 10_000, world_size=2)


def _as_prepared(shards, path) -> None:
    """Record a rewritten shard's sha256 in the manifest, as if prepare had written it so."""
    import json

    from gmeta.io.reader import file_sha256

    m = load_manifest(shards)
    for f in m["splits"]["train"]["files"]:
        if shards / f["path"] == path:
            f["sha256"] = file_sha256(path)
    (shards / "manifest.json").write_text(json.dumps(m))


def _tamper(shards, tmp_path, edit):
    """Copy the shard dir; rewrite the first train shard's records through ``edit`` (bad
    records as prepare might have written them: the manifest's sha256 follows)."""
    out = tmp_path / "tampered"
    shutil.copytree(shards, out)
    path = out / "train" / "part-00000.parquet"
    meta = pq.ParquetFile(path).metadata
    table = pq.read_table(path)
    recs = table.to_pylist()
    edit(recs)
    pq.write_table(pa.Table.from_pylist(recs, schema=table.schema), path,
                   row_group_size=meta.row_group(0).num_rows)
    _as_prepared(out, path)
    return out


def _break_two_tasks(recs):
    recs[3]["support"]["dense"][0][1] = float("nan")
    recs[5]["query"]["user_id"][1] = 10**6  # table has 2000 rows


def test_bad_task_is_an_error_naming_file_row_group_and_task(debug_data, tmp_path):
    shards = _tamper(debug_data["shards"], tmp_path, _break_two_tasks)
    r = TaskReader(shards, "train", 4, shuffle=False)
    with pytest.raises(ShardError) as e:
        list(r)
    msg = str(e.value)
    assert "part-00000.parquet (row group 0)" in msg and "task 3" in msg and "NaN" in msg
    assert "2 bad task(s)" in msg


@pytest.mark.parametrize("edit, reason", [
    (lambda r: r[2]["query"].update({k: [] for k in r[2]["query"]}), r"task 2 \(task_id .*\): empty query set"),
    (lambda r: r[2]["support"].update({k: [] for k in r[2]["support"]}), r"task 2 \(task_id .*\): empty support set"),
    (lambda r: r[2]["query"]["label"].__setitem__(0, float("inf")), "task 2 .*query.label: not 0/1"),
    (lambda r: r[2]["support"]["ad_id"].__setitem__(0, -1), r"task 2 .*support.ad_id: id outside \[0, "),
    (lambda r: r[2]["support"]["dense"][0].__setitem__(0, float("-inf")), "task 2 .*support.dense: NaN or inf"),
])
def test_each_kind_of_bad_task_is_named(debug_data, tmp_path, edit, reason):
    shards = _tamper(debug_data["shards"], tmp_path, edit)
    with pytest.raises(ShardError, match=reason):
        list(TaskReader(shards, "train", 4, shuffle=False))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_tasks_skipped_and_counted(debug_data, tmp_path, workers):
    shards = _tamper(debug_data["shards"], tmp_path, _break_two_tasks)
    bad_ids = {r["task_id"] for i, r in enumerate(pq.read_table(shards / "train/part-00000.parquet").to_pylist())
               if i in (3, 5)}
    r = TaskReader(shards, "train", 4, shuffle=False, drop_last=False, num_workers=workers, on_bad_task="skip")
    seen = [i for b in r for i in b.task_ids.tolist()]
    total = load_manifest(shards)["splits"]["train"]["tasks"]
    assert r.skipped_tasks == 2 and len(seen) == total - 2 and not bad_ids & set(seen)


def test_records_not_matching_manifest_schema(debug_data, tmp_path):
    def drop_field(recs):
        for rec in recs:
            del rec["support"]["site_id"]

    out = tmp_path / "noschema"
    shutil.copytree(debug_data["shards"], out)
    path = out / "train" / "part-00000.parquet"
    recs = pq.read_table(path).to_pylist()
    drop_field(recs)
    pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=64)
    _as_prepared(out, path)
    with pytest.raises(ShardError, match="part-00000.parquet.*do not match the manifest schema.*site_id"):
        list(TaskReader(out, "train", 4, shuffle=False))


def test_missing_shard_file_named(debug_data, tmp_path):
    out = tmp_path / "missing"
    shutil.copytree(debug_data["shards"], out)
    (out / "train" / "part-00001.parquet").unlink()
    with pytest.raises(ShardError, match="part-00001.parquet: task shard listed in the manifest is missing"):
        list(TaskReader(out, "train", 4, shuffle=False))


def _same_batch(a, b):
    assert torch.equal(a.task_ids, b.task_ids)
    assert a.sparse.keys() == b.sparse.keys()
    assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
    for name in ("dense", "labels", "support_offsets", "query_offsets", "true_prob"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.fixture(scope="module")
def wds_shards(debug_data, debug_config_path, tmp_path_factory):
    cfg = load_config(debug_config_path, ["data.format=webdataset"])
    out = tmp_path_factory.mktemp("wds")
    m = prepare(cfg, debug_data["raw"], out)
    assert m["format"] == "webdataset" and all(f["path"].endswith(".tar") for f in m["splits"]["train"]["files"])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_parquet_and_webdataset_give_identical_batches(debug_data, wds_shards, workers):
    kw = dict(num_workers=workers, seed=4, shuffle_buffer=30, rank=1, world_size=2)
    pq_batches = list(TaskReader(debug_data["shards"], "train", 5, **kw))
    wds_batches = list(TaskReader(wds_shards, "train", 5, **kw))
    assert len(pq_batches) == len(wds_batches) > 10
    for a, b in zip(pq_batches, wds_batches):
        _same_batch(a, b)


def test_corrupt_tar_names_file(wds_shards, tmp_path):
    out = tmp_path / "w"
    shutil.copytree(wds_shards, out)
    m = load_manifest(out)
    first = out / m["splits"]["train"]["files"][0]["path"]
    first.write_bytes(first.read_bytes()[:3000])
    with pytest.raises(ShardError, match=first.name):
        list(TaskReader(out, "train", 4, shuffle=False))


def test_shards_prepared_with_other_features_are_refused(debug_data, debug_config_path):
    from gmeta.io.manifest import check_manifest_matches

    m = load_manifest(debug_data["shards"])
    check_manifest_matches(m, load_config(debug_config_path), "manifest.json")  # same config: fine
    other = load_config(debug_config_path, ["features.dense=[bid_price, user_activity]"])
    with pytest.raises(PrepareError, match=r'features.dense: \["bid_price", "user_activity", "ad_position"\] '
                                           r'\(manifest\) vs \["bid_price", "user_activity"\] \(config\)'):
        check_manifest_matches(m, other, "manifest.json")


def test_max_tasks_limits_the_epoch(debug_data):
    r = TaskReader(debug_data["shards"], "eval", 7, shuffle=False, drop_last=False, max_tasks=30)
    ids = [i for b in r for i in b.task_ids.tolist()]
    full = [i for b in TaskReader(debug_data["shards"], "eval", 7, shuffle=False, drop_last=False)
            for i in b.task_ids.tolist()]
    assert ids == full[:30]


def test_the_parents_garbage_is_collected_before_the_workers_fork(debug_data):
    """Reader workers are forked: garbage the parent has not collected yet would be collected
    in a worker (a cycle holding a destroyed gloo process group hung one there, its
    destructor waiting for threads only the parent has). The reader collects it first, in
    the parent, where the finaliser runs."""
    import gc
    import os

    ran: list[int] = []

    class Cycle:
        def __del__(self) -> None:
            ran.append(os.getpid())

    gc.disable()  # (the parent would otherwise collect it whenever it likes)
    try:
        c = Cycle()
        c.self = c
        del c
        assert ran == []
        batches = iter(TaskReader(debug_data["shards"], "train", 4, shuffle=False, num_workers=1))
        next(batches)
        assert ran == [os.getpid()]
    finally:
        gc.enable()
