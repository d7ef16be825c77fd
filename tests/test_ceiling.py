"""gmeta.evaluation.ceiling: the held-out rows it scores, the Bayesian posterior, and the ceilings for
new ads with and without their attributes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.optimize import minimize

from gmeta.config import load_config
from gmeta.evaluation.ceiling import _posterior, ceilings, held_out, main, predict, warmup_ceilings
from gmeta.io.manifest import load_manifest
from gmeta.io.synth import ID_BASE, draw


def test_held_out_rows_are_those_prepare_writes(debug_data, debug_config_path):
    cfg = load_config(debug_config_path)
    h = draw(cfg)
    ho = held_out(cfg, h, "eval")
    m = load_manifest(debug_data["shards"])
    shards = pq.read_table([debug_data["shards"] / f["path"] for f in m["splits"]["eval"]["files"]]).to_pylist()
    written = {r["task_key"]: r for r in shards}
    assert len(written) == len(ho.tasks) == m["splits"]["eval"]["tasks"]
    for c, s_rows, q_rows in zip(ho.tasks.tolist(), ho.support, ho.query, strict=True):
        rec = written[ID_BASE["campaign_id"] + c]
        for side, rows in (("support", s_rows), ("query", q_rows)):
            assert rec[side]["timestamp"] == h.ts[rows].tolist()
            assert [int(x) for x in rec[side]["label"]] == h.label[rows].tolist()
            assert np.allclose(rec[side]["true_prob"], h.p_true[rows], atol=1e-6)


def test_posterior_is_the_mode_and_curvature_of_the_log_posterior():
    rng = np.random.default_rng(0)
    n, d = 60, 5
    x = rng.normal(size=(n, d))
    offset = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(offset + x @ rng.normal(size=d))))).astype(np.float64)
    mean0, prec0 = rng.normal(size=d) * 0.3, rng.uniform(0.5, 2.0, size=d)

    def neg(theta):
        z = offset + x @ theta
        return -(np.sum(y * z - np.logaddexp(0.0, z)) - 0.5 * np.sum(prec0 * (theta - mean0) ** 2))

    theta, cov = _posterior(x, y, offset, mean0, prec0)
    ref = minimize(neg, np.zeros(d), method="BFGS", options={"gtol": 1e-10})
    assert np.allclose(theta, ref.x, atol=1e-5)
    # the covariance is the inverse Hessian of the negative log-posterior (finite differences)
    eps, hess = 1e-4, np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            e_i, e_j = np.eye(d)[i] * eps, np.eye(d)[j] * eps
            hess[i, j] = (neg(theta + e_i + e_j) - neg(theta + e_i - e_j) - neg(theta - e_i + e_j)
                          + neg(theta - e_i - e_j)) / (4 * eps ** 2)
    assert np.allclose(np.linalg.inv(cov), hess, rtol=1e-3, atol=1e-3)


def test_attributes_raise_the_ceiling_for_new_ads(debug_config_path):
    res = ceilings(load_config(debug_config_path))
    p = res["predictors"]
    for metric in ("auc", "gauc"):
        for suffix in ("", "+support"):
            prior, attrs, true = (p[k + suffix][metric] for k in ("prior", "attributes", "true"))
            assert prior < attrs < true < res["oracle"][metric], (metric, suffix, prior, attrs, true)
        for k in ("prior", "attributes", "true"):
            assert p[k + "+support"][metric] > p[k][metric] + 0.05, (k, metric)
    assert res["campaigns"] > 100 and res["split"] == "eval"


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_attributes_at_the_ends_of_the_share(debug_config_path, share):
    # share 0: the attributes say nothing (the same predictions as the prior); share 1: they
    # are the ad's true latent
    cfg = load_config(debug_config_path, ["synth.num_tasks=300", f"synth.ad_attribute_share={share}"])
    h = draw(cfg)
    ho = held_out(cfg, h)
    same_as = "prior" if share == 0.0 else "true"
    for support in (False, True):
        got = predict(cfg, h, ho, "attributes", support)
        assert np.allclose(got, predict(cfg, h, ho, same_as, support), atol=1e-6), (share, support)
        other = "true" if same_as == "prior" else "prior"
        assert not np.allclose(got, predict(cfg, h, ho, other, support), atol=1e-3)


def test_ceiling_command_prints_the_table(debug_config_path, tmp_path, capsys):
    out = tmp_path / "ceil.json"
    assert main(["--config", str(debug_config_path), "--json", str(out), "synth.num_tasks=300"]) == 0
    printed = capsys.readouterr().out
    for row in ("| nothing (prior mean) |", "| its attributes (posterior mean) |", "| its true latent |",
                "| oracle (true probabilities) |"):
        assert row in printed
    res = json.loads(out.read_text())
    assert set(res["predictors"]) == {"prior", "prior+support", "attributes", "attributes+support", "true",
                                      "true+support"}
    assert f"{res['predictors']['true+support']['auc']:.4f}" in printed


def test_ceiling_val_split_needs_a_val_fraction(debug_config_path):
    cfg = load_config(debug_config_path)
    with pytest.raises(ValueError, match="data.split.val_fraction > 0"):
        held_out(cfg, draw(load_config(debug_config_path, ["synth.num_tasks=50"])), "val")
    cfg = load_config(debug_config_path, ["synth.num_tasks=300", "data.split.val_fraction=0.2"])
    h = draw(cfg)
    val, ev = held_out(cfg, h, "val"), held_out(cfg, h, "eval")
    assert len(val.tasks) > 20 and not set(val.tasks.tolist()) & set(ev.tasks.tolist())


def test_warmup_held_out_ads_are_those_prepare_writes(tmp_path):
    """Under data.split.rule warmup (configs/ads_cold_items.yaml) the held-out tasks are the
    new ads, their support the first 3 K rows (a stage's: its first k) and their query the
    later rows, as gmeta prepare writes them."""
    from gmeta.io.prepare import prepare
    from gmeta.io.synth import generate
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "ads_cold_items.yaml", ["synth.num_tasks=120"])
    generate(cfg, tmp_path / "raw")
    m = prepare(cfg, tmp_path / "raw", tmp_path / "shards")
    h = draw(cfg)
    for split in ("eval", "val"):
        ho = held_out(cfg, h, split)
        shards = pq.read_table([tmp_path / "shards" / f["path"] for f in m["splits"][split]["files"]]).to_pylist()
        written = {r["task_key"]: r for r in shards}
        assert len(written) == len(ho.tasks) == m["splits"][split]["tasks"] > 5
        for ad, s_rows, q_rows in zip(ho.tasks.tolist(), ho.support, ho.query, strict=True):
            rec = written[ID_BASE["ad_id"] + ad]
            assert len(s_rows) == 3 * cfg.data.split.warmup_rows
            assert (h.ad[np.concatenate([s_rows, q_rows])] == ad).all()
            for side, rows in (("support", s_rows), ("query", q_rows)):
                assert rec[side]["timestamp"] == h.ts[rows].tolist()
                assert [int(x) for x in rec[side]["label"]] == h.label[rows].tolist()
    stage_a = held_out(cfg, h, "eval", support_rows=4)
    assert all(len(s) == 4 for s in stage_a.support)
    assert [s[:4].tolist() for s in held_out(cfg, h, "eval").support] == [s.tolist() for s in stage_a.support]


def test_warmup_ceilings_rise_with_knowledge_and_with_warmup_rows(capsys):
    from tests.conftest import ROOT

    config = ROOT / "configs" / "ads_cold_items.yaml"
    cfg = load_config(config)
    res = warmup_ceilings(cfg)
    assert list(res["stages"]) == ["cold", "a", "a+b", "a+b+c"] and res["tasks"] > 100
    for stage, by in res["stages"].items():
        assert by["prior"]["auc"] < by["attributes"]["auc"] < by["true"]["auc"] < res["oracle"]["auc"], stage
    for kn in ("prior", "attributes", "true"):
        aucs = [res["stages"][s][kn]["auc"] for s in res["stages"]]
        assert aucs == sorted(aucs), (kn, aucs)
    # the cold stage is the knowledge alone: ceilings() on the same split, no support row
    alone = ceilings(cfg)["predictors"]
    assert res["stages"]["cold"]["attributes"] == alone["attributes"]
    assert main(["--config", str(config)]) == 0
    assert "| its attributes (posterior mean) | " + f"{res['stages']['cold']['attributes']['auc']:.4f}" \
        in capsys.readouterr().out


def test_the_warmup_config_draws_the_data_its_generating_config_writes():
    """configs/ads_cold_items.yaml's data are written by gmeta synth with ads_cvr_debug.yaml
    (the experiments' synth_config); the ceilings read the warm-up config's synth section."""
    from dataclasses import asdict

    from tests.conftest import ROOT

    assert asdict(load_config(ROOT / "configs" / "ads_cold_items.yaml").synth) == \
        asdict(load_config(ROOT / "configs" / "ads_cvr_debug.yaml").synth)
