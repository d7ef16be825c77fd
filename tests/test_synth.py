"""The synthetic data generator."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from gmeta.config import ConfigError, SparseFeature, load_config
from gmeta.io.manifest import load_manifest
from gmeta.synth import AD_ATTRIBUTES, draw, generate
from tests.support.cli import run_gmeta

ROOT = Path(__file__).resolve().parents[1]


def test_synth_is_deterministic_and_has_power_law_tasks(debug_config_path, tmp_path):
    cfg = load_config(debug_config_path, ["synth.num_tasks=300"])
    a = generate(cfg, tmp_path / "a")
    b = generate(cfg, tmp_path / "b")
    assert pq.read_table(tmp_path / "a").equals(pq.read_table(tmp_path / "b"))
    assert a["task_size_max"] > 3 * a["task_size_median"] and a == {**b, "files": a["files"]}
    t = pq.read_table(tmp_path / "a").to_pandas()
    assert t.p_true.between(0, 1).all() and 0.05 < t.label.mean() < 0.6


def test_a_task_key_naming_a_written_column_keeps_every_column(debug_config_path, tmp_path):
    """With the ads as tasks (task_key ad_id) the log still has its ad ids under ad_id and its
    campaigns under campaign_id (the ad column took the campaign ids before); another name
    gets the campaign ids."""
    generate(load_config(debug_config_path, ["synth.num_tasks=300"]), tmp_path / "c")
    by_campaign = pq.read_table(tmp_path / "c").to_pandas()
    cfg = load_config(debug_config_path, ["synth.num_tasks=300", "features.task_key=ad_id", "data.split.rule=warmup"])
    generate(cfg, tmp_path / "a")
    by_ad = pq.read_table(tmp_path / "a").to_pandas()
    assert list(by_ad.columns) == list(by_campaign.columns)
    assert by_ad.equals(by_campaign)
    generate(load_config(debug_config_path, ["synth.num_tasks=300", "features.task_key=cid"]), tmp_path / "o")
    other = pq.read_table(tmp_path / "o").to_pandas()
    assert (other["cid"] == other["campaign_id"]).all() and other["ad_id"].equals(by_campaign["ad_id"])


def test_ad_attributes_are_constant_per_ad_and_in_range(debug_config_path, tmp_path):
    cfg = load_config(debug_config_path, ["synth.num_tasks=300"])
    generate(cfg, tmp_path)
    t = pq.read_table(tmp_path).to_pandas()
    for name, key in AD_ATTRIBUTES.items():
        assert (t.groupby("ad_id")[name].nunique() == 1).all(), name
        assert t[name].between(0, getattr(cfg.synth, key) - 1).all(), name
        assert t[name].nunique() > 1, name


def _attribute_r2(cfg, h) -> np.ndarray:
    """Share of the variance of each coordinate of (a_ad, ad quality) that a least-squares
    fit on the ads' one-hot attribute values explains (measured, not the generator's own
    decomposition)."""
    x = np.concatenate([np.eye(getattr(cfg.synth, key))[h.ad_attrs[name]] for name, key in AD_ATTRIBUTES.items()],
                       axis=1)
    a = np.concatenate([h.ad_lat, h.ad_quality[:, None]], axis=1)
    coef, *_ = np.linalg.lstsq(x, a, rcond=None)
    centred = a - a.mean(axis=0)
    return 1.0 - ((a - x @ coef) ** 2).sum(axis=0) / (centred ** 2).sum(axis=0)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5, 0.8])
def test_attributes_explain_the_configured_share_of_the_ad_latent(debug_config_path, share):
    # 4,000 campaigns: about 12,000 ads against 88 attribute values, so the fit's own
    # overfitting (about 88 / 12,000 of the rest) stays far below the tolerance
    cfg = load_config(debug_config_path, ["synth.num_tasks=4000", f"synth.ad_attribute_share={share}"])
    h = draw(cfg)
    r2 = _attribute_r2(cfg, h)
    assert np.all(np.abs(r2 - share) < 0.05), r2
    assert abs(r2.mean() - share) < 0.02, r2
    # the generator's posterior mean given the attributes is what the fit finds
    mean = np.concatenate([h.ad_lat_attr, h.ad_quality_attr[:, None]], axis=1)
    a = np.concatenate([h.ad_lat, h.ad_quality[:, None]], axis=1)
    explained = 1.0 - ((a - mean) ** 2).sum(axis=0) / ((a - a.mean(axis=0)) ** 2).sum(axis=0)
    assert np.all(np.abs(explained - r2) < 0.03), (explained, r2)


def test_hidden_draw_is_deterministic_and_the_share_moves_only_the_ads(debug_config_path):
    cfg = load_config(debug_config_path, ["synth.num_tasks=200"])
    a, b = draw(cfg), draw(cfg)
    for name in ("ad_lat", "ad_quality", "user_lat", "t_pref", "p_true", "order"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    c = draw(load_config(debug_config_path, ["synth.num_tasks=200", "synth.ad_attribute_share=0.9"]))
    for name in ("user_lat", "t_bias", "t_pref", "t_slope", "user", "ad", "dense", "ts", "order"):
        assert np.array_equal(getattr(a, name), getattr(c, name)), name
    assert not np.allclose(a.ad_lat, c.ad_lat)
    for name in AD_ATTRIBUTES:
        assert np.array_equal(a.ad_attrs[name], c.ad_attrs[name])


def test_synth_refuses_features_it_does_not_write(debug_config_path, tmp_path):
    cfg = load_config(debug_config_path)
    cfg.features.sparse.append(SparseFeature(name="ad_colour", num_embeddings=16))
    with pytest.raises(ValueError, match=r"features.sparse lists \['ad_colour'\], which gmeta synth does not write"):
        generate(cfg, tmp_path)
    assert not list(tmp_path.glob("*.parquet"))


def test_attribute_share_is_checked(debug_config_path):
    with pytest.raises(ConfigError, match=r"synth.ad_attribute_share: must be in \[0, 1\]"):
        load_config(debug_config_path, ["synth.ad_attribute_share=1.5"])


def _cli(cwd, *args) -> subprocess.CompletedProcess:
    return run_gmeta(args, cwd=cwd)  # relative paths from the working directory, as a shell would run it


def test_synth_and_prepare_commands_with_and_without_the_attribute_features(debug_config_path, tmp_path):
    small = ["synth.num_tasks=200", "synth.num_users=400"]
    p = _cli(tmp_path, "synth", "--config", str(debug_config_path), "--out", "raw", *small)
    assert p.returncode == 0, p.stderr
    p = _cli(tmp_path, "prepare", "--config", str(debug_config_path), "--input", "raw", "--out", "shards", *small)
    assert p.returncode == 0, p.stderr
    m = load_manifest(tmp_path / "shards")
    names = [s["name"] for s in m["schema"]["sparse"]]
    assert set(AD_ATTRIBUTES) <= set(names) and set(AD_ATTRIBUTES) <= set(m["input_columns"])
    raw = pq.read_table(tmp_path / "raw").to_pandas()
    rec = pq.read_table(tmp_path / "shards" / m["splits"]["train"]["files"][0]["path"]).slice(0, 1).to_pylist()[0]
    for name, key in AD_ATTRIBUTES.items():
        table_rows = rec["support"][name] + rec["query"][name]
        assert all(0 <= r < cfg_rows(debug_config_path, name) for r in table_rows), name
        assert m["cardinality"][name]["distinct_raw"] == raw[name].nunique() <= getattr(
            load_config(debug_config_path).synth, key)

    # a config that does not list them: synth writes the columns all the same, prepare
    # reads only the features the config lists
    text = debug_config_path.read_text()
    kept = [line for line in text.splitlines() if not any(f"name: {n}," in line for n in AD_ATTRIBUTES)]
    assert len(kept) == len(text.splitlines()) - 3
    plain = tmp_path / "plain.yaml"
    plain.write_text("\n".join(kept) + "\n")
    assert _cli(tmp_path, "synth", "--config", str(plain), "--out", "raw2", *small).returncode == 0
    assert set(AD_ATTRIBUTES) <= set(pq.read_schema(next((tmp_path / "raw2").glob("*.parquet"))).names)
    p = _cli(tmp_path, "prepare", "--config", str(plain), "--input", "raw2", "--out", "shards2", *small)
    assert p.returncode == 0, p.stderr
    m2 = load_manifest(tmp_path / "shards2")
    assert not set(AD_ATTRIBUTES) & {s["name"] for s in m2["schema"]["sparse"]}
    assert not set(AD_ATTRIBUTES) & set(m2["input_columns"])
    assert m2["splits"]["train"]["tasks"] == m["splits"]["train"]["tasks"]


def cfg_rows(config_path, name: str) -> int:
    return next(s.num_embeddings for s in load_config(config_path).features.sparse if s.name == name)


def test_synth_command_names_a_feature_it_does_not_write(debug_config_path, tmp_path):
    p = _cli(tmp_path, "synth", "--config", str(debug_config_path), "--out", "raw",
             "features.sparse=[{name: user_id}, {name: ad_id}, {name: advertiser_id}, {name: hour}, "
             "{name: device}, {name: site_id}, {name: interests, multi_hot: true}, {name: ad_colour}]")
    assert p.returncode == 2 and "features.sparse lists ['ad_colour']" in p.stderr, p.stderr


def test_histories_show_the_users_taste_and_leave_every_other_column_as_it_was(debug_config_path, tmp_path):
    """synth.history: per row 0..history_length ad ids of the log's own ads, leaning to the
    ads whose latent matches the user's (the mean <u_user, a_ad> of a history's ads well above
    the impressions'); the click depends on the match of the candidate ad with the history
    (what DIN's attention reads); the other columns are those written without it."""
    from sklearn.metrics import roc_auc_score

    from gmeta.synth import ID_BASE, histories
    from tests.support.sequences import seq_overrides

    extra = "{name: clicked_ads, num_embeddings: 2000, multi_hot: true, max_length: 6, table: ad_id}"
    over = ["synth.num_tasks=300", *seq_overrides(debug_config_path, extra)]
    cfg = load_config(debug_config_path, [*over, "synth.history=clicked_ads", "synth.history_length=6"])
    summary = generate(cfg, tmp_path / "h")
    generate(load_config(debug_config_path, ["synth.num_tasks=300"]), tmp_path / "plain")
    with_h, plain = pq.read_table(tmp_path / "h"), pq.read_table(tmp_path / "plain")
    assert with_h.drop_columns(["clicked_ads"]).equals(plain)
    lengths = np.array([len(x) for x in with_h.column("clicked_ads").to_pylist()])
    assert lengths.min() == 0 and lengths.max() == 6
    ads = set(with_h.column("ad_id").to_numpy().tolist())
    assert {x for xs in with_h.column("clicked_ads").to_pylist() for x in xs} <= ads | {
        ID_BASE["ad_id"] + a for a in range(len(draw(cfg).ad_lat))}
    assert summary["history_affinity"] > summary["impression_affinity"] + 0.3
    h = draw(cfg)
    n, hist = histories(cfg, h)
    total = np.zeros((len(n), h.ad_lat.shape[1]))
    np.add.at(total, np.repeat(np.arange(len(n)), n), h.ad_lat[hist])
    has = n > 0
    match = np.einsum("rk,rk->r", h.ad_lat[h.ad][has], total[has] / n[has, None])
    # more than half of what the true <u_user, a_ad> tells of the click (AUC 0.57 here)
    truth = roc_auc_score(h.label, np.einsum("rk,rk->r", h.user_lat[h.user], h.ad_lat[h.ad]))
    assert roc_auc_score(h.label[has], match) - 0.5 > 0.5 * (truth - 0.5) > 0.03
    with pytest.raises(ValueError, match="synth.history"):
        generate(load_config(debug_config_path, ["synth.num_tasks=300", "synth.history=ad_id"]), tmp_path / "x")
    with pytest.raises(ConfigError, match="synth.history_length"):
        load_config(debug_config_path, ["synth.history=h", "synth.history_length=0"])
