"""``gmeta plan`` and the planner's constraints: a cluster's sharding plan sized without a
cluster, and ``auto`` never choosing a data-parallel table."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gmeta.config import load_config
from gmeta.models.dlrm import build_model
from gmeta.parallel.sharding import AUTO_SHARDING_TYPES, make_planner
from tests.support.cli import run_gmeta

ROOT = Path(__file__).resolve().parents[2]


def test_plan_for_two_nodes_of_eight_gpus(debug_config_path, tmp_path):
    out = tmp_path / "plan.json"
    p = run_gmeta(["plan", "--config", debug_config_path, "--world-size", "16", "--local-world-size", "8",
                   "--rows-per-step", "2048", "--json", out, "sharding.sharding_type=auto"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = load_config(debug_config_path)
    for f in cfg.features.sparse:
        assert f.name in p.stdout
    assert "16 processes = 2 node(s) x 8, cuda, 2048 rows per rank and step" in p.stdout
    r = json.loads(out.read_text())
    assert [k["node"] for k in r["ranks"]] == [i // 8 for i in range(16)]
    assert {t["sharding_type"] for t in r["tables"]} <= set(AUTO_SHARDING_TYPES)
    assert {t["table"] for t in r["tables"]} == {f.name for f in cfg.features.sparse}
    # every table's rows are held somewhere: the ranks' table memory covers the weights
    weights = sum(f.num_embeddings * cfg.model.embedding_dim * 4 for f in cfg.features.sparse) / 2**20
    assert sum(k["hbm_mib"] for k in r["ranks"]) >= weights
    assert all(k["compute_ms"] > 0 for k in r["ranks"] if k["hbm_mib"] > 0)


def test_plan_rejects_a_world_that_is_not_whole_nodes(debug_config_path, tmp_path):
    p = run_gmeta(["plan", "--config", debug_config_path, "--world-size", "6", "--local-world-size", "4"], cwd=tmp_path)
    assert p.returncode == 2 and "--world-size (6) must be a positive multiple of --local-world-size (4)" in p.stderr


def test_auto_sharding_never_offers_data_parallel(debug_config_path):
    cfg = load_config(debug_config_path, ["sharding.sharding_type=auto",
                                          "sharding.tables=[{name: hour, sharding_type: column_wise}]"])
    planner = make_planner(build_model(cfg, device=torch.device("meta")), cfg, "cuda", 8, 8)
    kinds = {name: c.sharding_types for name, c in planner._constraints.items()}
    assert kinds.pop("t_hour") == ["column_wise"]  # a per-table choice stays as asked
    assert kinds and all(k == AUTO_SHARDING_TYPES for k in kinds.values())
    assert all("data_parallel" not in k for k in kinds.values())
