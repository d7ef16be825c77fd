"""Synthetic ads-CVR logs where meta learning matters.

Each row is one ad impression of a campaign (the task). The conversion probability comes
from a hidden model with a shared part, which features can explain, and a per-campaign part,
which they cannot::

    logit = mu + <u_user, a_ad> + b_ad + b_hour + b_device + b_site + beta . dense   (shared)
          + t_bias[c] + <t_pref[c], u_user> + t_slope[c] * bid_price                (per task)

``u_user`` is a hidden user latent partly reflected in the user's interest tags, ``a_ad`` a
hidden ad latent (with the ad's quality in ``b_ad`` of the shared part). Each ad has three
attributes, constant over its rows and written as columns: ``ad_category``,
``creative_type`` and ``landing_page``. Every attribute value has a hidden latent, and an
ad's latent and quality are drawn as::

    (a_ad, b_ad) = scale * (sqrt(share) * sum of its attributes' latents (unit variance)
                            + sqrt(1 - share) * residual of the ad id)

(``share`` = ``synth.ad_attribute_share``): a new ad's attributes reveal part of its latent,
the residual only its own rows. ``t_bias``, ``t_pref`` and ``t_slope`` are drawn per
campaign and never written, so a model can only learn them for a new campaign from its
support rows. Campaign sizes follow a Pareto law. Every campaign owns its ads, so held-out
campaigns are cold start for their ads (their advertiser and attribute values may be known).
The true probability of every row is written (``p_true``) for the oracle AUC. Output is
deterministic for a given ``synth.seed``; ``draw`` returns the hidden model itself (for
tests and ``gmeta.evaluation.ceiling``), which is never written.

Daily partitions (``synth.days`` N > 0): the rows fall on N days from ``synth.start_date``,
written one directory per day (``dt=YYYY-MM-DD/part-*.parquet``). Each campaign runs on a
window of consecutive days (geometric length of mean ``synth.campaign_days``, at most its
number of rows; some already running on the first day, some still running on the last) and
its rows are spread over them, at least one a day, so that its ads appear when it starts and
disappear when it ends. Each user is active on a window of days (mean ``synth.user_days``)
and a day's rows draw their users among that day's active users (by the same popularity).
The shared logit's intercept and dense weights follow a random walk, 0 on the first day, of
step ``synth.daily_drift`` per day, in ``p_true``. Every window draw is one of a stream of
its own and the walk of another, so that ``synth.days: 0`` writes the one data set as
before, and a daily draw has the same campaigns (sizes, ads, hidden terms) and users
(latents, interests) as that data set.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gmeta.config import Config

log = logging.getLogger(__name__)

# Raw ids are drawn from large, sparse ranges so that hashing into tables is exercised.
ID_BASE = {"user_id": 10_000_000, "ad_id": 50_000_000, "advertiser_id": 90_000_000, "campaign_id": 1_000_000}


# The ad attribute columns and the synth config key of each one's number of values.
AD_ATTRIBUTES = {"ad_category": "num_ad_categories", "creative_type": "num_creative_types",
                 "landing_page": "num_landing_pages"}
# The sparse columns gmeta synth writes.
SPARSE_COLUMNS = ("user_id", "ad_id", "advertiser_id", "hour", "device", "site_id", "interests", *AD_ATTRIBUTES)
# Standard deviation of a_ad (its norm; each coordinate has this over sqrt(latent_dim)); the
# ad quality's is synth.ad_quality_scale.
_AD_LAT_SCALE = 1.5


def _ad_attributes(cfg: Config, n_ads: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each ad's attribute values ({column: [n_ads]}) and the sum of their hidden latents,
    [n_ads, latent_dim + 1] (the last coordinate drives the quality), scaled so that each
    coordinate has a mean square of 1 over the ads: the configured share is then the share
    of the ads' variance in this draw, not only in expectation over draws of the few
    values' latents (8 creative types give a noisy variance).

    Drawn from a stream of their own (seeded by ``synth.seed``), so that every other draw of
    the generator is the same whatever the attribute settings."""
    s = cfg.synth
    rng = np.random.default_rng([s.seed, 1])
    attrs: dict[str, np.ndarray] = {}
    total = np.zeros((n_ads, s.latent_dim + 1))
    for name, key in AD_ATTRIBUTES.items():
        n = getattr(s, key)
        pop = 1.0 / np.arange(1, n + 1) ** 0.7  # a few common values, a long tail
        attrs[name] = rng.choice(n, size=n_ads, p=pop / pop.sum())
        total += rng.normal(size=(n, s.latent_dim + 1))[attrs[name]]
    rms = np.sqrt(np.mean(total ** 2, axis=0))
    return attrs, total / np.where(rms > 0, rms, 1.0)


