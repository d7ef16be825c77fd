"""The vectorized MAML step against the per-task reference (float64) and against finite
differences (second order)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from gmeta.config import load_config
from gmeta.io.reader import TaskReader
from gmeta.layout import layout_of
from gmeta.meta import maml
from gmeta.meta.fast_weights import choose_fast_weights
from gmeta.meta.maml import maml_loss
from gmeta.models.dlrm import DLRMHead, build_model, lookup_rows
from tests.support.reference import task_query_losses


def _setup(debug_config_path, debug_data, n_tasks=5, dim=4, extra=()):
    cfg = load_config(debug_config_path, [f"model.embedding_dim={dim}", "model.dense_arch=[6]",
                                          "model.over_arch=[5]", *extra])
    torch.manual_seed(0)
    model = build_model(cfg)
    head = copy.deepcopy(model.head).double()
    reader = TaskReader(debug_data["shards"], "train", n_tasks, shuffle=False)
    batch = next(iter(reader))
    batch.dense = batch.dense.double()
    batch.labels = batch.labels.double()
    tables = {f["name"]: (torch.randn(f["num_embeddings"], dim, dtype=torch.float64) * 0.3).requires_grad_()
              for f in model.features}
    return model, head, batch, tables


def _lookup(model, batch, tables, buckets=1):
    """(rows, layout): what the sharded lookup returns, built from plain tables (differentiable)."""
    layout = layout_of(batch, model.pooling, buckets, model.cell_widths)
    per = layout.kjt([f["name"] for f in model.features]).to_dict()
    emb = {name: JaggedTensor(values=tables[name][per[name].values()], lengths=per[name].lengths())
           for name in tables}
    return lookup_rows(emb, model.features), layout


def _check_against_reference(model, head, batch, tables, buckets, fast_weights, **kw):
    ref = torch.stack(task_query_losses(head, tables, model.features, batch, **kw))
    ref_grads = torch.autograd.grad(ref.mean(), list(head.parameters()) + list(tables.values()))

    rows, layout = _lookup(model, batch, tables, buckets)
    out = maml_loss(head, rows, batch, layout, fast_weights=fast_weights, **kw)
    grads = torch.autograd.grad(out.loss, list(head.parameters()) + list(tables.values()))
    torch.testing.assert_close(out.query_loss, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    # the table gradients are not trivially zero
    assert sum(float(g.abs().sum()) for g in grads[-len(tables):]) > 0


def _check_meta_sgd(model, head, batch, tables, adapt_dense, first_order=False) -> list[torch.Tensor]:
    """Meta-SGD (a learned rate per adapted element and per (feature, dim)) against the
    reference: query losses and every gradient, the rates' included; returns the gradients
    (head, tables, dense rates, embedding rate)."""
    from gmeta.models.heads import adapted_shapes

    gen = torch.Generator().manual_seed(5)
    lrs = {n: (0.1 + 0.4 * torch.rand(shape, generator=gen, dtype=torch.float64)).requires_grad_()
           for n, shape in adapted_shapes(head, adapt_dense, "weights").items()}
    emb_lr = (0.2 + torch.rand(len(tables), 4, generator=gen, dtype=torch.float64)).requires_grad_()
    kw = dict(steps=2, lr=lrs, emb_lr=emb_lr, adapt_dense=adapt_dense, adapt_embeddings=True,
              first_order=first_order)
    wrt = list(head.parameters()) + list(tables.values()) + list(lrs.values()) + [emb_lr]
    ref = torch.stack(task_query_losses(head, tables, model.features, batch, **kw))
    ref_grads = torch.autograd.grad(ref.mean(), wrt)
    rows, layout = _lookup(model, batch, tables)
    out = maml_loss(head, rows, batch, layout, **kw)
    grads = list(torch.autograd.grad(out.loss, wrt))
    torch.testing.assert_close(out.query_loss, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    return grads


def _check_reptile(model, head, batch, tables) -> None:
    """Reptile's surrogate gradient (every layer and row adapted) against the per-task reference."""
    from gmeta.meta.reptile import reptile_loss
    from tests.support.reference import reptile_directions

    kw = dict(steps=2, lr=0.3, emb_lr=0.5, adapt_dense=["all"], adapt_embeddings=True)
    ref = reptile_directions(head, tables, model.features, batch, **kw)
    rows, layout = _lookup(model, batch, tables)
    out = reptile_loss(head, rows, batch, layout, **kw)
    named = dict(head.named_parameters())
    grads = torch.autograd.grad(out.loss, list(named.values()) + list(tables.values()))
    for (name, _), g in zip(list(named.items()) + list(tables.items()), grads):
        torch.testing.assert_close(g, ref[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("fast_weights", ["implicit", "materialized", "mixed"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("adapt_embeddings", [True, False])
@pytest.mark.parametrize("adapt_dense, buckets", [(["dense_arch", "over_arch"], 1), (["over_arch"], 1),
                                                  (["dense_arch", "over_arch"], 3)])
def test_vectorized_step_equals_per_task_reference(debug_config_path, debug_data, first_order, adapt_embeddings,
                                                   adapt_dense, buckets, fast_weights, monkeypatch):
    if fast_weights == "mixed":  # layers alternate between the two forms, as "auto" may choose
        def alternate(head, adapt_dense, mode, *args):
            return {p: ("implicit", "materialized")[i % 2]
                    for i, p in enumerate(choose_fast_weights(head, adapt_dense, "implicit", *args))}
        monkeypatch.setattr(maml, "choose_fast_weights", alternate)
        fast_weights = "auto"
    model, head, batch, tables = _setup(debug_config_path, debug_data)
    _check_against_reference(model, head, batch, tables, buckets, fast_weights, steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=adapt_dense, adapt_embeddings=adapt_embeddings, first_order=first_order)


@pytest.mark.parametrize("fast_weights", ["implicit", "materialized"])
@pytest.mark.parametrize("adapt_dense", [["last"], ["dense_arch.mlp.layers.0", "over_arch.mlp.layers.1"]])
def test_chosen_layers_step_equals_per_task_reference(debug_config_path, debug_data, adapt_dense, fast_weights):
    """ANIL (the output layer only) and layers chosen by name: only those adapt per task."""
    model, head, batch, tables = _setup(debug_config_path, debug_data)
    _check_against_reference(model, head, batch, tables, 2, fast_weights, steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=adapt_dense, adapt_embeddings=True, first_order=False)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("dense_adaptation", ["bias", "film"])
@pytest.mark.parametrize("adapt_dense", [["dense_arch", "over_arch"], ["over_arch.mlp.layers.0", "last"]])
def test_bias_and_film_adaptation_equal_per_task_reference(debug_config_path, debug_data, dense_adaptation,
                                                         adapt_dense, first_order):
    """Biases only, and FiLM (a per-task scale and shift of the chosen layers' outputs)."""
    model, head, batch, tables = _setup(debug_config_path, debug_data)
    _check_against_reference(model, head, batch, tables, 2, "auto", steps=3, lr=0.3, emb_lr=0.7,
                             adapt_dense=adapt_dense, adapt_embeddings=True, first_order=first_order,
                             dense_adaptation=dense_adaptation)


def test_adapting_only_biases_or_film_differs_from_adapting_weights(debug_config_path, debug_data):
    model, head, batch, tables = _setup(debug_config_path, debug_data)
    rows, layout = _lookup(model, batch, tables)
    kw = dict(steps=2, lr=0.3, emb_lr=0.7, adapt_dense=["over_arch"], adapt_embeddings=False, first_order=False)
    losses = {a: maml_loss(head, rows, batch, layout, dense_adaptation=a, **kw).query_loss
              for a in ("weights", "bias", "film")}
    assert not torch.allclose(losses["weights"], losses["bias"])
    assert not torch.allclose(losses["film"], losses["bias"])


@pytest.mark.parametrize("dense_adaptation", ["weights", "film"])
def test_meta_sgd_over_film_and_chosen_features_equals_reference(debug_config_path, debug_data, dense_adaptation):
    """Meta-SGD's learned rates over FiLM's scale and shift (names as adapted_shapes gives
    them), with the rows of only some features adapting."""
    from gmeta.models.dlrm import adapted_shapes

    model, head, batch, tables = _setup(debug_config_path, debug_data)
    gen = torch.Generator().manual_seed(3)
    adapt = ["over_arch"]
    lrs = {n: (0.1 + 0.4 * torch.rand(shape, generator=gen, dtype=torch.float64)).requires_grad_()
           for n, shape in adapted_shapes(head, adapt, dense_adaptation).items()}
    if dense_adaptation == "film":
        assert "over_arch.mlp.layers.0.film_scale" in lrs and all(v.dim() == 1 for v in lrs.values())
    emb_lr = (0.2 + torch.rand(len(tables), 4, generator=gen, dtype=torch.float64)).requires_grad_()
    kw = dict(steps=2, lr=lrs, emb_lr=emb_lr, adapt_dense=adapt, adapt_embeddings=True, first_order=False,
              dense_adaptation=dense_adaptation, adapt_features=[1])
    wrt = list(head.parameters()) + list(tables.values()) + list(lrs.values()) + [emb_lr]
    ref = torch.stack(task_query_losses(head, tables, model.features, batch, **kw))
    ref_grads = torch.autograd.grad(ref.mean(), wrt, allow_unused=True)
    rows, layout = _lookup(model, batch, tables)
    out = maml_loss(head, rows, batch, layout, **kw)
    grads = torch.autograd.grad(out.loss, wrt, allow_unused=True)
    torch.testing.assert_close(out.query_loss, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(r), r if r is not None else
                                   torch.zeros_like(g), rtol=0, atol=1e-12)
    # only feature 1's embedding rate gets a meta-gradient: the other features' rows do not adapt
    assert float(grads[-1][1].abs().sum()) > 0
    assert float(grads[-1][0].abs().sum()) == 0 and float(grads[-1][2:].abs().sum()) == 0


@pytest.mark.parametrize("adapt_features", [[0], [1, 2]])
def test_chosen_features_adapt_alone_equal_reference(debug_config_path, debug_data, adapt_features):
    model, head, batch, tables = _setup(debug_config_path, debug_data)
    _check_against_reference(model, head, batch, tables, 2, "auto", steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=["last"], adapt_embeddings=True, first_order=False,
                             adapt_features=adapt_features)


def test_chosen_layers_select_by_name(debug_config_path):
    from gmeta.config import ConfigError, load_config
    from gmeta.models.dlrm import adapted_layers, build_model

    cfg = load_config(debug_config_path, ["meta.meta_sgd=true", "meta.adapt_dense=[last]"])
    model = build_model(cfg)  # over_arch [32, 16] + the output layer: layers 0, 1, 2
    assert list(adapted_layers(model.head, ["last"])) == ["over_arch.mlp.layers.2"]
    assert sorted(model.inner_lr_dense) == ["over_arch__mlp__layers__2__bias", "over_arch__mlp__layers__2__weight"]
    assert len(adapted_layers(model.head, ["over_arch"])) == 3
    wrong = r"meta.adapt_dense\[0\]: .*over_arch.mlp.layers.2.*got 'over_arch.mlp.layers.3'"
    with pytest.raises(ConfigError, match=wrong):
        load_config(debug_config_path, ["meta.adapt_dense=[over_arch.mlp.layers.3]"])
    with pytest.raises(ConfigError, match=r"meta.adapt_features\[1\]: must name a sparse feature .*ad_id.*got 'ad'"):
        load_config(debug_config_path, ["meta.adapt_features=[user_id, ad]"])
    film = build_model(load_config(debug_config_path, ["meta.meta_sgd=true", "meta.adapt_dense=[last]",
                                                       "meta.dense_adaptation=film"]))
    assert sorted(film.inner_lr_dense) == ["over_arch__mlp__layers__2__film_scale",
                                           "over_arch__mlp__layers__2__film_shift"]
    assert film.inner_lr_dense["over_arch__mlp__layers__2__film_scale"].shape == (1,)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3, 4, 5])
def test_implicit_fast_weights_equal_reference_for_k_steps(debug_config_path, debug_data, first_order, steps):
    model, head, batch, tables = _setup(debug_config_path, debug_data, n_tasks=7)
    _check_against_reference(model, head, batch, tables, 3, "implicit", steps=steps, lr=0.2, emb_lr=0.4,
                             adapt_dense=["dense_arch", "over_arch"], adapt_embeddings=True,
                             first_order=first_order)


def test_implicit_path_forms_no_per_task_weights(debug_config_path, debug_data):
    """No tensor of shape [N_b, out, in] is saved for backward on the implicit path (the
    materialised path saves one per adapted weight and step)."""
    model, head, batch, tables = _setup(debug_config_path, debug_data, n_tasks=6)
    weight_shapes = {tuple(p.shape) for n, p in head.named_parameters() if p.dim() == 2}

    def per_task_weights(fast_weights: str) -> int:
        found = []

        def pack(t):
            if t.dim() == 3 and tuple(t.shape[1:]) in weight_shapes and t.shape[0] > 1:
                found.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rows, layout = _lookup(model, batch, tables)
            maml_loss(head, rows, batch, layout, steps=2,
                      lr=0.3, emb_lr=0.5, adapt_dense=["dense_arch", "over_arch"], adapt_embeddings=True,
                      first_order=False, fast_weights=fast_weights)
        return len(found)

    assert per_task_weights("materialized") > 0  # the probe does see them where they exist
    assert per_task_weights("implicit") == 0


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_sgd_step_equals_per_task_reference(debug_config_path, debug_data, first_order):
    model, head, batch, tables = _setup(debug_config_path, debug_data)
    grads = _check_meta_sgd(model, head, batch, tables, ["dense_arch", "over_arch"], first_order)
    assert float(grads[-1].abs().sum()) > 0  # the learned rates do get a meta-gradient


def test_second_order_meta_gradient_matches_finite_differences(debug_config_path, debug_data):
    model, head, batch, tables = _setup(debug_config_path, debug_data, n_tasks=3)
    kw = dict(steps=2, lr=0.5, emb_lr=0.5,
              adapt_dense=["dense_arch", "over_arch"], adapt_embeddings=True, first_order=False)

    def loss_fn():
        rows, layout = _lookup(model, batch, tables)
        return maml_loss(head, rows, batch, layout, **kw).loss

    params = list(head.parameters()) + [tables["user_id"], tables["interests"]]
    grads = torch.autograd.grad(loss_fn(), params)
    gen = torch.Generator().manual_seed(1)
    eps = 1e-6
    checked = 0
    for p, g in zip(params, grads):
        flat_g = g.reshape(-1)
        # probe entries with a non-zero gradient plus random ones
        nz = flat_g.nonzero().squeeze(1)
        picks = nz[torch.randperm(len(nz), generator=gen)[:3]] if len(nz) else torch.tensor([], dtype=torch.long)
        for i in picks.tolist():
            flat = p.data.view(-1)  # .data: edit in place without recording it
            orig = flat[i].item()
            flat[i] = orig + eps
            up = loss_fn().item()
            flat[i] = orig - eps
            down = loss_fn().item()
            flat[i] = orig
            fd = (up - down) / (2 * eps)
            assert abs(fd - flat_g[i].item()) < 1e-7 + 1e-5 * abs(fd), (p.shape, i, fd, flat_g[i].item())
            checked += 1
    assert checked >= 10

    # first order is a different (approximate) gradient: it must not equal the true one
    kw["first_order"] = True
    fo = torch.autograd.grad(loss_fn(), params)
    assert any(not torch.allclose(a, b, atol=1e-9) for a, b in zip(fo, grads))


def test_head_accepts_shared_and_per_task_weights():
    torch.manual_seed(0)
    head = DLRMHead(num_dense=3, num_sparse=2, embedding_dim=4, dense_sizes=[5], over_sizes=[6])
    dense = torch.randn(2, 7, 3)
    pooled = torch.randn(2, 7, 2, 4)
    shared = head(dense, pooled)
    assert shared.shape == (2, 7)
    # per-task weights of only some layers, different for each task: task t's logits are those
    # of the module holding task t's weights (the reference swaps them in by functional_call)
    per_task = {n: p.unsqueeze(0) + 0.1 * torch.randn(2, *p.shape)
                for n, p in head.named_parameters() if n.startswith("over_arch")}
    batched = head(dense, pooled, per_task)
    for t in range(2):
        own = torch.func.functional_call(head, {n: w[t] for n, w in per_task.items()}, (dense[t], pooled[t]))
        torch.testing.assert_close(batched[t], own)
    assert not torch.allclose(batched, shared)


def test_size_buckets_keep_query_logits_in_row_order(debug_config_path, debug_data):
    from gmeta.meta.maml import adapt_and_query

    model, head, batch, tables = _setup(debug_config_path, debug_data, n_tasks=9)
    kw = dict(steps=1, lr=0.3, emb_lr=0.5, adapt_dense=["over_arch"],
              adapt_embeddings=True, first_order=True)
    rows1, layout1 = _lookup(model, batch, tables, 1)
    rows4, layout4 = _lookup(model, batch, tables, 4)
    assert len(layout4.buckets) > 1
    one = adapt_and_query(head, rows1, batch, layout1, **kw)
    four = adapt_and_query(head, rows4, batch, layout4, **kw)
    assert one[0].shape == (batch.num_query,)
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_auto_fast_weights_are_implicit_for_wide_layers_and_materialised_for_small_ones():
    torch.manual_seed(0)
    head = DLRMHead(num_dense=13, num_sparse=26, embedding_dim=32, dense_sizes=[256], over_sizes=[512, 256])
    modes = choose_fast_weights(head, ["dense_arch", "over_arch"], "auto", 0.1, 2, 20, 20)
    assert modes["over_arch.mlp.layers.0."] == "implicit"  # 383 -> 512, 20 + 20 rows
    assert modes["dense_arch.mlp.layers.0."] == "materialized"  # 13 -> 256
    # large tasks make the implicit products the costlier form
    assert set(choose_fast_weights(head, ["over_arch"], "auto", 0.1, 2, 2000, 2000).values()) == {"materialized"}
    assert set(choose_fast_weights(head, ["over_arch"], "auto", {"x": torch.ones(1)}, 2, 20, 20).values()) == \
        {"materialized"}  # Meta-SGD
    assert set(choose_fast_weights(head, ["over_arch"], "implicit", 0.1, 2, 2000, 2000).values()) == {"implicit"}


@pytest.mark.parametrize("first_order", [False, True])
def test_single_valued_features_pool_by_reshape_and_equal_reference(debug_config_path, debug_data, first_order):
    """With one id in every (row, feature) cell the layout orders occurrences by cell and
    pools by a reshape (no scatter); still equal to the reference."""
    from gmeta.io.batch import task_batch
    from tests.test_library import _frame_of

    cfg = load_config(debug_config_path, ["model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]"])
    full = build_model(cfg)
    single = [f for f in full.features if not f["multi_hot"]]
    reader_batch = next(iter(TaskReader(debug_data["shards"], "train", 6, shuffle=False)))
    df = _frame_of(reader_batch, full.features, cfg.features.dense).sort_values("task", kind="stable")
    batch = task_batch(df, task="task", query="is_query", label="label", sparse=[f["name"] for f in single],
                       dense=cfg.features.dense, features=single, size_buckets=2, ids="rows")
    assert batch.layout.one_per_cell == 1
    batch.dense, batch.labels = batch.dense.double(), batch.labels.double()
    cfg = load_config(debug_config_path, ["model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]",
                                          "features.sparse=[" + ", ".join(
                                              f"{{name: {f['name']}, num_embeddings: {f['num_embeddings']}}}"
                                              for f in single) + "]"])
    torch.manual_seed(0)
    model = build_model(cfg)
    head = copy.deepcopy(model.head).double()
    tables = {f["name"]: (torch.randn(f["num_embeddings"], 4, dtype=torch.float64) * 0.3).requires_grad_()
              for f in model.features}
    _check_against_reference(model, head, batch, tables, 2, "auto", steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=["dense_arch", "over_arch"], adapt_embeddings=True, first_order=first_order)


def _one_size(batch, pooling: list[str], size_buckets: int):
    """The batch cut to tasks of one size: each task's first support and first query rows,
    as many as the smallest task has."""
    from gmeta.io.collate import pack_batch

    so, qo = batch.support_offsets.numpy(), batch.query_offsets.numpy()
    w_s, w_q = int(np.diff(so).min()), int(np.diff(qo).min())
    keep = np.concatenate([(so[:-1, None] + np.arange(w_s)).ravel(), so[-1] + (qo[:-1, None] + np.arange(w_q)).ravel()])
    nf, r = len(pooling), batch.num_rows
    lengths = batch.sparse.lengths().numpy().reshape(nf, r)
    starts = np.concatenate([[0], np.cumsum(lengths.ravel())])[:-1].reshape(nf, r)
    values = batch.sparse.values().numpy()
    n = len(so) - 1
    # dense and labels: the reader's float32 values, which _setup doubled (exact both ways)
    arrays = {"values": np.concatenate([values[s: s + ln] for f in range(nf)
                                        for s, ln in zip(starts[f, keep], lengths[f, keep])]),
              "lengths": lengths[:, keep].ravel(), "dense": batch.dense.float().numpy()[keep],
              "labels": batch.labels.float().numpy()[keep], "support_offsets": np.arange(n + 1) * w_s,
              "query_offsets": np.arange(n + 1) * w_q, "task_ids": batch.task_ids.numpy()}
    out = pack_batch(arrays, batch.sparse.keys(), pooling, size_buckets).unpack()
    out.dense, out.labels = out.dense.double(), out.labels.double()
    return out


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("buckets", [1, 2])
def test_tasks_of_one_size_move_by_reshape_and_equal_per_task_reference(debug_config_path, debug_data, first_order,
                                                                          buckets):
    """Tasks all of one size fill their one bucket in order (``BatchLayout.in_order``): the
    step moves rows into it by a reshape, no gather, and still equals the reference."""
    model, head, batch, tables = _setup(debug_config_path, debug_data)
    batch = _one_size(batch, model.pooling, buckets)
    layout = layout_of(batch, model.pooling, buckets)
    b = layout.buckets[0]
    assert layout.in_order() == (True, True) and len(layout.buckets) == 1
    assert b.s_index.reshape(-1).tolist() == list(range(layout.num_support))
    assert b.q_index.reshape(-1).tolist() == list(range(layout.num_query))
    calls = []
    real_gather = maml.gather_rows
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(maml, "gather_rows", lambda x, index: calls.append(index) or real_gather(x, index))
        _check_against_reference(model, head, batch, tables, buckets, "auto", steps=2, lr=0.3, emb_lr=0.7,
                                 adapt_dense=["dense_arch", "over_arch"], adapt_embeddings=True,
                                 first_order=first_order)
    assert not any(i is b.s_index or i is b.q_index for i in calls)  # rows moved by reshape


def test_in_order_only_where_the_padded_index_is_every_row_in_order():
    """``BatchLayout.in_order`` (known from shapes) against the index itself, over batches of
    random task sizes, some all of one size, with 1 to 3 buckets asked for."""
    from gmeta.layout import BatchLayout, build_arrays

    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(300):
        n = int(rng.integers(1, 6))
        s = np.full(n, rng.integers(1, 4)) if trial % 2 else rng.integers(1, 4, n)
        q = np.full(n, rng.integers(1, 4)) if trial % 3 else rng.integers(1, 4, n)
        so, qo = np.concatenate([[0], np.cumsum(s)]), np.concatenate([[0], np.cumsum(q)])
        r = int(so[-1] + qo[-1])
        lay = BatchLayout.from_arrays(build_arrays(np.arange(r), np.ones(r, np.int64), so, qo, ["sum"],
                                                   int(rng.integers(1, 4))))
        got = lay.in_order()
        for flag, index, rows in zip(got, ("s_index", "q_index"), (lay.num_support, lay.num_query)):
            whole = len(lay.buckets) == 1 and getattr(lay.buckets[0], index).reshape(-1).tolist() == list(range(rows))
            assert not flag or whole, (s, q, lay.requested_buckets)
        seen.add(got)
    assert seen == {(True, True), (True, False), (False, True), (False, False)}
