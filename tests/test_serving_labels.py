"""Raw-row scoring of a model of several labels (features.labels): every label column read
and checked, a score per label (``score_<name>``) from ``score_rows``, ``gmeta predict
--input`` in one process or several, and the errors that name the label column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gmeta.checkpoint import load_unsharded
from gmeta.inference.predict_raw import run_predict_raw
from gmeta.inference.serving import assign_roles, score_rows
from gmeta.io.errors import PrepareError

LABELS = ["label", "conversion"]
SCORES = ["score_label", "score_conversion", "score_pcvr"]  # esmm: pCTR, pCTCVR, pCVR


@pytest.fixture(scope="module")
def esmm_checkpoint(trained_head) -> Path:
    """ESMM over the debug config's sizes, trained a few steps on the two-label debug data
    (tests/test_serve_every_head.py's training, shared)."""
    return trained_head("esmm").checkpoint


def _rows(two_label_data, cfg, n_tasks: int) -> pd.DataFrame:
    """The raw rows of ``n_tasks`` campaigns with roles by the split rule, query labels
    unknown (NaN) in both label columns."""
    raw = pd.read_parquet(two_label_data["raw"])
    keys = sorted(raw["campaign_id"].unique())[:n_tasks]
    out = assign_roles(raw[raw["campaign_id"].isin(keys)].reset_index(drop=True), cfg)
    for name in LABELS:
        out[name] = out[name].astype(float)
        out.loc[out["role"] == "query", name] = np.nan
    return out


def _write(df: pd.DataFrame, path: Path) -> Path:
    path.mkdir(parents=True)
    df.to_parquet(path / "a.parquet")
    return path


def _read(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))]) \
        .sort_values("input_row").reset_index(drop=True)


def test_raw_rows_of_two_labels_get_a_score_per_label(esmm_checkpoint, two_label_data):
    model, cfg, meta = load_unsharded(esmm_checkpoint)
    kw = dict(column_types=meta.get("input_columns"), id_hash=meta["id_hash"])
    df = _rows(two_label_data, cfg, 12)
    got = score_rows(model, cfg, df, 2, **kw)
    assert list(got.columns) == ["score_label", "score_conversion", "score_pcvr"] and got.index.equals(df.index)
    q = (df["role"] == "query").to_numpy()
    assert got[~q].isna().all().all() and got[q].notna().all().all()
    s = got[q].to_numpy()
    assert ((s > 0) & (s < 1)).all()
    assert (s[:, 1] <= s[:, 0] + 1e-7).all()  # esmm: pCTCVR = pCTR x pCVR <= pCTR
    np.testing.assert_allclose(s[:, 2], s[:, 1] / s[:, 0], rtol=1e-5)  # pCVR = pCTCVR / pCTR
    # the query rows' labels are not read: given, or NaN, the scores are the same
    given = assign_roles(pd.read_parquet(two_label_data["raw"]).pipe(lambda r: r[r["campaign_id"].isin(
        df["campaign_id"].unique())]).reset_index(drop=True), cfg)
    np.testing.assert_array_equal(score_rows(model, cfg, given, 2, **kw).to_numpy(), got.to_numpy())
    # the support rows' labels are: flipping the conversions of one task's support rows
    # changes that task's adapted scores, and no other task's
    flipped = df.copy()
    task = df.loc[(df["role"] == "support") & (df["label"] == 1), "campaign_id"].iloc[0]  # clicks to flip
    at = (df["campaign_id"] == task) & (df["role"] == "support")
    # (still a conversion only after a click)
    flipped.loc[at, "conversion"] = flipped.loc[at, "label"] - flipped.loc[at, "conversion"]
    other = score_rows(model, cfg, flipped, 2, **kw)
    mine = (df["campaign_id"] == task).to_numpy() & q
    assert not np.allclose(other["score_conversion"][mine], got["score_conversion"][mine], atol=1e-7)
    np.testing.assert_array_equal(other[q & ~mine].to_numpy(), got[q & ~mine].to_numpy())


def test_raw_logs_of_two_labels_predict_a_column_per_label_in_worker_processes(esmm_checkpoint, two_label_data,
                                                                                tmp_path):
    model, cfg, meta = load_unsharded(esmm_checkpoint)
    raw = pd.read_parquet(two_label_data["raw"])
    rows = raw[raw["campaign_id"].isin(sorted(raw["campaign_id"].unique())[:30])].reset_index(drop=True)
    # roles by the split rule (no role column): the query rows' labels are those of the logs
    summary = run_predict_raw(esmm_checkpoint, _write(rows, tmp_path / "logs"), tmp_path / "out", inner_steps=2,
                              progress=False, nproc=2, units=4)
    got = _read(tmp_path / "out")
    assert list(got.columns) == ["task_key", "input_row", "label_label", "label_conversion", "support_rows",
                                 "score_label", "score_conversion", "score_pcvr"]
    assert summary["models"][0]["columns"] == ["score_label", "score_conversion", "score_pcvr"]
    want_rows = assign_roles(rows, cfg)
    q = (want_rows["role"] == "query").to_numpy()
    want = score_rows(model, cfg, want_rows, 2, meta.get("input_columns"), id_hash=meta["id_hash"])
    assert len(got) == summary["rows"] == q.sum() > 0
    np.testing.assert_array_equal(got["input_row"], np.flatnonzero(q))
    for name in LABELS:
        np.testing.assert_array_equal(got[f"label_{name}"], rows[name].to_numpy()[q])
    for c in SCORES:
        np.testing.assert_allclose(got[c], want[c][q], atol=1e-6)
    # the tables sharded among the 2 workers (their gang gathers the scores): the same part
    run_predict_raw(esmm_checkpoint, tmp_path / "logs", tmp_path / "sharded", inner_steps=2, progress=False, nproc=2,
                    units=4, shard_tables=True)
    sharded = _read(tmp_path / "sharded")
    pd.testing.assert_frame_equal(sharded.drop(columns=SCORES), got.drop(columns=SCORES))
    for c in SCORES:
        np.testing.assert_allclose(sharded[c], got[c], atol=1e-5)


