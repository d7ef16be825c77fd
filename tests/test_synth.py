"""The synthetic data generator."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from gmeta.config import ConfigError, SparseFeature, load_config
from gmeta.io.manifest import load_manifest
from gmeta.io.synth import AD_ATTRIBUTES, draw, generate
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
    with pytest.raises(ConfigError, match=r"synth.ad_quality_scale: must be > 0"):
        load_config(debug_config_path, ["synth.ad_quality_scale=0"])


def test_quality_scale_scales_the_ad_quality_alone(debug_config_path):
    base = load_config(debug_config_path, ["synth.num_tasks=2000"])
    a = draw(base)
    b = draw(load_config(debug_config_path, ["synth.num_tasks=2000", "synth.ad_quality_scale=1.2"]))
    assert a.ad_quality_scale == 0.3 and b.ad_quality_scale == 1.2
    # the same draw, the quality and its attribute part four times as large
    np.testing.assert_allclose(b.ad_quality, 4.0 * a.ad_quality)
    np.testing.assert_allclose(b.ad_quality_attr, 4.0 * a.ad_quality_attr)
    assert abs(b.ad_quality.std() - 1.2) < 0.06, b.ad_quality.std()
    for name in ("ad_lat", "ad_lat_attr", "user_lat", "t_bias", "t_pref", "user", "ad", "order"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    # the shared logit moves by exactly the change of the ad's quality
    np.testing.assert_allclose(b.shared - a.shared, 3.0 * a.ad_quality[a.ad], atol=1e-12)


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

    from gmeta.io.synth import ID_BASE, histories
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


# ---------------------------------------------------------------------------------------
# daily partitions (synth.days)
# ---------------------------------------------------------------------------------------

SMALL = ["synth.num_tasks=200", "synth.num_users=400"]
DAYS = [*SMALL, "synth.days=6", "synth.campaign_days=2.5", "synth.user_days=2.5"]


def _digest(out: Path, leave_out: tuple[str, ...] = ()) -> str:
    """SHA-256 of the data set written to ``out``: every column's name, type and values as
    read back (list columns as their lengths and values, text as text), then _synth.json's
    content less the keys ``leave_out``; not the files' bytes, which hold the pyarrow version."""
    import hashlib
    import json

    import pyarrow as pa

    h = hashlib.sha256()
    t = pq.read_table(out)
    for name in t.column_names:
        col = t.column(name).combine_chunks()
        h.update(f"{name}:{col.type};".encode())
        if pa.types.is_list(col.type):
            h.update(pc.list_value_length(col).to_numpy(zero_copy_only=False).tobytes())
            col = pc.list_flatten(col)
        if pa.types.is_dictionary(col.type):  # a Hive partition column (dt)
            col = col.dictionary_decode()
        if pa.types.is_string(col.type):
            h.update("\n".join(col.to_pylist()).encode())
        else:
            h.update(col.to_numpy(zero_copy_only=False).tobytes())
    summary = json.loads((out / "_synth.json").read_text())
    h.update(json.dumps({k: v for k, v in summary.items() if k not in leave_out}, sort_keys=True).encode())
    return h.hexdigest()


