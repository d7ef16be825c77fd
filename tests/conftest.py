from __future__ import annotations

from pathlib import Path

import pytest

from gmeta.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = ROOT / "configs" / "ads_cvr_debug.yaml"


@pytest.fixture(scope="session")
def debug_config_path() -> Path:
    return DEBUG_CONFIG


@pytest.fixture(scope="session")
def debug_data(tmp_path_factory) -> dict[str, Path]:
    """Synthetic debug data, prepared once per session: {"raw": dir, "shards": dir}."""
    from gmeta.io.prepare import prepare
    from gmeta.synth import generate

    base = tmp_path_factory.mktemp("ads_cvr_debug")
    cfg = load_config(DEBUG_CONFIG)
    generate(cfg, base / "raw")
    prepare(cfg, base / "raw", base / "shards")
    return {"raw": base / "raw", "shards": base / "shards"}


@pytest.fixture(scope="session")
def debug_checkpoint(debug_data, tmp_path_factory) -> Path:
    """A MAML checkpoint trained briefly (one process) on the debug data."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("debug_run")
    proc = subprocess.run(
        [sys.executable, "-m", "gmeta.cli", "train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", "1",
         f"data.shards_dir={debug_data['shards']}", f"train.output_dir={out}", "train.max_steps=40",
         "train.eval_at_end=false", "tracking.enabled=false"],
        capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "checkpoint"


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) for the session; the AWS environment points at it."""
    from tests.support.s3 import moto_server  # moto[server]: a dev dependency

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket: its s3:// URL."""
    from tests.support.s3 import new_bucket

    return new_bucket()
