"""Warm start (train.init_from: another checkpoint's weights, resharded) and the two-stage
recipe (train.pretrain_epochs of ERM, then meta-training, in one run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gmeta.checkpoint import CheckpointError, load_init, load_unsharded
from tests.conftest import DEBUG_CONFIG
from tests.support.multiprocess import run_ranks


def _train(out: Path, shards: Path, *extra: str) -> Path:
    """`gmeta train` in one process, run in this one: an interpreter of its own would cost
    seconds of imports per run."""
    from gmeta.cli import main

    rc = main(["train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", "1", f"data.shards_dir={shards}",
               f"train.output_dir={out}", "train.eval_at_end=false", "tracking.enabled=false",
               "meta.tasks_per_batch=32", *extra])
    assert rc == 0
    return out / "checkpoint"


def _init_and_dump(rank, world, shards, ckpt, dump, extra):
    """A Meta-SGD model sharded row-wise over the ranks, its weights from ``ckpt``: dump this
    rank's table shards, its dense weights and what the checkpoint lacked."""
    from gmeta.config import load_config
    from gmeta.models.dlrm import build_model
    from gmeta.parallel.sharding import shard_model

    cfg = load_config(DEBUG_CONFIG, [f"data.shards_dir={shards}", "sharding.sharding_type=row_wise",
                                     "meta.meta_sgd=true", *extra])
    torch.manual_seed(1)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    missing = load_init(ckpt, model, cfg)
    tables, dense = {}, {}
    for key, value in model.state_dict().items():
        if hasattr(value, "local_shards"):
            for sh in value.local_shards():
                tables[(key, *sh.metadata.shard_offsets)] = sh.tensor.clone()
        else:
            dense[key] = value.clone()
    torch.save({"tables": tables, "dense": dense, "missing": missing}, f"{dump}-{rank}.pt")


def test_init_from_loads_another_plans_weights_into_two_ranks(debug_checkpoint, debug_data, tmp_path):
    # written by one process (table-wise), read by two (row-wise), into a Meta-SGD model
    run_ranks(_init_and_dump, 2, str(debug_data["shards"]), str(debug_checkpoint), str(tmp_path / "d"), [])
    src = load_unsharded(debug_checkpoint)[0].state_dict()
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'd'}-{rank}.pt", weights_only=False)
        for (key, r0, c0), t in got["tables"].items():
            torch.testing.assert_close(t, src[key][r0: r0 + t.shape[0], c0: c0 + t.shape[1]], rtol=0, atol=0)
        for key, t in got["dense"].items():
            if key.startswith("head."):
                torch.testing.assert_close(t, src[key], rtol=0, atol=0, msg=key)
        # Meta-SGD's rates are not in a plain MAML checkpoint: left at their initial inner_lr
        assert got["missing"] and all(k.startswith("inner_lr_") for k in got["missing"])
        assert torch.all(got["dense"]["inner_lr_emb"] == 0.5)
        assert len(got["tables"]) >= 1


@pytest.mark.parametrize("extra, message", [
    (["model.embedding_dim=4"], r"train.init_from: .* model.embedding_dim 8, this config has 4"),
    (["model.over_arch=[8]"], r"model.over_arch \[32, 16\], this config has \[8\]"),
    (["features.sparse=[{name: user_id, num_embeddings: 999}]"], r"train.init_from: .* other features"),
])
def test_init_from_a_model_of_another_shape_is_refused(debug_checkpoint, debug_data, extra, message):
    from gmeta.config import load_config
    from gmeta.models.dlrm import build_model

    cfg = load_config(DEBUG_CONFIG, [f"data.shards_dir={debug_data['shards']}", *extra])
    with pytest.raises(CheckpointError, match=message):
        load_init(debug_checkpoint, build_model(cfg), cfg)


def test_init_from_a_missing_checkpoint_names_it(debug_data, tmp_path):
    from gmeta.config import load_config
    from gmeta.models.dlrm import build_model

    cfg = load_config(DEBUG_CONFIG)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        load_init(tmp_path / "nowhere", build_model(cfg), cfg)


def test_pretrain_epoch_is_erm_then_meta_training_continues(debug_data, tmp_path):
    shards = debug_data["shards"]
    # the first epoch of a two-stage run is exactly an ERM run of one epoch
    erm = _train(tmp_path / "erm", shards, "meta.algorithm=erm", "train.epochs=1")
    steps = int(__import__("json").loads((erm / "meta.json").read_text())["step"])
    first = _train(tmp_path / "first", shards, "train.pretrain_epochs=1", f"train.max_steps={steps}")
    a, b = load_unsharded(erm)[0].state_dict(), load_unsharded(first)[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # the whole run: one epoch of each, and the second one is MAML, not more ERM
    both = _train(tmp_path / "both", shards, "train.pretrain_epochs=1", "train.epochs=1")
    erm2 = _train(tmp_path / "erm2", shards, "meta.algorithm=erm", "train.epochs=2")
    meta = __import__("json").loads((both / "meta.json").read_text())
    assert meta["step"] == 2 * steps
    c, d = load_unsharded(both)[0].state_dict(), load_unsharded(erm2)[0].state_dict()
    assert not torch.equal(c["head.over_arch.mlp.layers.0.weight"], d["head.over_arch.mlp.layers.0.weight"])


def test_init_from_starts_meta_training_at_the_erm_weights(debug_data, tmp_path):
    """A warm-started run's first step starts from the ERM weights: with one step of a tiny
    learning rate, it stays next to them and far from a cold start's weights."""
    shards = debug_data["shards"]
    erm = _train(tmp_path / "erm", shards, "meta.algorithm=erm", "train.epochs=1")
    tiny = ["train.max_steps=1", "optim.dense_lr=1e-9", "optim.embedding_lr=1e-9"]
    warm = _train(tmp_path / "warm", shards, f"train.init_from={erm}", *tiny)
    cold = _train(tmp_path / "cold", shards, *tiny)
    e, w, c = (load_unsharded(x)[0].state_dict() for x in (erm, warm, cold))
    key = "head.over_arch.mlp.layers.0.weight"
    assert (w[key] - e[key]).abs().max() < 1e-6 < (c[key] - e[key]).abs().max()
    table = next(k for k in e if k.startswith("sparse_arch."))
    assert (w[table] - e[table]).abs().max() < 1e-6


@pytest.mark.parametrize("arch, theirs, mine, key", [
    ("mmoe", "model.experts=4", "model.experts=2", "model.experts"),
    ("mmoe", "model.expert_arch=[8]", "model.expert_arch=[6]", "model.expert_arch"),
    ("dcn_v2", "model.cross_layers=2", "model.cross_layers=3", "model.cross_layers"),
])
def test_a_heads_own_shape_keys_are_compared(arch, theirs, mine, key):
    from gmeta.checkpoint import model_differences
    from gmeta.config import load_config

    labels = ["features.labels=[label,conversion]"] if arch == "mmoe" else []

    def cfg(extra):
        return load_config(DEBUG_CONFIG, [f"model.arch={arch}", *labels, extra])

    assert [k for k, _, _ in model_differences(cfg(theirs), cfg(mine))] == [key]
    # an identical config differs in nothing
    assert model_differences(cfg(theirs), cfg(theirs)) == []
