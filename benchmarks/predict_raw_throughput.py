"""Prediction on raw logs: ``gmeta predict --input`` against the MLflow pyfunc model applied
to one task's DataFrame at a time (what a user does without it); and two models scored in
one pass (``--checkpoint A --checkpoint B``) against two separate runs.

The logs are the raw rows of held-out campaigns of the synthetic ads-CVR set (configs/
ads_cvr.yaml's model, freshly initialised: throughput does not depend on the weights), with
a ``role`` column (the split rule's roles; query labels removed). Both score the same rows
with the same inner steps, measured alternately in one run.

    python -m benchmarks.predict_raw_throughput [--tasks 300]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import emit, ensure_data, fresh_checkpoints
from gmeta import checkpoint
from gmeta.io.reader import task_keys
from gmeta.predict_raw import run_predict_raw
from gmeta.serving import assign_roles, log_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=300, help="new campaigns in the logs")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench"))
    args = ap.parse_args()
    work = Path(args.workdir)
    cfg, raw, shards = ensure_data(work, 20_000)
    bench = work / "predict-raw-bench"
    shutil.rmtree(bench, ignore_errors=True)
    bench.mkdir(parents=True)
    # two models of the same features (champion and challenger), freshly initialised
    ckpt, ckpt2 = fresh_checkpoints(cfg, shards, [bench / "checkpoint", bench / "checkpoint2"])
    steps = cfg.meta.inner_steps

    keys = sorted(task_keys(shards, "eval").values())[: args.tasks]
    rows = pd.read_parquet(raw, filters=[(cfg.features.task_key, "in", keys)])
    logs = assign_roles(rows, cfg)
    logs = logs[logs["role"] != ""].reset_index(drop=True)
    logs["label"] = logs["label"].astype(float)
    logs.loc[logs["role"] == "query", "label"] = np.nan
    (bench / "logs").mkdir()
    logs.to_parquet(bench / "logs" / "part-0.parquet")
    per_task = [g for _, g in logs.groupby(cfg.features.task_key, sort=False)]
    n_query = int((logs["role"] == "query").sum())

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{bench / 'mlflow.db'}")
    exp = mlflow.create_experiment("bench", artifact_location=str(bench / "artifacts"))
    with mlflow.start_run(experiment_id=exp):
        loaded_model, loaded_cfg, _ = checkpoint.load_unsharded(ckpt)
        uri = log_model(ckpt, loaded_cfg, loaded_model)
    pyfunc = mlflow.pyfunc.load_model(uri)

    results: dict[str, list[float]] = {}
    for name in ("gmeta", "pyfunc", "gmeta", "pyfunc"):  # alternated: drift of a shared machine hits both
        t0 = time.perf_counter()
        if name == "gmeta":
            shutil.rmtree(bench / "out", ignore_errors=True)
            got = run_predict_raw(ckpt, bench / "logs", bench / "out", inner_steps=steps, progress=False)["rows"]
        else:
            got = sum(int(pyfunc.predict(df, params={"inner_steps": steps})["score"].notna().sum())
                      for df in per_task)
        dt = time.perf_counter() - t0
        assert got == n_query, (name, got, n_query)
        results.setdefault(name, []).append(got / dt)
        print(f"{name:6s}: {got} query rows of {len(per_task)} tasks in {dt:6.2f}s = {got / dt:8.0f} rows/s")
    g, p = float(np.median(results["gmeta"])), float(np.median(results["pyfunc"]))
    print(f"gmeta predict --input {g:.0f} rows/s vs pyfunc per task {p:.0f} rows/s: {g / p:.1f}x "
          f"(configs/ads_cvr.yaml model, K={steps}, 1 process)")

    times: dict[str, list[float]] = {}
    for name in ("one pass", "two runs", "one pass", "two runs"):
        t0 = time.perf_counter()
        if name == "one pass":
            shutil.rmtree(bench / "both", ignore_errors=True)
            run_predict_raw([ckpt, ckpt2], bench / "logs", bench / "both", inner_steps=steps, progress=False)
        else:
            for i, c in enumerate((ckpt, ckpt2)):
                shutil.rmtree(bench / f"one{i}", ignore_errors=True)
                run_predict_raw(c, bench / "logs", bench / f"one{i}", inner_steps=steps, progress=False)
        times.setdefault(name, []).append(time.perf_counter() - t0)
        print(f"{name}: two models over {n_query} query rows in {times[name][-1]:6.2f}s")
    one, two = float(np.median(times["one pass"])), float(np.median(times["two runs"]))
    print(f"two models in one pass {one:.2f}s vs two runs {two:.2f}s: {two / one:.2f}x")
    emit("predict_raw_throughput", {"gmeta_rows_per_s": g, "pyfunc_rows_per_s": p, "ratio": g / p,
                                    "tasks": len(per_task), "query_rows": n_query, "inner_steps": steps,
                                    "two_models_one_pass_s": one, "two_models_two_runs_s": two,
                                    "two_models_ratio": two / one})


if __name__ == "__main__":
    main()
