"""The cold-start results table: every model trained and scored per seed, fine-tuning
chosen on validation tasks, figures reproducible from the saved checkpoints."""

from __future__ import annotations

import os
import statistics

import pytest

from gmeta import cold_start
from gmeta.cold_start import FINE_TUNE_LRS, FINE_TUNE_STEPS, VARIANTS, Dataset, format_table
from tests.support.movielens import ML_CONFIG, make_data, write_ml100k

FAST = ["train.epochs=1", "meta.tasks_per_batch=4", "eval.tasks_per_batch=8", "data.num_workers=0",
        "data.split.val_fraction=0.2"]


def test_table_runs_every_model_and_seed(tmp_path):
    raw = write_ml100k(tmp_path / "ml-100k", make_data())
    variants = [VARIANTS[0], VARIANTS[1], VARIANTS[5]]  # ERM, ERM + fine-tuning, MAML 2nd order
    results = cold_start.run([Dataset("tiny", ML_CONFIG, FAST, raw=raw)], [0, 1], tmp_path / "out", variants)
    runs = results["datasets"]["tiny"]["runs"]
    # trained in this process, leaving nothing behind that would make a later
    # `gmeta train --nproc-per-node N` started from it take itself for a torchrun worker
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(os.environ)
    assert list(runs) == [v.name for v in variants] and all(len(r) == 2 for r in runs.values())
    for r in runs.values():
        for x in r:
            assert 0.0 <= x["auc"] <= 1.0 and 0.0 <= x["gauc"] <= 1.0 and x["logloss"] > 0
    for x in runs["ERM + fine-tuning"]:  # chosen on the validation users, from the grid
        assert (x["inner_lr"], x["embedding_inner_lr"]) in FINE_TUNE_LRS and x["inner_steps"] in FINE_TUNE_STEPS
    assert all(x["inner_steps"] in FINE_TUNE_STEPS and "inner_lr" not in x for x in runs[variants[2].name])
    # the recorded figures are those of the saved checkpoints, scored again
    again = cold_start._evaluate(tmp_path / "out" / "tiny" / "erm" / "seed1" / "checkpoint",
                                 tmp_path / "out" / "tiny" / "shards")
    assert again["erm_auc"] == pytest.approx(runs["ERM"][1]["auc"], abs=1e-9)
    again = cold_start._evaluate(tmp_path / "out" / "tiny" / "maml_full_so" / "seed0" / "checkpoint",
                                 tmp_path / "out" / "tiny" / "shards", steps=[runs[variants[2].name][0]["inner_steps"]])
    assert again["maml_logloss"] == pytest.approx(runs[variants[2].name][0]["logloss"], abs=1e-9)
    table = format_table(results)
    for v in variants:
        auc = [x["auc"] for x in runs[v.name]]
        assert f"| tiny | {v.name} | {statistics.mean(auc):.4f} ± {statistics.stdev(auc):.4f} |" in table


def test_table_format_with_oracle():
    results = {"seeds": [0, 1, 2], "datasets": {"ads": {"oracle_auc": 0.8664, "runs": {"ERM": [
        {"auc": 0.60, "gauc": 0.61, "logloss": 0.52}, {"auc": 0.62, "gauc": 0.61, "logloss": 0.50},
        {"auc": 0.61, "gauc": 0.61, "logloss": 0.51}]}}}}
    table = format_table(results)
    assert "| ads | ERM | 0.6100 ± 0.0100 | 0.6100 ± 0.0000 | 0.5100 ± 0.0100 |" in table
    assert "| ads | oracle (true probabilities) | 0.8664 | | |" in table
    assert "over 3 seed(s) (0, 1, 2)" in table


def test_table_refuses_a_regression_objective(tmp_path):
    with pytest.raises(ValueError, match="model.objective must be binary"):
        cold_start.run([Dataset("x", ML_CONFIG, ["model.objective=regression"], raw=tmp_path)], [0], tmp_path)
