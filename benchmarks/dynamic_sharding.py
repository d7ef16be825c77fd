"""Training on a shared cluster: a straggler, a killed rank and the data stall, with
dynamic data sharding (data.sharding=dynamic) on configs/ads_cvr.yaml (MAML, the DLRM of
embedding_dim 16), 2 processes on this machine.

1. A straggler: rank 1's meta step sleeps ``--slow-ms`` per task (a machine that slower;
   its time grows with its share, as compute does). Tasks/s with adaptive per-rank batch
   sizes (train.adaptive_batch) against equal shares, same slowdown, same steps, and an
   unslowed run for scale.
2. A rank killed mid-epoch under torchrun --max-restarts 1 (checkpoints every
   ``--ckpt-every`` steps): the tasks of the epoch trained in steps that survived, counted
   from the record (each once?), and the wall time against the same job uninterrupted.
3. Data stall of dynamic against static sharding on the same job (``--stall-steps`` steps).
4. The same training: ``--check-steps`` steps of the slowed job with equal and with adaptive
   shares, recorded, and their global batches trained again in one process from the same
   initial weights: the parameters are compared (the loss weighting makes a step the same
   whatever the split; the equal shares' difference is the floor of float summation order).

    python -m benchmarks.dynamic_sharding [--steps 120] [--slow-ms 25] [--parts 1 2 3 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import ROOT, emit, ensure_data, fresh_checkpoints, prepared_workdir, train_run

CONFIG = ROOT / "configs" / "ads_cvr.yaml"


def torchrun(out: Path, shards: Path, nproc: int, extra: list[str], env: dict, max_restarts: int = 0,
             tasks_per_batch: int = 32) -> float:
    """The job under torchrun with the benchmark harness, in a fresh ``out``; returns its
    wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "--module", "benchmarks.elastic_harness", "train",
           "--config", str(CONFIG), "--nproc-per-node", str(nproc), "--resume", "auto",
           f"data.shards_dir={shards}", f"train.output_dir={out}", "tracking.enabled=false",
           "train.eval_at_end=false", "data.sharding=dynamic", f"meta.tasks_per_batch={tasks_per_batch}", *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **env},
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-6000:])
    return time.perf_counter() - t


def records(record: Path) -> dict[tuple[int, int], list[dict]]:
    return {(int(p.stem.split("-")[0][7:]), int(p.stem.split("rank")[1])):
            [json.loads(line) for line in p.read_text().splitlines()] for p in record.glob("attempt*-rank*.jsonl")}


def loop_rate(rec: list[dict], tasks: int) -> float:
    """Tasks per second over the recorded steps after the first (start-up excluded)."""
    return tasks / max(rec[-1]["t"] - rec[0]["t"], 1e-9)


def _recorded(work: Path, shards: Path, name: str, extra: list[str], env: dict) -> tuple[float, dict]:
    rec = work / f"rec-{name}"
    for p in rec.glob("*"):
        p.unlink()
    rec.mkdir(exist_ok=True)
    wall = torchrun(work / f"run-{name}", shards, 2, extra, {**env, "GMETA_BENCH_RECORD": str(rec)})
    return wall, records(rec)


def _replay_difference(work: Path, shards: Path, name: str, r: dict, common: list[str], init: Path) -> float:
    """Train run ``name``'s recorded global batches again in one process from ``init``;
    the largest difference of any parameter between the two."""
    from gmeta.checkpoint import load_unsharded

    replay = work / f"replay-{name}.jsonl"
    with replay.open("w") as f:
        for r0, r1 in zip(r[(0, 0)], r[(0, 1)]):
            f.write(json.dumps((r0["refs"] or []) + (r1["refs"] or [])) + "\n")
    torchrun(work / f"run-replay-{name}", shards, 1, [*common, "train.max_steps=0", "train.epochs=1"],
             {"GMETA_BENCH_REPLAY": str(replay)}, tasks_per_batch=64)
    a, _, ma = load_unsharded(work / f"run-{name}" / "checkpoint")
    b, _, mb = load_unsharded(work / f"run-replay-{name}" / "checkpoint")
    assert ma["step"] == mb["step"], (ma["step"], mb["step"])
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def straggler(work: Path, shards: Path, steps: int, slow_ms: float) -> dict:
    from gmeta.config import load_config

    init = work / "init"
    if not init.is_dir():
        fresh_checkpoints(load_config(CONFIG), shards, [init])
    slow = {"GMETA_BENCH_SLOW": f"1:{slow_ms / 1000}"}
    out: dict = {}
    # tasks/s
    common = [f"train.max_steps={steps}", f"train.init_from={init}", "train.log_every=20"]
    for name, extra, env in [("unslowed", [], {}), ("equal", [], slow),
                             ("adaptive", ["train.adaptive_batch=true"], slow)]:
        wall, r = _recorded(work, shards, name, [*common, *extra], env)
        tasks = sum(len(s["refs"] or []) for k in r for s in r[k][1:])  # every rank's, after the first step
        rate = loop_rate(r[(0, 0)], tasks)
        share = len(r[(0, 1)][-1]["refs"] or [])
        out[name] = {"tasks_per_s": rate, "wall_s": wall, "rank1_tasks_last": share}
        print(f"straggler, {name:9s}: {rate:7.1f} tasks/s over steps 2-{steps} ({wall:.0f}s in all); rank 1's "
              f"last step: {share} of 64 tasks", flush=True)
    out["adaptive_over_equal"] = out["adaptive"]["tasks_per_s"] / out["equal"]["tasks_per_s"]
    print(f"adaptive / equal shares: {out['adaptive_over_equal']:.2f}x (target >= 1.5x); unslowed / equal: "
          f"{out['unslowed']['tasks_per_s'] / out['equal']['tasks_per_s']:.2f}x", flush=True)
    return out


