"""Device-correctness without a GPU: the dense part of gmeta (head, Meta-SGD rates, the
batch and its layout, the meta step, its backward, the cross-rank agreement) placed on the
``meta`` device, every operation checked for an operand left on another device."""

from __future__ import annotations

import pytest
import torch

from gmeta.config import load_config
from gmeta.io.reader import TaskReader
from gmeta.meta.layout import layout_of
from gmeta.models.dlrm import build_model
from gmeta.train import agree_across_ranks, meta_step
from tests.support.device_check import DeviceCheck, WrongDevice

META = torch.device("meta")


def _batch(cfg, shards):
    reader = TaskReader(shards, "train", cfg.meta.tasks_per_batch, seed=0, size_buckets=cfg.meta.size_buckets)
    return next(iter(reader))


def _step_on(device, cfg, batch, move_batch=True):
    model = build_model(cfg)  # head initialised on the host, as training does before sharding
    model.dense_to(device)
    for name, p in model.named_parameters():
        if not name.startswith("sparse_arch."):
            assert p.device == device, name
    b = batch.to(device) if move_batch else batch
    layout = layout_of(batch, model.pooling, cfg.meta.size_buckets)
    rows = torch.randn(layout.num_unique, cfg.model.embedding_dim, device=device, requires_grad=True)
    check = DeviceCheck(device)
    with check:
        out = meta_step(model, b, cfg, rows)
        finite, _, _ = agree_across_ranks(out.loss, out.terms)
        out.loss.backward()
    return check, model


@pytest.mark.parametrize("overrides", [
    ["meta.algorithm=maml", "meta.first_order=false"],
    ["meta.algorithm=maml", "meta.first_order=true", "meta.size_buckets=2"],
    ["meta.algorithm=maml", "meta.fast_weights=implicit"],
    ["meta.algorithm=maml", "meta.fast_weights=materialized", "meta.meta_sgd=true"],
    ["meta.algorithm=erm"],
    ["meta.algorithm=reptile", "meta.dense_adaptation=bias"],
    ["meta.algorithm=maml", "meta.dense_adaptation=film", "meta.meta_sgd=true", "meta.adapt_features=[ad_id]"],
])
def test_meta_step_and_backward_stay_on_the_model_device(debug_config_path, debug_data, overrides):
    cfg = load_config(debug_config_path, overrides)
    check, model = _step_on(META, cfg, _batch(cfg, debug_data["shards"]))
    assert not check.wrong  # (the check raises at the first wrong operand)
    grads = [p.grad for n, p in model.named_parameters() if not n.startswith("sparse_arch.")]
    if "meta.algorithm=reptile" in overrides:  # only what adapts moves (here: the biases)
        grads = [g for g in grads if g is not None]
    assert grads and all(g is not None and g.device == META for g in grads)


def test_the_check_catches_a_batch_left_on_the_host(debug_config_path, debug_data):
    cfg = load_config(debug_config_path, ["meta.algorithm=maml"])
    with pytest.raises(WrongDevice, match="expected meta"):
        _step_on(META, cfg, _batch(cfg, debug_data["shards"]), move_batch=False)
