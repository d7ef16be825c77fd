"""The multi-task heads, mmoe and esmm: what each computes, and their meta step against the
per-task float64 reference (first and second order, weights, bias and FiLM adaptation,
ANIL over every tower, Meta-SGD, Reptile) on data with two labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gmeta.config import ConfigError, load_config
from gmeta.models.heads import ESMMHead, MMoEHead, adapted_layers, build_head, head_parts
from tests.conftest import DEBUG_CONFIG, TWO_LABELS
from tests.meta.test_maml import _check_against_reference, _check_meta_sgd, _check_reptile, _setup

MULTITASK = {
    "mmoe": ["model.arch=mmoe", "model.experts=3", "model.expert_arch=[7, 6]"],
    "esmm": ["model.arch=esmm"],
}
WEIGHTS = [*TWO_LABELS, "features.label_weights=[1.0, 0.6]"]


def _two(debug_config_path, two_label_data, arch):
    return _setup(debug_config_path, two_label_data, extra=[*MULTITASK[arch], *WEIGHTS])


def test_esmm_outputs_the_ctr_logit_and_the_logit_of_pctcvr():
    torch.manual_seed(0)
    head = ESMMHead(num_dense=3, num_sparse=2, embedding_dim=4, dense_sizes=[5], over_sizes=[6]).double()
    dense, pooled = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 2, 4, dtype=torch.float64)
    out = head(dense, pooled)
    x0 = torch.cat([head.dense_arch(dense).unsqueeze(1), pooled], dim=1).flatten(1)
    a, b = head.ctr(x0), head.cvr(x0)
    torch.testing.assert_close(out[:, 0], a)
    torch.testing.assert_close(torch.sigmoid(out[:, 1]), torch.sigmoid(a) * torch.sigmoid(b))
    torch.testing.assert_close(head.pcvr(out), torch.sigmoid(b))
    # the conversion label's loss is the cross-entropy of pCTCVR, over every row
    y = torch.tensor([[1, 1], [1, 0], [0, 0]] * 3, dtype=torch.float64)
    p = torch.sigmoid(a) * torch.sigmoid(b)
    want = (F.binary_cross_entropy(torch.sigmoid(a), y[:, 0], reduction="none")
            + F.binary_cross_entropy(p, y[:, 1], reduction="none"))
    torch.testing.assert_close(head.pointwise_loss(out, y), want)


def test_esmm_log_pctcvr_is_finite_and_exact_at_extreme_logits():
    torch.manual_seed(0)
    head = ESMMHead(num_dense=1, num_sparse=1, embedding_dim=2, dense_sizes=[], over_sizes=[])
    with torch.no_grad():  # the towers are one linear layer each: set the logits by their biases
        head.ctr.mlp.layers[0].weight.zero_()
        head.cvr.mlp.layers[0].weight.zero_()
    dense, pooled = torch.zeros(1, 1), torch.zeros(1, 1, 2)
    for a, b in [(90.0, 90.0), (-90.0, 3.0), (3.0, -90.0), (-90.0, -90.0), (0.0, 40.0), (30.0, 0.5)]:
        head.ctr.mlp.layers[0].bias.data.fill_(a)
        head.cvr.mlp.layers[0].bias.data.fill_(b)
        out = head(dense, pooled)[0]
        want = F.logsigmoid(torch.tensor(a, dtype=torch.float64)) + F.logsigmoid(torch.tensor(b, dtype=torch.float64))
        assert torch.isfinite(out).all(), (a, b, out)
        torch.testing.assert_close(F.logsigmoid(out[1]).double(), want, rtol=1e-5, atol=1e-6)
        loss = head.pointwise_loss(out, torch.tensor([1.0, 0.0]))
        assert torch.isfinite(loss), (a, b)


def test_mmoe_mixes_shared_experts_by_each_labels_softmax_gate():
    torch.manual_seed(0)
    head = MMoEHead(num_dense=3, num_sparse=2, embedding_dim=4, dense_sizes=[5], over_sizes=[6], experts=3,
                    expert_sizes=[7], label_weights=[1.0, 1.0])
    dense, pooled = torch.randn(9, 3), torch.randn(9, 2, 4)
    x0 = torch.cat([head.dense_arch(dense).unsqueeze(1), pooled], dim=1).flatten(1)
    experts = [e(x0) for e in head.experts]
    for i in range(2):
        g = torch.softmax(head.gates[i](x0), dim=-1)
        mixed = sum(g[:, j: j + 1] * experts[j] for j in range(3))
        torch.testing.assert_close(head(dense, pooled)[:, i], head.towers[i](mixed))
    assert head_parts(head) == ["dense_arch", "experts", "gates", "towers"]
    assert list(adapted_layers(head, ["last"])) == ["towers.0.mlp.layers.1", "towers.1.mlp.layers.1"]
    head.init_output_bias([0.25, 0.75])
    assert [float(head.towers[i].mlp.layers[1].bias) for i in range(2)] == [0.25, 0.75]


def test_multitask_heads_are_built_from_the_config_and_refuse_what_they_cannot_train():
    cfg = load_config(DEBUG_CONFIG, [*MULTITASK["mmoe"], *WEIGHTS])
    head = build_head(cfg.model, 3, len(cfg.features.sparse), cfg.features.loss_weights())
    assert isinstance(head, MMoEHead) and len(head.experts) == 3 and len(head.gates) == len(head.towers) == 2
    assert head.experts[0].out_features == 6
    load_config(DEBUG_CONFIG, [*MULTITASK["mmoe"], "meta.adapt_dense=[experts, gates]"])  # one label: one tower
    load_config(DEBUG_CONFIG, [*MULTITASK["esmm"], *TWO_LABELS, "meta.adapt_dense=[ctr, cvr]"])
    with pytest.raises(ConfigError, match=r"features.labels: model.arch esmm trains two labels"):
        load_config(DEBUG_CONFIG, MULTITASK["esmm"])
    with pytest.raises(ConfigError, match="model.objective: model.arch esmm's labels are binary"):
        load_config(DEBUG_CONFIG, [*MULTITASK["esmm"], *TWO_LABELS, "model.objective=regression"])
    with pytest.raises(ConfigError, match="model.experts: must be >= 1"):
        load_config(DEBUG_CONFIG, [*MULTITASK["mmoe"], "model.experts=0"])
    with pytest.raises(ConfigError, match="model.expert_arch: at least one layer"):
        load_config(DEBUG_CONFIG, [*MULTITASK["mmoe"], "model.expert_arch=[]"])
    with pytest.raises(ConfigError, match=r"meta.adapt_dense\[0\].*esmm head's parts"):
        load_config(DEBUG_CONFIG, [*MULTITASK["esmm"], *TWO_LABELS, "meta.adapt_dense=[gates]"])


@pytest.mark.parametrize("arch", list(MULTITASK))
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("fast_weights", ["implicit", "materialized"])
def test_multitask_meta_step_equals_per_task_reference(debug_config_path, two_label_data, arch, first_order,
                                                       fast_weights):
    model, head, batch, tables = _two(debug_config_path, two_label_data, arch)
    assert type(head).arch == arch and batch.labels.shape[1] == 2
    _check_against_reference(model, head, batch, tables, 2, fast_weights, steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=["all"], adapt_embeddings=True, first_order=first_order)


@pytest.mark.parametrize("arch", list(MULTITASK))
@pytest.mark.parametrize("dense_adaptation", ["bias", "film"])
def test_multitask_bias_and_film_adaptation_equal_per_task_reference(debug_config_path, two_label_data, arch,
                                                                     dense_adaptation):
    model, head, batch, tables = _two(debug_config_path, two_label_data, arch)
    _check_against_reference(model, head, batch, tables, 1, "auto", steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=head_parts(head), adapt_embeddings=True, first_order=False,
                             dense_adaptation=dense_adaptation)


@pytest.mark.parametrize("arch", list(MULTITASK))
def test_multitask_anil_and_own_parts_equal_per_task_reference(debug_config_path, two_label_data, arch):
    model, head, batch, tables = _two(debug_config_path, two_label_data, arch)
    own = [p for p in head_parts(head) if p != "dense_arch"]
    for adapt in (["last"], own[:1], own[1:2]):
        _check_against_reference(model, head, batch, tables, 2, "auto", steps=2, lr=0.3, emb_lr=0.7,
                                 adapt_dense=adapt, adapt_embeddings=False, first_order=False)


@pytest.mark.parametrize("arch", list(MULTITASK))
def test_multitask_meta_sgd_equals_per_task_reference(debug_config_path, two_label_data, arch):
    model, head, batch, tables = _two(debug_config_path, two_label_data, arch)
    _check_meta_sgd(model, head, batch, tables, ["all"])


@pytest.mark.parametrize("arch", list(MULTITASK))
def test_multitask_reptile_gradient_equals_per_task_reference(debug_config_path, two_label_data, arch):
    model, head, batch, tables = _two(debug_config_path, two_label_data, arch)
    _check_reptile(model, head, batch, tables)