def task_sizes(rng: np.random.Generator, n: int, lo: int, hi: int, alpha: float) -> np.ndarray:
    """Power-law (Pareto, tail index ``alpha``) task sizes clipped to [lo, hi]."""
    return np.clip(np.floor(lo * (1.0 + rng.pareto(alpha, size=n))), lo, hi).astype(np.int64)


@dataclass
class Hidden:
    """One draw of the generator: the hidden model and every row, in the order drawn.

    Rows are written in the order ``order`` (row ``order[j]`` of these arrays is row ``j``
    of the output). The arrays named ``*_lat``, ``ad_quality`` and ``t_*`` are never
    written: they are what a model has to learn, and what the ceilings in
    ``gmeta.evaluation.ceiling`` know.
    """

    user_lat: np.ndarray  # [num_users, k] hidden user latent u_user
    ad_lat: np.ndarray  # [num_ads, k] hidden ad latent a_ad
    ad_quality: np.ndarray  # [num_ads] hidden ad bias
    ad_campaign: np.ndarray  # [num_ads] the campaign that owns each ad
    ad_attrs: dict[str, np.ndarray]  # attribute column -> [num_ads] the ad's value (0-based)
    ad_lat_attr: np.ndarray  # [num_ads, k] E[a_ad | the ad's attributes]
    ad_quality_attr: np.ndarray  # [num_ads] E[ad quality | the ad's attributes]
    ad_lat_scale: float  # standard deviation of each coordinate of a_ad
    ad_quality_scale: float  # standard deviation of the ad quality
    attribute_share: float  # share of the variance of a_ad and the ad quality its attributes explain
    t_bias: np.ndarray  # [num_tasks]
    t_pref: np.ndarray  # [num_tasks, k]
    t_slope: np.ndarray  # [num_tasks]
    camp_adv: np.ndarray  # [num_tasks] advertiser of each campaign
    sizes: np.ndarray  # [num_tasks] rows per campaign
    task: np.ndarray  # [rows] campaign index
    user: np.ndarray  # [rows] user index
    ad: np.ndarray  # [rows] ad index
    hour: np.ndarray  # [rows]
    device: np.ndarray  # [rows]
    site: np.ndarray  # [rows]
    dense: np.ndarray  # [rows, 3] bid price, user activity, ad position (standardised)
    # [rows] the shared logit's terms the row's features show: mu + b_hour + b_device + b_site + beta . dense
    base: np.ndarray
    shared: np.ndarray  # [rows] the whole shared logit (base + <u_user, a_ad> + ad quality)
    p_true: np.ndarray  # [rows]
    label: np.ndarray  # [rows] int8
    ts: np.ndarray  # [rows] seconds
    user_tags_flat: np.ndarray  # the users' interest tags, concatenated
    user_tag_off: np.ndarray  # [num_users + 1] offsets into user_tags_flat
    n_tags: np.ndarray  # [num_users]
    order: np.ndarray  # [rows] the written order (with synth.days, day after day)
    # Daily partitions (synth.days > 0; with 0, one day: day 0, no drift, windows of 1 day
    # from day 0). A window's first day may be < 0: running before the first day.
    day: np.ndarray  # [rows] the row's day (0-based)
    # [max(days, 1), 4] the walk of the shared logit per day: intercept, then the weights
    # of the three dense columns (added to mu and beta; in base, shared and p_true)
    drift: np.ndarray
    camp_first: np.ndarray  # [num_tasks] the first day of the campaign's run
    camp_days: np.ndarray  # [num_tasks] the number of days it runs
    user_first: np.ndarray  # [num_users] the first day the user is active
    user_days: np.ndarray  # [num_users] the number of days it is active