def test_days_zero_writes_the_data_set_as_before(debug_config_path, tmp_path):
    """Pins the output of synth.days: 0 (the default): this digest was computed with the
    generator before daily partitions existed (debug config, 200 campaigns, 400 users,
    conversions and histories, three part files), so the days' own streams leave it as it was."""
    over = [*SMALL, "synth.conversion=conversion", "synth.history=clicked_ads", "synth.rows_per_file=4000"]
    summary = generate(load_config(debug_config_path, over), tmp_path)
    assert summary["files"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert "per_day" not in summary and not list(tmp_path.glob("dt=*"))
    # _synth.json has since recorded synth.ad_quality_scale as well (the data are the same)
    assert summary["ad_quality_scale"] == 0.3
    assert _digest(tmp_path, leave_out=("ad_quality_scale",)) == \
        "ebd781eabbe623474f80a906d729178b7cd5a851d383ba6b15f6df4809f723df"


def test_days_write_one_directory_per_day_with_timestamps_inside_it(debug_config_path, tmp_path):
    from gmeta.io.synth import day_start

    cfg = load_config(debug_config_path, [*DAYS, "synth.rows_per_file=800", "synth.start_date=2027-02-26"])
    summary = generate(cfg, tmp_path)
    dates = ["2027-02-26", "2027-02-27", "2027-02-28", "2027-03-01", "2027-03-02", "2027-03-03"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_synth.json", *[f"dt={d}" for d in dates]]
    assert [e["date"] for e in summary["per_day"]] == dates
    assert day_start(cfg) == 1803600000  # 2027-02-26T00:00:00Z
    files = []
    for d, entry in enumerate(summary["per_day"]):
        day_dir = tmp_path / f"dt={entry['date']}"
        parts = sorted(p.name for p in day_dir.iterdir())
        assert parts == [f"part-{i:05d}.parquet" for i in range(len(parts))] and len(parts) >= 2
        files += [f"dt={entry['date']}/{p}" for p in parts]
        t = pq.read_table(day_dir).to_pandas()
        lo = day_start(cfg) + d * 86400
        assert len(t) == entry["rows"] and t.ts.between(lo, lo + 86399).all()
        assert ((t.ts - lo) // 3600 == t.hour).all()  # the hour column is the timestamp's (UTC)
        assert t.campaign_id.nunique() == entry["campaigns"] and t.ad_id.nunique() == entry["ads"]
        assert t.user_id.nunique() == entry["users"]
    assert summary["files"] == files and summary["days"] == 6
    assert sum(e["rows"] for e in summary["per_day"]) == summary["rows"]
    # the whole directory reads as one data set (Hive partitions: the day as column dt)
    whole = pq.read_table(tmp_path).to_pandas()
    assert len(whole) == summary["rows"] and sorted(whole.dt.astype(str).unique()) == dates


def test_a_rerun_removes_the_days_of_an_earlier_run(debug_config_path, tmp_path):
    generate(load_config(debug_config_path, DAYS), tmp_path)
    (tmp_path / "dt=2026-12-06" / "notes.txt").write_text("not synth's")
    generate(load_config(debug_config_path, [*DAYS, "synth.days=3"]), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("dt=*")) == [f"dt=2026-12-0{d}" for d in (1, 2, 3, 6)]
    assert [p.name for p in (tmp_path / "dt=2026-12-06").iterdir()] == ["notes.txt"]  # only its own files go
    generate(load_config(debug_config_path, SMALL), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_synth.json", "dt=2026-12-06", "part-00000.parquet"]
    generate(load_config(debug_config_path, DAYS), tmp_path)
    assert not list(tmp_path.glob("part-*")) and len(list(tmp_path.glob("dt=*"))) == 6


def test_campaigns_start_run_and_end(debug_config_path, tmp_path):
    cfg = load_config(debug_config_path, [*DAYS, "synth.num_tasks=800"])
    summary = generate(cfg, tmp_path)
    h = draw(cfg)
    t = pq.read_table(tmp_path).to_pandas()
    t["day"] = t.dt.astype(str).map({e["date"]: d for d, e in enumerate(summary["per_day"])}).astype(int)
    c = t.campaign_id - 1_000_000
    days = t.groupby(c).day.agg(["min", "max", "nunique"])
    first, length = h.camp_first[days.index], h.camp_days[days.index]
    assert len(days) == 800 and (days["max"] - days["min"] + 1 == days["nunique"]).all()  # consecutive
    assert (days["min"] == np.maximum(first, 0)).all() and (days["max"] == np.minimum(first + length, 6) - 1).all()
    inside = (first >= 0) & (first + length <= 6)
    assert inside.sum() > 400 and (days["nunique"][inside] == length[inside]).all()  # a run of its drawn length
    assert (first > 0).sum() > 300 and (first < 0).sum() > 20 and (first + length < 6).sum() > 300
    assert 2.0 < h.camp_days.mean() < 3.0 and h.camp_days.max() > 6 and (h.camp_days <= h.sizes).all()
    assert [e["new_campaigns"] for e in summary["per_day"]] == np.bincount(first[first >= 0], minlength=6).tolist()
    # rows per campaign are the Pareto sizes; its ads only on its days
    assert (t.groupby(c).size().to_numpy() == h.sizes).all()
    ad_days = t.groupby("ad_id").day.agg(["min", "max"])
    camp_of_ad = t.groupby("ad_id").campaign_id.first() - 1_000_000
    assert (ad_days["min"] >= days["min"][camp_of_ad].to_numpy()).all()
    assert (ad_days["max"] <= days["max"][camp_of_ad].to_numpy()).all()
    on = [set(t.ad_id[t.day == d]) for d in range(6)]
    assert on[0] - on[5] and on[5] - on[0] and on[2] - on[0] - on[5]  # ids appear and disappear
    assert summary["per_day"][0]["new_ads"] == len(on[0]) and summary["per_day"][3]["new_ads"] == len(
        on[3] - on[0] - on[1] - on[2])


def test_users_come_and_go_with_the_popularity_skew(debug_config_path):
    cfg = load_config(debug_config_path, [*DAYS, "synth.num_tasks=800", "synth.num_users=1500"])
    h = draw(cfg)
    assert ((h.user_first[h.user] <= h.day) & (h.day < h.user_first[h.user] + h.user_days[h.user])).all()
    seen = [set(h.user[h.day == d].tolist()) for d in range(6)]
    assert seen[0] - seen[5] and seen[5] - seen[0] and len(seen[3] - seen[0] - seen[1] - seen[2]) > 50
    assert 2.0 < h.user_days.mean() < 3.0 and (h.user_first < 0).any() and (h.user_first + h.user_days > 6).any()
    # among a day's active users, the popular ones (low index) have more of its rows
    d = 3
    active = np.flatnonzero((h.user_first <= d) & (d < h.user_first + h.user_days))
    rows = np.bincount(h.user[h.day == d], minlength=len(h.user_lat))[active]
    tenth = len(active) // 10
    assert rows[:tenth].mean() > 2 * rows[-tenth:].mean()


def test_the_shared_logit_drifts_by_its_walk(debug_config_path, tmp_path):
    """The walk is the only difference between two drifts: day 0 is the same, later days'
    shared logits differ by exactly the walk's intercept and dense weights; p_true written
    is recomputed from the hidden terms."""
    still = draw(load_config(debug_config_path, [*DAYS, "synth.daily_drift=0"]))
    cfg = load_config(debug_config_path, [*DAYS, "synth.daily_drift=0.2"])
    h = draw(cfg)
    for name in ("task", "user", "ad", "day", "ts", "dense", "order", "t_bias", "camp_first", "user_first"):
        assert np.array_equal(getattr(h, name), getattr(still, name)), name
    assert not still.drift.any() and not h.drift[0].any() and h.drift.shape == (6, 4)
    steps = np.diff(h.drift, axis=0)
    assert 0.1 < steps.std() < 0.3
    walk = h.drift[h.day, 0] + np.einsum("ij,ij->i", h.dense, h.drift[h.day, 1:])
    assert np.allclose(h.shared - still.shared, walk) and np.allclose(h.base - still.base, walk)
    assert np.array_equal(h.p_true[h.day == 0], still.p_true[still.day == 0])
    assert np.abs(walk[h.day == 5]).mean() > 0.1
    # the written p_true is the hidden model's with the day's walk: the logit without drift,
    # the walk, the ad's and the campaign's terms (every 97th written row)
    generate(cfg, tmp_path)
    rows = h.order[::97]
    u = h.user_lat[h.user[rows]]
    logit = (still.base[rows] + walk[rows] + np.einsum("ij,ij->i", u, h.ad_lat[h.ad[rows]]) + h.ad_quality[h.ad[rows]]
             + h.t_bias[h.task[rows]] + np.einsum("ij,ij->i", h.t_pref[h.task[rows]], u)
             + h.t_slope[h.task[rows]] * h.dense[rows, 0])
    written = pq.read_table(tmp_path).column("p_true").to_numpy()[::97]
    assert np.allclose(written, 1 / (1 + np.exp(-logit)), atol=1e-6)


def test_as_few_campaigns_and_users_as_days_fill_every_day(debug_config_path, tmp_path):
    """A campaign starts and a user is active on every day, so that no day is empty."""
    for seed in range(5):
        cfg = load_config(debug_config_path, [*DAYS, "synth.num_tasks=6", "synth.num_users=6", f"synth.seed={seed}"])
        summary = generate(cfg, tmp_path)
        assert [e["new_campaigns"] >= 1 and e["rows"] >= 1 for e in summary["per_day"]] == [True] * 6
        h = draw(cfg)
        for d in range(6):
            assert ((h.user_first <= d) & (d < h.user_first + h.user_days)).any()


def test_days_are_deterministic_for_a_seed(debug_config_path, tmp_path):
    cfg = load_config(debug_config_path, DAYS)
    a, b = generate(cfg, tmp_path / "a"), generate(cfg, tmp_path / "b")
    assert a == b and _digest(tmp_path / "a") == _digest(tmp_path / "b")
    c = generate(load_config(debug_config_path, [*DAYS, "synth.seed=8"]), tmp_path / "c")
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a") and c["per_day"] != a["per_day"]
    # the same campaigns and users as the one data set of the seed: sizes, ads, hidden terms, latents
    one, daily = draw(load_config(debug_config_path, SMALL)), draw(cfg)
    for name in ("sizes", "ad_campaign", "ad_lat", "t_bias", "t_pref", "user_lat", "task", "ad", "hour", "site"):
        assert np.array_equal(getattr(one, name), getattr(daily, name)), name
    assert np.array_equal(one.dense[:, [0, 2]], daily.dense[:, [0, 2]])  # bid and position (activity is the user's)
    assert not np.array_equal(one.user, daily.user)


def test_histories_of_a_day_list_only_ads_that_exist_by_then(debug_config_path):
    from gmeta.io.synth import histories

    cfg = load_config(debug_config_path, [*DAYS, "synth.history=clicked_ads", "synth.history_length=6"])
    h = draw(cfg)
    lengths, ads = histories(cfg, h)
    row_day = np.repeat(h.day, lengths)
    assert (h.camp_first[h.ad_campaign[ads]] <= row_day).all()
    assert len(np.unique(ads[row_day == 5])) > len(np.unique(ads[row_day == 0]))  # more ads exist by the last day


def test_ceilings_hold_for_a_daily_draw(debug_config_path):
    """The ceilings' shared part is the day's (the walk in base and shared): the predictor
    that knows the true ad and the support rows stays between the others and the oracle."""
    from gmeta.evaluation.ceiling import ceilings

    res = ceilings(load_config(debug_config_path, [*DAYS, "synth.daily_drift=0.3"]))
    pr = res["predictors"]
    assert pr["prior"]["auc"] < pr["true+support"]["auc"] < res["oracle"]["auc"]
    assert pr["true"]["auc"] > 0.55


@pytest.mark.parametrize("override, message", [
    ("synth.days=-1", r"synth.days: must be >= 0"),
    ("synth.start_date=2026-13-01", r"synth.start_date: '2026-13-01' is not an ISO date \(YYYY-MM-DD\)"),
    ("synth.start_date=yesterday", r"synth.start_date: 'yesterday' is not an ISO date"),
    ("synth.start_date=20261201", r"synth.start_date: '20261201' is not an ISO date"),
    ("synth.campaign_days=0.5", r"synth.campaign_days: must be a finite number of days >= 1"),
    ("synth.user_days=.inf", r"synth.user_days: must be a finite number of days >= 1"),
    ("synth.daily_drift=-0.1", r"synth.daily_drift: must be finite and >= 0"),
    ("synth.days=300", r"synth.num_tasks: must be >= synth.days \(300\)"),
])
def test_day_settings_are_checked(debug_config_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(debug_config_path, [*SMALL, override])


def test_a_start_date_written_as_a_yaml_date_is_its_text(debug_config_path, tmp_path):
    path = tmp_path / "days.yaml"
    path.write_text(debug_config_path.read_text().replace("synth:\n", "synth:\n  days: 2\n  start_date: 2027-01-05\n"))
    assert load_config(path).synth.start_date == "2027-01-05"
    assert load_config(debug_config_path, ["synth.start_date=2027-01-05"]).synth.start_date == "2027-01-05"


def test_synth_command_prints_the_days_and_prepare_reads_one(debug_config_path, tmp_path):
    p = _cli(tmp_path, "synth", "--config", str(debug_config_path), "--out", "raw", *DAYS)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("wrote ") and "in 6 days" in lines[0] and len(lines) == 7
    assert lines[1].startswith("2026-12-01: ") and " campaigns (" in lines[1] and "new), " in lines[1]
    p = _cli(tmp_path, "prepare", "--config", str(debug_config_path), "--input", "raw/dt=2026-12-02", "--out",
             "shards", *DAYS)
    assert p.returncode == 0, p.stderr
    m = load_manifest(tmp_path / "shards")
    day = pq.read_table(tmp_path / "raw" / "dt=2026-12-02")
    assert m["input_rows"] == len(day) and m["input_tasks"] == pc.count_distinct(day.column("campaign_id")).as_py()
