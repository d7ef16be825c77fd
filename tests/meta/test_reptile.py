"""Reptile's surrogate against a task-by-task reference of its meta-gradient (float64)."""

from __future__ import annotations

import pytest
import torch

from gmeta.config import ConfigError, load_config
from gmeta.meta.reptile import reptile_loss
from tests.meta.test_maml import _lookup, _setup
from tests.support.reference import reptile_directions


@pytest.mark.parametrize("dense_adaptation", ["weights", "bias"])
@pytest.mark.parametrize("adapt_dense, adapt_embeddings, buckets",
                         [(["dense_arch", "over_arch"], True, 1), (["last"], True, 3), (["over_arch"], False, 2)])
def test_reptile_gradient_is_the_mean_move_toward_each_tasks_adapted_weights(
        debug_config_path, debug_data, adapt_dense, adapt_embeddings, buckets, dense_adaptation):
    model, head, batch, tables = _setup(debug_config_path, debug_data, n_tasks=6)
    kw = dict(steps=3, lr=0.3, emb_lr=0.7, adapt_dense=adapt_dense, adapt_embeddings=adapt_embeddings,
              dense_adaptation=dense_adaptation)
    ref = reptile_directions(head, tables, model.features, batch, **kw)
    rows, layout = _lookup(model, batch, tables, buckets)
    out = reptile_loss(head, rows, batch, layout, **kw)
    names = [n for n, _ in head.named_parameters()] + list(tables)
    grads = torch.autograd.grad(out.loss, list(head.parameters()) + list(tables.values()), allow_unused=True)
    moved = 0
    for n, g in zip(names, grads):
        g = torch.zeros_like(ref[n]) if g is None else g
        torch.testing.assert_close(g, ref[n], rtol=0, atol=1e-12, msg=n)
        moved += int(ref[n].abs().sum() > 0)
    # something moves, and only what adapts: unadapted parameters get no gradient at all
    assert moved > 0
    if dense_adaptation == "bias":
        assert all(float(ref[n].abs().sum()) == 0 for n, _ in head.named_parameters() if n.endswith("weight"))
    assert (float(sum(ref[n].abs().sum() for n in tables)) > 0) == adapt_embeddings
    assert out.query_loss.shape == (6,) and not out.query_loss.requires_grad


def test_reptile_with_erm_anchor_adds_the_plain_loss_gradient(debug_config_path, debug_data):
    from gmeta.meta.erm import erm_loss

    model, head, batch, tables = _setup(debug_config_path, debug_data, n_tasks=4)
    kw = dict(steps=1, lr=0.3, emb_lr=0.7, adapt_dense=["over_arch"], adapt_embeddings=True)
    rows, layout = _lookup(model, batch, tables)
    params = list(head.parameters())
    both = torch.autograd.grad(reptile_loss(head, rows, batch, layout, erm_weight=0.5, **kw).loss, params)
    rows, layout = _lookup(model, batch, tables)
    alone = [torch.zeros_like(p) if g is None else g for p, g in zip(params, torch.autograd.grad(
        reptile_loss(head, rows, batch, layout, **kw).loss, params, allow_unused=True))]
    rows, layout = _lookup(model, batch, tables)
    erm = torch.autograd.grad(erm_loss(head, rows, batch, layout).loss, params)
    for b, a, e in zip(both, alone, erm):
        torch.testing.assert_close(b, a + 0.5 * e, rtol=0, atol=1e-12)


def test_reptile_config_refuses_what_it_cannot_learn(debug_config_path):
    with pytest.raises(ConfigError, match="meta.meta_sgd: reptile"):
        load_config(debug_config_path, ["meta.algorithm=reptile", "meta.meta_sgd=true"])
    with pytest.raises(ConfigError, match="meta.dense_adaptation: reptile"):
        load_config(debug_config_path, ["meta.algorithm=reptile", "meta.dense_adaptation=film"])
