"""Choosing K and the inner rates on the validation tasks: the grid is widened where the best
lies at its edge, bounded by divergence and by ``widen``; the edge is reported when the
widening runs out. The evaluation is a stand-in whose validation GAUC peaks at a known rate
and K, so every choice can be checked."""

from __future__ import annotations

import math

import pytest

from gmeta.config import load_config
from gmeta.evaluation.finetune import EXTRA_STEPS, FINE_TUNE_LRS, RATE_SCALES, STEPS, choose
from gmeta.evaluation.report import OBJECTIVES, NonFiniteScores
from tests.conftest import DEBUG_CONFIG


class Peaked:
    """A validation report whose GAUC peaks at inner_lr ``lr`` and K ``k``; rates above
    ``diverge_above`` raise NonFiniteScores, as a diverging adaptation does."""

    def __init__(self, lr: float, k: int, diverge_above: float = math.inf):
        self.lr, self.k, self.diverge_above = lr, k, diverge_above
        self.calls: list[tuple[float, float, list[int]]] = []

    def __call__(self, model, cfg, shards_dir):
        m = cfg.meta
        assert cfg.eval.split == "val"  # never the test tasks
        self.calls.append((m.inner_lr, m.embedding_inner_lr, list(cfg.eval.curve_steps)))
        if m.inner_lr > self.diverge_above:
            raise NonFiniteScores("diverged")
        ks = list(cfg.eval.curve_steps)
        gauc = [0.7 - 0.01 * abs(math.log(m.inner_lr / self.lr)) - 0.001 * abs(k - self.k) for k in ks]
        return {f"{OBJECTIVES['binary'].main}_vs_k": {"k": [0, *ks], "gauc": [0.5, *gauc]}}


@pytest.fixture(scope="module")
def cfg():
    return load_config(DEBUG_CONFIG)


def test_a_best_inside_the_grid_is_taken_without_widening(cfg):
    ev = Peaked(lr=0.1, k=3)
    c = choose(ev, None, cfg, "unused", fine_tune=True)
    assert (c.inner_lr, c.embedding_inner_lr, c.steps) == (*FINE_TUNE_LRS[3], 3)
    assert c.at_edge == [] and len(ev.calls) == len(FINE_TUNE_LRS)
    assert all(ks == STEPS for _, _, ks in ev.calls)
    assert c.value == pytest.approx(0.7)


def test_a_best_beyond_the_grid_is_reached_by_widening_it(cfg):
    ev = Peaked(lr=3.0, k=20)
    c = choose(ev, None, cfg, "unused", fine_tune=True)
    top_lr, top_emb = FINE_TUNE_LRS[-1]
    spacing = FINE_TUNE_LRS[-1][0] / FINE_TUNE_LRS[-2][0]
    # one pair beyond the top at the grid's spacing (3.33, the nearest to 3), then K out to 20
    assert c.inner_lr == pytest.approx(top_lr * spacing) and c.embedding_inner_lr == pytest.approx(top_emb * spacing)
    assert c.steps == 20 and c.at_edge == []
    assert 32 in c.steps_tried and EXTRA_STEPS[0] == 20  # K past the best was tried, so 20 is not an edge
    assert len(c.rates_tried) == len(FINE_TUNE_LRS) + 2  # 3.33 and 11.1: the second beyond is worse


def test_divergence_bounds_the_grid_and_is_not_an_edge(cfg):
    ev = Peaked(lr=3.0, k=3, diverge_above=1.5)
    c = choose(ev, None, cfg, "unused", fine_tune=True)
    assert c.inner_lr == FINE_TUNE_LRS[-1][0] and c.steps == 3
    assert c.at_edge == []  # the pair above it diverged: the best rate that does not


def test_widening_runs_out_and_says_where(cfg):
    c = choose(Peaked(lr=1e4, k=3), None, cfg, "unused", fine_tune=True, widen=2)
    assert c.at_edge == ["rates"] and len(c.rates_tried) == len(FINE_TUNE_LRS) + 2
    c = choose(Peaked(lr=0.1, k=100), None, cfg, "unused", fine_tune=True, widen=0)
    assert c.at_edge == ["steps"] and c.steps == max(STEPS)
    with pytest.raises(NonFiniteScores, match="every rate"):
        choose(Peaked(lr=0.1, k=3, diverge_above=0.0), None, cfg, "unused", fine_tune=True)


def test_a_meta_trained_model_scales_its_own_rates(cfg):
    ev = Peaked(lr=cfg.meta.inner_lr * 0.5, k=2)
    c = choose(ev, None, cfg, "unused", fine_tune=False)
    assert c.inner_lr == pytest.approx(cfg.meta.inner_lr * 0.5) and c.steps == 2 and c.at_edge == []
    assert c.embedding_inner_lr == pytest.approx(cfg.meta.embedding_inner_lr * 0.5)
    assert len(c.rates_tried) == len(RATE_SCALES)
