"""Ceilings of the synthetic ads-CVR set for new ads: what a predictor that knows parts of
the hidden model (``gmeta.io.synth``) scores on the query rows of held-out campaigns.

    python -m gmeta.evaluation.ceiling --config configs/ads_cvr.yaml [key=value ...]

Every predictor knows the generator's shared part except the new ad's own terms (its
latent ``a_ad`` and its quality): the user latents, the hour, device and site effects and
the dense weights. What it knows of the new ad is one of

- ``prior``: nothing (the prior mean, 0; the prior variance of ``a_ad`` and quality);
- ``attributes``: the posterior given the ad's attributes (the mean their latents give,
  the variance of the id's own residual);
- ``true``: the ad's true latent and quality.

Each is scored twice: on that knowledge alone (the logit with every unknown term at its
prior mean: the per-campaign terms at 0, the ad's as above; no support row used), and as a
Bayesian predictor that infers, from the campaign's support rows, the campaign's hidden
terms (``t_bias``, ``t_pref``, ``t_slope``) and the part of each of its ads that it does
not know, under the generator's own Gaussian priors (a Laplace approximation of the
logistic posterior, and its predictive probability). ``true`` with the support rows is the
Bayesian ceiling, ``true`` alone the true shared part. The oracle (the true
probabilities) is printed beside them.

The held-out campaigns and their support and query rows are those ``gmeta prepare`` makes
from the written data under the config's ``data.split`` (the same functions, applied to the
rows in memory): ``--split eval`` (default) or ``val``. With ``synth.days``, those of every
day (``gmeta prepare`` of the whole output directory), each row's shared part with its
day's drift.

Under the warm-up protocol (``data.split.rule: warmup``, ``features.task_key: ad_id``, as in
``configs/ads_cold_items.yaml``) the held-out tasks are the new ads, and the ceilings come
per stage (``warmup_ceilings``): at the cold stage on the knowledge alone, after a, a+b and
a+b+c as the Bayesian predictor given the ad's first K, 2K, 3K warm-up rows (its campaign's
terms and the ad's unknown part inferred from them alone: the models see no other row of a
new ad's campaign either), every stage scored on the same test rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass

import numpy as np

from gmeta.config import Config, load_config
from gmeta.io.features import stable_hash, task_uniform
from gmeta.io.split import split_tasks, warmup_splits
from gmeta.io.synth import ID_BASE, Hidden, draw
from gmeta.metrics import auc, gauc, logloss

log = logging.getLogger(__name__)

KNOWLEDGE = ("prior", "attributes", "true")
KNOWLEDGE_LABEL = {
    "prior": "nothing (prior mean)",
    "attributes": "its attributes (posterior mean)",
    "true": "its true latent",
}


@dataclass
class HeldOut:
    """Support and query rows (indices into the ``Hidden`` arrays) of each held-out campaign."""

    tasks: np.ndarray  # [T] campaign indices
    support: list[np.ndarray]  # T arrays of row indices
    query: list[np.ndarray]  # T arrays of row indices


def held_out(cfg: Config, h: Hidden, split: str = "eval", support_rows: int | None = None) -> HeldOut:
    """The tasks of ``split`` (campaigns, or ads with features.task_key ad_id) and their
    rows, as ``gmeta prepare`` splits the written rows: sorted by (task key, time, written
    position), split by ``gmeta.io.split``. ``support_rows``: each task's first support rows
    only (a warm-up stage)."""
    sp = cfg.data.split
    if split not in ("eval", "val"):
        raise ValueError(f"split must be 'eval' or 'val', got {split!r}")
    if split == "val" and sp.val_fraction <= 0:
        raise ValueError("--split val needs data.split.val_fraction > 0 (it is 0 in this config)")
    key = cfg.features.task_key
    if key not in ("campaign_id", "ad_id"):
        raise ValueError(f"features.task_key {key!r}: the ceilings know gmeta synth's campaigns (campaign_id) and "
                         "ads (ad_id)")
    written_pos = np.empty_like(h.order)
    written_pos[h.order] = np.arange(len(h.order))
    keys = ID_BASE[key] + (h.task if key == "campaign_id" else h.ad)
    srt = np.lexsort((written_pos, h.ts, keys))
    k_sorted = keys[srt]
    task_start = np.concatenate([[0], np.flatnonzero(k_sorted[1:] != k_sorted[:-1]) + 1]).astype(np.int64)
    counts = np.diff(np.concatenate([task_start, [len(k_sorted)]]))
    task_keys = k_sorted[task_start]
    u = task_uniform(task_keys, sp.seed)
    if sp.rule == "warmup":  # held out by the id's row count, as prepare does
        pick = np.flatnonzero(warmup_splits(cfg, counts, u) == split)
    else:
        lo, hi = (0.0, sp.eval_fraction) if split == "eval" else (sp.eval_fraction, sp.eval_fraction + sp.val_fraction)
        pick = np.flatnonzero((u >= lo) & (u < hi))
    ts_sorted = h.ts[srt].astype(np.int64)
    s_idx, q_idx, _ = split_tasks(cfg, task_start[pick], counts[pick], ts_sorted,
                                  stable_hash(task_keys[pick], "task"),
                                  held_out=np.ones(len(pick), bool) if sp.rule == "warmup" else None)
    keep = [i for i, s in enumerate(s_idx) if s is not None]  # a dropped task has neither side
    return HeldOut(tasks=(task_keys[pick] - ID_BASE[key])[keep],
                   support=[srt[s][:support_rows] for s in s_idx if s is not None],
                   query=[srt[q] for q in q_idx if q is not None])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warning for large |x|


def _ad_prior(h: Hidden, knowledge: str, ads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prior mean and variance of the ads' unknown terms, [len(ads), k + 1] each
    (latent coordinates, then quality)."""
    k = h.ad_lat.shape[1]
    var = np.concatenate([np.full(k, h.ad_lat_scale ** 2), [h.ad_quality_scale ** 2]])
    if knowledge == "prior":
        return np.zeros((len(ads), k + 1)), np.broadcast_to(var, (len(ads), k + 1))
    mean = np.concatenate([h.ad_lat_attr[ads], h.ad_quality_attr[ads, None]], axis=1)
    return mean, np.broadcast_to(var * (1.0 - h.attribute_share), (len(ads), k + 1))