def same_training(work: Path, shards: Path, slow_ms: float, check_steps: int) -> dict:
    """Short runs, each one's global batches trained again in one process from the same
    weights; equal shares give the floor (float summation order). Short: over tens of
    steps float differences grow (Adam and row-wise Adagrad scale a row's first, tiny
    gradient to a full step), so the comparison is made where they have not yet."""
    init = work / "init"
    slow = {"GMETA_BENCH_SLOW": f"1:{slow_ms / 1000}"}
    out: dict = {}
    # a split decided after step 1 applies from step 5 (lag: 1 worker x prefetch 1 + 2)
    common = [f"train.max_steps={check_steps}", f"train.init_from={init}", "train.adaptive_batch_every=1",
              "data.prefetch_factor=1"]
    for name, extra in [("check-equal", []), ("check-adaptive", ["train.adaptive_batch=true"])]:
        _, r = _recorded(work, shards, name, [*common, *extra], slow)
        split = sorted({(len(a["refs"] or []), len(b["refs"] or [])) for a, b in zip(r[(0, 0)], r[(0, 1)])})
        diff = _replay_difference(work, shards, name, r, common, init)
        out[name] = {"max_abs_diff": diff, "splits": split}
        print(f"{name}: {check_steps} steps, splits (rank 0, rank 1) {split}; one-process replay of its global "
              f"batches: largest parameter difference {diff:.2e}", flush=True)
    return out


def killed(work: Path, shards: Path, ckpt_every: int) -> dict:
    from gmeta.io.manifest import load_manifest

    epoch = int(load_manifest(shards)["splits"]["train"]["tasks"])
    out: dict = {"epoch_tasks": epoch}
    for name, kill in [("whole", ""), ("killed", "1:12")]:
        rec = work / f"rec-{name}"
        for p in rec.glob("*"):
            p.unlink()
        rec.mkdir(exist_ok=True)
        wall = torchrun(work / f"run-{name}", shards, 2,
                        ["train.epochs=1", f"train.checkpoint_every_steps={ckpt_every}"],
                        {"GMETA_BENCH_RECORD": str(rec), "GMETA_BENCH_KILL": kill}, max_restarts=1)
        r = records(rec)
        # attempt 0's steps after the checkpoint attempt 1 resumed from were rolled back
        resumed = max((int(p.read_text()) for p in rec.glob("attempt1-rank*.resume")), default=0)
        survived = [s for (a, _), recs in r.items() for s in recs if a > 0 or not resumed or s["step"] <= resumed]
        counts = Counter(tuple(x) for s in survived for x in (s["refs"] or []))
        out[name] = {"wall_s": wall, "tasks": sum(counts.values()), "distinct": len(counts),
                     "most": max(counts.values()), "attempts": len({a for a, _ in r}), "resumed_at": resumed}
        print(f"kill, {name:6s}: {wall:6.1f}s; {len(counts)} of the epoch's {epoch} tasks trained, "
              f"{sum(counts.values())} in all "
              f"(most times one task: {max(counts.values())}); attempts {out[name]['attempts']}"
              + (f", resumed at step {resumed}" if resumed else ""), flush=True)
    out["seconds_lost"] = out["killed"]["wall_s"] - out["whole"]["wall_s"]
    print(f"time lost to the kill: {out['seconds_lost']:.1f}s ({out['killed']['wall_s'] / out['whole']['wall_s']:.2f}x "
          "the uninterrupted run)", flush=True)
    return out


def stall(work: Path, steps: int) -> dict:
    cfg = prepared_workdir(work)
    out = {}
    for sharding in ("static", "dynamic"):
        m = train_run(cfg, work, f"stall-{sharding}", 2, [f"data.sharding={sharding}", f"train.max_steps={steps}"])
        out[sharding] = {k: m[f"train/{k}"] for k in ("data_stall_share_total", "data_stall_share_steady",
                                                       "tasks_per_s_total")}
        print(f"data stall, {sharding:7s}: {100 * out[sharding]['data_stall_share_total']:5.2f}% of the loop, "
              f"{100 * out[sharding]['data_stall_share_steady']:5.2f}% after the first batch, "
              f"{out[sharding]['tasks_per_s_total']:.0f} tasks/s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--slow-ms", type=float, default=25.0)
    ap.add_argument("--check-steps", type=int, default=8)
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--stall-steps", type=int, default=200)
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench-dynamic"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if 1 in args.parts:
        _, _, shards = ensure_data(work, 20000)
        result["straggler"] = straggler(work, shards, args.steps, args.slow_ms)
    if 2 in args.parts:  # a small set: one epoch is 28 steps of 64 tasks
        _, _, shards = ensure_data(work, 2000)
        result["kill"] = killed(work, shards, args.ckpt_every)
    if 3 in args.parts:
        result["stall"] = stall(work / "stall", args.stall_steps)
    if 4 in args.parts:
        _, _, shards = ensure_data(work, 20000)
        result["same_training"] = same_training(work, shards, args.slow_ms, args.check_steps)
    emit("dynamic_sharding", result)


if __name__ == "__main__":
    main()
