"""The debug logs cut into daily partitions, for the tests of partitioned data and incremental
training."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

DAYS = ("2026-12-01", "2026-12-02", "2026-12-03")
DAY_S = 10 * 86400  # the debug logs span 30 days: three partitions of 10


def split_days(raw: Path, out: Path) -> dict[str, Path]:
    """The debug logs cut by time into one raw directory per partition (DAYS)."""
    t = pq.read_table(raw)
    day = pc.divide(t.column("ts"), DAY_S).to_numpy()
    dirs = {}
    for i, name in enumerate(DAYS):
        d = out / name
        d.mkdir(parents=True)
        pq.write_table(t.filter(day == i), d / "part-00000.parquet")
        dirs[name] = d
    return dirs


def prepare_days(cfg, raw: Path, base: Path) -> dict:
    """``split_days`` of ``raw`` under ``base``/raw, each prepared as a partition of ``base``/shards."""
    from gmeta.io.prepare import prepare

    dirs = split_days(raw, base / "raw")
    root = base / "shards"
    for name in DAYS:
        prepare(cfg, dirs[name], root, partition=name)
    return {"raw": dirs, "root": root, "cfg": cfg}
