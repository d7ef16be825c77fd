"""Arbitrary config documents and overrides: load or fail with a ConfigError."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gmeta.config import Config, ConfigError, load_config
from tests.conftest import DEBUG_CONFIG
from tests.support.fuzz import SETTINGS, time_limit

# ------------------------------------------------------------------ config files

_KEYS = {
    "meta": ["algorithm", "tasks_per_batch", "inner_steps", "inner_lr", "first_order", "adapt_dense",
             "adapt_embeddings", "embedding_inner_lr", "meta_sgd", "size_buckets"],
    "optim": ["dense_lr", "embedding_optimizer", "embedding_lr", "dense_weight_decay"],
    "train": ["epochs", "max_steps", "log_every", "seed", "nproc_per_node", "output_dir", "resume",
              "checkpoint_every_steps", "checkpoint_every_minutes", "keep_checkpoints", "on_nonfinite_loss"],
    "data": ["format", "tasks_per_shard", "num_workers", "shuffle_buffer", "on_bad_task", "split"],
    "model": ["embedding_dim", "dense_arch", "over_arch"],
    "features": ["task_key", "sparse", "dense", "label"],
    "sharding": ["sharding_type", "tables", "memory_budget_mb"],
    "eval": ["inner_steps", "curve_steps", "support_buckets", "calibration_bins"],
    "tracking": ["uri", "experiment", "system_metrics_s", "log_model"],
}
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=8)


@st.composite
def _config_docs(draw):
    base = yaml.safe_load(DEBUG_CONFIG.read_text())
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(_KEYS) + ["bogus"]))
        key = draw(st.sampled_from(_KEYS.get(section, ["x"]) + ["unknown_key"]))
        if draw(st.booleans()) and isinstance(base.get(section), dict):
            base[section][key] = draw(_values)
        else:
            base[section] = draw(_values)
    return base


@settings(max_examples=300, **SETTINGS)
@given(doc=_config_docs())
def test_config_documents_load_or_fail_with_config_error(tmp_path, doc):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    with time_limit(10):
        try:
            assert isinstance(load_config(path), Config)
        except ConfigError as e:
            assert str(e)


@settings(max_examples=300, **SETTINGS)
@given(text=st.text(max_size=200), override=st.text(max_size=40))
def test_config_text_and_overrides_load_or_fail_with_config_error(tmp_path, text, override):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    with time_limit(10):
        for args in ((path, []), (DEBUG_CONFIG, [override])):
            try:
                load_config(*args)
            except ConfigError as e:
                assert str(e)