def test_raw_rows_of_two_labels_errors_name_the_label_column(esmm_checkpoint, two_label_data, tmp_path):
    model, cfg, meta = load_unsharded(esmm_checkpoint)
    kw = dict(column_types=meta.get("input_columns"), id_hash=meta["id_hash"])
    df = _rows(two_label_data, cfg, 4)
    support = np.flatnonzero(df["role"] == "support")
    with pytest.raises(PrepareError, match=r"missing column\(s\) \['conversion'\]"):
        score_rows(model, cfg, df.drop(columns="conversion"), **kw)
    unlabelled = df.copy()
    unlabelled.loc[support[3], "conversion"] = np.nan  # a support row must carry every label
    with pytest.raises(PrepareError, match=r"column 'conversion' has a null value"):
        score_rows(model, cfg, unlabelled, **kw)
    bad = df.copy()
    bad.loc[support[2], "conversion"] = 2.0
    with pytest.raises(PrepareError, match=r"column 'conversion' \(features.labels\) must be 0 or 1"):
        score_rows(model, cfg, bad, **kw)
    # and through gmeta predict --input, naming the input too
    with pytest.raises(PrepareError, match=r"badconv: .*column 'conversion' \(features.labels\) must be 0 or 1"):
        run_predict_raw(esmm_checkpoint, _write(bad, tmp_path / "badconv"), tmp_path / "o", progress=False)


def test_the_pyfunc_model_of_two_labels_logs_every_label_column_and_scores_each(trained_head):
    import mlflow

    from gmeta.inference.serving import example_rows

    run = trained_head("esmm")  # its model logged by gmeta train
    model, cfg, meta = load_unsharded(run.checkpoint)
    mlflow.set_tracking_uri(run.tracking_uri)
    served = mlflow.pyfunc.load_model(run.model_uri())
    assert {"label", "conversion", "role"} <= set(served.metadata.get_input_schema().input_names())
    assert served.metadata.get_output_schema().input_names() == SCORES
    # the signature's example: two support rows labelled 0 then 1 in each label column, the
    # query rows' labels unknown
    example = example_rows(cfg, meta.get("input_columns"))
    for name in LABELS:
        np.testing.assert_array_equal(example[name].to_numpy(), [0.0, 1.0, np.nan, np.nan])
    out = served.predict(example)
    want = score_rows(model, cfg, example, column_types=meta.get("input_columns"), id_hash=meta["id_hash"])
    pd.testing.assert_frame_equal(out, want)
    assert out.iloc[2:].notna().all().all() and out.iloc[:2].isna().all().all()


def test_models_of_other_score_columns_in_one_pass_keep_their_own_columns():
    from gmeta.config import load_config
    from gmeta.inference.serving import put_scores, score_array, score_columns, scores_frame
    from tests.conftest import DEBUG_CONFIG, TWO_LABELS

    esmm = load_config(DEBUG_CONFIG, [*TWO_LABELS, "model.arch=esmm"])
    mmoe = load_config(DEBUG_CONFIG, [*TWO_LABELS, "model.arch=mmoe"])
    assert score_columns(esmm, "score_0") == ["score_0_label", "score_0_conversion", "score_0_pcvr"]
    assert score_columns(mmoe, "score_1") == ["score_1_label", "score_1_conversion"]
    assert score_columns(load_config(DEBUG_CONFIG)) == ["score"]  # one label: as it always was
    scores = score_array([(None, esmm), (None, mmoe)], 4)
    assert scores.shape == (2, 4, 3) and np.isnan(scores).all()
    put_scores(scores, 0, np.array([1, 3]), np.array([[0.5, 0.2, 0.4], [0.6, 0.3, 0.5]]))
    put_scores(scores, 1, np.array([1, 3]), np.array([[0.7, 0.1], [0.8, 0.2]]))
    np.testing.assert_array_equal(scores[1, [1, 3], :2], [[0.7, 0.1], [0.8, 0.2]])
    assert np.isnan(scores[1, :, 2]).all() and np.isnan(scores[:, [0, 2]]).all()
    frame = scores_frame(scores[1], score_columns(mmoe), range(4))
    assert list(frame.columns) == ["score_label", "score_conversion"]
    np.testing.assert_array_equal(frame["score_conversion"].to_numpy()[[1, 3]], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"features.labels \['label', 'conversion'\] and \['label'\]"):
        score_array([(None, esmm), (None, load_config(DEBUG_CONFIG))], 4)
    with pytest.raises(ValueError, match="a label named 'pcvr'"):
        score_columns(load_config(DEBUG_CONFIG, ["features.labels=[label, pcvr]", "model.arch=esmm"]))
