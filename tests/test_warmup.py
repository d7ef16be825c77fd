"""The warm-up protocol of item cold start: the split (data.split.rule warmup) and the
evaluate mode (eval.protocol warmup, gmeta.evaluation.warmup)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gmeta.config import ConfigError, load_config
from gmeta.evaluation.evaluate import evaluate
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
    label 1 on even times, and ``x`` = its time / 1e6 (so a test can tell which rows are where)."""
    rng = np.random.default_rng(seed)
    ad, ts = [], []
    for a, n in rows.items():
        ad += [a] * n
        ts += (1000 * a + 10 * rng.permutation(n)).tolist()  # distinct times, shuffled
    order = rng.permutation(len(ad))
    ad_a, ts_a = np.array(ad)[order], np.array(ts)[order]
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"ad_id": ad_a, "ts": ts_a, "label": ((ts_a // 10) % 2 == 0).astype(np.int64),
                             "user_id": rng.integers(0, 50, len(ad_a)), "x": ts_a / 1e6}),
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


@pytest.fixture
def tiny(tmp_path):
    """(config, shards, one batch of the test ids, a fresh model) of the tiny set."""
    import torch

    from gmeta.io.reader import TaskReader
    from gmeta.models.dlrm import build_model

    cfg = tiny_config(tmp_path)
    prepare(cfg, write_tiny(tmp_path / "raw"), tmp_path / "shards")
    torch.manual_seed(0)
    batch = next(iter(TaskReader(tmp_path / "shards", "eval", 8, shuffle=False, drop_last=False)))
    return cfg, tmp_path / "shards", batch, build_model(cfg)


def _with_support_labels(batch, flip):
    """The batch with the labels of the support rows where ``flip`` ([S] bool) is True flipped."""
    import dataclasses

    labels = batch.labels.clone()
    labels[: batch.num_support][flip] = 1 - labels[: batch.num_support][flip]
    return dataclasses.replace(batch, labels=labels, layout=None)


def test_first_support_rows_keeps_the_first_k_support_rows_and_every_query_row(tiny):
    from gmeta.evaluation.warmup import first_support_rows

    _, _, batch, _ = tiny
    so = batch.support_offsets.numpy()
    for k in (0, 2, 4, 6, 9):
        b = first_support_rows(batch, k)
        assert np.diff(b.support_offsets.numpy()).tolist() == np.minimum(np.diff(so), k).tolist()
        assert b.num_query == batch.num_query and b.task_ids.tolist() == batch.task_ids.tolist()
        want = np.concatenate([batch.dense[a: a + min(k, c)].numpy() for a, c in zip(so[:-1], np.diff(so))]
                              + [batch.dense[batch.num_support:].numpy()])
        assert np.array_equal(b.dense.numpy(), want)
        # the ids of every kept row, feature by feature, as in the batch
        for key in batch.sparse.keys():
            ids = batch.sparse[key].to_padded_dense(1).reshape(-1).numpy()
            keep = np.concatenate([np.arange(a, a + min(k, c)) for a, c in zip(so[:-1], np.diff(so))]
                                  + [np.arange(batch.num_support, batch.num_rows)]).astype(int)
            assert b.sparse[key].to_padded_dense(1).reshape(-1).numpy().tolist() == ids[keep].tolist()


def test_stage_a_uses_exactly_the_first_k_warmup_rows(tiny):
    from gmeta.evaluation.finetune import adapting
    from gmeta.evaluation.warmup import first_support_rows, rows_config
    from gmeta.scoring import predict_queries

    cfg, _, batch, model = tiny
    K = cfg.data.split.warmup_rows
    acfg = adapting(rows_config(cfg), 0.0, 20.0, 3, fine_tune=False)
    pos = np.concatenate([np.arange(c) for c in np.diff(batch.support_offsets.numpy())])  # row within its task

    def stage_a(b):
        return predict_queries(model, acfg, first_support_rows(b, K), [3])[3]

    p = stage_a(batch)
    # rows of b and c (positions K..3K-1) changed: stage a scores the same
    assert np.array_equal(stage_a(_with_support_labels(batch, pos >= K)), p)
    # a row of a changed: it does not (so the check above can fail)
    assert not np.allclose(stage_a(_with_support_labels(batch, pos < K)), p)
    # stage a+b sees b's rows
    ab = predict_queries(model, acfg, first_support_rows(batch, 2 * K), [3])[3]
    flipped_b = predict_queries(model, acfg, first_support_rows(_with_support_labels(batch, pos >= K), 2 * K), [3])[3]
    assert not np.allclose(ab, flipped_b)


