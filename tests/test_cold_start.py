"""The cold-start results table: every row searched with the same budget on the validation
tasks, trained per seed, its K and rates chosen on validation, figures reproducible from
the saved checkpoints."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest

from gmeta.evaluation.finetune import EXTRA_STEPS, FINE_TUNE_LRS, REGRESSION_SCALE, STEPS
from gmeta.experiments import cold_start
from gmeta.experiments.cold_start import BY_SLUG, Dataset, format_table, movielens_name
from tests.support.movielens import ML_CONFIG, make_data, write_ml100k

FAST = ["train.epochs=1", "meta.tasks_per_batch=4", "eval.tasks_per_batch=8", "data.num_workers=0",
        "data.split.val_fraction=0.2", "train.val_max_tasks=16", "sweep.prune=false",
        # a small space, so that two trials differ in what matters
        "sweep.params=[{key: optim.dense_lr, low: 0.001, high: 0.01, log: true}, "
        "{key: meta.inner_lr, low: 0.05, high: 0.5, log: true}]",
        # tables for this data's 150 movies and 33 users, not ML-1M's (up to 200k rows each, which
        # every trial and seed would allocate, optimize and checkpoint)
        *[f"features.sparse.{n}.num_embeddings=2048" for n in ("item_id", "year", "age", "zip3")]]


@pytest.fixture
def small_grids(monkeypatch):
    """The K and rate grids cut to two points each, and two widenings at most (as in
    tests/test_warmup.py): these tests are of the table, not of the grid (tests/test_finetune.py).
    Every pair and K chosen from them is on the full grids or past their ends."""
    from gmeta.evaluation import finetune

    monkeypatch.setattr(finetune, "FINE_TUNE_LRS", [(0.01, 0.05), (0.1, 0.5)])
    monkeypatch.setattr(finetune, "RATE_SCALES", [0.5, 1.0])
    monkeypatch.setattr(finetune, "STEPS", [1, 2])
    monkeypatch.setattr(finetune, "WIDEN", 2)


def _on_fine_tune_grid(pair: tuple[float, float], scale: float = 1.0) -> bool:
    """A pair of FINE_TUNE_LRS (times ``scale``), or one past its ends (the grid widened)."""
    grid = [(a * scale, b * scale) for a, b in FINE_TUNE_LRS]
    return any(pair == pytest.approx(g) for g in grid) or (
        not grid[0][0] <= pair[0] <= grid[-1][0] and pair[1] == pytest.approx(5 * pair[0]))


def test_table_searches_every_row_alike_then_trains_and_scores_every_seed(tmp_path, small_grids):
    raw = write_ml100k(tmp_path / "ml-100k", make_data())
    variants = [BY_SLUG["erm"], BY_SLUG["erm_ft"], BY_SLUG["anil"]]
    results = cold_start.run([Dataset("tiny", ML_CONFIG, FAST, raw=raw, val_every_steps=2)], [0, 1],
                             tmp_path / "out", variants, trials=2)
    r = results["datasets"]["tiny"]
    runs = r["runs"]
    # trained in this process, leaving nothing behind that would make a later
    # `gmeta train --nproc-per-node N` started from it take itself for a torchrun worker
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(os.environ)
    assert list(runs) == [v.name for v in variants] and all(len(x) == 2 for x in runs.values())
    # the same budget for every row; ERM searches only the keys that are not meta-learning's
    assert r["search"]["ERM"]["trials"] == r["search"][variants[2].name]["trials"] == 2
    assert r["search"]["ERM"]["keys"] == ["optim.dense_lr"]
    assert r["search"][variants[2].name]["keys"] == ["optim.dense_lr", "meta.inner_lr"]
    best = r["search"][variants[2].name]["best"]["params"]
    assert r["search"][variants[2].name]["overrides"] == [f"{k}={v}" for k, v in best.items()]
    trials = json.loads((tmp_path / "out" / "tiny" / "anil" / "search" / "trials.json").read_text())
    assert len(trials["trials"]) == 2 and trials["metric"] == "gauc"
    for x in runs["ERM + fine-tuning"]:  # chosen on the validation users, from the grid or past its ends
        assert _on_fine_tune_grid((x["inner_lr"], x["embedding_inner_lr"])), x
        assert x["inner_steps"] in STEPS + EXTRA_STEPS
    anil_lr = float(best["meta.inner_lr"])
    for x in runs[variants[2].name]:  # its own rates, scaled by powers of two (RATE_SCALES and beyond)
        assert x["inner_steps"] in STEPS + EXTRA_STEPS
        scale = math.log2(x["inner_lr"] / anil_lr)
        assert abs(scale - round(scale)) < 1e-9, x
    # the recorded figures are those of the saved checkpoints, scored again
    ckpts = sorted((tmp_path / "out" / "tiny" / "erm" / "seed1").glob("best")) or \
        [tmp_path / "out" / "tiny" / "erm" / "seed1" / "checkpoint"]
    again = cold_start._evaluate(ckpts[0], tmp_path / "out" / "tiny" / "shards")
    assert again["erm_gauc"] == pytest.approx(runs["ERM"][1]["gauc"], abs=1e-9)
    table = format_table(results)
    for v in variants:
        gauc = [x["gauc"] for x in runs[v.name]]
        assert f"| {statistics.mean(gauc):.4f} ± {statistics.stdev(gauc):.4f} |" in table
    assert "| tiny | ERM | 2 trials | " in table
    assert f"| tiny | {variants[2].name} | 2 trials; K, rates on val" in table


def test_rating_objective_rows_report_rmse_and_mae(tmp_path, small_grids):
    raw = write_ml100k(tmp_path / "ml-100k", make_data())
    ds = Dataset("tiny (rating)", ML_CONFIG, ["features.label=rating", "model.objective=regression", *FAST],
                 raw=raw, val_every_steps=2)
    results = cold_start.run([ds], [0], tmp_path / "out", [BY_SLUG["erm"], BY_SLUG["erm_ft"]], trials=0)
    runs = results["datasets"]["tiny (rating)"]["runs"]
    for x in runs["ERM"] + runs["ERM + fine-tuning"]:
        assert set(x) >= {"rmse", "mae"} and 0 < x["mae"] <= x["rmse"] < 4
    x = runs["ERM + fine-tuning"][0]  # the grid of squared error: a tenth of the log loss's
    assert _on_fine_tune_grid((x["inner_lr"], x["embedding_inner_lr"]), REGRESSION_SCALE), x
    table = format_table(results)
    assert "| data set | model | search | RMSE | MAE |" in table and "| tiny (rating) | ERM | none | " in table


def test_a_second_run_into_the_same_out_keeps_what_it_has_and_adds_rows(tmp_path, monkeypatch, small_grids):
    raw = write_ml100k(tmp_path / "ml-100k", make_data())
    ds = Dataset("tiny", ML_CONFIG, FAST, raw=raw, val_every_steps=2)
    out = tmp_path / "out"
    first = cold_start.run([ds], [0], out, [BY_SLUG["erm"]], trials=0)
    erm = json.loads(json.dumps(first["datasets"]["tiny"]["runs"]["ERM"]))
    manifest = out / "tiny" / "shards" / "manifest.json"
    made = manifest.stat().st_mtime_ns
    calls = []
    real_train = cold_start._train
    monkeypatch.setattr(cold_start, "_train", lambda *a: calls.append(a) or real_train(*a))
    # ERM + fine-tuning of the kept ERM checkpoint: nothing trained again, shards reused
    second = cold_start.run([ds], [0], out, [BY_SLUG["erm"], BY_SLUG["erm_ft"]], trials=0)
    runs = second["datasets"]["tiny"]["runs"]
    assert calls == [] and manifest.stat().st_mtime_ns == made
    assert runs["ERM"] == erm and runs["ERM + fine-tuning"][0]["checkpoint"] == erm[0]["checkpoint"]
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["datasets"]["tiny"]["runs"]) == ["ERM", "ERM + fine-tuning"]
    # a run with one more seed trains that seed only, and leaves out rows it did not run
    third = cold_start.run([ds], [0, 1], out, [BY_SLUG["erm"]], trials=0)
    runs = third["datasets"]["tiny"]["runs"]
    assert list(runs) == ["ERM"] and runs["ERM"][0] == erm[0] and runs["ERM"][1]["seed"] == 1 and len(calls) == 1
    # a changed data set config would score kept runs on other shards: refused, nothing touched
    with pytest.raises(ValueError, match="prepared.json|another --out"):
        cold_start.run([Dataset("tiny", ML_CONFIG, [*FAST, "data.split.val_fraction=0.25"], raw=raw,
                                val_every_steps=2)], [0, 1], out, [BY_SLUG["erm"]], trials=0)
    assert manifest.stat().st_mtime_ns == made and (out / "tiny" / "erm" / "seed1").is_dir()


def test_a_row_that_diverges_on_the_test_tasks_says_so():
    results = {"seeds": [0, 1], "datasets": {"ads": {"oracle_auc": None, "search": {}, "runs": {"MAML": [
        {"auc": 0.60, "gauc": 0.61, "logloss": 0.52, "inner_steps": 2},
        {"auc": float("nan"), "gauc": float("nan"), "logloss": float("nan"), "diverged": True, "inner_steps": 8}]}}}}
    assert "| ads | MAML | none; K, rates on val | diverged (1 of 2 seeds) |" in format_table(results)


def test_table_format_with_oracle():
    results = {"seeds": [0, 1, 2], "datasets": {"ads": {"oracle_auc": 0.8664, "search": {}, "runs": {"ERM": [
        {"auc": 0.60, "gauc": 0.61, "logloss": 0.52}, {"auc": 0.62, "gauc": 0.61, "logloss": 0.50},
        {"auc": 0.61, "gauc": 0.61, "logloss": 0.51}]}}}}
    table = format_table(results)
    assert "| ads | ERM | none | 0.6100 ± 0.0000 | 0.6100 ± 0.0100 | 0.5100 ± 0.0100 |" in table
    assert "| ads | oracle (true probabilities) | | | 0.8664 | |" in table
    assert "over 3 seed(s) (0, 1, 2)" in table


def test_rows_of_two_labels_add_each_labels_metrics_and_pctcvr_auc():
    from gmeta.experiments.cold_start import _scores

    report = {"labels": ["click", "conversion"], "maml_gauc": 0.61, "maml_auc": 0.62, "maml_logloss": 0.5}
    for label, base in (("click", 0.6), ("conversion", 0.7)):
        report.update({f"maml_gauc_{label}": base, f"maml_auc_{label}": base + 0.01, f"maml_logloss_{label}": 0.4})
    report["maml_ctcvr_auc"] = 0.75
    one = _scores(report, "maml", "binary")
    assert one["auc_conversion"] == 0.71 and one["gauc_click"] == 0.6 and one["ctcvr_auc"] == 0.75
    plain = {"auc": 0.6, "gauc": 0.6, "logloss": 0.5}
    results = {"seeds": [0, 1], "datasets": {
        "ads (click, conversion)": {"oracle_auc": 0.8, "search": {},
                                    "runs": {"MAML": [one, dict(one, auc_conversion=0.73)]}},
        "MovieLens": {"search": {}, "runs": {"ERM": [plain, plain]}}}}
    table = format_table(results)
    assert ("| data set | model | search | GAUC | AUC | logloss | GAUC (click) | AUC (click) | logloss (click) | "
            "GAUC (conversion) | AUC (conversion) | logloss (conversion) | pCTCVR AUC |") in table
    assert ("| ads (click, conversion) | MAML | none | 0.6100 ± 0.0000 | 0.6200 ± 0.0000 | 0.5000 ± 0.0000 | "
            "0.6000 ± 0.0000 | 0.6100 ± 0.0000 | 0.4000 ± 0.0000 | 0.7000 ± 0.0000 | 0.7200 ± 0.0141 | "
            "0.4000 ± 0.0000 | 0.7500 ± 0.0000 |") in table
    assert "| ads (click, conversion) | oracle (true probabilities) | | | 0.8000 |" + " |" * 8 in table
    # a data set of one label keeps its own table of three columns
    assert "| data set | model | search | GAUC | AUC | logloss |\n" in table
    assert "| MovieLens | ERM | none | 0.6000 ± 0.0000 | 0.6000 ± 0.0000 | 0.5000 ± 0.0000 |" in table


def test_movielens_release_is_named_from_its_files(tmp_path):
    raw = write_ml100k(tmp_path / "anything", make_data())
    assert movielens_name(raw) == "MovieLens-100K"
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "ratings.dat").write_text("")
    assert movielens_name(tmp_path / "m1") == "MovieLens-1M"
    (tmp_path / "rb").mkdir()
    (tmp_path / "rb" / "ml-100k.inter").write_text("")
    assert movielens_name(tmp_path / "rb") == "MovieLens-100K"


def test_task_side_rows_variant_adapts_the_data_sets_own_features_and_does_not_search_them():
    from gmeta.experiments.cold_start import _space

    ds = Dataset("x", ML_CONFIG, [], task_features=["gender", "zip3"])
    v = BY_SLUG["anil_task"]
    assert v.overrides_for(ds)[-1] == "meta.adapt_features=[gender, zip3]"
    keys = [p.key for p in _space(ds, v, [])]
    assert "meta.adapt_dense" not in keys and "meta.adapt_features" not in keys and "meta.inner_lr" in keys
    assert not any(k.startswith("meta.") for k in (p.key for p in _space(ds, BY_SLUG["erm"], [])))
