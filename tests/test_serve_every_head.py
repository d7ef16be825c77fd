"""Every head of ``model.arch`` serves: the checkpoint of a short training run, reloaded,
scores the same query rows identically through ``gmeta predict`` on its task shards,
``gmeta predict --input`` on the raw logs of those tasks, and the pyfunc model ``gmeta
train`` logged (``mlflow.pyfunc.load_model``): a score per label for mmoe and esmm (click
and conversion). dlrm and esmm run by default; the other heads, which take the same path
through serving, are marked slow (each trains its own model: 17-51 s a head with its data on
a loaded 2-core machine; tests/test_archs_end_to_end.py compares dcn_v2's and din's pyfunc
scores with gmeta predict's in the default run, deepfm's and wide_deep's with the slow tests)."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from gmeta.checkpoint import load_unsharded
from gmeta.inference.serving import assign_roles, score_columns
from tests.support.cli import run_gmeta
from tests.support.heads import ARCHS

DEFAULT = ("dlrm", "esmm")
TASKS = 6


def _query_order(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """``df``'s query rows with ``row``: their position in their task's query set in time
    order, as gmeta predict numbers them (ties: input order, as prepare breaks them)."""
    q = df[df["role"] == "query"].assign(input_row=lambda d: d.index)
    q = q.sort_values([key, "ts", "input_row"], kind="stable")
    return q.assign(row=q.groupby(key).cumcount())


@pytest.mark.parametrize("arch", [a if a in DEFAULT else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_the_reloaded_checkpoint_scores_alike_through_shards_raw_rows_and_pyfunc(trained_head, tmp_path, arch):
    run = trained_head(arch)
    model, cfg, _ = load_unsharded(run.checkpoint)
    assert type(model.head).arch == arch
    cols = score_columns(cfg)
    labels = cfg.features.label_names()
    assert cols[:len(labels)] == (["score_label", "score_conversion"] if arch in ("mmoe", "esmm") else ["score"])
    assert cols[len(labels):] == (["score_pcvr"] if arch == "esmm" else [])  # esmm: pCVR as well

    # gmeta predict on the task shards (the first tasks of the eval split)
    p = run_gmeta(["predict", "--checkpoint", run.checkpoint, "--shards", run.data["shards"], "--inner-steps", "2",
                   "--max-tasks", "16", "--out", tmp_path / "shards"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    shards = pd.read_parquet(tmp_path / "shards")
    keys = sorted(shards["task_key"].unique())[:TASKS]
    shards = shards[shards["task_key"].isin(keys)]

    # the raw logs of those tasks, roles by the split rule, query labels unknown
    raw = pd.read_parquet(run.data["raw"])
    rows = assign_roles(raw[raw["campaign_id"].isin(keys)].reset_index(drop=True), cfg)
    for name in cfg.features.label_names():
        rows[name] = rows[name].astype(float)
        rows.loc[rows["role"] == "query", name] = np.nan
    (tmp_path / "logs").mkdir()
    rows.to_parquet(tmp_path / "logs" / "a.parquet")
    p = run_gmeta(["predict", "--checkpoint", run.checkpoint, "--input", tmp_path / "logs", "--inner-steps", "2",
                   "--out", tmp_path / "raw"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    by_raw = pd.read_parquet(tmp_path / "raw").sort_values("input_row").reset_index(drop=True)

    # the pyfunc model gmeta train logged
    mlflow.set_tracking_uri(run.tracking_uri)
    served = mlflow.pyfunc.load_model(run.model_uri()).predict(rows, params={"inner_steps": 2})
    assert list(served.columns) == cols

    q = _query_order(rows, "campaign_id")
    assert len(q) == len(shards) == len(by_raw) > 0
    np.testing.assert_array_equal(by_raw["input_row"], np.sort(q["input_row"]))
    want = q.merge(shards, left_on=["campaign_id", "row"], right_on=["task_key", "row"], validate="1:1")
    assert len(want) == len(q)
    got_raw = want[["input_row"]].merge(by_raw, on="input_row", validate="1:1")
    for c in cols:
        assert want[c].notna().all() and ((want[c] > 0) & (want[c] < 1)).all()
        np.testing.assert_allclose(got_raw[c], want[c], rtol=0.0, atol=1e-5, err_msg=f"{arch} {c}: raw rows")
        np.testing.assert_allclose(served[c].to_numpy()[want["input_row"]], want[c], rtol=0.0, atol=1e-5,
                                   err_msg=f"{arch} {c}: pyfunc")
    assert served[rows["role"] != "query"].isna().all().all()
