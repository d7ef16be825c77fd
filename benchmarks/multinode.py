"""Multi-node on one machine, and the sharding plan of a cluster.

1. MAML training on configs/ads_cvr.yaml as 1 node x 2 processes (one ``gmeta train``) and
   as 2 nodes x 1 process (two ``gmeta train --nnodes 2`` meeting at a c10d rendezvous on
   localhost): tasks/s of each and the largest parameter difference between the two.
2. ``gmeta plan`` of the same config for 1, 2 and 4 nodes of 8 GPUs: the planner's sharding
   types and its per-rank table memory and embedding compute/communication estimates.
   These are torchrec's model of a cluster, not a measurement.

    python -m benchmarks.multinode [--steps 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, prepared_workdir
from gmeta.checkpoint import load_unsharded
from gmeta.config import load_config
from gmeta.logs import setup_logging
from gmeta.parallel.dist import free_port
from gmeta.parallel.sharding import plan_report


def _train(cfg: str, work: Path, out: Path, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "gmeta.cli", "train", "--config", cfg, "tracking.enabled=false",
            "train.eval_at_end=false", f"train.max_steps={steps}", f"train.log_every={steps}",
            # one thread per process in both layouts: two "nodes" on one machine each count
            # only their own process and would take every core each
            "train.threads=1",
            f"train.output_dir={out}", *extra]


def _tasks_per_s(stderr: str) -> float:
    """tasks/s of the last log line of a training ('... N tasks/s ...')."""
    lines = [ln for ln in stderr.splitlines() if " tasks/s " in ln]
    if not lines:
        raise SystemExit(stderr[-3000:])
    words = lines[-1].split()
    return float(words[words.index("tasks/s") - 1])


def compare_launches(cfg: str, work: Path, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for d in ("one", "two"):  # each run starts fresh
        shutil.rmtree(work / d, ignore_errors=True)
    t = time.perf_counter()
    one = subprocess.run(_train(cfg, work, work / "one", steps, ["--nproc-per-node", "2"]), cwd=work,
                         capture_output=True, text=True, env=env)
    wall_one = time.perf_counter() - t
    if one.returncode:
        raise SystemExit(one.stderr[-3000:])
    endpoint = f"127.0.0.1:{free_port()}"
    t = time.perf_counter()
    nodes = [subprocess.Popen(_train(cfg, work, work / "two", steps, [
        "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint", endpoint,
        "--rdzv-id", "bench"]), cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)]
    errs = [p.communicate()[1] for p in nodes]
    wall_two = time.perf_counter() - t
    if any(p.returncode for p in nodes):
        raise SystemExit(errs[0][-3000:] + errs[1][-3000:])
    a, _, _ = load_unsharded(work / "one" / "checkpoint")
    b, _, _ = load_unsharded(work / "two" / "checkpoint")
    sa, sb = a.state_dict(), b.state_dict()
    diff = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    res = {"one_node_x2_tasks_per_s": _tasks_per_s(one.stderr), "two_nodes_x1_tasks_per_s": _tasks_per_s(errs[0]),
           "one_node_wall_s": wall_one, "two_nodes_wall_s": wall_two, "max_param_diff": diff}
    print(f"1 node x 2 processes : {res['one_node_x2_tasks_per_s']:7.0f} tasks/s (job {wall_one:.1f} s)")
    print(f"2 nodes x 1 process  : {res['two_nodes_x1_tasks_per_s']:7.0f} tasks/s (job {wall_two:.1f} s); "
          f"ratio {res['two_nodes_x1_tasks_per_s'] / res['one_node_x2_tasks_per_s']:.2f}x; "
          f"largest parameter difference {diff:.2e}", flush=True)
    return res


def cluster_plans(cfg_path: str, rows: int) -> dict:
    out = {}
    for sharding in ("table_wise", "auto"):
        cfg = load_config(cfg_path, [f"sharding.sharding_type={sharding}"])
        for nodes in (1, 2, 4):
            r = plan_report(cfg, 8 * nodes, 8, "cuda", rows)
            kinds = sorted({t["sharding_type"] for t in r["tables"]})
            mem = [k["hbm_mib"] for k in r["ranks"]]
            cost = [k["compute_ms"] + k["comms_ms"] for k in r["ranks"]]
            comms = max(k["comms_ms"] for k in r["ranks"])
            out[f"{sharding}/{nodes}x8"] = {"kinds": kinds, "hbm_mib_max": max(mem), "hbm_mib_min": min(mem),
                                            "step_ms_max": max(cost), "comms_ms_max": comms}
            print(f"plan {sharding:10s} {nodes} node(s) x 8 GPUs: {', '.join(kinds):28s} table memory per rank "
                  f"{min(mem):7.1f}..{max(mem):7.1f} MiB; slowest rank {max(cost):.3f} ms of embedding compute and "
                  f"communication per step ({comms:.3f} ms communication)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rows", type=int, default=4096, help="rows per rank and step for the plans")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench-multinode"))
    args = ap.parse_args()
    setup_logging(False)  # torchrec's planner quiet, as under gmeta's commands
    work = Path(args.workdir)
    cfg = prepared_workdir(work)
    torch.set_num_threads(1)
    res = {"launch": compare_launches(cfg, work, args.steps), "plans": cluster_plans(cfg, args.rows)}
    emit("multinode", res)


if __name__ == "__main__":
    main()
