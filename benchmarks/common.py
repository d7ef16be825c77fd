"""Shared helpers for the benchmarks: data generation (cached) and a peak-memory probe."""

from __future__ import annotations

import json
import resource
from pathlib import Path

from gmeta.config import Config, load_config
from gmeta.io.prepare import prepare
from gmeta.synth import generate

ROOT = Path(__file__).resolve().parents[1]


def ads_config(overrides: list[str] | None = None) -> Config:
    return load_config(ROOT / "configs" / "ads_cvr.yaml", overrides or [])


def ensure_data(workdir: Path, num_tasks: int, overrides: list[str] | None = None) -> tuple[Config, Path, Path]:
    """Synthetic ads-CVR data with ``num_tasks`` tasks, prepared once and cached in workdir."""
    cfg = ads_config([f"synth.num_tasks={num_tasks}", *(overrides or [])])
    raw, shards = workdir / f"raw-{num_tasks}", workdir / f"shards-{num_tasks}"
    if not (raw / "_synth.json").is_file():
        generate(cfg, raw)
    if not (shards / "manifest.json").is_file():
        prepare(cfg, raw, shards)
    return cfg, raw, shards


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(name: str, result: dict) -> None:
    """Print a result as one JSON line (machine-readable) after the human-readable lines."""
    print(f"RESULT {name} " + json.dumps(result, sort_keys=True))
