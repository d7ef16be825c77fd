"""Shared helpers for the benchmarks: data generation (cached) and a peak-memory probe."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

from gmeta.config import Config, load_config
from gmeta.io.errors import PrepareError
from gmeta.io.manifest import load_manifest
from gmeta.io.prepare import prepare
from gmeta.io.synth import generate

ROOT = Path(__file__).resolve().parents[1]


def ads_config(overrides: list[str] | None = None) -> Config:
    return load_config(ROOT / "configs" / "ads_cvr.yaml", overrides or [])


def ensure_data(workdir: Path, num_tasks: int, overrides: list[str] | None = None) -> tuple[Config, Path, Path]:
    """Synthetic ads-CVR data with ``num_tasks`` tasks, prepared once and cached in workdir."""
    cfg = ads_config([f"synth.num_tasks={num_tasks}", *(overrides or [])])
    raw, shards = workdir / f"raw-{num_tasks}", workdir / f"shards-{num_tasks}"
    if not (raw / "_synth.json").is_file():
        generate(cfg, raw)
    try:
        load_manifest(shards)
    except PrepareError:  # missing, or written by an older format
        prepare(cfg, raw, shards)
    return cfg, raw, shards


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(name: str, result: dict) -> None:
    """Print a result as one JSON line (machine-readable) after the human-readable lines."""
    print(f"RESULT {name} " + json.dumps(result, sort_keys=True))


def prepared_workdir(workdir: Path) -> str:
    """A workdir holding data/ads_cvr (synth + prepare of configs/ads_cvr.yaml); returns the config path."""
    cfg = str(ROOT / "configs" / "ads_cvr.yaml")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        load_manifest(workdir / "data/ads_cvr/shards")
    except PrepareError:  # missing, or written by an older format
        for sub in ("synth", "prepare"):
            subprocess.run([sys.executable, "-m", "gmeta.cli", sub, "--config", cfg], cwd=workdir, check=True,
                           capture_output=True)
    return cfg


def train_run(cfg: str, workdir: Path, name: str, nproc: int, overrides: list[str]) -> dict[str, float]:
    """``gmeta train`` in ``workdir`` as MLflow run ``name``; returns the run's last metrics."""
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    shutil.rmtree(workdir / ("run-" + name), ignore_errors=True)  # a benchmark run starts fresh
    cmd = [sys.executable, "-m", "gmeta.cli", "train", "--config", cfg, "--nproc-per-node", str(nproc),
           "--tracking-uri", uri, "train.eval_at_end=false", f"train.output_dir={workdir / ('run-' + name)}",
           f"tracking.run_name={name}", *overrides]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("gmeta-ads-cvr")
    run = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    return dict(run.data.metrics)


def fresh_checkpoints(cfg: Config, shards: Path, paths: list[Path]) -> list[Path]:
    """A freshly initialised checkpoint of ``cfg``'s model (trained on ``shards``) at each
    path, seeds 0, 1, ... (throughput does not depend on the weights; different seeds give
    different models of the same features)."""
    import torch
    import torch.distributed as dist

    from gmeta import checkpoint
    from gmeta.models.dlrm import build_model
    from gmeta.parallel.dist import free_port
    from gmeta.parallel.sharding import shard_model

    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg.data.shards_dir = str(shards)
    out = []
    for seed, path in enumerate(paths):
        torch.manual_seed(seed)
        model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
        out.append(Path(checkpoint.save(model, cfg, path, {"step": 0})))
    dist.destroy_process_group()
    return out