def check_schema(cfg: Config) -> None:
    """The features ``gmeta synth`` needs in the config; raises ValueError naming them."""
    f = cfg.features
    expected = {"user_id", "ad_id", "advertiser_id", "hour", "device", "site_id", "interests"}
    have = {sp.name for sp in f.sparse}
    if not expected <= have or len(f.dense) != 3:
        raise ValueError(
            "gmeta synth writes the ads-CVR schema: features.sparse must include "
            f"{sorted(expected)} and features.dense must list 3 columns; got sparse={sorted(have)}, "
            f"dense={f.dense}"
        )
    history = cfg.synth.history
    if history in SPARSE_COLUMNS:
        raise ValueError(f"synth.history: {history!r} is a column gmeta synth writes already; name the history "
                         "column apart (e.g. clicked_ads)")
    unknown = sorted(have - set(SPARSE_COLUMNS) - ({history} if history else set()))
    if unknown:
        raise ValueError(f"features.sparse lists {unknown}, which gmeta synth does not write "
                         f"(it writes {list(SPARSE_COLUMNS)}, and synth.history's column when set)")


def _windows(rng: np.random.Generator, n: int, days: int, mean: float,
             most: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """First day and length of ``n`` windows of consecutive days that meet days 0..days-1:
    lengths geometric of mean ``mean`` (at least 1, at most ``most``), the first day uniform
    among those whose window meets the days (as windows that begin at a constant rate
    would), so that some begin before day 0 and some end after the last day; ``days`` of
    them, at random, begin on day 0, 1, ... each, so that every day has one (``n`` >= ``days``)."""
    length = rng.geometric(1.0 / mean, size=n)
    if most is not None:
        length = np.minimum(length, most)
    first = rng.integers(1 - length, days)
    first[rng.permutation(n)[:days]] = np.arange(days)
    return first, length


def _calendar(cfg: Config, sizes: np.ndarray, user_pop: np.ndarray) -> dict[str, np.ndarray]:
    """The days of a daily draw (synth.days > 0), from a stream of its own: the campaigns'
    and users' windows, each row's day and user, and the second within its hour."""
    s = cfg.synth
    rng = np.random.default_rng([s.seed, 3])
    days = s.days
    camp_first, camp_days = _windows(rng, s.num_tasks, days, s.campaign_days, most=sizes)
    user_first, user_days = _windows(rng, s.num_users, days, s.user_days)
    # the campaign's days in the data and its rows over them: one on each day, the rest at random
    lo = np.maximum(camp_first, 0)
    on = np.minimum(camp_first + camp_days, days) - lo
    task = np.repeat(np.arange(s.num_tasks), sizes)
    within = np.arange(len(task)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    day = lo[task] + np.where(within < on[task], within, (rng.random(len(task)) * on[task]).astype(np.int64))
    user = np.empty(len(task), np.int64)
    for d in range(days):
        rows = np.flatnonzero(day == d)
        active = np.flatnonzero((user_first <= d) & (d < user_first + user_days))
        pop = user_pop[active]
        user[rows] = active[rng.choice(len(active), size=len(rows), p=pop / pop.sum())]
    return {"camp_first": camp_first, "camp_days": camp_days, "user_first": user_first, "user_days": user_days,
            "day": day, "user": user, "second": rng.integers(0, 3600, size=len(task))}


def _drift(cfg: Config) -> np.ndarray:
    """The shared logit's walk, [days, 4] (intercept, dense weights): 0 on the first day,
    steps N(0, daily_drift) a day. Its own stream: the same walk whatever else is drawn."""
    s = cfg.synth
    steps = np.random.default_rng([s.seed, 4]).normal(0.0, s.daily_drift, size=(s.days - 1, 4))
    return np.concatenate([np.zeros((1, 4)), np.cumsum(steps, axis=0)])


def day_start(cfg: Config, day: int = 0) -> int:
    """UTC seconds at the start of day ``day`` of a daily draw (0: synth.start_date)."""
    d = datetime.date.fromisoformat(cfg.synth.start_date) + datetime.timedelta(days=day)
    return int(datetime.datetime(d.year, d.month, d.day, tzinfo=datetime.UTC).timestamp())


def day_name(cfg: Config, day: int) -> str:
    """The directory of day ``day``: dt=YYYY-MM-DD."""
    return f"dt={datetime.date.fromisoformat(cfg.synth.start_date) + datetime.timedelta(days=day)}"


def draw(cfg: Config) -> Hidden:
    """Draw the hidden model and every row from ``synth.seed`` (deterministic; with
    synth.days, each row's day, user and time from the days' stream and the walk in the
    shared part)."""
    s = cfg.synth
    rng = np.random.default_rng(s.seed)
    k = s.latent_dim

    # users: hidden latent, interests tied to it, activity level
    tag_vec = rng.normal(size=(s.num_interests, k))
    n_tags = rng.integers(1, 6, size=s.num_users)
    tag_pop = 1.0 / np.arange(1, s.num_interests + 1) ** 0.8
    tag_pop /= tag_pop.sum()
    user_tags_flat = rng.choice(s.num_interests, size=int(n_tags.sum()), p=tag_pop)
    user_tag_off = np.concatenate([[0], np.cumsum(n_tags)])
    tag_mean = np.add.reduceat(tag_vec[user_tags_flat], user_tag_off[:-1], axis=0) / n_tags[:, None]
    user_lat = (0.7 * tag_mean + 0.7 * rng.normal(size=(s.num_users, k))) / np.sqrt(k)
    user_act = rng.lognormal(0.0, 0.6, size=s.num_users)

    # campaigns (tasks): sizes, advertisers, ads, hidden task effects
    sizes = task_sizes(rng, s.num_tasks, s.min_rows_per_task, s.max_rows_per_task, s.size_alpha)
    n_adv = max(1, s.num_tasks // 3)
    camp_adv = rng.integers(0, n_adv, size=s.num_tasks)
    ads_per_camp = rng.integers(1, 6, size=s.num_tasks)
    ad_off = np.concatenate([[0], np.cumsum(ads_per_camp)])
    n_ads = int(ad_off[-1])
    ad_resid = np.concatenate([rng.normal(size=(n_ads, k)), rng.normal(size=(n_ads, 1))], axis=1)
    ad_attrs, ad_attr_part = _ad_attributes(cfg, n_ads)
    # a_ad and quality in units of their standard deviation: the attributes' part and the
    # ad's own residual, independent, each of unit variance
    ad_std = np.sqrt(s.ad_attribute_share) * ad_attr_part + np.sqrt(1.0 - s.ad_attribute_share) * ad_resid
    ad_scale = np.concatenate([np.full(k, _AD_LAT_SCALE / np.sqrt(k)), [s.ad_quality_scale]])
    ad_lat, ad_quality = (ad_std * ad_scale)[:, :k], (ad_std * ad_scale)[:, k]
    ad_mean = np.sqrt(s.ad_attribute_share) * ad_attr_part * ad_scale  # E[a_ad, quality | attributes]
    t_bias = rng.normal(0, s.task_bias_scale, size=s.num_tasks)
    t_pref = rng.normal(0, s.task_pref_scale, size=(s.num_tasks, k))
    t_slope = rng.normal(0, s.task_slope_scale, size=s.num_tasks)
    hour_b = 0.3 * np.sin(np.arange(24) / 24 * 2 * np.pi)
    dev_b = rng.normal(0, 0.3, size=8)
    site_b = rng.normal(0, 0.3, size=s.num_sites)
    beta = np.array([-0.3, 0.4, -0.25])
    mu = -1.6

    # rows
    n_rows = int(sizes.sum())
    task = np.repeat(np.arange(s.num_tasks), sizes)
    user_pop = 1.0 / np.arange(1, s.num_users + 1) ** 0.6
    user_pop /= user_pop.sum()
    user = rng.choice(s.num_users, size=n_rows, p=user_pop)
    cal = _calendar(cfg, sizes, user_pop) if s.days else None
    if cal is not None:
        user = cal["user"]  # among the day's active users (the draw above kept, for the draws after it)
    ad = ad_off[task] + (rng.random(n_rows) * ads_per_camp[task]).astype(np.int64)
    hour = rng.integers(0, 24, size=n_rows)
    device = rng.choice(8, size=n_rows, p=np.array([40, 30, 10, 8, 5, 4, 2, 1]) / 100.0)
    site = rng.integers(0, s.num_sites, size=n_rows)
    bid = rng.normal(0, 1, size=n_rows)
    activity = np.log(user_act[user]) + rng.normal(0, 0.2, size=n_rows)
    position = rng.integers(1, 6, size=n_rows).astype(np.float64)
    pos_std = (position - 3.0) / 1.4
    dense = np.stack([bid, activity, pos_std], axis=1)

    base = mu + hour_b[hour] + dev_b[device] + site_b[site] + dense @ beta
    if cal is not None:
        drift, day = _drift(cfg), cal["day"]
        base = base + drift[day, 0] + np.einsum("ij,ij->i", dense, drift[day, 1:])
    else:
        drift, day = np.zeros((1, 4)), np.zeros(n_rows, np.int64)
    shared = base + np.einsum("ij,ij->i", user_lat[user], ad_lat[ad]) + ad_quality[ad]
    per_task = t_bias[task] + np.einsum("ij,ij->i", t_pref[task], user_lat[user]) + t_slope[task] * bid
    p_true = 1.0 / (1.0 + np.exp(-(shared + per_task)))
    label = (rng.random(n_rows) < p_true).astype(np.int8)
    # 30 days of impressions, each campaign active on a random window
    start = rng.integers(0, 20 * 86400, size=s.num_tasks)
    ts = start[task] + rng.integers(0, 10 * 86400, size=n_rows)
    # Shuffle rows so that raw files are not grouped by task (as real logs are not).
    order = rng.permutation(n_rows)
    if cal is not None:
        # the day's hour, a second within it; written day after day
        ts = day_start(cfg) + day * 86400 + hour * 3600 + cal["second"]
        order = order[np.argsort(day[order], kind="stable")]
        windows = {k: cal[k] for k in ("camp_first", "camp_days", "user_first", "user_days")}
    else:
        windows = {"camp_first": np.zeros(s.num_tasks, np.int64), "camp_days": np.ones(s.num_tasks, np.int64),
                   "user_first": np.zeros(s.num_users, np.int64), "user_days": np.ones(s.num_users, np.int64)}
    return Hidden(user_lat=user_lat, ad_lat=ad_lat, ad_quality=ad_quality,
                  ad_campaign=np.repeat(np.arange(s.num_tasks), ads_per_camp), ad_attrs=ad_attrs,
                  ad_lat_attr=ad_mean[:, :k], ad_quality_attr=ad_mean[:, k],
                  ad_lat_scale=_AD_LAT_SCALE / np.sqrt(k), ad_quality_scale=s.ad_quality_scale,
                  attribute_share=s.ad_attribute_share,
                  t_bias=t_bias, t_pref=t_pref, t_slope=t_slope, camp_adv=camp_adv, sizes=sizes, task=task,
                  user=user, ad=ad, hour=hour, device=device, site=site, dense=dense, base=base, shared=shared,
                  p_true=p_true, label=label, ts=ts, user_tags_flat=user_tags_flat, user_tag_off=user_tag_off,
                  n_tags=n_tags, order=order, day=day, drift=drift, **windows)


def conversions(cfg: Config, h: Hidden) -> np.ndarray:
    """The conversion of each row (in the order drawn), int8 0/1: 0 without a click; after a
    click, 1 with probability sigmoid(conversion_offset + ad quality + c_bias[task] +
    c_pref[task] . u_user), c_bias and c_pref hidden per campaign (as the click's t_bias and
    t_pref, drawn apart from them). Its own random stream (from synth.seed), so that every
    other column is the same with or without it."""
    s = cfg.synth
    rng = np.random.default_rng([s.seed, 1])
    c_bias = rng.normal(0, s.task_bias_scale, size=s.num_tasks)
    c_pref = rng.normal(0, s.task_pref_scale, size=(s.num_tasks, h.user_lat.shape[1]))
    logit = (s.conversion_offset + h.ad_quality[h.ad] + c_bias[h.task]
             + np.einsum("ij,ij->i", c_pref[h.task], h.user_lat[h.user]))
    p = 1.0 / (1.0 + np.exp(-logit))
    return ((h.label == 1) & (rng.random(len(h.task)) < p)).astype(np.int8)


# How strongly a history's ads follow the user's taste: an ad is picked with odds
# exp(_HISTORY_TASTE * <u_user, a_ad>) among _HISTORY_CANDIDATES ads drawn at random.
_HISTORY_TASTE = 6.0
_HISTORY_CANDIDATES = 40


def histories(cfg: Config, h: Hidden) -> tuple[np.ndarray, np.ndarray]:
    """Each row's behaviour history (in the order drawn): (lengths [rows], ad indices
    concatenated), the most recent first. A row's length is uniform in 0..history_length;
    each ad the user clicked before is the pick, by its odds exp(taste <u_user, a_ad>)
    (Gumbel-max), among ``_HISTORY_CANDIDATES`` ads drawn at random, so a history leans to
    the ads whose latent matches the user's: it shows the user's taste, which drives the
    click through <u_user, a_ad>. Its own random stream (from synth.seed), so that every
    other column is the same with or without it. With synth.days, the candidates are the
    ads that exist by the row's day (their campaign has started)."""
    s = cfg.synth
    rng = np.random.default_rng([s.seed, 2])
    n_rows, n_ads = len(h.task), len(h.ad_lat)
    lengths = rng.integers(0, s.history_length + 1, size=n_rows)
    users = np.repeat(h.user, lengths)
    if s.days:
        # the ads by the day their campaign starts: those of a day are a prefix of this order
        ad_first = h.camp_first[h.ad_campaign]
        by_first = np.argsort(ad_first, kind="stable")
        known = np.searchsorted(ad_first[by_first], np.repeat(h.day, lengths), side="right")
    out = np.empty(len(users), np.int64)
    chunk = 1 << 16  # bounded memory: [chunk, candidates] at a time
    for lo in range(0, len(users), chunk):
        u = users[lo: lo + chunk]
        if s.days:
            pick = rng.random((len(u), _HISTORY_CANDIDATES)) * known[lo: lo + chunk, None]
            cand = by_first[pick.astype(np.int64)]
        else:
            cand = rng.integers(0, n_ads, size=(len(u), _HISTORY_CANDIDATES))
        score = _HISTORY_TASTE * np.einsum("rk,rck->rc", h.user_lat[u], h.ad_lat[cand])
        pick = np.argmax(score + rng.gumbel(size=score.shape), axis=1)
        out[lo: lo + chunk] = cand[np.arange(len(u)), pick]
    return lengths, out


def _remove_stale(out: Path) -> None:
    """The files an earlier run wrote to ``out``: part files, at the top or in day
    directories (dt=*; a day directory goes when nothing else is left in it)."""
    for old in out.glob("part-*.parquet"):
        old.unlink()
    for day_dir in out.glob("dt=*"):
        if day_dir.is_dir():
            for old in day_dir.glob("part-*.parquet"):
                old.unlink()
            if not any(day_dir.iterdir()):
                day_dir.rmdir()


def _day_counts(cfg: Config, h: Hidden) -> list[dict]:
    """Per day of a daily draw: its rows, click rate and the campaigns, ads and users seen,
    with those new that day (a campaign whose run starts that day, so not one already
    running on the first day; an ad or user the log had not shown before)."""
    first_ad = np.full(len(h.ad_lat), cfg.synth.days)
    np.minimum.at(first_ad, h.ad, h.day)
    first_user = np.full(len(h.user_lat), cfg.synth.days)
    np.minimum.at(first_user, h.user, h.day)
    out = []
    for d in range(cfg.synth.days):
        rows = np.flatnonzero(h.day == d)
        out.append({"date": day_name(cfg, d)[3:], "rows": len(rows),
                    "positive_rate": float(h.label[rows].mean()),
                    "campaigns": len(np.unique(h.task[rows])), "new_campaigns": int(np.sum(h.camp_first == d)),
                    "ads": len(np.unique(h.ad[rows])), "new_ads": int(np.sum(first_ad == d)),
                    "users": len(np.unique(h.user[rows])), "new_users": int(np.sum(first_user == d))})
    return out


def day_line(entry: dict) -> str:
    """One day of ``generate``'s summary (its ``per_day``) as a line."""
    return (f"{entry['date']}: {entry['rows']:,} rows, {entry['campaigns']:,} campaigns "
            f"({entry['new_campaigns']:,} new), {entry['ads']:,} ads ({entry['new_ads']:,} new), "
            f"{entry['users']:,} users ({entry['new_users']:,} new), positive rate {entry['positive_rate']:.3f}")


def generate(cfg: Config, out_dir: str | Path) -> dict:
    """Write raw row-level Parquet files to ``out_dir`` (with synth.days, one directory of
    them per day); return a summary dict."""
    check_schema(cfg)
    s = cfg.synth
    f = cfg.features
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    h = draw(cfg)
    n_rows = len(h.task)
    task, user, ad, order = h.task, h.user, h.ad, h.order
    n_tags, user_tag_off, user_tags_flat = h.n_tags, h.user_tag_off, h.user_tags_flat
    dense, label, p_true, sizes = h.dense, h.label, h.p_true, h.sizes

    # interests: the user's tags (multi-hot, variable length)
    row_ntags = n_tags[user]
    row_off = np.concatenate([[0], np.cumsum(row_ntags)])
    within = np.arange(int(row_off[-1])) - np.repeat(row_off[:-1], row_ntags)
    gather = np.repeat(user_tag_off[user], row_ntags) + within
    interests = pa.ListArray.from_arrays(pa.array(row_off, pa.int32()), pa.array(user_tags_flat[gather], pa.int64()))

    columns = {
        "campaign_id": pa.array(ID_BASE["campaign_id"] + task[order]),
        "user_id": pa.array(ID_BASE["user_id"] + user[order]),
        "ad_id": pa.array(ID_BASE["ad_id"] + ad[order]),
        "advertiser_id": pa.array(ID_BASE["advertiser_id"] + h.camp_adv[task[order]]),
        "hour": pa.array(h.hour[order]),
        "device": pa.array(h.device[order]),
        "site_id": pa.array(h.site[order]),
        "interests": interests.take(pa.array(order)),
        # always written, as a log has every column: gmeta prepare reads only the
        # features the config lists, so configs without them ignore them
        **{name: pa.array(h.ad_attrs[name][ad[order]]) for name in AD_ATTRIBUTES},
        f.dense[0]: pa.array(dense[order, 0].astype(np.float32)),
        f.dense[1]: pa.array(dense[order, 1].astype(np.float32)),
        f.dense[2]: pa.array(dense[order, 2].astype(np.float32)),
        f.label: pa.array(label[order]),
        f.true_prob or "p_true": pa.array(p_true[order].astype(np.float32)),
        f.timestamp: pa.array(h.ts[order]),
    }
    conversion = conversions(cfg, h) if s.conversion else None
    if conversion is not None and s.conversion:
        columns[s.conversion] = pa.array(conversion[order])
    affinity = {}
    if s.history:
        lengths, hist = histories(cfg, h)
        users = np.repeat(user, lengths)
        # how much a history shows the user's taste: its ads' mean <u_user, a_ad>, against the
        # impressions' ads' (drawn without regard to the user)
        affinity = {"history_affinity": float(np.einsum("rk,rk->r", h.user_lat[users], h.ad_lat[hist]).mean()),
                    "impression_affinity": float(np.einsum("rk,rk->r", h.user_lat[user], h.ad_lat[ad]).mean())}
        off = np.concatenate([[0], np.cumsum(lengths)])
        seqs = pa.ListArray.from_arrays(pa.array(off, pa.int32()), pa.array(ID_BASE["ad_id"] + hist, pa.int64()))
        columns[s.history] = seqs.take(pa.array(order))
    # the task key names a column of the log: the campaign's under its own name, or one of the
    # columns above (ad_id: the ads are the tasks), never written twice
    columns.setdefault(f.task_key, columns["campaign_id"])
    table = pa.table(columns)
    files = []
    # the rows of each day are contiguous in the written order (all in one without days)
    day_rows = np.bincount(h.day, minlength=max(s.days, 1))
    for d, (lo, n) in enumerate(zip(np.cumsum(day_rows) - day_rows, day_rows, strict=True)):
        where = out / day_name(cfg, d) if s.days else out
        where.mkdir(exist_ok=True)
        for i, at in enumerate(range(0, int(n), s.rows_per_file)):
            path = where / f"part-{i:05d}.parquet"
            pq.write_table(table.slice(int(lo) + at, min(s.rows_per_file, int(n) - at)), path,
                           row_group_size=65_536)
            files.append(path.relative_to(out).as_posix())
    summary = {
        "rows": n_rows,
        "tasks": int(s.num_tasks),
        "positive_rate": float(label.mean()),
        **({"conversion_rate": float(conversion.mean())} if conversion is not None else {}),
        "task_size_min": int(sizes.min()),
        "task_size_median": float(np.median(sizes)),
        "task_size_max": int(sizes.max()),
        "ads": len(h.ad_lat),
        "ad_attribute_share": s.ad_attribute_share,
        "ad_quality_scale": s.ad_quality_scale,
        **affinity,
        "seed": s.seed,
        "files": files,
    }
    if s.days:
        summary.update(days=s.days, start_date=s.start_date, campaign_days=s.campaign_days, user_days=s.user_days,
                       daily_drift=s.daily_drift, per_day=_day_counts(cfg, h))
    # a leading underscore: pyarrow datasets skip it when reading the directory
    (out / "_synth.json").write_text(json.dumps(summary, indent=2))
    log.info("synth: wrote %d rows of %d tasks to %s%s", n_rows, s.num_tasks, out,
             f" ({s.days} days from {s.start_date})" if s.days else "")
    return summary
