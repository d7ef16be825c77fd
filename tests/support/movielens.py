"""MovieLens-shaped inputs written in their real formats (ML-100K, ML-1M, RecBole atomic
files) from one small generated data set, for the source, input and cold-start tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gmeta.io.sources import ML100K_GENRES

ROOT = Path(__file__).resolve().parents[2]
ML_CONFIG = ROOT / "configs" / "movielens.yaml"

# users with 5 ratings (too few), 13..40 (kept) and 120 (too many) under the 13..100 rule
RATING_COUNTS = [5, 5] + list(range(13, 41)) + [120]
OCCUPATIONS = ["technician", "writer", "student", "other"]


def make_data(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ratings = []
    for u, n in enumerate(RATING_COUNTS, start=1):
        items = rng.choice(np.arange(1, 151), size=n, replace=False)
        ts = 880000000 + np.sort(rng.integers(0, 5000, size=n))
        ts[n // 2] = ts[n // 2 - 1]  # a tie, as users rate several movies at once
        for i, t in zip(items, ts):
            ratings.append((u, int(i), int(rng.integers(1, 6)), int(t)))
    users = [(u, int(rng.integers(15, 70)), "MF"[u % 2], OCCUPATIONS[u % 4], f"{55100 + u:05d}")
             for u in range(1, len(RATING_COUNTS) + 1)]
    items = []
    for i in range(1, 151):
        flags = (rng.random(len(ML100K_GENRES)) < 0.15).astype(int)
        flags[int(rng.integers(1, len(ML100K_GENRES)))] = 1
        year = "" if i == 7 else str(1930 + i % 68)  # one movie without a release date
        items.append((i, f"Film {i} é" if i % 10 == 0 else f"Film {i}", year, flags))
    return {"ratings": ratings, "users": users, "items": items}


def write_ml100k(d: Path, data: dict) -> Path:
    d.mkdir(parents=True)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in data["ratings"]))
    (d / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in data["users"]))
    lines = []
    for i, title, year, flags in data["items"]:
        date = f"01-Jan-{year}" if year else ""
        url = f"http://us.imdb.com/M/title-exact?Film%20{i}"
        name = f"{title} ({year})" if year else title  # (u.item's "unknown" movie has neither date nor year)
        lines.append(f"{i}|{name}|{date}||{url}|" + "|".join(map(str, flags)) + "\n")
    (d / "u.item").write_bytes("".join(lines).encode("latin-1"))
    (d / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(ML100K_GENRES)) + "\n")
    return d


def write_ml1m(d: Path, data: dict) -> Path:
    d.mkdir(parents=True)
    (d / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in data["ratings"]))
    (d / "users.dat").write_text("".join(f"{u}::{g}::{a}::{k % 21}::{z}-1234\n"
                                         for k, (u, a, g, _, z) in enumerate(data["users"])))
    lines = []
    for i, title, year, flags in data["items"]:
        genres = "|".join(g for g, f in zip(ML100K_GENRES, flags) if f)
        lines.append(f"{i}::{title}: The Sequel ({year})::{genres}\n" if year else f"{i}::{title}::{genres}\n")
    (d / "movies.dat").write_bytes("".join(lines).encode("latin-1"))
    return d


def write_recbole(d: Path, data: dict, name: str = "ml-tiny") -> Path:
    d.mkdir(parents=True)
    (d / f"{name}.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                     + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in data["ratings"]))
    (d / f"{name}.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                                    + "".join(f"{u}\t{a}\t{g}\t{o}\t{z}\n" for u, a, g, o, z in data["users"]))
    rows = []
    for i, title, year, flags in data["items"]:
        genres = " ".join(g for g, f in zip(ML100K_GENRES, flags) if f)
        rows.append(f"{i}\t{title}\t{year}\t{genres}\n")
    (d / f"{name}.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                    + "".join(rows), encoding="utf-8")
    return d
