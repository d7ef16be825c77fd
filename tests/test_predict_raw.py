"""gmeta predict --input: scoring row-level logs of new tasks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import gmeta.predict_raw as raw_mod
from gmeta.checkpoint import load_unsharded
from gmeta.io.errors import PrepareError
from gmeta.predict import PredictError
from gmeta.predict_raw import run_predict_raw
from gmeta.serving import assign_roles, score_rows


def _rows(debug_data, n_tasks=40) -> pd.DataFrame:
    raw = pd.read_parquet(debug_data["raw"])
    keys = sorted(raw["campaign_id"].unique())[:n_tasks]
    return raw[raw["campaign_id"].isin(keys)].reset_index(drop=True)


def _with_roles(rows: pd.DataFrame, cfg) -> pd.DataFrame:
    """Logs of tomorrow's tasks: support rows labelled, query rows without a label."""
    out = assign_roles(rows, cfg)
    out["label"] = out["label"].astype(float)
    out.loc[out["role"] == "query", "label"] = np.nan
    return out


def _write(df: pd.DataFrame, path):
    path.mkdir(parents=True)
    half = len(df) // 2  # two files: the reader streams across them
    df.iloc[:half].to_parquet(path / "a.parquet")
    df.iloc[half:].to_parquet(path / "b.parquet")
    return path


def _read(out) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))]) \
        .sort_values("input_row").reset_index(drop=True)


def _expected(debug_checkpoint, df: pd.DataFrame, steps: int) -> pd.DataFrame:
    """What the pyfunc model returns for the same rows (its predict is score_rows)."""
    model, cfg, meta = load_unsharded(debug_checkpoint)
    scores = score_rows(model, cfg, df, steps, meta.get("input_columns"))["score"]
    q = df["role"] == "query"
    return pd.DataFrame({"task_key": df.loc[q, "campaign_id"].to_numpy(), "input_row": np.flatnonzero(q),
                         "score": scores[q].to_numpy()})


@pytest.mark.parametrize("roles", ["column", "split rule"])
def test_raw_logs_score_as_the_pyfunc_model_does(debug_checkpoint, debug_data, tmp_path, roles):
    cfg = load_unsharded(debug_checkpoint)[1]
    rows = _rows(debug_data)
    df = _with_roles(rows, cfg) if roles == "column" else rows
    src = _write(df, tmp_path / "logs")
    summary = run_predict_raw(debug_checkpoint, src, tmp_path / "out", inner_steps=2, progress=False)
    got = _read(tmp_path / "out")
    want = _expected(debug_checkpoint, df if roles == "column" else assign_roles(rows, cfg), 2)
    assert len(got) == len(want) == summary["rows"] > 0
    assert summary["tasks"] == got["task_key"].nunique() == 40
    pd.testing.assert_frame_equal(got[["task_key", "input_row"]], want[["task_key", "input_row"]],
                                  check_dtype=False)
    np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)
    if roles == "column":
        assert got["label"].isna().all()  # query labels were not given
    else:
        np.testing.assert_array_equal(got["label"], rows["label"].to_numpy()[got["input_row"]])


class _Crash(RuntimeError):
    pass


def test_raw_predict_in_buckets_resumes_after_a_crash_with_every_row_once(debug_checkpoint, debug_data, tmp_path,
                                                                          monkeypatch):
    cfg = load_unsharded(debug_checkpoint)[1]
    src = _write(_with_roles(_rows(debug_data, 120), cfg), tmp_path / "logs")
    kw = dict(inner_steps=1, progress=False, memory_mb=1)  # a 1 MiB cap: several buckets
    whole = run_predict_raw(debug_checkpoint, src, tmp_path / "whole", **kw)
    assert whole["parts"] > 2
    real = raw_mod.score_rows
    calls = {"n": 0}

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Crash
        return real(*a, **k)

    monkeypatch.setattr(raw_mod, "score_rows", crash_on_third)
    with pytest.raises(_Crash):
        run_predict_raw(debug_checkpoint, src, tmp_path / "p", **kw)
    monkeypatch.setattr(raw_mod, "score_rows", real)
    assert len(json.loads((tmp_path / "p" / "_progress.json").read_text())["done"]) == 2
    with pytest.raises(PredictError, match="--resume"):
        run_predict_raw(debug_checkpoint, src, tmp_path / "p", **kw)
    resumed = run_predict_raw(debug_checkpoint, src, tmp_path / "p", resume=True, **kw)
    assert resumed["complete"] and resumed["rows"] == whole["rows"] and resumed["new_rows"] < whole["rows"]
    a, b = _read(tmp_path / "whole"), _read(tmp_path / "p")
    assert not b["input_row"].duplicated().any()
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(PredictError, match="same checkpoint, input and settings"):
        run_predict_raw(debug_checkpoint, src, tmp_path / "p", resume=True, **{**kw, "inner_steps": 3})


def test_raw_input_errors_name_the_file_and_column(debug_checkpoint, debug_data, tmp_path):
    cfg = load_unsharded(debug_checkpoint)[1]
    df = _with_roles(_rows(debug_data, 5), cfg)
    src = _write(df.drop(columns=["device"]), tmp_path / "nodevice")
    with pytest.raises(PrepareError, match=r"nodevice: missing column\(s\) \['device'\]"):
        run_predict_raw(debug_checkpoint, src, tmp_path / "o1", progress=False)
    bad = df.copy()
    bad.loc[0, "role"] = "train"
    with pytest.raises(PrepareError, match=r"badrole: .*'role' must be 'support' or 'query'.*'train'"):
        run_predict_raw(debug_checkpoint, _write(bad, tmp_path / "badrole"), tmp_path / "o2", progress=False)
    nosupport = df[~((df["campaign_id"] == df["campaign_id"].iloc[0]) & (df["role"] == "support"))]
    with pytest.raises(PrepareError, match="has no support rows"):
        run_predict_raw(debug_checkpoint, _write(nosupport, tmp_path / "nosup"), tmp_path / "o3", progress=False)
    # the command line refuses shard options with --input
    proc = subprocess.run([sys.executable, "-m", "gmeta.cli", "predict", "--checkpoint", str(debug_checkpoint),
                           "--input", str(tmp_path / "badrole"), "--split", "val", "--out", str(tmp_path / "o4")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--input reads raw rows" in proc.stderr
