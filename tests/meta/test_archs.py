"""Every head of ``model.arch`` under the vectorized meta step, against the per-task
float64 reference (tests.support.reference): first and second order, each adaptation form,
Meta-SGD, Reptile; and the config's naming of each head's parts."""

from __future__ import annotations

import pytest
import torch

from gmeta.config import ConfigError, load_config
from gmeta.models.heads import HEADS, adapted_layers, adapted_shapes, head_parts
from tests.meta.test_maml import _check_against_reference, _check_meta_sgd, _check_reptile, _setup

# one config per head (DCN-v2 in both structures, full rank and low rank)
ARCHS = {
    "dlrm": ["model.arch=dlrm"],
    "dcn_v2": ["model.arch=dcn_v2", "model.cross_layers=2"],
    "dcn_v2_parallel_low_rank": ["model.arch=dcn_v2", "model.cross_layers=2", "model.cross_rank=3",
                                 "model.cross_structure=parallel"],
    "deepfm": ["model.arch=deepfm"],
    "wide_deep": ["model.arch=wide_deep"],
}
NEW = [a for a in ARCHS if a != "dlrm"]  # the DLRM's own tests are tests/meta/test_maml.py's


def test_every_arch_of_the_config_has_a_head_and_is_tested_here():
    from typing import get_args, get_type_hints

    from gmeta.config import ModelConfig
    from tests.meta.test_din import DIN  # the head of sequence features, tested there
    from tests.meta.test_multitask import MULTITASK  # the heads of several labels, tested there

    arches = set(get_args(get_type_hints(ModelConfig)["arch"]))
    assert arches == set(HEADS)
    assert arches == {o[0].split("=")[1] for o in [*ARCHS.values(), *MULTITASK.values(), DIN]}


@pytest.mark.parametrize("arch", NEW)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("fast_weights", ["implicit", "materialized"])
def test_every_layer_adapted_equals_per_task_reference(debug_config_path, debug_data, arch, first_order,
                                                       fast_weights):
    model, head, batch, tables = _setup(debug_config_path, debug_data, extra=ARCHS[arch])
    assert type(head).arch == ARCHS[arch][0].split("=")[1]
    _check_against_reference(model, head, batch, tables, 2, fast_weights, steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=["all"], adapt_embeddings=True, first_order=first_order)


@pytest.mark.parametrize("arch", NEW)
@pytest.mark.parametrize("dense_adaptation", ["bias", "film"])
def test_bias_and_film_adaptation_of_every_part_equal_per_task_reference(debug_config_path, debug_data, arch,
                                                                       dense_adaptation):
    model, head, batch, tables = _setup(debug_config_path, debug_data, extra=ARCHS[arch])
    parts = head_parts(head)
    _check_against_reference(model, head, batch, tables, 1, "auto", steps=2, lr=0.3, emb_lr=0.7,
                             adapt_dense=parts, adapt_embeddings=True, first_order=False,
                             dense_adaptation=dense_adaptation)


@pytest.mark.parametrize("arch", NEW)
def test_anil_and_one_part_equal_per_task_reference(debug_config_path, debug_data, arch):
    """'last' (each head's own output layer) and each head's own part alone (the cross layers,
    the first-order or wide layer)."""
    model, head, batch, tables = _setup(debug_config_path, debug_data, extra=ARCHS[arch])
    own = [p for p in head_parts(head) if p not in ("dense_arch", "over_arch")]
    assert own  # every new head has a part of its own
    for adapt in (["last"], own[:1]):
        _check_against_reference(model, head, batch, tables, 2, "auto", steps=2, lr=0.3, emb_lr=0.7,
                                 adapt_dense=adapt, adapt_embeddings=False, first_order=False)


@pytest.mark.parametrize("arch", NEW)
def test_meta_sgd_equals_per_task_reference(debug_config_path, debug_data, arch):
    model, head, batch, tables = _setup(debug_config_path, debug_data, extra=ARCHS[arch])
    assert set(adapted_shapes(head, ["all"], "weights")) == {n for n, _ in head.named_parameters()}
    _check_meta_sgd(model, head, batch, tables, ["all"])


@pytest.mark.parametrize("arch", NEW)
def test_reptile_gradient_equals_per_task_reference(debug_config_path, debug_data, arch):
    model, head, batch, tables = _setup(debug_config_path, debug_data, extra=ARCHS[arch])
    _check_reptile(model, head, batch, tables)


