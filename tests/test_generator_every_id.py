"""generator.train_ids all: a base_fixed generator learns from every id of its feature in the
training rows (each started from the default row, as Meta-Embedding trains on old items),
while evaluation still generates rows for new ids only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gmeta.checkpoint import load_unsharded
from gmeta.config import ConfigError, load_config
from gmeta.layout import layout_of
from gmeta.training import run as train
from tests.conftest import DEBUG_CONFIG
from tests.test_generator_train import GENERATOR, NEW_ADS


def _cfg(debug_data, out: Path, *extra: str):
    return load_config(DEBUG_CONFIG, [f"data.shards_dir={debug_data['shards']}", f"train.output_dir={out}", *NEW_ADS,
                                      "train.eval_at_end=false", "tracking.enabled=false", *extra])


@pytest.fixture(scope="module")
def runs(debug_data, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(base checkpoint, generator checkpoint, the generator run's result)."""
    tmp = tmp_path_factory.mktemp("every_id")
    train.main(_cfg(debug_data, tmp / "base", "train.max_steps=6"))
    base = tmp / "base" / "checkpoint"
    result = train.main(_cfg(debug_data, tmp / "gen", *GENERATOR, "generator.mode=base_fixed",
                             "generator.train_ids=all", f"train.init_from={base}", "train.max_steps=4",
                             "train.log_every=2"))
    return base, tmp / "gen" / "checkpoint", result


def test_every_training_row_trains_the_generator_and_the_base_stays(runs):
    base_ckpt, gen_ckpt, result = runs
    # each training row holds one ad: with every ad taken for new, every row's ad is generated
    # (under train_ids new only the held-out and rare ads are: a share below 1)
    assert result["train/generator_new_share"] == pytest.approx(1.0)
    base, _, _ = load_unsharded(base_ckpt)
    trained, cfg, _ = load_unsharded(gen_ckpt)
    assert cfg.generator.train_ids == "all"
    mine = trained.state_dict()
    for name, value in base.state_dict().items():  # tables, head and the new-id masks
        assert torch.equal(mine[name], value), name
    assert trained.generator is not None and float(trained.generator.mlp[-1].weight.abs().sum()) > 0


def test_known_ids_keep_their_rows_outside_training(runs, debug_data):
    """After training, a known ad is looked up as its own row, a new ad as default row +
    the generator; in training every ad started from the default row + the generator."""
    from gmeta.io.reader import TaskReader

    _, gen_ckpt, _ = runs
    model, cfg, _ = load_unsharded(gen_ckpt)
    assert model.generator is not None
    batch = next(iter(TaskReader(debug_data["shards"], "train", 8, seed=0)))
    layout = layout_of(batch, model.pooling, cfg.meta.size_buckets)
    rows = model.lookup(layout)
    f = model.generator.feature
    lo = sum(layout.unique_per_key[:f])
    hi = lo + layout.unique_per_key[f]
    ids = layout.unique_ids[lo:hi]
    known = model.default_rows.known_ad_id[ids]
    assert known.any() and (~known).any()
    default = model.default_row(f)
    out, new = model.start_rows(rows, layout)
    assert new is not None and torch.equal(new[lo:hi], ~known)
    assert torch.equal(out[lo:hi][known], rows[lo:hi][known])  # known ads: their own rows
    model.generator_base = default
    every, new_all = model.start_rows(rows, layout, every_id=True)
    assert new_all is not None and bool(new_all[lo:hi].all())
    # a new ad starts from the same generated row either way; a known ad, in training, from
    # the default row plus its generated offset
    torch.testing.assert_close(every[lo:hi][~known], out[lo:hi][~known])
    assert not torch.allclose(every[lo:hi][known], rows[lo:hi][known])
    torch.testing.assert_close(rows[lo:hi][~known], default.expand(int((~known).sum()), -1))


def test_train_ids_all_needs_base_fixed(debug_data, tmp_path):
    with pytest.raises(ConfigError, match="generator.train_ids"):
        _cfg(debug_data, tmp_path, *GENERATOR, "generator.train_ids=all")
