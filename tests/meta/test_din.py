"""The DIN head (``model.arch: din``) under the vectorized meta step, against the per-task
float64 reference (tests.support.reference, which builds a sequence's cells row by row):
first and second order, each adaptation form, Meta-SGD, Reptile; its attention; its config."""

from __future__ import annotations

import pytest
import torch

from gmeta.config import ConfigError, load_config
from gmeta.models.heads import DINHead, adapted_shapes, head_parts
from tests.conftest import DEBUG_CONFIG
from tests.meta.test_maml import _check_against_reference, _check_meta_sgd, _check_reptile, _setup
from tests.support.sequences import MAX_LENGTH, seq_overrides

DIN = ["model.arch=din", "model.attention_arch=[3]"]


def _din(seq_data, n_tasks=5):
    model, head, batch, tables = _setup(DEBUG_CONFIG, {"shards": seq_data["pq"]}, n_tasks=n_tasks,
                                        extra=[*seq_overrides(DEBUG_CONFIG), *DIN])
    assert isinstance(head, DINHead) and int(batch.sparse["clicked_ads"].lengths().max()) == MAX_LENGTH
    return model, head, batch, tables


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("fast_weights", ["implicit", "materialized"])
def test_din_every_layer_adapted_equals_per_task_reference(seq_data, first_order, fast_weights):
    model, head, batch, tables = _din(seq_data)
    _check_against_reference(model, head, batch, tables, 2, fast_weights, steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=["all"], adapt_embeddings=True, first_order=first_order)


@pytest.mark.parametrize("dense_adaptation", ["bias", "film"])
def test_din_bias_and_film_adaptation_equal_per_task_reference(seq_data, dense_adaptation):
    model, head, batch, tables = _din(seq_data)
    _check_against_reference(model, head, batch, tables, 1, "auto", steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=head_parts(head), adapt_embeddings=True, first_order=False,
                             dense_adaptation=dense_adaptation)


def test_din_attention_alone_equals_per_task_reference(seq_data):
    model, head, batch, tables = _din(seq_data)
    _check_against_reference(model, head, batch, tables, 2, "auto", steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=["attention"], adapt_embeddings=False, first_order=False)


def test_din_meta_sgd_equals_per_task_reference(seq_data):
    model, head, batch, tables = _din(seq_data)
    assert set(adapted_shapes(head, ["all"], "weights")) == {n for n, _ in head.named_parameters()}
    grads = _check_meta_sgd(model, head, batch, tables, ["all"])
    rates = dict(zip(adapted_shapes(head, ["all"], "weights"), grads[len(list(head.parameters())) + len(tables):]))
    assert float(rates["attention.0.layers.0.weight"].abs().sum()) > 0  # the attention's rates learn


def test_din_reptile_gradient_equals_per_task_reference(seq_data):
    model, head, batch, tables = _din(seq_data)
    _check_reptile(model, head, batch, tables)


