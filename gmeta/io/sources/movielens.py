"""MovieLens as distributed (``data.source.format`` movielens): ML-100K, ML-1M and RecBole
atomic files of a MovieLens set, read into one canonical table (columns: the package's
docstring)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from gmeta.io.sources.base import SourceError, read_or_raise
from gmeta.io.sources.recbole import atomic_files, join_on, read_recbole

# ML-100K's u.item genre flags, in file order (u.genre lists the same)
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]


def _lines(path: Path, sep: str, fields: int) -> list[list[str]]:
    """Records of a small Latin-1 file with a multi-character or quote-free separator
    (``::``, ``|``); each must have ``fields`` fields. (Arrow's CSV reader takes one-character
    separators only and treats quotes in titles as quoting.)"""
    try:
        text = path.read_text(encoding="latin-1")
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e}") from None
    out = []
    # split on newlines only: str.splitlines() would also split on \x85, \x0b, \x1c-\x1e,
    # which are characters of Latin-1 titles
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) < fields:
            raise SourceError(f"{path}: line {n} has {len(parts)} fields separated by {sep!r}, expected {fields}")
        out.append(parts)
    return out


def _int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SourceError(f"{path}: {what} {value!r} is not an integer") from None


def _ratings(path: Path, sep: str) -> pa.Table:
    """user_id, item_id, rating, timestamp of u.data (tab) or ratings.dat (``::``, read as
    ``:`` with the empty fields between dropped: Arrow parses a million rows in C++)."""
    n_cols = 4 if sep == "\t" else 7
    names = [f"c{i}" for i in range(n_cols)]
    table = read_or_raise(path, lambda p: pacsv.read_csv(
        p, read_options=pacsv.ReadOptions(column_names=names),
        parse_options=pacsv.ParseOptions(delimiter="\t" if sep == "\t" else ":", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in names})))
    cols = names if sep == "\t" else names[::2]
    out = {}
    for name, col, tp in zip(("user_id", "item_id", "rating", "timestamp"), cols,
                             (pa.int64(), pa.int64(), pa.float32(), pa.int64())):
        arr = table.column(col)
        empty = pc.equal(arr, "")
        if pc.any(empty).as_py():
            line = int(np.argmax(empty.to_numpy(zero_copy_only=False))) + 1
            raise SourceError(f"{path}: line {line}: field {name} is empty")
        try:
            out[name] = arr.cast(tp)
        except pa.ArrowInvalid as e:
            raise SourceError(f"{path}: field {name}: {e}") from None
    return pa.table(out)


def _users_100k(path: Path) -> pa.Table:
    rows = _lines(path, "|", 5)
    return pa.table({"user_id": [_int(r[0], path, "user id") for r in rows],
                     "age": [r[1].strip() for r in rows], "gender": [r[2].strip() for r in rows],
                     "occupation": [r[3].strip() for r in rows], "zip": [r[4].strip() for r in rows]})


def _items_100k(path: Path) -> pa.Table:
    names = ML100K_GENRES
    genre_file = path.with_name("u.genre")
    if genre_file.is_file():  # the names as the data set lists them, in flag order
        pairs = [r for r in _lines(genre_file, "|", 2)]
        names = [name for name, _ in sorted(((r[0], _int(r[1], genre_file, "genre index")) for r in pairs),
                                            key=lambda x: x[1])]
    rows = _lines(path, "|", 5 + len(names))
    genres = []
    for r in rows:
        flags = r[5: 5 + len(names)]
        genres.append([g for g, f in zip(names, flags) if f.strip() == "1"])
    return pa.table({"item_id": [_int(r[0], path, "movie id") for r in rows],
                     "year": [r[2].strip()[-4:] if r[2].strip() else "" for r in rows],
                     "genres": pa.array(genres, type=pa.list_(pa.string())),
                     "title": [r[1] for r in rows]})


def _users_1m(path: Path) -> pa.Table:
    rows = _lines(path, "::", 5)
    return pa.table({"user_id": [_int(r[0], path, "UserID") for r in rows],
                     "gender": [r[1].strip() for r in rows], "age": [r[2].strip() for r in rows],
                     "occupation": [r[3].strip() for r in rows], "zip": [r[4].strip() for r in rows]})


_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")
_WORD = re.compile(r"[^\W_]+")  # letters and digits, any script: "Don't" -> don, t


def title_words(title: str) -> list[str]:
    """A movie title's distinct words, lowercased, in order, without the trailing "(year)":
    an item attribute (e.g. of an id generator's input)."""
    return list(dict.fromkeys(_WORD.findall(_TITLE_YEAR.sub("", title).lower())))


def _items_1m(path: Path) -> pa.Table:
    rows = _lines(path, "::", 3)
    years, genres = [], []
    for r in rows:
        title = "::".join(r[1:-1])  # a title may itself hold "::"
        m = _TITLE_YEAR.search(title)
        years.append(m.group(1) if m else "")
        genres.append([g for g in r[-1].strip().split("|") if g])
    return pa.table({"item_id": [_int(r[0], path, "MovieID") for r in rows], "year": years,
                     "genres": pa.array(genres, type=pa.list_(pa.string())),
                     "title": ["::".join(r[1:-1]) for r in rows]})


def _recbole_movielens(path: Path) -> pa.Table:
    """RecBole's MovieLens atomic files -> the raw MovieLens columns (RecBole's names:
    zip_code, release_year, class for the genres)."""
    t = read_recbole(path)
    rename = {"zip_code": "zip", "release_year": "year", "class": "genres", "movie_title": "title"}
    t = t.rename_columns([rename.get(n, n) for n in t.column_names])
    need = ["user_id", "item_id", "rating", "timestamp"]
    missing = [c for c in need if c not in t.column_names]
    if missing:
        raise SourceError(f"{path}: the .inter file lacks {missing}: not a MovieLens data set "
                          "(data.source.format: recbole reads any atomic files)")
    out = {}
    for name, tp in (("user_id", pa.int64()), ("item_id", pa.int64()), ("rating", pa.float32()),
                     ("timestamp", pa.int64())):
        try:
            out[name] = t.column(name).cast(tp) if name != "timestamp" else \
                pc.floor(t.column(name).cast(pa.float64())).cast(pa.int64())
        except pa.ArrowInvalid as e:
            raise SourceError(f"{path}: column {name}: {e}") from None
    for name in ("age", "gender", "occupation", "zip", "year"):
        out[name] = t.column(name) if name in t.column_names else pa.nulls(t.num_rows, pa.string())
    out["genres"] = t.column("genres") if "genres" in t.column_names else pa.nulls(t.num_rows, pa.list_(pa.string()))
    title = t.column("title") if "title" in t.column_names else pa.nulls(t.num_rows, pa.string())
    if pa.types.is_list(title.type):  # token_seq: the words as RecBole split them, joined back
        title = pc.binary_join(title, " ")
    out["title"] = title
    return pa.table(out)


def _movielens_layout(path: Path) -> str:
    if not path.is_dir():
        raise SourceError(f"{path}: not a directory (data.raw_dir must hold the MovieLens files)")
    if (path / "u.data").is_file():
        return "ml-100k"
    if (path / "ratings.dat").is_file():
        return "ml-1m"
    if list(path.glob("*.inter")):
        return "recbole"
    raise SourceError(f"{path}: no MovieLens files found: expected u.data, u.user, u.item (ML-100K), "
                      "ratings.dat, users.dat, movies.dat (ML-1M) or <name>.inter, .user, .item (RecBole "
                      "atomic files). The data sets are not shipped with gmeta: download them from GroupLens.")


def ratings_file(path: Path) -> Path:
    """The file of the ratings of a MovieLens directory (the lines rows are counted in)."""
    layout = _movielens_layout(Path(path))
    if layout == "recbole":
        return atomic_files(Path(path))["inter"]
    return Path(path) / ("u.data" if layout == "ml-100k" else "ratings.dat")


def read_movielens(path: Path, click_threshold: float = 4.0) -> pa.Table:
    """Ratings joined with user and item features, in the columns of the module docstring."""
    path = Path(path)
    layout = _movielens_layout(path)
    if layout == "recbole":
        t = _recbole_movielens(path)
    else:
        names = {"ml-100k": ("u.data", "u.user", "u.item"), "ml-1m": ("ratings.dat", "users.dat", "movies.dat")}[layout]
        for n in names:
            if not (path / n).is_file():
                raise SourceError(f"{path / n}: not found ({layout} needs {', '.join(names)})")
        if layout == "ml-100k":
            t = _ratings(path / "u.data", "\t")
            users, items = _users_100k(path / "u.user"), _items_100k(path / "u.item")
        else:
            t = _ratings(path / "ratings.dat", "::")
            users, items = _users_1m(path / "users.dat"), _items_1m(path / "movies.dat")
        t = join_on(join_on(t, users, "user_id", str(path / names[1])), items, "item_id", str(path / names[2]))
    return _canonical(t, click_threshold)


def _canonical(t: pa.Table, click_threshold: float) -> pa.Table:
    """Fill unknown side features, derive click, zip3 and the scaled dense columns."""
    def text(name: str, unknown: str = "") -> np.ndarray:
        return np.asarray(pc.fill_null(t.column(name), unknown).to_pylist(), dtype=object)

    rating = t.column("rating").to_numpy().astype(np.float32)
    age = text("age")
    year = text("year")
    age_num = pd.to_numeric(pd.Series(age), errors="coerce").to_numpy(dtype=np.float64)
    year_num = pd.to_numeric(pd.Series(year), errors="coerce").to_numpy(dtype=np.float64)
    mean_age = np.nanmean(age_num) if np.isfinite(age_num).any() else 0.0
    mean_year = np.nanmean(year_num) if np.isfinite(year_num).any() else 1900.0
    genres = pc.fill_null(t.column("genres").combine_chunks(), pa.scalar([], pa.list_(pa.string())))
    titles, at = np.unique(text("title").astype(str), return_inverse=True)  # each distinct title split once
    words = [title_words(x) for x in titles.tolist()]
    return pa.table({
        "user_id": t.column("user_id"),
        "item_id": t.column("item_id"),
        "rating": pa.array(rating),
        "click": pa.array((rating >= click_threshold).astype(np.int64)),
        "timestamp": t.column("timestamp"),
        "gender": pa.array(text("gender").tolist(), pa.string()),
        "age": pa.array(age.tolist(), pa.string()),
        "occupation": pa.array(text("occupation").tolist(), pa.string()),
        "zip3": pa.array([z[:3] for z in text("zip").tolist()], pa.string()),
        "genres": genres,
        "year": pa.array([y if y else "unknown" for y in year.tolist()], pa.string()),
        "title_words": pa.array(words, pa.list_(pa.string())).take(pa.array(at)),
        "age_norm": pa.array((np.where(np.isfinite(age_num), age_num, mean_age) / 100.0).astype(np.float32)),
        "year_norm": pa.array(((np.where(np.isfinite(year_num), year_num, mean_year) - 1900.0) / 100.0)
                              .astype(np.float32)),
    })
