"""Prediction on raw logs: ``gmeta predict --input`` against the MLflow pyfunc model applied
to one task's DataFrame at a time (what a user does without it); 1 against 2 worker
processes (``--nproc-per-node``); one worker slowed (a straggler) with the shared queue
against a static split of the same units; and two models scored in one pass
(``--checkpoint A --checkpoint B``) against two separate runs.

The logs are the raw rows of held-out campaigns of the synthetic ads-CVR set (configs/
ads_cvr.yaml's model, freshly initialised: throughput does not depend on the weights), with
a ``role`` column (the split rule's roles; query labels removed). Both score the same rows
with the same inner steps, measured alternately in one run.

    python -m benchmarks.predict_raw_throughput [--tasks 300] [--sections pyfunc,processes,straggler,models,models-big]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import emit, ensure_data, fresh_checkpoints
from gmeta import checkpoint
from gmeta.inference.predict_raw import UNITS, run_predict_raw
from gmeta.inference.pyfunc import log_model
from gmeta.inference.serving import assign_roles
from gmeta.inference.workers import FAULTS_ENV
from gmeta.io.reader import task_keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=300, help="new campaigns in the logs (pyfunc, models)")
    ap.add_argument("--scale-tasks", type=int, default=20_000,
                    help="campaigns in the larger logs of the processes and straggler sections: a job long "
                         "enough that starting the worker processes (seconds) is not what is measured")
    ap.add_argument("--scale-copies", type=int, default=3,
                    help="copies of those campaigns' rows, each under new campaign ids, in the larger logs")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench"))
    ap.add_argument("--sections", default="pyfunc,processes,straggler,models,models-big",
                    help="comma-separated: pyfunc, processes, straggler, models (on the small logs), models-big "
                         "(two models on the larger logs)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    work = Path(args.workdir)
    cfg, raw, shards = ensure_data(work, 20_000)
    bench = work / "predict-raw-bench"
    shutil.rmtree(bench, ignore_errors=True)
    bench.mkdir(parents=True)
    # two models of the same features (champion and challenger), freshly initialised
    ckpt, ckpt2 = fresh_checkpoints(cfg, shards, [bench / "checkpoint", bench / "checkpoint2"])
    steps = cfg.meta.inner_steps

    def write_logs(keys: list, dest: Path) -> pd.DataFrame:
        """The raw rows of ``keys`` with their role (the split rule's), query labels removed."""
        logs = assign_roles(pd.read_parquet(raw, filters=[(cfg.features.task_key, "in", keys)]), cfg)
        logs = logs[logs["role"] != ""].reset_index(drop=True)
        logs["label"] = logs["label"].astype(float)
        logs.loc[logs["role"] == "query", "label"] = np.nan
        dest.mkdir()
        logs.to_parquet(dest / "part-0.parquet")
        return logs

    logs = write_logs(sorted(task_keys(shards, "eval").values())[: args.tasks], bench / "logs")
    per_task = [g for _, g in logs.groupby(cfg.features.task_key, sort=False)]
    n_query = int((logs["role"] == "query").sum())
    figures: dict[str, float] = {"tasks": len(per_task), "query_rows": n_query, "inner_steps": steps}

    def predict(out: str, ckpts=None, src: str = "logs", rows: int = n_query, **kw) -> float:
        shutil.rmtree(bench / out, ignore_errors=True)
        t0 = time.perf_counter()
        got = run_predict_raw(ckpts or ckpt, bench / src, bench / out, inner_steps=steps, progress=False, **kw)
        assert got["rows"] == rows, (out, got["rows"], rows)
        return time.perf_counter() - t0

    if {"processes", "straggler", "models-big"} & sections:
        all_keys = sorted(pd.read_parquet(raw, columns=[cfg.features.task_key])[cfg.features.task_key].unique())
        big = write_logs(all_keys[: args.scale_tasks], bench / "big")
        key, step = cfg.features.task_key, int(big[cfg.features.task_key].max()) + 1
        big = pd.concat([big.assign(**{key: big[key] + i * step}) for i in range(args.scale_copies)],
                        ignore_index=True)  # each copy: new campaigns with the same rows
        big.to_parquet(bench / "big" / "part-0.parquet")
        big_query = int((big["role"] == "query").sum())
        figures.update(scale_tasks=int(big[cfg.features.task_key].nunique()), scale_query_rows=big_query)
        print(f"larger logs: {len(big)} rows of {figures['scale_tasks']} tasks, {big_query} query rows")
        del big

    if "pyfunc" in sections:
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{bench / 'mlflow.db'}")
        exp = mlflow.create_experiment("bench", artifact_location=str(bench / "artifacts"))
        with mlflow.start_run(experiment_id=exp):
            loaded_model, loaded_cfg, _ = checkpoint.load_unsharded(ckpt)
            uri = log_model(ckpt, loaded_cfg, loaded_model)
        pyfunc = mlflow.pyfunc.load_model(uri)

        results: dict[str, list[float]] = {}
        for name in ("gmeta", "pyfunc", "gmeta", "pyfunc"):  # alternated: drift of a shared machine hits both
            if name == "gmeta":
                dt = predict("out")
            else:
                t0 = time.perf_counter()
                got = sum(int(pyfunc.predict(df, params={"inner_steps": steps})["score"].notna().sum())
                          for df in per_task)
                dt = time.perf_counter() - t0
                assert got == n_query, (name, got, n_query)
            results.setdefault(name, []).append(n_query / dt)
            print(f"{name:6s}: {n_query} query rows of {len(per_task)} tasks in {dt:6.2f}s = "
                  f"{n_query / dt:8.0f} rows/s")
        g, p = float(np.median(results["gmeta"])), float(np.median(results["pyfunc"]))
        print(f"gmeta predict --input {g:.0f} rows/s vs pyfunc per task {p:.0f} rows/s: {g / p:.1f}x "
              f"(configs/ads_cvr.yaml model, K={steps}, 1 process)")
        figures.update(gmeta_rows_per_s=g, pyfunc_rows_per_s=p, ratio=g / p)

    if "processes" in sections:
        walls: dict[int, list[float]] = {}
        for n in (1, 2, 1, 2):
            walls.setdefault(n, []).append(predict(f"nproc{n}", src="big", rows=big_query, nproc=n, units=UNITS))
            print(f"{n} process(es): {big_query} query rows in {walls[n][-1]:6.2f}s = "
                  f"{big_query / walls[n][-1]:8.0f} rows/s")
        r1, r2 = (big_query / float(np.median(walls[n])) for n in (1, 2))
        print(f"gmeta predict --input with 2 processes {r2:.0f} rows/s vs 1 process {r1:.0f} rows/s: "
              f"{r2 / r1:.2f}x (configs/ads_cvr.yaml model, K={steps}, {os.cpu_count()} cores)")
        figures.update(rows_per_s_1_process=r1, rows_per_s_2_processes=r2, process_ratio=r2 / r1)

    if "straggler" in sections:
        # worker 0 sleeps before each unit: twice a unit's time, from the 1-process time per unit
        unit_s = predict("calib", src="big", rows=big_query, nproc=1, units=UNITS) / UNITS
        slow = round(2 * unit_s, 3)
        os.environ[FAULTS_ENV] = f"slow=0:{slow}"
        try:
            walls_s: dict[str, list[float]] = {}
            for schedule in ("queue", "static", "queue", "static"):
                walls_s.setdefault(schedule, []).append(predict(f"straggler-{schedule}", src="big", rows=big_query,
                                                                  nproc=2, schedule=schedule, units=UNITS))
                print(f"straggler ({slow}s per unit on worker 0), {schedule:6s}: {walls_s[schedule][-1]:6.2f}s")
        finally:
            del os.environ[FAULTS_ENV]
        q, st = (float(np.median(walls_s[k])) for k in ("queue", "static"))
        print(f"straggler: shared queue {q:.2f}s vs static split {st:.2f}s: {st / q:.2f}x "
              f"(2 processes, {UNITS} units, configs/ads_cvr.yaml model)")
        figures.update(straggler_sleep_s=slow, straggler_queue_s=q, straggler_static_s=st, straggler_ratio=st / q)

    for section, src, rows in (("models", "logs", n_query), ("models-big", "big", figures.get("scale_query_rows"))):
        if section not in sections:
            continue
        times: dict[str, list[float]] = {}
        for name in ("one pass", "two runs", "one pass", "two runs"):
            dt = (predict("both", [ckpt, ckpt2], src=src, rows=rows) if name == "one pass"
                  else predict("one0", [ckpt], src=src, rows=rows) + predict("one1", [ckpt2], src=src, rows=rows))
            times.setdefault(name, []).append(dt)
            print(f"{name}: two models over {rows} query rows in {times[name][-1]:6.2f}s")
        one, two = float(np.median(times["one pass"])), float(np.median(times["two runs"]))
        print(f"two models in one pass {one:.2f}s vs two runs {two:.2f}s: {two / one:.2f}x ({rows} query rows, "
              "configs/ads_cvr.yaml model, 1 process)")
        key = "two_models" if section == "models" else "two_models_big"
        figures.update({f"{key}_one_pass_s": one, f"{key}_two_runs_s": two, f"{key}_ratio": two / one})
    emit("predict_raw_throughput", figures)


if __name__ == "__main__":
    main()
