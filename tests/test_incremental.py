"""Incremental training on daily partitions: train.continue_from (gmeta train --continue-from)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gmeta.checkpoint import load_unsharded, read_meta
from gmeta.config import load_config
from tests.conftest import DEBUG_CONFIG
from tests.support.cli import run_gmeta
from tests.support.days import DAYS, prepare_days
from tests.support.steps import surviving_records, torchrun_harness

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def days(debug_data, tmp_path_factory):
    return prepare_days(load_config(DEBUG_CONFIG), debug_data["raw"], tmp_path_factory.mktemp("days"))


@pytest.fixture(scope="module")
def day1(days, tmp_path_factory) -> Path:
    """A model trained on the first day only (one process)."""
    out = tmp_path_factory.mktemp("day1")
    p = run_gmeta(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", f"data.shards_dir={days['root']}",
                   f"data.partitions={DAYS[0]}", f"train.output_dir={out}", "train.max_steps=8",
                   "train.eval_at_end=false", "tracking.enabled=false"], cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    return out / "checkpoint"


def _day2(days, day1, out: Path, *more: str) -> list[str]:
    return [f"data.shards_dir={days['root']}", f"data.partitions={DAYS[1]}", f"train.output_dir={out}",
            f"train.continue_from={day1}", "train.max_steps=10", "train.checkpoint_every_steps=4", *more]


def test_continuing_a_day_with_a_kill_in_between_ends_with_the_same_parameters(days, day1, tmp_path, monkeypatch):
    from tests.support.multiprocess import run_gmeta_ranks

    (tmp_path / "rec-whole").mkdir()
    with monkeypatch.context() as m:  # the next day, uninterrupted, on 2 processes (the first day: 1)
        m.setenv("GMETA_TEST_RECORD", str(tmp_path / "rec-whole"))
        run_gmeta_ranks(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "2", "--resume", "auto",
                         "tracking.enabled=false", "train.eval_at_end=false",
                         *_day2(days, day1, tmp_path / "whole")], 2, cwd=ROOT, harness="tests.support.fault_harness")
    # the same, rank 1 killed after step 6: the restart resumes its own checkpoint of step 4
    torchrun_harness(tmp_path / "killed", tmp_path / "rec-killed", days["root"], "0:6:1",
                     _day2(days, day1, tmp_path / "killed")[1:], max_restarts=1)
    resumed = {p.name.split("-")[0]: int(p.read_text()) for p in (tmp_path / "rec-killed").glob("*.resume")}
    assert resumed == {"attempt1": 4}, resumed
    whole, killed = surviving_records(tmp_path / "rec-whole"), surviving_records(tmp_path / "rec-killed")
    assert sorted(whole) == list(range(1, 11))
    assert {s: {r: x["task_ids"] for r, x in v.items()} for s, v in killed.items()} == \
        {s: {r: x["task_ids"] for r, x in v.items()} for s, v in whole.items()}
    a, _, meta_a = load_unsharded(tmp_path / "whole" / "checkpoint")
    b, _, meta_b = load_unsharded(tmp_path / "killed" / "checkpoint")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)
    # both record what they continue and what they trained on
    before = read_meta(day1)
    for meta in (meta_a, meta_b):
        assert meta["partitions"] == [DAYS[1]] and meta["step"] == 10
        assert [x["checkpoint"] for x in meta["lineage"]] == [str(day1.resolve())]
        assert meta["lineage"][0]["partitions"] == [DAYS[0]] == before["partitions"]
        assert meta["lineage"][0]["step"] == 8


def test_continuing_carries_the_optimizer_states(days, day1, tmp_path):
    """The first step of the continued run equals the next step of day one's run on the same
    batch: Adam's moments and the tables' Adagrad state carried, its step counter too (Adam's
    bias correction), the rates this config's."""
    cont = tmp_path / "cont"
    p = run_gmeta(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", "train.eval_at_end=false",
                   "tracking.enabled=false", *_day2(days, day1, cont)[:-2], "train.max_steps=1"], cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "continuing the model of" in p.stderr
    fresh = tmp_path / "fresh"
    p = run_gmeta(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", "train.eval_at_end=false",
                   "tracking.enabled=false", f"data.shards_dir={days['root']}", f"data.partitions={DAYS[1]}",
                   f"train.output_dir={fresh}", f"train.init_from={day1}", "train.max_steps=1"], cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    start, _, _ = load_unsharded(day1)
    c, _, _ = load_unsharded(cont / "checkpoint")
    f, _, _ = load_unsharded(fresh / "checkpoint")
    s0, sc, sf = start.state_dict(), c.state_dict(), f.state_dict()
    moved_c = {k: float((sc[k] - s0[k]).abs().max()) for k in s0 if s0[k].is_floating_point()}
    moved_f = {k: float((sf[k] - s0[k]).abs().max()) for k in s0 if s0[k].is_floating_point()}
    # fresh Adam's first step moves every weight by about lr; with day one's moments it moves
    # by another amount: the same batch, another update
    assert any(abs(moved_c[k] - moved_f[k]) > 1e-4 for k in moved_c if "sparse" not in k), (moved_c, moved_f)


def test_continue_from_is_checked(days, day1, tmp_path):
    base = ["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", "tracking.enabled=false",
            f"data.shards_dir={days['root']}", f"data.partitions={DAYS[1]}", f"train.output_dir={tmp_path / 'x'}"]
    p = run_gmeta([*base, f"train.continue_from={day1}", f"train.init_from={day1}"], cwd=ROOT)
    assert p.returncode == 2 and "train.continue_from" in p.stderr and "not both" in p.stderr
    p = run_gmeta(["train", "--continue-from", str(day1), *base[1:], "model.embedding_dim=4"], cwd=ROOT)
    assert p.returncode == 2 and "train.continue_from" in p.stderr and "model.embedding_dim" in p.stderr
    p = run_gmeta(["train", "--continue-from", str(tmp_path / "nothing"), *base[1:]], cwd=ROOT)
    assert p.returncode == 2 and "train.continue_from" in p.stderr


