"""Several labels per row: each head's output is ``[..., R, L]``, a row's loss the weighted
sum of its labels' losses (features.label_weights), and every algorithm's meta step equals
the per-task float64 reference that writes that sum out label by label."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gmeta.config import load_config
from gmeta.meta.erm import erm_loss
from gmeta.meta.maml import adapt_and_query
from gmeta.models.heads import adapted_layers, build_head, head_parts
from tests.conftest import DEBUG_CONFIG, TWO_LABELS
from tests.meta.test_archs import ARCHS
from tests.meta.test_maml import _check_against_reference, _check_meta_sgd, _check_reptile, _lookup, _setup
from tests.support.reference import erm_row_losses

WEIGHTS = [*TWO_LABELS, "features.label_weights=[1.0, 0.6]"]


def _two(debug_config_path, two_label_data, arch="dlrm", n_tasks=5):
    return _setup(debug_config_path, two_label_data, n_tasks=n_tasks, extra=[*ARCHS[arch], *WEIGHTS])


def test_pointwise_loss_is_the_weighted_sum_of_each_labels_loss():
    cfg = load_config(DEBUG_CONFIG, WEIGHTS)
    head = build_head(cfg.model, 3, len(cfg.features.sparse), cfg.features.loss_weights())
    torch.manual_seed(0)
    out, labels = torch.randn(4, 7, 2), (torch.rand(4, 7, 2) < 0.4).float()
    want = (F.binary_cross_entropy_with_logits(out[..., 0], labels[..., 0], reduction="none")
            + 0.6 * F.binary_cross_entropy_with_logits(out[..., 1], labels[..., 1], reduction="none"))
    torch.testing.assert_close(head.pointwise_loss(out, labels), want)
    assert head.pointwise_loss(out, labels).shape == (4, 7)
    # the weights are not part of the saved state: the config holds them
    assert "loss_weights" not in head.state_dict()
    torch.testing.assert_close(head.predict(out), torch.sigmoid(out))
    one = build_head(load_config(DEBUG_CONFIG).model, 3, len(cfg.features.sparse))
    assert one.num_labels == 1 and not hasattr(one, "loss_weights")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_head_outputs_one_value_per_label(debug_config_path, arch):
    cfg = load_config(debug_config_path, ["model.embedding_dim=4", *ARCHS[arch], *WEIGHTS])
    torch.manual_seed(0)
    head = build_head(cfg.model, len(cfg.features.dense), len(cfg.features.sparse), cfg.features.loss_weights())
    dense = torch.randn(2, 7, len(cfg.features.dense))
    pooled = torch.randn(2, 7, len(cfg.features.sparse), 4)
    assert head(dense, pooled).shape == (2, 7, 2)
    assert adapted_layers(head, ["last"])[head.last_layer].out_features == 2
    # per-task weights: each task's outputs are those of the head holding its weights
    per_task = {n: p.unsqueeze(0) + 0.1 * torch.randn(2, *p.shape) for n, p in head.named_parameters()}
    batched = head(dense, pooled, per_task)
    for t in range(2):
        own = torch.func.functional_call(head, {n: w[t] for n, w in per_task.items()}, (dense[t], pooled[t]))
        torch.testing.assert_close(batched[t], own)
    # the two labels' outputs differ: the output layer is not one unit repeated
    assert not torch.allclose(batched[..., 0], batched[..., 1])


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("first_order", [False, True])
def test_two_label_meta_step_equals_per_task_reference(debug_config_path, two_label_data, arch, first_order):
    model, head, batch, tables = _two(debug_config_path, two_label_data, arch)
    assert batch.labels.shape == (batch.num_rows, 2) and bool(batch.labels[:, 1].any())
    _check_against_reference(model, head, batch, tables, 2, "auto", steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=["all"], adapt_embeddings=True, first_order=first_order)


@pytest.mark.parametrize("arch", ["dlrm", "dcn_v2_parallel_low_rank", "deepfm"])
@pytest.mark.parametrize("dense_adaptation", ["bias", "film"])
def test_two_label_bias_and_film_adaptation_equal_per_task_reference(debug_config_path, two_label_data, arch,
                                                                    dense_adaptation):
    model, head, batch, tables = _two(debug_config_path, two_label_data, arch)
    _check_against_reference(model, head, batch, tables, 1, "auto", steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=head_parts(head), adapt_embeddings=True, first_order=False,
                             dense_adaptation=dense_adaptation)


def test_two_label_anil_equals_per_task_reference(debug_config_path, two_label_data):
    model, head, batch, tables = _two(debug_config_path, two_label_data)
    for fast_weights in ("implicit", "materialized"):
        _check_against_reference(model, head, batch, tables, 2, fast_weights, steps=2, lr=0.3, emb_lr=0.7,
                                 adapt_dense=["last"], adapt_embeddings=False, first_order=False)


def test_two_label_meta_sgd_equals_per_task_reference(debug_config_path, two_label_data):
    model, head, batch, tables = _two(debug_config_path, two_label_data, "wide_deep")
    _check_meta_sgd(model, head, batch, tables, ["all"])


@pytest.mark.parametrize("arch", ["dlrm", "dcn_v2"])
def test_two_label_reptile_gradient_equals_per_task_reference(debug_config_path, two_label_data, arch):
    model, head, batch, tables = _two(debug_config_path, two_label_data, arch)
    _check_reptile(model, head, batch, tables)


def test_two_label_erm_loss_equals_reference_and_weights_matter(debug_config_path, two_label_data):
    model, head, batch, tables = _two(debug_config_path, two_label_data)
    rows, layout = _lookup(model, batch, tables)
    out = erm_loss(head, rows, batch, layout)
    ref = erm_row_losses(head, tables, model.features, batch).mean()
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=1e-12)
    # the second label's weight counts: another weight, another loss
    head.loss_weights.fill_(1.0)
    assert abs(float(erm_loss(head, rows, batch, layout).loss - out.loss)) > 1e-3


def test_two_label_query_outputs_keep_row_order_across_size_buckets(debug_config_path, two_label_data):
    model, head, batch, tables = _two(debug_config_path, two_label_data, n_tasks=9)
    kw = dict(steps=1, lr=0.3, emb_lr=0.5, adapt_dense=["over_arch"], adapt_embeddings=True, first_order=True)
    rows1, layout1 = _lookup(model, batch, tables, 1)
    rows4, layout4 = _lookup(model, batch, tables, 4)
    assert len(layout4.buckets) > 1
    one = adapt_and_query(head, rows1, batch, layout1, **kw)
    four = adapt_and_query(head, rows4, batch, layout4, **kw)
    assert one[0] is not None and one[0].shape == (batch.num_query, 2)
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
