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
