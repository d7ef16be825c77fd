"""``gmeta train --nnodes 1:2``: an elastic job of two nodes on localhost loses one (its
launcher and worker killed) and goes on with the other from the last checkpoint, at world
size 1, its data queue intact: every task of every epoch trained exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gmeta.checkpoint import complete_checkpoints
from gmeta.io.reader import task_keys
from gmeta.parallel.dist import free_port

ROOT = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = ROOT / "configs" / "ads_cvr_debug.yaml"


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def test_an_elastic_job_goes_on_without_a_lost_node_and_trains_each_task_once(debug_data, tmp_path):
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    args = [sys.executable, "-m", "gmeta.cli", "train", "--config", str(DEBUG_CONFIG),
            f"data.shards_dir={debug_data['shards']}", f"train.output_dir={out}", "tracking.enabled=false",
            "train.eval_at_end=false", "data.sharding=dynamic", "train.epochs=2", "train.checkpoint_every_steps=2",
            "--nproc-per-node", "1", "--nnodes", "1:2", "--rdzv-endpoint", endpoint, "--rdzv-id", "elastic",
            "--rdzv-conf", "last_call_timeout=2", "--max-restarts", "2"]
    # node 0 first: its launcher holds the rendezvous (the node at --rdzv-endpoint must outlive the others)
    nodes = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)]
    time.sleep(3)
    nodes.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True))
    try:
        deadline = time.monotonic() + 600
        while not any(s >= 4 for s, _ in complete_checkpoints(out / "checkpoints")):
            # (the two nodes have trained 4 steps, of 21 an epoch)
            assert time.monotonic() < deadline and nodes[0].poll() is None and nodes[1].poll() is None
            time.sleep(0.05)
        _kill_tree(nodes[1].pid)  # node 1 is lost: its launcher and its worker (a session of its own)
        said, _ = nodes[0].communicate(timeout=600)
    finally:
        for p in nodes:
            if p.poll() is None:
                _kill_tree(p.pid)
    assert nodes[0].returncode == 0, said[-4000:]
    assert "now 1)" in said, said[-4000:]  # resumed a checkpoint of 2 processes in 1
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    every = len(task_keys(debug_data["shards"], "train"))
    assert meta["world_size"] == 1 and meta["epoch"] == 1 and meta["epoch_done"]
    assert meta["data_queue"]["trained_tasks"] == every  # every task of the last epoch trained ...
    assert meta["tasks_total"] == 2 * every  # ... and of both epochs, in steps that survived: none twice