@pytest.mark.parametrize("arch", NEW)
def test_head_runs_per_task_weights_as_each_task_alone(debug_config_path, arch):
    """Per-task weights [N, ...] of every layer: task t's outputs are those of the head
    holding task t's weights (swapped in by functional_call)."""
    cfg = load_config(debug_config_path, ["model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]",
                                          *ARCHS[arch]])
    from gmeta.models.heads import build_head

    torch.manual_seed(0)
    head = build_head(cfg.model, len(cfg.features.dense), len(cfg.features.sparse))
    dense = torch.randn(2, 7, len(cfg.features.dense))
    pooled = torch.randn(2, 7, len(cfg.features.sparse), 4)
    per_task = {n: p.unsqueeze(0) + 0.1 * torch.randn(2, *p.shape) for n, p in head.named_parameters()}
    batched = head(dense, pooled, per_task)
    assert batched.shape == (2, 7)
    for t in range(2):
        own = torch.func.functional_call(head, {n: w[t] for n, w in per_task.items()}, (dense[t], pooled[t]))
        torch.testing.assert_close(batched[t], own)
    assert not torch.allclose(batched, head(dense, pooled))


def test_dcn_v2_cross_layer_is_x0_times_the_linear_map_plus_x():
    from gmeta.models.heads import CrossLayer

    torch.manual_seed(0)
    for rank in (0, 2):
        layer = CrossLayer(5, rank)
        x0, x = torch.randn(3, 5), torch.randn(3, 5)
        lin = (layer.u(layer.v(x)) if rank else layer.w(x))
        torch.testing.assert_close(layer(x0, x), x0 * lin + x)
    layer = CrossLayer(5, 2)
    assert layer.v.weight.shape == (2, 5) and layer.u.weight.shape == (5, 2)


def test_deepfm_second_order_term_is_the_sum_of_pairwise_dots():
    from gmeta.models.heads import DeepFMHead

    torch.manual_seed(0)
    head = DeepFMHead(num_dense=2, num_sparse=3, embedding_dim=4, dense_sizes=[5], over_sizes=[6])
    dense, pooled = torch.randn(7, 2), torch.randn(7, 3, 4)
    v = torch.cat([head.dense_arch(dense).unsqueeze(1), pooled], dim=1)
    pairs = sum((v[:, i] * v[:, j]).sum(-1) for i in range(4) for j in range(i + 1, 4))
    x0 = v.flatten(1)
    expected = head.linear(x0).squeeze(-1) + pairs + head.over_arch(x0)
    torch.testing.assert_close(head(dense, pooled), expected)


@pytest.mark.parametrize("arch, parts", [
    ("dlrm", ["dense_arch", "over_arch"]),
    ("dcn_v2", ["dense_arch", "cross", "over_arch"]),
    ("dcn_v2_parallel_low_rank", ["dense_arch", "cross", "deep", "output"]),
    ("deepfm", ["dense_arch", "linear", "over_arch"]),
    ("wide_deep", ["wide", "dense_arch", "over_arch"]),
])
def test_config_names_each_heads_parts_and_refuses_another_heads(debug_config_path, arch, parts):
    cfg = load_config(debug_config_path, [*ARCHS[arch], f"meta.adapt_dense=[{', '.join(parts)}]"])
    from gmeta.models.dlrm import build_model

    head = build_model(cfg).head
    assert head_parts(head) == parts
    assert set(adapted_layers(head, ["all"])) == set(adapted_layers(head, parts))
    last = adapted_layers(head, ["last"])
    assert list(last) == [head.last_layer] and last[head.last_layer].out_features == 1
    foreign = "cross" if arch in ("dlrm", "deepfm", "wide_deep") else "linear"
    with pytest.raises(ConfigError, match=rf"meta.adapt_dense\[0\].*{arch.split('_parallel')[0]} head's parts"):
        load_config(debug_config_path, [*ARCHS[arch], f"meta.adapt_dense=[{foreign}]"])


def test_dcn_v2_config_refuses_what_it_cannot_build(debug_config_path):
    with pytest.raises(ConfigError, match="model.cross_layers"):
        load_config(debug_config_path, ["model.arch=dcn_v2", "model.cross_layers=0"])
    with pytest.raises(ConfigError, match="model.cross_rank"):
        load_config(debug_config_path, ["model.arch=dcn_v2", "model.cross_rank=-1"])
    with pytest.raises(ConfigError, match="model.over_arch.*parallel"):
        load_config(debug_config_path, ["model.arch=dcn_v2", "model.cross_structure=parallel", "model.over_arch=[]"])
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(debug_config_path, ["model.arch=dcn"])