def test_din_interest_is_the_attention_weighted_sum_and_padding_adds_nothing():
    """interest = sum_t a([e_t, v, e_t - v, e_t v]) e_t over the cells, written out; a DIN of
    longer sequences with the same weights gives the same outputs when the extra cells are
    the zeros of padding (no softmax, no mask)."""
    feats = [{"name": "ad", "num_embeddings": 9}, {"name": "u", "num_embeddings": 9},
             {"name": "seq", "num_embeddings": 9, "multi_hot": True, "max_length": 3, "table": "ad"}]
    torch.manual_seed(0)
    head = DINHead(2, 3, 4, [5], [6], features=feats, attention_sizes=[3]).double()
    longer = DINHead(2, 3, 4, [5], [6], features=[*feats[:2], dict(feats[2], max_length=5)],
                     attention_sizes=[3]).double()
    longer.load_state_dict(head.state_dict())
    dense, cells = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 5, 4, dtype=torch.float64)
    v, seq = cells[:, 0], cells[:, 2:5]
    a = head.attention[0]
    want = sum(a(torch.cat([seq[:, t], v, seq[:, t] - v, seq[:, t] * v], -1)) * seq[:, t] for t in range(3))
    torch.testing.assert_close(head.interest(0, cells), want)
    x = torch.cat([head.dense_arch(dense), cells[:, 0], cells[:, 1], want], -1)
    torch.testing.assert_close(head(dense, cells), head.over_arch(x))
    padded = torch.cat([cells, torch.zeros(7, 2, 4, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(longer(dense, padded), head(dense, cells))
    assert not torch.allclose(longer(dense, padded + 0.1 * (padded == 0)), head(dense, cells))
    with pytest.raises(ValueError, match="cell widths"):  # one cell per feature: a layout without the sequence's
        head(dense, cells[:, :3])


def test_din_runs_per_task_weights_as_each_task_alone():
    feats = [{"name": "ad", "num_embeddings": 9}, {"name": "seq", "max_length": 3, "table": "ad"}]
    torch.manual_seed(0)
    head = DINHead(2, 2, 4, [5], [6], features=feats, attention_sizes=[3])
    dense, cells = torch.randn(2, 7, 2), torch.randn(2, 7, 4, 4)
    per_task = {n: p.unsqueeze(0) + 0.1 * torch.randn(2, *p.shape) for n, p in head.named_parameters()}
    batched = head(dense, cells, per_task)
    for t in range(2):
        own = torch.func.functional_call(head, {n: w[t] for n, w in per_task.items()}, (dense[t], cells[t]))
        torch.testing.assert_close(batched[t], own)
    assert not torch.allclose(batched, head(dense, cells))


def test_din_config_names_its_parts_and_refuses_what_it_cannot_build():
    from gmeta.models.dlrm import build_model

    seq = seq_overrides(DEBUG_CONFIG)
    cfg = load_config(DEBUG_CONFIG, [*seq, *DIN, "meta.adapt_dense=[attention]"])
    head = build_model(cfg).head
    assert head_parts(head) == ["dense_arch", "attention", "over_arch"]
    # 10 features of one cell (the candidate ad_id among them), the interest, the dense vector: 12 of 8
    assert head.over_arch.mlp.layers[0].in_features == 12 * 8
    with pytest.raises(ConfigError, match="model.arch: din attends over a sequence"):
        load_config(DEBUG_CONFIG, DIN)
    no_table = seq_overrides(DEBUG_CONFIG, "{name: clicked_ads, num_embeddings: 2000, multi_hot: true, max_length: 5}")
    with pytest.raises(ConfigError, match=r"features.sparse\[10\].table: model.arch din"):
        load_config(DEBUG_CONFIG, [*no_table, *DIN])
    with pytest.raises(ConfigError, match="model.attention_arch"):
        load_config(DEBUG_CONFIG, [*seq, "model.arch=din", "model.attention_arch=[]"])


@pytest.mark.parametrize("arch", ["dlrm", "deepfm"])
def test_other_heads_with_a_sequence_equal_per_task_reference(seq_data, arch):
    """A head that takes one cell per feature sums a sequence's cells (``Head.__call__``):
    the step, whose layout places T cells, equals the reference, which builds them."""
    model, head, batch, tables = _setup(DEBUG_CONFIG, {"shards": seq_data["pq"]},
                                        extra=[*seq_overrides(DEBUG_CONFIG), f"model.arch={arch}"])
    assert head.cell_feature is not None and head.cell_feature.numel() == 10 + MAX_LENGTH
    _check_against_reference(model, head, batch, tables, 2, "auto", steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=["all"], adapt_embeddings=True, first_order=False)


def test_plain_forward_refuses_a_sequence_longer_than_its_cells(seq_data):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    model, _, batch, _ = _din(seq_data)
    keys = [f["name"] for f in model.features]
    lengths = {k: [1, 1] for k in keys}
    dense = torch.zeros(2, batch.dense.shape[-1])

    def forward(first_row: int) -> torch.Tensor:
        lengths["clicked_ads"] = [first_row, 2]
        counts = [n for k in keys for n in lengths[k]]
        kjt = KeyedJaggedTensor.from_lengths_sync(keys, torch.zeros(sum(counts), dtype=torch.int64),
                                                  torch.tensor(counts))
        return model(kjt, dense)

    assert forward(MAX_LENGTH).shape == (2,)  # a full sequence fills its cells
    with pytest.raises(RuntimeError, match=r"clicked_ads.*more than its max_length 5"):
        forward(MAX_LENGTH + 1)  # one more would spill into the next row's cells


def test_head_refuses_cells_of_a_layout_built_without_the_sequences(seq_data):
    _, head, batch, _ = _din(seq_data)
    plain = head.float()
    features = plain.num_cells - MAX_LENGTH + 1  # one cell per feature: the widths forgotten
    with pytest.raises(ValueError, match=rf"din head: {features} cells per row, the features take {plain.num_cells}"):
        plain(torch.zeros(3, batch.dense.shape[-1]), torch.zeros(3, features, 4))


def test_auto_fast_weights_count_the_attentions_rows_per_position(seq_data, monkeypatch):
    from gmeta.meta.fast_weights import choose_fast_weights

    _, head, _, _ = _din(seq_data)
    assert head.rows_per_row("attention.0.layers.0") == MAX_LENGTH and head.rows_per_row("over_arch.mlp.layers.0") == 1
    # the attention's first layer (4 D = 16 in, 3 out) at S = Q = 1, K = 1: implicit costs
    # S (in + out) (S K (K-1) / 2 + Q K), materialised K (S + 1) in out. Counted per row: 19
    # against 96, implicit; per (row, position), S = Q = 5: 475 against 288, materialised
    kw = {"steps": 1, "support_width": 1, "query_width": 1}
    assert choose_fast_weights(head, ["attention"], "auto", 0.1, **kw)["attention.0.layers.0."] == "materialized"
    monkeypatch.setattr(head, "rows_per_row", lambda layer: 1)
    assert choose_fast_weights(head, ["attention"], "auto", 0.1, **kw)["attention.0.layers.0."] == "implicit"
