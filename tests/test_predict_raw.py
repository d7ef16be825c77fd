"""gmeta predict --input: scoring row-level logs of new tasks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import gmeta.inference.workers as workers_mod
from gmeta.checkpoint import load_unsharded
from gmeta.inference.predict import PredictError
from gmeta.inference.predict_raw import run_predict_raw
from gmeta.inference.serving import assign_roles, score_rows
from gmeta.io.errors import PrepareError
from tests.support.cli import run_gmeta


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
    scores = score_rows(model, cfg, df, steps, meta.get("input_columns"), id_hash=meta["id_hash"])["score"]
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


@pytest.mark.parametrize("nproc, steps", [(1, 2), (2, 0)])
def test_tasks_without_support_rows_get_the_shared_models_scores(debug_checkpoint, debug_data, tmp_path, nproc,
                                                                 steps):
    """New tasks (query rows only) among tasks with history: scored unadapted, counted, and
    marked in the output by support_rows 0, whatever the inner steps."""
    model, cfg, meta = load_unsharded(debug_checkpoint)
    full = _with_roles(_rows(debug_data, 12), cfg)
    new = full["campaign_id"].unique()[[1, 4, 5, 9]]
    cold = full["campaign_id"].isin(new)
    df = full[~(cold & (full["role"] == "support"))].reset_index(drop=True)
    summary = run_predict_raw(debug_checkpoint, _write(df, tmp_path / "logs"), tmp_path / "out", inner_steps=steps,
                              progress=False, nproc=nproc)
    assert summary["tasks"] == 12 and summary["tasks_without_support"] == 4
    progress = json.loads((tmp_path / "out" / "_progress.json").read_text())
    assert progress["tasks_without_support"] == 4
    got = _read(tmp_path / "out")
    # the reference: every task scored with its support rows, K = steps, and unadapted (K = 0)
    q = (full["role"] == "query").to_numpy()
    kw = dict(column_types=meta.get("input_columns"), id_hash=meta["id_hash"])
    adapted = score_rows(model, cfg, full, steps, **kw)["score"].to_numpy()[q]
    shared = score_rows(model, cfg, full, 0, **kw)["score"].to_numpy()[q]
    is_new = cold.to_numpy()[q]
    assert len(got) == q.sum() and (got["task_key"].isin(new).to_numpy() == is_new).all()
    np.testing.assert_allclose(got["score"][is_new], shared[is_new], atol=1e-5)
    np.testing.assert_allclose(got["score"][~is_new], adapted[~is_new], atol=1e-5)
    support = full[full["role"] == "support"].groupby("campaign_id").size()
    want_support = np.where(is_new, 0, full.loc[q, "campaign_id"].map(support).to_numpy())
    np.testing.assert_array_equal(got["support_rows"], want_support)
    # the pyfunc model's scoring of the same rows
    served = score_rows(model, cfg, df, steps, meta.get("input_columns"), id_hash=meta["id_hash"])["score"]
    np.testing.assert_allclose(served[df["role"] == "query"].to_numpy(), got["score"].to_numpy(), atol=1e-5)


class _Crash(RuntimeError):
    pass


def test_raw_predict_in_buckets_resumes_after_a_crash_with_every_row_once(debug_checkpoint, debug_data, tmp_path,
                                                                          monkeypatch):
    cfg = load_unsharded(debug_checkpoint)[1]
    src = _write(_with_roles(_rows(debug_data, 120), cfg), tmp_path / "logs")
    kw = dict(inner_steps=1, progress=False, memory_mb=1)  # a 1 MiB cap: several buckets
    whole = run_predict_raw(debug_checkpoint, src, tmp_path / "whole", **kw)
    assert whole["parts"] > 2
    real = workers_mod.score_featurised
    calls = {"n": 0}

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Crash
        return real(*a, **k)

    monkeypatch.setattr(workers_mod, "score_featurised", crash_on_third)
    with pytest.raises(_Crash):
        run_predict_raw(debug_checkpoint, src, tmp_path / "p", **kw)
    monkeypatch.setattr(workers_mod, "score_featurised", real)
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
    noquery = df[~((df["campaign_id"] == df["campaign_id"].iloc[0]) & (df["role"] == "query"))]
    with pytest.raises(PrepareError, match=r"noquery: input rows: task .* has no query rows"):
        run_predict_raw(debug_checkpoint, _write(noquery, tmp_path / "noquery"), tmp_path / "o3", progress=False)
    # raw columns whose types do not match what the checkpoint was trained on
    wrong = df.assign(device=df["device"].astype(str) + "x")
    with pytest.raises(PrepareError, match=r"wrongtype: .*column 'device' cannot be read as int64 \(its type in "
                                           r"the training data\)"):
        run_predict_raw(debug_checkpoint, _write(wrong, tmp_path / "wrongtype"), tmp_path / "o5", progress=False)
    flat = df.assign(interests=1)
    with pytest.raises(PrepareError, match=r"flat: .*column 'interests' must be a list column"):
        run_predict_raw(debug_checkpoint, _write(flat, tmp_path / "flat"), tmp_path / "o6", progress=False)
    # the command line refuses shard options with --input
    proc = run_gmeta(["predict", "--checkpoint", debug_checkpoint, "--input", tmp_path / "badrole", "--split", "val",
                      "--out", tmp_path / "o4"])
    assert proc.returncode == 2 and "--input reads raw rows" in proc.stderr


def test_two_models_in_one_pass_equal_two_runs(debug_checkpoint, debug_data, tmp_path):
    from tests.conftest import DEBUG_CONFIG

    proc = run_gmeta(  # a second model of the same features: ERM, briefly trained
        ["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", f"data.shards_dir={debug_data['shards']}",
         f"train.output_dir={tmp_path / 'erm'}", "meta.algorithm=erm", "train.max_steps=20", "train.eval_at_end=false",
         "tracking.enabled=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    erm = tmp_path / "erm" / "checkpoint"
    cfg = load_unsharded(debug_checkpoint)[1]
    src = _write(_with_roles(_rows(debug_data, 60), cfg), tmp_path / "logs")
    both = run_predict_raw([debug_checkpoint, erm], src, tmp_path / "both", inner_steps=2, progress=False)
    assert [m["column"] for m in both["models"]] == ["score_0", "score_1"]
    for i, c in enumerate([debug_checkpoint, erm]):
        run_predict_raw(c, src, tmp_path / f"one{i}", inner_steps=2, progress=False)
    one = [_read(tmp_path / f"one{i}") for i in range(2)]
    got = _read(tmp_path / "both")
    for i in range(2):
        pd.testing.assert_series_equal(got["input_row"], one[i]["input_row"])
        np.testing.assert_allclose(got[f"score_{i}"], one[i]["score"], atol=1e-6)
    assert not np.allclose(got["score_0"], got["score_1"])  # two different models
    # models that read the rows differently are refused, naming the checkpoint
    import shutil

    from gmeta.checkpoint import META

    other = tmp_path / "other"
    shutil.copytree(erm, other)
    meta = json.loads((other / META).read_text())
    meta["config"]["features"]["true_prob"] = ""  # (a field that leaves the model as it is)
    (other / META).write_text(json.dumps(meta))
    with pytest.raises(PredictError, match=r"--checkpoint .*other: its features differ"):
        run_predict_raw([debug_checkpoint, other], src, tmp_path / "bad", progress=False)


def _faulty(monkeypatch, faults: str) -> None:
    monkeypatch.setenv(workers_mod.FAULTS_ENV, faults)


JOB = dict(inner_steps=1, progress=False, units=8)  # the multi-process tests' settings: 8 units


def _job(debug_checkpoint, debug_data, tmp_path):
    """Logs of 120 campaigns, and their predictions by one uninterrupted process (in
    ``tmp_path / "one"``): (logs directory, the predictions, that run's summary)."""
    cfg = load_unsharded(debug_checkpoint)[1]
    src = _write(_with_roles(_rows(debug_data, 120), cfg), tmp_path / "logs")
    one = run_predict_raw(debug_checkpoint, src, tmp_path / "one", **JOB)
    return src, _read(tmp_path / "one"), one


@pytest.fixture(scope="module")
def job(debug_checkpoint, debug_data, tmp_path_factory):
    """``_job``'s logs and one-process predictions, made once for the tests of this module,
    which only read them."""
    return _job(debug_checkpoint, debug_data, tmp_path_factory.mktemp("predict_job"))


def test_two_worker_processes_score_as_one_process(debug_checkpoint, tmp_path, job, monkeypatch):
    src, want, one = job
    kw = JOB
    two = run_predict_raw(debug_checkpoint, src, tmp_path / "two", nproc=2, **kw)
    assert two["rows"] == one["rows"] and two["tasks"] == one["tasks"] == 120 and two["parts"] == one["parts"]
    pd.testing.assert_frame_equal(want, _read(tmp_path / "two"))
    assert not list((tmp_path / "two").glob(".predict-*")) and not list((tmp_path / "two").glob("*.tmp"))
    # SIGKILLed workers: one before scoring its 2nd unit, the other after writing its 1st part
    # but before reporting it (so that part is written twice); replacements finish the job
    _faulty(monkeypatch, "kill=0:2,kill_written=1:1")
    killed = run_predict_raw(debug_checkpoint, src, tmp_path / "killed", nproc=2, **kw)
    got = _read(tmp_path / "killed")
    assert killed["rows"] == one["rows"] and not got["input_row"].duplicated().any()
    pd.testing.assert_frame_equal(want, got)
    progress = json.loads((tmp_path / "killed" / "_progress.json").read_text())
    assert sorted(progress["done"]) == sorted(set(progress["done"])) and progress["complete"]


def test_a_job_whose_workers_all_die_resumes_with_another_process_count(debug_checkpoint, tmp_path, job,
                                                                        monkeypatch):
    src, want, _ = job
    kw = JOB
    _faulty(monkeypatch, "kill=0:2,kill=1:3")
    with pytest.raises(PredictError, match="every worker died.*--resume"):
        run_predict_raw(debug_checkpoint, src, tmp_path / "p", nproc=2, max_restarts=0, **kw)
    done = json.loads((tmp_path / "p" / "_progress.json").read_text())["done"]
    assert 0 < len(done) < 8
    # what a worker killed mid-write leaves: a half-written temporary part, and a part renamed
    # into place but never reported; resuming drops both and writes those units again
    missing = sorted(set(range(8)) - set(done))
    (tmp_path / "p" / f"part-{missing[0]:05d}.parquet.999.tmp").write_bytes(b"PAR1 half")
    (tmp_path / "p" / f"part-{missing[-1]:05d}.parquet").write_bytes(b"PAR1 not reported")
    monkeypatch.delenv(workers_mod.FAULTS_ENV)
    resumed = run_predict_raw(debug_checkpoint, src, tmp_path / "p", resume=True, **kw)  # 1 process now
    assert resumed["complete"] and 0 < resumed["new_rows"] < resumed["rows"]
    pd.testing.assert_frame_equal(want, _read(tmp_path / "p"))


def test_a_worker_input_error_stops_the_job_naming_the_file(debug_checkpoint, debug_data, tmp_path):
    cfg = load_unsharded(debug_checkpoint)[1]
    df = _with_roles(_rows(debug_data, 20), cfg)
    # a task with support rows only is an input error (nothing to score; one with query rows
    # only is not: the shared model scores it)
    noquery = df[~((df["campaign_id"] == df["campaign_id"].iloc[0]) & (df["role"] == "query"))]
    with pytest.raises(PrepareError, match=r"noquery: .*has no query rows"):
        run_predict_raw(debug_checkpoint, _write(noquery, tmp_path / "noquery"), tmp_path / "o", nproc=2,
                        units=4, progress=False)
    progress = json.loads((tmp_path / "o" / "_progress.json").read_text())
    assert not progress["complete"]
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".predict-")]


