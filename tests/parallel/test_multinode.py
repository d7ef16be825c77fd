"""``gmeta train --nnodes 2``: two launches on localhost (one process each) meeting at a c10d
rendezvous train the same parameters as one job of two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from gmeta.checkpoint import load_unsharded
from gmeta.parallel.dist import free_port
from tests.support.cli import run_gmeta

ROOT = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = ROOT / "configs" / "ads_cvr_debug.yaml"


def _train_args(shards, out) -> list[str]:
    return [sys.executable, "-m", "gmeta.cli", "train", "--config", str(DEBUG_CONFIG), f"data.shards_dir={shards}",
            "tracking.enabled=false", "train.eval_at_end=false", "train.max_steps=6", f"train.output_dir={out}"]


def test_two_nodes_of_one_process_equal_one_node_of_two(debug_data, tmp_path):
    from tests.support.multiprocess import run_gmeta_ranks

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # the job of two processes on one node: its two workers, forked from the tests' fork server
    # (a third launch and two more interpreters would show nothing the two nodes' launches do not)
    run_gmeta_ranks(_train_args(debug_data["shards"], tmp_path / "one")[3:] + ["--nproc-per-node", "2"], cwd=ROOT)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(_train_args(debug_data["shards"], tmp_path / "two")
                              + ["--nproc-per-node", "1", "--nnodes", "2", "--node-rank", str(r),
                                 "--rdzv-endpoint", endpoint, "--rdzv-id", "t"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in nodes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, _, meta_a = load_unsharded(tmp_path / "one" / "checkpoint")
    b, _, meta_b = load_unsharded(tmp_path / "two" / "checkpoint")
    assert meta_a["step"] == meta_b["step"] == 6 and meta_a["world_size"] == meta_b["world_size"] == 2
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)


def test_multi_node_flags_are_checked(tmp_path):
    # refused before anything is launched: the command line in this process (tests/support/cli.py)
    base = ["train", "--config", str(DEBUG_CONFIG)]
    p = run_gmeta(base + ["--nnodes", "2"], cwd=ROOT)
    assert p.returncode == 2 and "--rdzv-endpoint host:port" in p.stderr
    p = run_gmeta(base + ["--nnodes", "2", "--node-rank", "2"], cwd=ROOT)
    assert p.returncode == 2 and "--node-rank must be in 0..1" in p.stderr
    for bad in ("2:1", "0:2", "x", "1:2:3"):
        p = run_gmeta(base + ["--nnodes", bad], cwd=ROOT)
        assert p.returncode == 2 and f"--nnodes {bad!r}: a number of machines >= 1, or MIN:MAX" in p.stderr, bad
    p = run_gmeta(base + ["--nnodes", "1:2", "--rdzv-endpoint", "127.0.0.1:1"], cwd=ROOT)
    assert p.returncode == 2 and "(elastic) needs --max-restarts >= 1" in p.stderr
