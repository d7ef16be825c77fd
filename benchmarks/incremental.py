"""Daily delivery: incremental training against retraining from scratch, on synthetic days.

Model: configs/ads_cvr.yaml (MAML over the DLRM of embedding_dim 16, tables of 1-2M rows),
one process. Data: ``gmeta synth`` with ``synth.days`` (campaigns that start, run about
``--campaign-days`` days and end; users that come and go; a drifting shared part), each day
prepared as a partition (``gmeta prepare --partition``).

1. Prepare: the wall time of preparing the last day as a new partition, against preparing
   every day so far again as one data set (what a pipeline without partitions does).
2. Delivery: the model of day d is, incrementally, the model of day d-1 trained on day d
   (``--continue-from``), or, retrained, a new model trained on days 1..d (``data.partitions
   ..d``), both ``train.epochs`` passes over what they read. The wall time of each
   ``gmeta train`` command (process start, model build, training, checkpoint) per day, and
   the ratio retrained / incremental.
3. Quality: each day's models scored on the tasks new on the next day (``gmeta evaluate
   --next-day``), AUC and GAUC of the adapted model, mean and spread over ``--seeds``
   (train.seed; the data is the same).

    python -m benchmarks.incremental [--days 8] [--num-tasks 20000] [--seeds 0 1 2] [--retrain-days 3 5 7]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, emit

CONFIG = ROOT / "configs" / "ads_cvr.yaml"


def gmeta(args: list[str], cwd: Path) -> float:
    """``gmeta ARGS`` in a process of its own; returns its wall seconds."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gmeta.cli", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"gmeta {' '.join(args[:2])} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t


def day_names(raw: Path) -> list[str]:
    return sorted(p.name[3:] for p in raw.glob("dt=*"))


def train(work: Path, out: Path, data: list[str], seed: int, more: list[str]) -> tuple[float, float]:
    """One ``gmeta train``: (wall seconds of the command, seconds of its training loop,
    from the checkpoint's ``loop_seconds``)."""
    shutil.rmtree(out, ignore_errors=True)
    wall = gmeta(["train", "--config", str(CONFIG), "--nproc-per-node", "1", f"train.output_dir={out}",
                  f"train.seed={seed}", "train.eval_at_end=false", "tracking.enabled=false",
                  f"data.shards_dir={work / 'shards'}", *data, *more], work)
    return wall, float(json.loads((out / "checkpoint" / "meta.json").read_text())["loop_seconds"])


