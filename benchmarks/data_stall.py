"""Data stall: the share of the training loop spent waiting for the next meta-batch, on
configs/ads_cvr.yaml with 2 processes, with the reader's background workers (the default,
data.num_workers=1) vs. reading in the training process (data.num_workers=0).

    python benchmarks/data_stall.py [--steps 200]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import emit, prepared_workdir, train_run


def run(cfg: str, workdir: Path, workers: int, steps: int) -> tuple[float, float, float]:
    m = train_run(cfg, workdir, f"stall-w{workers}", 2, [f"data.num_workers={workers}", f"train.max_steps={steps}"])
    return m["train/data_stall_share_total"], m["train/data_stall_share_steady"], m["train/tasks_per_s_total"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench-stall"))
    args = ap.parse_args()
    work = Path(args.workdir)
    cfg = prepared_workdir(work)
    with_workers, steady_w, tps_w = run(cfg, work, 1, args.steps)
    inline, steady_0, tps_0 = run(cfg, work, 0, args.steps)
    print(f"data stall with a background reader worker: {100 * with_workers:6.2f}% of the loop, "
          f"{100 * steady_w:5.2f}% after the first batch ({tps_w:.0f} tasks/s)  (target < 5%)")
    print(f"data stall reading in the training process:  {100 * inline:6.2f}% of the loop, "
          f"{100 * steady_0:5.2f}% after the first batch ({tps_0:.0f} tasks/s)")
    print(f"ratio inline / worker: {inline / max(with_workers, 1e-9):.1f}x (whole loop), "
          f"{steady_0 / max(steady_w, 1e-9):.1f}x (steady state)")
    emit("data_stall", {"stall_workers": with_workers, "stall_inline": inline, "steady_workers": steady_w,
                        "steady_inline": steady_0, "tasks_per_s_workers": tps_w, "tasks_per_s_inline": tps_0,
                        "steps": args.steps})


if __name__ == "__main__":
    main()