def _node(debug_checkpoint, src, out, port, *extra, **popen):
    """Node 1 of a 2-node job on this machine (the command each other node runs)."""
    return subprocess.Popen([sys.executable, "-m", "gmeta.cli", "predict", "--checkpoint", str(debug_checkpoint),
                             "--input", str(src), "--out", str(out), "--nproc-per-node", "1", "--nnodes", "2",
                             "--node-rank", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_two_nodes_share_the_queue_and_a_lost_node_has_its_units_taken_over(debug_checkpoint, tmp_path, job,
                                                                            monkeypatch):
    import os
    import signal
    import threading
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from gmeta.parallel.dist import free_port

    src, want, _ = job
    kw = JOB
    # two nodes, one worker each: both take units (node 0's claims nothing until a worker of
    # node 1 has finished a unit, however late node 1 starts); node 1's first worker is killed
    # before its first unit, and its replacement scores
    _faulty(monkeypatch, "wait_done=0:1,kill=1:1")
    port = free_port()
    node1 = _node(debug_checkpoint, src, tmp_path / "two", port)
    two = run_predict_raw(debug_checkpoint, src, tmp_path / "two", nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", **kw)
    log1, _ = node1.communicate(timeout=120)
    assert node1.returncode == 0, log1[-3000:]
    assert "worker 1 died (signal 9)" in log1
    assert two["worker_units"].get(1, 0) >= 1 and sum(two["worker_units"].values()) == 8, two["worker_units"]
    pd.testing.assert_frame_equal(want, _read(tmp_path / "two"))
    # node 1 lost with its worker (the machine gone) while scoring: node 0 takes its unit over
    # (node 0 waits for node 1's first claim, so that node 1 holds a unit when it is lost)
    _faulty(monkeypatch, "wait=0:1,slow=1:30")
    port = free_port()
    node1 = _node(debug_checkpoint, src, tmp_path / "lost", port, start_new_session=True)

    def kill_node_when_it_holds_a_unit() -> None:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
        while store.get("claims/1") == b"[]" if store.check(["claims/1"]) else True:
            time.sleep(0.05)
        os.killpg(node1.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_node_when_it_holds_a_unit, daemon=True)
    killer.start()
    lost = run_predict_raw(debug_checkpoint, src, tmp_path / "lost", nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}",
                           node_timeout_s=5, **kw)
    killer.join(timeout=5)
    node1.wait(timeout=30)
    assert node1.returncode == -signal.SIGKILL
    assert set(lost["worker_units"]) == {0}  # node 1 finished nothing
    got = _read(tmp_path / "lost")
    assert not got["input_row"].duplicated().any()
    pd.testing.assert_frame_equal(want, got)


def test_tables_sharded_among_the_workers_score_as_one_process(debug_checkpoint, tmp_path, job, monkeypatch,
                                                               capfd):
    import re

    src, want, _ = job
    kw = JOB
    sharded = run_predict_raw(debug_checkpoint, src, tmp_path / "sharded", nproc=2, shard_tables=True, **kw)
    got = _read(tmp_path / "sharded")
    assert sharded["rows"] == len(want) and set(sharded["worker_units"]) == {0}  # the gang's rank 0 reports
    held = re.findall(r"predict worker (\d): tables sharded among 2 processes: ([\d.]+) of ([\d.]+) MiB",
                      capfd.readouterr().err)
    assert sorted(w for w, _, _ in held) == ["0", "1"]
    assert all(0 < float(h) < float(t) for _, h, t in held), held  # each holds a share, not the whole
    pd.testing.assert_frame_equal(want.drop(columns="score"), got.drop(columns="score"))
    np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)
    # a member of the gang killed mid-job: the gang starts again, its unit is scored again
    _faulty(monkeypatch, "kill=1:3")
    again = run_predict_raw(debug_checkpoint, src, tmp_path / "killed", nproc=2, shard_tables=True, **kw)
    got = _read(tmp_path / "killed")
    assert again["rows"] == len(want) and not got["input_row"].duplicated().any()
    np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)
    with pytest.raises(PredictError, match="--shard-tables .* needs --nproc-per-node >= 2"):
        run_predict_raw(debug_checkpoint, src, tmp_path / "bad", shard_tables=True, **kw)
