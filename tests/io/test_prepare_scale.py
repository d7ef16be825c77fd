"""prepare out of core: an input several times the memory cap, prepared within the cap."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gmeta.config import load_config
from gmeta.io.manifest import load_manifest
from gmeta.io.prepare import prepare
from gmeta.io.sources import estimate_bytes
from gmeta.io.synth import generate

PROBE = textwrap.dedent("""
    import json, sys, tracemalloc
    import pyarrow as pa
    from gmeta.config import load_config
    from gmeta.io.prepare import prepare
    cfg = load_config(sys.argv[1], ["data.prepare_memory_mb=" + sys.argv[2]])
    tracemalloc.start()  # numpy and Python allocations; Arrow's own pool is counted below
    m = prepare(cfg, sys.argv[3], sys.argv[4])
    print(json.dumps({"arrow_peak": pa.default_memory_pool().max_memory(),
                      "numpy_peak": tracemalloc.get_traced_memory()[1], "partitions": m["partitions"]}))
""")


def _records(shards):
    m = load_manifest(shards)
    out = {}
    for split in ("train", "eval"):
        for f in m["splits"][split]["files"]:
            for rec in pq.read_table(shards / f["path"]).to_pylist():
                out[rec["task_id"]] = (split, rec)
    return out


def test_input_larger_than_cap_is_prepared_within_cap(debug_config_path, tmp_path):
    cfg_path = debug_config_path.parent / "ads_cvr.yaml"
    # 12k tasks: about 75 MB decoded, the smallest input that stays well past 3x the cap
    cfg = load_config(cfg_path, ["synth.num_tasks=12000", "synth.rows_per_file=100000"])
    generate(cfg, tmp_path / "gen")
    raw = tmp_path / "raw"
    raw.mkdir()
    table = pq.read_table(tmp_path / "gen")
    for i in range(0, table.num_rows, 200_000):  # small row groups, as a streamed log would have
        pq.write_table(table.slice(i, 200_000), raw / f"part-{i:08d}.parquet", row_group_size=16_384)
    del table
    cap_mb = 20
    files = sorted(raw.glob("*.parquet"))
    decoded, rows = estimate_bytes(files, pq.read_schema(files[0]).names)
    assert decoded > 3 * (cap_mb << 20), decoded  # the input is several times the cap

    proc = subprocess.run([sys.executable, "-c", PROBE, str(cfg_path), str(cap_mb), str(raw), str(tmp_path / "ooc")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mem["partitions"] > 1
    used = mem["arrow_peak"] + mem["numpy_peak"]
    assert used <= cap_mb << 20, f"peak {used / 2**20:.1f} MiB over the {cap_mb} MiB cap"

    # the same tasks, split the same way, as preparing everything in memory
    prepare(load_config(cfg_path, ["data.prepare_memory_mb=100000"]), raw, tmp_path / "mem")
    a, b = _records(tmp_path / "ooc"), _records(tmp_path / "mem")
    assert a.keys() == b.keys() and len(a) > 10_000
    for task_id in list(a)[:500]:
        assert a[task_id] == b[task_id]
    ma, mb = load_manifest(tmp_path / "ooc"), load_manifest(tmp_path / "mem")
    assert ma["input_rows"] == mb["input_rows"] == rows
    assert ma["dropped_tasks"] == mb["dropped_tasks"] and ma["rows"] == mb["rows"]
    # collisions are counted exactly for the tables that fit an eighth of the memory cap, so
    # the small cap counts fewer tables exactly; where both count exactly they agree
    for name, ca in ma["cardinality"].items():
        cb = mb["cardinality"][name]
        assert ca["distinct_raw"] == cb["distinct_raw"] and ca["id_occurrences"] == cb["id_occurrences"]
        if ca["colliding_share_exact"]:
            assert ca == cb
    assert sum(c["colliding_share_exact"] for c in ma["cardinality"].values()) >= 3
    assert all(c["colliding_share_exact"] for c in mb["cardinality"].values())


def test_csv_input_with_multi_hot_as_pipe_separated_ids(debug_data, debug_config_path, tmp_path):
    cfg = load_config(debug_config_path)
    t = pq.read_table(debug_data["raw"])
    joined = pa.array(["|".join(map(str, x)) for x in t.column("interests").to_pylist()])
    t = t.set_column(t.schema.get_field_index("interests"), "interests", joined)
    (tmp_path / "csv").mkdir()
    pacsv.write_csv(t, tmp_path / "csv" / "log.csv")
    m_csv = prepare(cfg, tmp_path / "csv", tmp_path / "from_csv")
    m_pq = load_manifest(debug_data["shards"])
    assert m_csv["splits"]["train"]["tasks"] == m_pq["splits"]["train"]["tasks"]
    a, b = _records(tmp_path / "from_csv"), _records(debug_data["shards"])
    assert a.keys() == b.keys()
    some = list(a)[:50]
    for k in some:
        sa, sb = a[k][1]["support"], b[k][1]["support"]
        assert sa["interests"] == sb["interests"] and sa["user_id"] == sb["user_id"]
        assert np.allclose(sa["dense"], sb["dense"])
