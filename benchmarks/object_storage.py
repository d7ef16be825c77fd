"""Task shards on local disk against the same shards in an S3-compatible object store: the
reader's tasks/s (TaskReader over the train split, 1 background worker, 32 tasks per
meta-batch), and the data stall of training (configs/ads_cvr.yaml, 2 processes) reading
its shards from each.

The object store is a local moto server in its own process (the S3 API over HTTP on
loopback: real requests, latency of a few ms each, no network bandwidth limit). It is a
single-threaded Python server, so it is slower than S3 itself, MinIO or Ceph; what it
shows is whether gmeta's request pattern (one ranged GET per row group, a HEAD per file)
keeps the reader ahead of training.

    python -m benchmarks.object_storage [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import emit, prepared_workdir, train_run
from gmeta.io.reader import TaskReader
from gmeta.storage import location


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server as a subprocess on a free port; the environment points at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("moto server did not start")


def reader_tps(shards: str, batch: int) -> float:
    reader = TaskReader(shards, "train", batch, num_workers=1, seed=0)
    it = iter(reader)
    next(it)  # the first batch: worker start
    t0 = time.perf_counter()
    n = sum(b.num_tasks for b in it)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="training steps of each data-stall run")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench-stall"))
    args = ap.parse_args()
    work = Path(args.workdir)
    cfg = prepared_workdir(work)
    local = work / "data/ads_cvr/shards"
    server, endpoint = start_moto()
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="gmeta-bench")
        remote = "s3://gmeta-bench/shards"
        t0 = time.perf_counter()
        dest = location(remote)
        dest.fs.put(str(local), dest.path, recursive=True)
        size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
        print(f"uploaded {size / 2**20:.0f} MiB of shards to {remote} ({endpoint}) in {time.perf_counter() - t0:.1f}s")

        tps: dict[str, list[float]] = {}
        for where in ("local", "s3", "local", "s3"):  # alternated: drift of a shared machine hits both
            tps.setdefault(where, []).append(reader_tps(str(local) if where == "local" else remote, args.batch))
            print(f"reader from {where:5s}: {tps[where][-1]:8.0f} tasks/s")
        lo, s3 = (float(np.median(tps[k])) for k in ("local", "s3"))
        print(f"reader tasks/s: S3 {s3:.0f} vs local {lo:.0f}: {s3 / lo:.2f}x ({args.batch} tasks per batch, "
              "1 worker, configs/ads_cvr.yaml shards)")

        stall = {}
        for where, shards in (("local", str(local)), ("s3", remote)):
            m = train_run(cfg, work, f"stall-{where}", 2,
                          [f"data.shards_dir={shards}", f"train.max_steps={args.steps}"])
            stall[where] = (m["train/data_stall_share_total"], m["train/data_stall_share_steady"],
                            m["train/tasks_per_s_total"])
            print(f"training from {where:5s}: data stall {100 * stall[where][0]:5.2f}% of the loop, "
                  f"{100 * stall[where][1]:5.2f}% after each epoch's first batch, {stall[where][2]:.0f} tasks/s "
                  f"(configs/ads_cvr.yaml, 2 processes, {args.steps} steps)  (target < 5%)")
    finally:
        server.kill()
    emit("object_storage", {"reader_tasks_per_s_local": lo, "reader_tasks_per_s_s3": s3, "reader_ratio": s3 / lo,
                            "stall_local": stall["local"][0], "stall_s3": stall["s3"][0],
                            "stall_steady_local": stall["local"][1], "stall_steady_s3": stall["s3"][1],
                            "train_tasks_per_s_local": stall["local"][2], "train_tasks_per_s_s3": stall["s3"][2],
                            "steps": args.steps})


if __name__ == "__main__":
    main()
