"""The synthetic data generator."""

from __future__ import annotations

import pyarrow.parquet as pq

from gmeta.config import load_config
from gmeta.synth import generate


def test_synth_is_deterministic_and_has_power_law_tasks(debug_config_path, tmp_path):
    cfg = load_config(debug_config_path, ["synth.num_tasks=300"])
    a = generate(cfg, tmp_path / "a")
    b = generate(cfg, tmp_path / "b")
    assert pq.read_table(tmp_path / "a").equals(pq.read_table(tmp_path / "b"))
    assert a["task_size_max"] > 3 * a["task_size_median"] and a == {**b, "files": a["files"]}
    t = pq.read_table(tmp_path / "a").to_pandas()
    assert t.p_true.between(0, 1).all() and 0.05 < t.label.mean() < 0.6