def test_cold_stage_makes_no_update(tiny):
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from gmeta import metrics
    from gmeta.evaluation.finetune import adapting
    from gmeta.evaluation.warmup import METHODS, _stage_config, first_support_rows, stage_evaluate

    cfg, shards, batch, model = tiny
    assert first_support_rows(batch, 0).num_support == 0
    m = METHODS[0]
    # whatever rate and steps the config says, the cold stage scores the model as it is
    cold = stage_evaluate(m, 0, 0, evaluate)
    eager = cold(model, adapting(_stage_config(m, cfg), 0.0, 20.0, 3, fine_tune=False), shards)
    plain_cfg = cold(model, adapting(_stage_config(m, cfg), 0.0, 0.1, 0, fine_tune=False), shards)
    s = batch.num_support  # (the test ids fit in this one batch)
    kjt = KeyedJaggedTensor.from_jt_dict({k: _rows(batch.sparse[k], s) for k in batch.sparse.keys()})
    with torch.no_grad():
        plain = model.head.predict(model(kjt, batch.dense[s:])).numpy()
    y = batch.labels[s:].numpy()
    assert eager["query_rows"] == len(y) and eager["inner_steps"] == 0
    assert eager["maml_logloss"] == pytest.approx(metrics.logloss(y, plain), abs=1e-6)
    assert eager["maml_logloss"] == plain_cfg["maml_logloss"] and eager["maml_auc"] == plain_cfg["maml_auc"]


