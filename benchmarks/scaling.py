"""Scaling and communication: tasks/s of MAML training on configs/ads_cvr.yaml with 1 vs 2
processes, and the share of step time spent waiting on communication (embedding
all-to-alls and the dense all-reduce) with and without the input-dist pipeline. One process
runs twice: with gmeta's default threads (the cores) and with one thread, which on a machine
that other jobs share can be much faster (threads that wait on each other for a core).

    python benchmarks/scaling.py [--steps 150]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import emit, prepared_workdir, train_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench-stall"))
    args = ap.parse_args()
    work = Path(args.workdir)
    cfg = prepared_workdir(work)
    common = [f"train.max_steps={args.steps}", "train.log_every=50"]
    runs = {
        "1proc": train_run(cfg, work, "scale-1proc", 1, common),
        "1proc_1thread": train_run(cfg, work, "scale-1proc-1thread", 1, common + ["train.threads=1"]),
        "2proc_pipeline": train_run(cfg, work, "scale-2proc-pipe", 2, common + ["train.pipeline=true"]),
        "2proc_plain": train_run(cfg, work, "scale-2proc-plain", 2, common + ["train.pipeline=false"]),
    }
    for name, m in runs.items():
        print(f"{name:16s}: {m['train/tasks_per_s_total']:7.0f} tasks/s, communication wait "
              f"{100 * m['train/comm_wait_share_total']:5.1f}% of step time, "
              f"data stall {100 * m['train/data_stall_share_total']:4.1f}%")
    one, two, plain = runs["1proc"], runs["2proc_pipeline"], runs["2proc_plain"]
    print(f"scaling 2 / 1 processes: {two['train/tasks_per_s_total'] / one['train/tasks_per_s_total']:.2f}x tasks/s "
          f"({two['train/tasks_per_s_total'] / runs['1proc_1thread']['train/tasks_per_s_total']:.2f}x the one "
          "process on one thread)")
    ratio = plain["train/comm_wait_share_total"] / max(two["train/comm_wait_share_total"], 1e-9)
    print(f"communication wait, plain / pipelined: {plain['train/comm_wait_share_total']:.3f} / "
          f"{two['train/comm_wait_share_total']:.3f} = {ratio:.2f}x; tasks/s pipelined / plain: "
          f"{two['train/tasks_per_s_total'] / plain['train/tasks_per_s_total']:.2f}x")
    emit("scaling", {k: {m: v[m] for m in ("train/tasks_per_s_total", "train/comm_wait_share_total",
                                           "train/data_stall_share_total")}
                     for k, v in runs.items()})


if __name__ == "__main__":
    main()
