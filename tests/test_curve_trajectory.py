"""Scoring several K in one pass (``predict_queries``) walks one inner-loop trajectory and
scores the query rows on its way: every K's predictions equal those of scoring that K alone."""

from __future__ import annotations

import numpy as np

from gmeta.checkpoint import load_unsharded
from gmeta.io.reader import TaskReader
from gmeta.scoring import predict_queries


def test_every_k_of_one_trajectory_equals_that_k_alone(debug_data, debug_checkpoint):
    model, cfg, _ = load_unsharded(debug_checkpoint)
    cfg.meta.adapt_embeddings = True  # rows and dense layers both adapt
    batch = next(iter(TaskReader(debug_data["shards"], "eval", 8, seed=0)))
    assert batch.num_support > 0
    ks = [0, 1, 2, 5]
    together = predict_queries(model, cfg, batch, ks)
    assert sorted(together) == ks
    for k in ks:
        alone = predict_queries(model, cfg, batch, [k])[k]
        np.testing.assert_array_equal(together[k], alone)
    # the steps do move the predictions: the curve is not one point repeated
    assert not np.array_equal(together[0], together[5]) and not np.array_equal(together[1], together[2])
