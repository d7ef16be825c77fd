"""Mixed precision: fp16 embedding storage (model.embedding_dtype) and bf16 autocast of the
dense head (model.dense_autocast), each trained, saved and reloaded in a plain process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gmeta.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import numpy as np, torch
from gmeta import MetaLearner
from gmeta.io.reader import TaskReader
cfg, shards, out = sys.argv[1], sys.argv[2], sys.argv[3]
variants = json.loads(sys.argv[4])  # name -> overrides
batch = next(iter(TaskReader(shards, "train", 8, seed=0)))
res = {}
for name, extra in variants.items():
    torch.manual_seed(0)
    learner = MetaLearner(cfg, [*extra, "meta.tasks_per_batch=8"])
    tables = {k: v for k, v in learner.model.state_dict().items() if k.startswith("sparse_arch.")}
    first = next(iter(tables.values()))
    dtype = str((first.local_shards()[0].tensor if hasattr(first, "local_shards") else first).dtype)
    before = {k: (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).clone() for k, v in tables.items()}
    loss0 = float(learner.loss(batch).loss)
    losses = [float(learner.step(batch).loss) for _ in range(5)]
    after = {k: (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v) for k, v in
             learner.model.state_dict().items() if k.startswith("sparse_arch.")}
    moved = sum(float((after[k].float() - before[k].float()).abs().sum()) for k in before)
    pred = learner.predict(batch)
    learner.save(f"{out}/{name}")
    again = MetaLearner(checkpoint=f"{out}/{name}").predict(batch)
    res[name] = {"dtype": dtype, "loss0": loss0, "first": losses[0], "last": losses[-1], "moved": moved,
                 "reloaded_same": bool(np.allclose(pred, again, atol=1e-6)), "pred": pred.tolist()}
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def runs(debug_config_path, debug_data, tmp_path_factory) -> dict:
    """fp32, fp16 tables and the bf16 head, each from the same seed, trained, saved and
    reloaded in one plain process (one interpreter's imports, fp32 trained once for both
    comparisons): name -> what SCRIPT measured."""
    variants = {"fp32": [], "fp16": ["model.embedding_dtype=fp16"], "bf16": ["model.dense_autocast=bf16"]}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(debug_config_path), str(debug_data["shards"]),
                           str(tmp_path_factory.mktemp("precision")), json.dumps(variants)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fp16_tables_train_and_reload(runs):
    fp32, fp16 = runs["fp32"], runs["fp16"]
    assert fp32["dtype"] == "torch.float32" and fp16["dtype"] == "torch.float16"
    assert fp16["moved"] > 0 and fp16["last"] < fp16["first"]  # the fused update writes fp16 rows
    assert fp16["reloaded_same"]
    # same initial weights rounded to fp16: the first loss agrees to fp16 precision
    assert abs(fp16["loss0"] - fp32["loss0"]) < 5e-3


def test_bf16_dense_head_trains_close_to_fp32(runs):
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16["dtype"] == "torch.float32"
    assert bf16["loss0"] != fp32["loss0"]  # the products ran in bfloat16 ...
    assert abs(bf16["loss0"] - fp32["loss0"]) < 2e-2  # ... close to fp32
    assert bf16["last"] < bf16["first"] and bf16["reloaded_same"]


def test_precision_options_are_checked(debug_config_path):
    with pytest.raises(ConfigError, match="model.embedding_dtype"):
        load_config(debug_config_path, ["model.embedding_dtype=int8"])
    with pytest.raises(ConfigError, match="model.dense_autocast"):
        load_config(debug_config_path, ["model.dense_autocast=fp8"])
