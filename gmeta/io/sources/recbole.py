"""RecBole atomic files (``data.source.format`` recbole): typed, tab-separated
``.inter`` / ``.user`` / ``.item`` files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from gmeta.io.sources.base import SourceError, read_or_raise, split_field

_RECBOLE_TYPES = {"token": pa.string(), "float": pa.float64(), "token_seq": pa.string(), "float_seq": pa.string()}


def read_atomic(path: Path) -> pa.Table:
    """One RecBole atomic file -> a table with the header's names and types."""
    try:
        with open(path, encoding="utf-8") as fh:
            header = fh.readline().rstrip("\r\n").split("\t")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read: {e}") from None
    names, kinds = [], []
    for i, field in enumerate(header):
        name, sep, kind = field.rpartition(":")
        if not sep or not name or kind not in _RECBOLE_TYPES:
            raise SourceError(f"{path}: header field {i + 1} {field!r} is not name:type with type one of "
                              f"{sorted(_RECBOLE_TYPES)} (RecBole atomic-file header)")
        names.append(name)
        kinds.append(kind)
    if len(set(names)) != len(names):
        raise SourceError(f"{path}: header repeats a column name: {names}")
    table = read_or_raise(path, lambda p: pacsv.read_csv(
        p, read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types=dict(zip(names, [_RECBOLE_TYPES[k] for k in kinds])),
                                             strings_can_be_null=False)))
    for name, kind in zip(names, kinds):
        if kind.endswith("_seq"):
            col = split_field(pc.utf8_trim_whitespace(table.column(name)), " ")
            if kind == "float_seq":
                try:
                    col = col.cast(pa.list_(pa.float64()))
                except pa.ArrowInvalid as e:
                    raise SourceError(f"{path}: column {name!r} (float_seq) holds a non-number: {e}") from None
            table = table.set_column(names.index(name), name, col)
    return table


def join_on(left: pa.Table, right: pa.Table, key: str, where: str) -> pa.Table:
    """Left join of ``right``'s columns on ``key`` (a missing match gives nulls).

    Arrow's own hash join does not carry list columns (genres, titles), so the join is a
    take() through a pandas index of the right side's keys."""
    keys = right.column(key).to_numpy(zero_copy_only=False)
    index = pd.Index(keys)
    if not index.is_unique:
        dup = index[index.duplicated()][0]
        raise SourceError(f"{where}: {key} {dup!r} appears more than once")
    pos = index.get_indexer(left.column(key).to_numpy(zero_copy_only=False))
    take = pa.array(pos, mask=pos < 0)
    for name in right.column_names:
        if name != key and name not in left.column_names:
            left = left.append_column(name, right.column(name).take(take))
    return left


def atomic_files(path: Path) -> dict[str, Path]:
    if not path.is_dir():
        raise SourceError(f"{path}: expected a directory of RecBole atomic files (data.raw_dir)")
    inter = sorted(path.glob("*.inter"))
    if len(inter) != 1:
        raise SourceError(f"{path}: expected one <name>.inter file, found {[p.name for p in inter]}")
    stem = inter[0].with_suffix("")
    found = {"inter": inter[0]}
    for kind in ("user", "item"):
        p = stem.with_suffix(f".{kind}")
        if p.is_file():
            found[kind] = p
    return found


def read_recbole(path: Path) -> pa.Table:
    """Interactions with the user and item features joined in (on each side file's first column)."""
    files = atomic_files(path)
    table = read_atomic(files["inter"])
    for kind in ("user", "item"):
        if kind in files:
            side = read_atomic(files[kind])
            key = side.column_names[0]
            if key not in table.column_names:
                raise SourceError(f"{files[kind]}: its first column {key!r} is not a column of {files['inter'].name}")
            table = join_on(table, side, key, str(files[kind]))
    return table