def _design(h: Hidden, rows: np.ndarray, ads: np.ndarray, with_ads: bool) -> np.ndarray:
    """Columns of the unknown terms for ``rows`` of one campaign: [1, u_user, bid] for the
    campaign's terms, then [u_user, 1] for each of ``ads`` (zero on the other ads' rows)."""
    u = h.user_lat[h.user[rows]]
    cols = [np.ones((len(rows), 1)), u, h.dense[rows, :1]]
    if with_ads:
        onehot = (h.ad[rows, None] == ads[None, :]).astype(np.float64)  # [rows, ads]
        per_ad = np.concatenate([u, np.ones((len(rows), 1))], axis=1)  # [rows, k + 1]
        cols.append((onehot[:, :, None] * per_ad[:, None, :]).reshape(len(rows), -1))
    return np.concatenate(cols, axis=1)


def _posterior(x: np.ndarray, y: np.ndarray, offset: np.ndarray, mean0: np.ndarray,
               prec0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Laplace approximation of a logistic regression with offset and a diagonal Gaussian
    prior: the posterior mode and covariance. Newton's method with step halving (the
    log-posterior is strictly concave, so the mode is unique)."""

    def objective(theta: np.ndarray) -> float:
        z = offset + x @ theta
        return float(np.sum(y * z - np.logaddexp(0.0, z)) - 0.5 * np.sum(prec0 * (theta - mean0) ** 2))

    theta = mean0.copy()
    best = objective(theta)
    for _ in range(100):
        p = _sigmoid(offset + x @ theta)
        grad = x.T @ (y - p) - prec0 * (theta - mean0)
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(prec0)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:
            cand = theta + t * step
            val = objective(cand)
            if val >= best - 1e-12:
                break
            t *= 0.5
        theta, best = cand, val
        if np.max(np.abs(t * step)) < 1e-9:
            break
    p = _sigmoid(offset + x @ theta)
    hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(prec0)
    return theta, np.linalg.inv(hess)


def predict(cfg: Config, h: Hidden, ho: HeldOut, knowledge: str, support: bool) -> np.ndarray:
    """Probabilities of every query row of ``ho`` (campaign after campaign).

    ``support`` False: the knowledge alone, the unknown terms at their prior mean.
    True: the Bayesian predictive probability given the campaign's support rows (probit
    approximation of the logistic-Gaussian integral, MacKay 1992)."""
    if knowledge not in KNOWLEDGE:
        raise ValueError(f"knowledge must be one of {KNOWLEDGE}, got {knowledge!r}")
    s = cfg.synth
    k = h.ad_lat.shape[1]
    # attributes that explain all of the ad's variance are its true latent (no residual to infer)
    known_ad = knowledge == "true" or (knowledge == "attributes" and h.attribute_share >= 1.0)
    out = []
    for s_rows, q_rows in zip(ho.support, ho.query, strict=True):
        rows = np.concatenate([s_rows, q_rows])
        ads = np.unique(h.ad[rows])
        mean_ad, var_ad = _ad_prior(h, knowledge, ads)
        if known_ad:
            offset = h.shared[rows]
        else:
            pos = np.searchsorted(ads, h.ad[rows])
            u = h.user_lat[h.user[rows]]
            offset = h.base[rows] + np.einsum("ij,ij->i", u, mean_ad[pos, :k]) + mean_ad[pos, k]
        if not support:
            out.append(_sigmoid(offset[len(s_rows):]))
            continue
        prior_var = np.concatenate([[s.task_bias_scale ** 2], np.full(k, s.task_pref_scale ** 2),
                                    [s.task_slope_scale ** 2]])
        mean0 = np.zeros(k + 2)
        if not known_ad:
            # the ads' terms enter as deviations from their prior mean (already in the offset)
            prior_var = np.concatenate([prior_var, var_ad.ravel()])
            mean0 = np.zeros(len(prior_var))
        x = _design(h, rows, ads, with_ads=not known_ad)
        n_s = len(s_rows)
        theta, cov = _posterior(x[:n_s], h.label[s_rows].astype(np.float64), offset[:n_s], mean0, 1.0 / prior_var)
        xq = x[n_s:]
        m = offset[n_s:] + xq @ theta
        v = np.einsum("ij,jk,ik->i", xq, cov, xq)
        out.append(_sigmoid(m / np.sqrt(1.0 + np.pi * v / 8.0)))
    return np.concatenate(out)


def ceilings(cfg: Config, split: str = "eval", h: Hidden | None = None, support_rows: int | None = None,
             supports: tuple[bool, ...] = (False, True)) -> dict:
    """AUC, GAUC and logloss of every (knowledge, support) predictor (``supports``: which of
    alone and with the support rows) and of the oracle on the query rows of the held-out
    tasks of ``split`` (``support_rows``: their first support rows only)."""
    h = draw(cfg) if h is None else h
    ho = held_out(cfg, h, split, support_rows)
    if not len(ho.tasks):
        raise ValueError(f"no held-out task in split {split!r} (data.split.eval_fraction / val_fraction)")
    q = np.concatenate(ho.query)
    y = h.label[q]
    groups = np.repeat(ho.tasks, [len(r) for r in ho.query])

    def scores(p: np.ndarray) -> dict[str, float]:
        return {"auc": auc(y, p), "gauc": gauc(y, p, groups), "logloss": logloss(y, p)}

    res: dict = {"split": split, "campaigns": int(len(ho.tasks)), "query_rows": int(len(q)),
                 "attribute_share": h.attribute_share, "oracle": scores(h.p_true[q]), "predictors": {}}
    for knowledge in KNOWLEDGE:
        for support in supports:
            name = f"{knowledge}{'+support' if support else ''}"
            res["predictors"][name] = scores(predict(cfg, h, ho, knowledge, support))
    return res


def warmup_ceilings(cfg: Config, split: str = "eval", h: Hidden | None = None) -> dict:
    """The ceilings at each stage of the warm-up protocol (``data.split.rule: warmup``): the
    cold stage from ``ceilings`` with no support row (the knowledge alone), then the Bayesian
    predictors given each new ad's first K, 2K, 3K warm-up rows; the same test rows at every
    stage."""
    sp = cfg.data.split
    if sp.rule != "warmup":
        raise ValueError(f"data.split.rule {sp.rule!r}: the warm-up ceilings need rule warmup")
    h = draw(cfg) if h is None else h
    stages = {"cold": 0, "a": sp.warmup_rows, "a+b": 2 * sp.warmup_rows, "a+b+c": 3 * sp.warmup_rows}
    out: dict = {"split": split, "warmup_rows": sp.warmup_rows, "attribute_share": h.attribute_share, "stages": {}}
    for stage, k in stages.items():
        res = ceilings(cfg, split, h, support_rows=k, supports=(k > 0,))  # only the predictors shown
        out["tasks"], out["query_rows"], out["oracle"] = res["campaigns"], res["query_rows"], res["oracle"]
        out["stages"][stage] = {kn: res["predictors"][kn if k == 0 else f"{kn}+support"] for kn in KNOWLEDGE}
    return out


def warmup_table(res: dict) -> str:
    """The figures of ``warmup_ceilings`` as Markdown: AUC and GAUC per knowledge and stage."""
    stages = list(res["stages"])
    lines = [f"New ads of split {res['split']} ({res['tasks']:,} ads, {res['query_rows']:,} test rows); attributes "
             f"explain {res['attribute_share']:.0%} of an ad's latent variance; cold: the knowledge alone, then "
             f"given the first {', '.join(str(i * res['warmup_rows']) for i in range(1, len(stages)))} warm-up rows",
             "", "| the new ad known by | " + " | ".join(f"{s} AUC" for s in stages) + " | "
             + " | ".join(f"{s} GAUC" for s in stages) + " |", "|---|" + "---|" * (2 * len(stages))]
    for kn in KNOWLEDGE:
        cells = [f"{res['stages'][s][kn][m]:.4f}" for m in ("auc", "gauc") for s in stages]
        lines.append(f"| {KNOWLEDGE_LABEL[kn]} | " + " | ".join(cells) + " |")
    o = res["oracle"]
    lines.append(f"| oracle (true probabilities) | {o['auc']:.4f} | | | | {o['gauc']:.4f} | | | |")
    return "\n".join(lines)


def table(res: dict) -> str:
    """The figures of ``ceilings`` as a Markdown table."""
    pr = res["predictors"]
    lines = [
        f"New ads of the {res['campaigns']:,} campaigns of split {res['split']} "
        f"({res['query_rows']:,} query rows); attributes explain {res['attribute_share']:.0%} "
        "of an ad's latent variance",
        "",
        "| the new ad known by | alone: AUC | GAUC | + support rows: AUC | GAUC |",
        "|---|---|---|---|---|",
    ]
    for knowledge in KNOWLEDGE:
        a, b = pr[knowledge], pr[f"{knowledge}+support"]
        lines.append(f"| {KNOWLEDGE_LABEL[knowledge]} | {a['auc']:.4f} | {a['gauc']:.4f} | "
                     f"{b['auc']:.4f} | {b['gauc']:.4f} |")
    o = res["oracle"]
    lines.append(f"| oracle (true probabilities) | {o['auc']:.4f} | {o['gauc']:.4f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gmeta.evaluation.ceiling", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="an ads-CVR config (its synth, features.task_key and "
                    "data.split sections; under data.split.rule warmup, the ceilings of each stage)")
    ap.add_argument("--split", choices=("eval", "val"), default="eval", help="the held-out campaigns to score")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides)
    warmup = cfg.data.split.rule == "warmup"
    res = warmup_ceilings(cfg, args.split) if warmup else ceilings(cfg, args.split)
    print(warmup_table(res) if warmup else table(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