@pytest.fixture(scope="module")
def day2(days, day1, tmp_path_factory) -> Path:
    """The first day's model continued on the second day (one process)."""
    out = tmp_path_factory.mktemp("day2")
    p = run_gmeta(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", "train.eval_at_end=false",
                   "tracking.enabled=false", *_day2(days, day1, out)[:-1]], cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    return out / "checkpoint"


def test_next_day_evaluation_scores_the_new_tasks_of_each_next_day(days, day1, day2, tmp_path):
    import json

    import mlflow
    import pyarrow.parquet as pq

    from gmeta.io import partitions
    from gmeta.io.reader import task_keys

    root = days["root"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = run_gmeta(["evaluate", "--next-day", str(day2), str(day1), "--out", str(tmp_path / "series"),
                   "--tracking-uri", uri], cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    series = json.loads((tmp_path / "series" / "next_day.json").read_text())
    rows = series["days"]
    assert [(r["trained_through"], r["day"]) for r in rows] == [(DAYS[0], DAYS[1]), (DAYS[1], DAYS[2])]
    for r, before in zip(rows, (DAYS[:1], DAYS[:2])):
        # new: a campaign of that day with no row in any earlier day's raw logs (read apart from prepare)
        seen = {int(k) for d in before for k in pq.read_table(days["raw"][d], columns=["campaign_id"])
                .column("campaign_id").to_pylist()}
        keys = {**task_keys(root, "train", r["day"]), **task_keys(root, "eval", r["day"])}
        new = {i for i, k in keys.items() if int(k) not in seen}
        assert 0 < len(new) < len(keys)
        assert r["new_tasks"] == len(new)
        assert set(partitions.new_task_ids(root, r["day"], ("train", "eval")).tolist()) == new
        assert r["tasks"] == len(new)  # every new task scored, no other (each has query rows)
        assert 0 < r["auc"] < 1 and 0 < r["gauc"] < 1 and r["logloss"] > 0
    md = (tmp_path / "series" / "next_day.md").read_text()
    assert DAYS[1] in md and DAYS[2] in md and (tmp_path / "series" / "next_day.png").is_file()
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(series["mlflow_run_id"])
    assert [m.value for m in client.get_metric_history(parent.info.run_id, "next_day/auc")] == \
        [r["auc"] for r in rows]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.params["day"] for c in children) == [DAYS[1], DAYS[2]]
    # the last day has no next day yet: its model gets a row saying so, nothing scored
    p = run_gmeta(["evaluate", "--next-day", str(day2), "--out", str(tmp_path / "none"), "--no-tracking",
                   f"data.shards_dir={root}"], cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]


MANAGED = ["features.sparse.ad_id.ids=managed", "train.pipeline=false"]


@pytest.fixture(scope="module")
def managed_days(debug_data, tmp_path_factory):
    return prepare_days(load_config(DEBUG_CONFIG, MANAGED), debug_data["raw"], tmp_path_factory.mktemp("mdays"))


def test_managed_ids_not_seen_for_d_days_lose_their_slots(managed_days, days, tmp_path):
    """A continued run with evict_after_days 1 frees the slots of the ad ids of the first
    day that the second does not show; without it, they keep them."""
    from gmeta.io.id_counts import read_all_ids
    from gmeta.io.partitions import partition_dir

    root = managed_days["root"]
    base = ["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", "train.eval_at_end=false",
            "tracking.enabled=false", f"data.shards_dir={root}", *MANAGED]
    p = run_gmeta([*base, f"data.partitions={DAYS[0]}", f"train.output_dir={tmp_path / 'd1'}", "train.max_steps=6"],
                  cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]

    def live(ckpt):
        model, _, _ = load_unsharded(ckpt)
        raw = model.managed.module_of("ad_id")._mch_sorted_raw_ids
        return set(raw[raw != torch.iinfo(torch.int64).max].tolist())

    first = live(tmp_path / "d1" / "checkpoint")
    day2 = set(read_all_ids(partition_dir(root, DAYS[1]), "ad_id").tolist())
    gone = first - day2
    assert gone and first & day2  # campaigns that ended, and ones that run on
    runs = {}
    for d in (0, 1):
        out = tmp_path / f"d2-{d}"
        p = run_gmeta([*base, f"data.partitions={DAYS[1]}", f"train.output_dir={out}", "train.max_steps=1",
                       f"train.continue_from={tmp_path / 'd1' / 'checkpoint'}",
                       f"features.sparse.ad_id.evict_after_days={d}"], cwd=ROOT)
        assert p.returncode == 0, p.stderr[-4000:]
        runs[d] = (live(out / "checkpoint"), p.stderr)
    kept, _ = runs[0]
    assert gone <= kept  # no eviction by age: the first day's ids hold their slots
    after, log = runs[1]
    assert not after & gone and after <= day2  # every live id is one the second day shows
    assert f"{len(gone)} of {len(first)} ids evicted, not seen in the last 1 partition(s)" in log
    # with hashed ids the key is refused: nothing to evict, a row is shared by whatever hashes to it
    p = run_gmeta([*base[:-3], f"data.shards_dir={days['root']}", f"data.partitions={DAYS[1]}",
                   f"train.output_dir={tmp_path / 'h'}",
                   "features.sparse.ad_id.evict_after_days=1"], cwd=ROOT)
    assert p.returncode == 2 and "evict_after_days" in p.stderr and "ids: managed only" in p.stderr
