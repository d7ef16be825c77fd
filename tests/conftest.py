from __future__ import annotations

import os
from pathlib import Path

import pytest

from gmeta.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = ROOT / "configs" / "ads_cvr_debug.yaml"
# Tests marked slow repeat, end to end, what faster tests of the default run prove (each
# marker names them); they run with GMETA_SLOW=1 (`bash scripts/test.sh --all`) or `-m slow`.
RUN_SLOW = os.environ.get("GMETA_SLOW", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if RUN_SLOW or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: GMETA_SLOW=1 (bash scripts/test.sh --all) runs it")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def debug_config_path() -> Path:
    return DEBUG_CONFIG


@pytest.fixture(scope="session")
def debug_data(tmp_path_factory) -> dict[str, Path]:
    """Synthetic debug data, prepared once per session: {"raw": dir, "shards": dir}."""
    from gmeta.io.prepare import prepare
    from gmeta.io.synth import generate

    base = tmp_path_factory.mktemp("ads_cvr_debug")
    cfg = load_config(DEBUG_CONFIG)
    generate(cfg, base / "raw")
    prepare(cfg, base / "raw", base / "shards")
    return {"raw": base / "raw", "shards": base / "shards"}


TWO_LABELS = ["features.labels=[label, conversion]"]


def add_conversion(raw: Path, out: Path) -> Path:
    """The debug data's files with a ``conversion`` column: 1 for a click whose bid_price is
    above 0.5 (a conversion only after a click), a function of the row that tests recompute."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    for path in sorted(raw.glob("*.parquet")):
        t = pq.read_table(path)
        conv = pc.and_(pc.equal(t.column("label"), 1), pc.greater(t.column("bid_price"), 0.5))
        pq.write_table(t.append_column("conversion", pc.cast(conv, pa.int64())), out / path.name)
    return out


@pytest.fixture(scope="session")
def two_label_data(debug_data, tmp_path_factory) -> dict[str, Path]:
    """The debug data with a second label (``conversion``, see ``add_conversion``), prepared
    once per session with features.labels [label, conversion]: {"raw": dir, "shards": dir}."""
    from gmeta.io.prepare import prepare

    base = tmp_path_factory.mktemp("ads_cvr_debug_two_labels")
    raw = add_conversion(debug_data["raw"], base / "raw")
    prepare(load_config(DEBUG_CONFIG, TWO_LABELS), raw, base / "shards")
    return {"raw": raw, "shards": base / "shards"}


@pytest.fixture(scope="session")
def trained_head(request, tmp_path_factory):
    """``trained_head(arch)``: that ``model.arch`` trained a few steps on the debug data (two
    labels for mmoe / esmm), its model logged by gmeta train; each trained once per session
    (tests/support/heads.py)."""
    from tests.support.heads import HeadRuns

    return HeadRuns(lambda two: request.getfixturevalue("two_label_data" if two else "debug_data"),
                    tmp_path_factory.mktemp("heads"))


@pytest.fixture(scope="session")
def seq_data(debug_data, tmp_path_factory) -> dict:
    """The debug data with a behaviour sequence (tests.support.sequences), prepared once per
    session as parquet and as webdataset shards: {"cfg", "raw", "pq", "wds"}."""
    from gmeta.io.prepare import prepare
    from tests.support.sequences import seq_overrides, with_sequences

    base = tmp_path_factory.mktemp("ads_cvr_debug_seq")
    raw = with_sequences(debug_data["raw"], base / "raw")
    cfg = load_config(DEBUG_CONFIG, seq_overrides(DEBUG_CONFIG))
    prepare(cfg, raw, base / "pq")
    prepare(load_config(DEBUG_CONFIG, seq_overrides(DEBUG_CONFIG) + ["data.format=webdataset"]), raw, base / "wds")
    return {"cfg": cfg, "raw": raw, "pq": base / "pq", "wds": base / "wds"}


@pytest.fixture(scope="session")
def debug_val_shards(debug_data, tmp_path_factory) -> Path:
    """The debug data prepared with validation tasks (data.split.val_fraction=0.15), once per
    session; tests read it and write elsewhere."""
    from gmeta.io.prepare import prepare

    out = tmp_path_factory.mktemp("ads_cvr_debug_val") / "shards"
    prepare(load_config(DEBUG_CONFIG, ["data.split.val_fraction=0.15"]), debug_data["raw"], out)
    return out


@pytest.fixture(scope="session")
def debug_checkpoint(debug_data, tmp_path_factory) -> Path:
    """A MAML checkpoint trained briefly (one process) on the debug data: `gmeta train` run in
    this process, which spares an interpreter's imports (seconds)."""
    from tests.support.cli import run_gmeta

    out = tmp_path_factory.mktemp("debug_run")
    p = run_gmeta(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1",
                   f"data.shards_dir={debug_data['shards']}", f"train.output_dir={out}", "train.max_steps=40",
                   "train.eval_at_end=false", "tracking.enabled=false"])
    assert p.returncode == 0 and (out / "checkpoint" / "meta.json").is_file(), p.stderr[-4000:]
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
