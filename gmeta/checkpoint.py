"""Model checkpoints with torch.distributed.checkpoint.

A checkpoint is a directory: the DCP files of the model state dict (sharded embedding
tables as ShardedTensors, dense parameters) plus ``meta.json`` (resolved config, step,
world size, MLflow run). It is written to a temporary directory and renamed into place,
so a crash mid-write never leaves a half checkpoint under the final name. DCP reshards on
load: a checkpoint written by N processes loads into one process with unsharded tables.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from gmeta import __version__
from gmeta.config import Config, ConfigError, config_from_dict, to_dict
from gmeta.models.dlrm import MetaDLRM, build_model

META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or unreadable. The message names the path."""


def save(model: torch.nn.Module, cfg: Config, path: str | Path, meta: dict) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(model.state_dict(), checkpoint_id=str(tmp))
    if rank == 0:
        info = {"gmeta_version": __version__, "config": to_dict(cfg), "world_size": dist.get_world_size(), **meta}
        (tmp / META).write_text(json.dumps(info, indent=2))
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier()
    return path


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / META
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a complete gmeta checkpoint ({META} missing)")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON: {e}") from None


def _config(path: str | Path, meta: dict) -> Config:
    try:
        return config_from_dict(meta["config"])
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{Path(path) / META}: invalid config: {e}") from None


def load_sharded(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, Config, dict]:
    """Collective: load a checkpoint into this process group's sharded model (tables
    sharded by the config's plan for the current world size; DCP reshards)."""
    from gmeta.parallel.sharding import shard_model

    meta = read_meta(path)
    cfg = _config(path, meta)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, device)
    state = model.state_dict()
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP raises a variety of errors for damaged files
        raise CheckpointError(f"{path}: cannot load model state: {e}") from None
    model.load_state_dict(state)
    return model, cfg, meta


def load_unsharded(path: str | Path, device: torch.device | None = None) -> tuple[MetaDLRM, Config, dict]:
    """Load a checkpoint into one process: the model with whole (unsharded) tables."""
    meta = read_meta(path)
    cfg = _config(path, meta)
    model = build_model(cfg, device=device or torch.device("cpu"))
    state = model.state_dict()
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except Exception as e:  # DCP raises a variety of errors for damaged files
        raise CheckpointError(f"{path}: cannot load model state: {e}") from None
    model.load_state_dict(state)
    model.eval()
    return model, cfg, meta
