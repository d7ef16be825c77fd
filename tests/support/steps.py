"""What a job under ``tests.support.fault_harness`` trained: its records read back, and
torchrun runs of it with kills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import DEBUG_CONFIG

ROOT = Path(__file__).resolve().parents[2]


def torchrun_harness(out: Path, record: Path, shards: Path, kills: str, extra: list[str], max_restarts: int,
                     nproc: int = 2) -> subprocess.CompletedProcess:
    """``gmeta train --resume auto`` under torchrun (standalone, ``nproc`` processes), each
    process recorded by the harness and killed where ``kills`` says."""
    record.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GMETA_TEST_RECORD": str(record), "GMETA_TEST_KILLS": kills, "OMP_NUM_THREADS": "1",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as gmeta train sets it (see gmeta.cli._launch)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           f"--max-restarts={max_restarts}", "--module", "tests.support.fault_harness", "train",
           "--config", str(DEBUG_CONFIG), "--nproc-per-node", str(nproc), "--resume", "auto",
           f"data.shards_dir={shards}", f"train.output_dir={out}", "tracking.enabled=false",
           "train.eval_at_end=false", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def surviving_records(record: Path) -> dict[int, dict[int, dict]]:
    """step -> rank -> the harness's record of that step, over all attempts, keeping of each
    attempt only the steps that the next attempt did not roll back (it resumed from the step
    in its .resume file). A step no rank had data for (dynamic sharding's end of an epoch:
    every rank's batch a pad) is no step: it is left out, and the steps after it are numbered
    as the trainer numbers them."""
    attempts = sorted({int(p.name.split("-")[0][len("attempt"):]) for p in record.glob("attempt*-rank*.jsonl")})
    resume = {}
    for a in attempts:
        files = list(record.glob(f"attempt{a}-rank*.resume"))
        steps = {int(f.read_text()) for f in files}
        assert len(steps) <= 1, steps  # every rank resumed from the same checkpoint
        resume[a] = steps.pop() if steps else 0
    out: dict[int, dict[int, dict]] = {}
    for i, a in enumerate(attempts):
        keep_until = resume[attempts[i + 1]] if i + 1 < len(attempts) else None
        by_rank = {int(f.stem.split("rank")[1]): [json.loads(line) for line in f.read_text().splitlines()]
                   for f in record.glob(f"attempt{a}-rank*.jsonl")}
        calls = min(len(recs) for recs in by_rank.values())  # a killed rank may have written one more
        step = resume[a]
        for c in range(calls):
            if all(recs[c].get("pad") for recs in by_rank.values()):
                continue
            step += 1
            if keep_until is None or step <= keep_until:
                for rank, recs in by_rank.items():
                    out.setdefault(step, {})[rank] = recs[c]
    return out


def trained_tasks(steps: dict[int, dict[int, dict]]) -> list[int]:
    """Every task id the steps trained (pads left out), with repeats."""
    return [t for ranks in steps.values() for rec in ranks.values() if not rec.get("pad") for t in rec["task_ids"]]