def _rows(jt, start):
    """A JaggedTensor's rows from ``start`` on."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    off = jt.offsets()
    return JaggedTensor(values=jt.values()[int(off[start]):], lengths=jt.lengths()[start:])


def test_random_initial_rows_replace_the_new_ids_rows_only(tiny):
    import math

    from gmeta.evaluation.warmup import InitRow, initial_rows
    from gmeta.layout import layout_of

    cfg, _, batch, model = tiny
    layout = layout_of(batch, model.pooling, 1)
    rows = model.lookup(layout).detach()
    f = [s.name for s in cfg.features.sparse].index("ad_id")
    lo, hi = int(layout.unique_offsets[f]), int(layout.unique_offsets[f + 1])
    out = initial_rows(InitRow.RANDOM, f, 0, model, rows, layout)
    assert np.array_equal(out[:lo].numpy(), rows[:lo].numpy()) and np.array_equal(out[hi:].numpy(), rows[hi:].numpy())
    bound = math.sqrt(1 / 500)
    assert not np.allclose(out[lo:hi].numpy(), rows[lo:hi].numpy()) and out[lo:hi].abs().max() <= bound
    # the same id draws the same row (every stage, every batch); another seed another row
    assert np.array_equal(initial_rows(InitRow.RANDOM, f, 0, model, rows, layout).numpy(), out.numpy())
    assert not np.allclose(initial_rows(InitRow.RANDOM, f, 1, model, rows, layout)[lo:hi].numpy(),
                           out[lo:hi].numpy())
    assert initial_rows(InitRow.MODEL, f, 0, model, rows, layout) is rows


def test_every_choice_is_made_on_validation_ids(tiny, monkeypatch):
    """Rates and steps are chosen reading split val only; the test ids are read once per
    stage, to be scored with the choice."""
    from gmeta import scoring
    from gmeta.evaluation import finetune
    from gmeta.evaluation.warmup import METHODS, STAGES, warmup_report

    cfg, shards, _, model = tiny
    reads: list[tuple[str, str]] = []  # (phase, split read)
    phase = ["score"]
    real_reader, real_choose = scoring.TaskReader, finetune.choose

    def reader(root, split, *a, **kw):
        reads.append((phase[0], split))
        return real_reader(root, split, *a, **kw)

    def choose(*a, **kw):
        phase[0] = "choose"
        try:
            return real_choose(*a, **kw)
        finally:
            phase[0] = "score"

    monkeypatch.setattr(scoring, "TaskReader", reader)
    monkeypatch.setattr(finetune, "choose", choose)
    report = warmup_report(model, cfg, shards, evaluate=evaluate, methods=(METHODS[0],), seed=0)
    assert {s for p, s in reads if p == "choose"} == {"val"}
    assert [s for p, s in reads if p == "score"] == ["eval"] * len(STAGES)
    stages = report["methods"]["init_model"]["stages"]
    assert "steps" not in stages["cold"] and all(stages[s]["steps"] >= 1 for s in ("a", "a+b", "a+b+c"))
    assert report["chosen_on"] == "val" and report["split"] == "eval"


def test_warmup_protocol_refuses_shards_of_another_rule_and_no_validation_ids(tmp_path):
    from gmeta.evaluation.warmup import warmup_report
    from gmeta.models.dlrm import build_model

    cfg = tiny_config(tmp_path, ["data.split.val_fraction=0"])
    prepare(cfg, write_tiny(tmp_path / "raw"), tmp_path / "shards")
    with pytest.raises(ValueError, match="no validation ids"):
        warmup_report(build_model(cfg), cfg, tmp_path / "shards", evaluate=evaluate)
    time_cfg = load_config(tmp_path / "tiny.yaml", ["data.split.rule=time", "features.task_key=user_id",
                                                    "features.sparse=[{name: ad_id, num_embeddings: 500}]"])
    prepare(time_cfg, tmp_path / "raw", tmp_path / "time_shards")
    with pytest.raises(ValueError, match="needs shards of data.split.rule warmup"):
        warmup_report(build_model(cfg), cfg, tmp_path / "time_shards", evaluate=evaluate)


def test_evaluate_protocol_warmup_end_to_end(tmp_path, monkeypatch):
    """synth -> prepare (rule warmup) -> train ERM and MAML -> run_evaluate(protocol warmup),
    what gmeta evaluate --protocol warmup runs: the report holds every method at every stage.
    (The choice grids are cut to two rates and two step counts: the test is of the protocol,
    not of the grid.)"""
    import json

    from gmeta.checkpoint import load_unsharded
    from gmeta.evaluation import finetune, warmup
    from gmeta.evaluation.evaluate import run_evaluate
    from gmeta.io.synth import generate
    from gmeta.training import run as train
    from tests.conftest import ROOT

    config = ROOT / "configs" / "ads_cold_items.yaml"
    small = ["synth.num_tasks=120", f"data.shards_dir={tmp_path / 'shards'}", "eval.max_tasks=8",
             "tracking.enabled=false", "train.eval_at_end=false", "train.max_steps=4", "train.nproc_per_node=1"]
    generate(load_config(ROOT / "configs" / "ads_cvr_debug.yaml", ["synth.num_tasks=120"]), tmp_path / "raw")
    m = prepare(load_config(config, small), tmp_path / "raw", tmp_path / "shards")
    assert m["splits"]["val"]["tasks"] and m["splits"]["eval"]["tasks"] and m["splits"]["train"]["tasks"]
    for alg in ("erm", "maml"):
        train.main(load_config(config, [*small, f"meta.algorithm={alg}", f"train.output_dir={tmp_path / alg}"]))
    # an id generator of the new ads trained on the ERM model (as python -m gmeta.experiments.cold_start --warmup does)
    train.main(load_config(config, [*small, "meta.algorithm=erm", "generator.feature=ad_id",
                                    "generator.attributes=[advertiser_id, ad_category]", "generator.mode=base_fixed",
                                    "generator.train_ids=all", f"train.init_from={tmp_path / 'erm' / 'checkpoint'}",
                                    f"train.output_dir={tmp_path / 'gen'}"]))
    monkeypatch.setattr(warmup, "ROW_LRS", [(0.0, 0.5), (0.0, 5.0)])
    monkeypatch.setattr(warmup, "STEPS", [1, 2])
    monkeypatch.setattr(warmup, "WIDEN", 0)
    monkeypatch.setattr(finetune, "FINE_TUNE_LRS", [(0.01, 0.05), (0.1, 0.5)])
    monkeypatch.setattr(finetune, "RATE_SCALES", [0.5, 1.0])
    result = run_evaluate(tmp_path / "maml" / "checkpoint", baseline=tmp_path / "erm" / "checkpoint",
                          protocol="warmup", tracking=False, out_dir=tmp_path / "report",
                          generator=tmp_path / "gen" / "checkpoint")
    report = json.loads((tmp_path / "report" / "warmup_report.json").read_text())
    assert result is not None and result["methods"].keys() == report["methods"].keys()
    assert list(report["methods"]) == ["init_model", "init_random", "maml", "erm_ft", "generator"]
    assert report["stages"] == ["cold", "a", "a+b", "a+b+c"] and report["support_rows"] == [0, 4, 8, 12]
    assert report["tasks"] == 8 and report["chosen_on"] == "val" and report["val_ids"] == 8
    for name, e in report["methods"].items():
        for stage in report["stages"]:
            c = e["stages"][stage]
            assert 0.0 <= c["auc"] <= 1.0 and 0.0 <= c["gauc"] <= 1.0 and c["logloss"] > 0, (name, stage, c)
            assert ("steps" in c) == (stage != "cold") and c.get("steps", 1) in (1, 2)
    assert report["methods"]["erm_ft"]["model"] == "baseline" and report["methods"]["maml"]["model"] == "checkpoint"
    assert report["methods"]["generator"]["model"] == "generator"
    # the cold stage of the base-model rows: the same tables and head, another initial row of the new ads
    cold = [report["methods"][n]["stages"]["cold"]["logloss"] for n in ("init_model", "init_random", "generator")]
    assert len(set(cold)) == 3
    # a generator whose output layer is zero generates the default row: the cold stage of init_model, exactly
    gen, gcfg, _ = load_unsharded(tmp_path / "gen" / "checkpoint")
    base, bcfg, _ = load_unsharded(tmp_path / "erm" / "checkpoint")
    assert gen.generator is not None
    torch.nn.init.zeros_(gen.generator.mlp[-1].weight)
    torch.nn.init.zeros_(gen.generator.mlp[-1].bias)
    run = warmup.stage_evaluate(warmup.METHODS[0], 0, 0, evaluate)
    scores = [run(m, warmup.rows_config(c), tmp_path / "shards")["maml_logloss"]
              for m, c in ((base, bcfg), (gen, gcfg))]
    assert scores[0] == scores[1]
    md = (tmp_path / "report" / "warmup_report.md").read_text()
    assert "| init_random: random initial row + row updates |" in md and "a+b+c (12)" in md
    assert "validation ids" in md and "never on the test ids" in md


def test_gmeta_evaluate_protocol_flag(tmp_path, monkeypatch):
    """--protocol reaches run_evaluate (default: None, i.e. eval.protocol); the warm-up table
    is printed."""
    from gmeta import cli
    from gmeta.evaluation import evaluate

    seen = {}

    def fake(checkpoint, **kw):
        seen.update(kw)
        return {"protocol": "warmup", "stages": ["cold"], "support_rows": [0], "warmup_rows": 4,
                "warmup_train_rows": 30, "feature": "ad_id", "val_ids": 3, "methods": {}}

    monkeypatch.setattr(evaluate, "run_evaluate", fake)
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path), "--protocol", "warmup", "--no-tracking"]) == 0
    assert seen["protocol"] == "warmup"
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path), "--no-tracking"]) == 0
    assert seen["protocol"] is None
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--checkpoint", str(tmp_path), "--protocol", "warm"])


def test_movielens_items_config_prepares_movies_as_tasks(tmp_path):
    """configs/movielens_items.yaml on a small MovieLens-100K set: movies are the tasks, the
    split follows the warm-up rule (N and K shrunk to the small set's ratings per movie)."""
    from collections import Counter

    from tests.conftest import ROOT
    from tests.support.movielens import make_data, write_ml100k

    data = make_data()
    raw = write_ml100k(tmp_path / "raw", data)
    cfg = load_config(ROOT / "configs" / "movielens_items.yaml",
                      ["data.split.warmup_train_rows=8", "data.split.warmup_rows=1"])
    m = prepare(cfg, raw, tmp_path / "shards")
    per_item = Counter(i for _, i, _, _ in data["ratings"])
    assert m["input_tasks"] == len(per_item)
    held = {**records(tmp_path / "shards", "val"), **records(tmp_path / "shards", "eval")}
    assert set(held) == {i for i, n in per_item.items() if 4 <= n <= 8}
    for i, (s, q) in held.items():
        times = sorted(t for _, item, _, t in data["ratings"] if item == i)
        assert len(s) == 3 and sorted(s + q) == times and max(s) <= min(q)
    assert m["dropped_tasks"]["too_few_warmup_rows"] == sum(1 for n in per_item.values() if n < 4)
    train = {}
    for f in sorted((tmp_path / "shards" / "train").glob("*.parquet")):
        for rec in pq.read_table(f).to_pylist():
            train[rec["task_key"]] = train.get(rec["task_key"], 0) + len(rec["support"]["label"]) \
                + len(rec["query"]["label"])
    assert train == {i: n for i, n in per_item.items() if n > 8}  # every rating of a training movie


def test_warmup_table_format_gives_mean_and_spread_per_method_and_stage():
    from gmeta.experiments.cold_start import format_warmup_table as format_table

    def report(shift):
        stages = ["cold", "a", "a+b", "a+b+c"]
        return {"stages": stages, "support_rows": [0, 4, 8, 12], "warmup_rows": 4, "tasks": 10,
                "methods": {"init_model": {"label": "initial row of the model + row updates", "stages": {
                    s: {"auc": 0.6 + 0.01 * i + shift, "gauc": 0.5, "logloss": float("nan")}
                    for i, s in enumerate(stages)}}}}

    results = {"seeds": [0, 1], "datasets": {"synthetic ads": {
        "runs": [{"seed": 0, "report": report(0.0)}, {"seed": 1, "report": report(0.02)}],
        "search": {"ERM (base model)": {"trials": 2}}}}}
    md = format_table(results)
    assert "| method | cold (0) | a (4) | a+b (8) | a+b+c (12) |" in md
    # AUC of stage a: 0.61 and 0.63 -> mean 0.62, sample sd 0.0141
    assert "| initial row of the model + row updates | 0.6100 ± 0.0141 | 0.6200 ± 0.0141 |" in md
    assert "n/a (2 of 2 seeds)" in md and "ERM (base model): 2 trials" in md
    assert "over 2 seed(s) (0, 1)" in md
    results["datasets"]["synthetic ads"]["runs"].pop()  # a run cut short: the table says what it has
    assert "over 1 seed(s) (0)" in format_table(results)


def test_warmup_table_data_sets_generate_by_campaign_and_prepare_by_ad(tmp_path):
    import argparse

    from gmeta.experiments.cold_start import _prepare, _warmup_datasets
    from gmeta.io.manifest import load_manifest

    args = argparse.Namespace(movielens="", ads_tasks=60, ads_override=["data.split.val_fraction=0.5"],
                              movielens_override=[], attributes="head")
    (ds,) = _warmup_datasets(args)
    assert not any(".head=" in o for o in ds.overrides)
    # --attributes generator: the same attributes, read by the generator alone, under another name
    (alone,) = _warmup_datasets(argparse.Namespace(**{**vars(args), "attributes": "generator"}))
    assert alone.generator == ds.generator and alone.name != ds.name
    assert set(alone.overrides) - set(ds.overrides) == {
        f"features.sparse.{a}.head=false" for a in ("ad_category", "creative_type", "landing_page")}
    assert ds.config.name == "ads_cold_items.yaml" and ds.synth_config.name == "ads_cvr_debug.yaml"
    shards = _prepare(ds, tmp_path)
    raw = pq.read_table(tmp_path / "raw").to_pandas()
    assert {"campaign_id", "ad_id"} <= set(raw.columns) and raw.campaign_id.nunique() == 60
    m = load_manifest(shards)
    assert m["task_key"] == "ad_id" and m["input_tasks"] == raw.ad_id.nunique()
    rows = raw.groupby("ad_id").size()
    assert m["splits"]["train"]["support_rows"] + m["splits"]["train"]["query_rows"] == rows[rows > 30].sum()
    assert m["splits"]["val"]["tasks"] + m["splits"]["eval"]["tasks"] == ((rows <= 30) & (rows >= 13)).sum()


def test_warmup_table_keeps_seeds_already_scored_and_shows_a_missing_method_as_not_available(tmp_path, monkeypatch):
    """Run again into the same --out: a seed scored there is kept, not trained again; a
    method one seed lacks (an earlier run without the generator) reads n/a for it."""
    import json

    from gmeta.experiments import cold_start

    def report(methods):
        return {"stages": ["cold", "a"], "support_rows": [0, 4], "warmup_rows": 4, "tasks": 3,
                "methods": {m: {"label": m, "stages": {"cold": {"auc": 0.6}, "a": {"auc": 0.7}}} for m in methods}}

    runs = [{"seed": 0, "report": report(["init_model"])}, {"seed": 5, "report": report(["init_model"])}]
    (tmp_path / "results.json").write_text(json.dumps({"protocol": "warmup", "trials": 0, "datasets": {
        "toy": {"runs": runs, "search": {}}}}))
    trained = []
    monkeypatch.setattr(cold_start, "_prepare", lambda ds, base: base / "shards")
    monkeypatch.setattr(cold_start, "_search", lambda ds, v, fixed, out, trials: ([], {"trials": 0}))
    monkeypatch.setattr(cold_start, "_train", lambda config, overrides: trained.append(overrides))
    ds = cold_start.Dataset("toy", tmp_path / "toy.yaml", [])
    results = cold_start.run_warmup_table([ds], [0], tmp_path, trials=0)
    assert trained == []  # seed 0 was scored: nothing trained
    assert [r["seed"] for r in results["datasets"]["toy"]["runs"]] == [0]  # seed 5 is not asked for
    both = {"datasets": {"toy": {"runs": [runs[0], {"seed": 1, "report": report(["init_model", "generator"])}],
                                 "search": {}}}}
    md = cold_start.format_warmup_table(both)
    assert "| generator | n/a (1 of 2 seeds) | n/a (1 of 2 seeds) |" in md and "| init_model | 0.6000 ± 0.0000" in md


def _fake_table_runs(monkeypatch, chosen: list[str]) -> tuple[list[list[str]], list[tuple]]:
    """run_warmup_table with its training, searches and checkpoints faked: returns the
    overrides of every model trained and (what, overrides, keys, out, trials) of every
    generator search, which chooses ``chosen``; each base model's search chooses dense rate
    0.002."""
    import gmeta.checkpoint
    from gmeta.experiments import cold_start

    trained: list[list[str]] = []
    sweeps: list[tuple] = []

    def train(config, overrides):
        trained.append(overrides)
        return Path([o for o in overrides if o.startswith("train.output_dir=")][-1].split("=", 1)[1])

    def sweep(what, config, overrides, space, out, n):
        sweeps.append((what, overrides, [p.key for p in space], out, n))
        return chosen, {"trials": n, "keys": [p.key for p in space]}

    monkeypatch.setattr(cold_start, "_prepare", lambda ds, base: base / "shards")
    monkeypatch.setattr(cold_start, "_search", lambda ds, v, fixed, out, trials: (["optim.dense_lr=0.002"], {}))
    monkeypatch.setattr(cold_start, "_train", train)
    monkeypatch.setattr(cold_start, "_sweep", sweep)
    monkeypatch.setattr(gmeta.checkpoint, "load_unsharded", lambda path: (str(path), None, None))
    return trained, sweeps


@pytest.mark.parametrize("trials", [0, 3])
def test_warmup_table_searches_the_generator_on_a_base_model_of_its_own_and_trains_each_seed_with_its_choice(
        tmp_path, monkeypatch, trials):
    """--trials N searches the generator's own settings with N trials, like each base model,
    on an ERM model trained for the search (not a scored seed's), and each seed's generator
    trains with the choice; with no trials the defaults train (no search, no extra model)."""
    import gmeta.evaluation.warmup
    from gmeta.experiments import cold_start

    trained, sweeps = _fake_table_runs(monkeypatch, ["optim.dense_lr=0.05", "generator.cold_weight=0.7"])
    monkeypatch.setattr(gmeta.evaluation.warmup, "warmup_report", lambda model, cfg, shards, **kw: {
        "stages": ["cold"], "support_rows": [0], "warmup_rows": 4, "tasks": 1,
        "methods": {"generator": {"label": "g", "stages": {"cold": {"auc": 0.6}}}}, "generator": kw["generator"][0]})
    ds = cold_start.Dataset("toy", tmp_path / "toy.yaml", [], generator=["generator.feature=ad_id"])
    results = cold_start.run_warmup_table([ds], [4], tmp_path, trials=trials)

    entry = results["datasets"]["toy"]
    gen_runs = [o for o in trained if "generator.feature=ad_id" in o]
    assert len(gen_runs) == 1  # one per seed (the search's trials run in _sweep)
    seed_run = gen_runs[0]
    assert "train.seed=4" in seed_run and any(o.startswith("train.init_from=") and "/erm/seed4" in o
                                              for o in seed_run)
    if not trials:
        assert sweeps == [] and entry["search"]["generator"]["trials"] == 0
        assert f"train.output_dir={tmp_path}/toy/generator/seed4" in seed_run
        assert len(trained) == 3  # ERM, MAML, the generator: no model trained for a search
        return
    (what, overrides, keys, out, n), = sweeps
    assert n == trials and keys == [k for k, _ in cold_start.GENERATOR_SPACE]
    assert {"generator.mode=base_fixed", "generator.train_ids=all", "optim.dense_lr=0.002"} <= set(overrides)
    # the search's base model: the ERM's chosen settings at the configured seed, not a scored seed's model
    (base_run,) = [o for o in trained if any("generator/search_base" in x for x in o)]
    assert "optim.dense_lr=0.002" in base_run and not any(o.startswith("train.seed=") for o in base_run)
    assert f"train.init_from={tmp_path}/toy/generator/search_base" in overrides
    # each seed trains with the choice, which comes after (so overrides) the defaults
    assert seed_run.index("optim.dense_lr=0.05") > seed_run.index("optim.dense_lr=0.01")
    assert "generator.cold_weight=0.7" in seed_run
    out_dir = [o for o in seed_run if o.startswith("train.output_dir=")][-1]
    assert out_dir.endswith("/seed4") and f"{tmp_path}/toy/generator/seed4" not in out_dir  # not the defaults' run
    assert entry["search"]["generator"]["overrides"] == ["optim.dense_lr=0.05", "generator.cold_weight=0.7"]


def test_warmup_table_trains_a_joint_generator_from_scratch_with_a_model_of_its_own(tmp_path, monkeypatch):
    """--generator-training joint: the generator's search and each seed's run train a model of
    their own with the ERM's settings (no train.init_from), the offset on every id, in a
    directory apart from the base_fixed generator's."""
    import argparse

    import gmeta.evaluation.warmup
    from gmeta.experiments import cold_start

    trained, sweeps = _fake_table_runs(monkeypatch, ["generator.hidden=[]"])
    monkeypatch.setattr(gmeta.evaluation.warmup, "warmup_report", lambda model, cfg, shards, **kw: {
        "stages": ["cold"], "support_rows": [0], "warmup_rows": 4, "tasks": 1, "methods": {}})
    args = argparse.Namespace(movielens="", ads_tasks=60, ads_override=[], movielens_override=[],
                              attributes="generator", generator_training="joint")
    (ds,) = cold_start._warmup_datasets(args)
    assert ds.generator_joint and ds.name.endswith("generator trained jointly, attributes the generator's alone")
    ds = cold_start.Dataset("toy", tmp_path / "toy.yaml", [], generator=ds.generator, generator_joint=True)
    cold_start.run_warmup_table([ds], [4], tmp_path, trials=2)
    (_, overrides, keys, out, _), = sweeps
    assert keys == [k for k, _ in cold_start.GENERATOR_JOINT_SPACE]
    assert out == tmp_path / "toy" / "generator-joint" / "search"
    assert {"generator.mode=joint", "generator.offset_ids=all", "optim.dense_lr=0.002"} <= set(overrides)
    (seed_run,) = [o for o in trained if "generator.feature=ad_id" in o]
    assert not any(o.startswith("train.init_from=") for o in [*overrides, *seed_run])
    assert "generator.hidden=[]" in seed_run and "train.seed=4" in seed_run
    assert [o for o in seed_run if o.startswith("train.output_dir=")][-1].startswith(
        f"train.output_dir={tmp_path}/toy/generator-joint-")
    assert len(trained) == 3  # ERM, MAML, the generator: no base model for the search
