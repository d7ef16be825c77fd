"""Managed-collision id tables (``features.sparse[].ids: managed``): config errors, shards
of 63-bit ids, admission in the training step, eviction resets, inference routing."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gmeta.config import ConfigError, load_config
from gmeta.io.batch import task_batch
from gmeta.io.features import MANAGED_HASH_SIZE, hash_ids
from gmeta.io.reader import TaskReader
from gmeta.layout import layout_of
from gmeta.models.dlrm import build_model
from tests.conftest import DEBUG_CONFIG

# ad_id: many ids; hour, interests: small vocabularies with one slot each and a miss row
MANAGED = ["train.pipeline=false", "features.sparse.ad_id.ids=managed", "features.sparse.hour.ids=managed",
           "features.sparse.hour.num_embeddings=25", "features.sparse.interests.ids=managed",
           "features.sparse.interests.num_embeddings=51"]


def managed_cfg(*extra: str):
    return load_config(DEBUG_CONFIG, MANAGED + list(extra))


@pytest.fixture(scope="session")
def managed_data(debug_data, tmp_path_factory) -> Path:
    """The debug data prepared with managed ad_id, hour and interests."""
    from gmeta.io.prepare import prepare

    out = tmp_path_factory.mktemp("managed") / "shards"
    prepare(managed_cfg(), debug_data["raw"], out)
    return out


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides, key", [
    (["features.sparse.ad_id.min_count=2"], "features.sparse[1].ids"),
    (["features.sparse.ad_id.holdout_share=0.1"], "features.sparse[1].ids"),
    (["train.pipeline=true"], "features.sparse[1].ids"),
    (["features.sparse.ad_id.num_embeddings=1"], "features.sparse[1].num_embeddings"),
    (["features.sparse.ad_id.eviction_interval=0"], "features.sparse[1].eviction_interval"),
    (["features.sparse.user_id.eviction_policy=lru"], "features.sparse[0].eviction_policy"),
    (["features.sparse.user_id.unknown_ids=zero"], "features.sparse[0].unknown_ids"),
])
def test_invalid_managed_settings_are_config_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        managed_cfg(*overrides)


def test_managed_with_min_count_names_both_keys():
    with pytest.raises(ConfigError) as e:
        managed_cfg("features.sparse.ad_id.min_count=2")
    assert "min_count" in str(e.value) and "holdout_share" in str(e.value)


def test_an_unknown_eviction_policy_is_refused():
    with pytest.raises(ConfigError, match="eviction_policy"):
        managed_cfg("features.sparse.ad_id.eviction_policy=fifo")


# ------------------------------------------------------------------ shards


def test_shards_hold_63_bit_hashes_of_managed_ids_and_the_manifest_says_so(managed_data, debug_data):
    m = json.loads((managed_data / "manifest.json").read_text())
    kinds = {s["name"]: s["ids"] for s in m["schema"]["sparse"]}
    managed = {"ad_id", "hour", "interests"}
    names = [s.name for s in load_config(DEBUG_CONFIG).features.sparse]
    assert kinds == {n: "managed" if n in managed else "hash" for n in names}
    assert managed < set(kinds) and "user_id" in kinds
    rec = pq.read_table(managed_data / m["splits"]["train"]["files"][0]["path"]).slice(0, 1).to_pylist()[0]
    hours = np.array(rec["support"]["hour"], dtype=np.int64)
    assert hours.max() >= 2 ** 40  # far beyond any table size: hashes, not rows
    want = set(hash_ids(np.arange(24), "hour", 25, m["id_hash"], "managed").tolist())
    assert set(hours.tolist()) <= want and max(want) < MANAGED_HASH_SIZE
    assert rec["support"]["user_id"][0] < 2000  # hashed features are table rows as before
    card = m["cardinality"]
    assert card["hour"]["train_distinct"] == 24 and card["hour"]["slots"] == 24 and card["hour"]["fits"]
    assert card["interests"]["train_distinct"] == 50 and card["interests"]["fits"]
    ids = pq.read_table(managed_data / "id_counts" / "ad_id.parquet").to_pydict()
    assert card["ad_id"]["train_distinct"] == sum(1 for c in ids["train"] if c)


def test_report_of_prepare_gives_distinct_training_ids_against_slots(managed_data):
    from gmeta.io.prepare import format_report

    text = format_report(json.loads((managed_data / "manifest.json").read_text()))
    assert "hour: managed, 24 distinct ids in the train split for 24 slots + 1 miss row: each its own row" in text


def test_shards_of_hashed_ids_do_not_pass_for_managed_ones(debug_data):
    from gmeta.io.errors import PrepareError
    from gmeta.io.manifest import check_manifest_matches

    m = json.loads((debug_data["shards"] / "manifest.json").read_text())
    with pytest.raises(PrepareError, match=r"features.sparse\[1\].ids \(ad_id\)"):
        check_manifest_matches(m, managed_cfg(), "manifest.json")


# ------------------------------------------------------------------ the model


def _admit_all(model, shards: Path, cfg) -> list:
    """Every training batch's lookup in a training step's mode (admitting)."""
    batches = list(TaskReader(shards, "train", cfg.meta.tasks_per_batch, seed=1))
    for b in batches:
        model.lookup(layout_of(b, model.pooling, 1))
    return batches


def test_small_vocabularies_are_exact_every_id_its_own_slot(managed_data):
    cfg = managed_cfg()
    model = build_model(cfg)
    batches = _admit_all(model, managed_data, cfg)
    for name, n in (("hour", 24), ("interests", 50)):
        ids = torch.cat([b.sparse[name].values() for b in batches]).unique()
        assert ids.numel() == n
        slots = model.managed.module_of(name).remap({name: _jt(ids)})[name].values()
        assert slots.unique().numel() == n  # no two ids on one row
        assert int(slots.max()) < n  # and none on the miss row (slot n)
    assert model.managed.live_ids()["hour"] == 24


def _jt(values: torch.Tensor):
    from torchrec.sparse.jagged_tensor import JaggedTensor

    return JaggedTensor(values=values, lengths=values.new_tensor([values.numel()]))


def _batch(cfg, ads: list[int], hour: int = 3):
    """Two tasks (campaigns 1, 2) of two support and one query row each, with these ads."""
    feats = [asdict(s) for s in cfg.features.sparse]
    n = len(ads)
    data = {"campaign_id": [1 + (i % 2) for i in range(n)], "q": [i >= n - 2 for i in range(n)],
            "label": [float(i % 2) for i in range(n)], "user_id": list(range(n)), "ad_id": ads,
            "advertiser_id": [7] * n, "hour": [hour] * n, "device": [1] * n, "site_id": [2] * n,
            "interests": [[1, 2]] * n, "ad_category": [1] * n, "creative_type": [1] * n, "landing_page": [1] * n,
            "bid_price": [1.0] * n, "user_activity": [0.5] * n, "ad_position": [1.0] * n}
    return task_batch(data, task="campaign_id", query="q", label="label", sparse=[s.name for s in cfg.features.sparse],
                      dense=list(cfg.features.dense), features=feats, id_hash=2)


def _slot(model, name: str, raw: int, id_hash: int = 2) -> int:
    h = torch.from_numpy(hash_ids(np.array([raw]), name, 0, id_hash, "managed"))
    return int(model.managed.module_of(name).remap({name: _jt(h)})[name].values()[0])


def test_a_new_id_gets_its_own_row_in_the_meta_step_starting_from_the_miss_row(managed_data):
    cfg = managed_cfg()
    model = build_model(cfg)
    w = model.sparse_arch.ec.embeddings["t_ad_id"].weight
    miss = cfg.features.sparse[1].num_embeddings - 1
    with torch.no_grad():
        w[miss] = 0.25  # the miss row's learned value, as a new id should start from it
    assert _slot(model, "ad_id", 900001) == miss  # not seen yet: the miss row
    batch = _batch(cfg, [900001, 900002, 900001, 900002, 900001, 900002])
    layout = layout_of(batch, model.pooling, 1)
    rows = model.lookup(layout)  # a training step's lookup: admits, then remaps
    a, b = _slot(model, "ad_id", 900001), _slot(model, "ad_id", 900002)
    assert a != b and miss not in (a, b)
    torch.testing.assert_close(w[a], torch.full_like(w[a], 0.25))  # reset to the miss row
    torch.testing.assert_close(w[b], torch.full_like(w[b], 0.25))
    # the looked-up rows of the two new ids are theirs: distinct looked-up slots, each adapting per task
    keys = [f["name"] for f in model.features]
    seg = layout.kjt(keys)["ad_id"].values()
    assert seg.numel() == 2 and rows.shape[0] == layout.unique_ids.numel()
    assert int(model.managed.evictions_ad_id) == 0  # slots filled, none taken from another id


def test_scoring_admits_nothing(managed_data):
    cfg = managed_cfg()
    model = build_model(cfg)
    batch = _batch(cfg, [5, 6, 5, 6, 5, 6])
    with torch.no_grad():  # scoring's lookups
        model.lookup(layout_of(batch, model.pooling, 1))
    model.eval()
    model.lookup(layout_of(batch, model.pooling, 1))
    assert model.managed.live_ids()["ad_id"] == 0


def test_a_larger_eviction_interval_admits_after_that_many_steps(managed_data):
    cfg = managed_cfg("features.sparse.ad_id.eviction_interval=2")
    model = build_model(cfg)
    miss = cfg.features.sparse[1].num_embeddings - 1
    model.lookup(layout_of(_batch(cfg, [11, 12, 11, 12, 11, 12]), model.pooling, 1))
    assert _slot(model, "ad_id", 11) == miss  # recorded, not yet admitted
    model.lookup(layout_of(_batch(cfg, [13, 14, 13, 14, 13, 14]), model.pooling, 1))
    assert len({_slot(model, "ad_id", r) for r in (11, 12, 13, 14)} - {miss}) == 4


def test_eviction_resets_the_slot_row_to_the_miss_row_and_counts_it():
    cfg = managed_cfg("features.sparse.ad_id.num_embeddings=3", "features.sparse.ad_id.eviction_policy=lru")
    model = build_model(cfg)
    w = model.sparse_arch.ec.embeddings["t_ad_id"].weight
    model.lookup(layout_of(_batch(cfg, [21, 22, 21, 22, 21, 22]), model.pooling, 1))
    old = {r: _slot(model, "ad_id", r) for r in (21, 22)}
    assert sorted(old.values()) == [0, 1]
    with torch.no_grad():
        w[0], w[1], w[2] = 1.0, 2.0, -3.0  # the evicted ids' learned rows; the miss row
    model.lookup(layout_of(_batch(cfg, [23, 24, 23, 24, 23, 24]), model.pooling, 1))
    new = {r: _slot(model, "ad_id", r) for r in (23, 24)}
    assert sorted(new.values()) == [0, 1] and _slot(model, "ad_id", 21) == 2  # evicted: the miss row
    torch.testing.assert_close(w[:2].detach(), torch.full((2, w.shape[1]), -3.0))
    assert int(model.managed.evictions_ad_id) == 2


def _remapped_values(model, batch, name: str) -> torch.Tensor:
    ids, _ = model.managed(model.default_rows(batch.sparse), admit=False)
    return ids[name].values()


@pytest.mark.parametrize("route", ["miss_row", "zero"])
def test_an_unknown_id_at_inference_goes_where_the_config_says(route):
    cfg = managed_cfg(f"features.sparse.ad_id.unknown_ids={route}")
    model = build_model(cfg)
    model.lookup(layout_of(_batch(cfg, [31, 32, 31, 32, 31, 32]), model.pooling, 1))
    model.eval()
    w = model.sparse_arch.ec.embeddings["t_ad_id"].weight
    with torch.no_grad():
        w[-1] = 5.0
    batch = _batch(cfg, [31, 777, 31, 777, 31, 777])  # 777: never admitted
    slots = _remapped_values(model, batch, "ad_id")
    miss = w.shape[0] - 1
    assert _slot(model, "ad_id", 777) == miss and _slot(model, "ad_id", 31) != miss
    assert int((slots == miss).sum()) == 3  # the three rows of 777
    layout = layout_of(batch, model.pooling, 1)
    with torch.no_grad():
        rows = model.lookup(layout)
    keys = [f["name"] for f in model.features]
    at = keys.index("ad_id")
    start = sum(layout.unique_per_key[:at])
    ad_rows = rows[start: start + layout.unique_per_key[at]]
    raw_order = layout.kjt(keys)["ad_id"].values()
    unknown = ad_rows[raw_order == torch.from_numpy(hash_ids(np.array([777]), "ad_id", 0, 2, "managed"))[0]]
    want = 0.0 if route == "zero" else 5.0
    torch.testing.assert_close(unknown, torch.full_like(unknown, want))
    # the plain forward routes alike: moving the miss row moves its score only with miss_row
    before = model(batch.sparse, batch.dense).detach()
    with torch.no_grad():
        w[-1] = -5.0
    after = model(batch.sparse, batch.dense).detach()
    assert torch.equal(before, after) == (route == "zero")


# ------------------------------------------------------------------ trained: checkpoint, scoring paths


@pytest.fixture(scope="session")
def managed_checkpoint(managed_data, tmp_path_factory) -> dict:
    """A MAML checkpoint trained briefly (one process) with managed features; its log."""
    from tests.support.cli import run_gmeta

    out = tmp_path_factory.mktemp("managed_run")
    proc = run_gmeta(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", *MANAGED,
                      f"data.shards_dir={managed_data}", f"train.output_dir={out}", "train.max_steps=12",
                      "train.log_every=4", "train.eval_at_end=false", "tracking.enabled=false"], cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"path": out / "checkpoint", "log": proc.stderr}


def test_training_logs_live_ids_evictions_and_the_miss_row_share(managed_checkpoint):
    from gmeta.checkpoint import load_unsharded

    lines = [ln for ln in managed_checkpoint["log"].splitlines() if "managed ids:" in ln]
    assert len(lines) == 3  # every log step (4, 8, 12)
    assert "hour 24 live, 0 evicted, 0.0% on the miss row" in lines[-1]
    model = load_unsharded(managed_checkpoint["path"])[0]
    live = model.managed.live_ids()
    assert live["hour"] == 24 and live["interests"] == 50 and 0 < live["ad_id"] < 1999
    assert f"ad_id {live['ad_id']} live" in lines[-1]  # the checkpoint holds the remapping trained


def test_evaluate_predict_pyfunc_and_serving_score_managed_ids_alike(managed_checkpoint, managed_data, debug_data,
                                                                      tmp_path):
    import mlflow
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from gmeta.checkpoint import load_unsharded
    from gmeta.evaluation.evaluate import run_evaluate
    from gmeta.inference.predict import run_predict
    from gmeta.inference.predict_raw import run_predict_raw
    from gmeta.inference.pyfunc import log_model
    from gmeta.inference.serving import assign_roles, score_rows

    ckpt = managed_checkpoint["path"]
    run_predict(ckpt, tmp_path / "p", shards_dir=str(managed_data), inner_steps=2, progress=False)
    pred = pq.read_table(tmp_path / "p").to_pandas()
    report = run_evaluate(ckpt, shards_dir=str(managed_data), tracking=False, out_dir=tmp_path / "eval",
                          inner_steps=2)
    assert report["maml_auc"] == pytest.approx(roc_auc_score(pred["label"], pred["score"]), abs=1e-6)

    model, cfg, meta = load_unsharded(ckpt)
    keys = list(pred["task_key"].unique()[:6])
    raw = pd.read_parquet(debug_data["raw"])
    rows = assign_roles(raw[raw["campaign_id"].isin(keys)].reset_index(drop=True), cfg)
    rows["label"] = rows["label"].astype(float)
    rows.loc[rows["role"] == "query", "label"] = np.nan
    served = score_rows(model, cfg, rows, 2, meta.get("input_columns"), id_hash=meta["id_hash"])["score"]

    pred = pred[pred["task_key"].isin(keys)].sort_values(["task_key", "row"])
    q = rows.assign(score=served)[rows["role"] == "query"].sort_values(["campaign_id", "ts"])
    q["row"] = q.groupby("campaign_id").cumcount()
    merged = q.merge(pred, left_on=["campaign_id", "row"], right_on=["task_key", "row"], suffixes=("", "_predict"))
    assert len(merged) == len(q) == len(pred) > 0
    np.testing.assert_allclose(merged["score"], merged["score_predict"], atol=1e-5)

    src = tmp_path / "logs"
    src.mkdir()
    rows.to_parquet(src / "a.parquet")
    run_predict_raw(ckpt, src, tmp_path / "raw_out", inner_steps=2, progress=False)
    got = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "raw_out").glob("part-*.parquet"))]) \
        .sort_values("input_row")
    np.testing.assert_allclose(got["score"].to_numpy(), served[rows["role"] == "query"].to_numpy(), atol=1e-5)

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("pyfunc", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp):
        uri = log_model(ckpt, cfg, model)
    out = mlflow.pyfunc.load_model(uri).predict(rows, params={"inner_steps": 2})
    np.testing.assert_allclose(out["score"][rows["role"] == "query"].to_numpy(),
                               served[rows["role"] == "query"].to_numpy(), atol=1e-5)
    assert model.managed.live_ids() == load_unsharded(ckpt)[0].managed.live_ids()  # scoring admitted nothing


def test_a_step_with_more_ids_than_the_first_admits_them_all():
    # torchrec sizes its history buffer from the first step's ids; later ids beyond it were dropped
    cfg = managed_cfg()
    model = build_model(cfg)
    model.lookup(layout_of(_batch(cfg, [41, 41, 41, 41, 41, 41]), model.pooling, 1))
    ads = list(range(50, 62))
    model.lookup(layout_of(_batch(cfg, ads), model.pooling, 1))
    miss = cfg.features.sparse[1].num_embeddings - 1
    slots = {_slot(model, "ad_id", r) for r in ads}
    assert miss not in slots and len(slots) == len(ads)


def test_a_managed_checkpoint_neither_resumes_nor_warm_starts_a_hashed_model(managed_checkpoint):
    from gmeta.checkpoint import CheckpointError, check_resumable, load_init

    hashed = load_config(DEBUG_CONFIG, ["train.pipeline=false"])
    with pytest.raises(CheckpointError, match=r"features.sparse\[1\].ids \(ad_id\)"):
        check_resumable(managed_checkpoint["path"], hashed)
    with pytest.raises(CheckpointError, match="managed"):  # refused before any tensor is read
        load_init(managed_checkpoint["path"], None, hashed)


def test_the_logged_miss_share_counts_occurrences_not_distinct_ids():
    from gmeta.models.managed import training_metrics

    cfg = managed_cfg("features.sparse.ad_id.num_embeddings=2")  # one slot and the miss row
    model = build_model(cfg)
    ads = [61, 61, 61, 62, 63, 61, 62, 61]
    model.lookup(layout_of(_batch(cfg, ads), model.pooling, 1))
    held = [r for r in (61, 62, 63) if _slot(model, "ad_id", r) == 0]
    assert len(held) == 1
    m = training_metrics(model.managed)
    assert m["train/managed/ad_id/live_ids"] == 1
    assert m["train/managed/ad_id/miss_share"] == pytest.approx(sum(a not in held for a in ads) / len(ads))
    assert m["train/managed/hour/miss_share"] == 0.0
    assert training_metrics(model.managed)["train/managed/ad_id/miss_share"] == 0.0  # read since the last log


def test_benchmark_gives_managed_as_a_share_of_hashed(tmp_path, capsys):
    import os

    import torch.distributed as dist

    from benchmarks.managed_tables import bench_size
    from gmeta.parallel.dist import free_port

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        results: dict = {}
        bench_size("debug", tmp_path, repeats=1, num_batches=2, results=results, pass_batches=2)
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():  # later tests' subprocesses must not inherit this group's port
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for algorithm in ("maml", "erm"):
        res = results[f"debug_{algorithm}"]
        for k in ("managed", "managed_i10"):
            assert res[f"{k}_share_of_hashed"] == pytest.approx(res[f"{k}_rows_per_s"] / res["hashed_rows_per_s"])
            assert res[f"{k}_peak_mib"] > 0
        assert 0.1 < res["mch_buffers_mib"] < 1  # 4,632 slots x 32 bytes, plus the history
    assert results["debug_first_pass_managed_miss_share"]["ad_id"] == 0.0  # admitted in its first step
    assert results["debug_first_pass_managed_i10_miss_share"]["ad_id"] == 1.0  # 2 steps: nothing admitted yet
    assert "share of hashed" in capsys.readouterr().out


def test_resumed_training_goes_on_with_the_saved_remapping(managed_data, tmp_path):
    from gmeta.checkpoint import load_unsharded
    from tests.support.cli import run_gmeta

    def train(out: Path, *extra: str) -> None:
        proc = run_gmeta(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", *MANAGED,
                          f"data.shards_dir={managed_data}", f"train.output_dir={out}", "train.max_steps=8",
                          "train.eval_at_end=false", "tracking.enabled=false",
                          "features.sparse.ad_id.num_embeddings=64", *extra], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]

    train(tmp_path / "straight", "train.checkpoint_every_steps=4")
    train(tmp_path / "resumed", f"train.resume={tmp_path / 'straight' / 'checkpoints' / 'step-00000004'}")
    a, b = (load_unsharded(tmp_path / d / "checkpoint")[0] for d in ("straight", "resumed"))
    assert int(a.managed.evictions_ad_id) > 0  # 64 slots: the 8 steps evicted ads
    for name, buf in a.managed.state_dict().items():
        assert torch.equal(buf, b.managed.state_dict()[name]), name
    w = lambda m: m.sparse_arch.ec.embeddings["t_ad_id"].weight.detach()  # noqa: E731
    torch.testing.assert_close(w(a), w(b), rtol=0, atol=0)


def test_prepare_warns_when_the_training_ids_do_not_fit_the_slots(debug_data, tmp_path, caplog):
    from gmeta.io.prepare import format_report, prepare

    m = prepare(managed_cfg("features.sparse.ad_id.num_embeddings=100"), debug_data["raw"], tmp_path / "shards")
    c = m["cardinality"]["ad_id"]
    assert c["slots"] == 99 and c["train_distinct"] > 99 and not c["fits"]
    assert any("features.sparse[1].num_embeddings (ad_id)" in r.getMessage() and "miss row" in r.getMessage()
               for r in caplog.records)
    assert "for 99 slots + 1 miss row: the eviction policy chooses" in format_report(m)