def next_day(work: Path, ckpts: list[Path], out: Path) -> list[dict]:
    gmeta(["evaluate", "--next-day", *map(str, ckpts), "--out", str(out), "--no-tracking"], work)
    return json.loads((out / "next_day.json").read_text())["days"]


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=8, help="days written; models are delivered for days 1..days-1")
    ap.add_argument("--num-tasks", type=int, default=20000, help="campaigns over all days (synth.num_tasks)")
    ap.add_argument("--campaign-days", type=float, default=2.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1, help="train.epochs of every model")
    ap.add_argument("--retrain-days", type=int, nargs="*", default=None,
                    help="the days (1-based) on which a model is also retrained from scratch (default: every day; "
                         "day 1's model is the same either way)")
    ap.add_argument("--workdir", default="", help="keep the data and runs here (default: a temporary folder)")
    args = ap.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gmeta-incremental-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "raw"
    synth = [f"synth.days={args.days}", f"synth.num_tasks={args.num_tasks}",
             f"synth.campaign_days={args.campaign_days}"]
    if not (raw / "_synth.json").is_file():
        gmeta(["synth", "--config", str(CONFIG), "--out", str(raw), *synth], work)
    days = day_names(raw)
    print(f"data: {args.num_tasks} campaigns over {len(days)} days ({days[0]}..{days[-1]}), configs/ads_cvr.yaml")

    # 1. prepare: each day as a partition; the last one's time against all days at once
    part_s = {}
    for d in days:
        part_s[d] = gmeta(["prepare", "--config", str(CONFIG), "--input", str(raw / f"dt={d}"),
                           "--out", str(work / "shards"), "--partition", d], work)
    shutil.rmtree(work / "whole", ignore_errors=True)
    whole_s = gmeta(["prepare", "--config", str(CONFIG), "--input", str(raw), "--out", str(work / "whole")], work)
    index = json.loads((work / "shards" / "partitions.json").read_text())["partitions"]
    for e in index:
        print(f"  {e['name']}: {e['tasks'].get('train', 0):,} training + {e['tasks'].get('eval', 0):,} held-out tasks, "
              f"{e['new_tasks']:,} new; prepared in {part_s[e['name']]:.1f}s")
    print(f"prepare: the last day as a new partition {part_s[days[-1]]:.1f}s, all {len(days)} days again as one "
          f"data set {whole_s:.1f}s: {whole_s / part_s[days[-1]]:.1f}x")

    # 2. and 3. per seed: the models of days 1..D-1, incremental and retrained
    epochs = [f"train.epochs={args.epochs}"]
    delivered = days[:-1]
    # way -> day -> [(command wall s, training loop s)] over seeds
    times: dict[str, dict[str, list[tuple[float, float]]]] = {"incremental": {}, "retrained": {}}
    quality: dict[str, dict[str, dict[str, list[float]]]] = {"incremental": {}, "retrained": {}}
    for seed in args.seeds:
        ckpts: dict[str, list[Path]] = {"incremental": [], "retrained": []}
        for i, d in enumerate(delivered):
            inc = work / f"s{seed}" / "incremental" / d
            if i == 0:  # the first day: one model, both ways
                s = train(work, inc, [f"data.partitions={d}"], seed, epochs)
                times["retrained"].setdefault(d, []).append(s)
                ckpts["retrained"].append(inc / "checkpoint")
            else:
                s = train(work, inc, [f"data.partitions={d}"], seed,
                          [*epochs, f"train.continue_from={ckpts['incremental'][-1]}"])
                if args.retrain_days is None or i + 1 in args.retrain_days:
                    ret = work / f"s{seed}" / "retrained" / d
                    r = train(work, ret, [f"data.partitions=..{d}"], seed, epochs)
                    times["retrained"].setdefault(d, []).append(r)
                    ckpts["retrained"].append(ret / "checkpoint")
            times["incremental"].setdefault(d, []).append(s)
            ckpts["incremental"].append(inc / "checkpoint")
            again = "{:.1f}s (loop {:.1f}s)".format(*times["retrained"][d][-1]) if d in times["retrained"] else "-"
            print(f"seed {seed} day {d}: incremental {s[0]:.1f}s (loop {s[1]:.1f}s), retrained {again}", flush=True)
        for way in ckpts:
            for nd in next_day(work, ckpts[way], work / f"s{seed}" / f"next-{way}"):
                if nd.get("day") is None or nd.get("auc") is None:
                    continue
                q = quality[way].setdefault(nd["trained_through"], {"auc": [], "gauc": [], "new_tasks": []})
                q["auc"].append(nd["auc"])
                q["gauc"].append(nd["gauc"])
                q["new_tasks"].append(nd["new_tasks"])

    print("\ndelivery of day d's model: wall seconds of the gmeta train command (its training loop's, from the "
          "checkpoint), mean over seeds; next-day quality: AUC / GAUC of the adapted model on the next day's new "
          f"tasks, mean ± std over seeds {args.seeds}:")
    print("| day | incremental s (loop) | retrained s (loop) | ratio (loop) | new tasks next day | AUC incremental "
          "| AUC retrained | GAUC incremental | GAUC retrained |")
    print("|---|---|---|---|---|---|---|---|---|")
    result: dict = {"prepare_partition_s": part_s[days[-1]], "prepare_whole_s": whole_s, "days": []}
    for d in delivered:
        ti = [statistics.mean(x[k] for x in times["incremental"][d]) for k in (0, 1)]
        tr = [statistics.mean(x[k] for x in times["retrained"][d]) for k in (0, 1)] if d in times["retrained"] \
            else None
        qi, qr = quality["incremental"].get(d), quality["retrained"].get(d)
        row: dict = {"day": d, "incremental_s": ti[0], "incremental_loop_s": ti[1],
                     "retrained_s": tr[0] if tr else None, "retrained_loop_s": tr[1] if tr else None}
        cells = [str(qi["new_tasks"][0]) if qi else "-", spread(qi["auc"]) if qi else "-",
                 spread(qr["auc"]) if qr else "-", spread(qi["gauc"]) if qi else "-", spread(qr["gauc"]) if qr else "-"]
        if qi:
            row.update(auc_incremental=qi["auc"], gauc_incremental=qi["gauc"], new_tasks=qi["new_tasks"][0])
        if qr:
            row.update(auc_retrained=qr["auc"], gauc_retrained=qr["gauc"])
        again = (f"{tr[0]:.1f} ({tr[1]:.1f}) | {tr[0] / ti[0]:.2f}x ({tr[1] / ti[1]:.2f}x)" if tr else "- | -")
        print(f"| {d} | {ti[0]:.1f} ({ti[1]:.1f}) | {again} | " + " | ".join(cells) + " |")
        result["days"].append(row)
    emit("incremental", result)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
