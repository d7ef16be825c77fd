"""features.sparse[].head false: a feature only the id generator reads. The head drops its
cells (its output is the head of the other features, whatever that feature's rows), the
config says where such a feature is wrong, and under generator.mode base_fixed its table
is the only one that learns with the generator."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from gmeta.config import ConfigError, load_config
from gmeta.models.dlrm import MetaDLRM
from gmeta.models.heads import build_head
from tests.conftest import DEBUG_CONFIG

FEATURES = [{"name": "a"}, {"name": "b", "head": False}, {"name": "c"}, {"name": "d", "head": False}]


@pytest.mark.parametrize("arch", ["dlrm", "dcn_v2", "deepfm", "wide_deep", "mmoe"])
def test_the_head_reads_the_features_it_keeps_only(arch):
    cfg = load_config(DEBUG_CONFIG, [f"model.arch={arch}", "model.expert_arch=[8]"])
    torch.manual_seed(0)
    head = build_head(cfg.model, 3, 4, features=FEATURES)
    kept = build_head(cfg.model, 3, 2, features=[FEATURES[0], FEATURES[2]])
    kept.load_state_dict(head.state_dict())  # the same layers: sized by the two features it reads
    dense, pooled = torch.randn(5, 3), torch.randn(5, 4, cfg.model.embedding_dim)
    out = head(dense, pooled)
    other = pooled.clone()
    other[:, [1, 3]] = torch.randn(5, 2, cfg.model.embedding_dim)  # what only the generator reads
    torch.testing.assert_close(head(dense, other), out, rtol=0, atol=0)
    torch.testing.assert_close(kept(dense, pooled[:, [0, 2]]), out, rtol=0, atol=0)


def test_under_base_fixed_only_the_generators_own_tables_learn():
    rows = torch.randn(6, 4, requires_grad=True)
    layout = SimpleNamespace(unique_per_key=[2, 3, 1])  # distinct ids of features 0, 1, 2
    fixed = MetaDLRM.fixed_rows(SimpleNamespace(generator_tables=[1]), rows, layout)
    fixed.square().sum().backward()
    assert rows.grad is not None
    learned = rows.grad.abs().sum(1) > 0
    assert learned.tolist() == [False, False, True, True, True, False]
    none = MetaDLRM.fixed_rows(SimpleNamespace(generator_tables=[]), rows, layout)
    assert not none.requires_grad


ATTRS = ["generator.feature=ad_id", "generator.attributes=[advertiser_id]", "features.sparse.ad_id.holdout_share=0.1"]


@pytest.mark.parametrize("extra, key, says", [
    (["features.sparse.device.head=false", *ATTRS], "features.sparse[4].head", "list it in generator.attributes"),
    (["features.sparse.advertiser_id.head=false", "meta.adapt_features=[advertiser_id]", *ATTRS],
     "features.sparse[2].head", "meta.adapt_features"),
])
def test_a_feature_no_head_reads_is_refused_where_it_is_wrong(extra, key, says):
    with pytest.raises(ConfigError, match=re.escape(f"{key}: false: ") + ".*" + re.escape(says)):
        load_config(DEBUG_CONFIG, extra)


def test_a_base_model_keeps_the_table_a_generator_reads_later():
    cfg = load_config(DEBUG_CONFIG, ["features.sparse.device.head=false"])  # no generator yet: fine
    assert [s.head for s in cfg.features.sparse].count(False) == 1
