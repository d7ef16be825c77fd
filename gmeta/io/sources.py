"""Raw inputs of ``gmeta prepare`` (``data.source``): row-level logs as Arrow batches.

- Row-level files (``parquet``, ``csv``, ``tsv``; ``auto`` picks by suffix): CTR logs in the
  style of Criteo or Avazu, whose columns the config's ``features`` section declares. CSV/TSV
  may have no header (``data.source.column_names``) and hold multi-hot ids in one field.
  Streamed in batches: memory stays near one batch whatever the input's size.
- ``movielens``: the MovieLens files as distributed, read into one table per data set:

  ====================  ============  ===================================================
  column                type          from
  ====================  ============  ===================================================
  user_id, item_id      int64         ratings (the task key is user_id)
  rating                float32       ratings, 1 to 5 (the label for regression)
  click                 int64         rating >= data.source.click_threshold (binary label)
  timestamp             int64         ratings, seconds since 1970
  gender                string        users ("M"/"F")
  age                   string        users: years (ML-100K) or the age-bracket code (ML-1M)
  occupation            string        users: name (ML-100K) or code (ML-1M)
  zip3                  string        users: first 3 characters of the zip code
  genres                list<string>  items: the movie's genres
  year                  string        items: release year ("unknown" if none)
  title_words           list<string>  items: the title's words, lowercased, without the year
  age_norm              float32       age / 100 (ML-1M: the bracket's lower bound / 100)
  year_norm             float32       (release year - 1900) / 100, the mean if unknown
  ====================  ============  ===================================================

  Three layouts are recognised in ``data.raw_dir``: ML-100K (``u.data``, ``u.user``,
  ``u.item``: tab- and ``|``-separated, Latin-1), ML-1M (``ratings.dat``, ``users.dat``,
  ``movies.dat``: ``::``-separated, Latin-1) and RecBole atomic files of a MovieLens set
  (``<name>.inter``, ``.user``, ``.item``).
- ``recbole``: any data set in RecBole's atomic-file format: tab-separated files with a
  typed header (``user_id:token  item_id:token  rating:float  ...``). Columns keep the
  header's names; ``token`` is read as a string, ``float`` as float64, ``token_seq`` as a
  list of strings (space-separated), ``float_seq`` as a list of float64. The ``.user`` and
  ``.item`` files are joined in on their first column.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gmeta.config import Config, SourceConfig
from gmeta.storage import is_url, location, source

BATCH_ROWS = 8192
_ROW_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}


class SourceError(ValueError):
    """Raw input that cannot be read. The message names the file (and line or column).
    (gmeta.io.prepare re-raises it as a PrepareError.)"""


@dataclass
class Batch:
    """Rows of one input file: ``table`` holds ``columns``; its row i is line
    ``first_line + i`` of ``where`` (text formats; 1-based, blank lines not counted) or row
    ``first_row + i`` of the file (Parquet: ``first_line`` is None)."""

    where: str
    table: pa.Table
    first_row: int = 0
    first_line: int | None = None
    lines: np.ndarray | None = None  # the line of every row, where blank lines come between rows

    def locate(self, i: int) -> str:
        """``file: line N`` (or ``row N``) of the batch's row ``i``."""
        if self.lines is not None:
            return f"{self.where}: line {int(self.lines[i])}"
        if self.first_line is not None:
            return f"{self.where}: line {self.first_line + i}"
        return f"{self.where}: row {self.first_row + i}"


class Source:
    """Row-level input: its column names and Arrow types, and its rows in batches."""

    def __init__(self, where: str, schema: pa.Schema) -> None:
        self.where, self.schema = where, schema

    @property
    def names(self) -> list[str]:
        return list(self.schema.names)

    def batches(self, columns: list[str]) -> Iterator[Batch]:
        """Batches of ``columns`` in input order, each from one file."""
        raise NotImplementedError

    def estimate(self, columns: list[str]) -> tuple[int, int]:
        """(bytes the input takes decoded in Arrow, rows; 0 if unknown)."""
        raise NotImplementedError


class TableSource(Source):
    """A table built in memory (the MovieLens and RecBole readers), row i being line
    ``first_line + i`` of the file ``where`` (its ratings / interactions file)."""

    def __init__(self, where: str, table: pa.Table, first_line: int = 1) -> None:
        super().__init__(where, table.schema)
        self.table, self.first_line = table, first_line

    def batches(self, columns: list[str]) -> Iterator[Batch]:
        t = self.table.select(columns)
        for lo in range(0, t.num_rows, BATCH_ROWS):
            yield Batch(self.where, t.slice(lo, BATCH_ROWS), lo, self.first_line + lo)

    def estimate(self, columns: list[str]) -> tuple[int, int]:
        return self.table.select(columns).nbytes, self.table.num_rows


class FileSource(Source):
    """Parquet, CSV or TSV files, streamed one row group (or CSV block) at a time: no
    pre-buffering or read-ahead, so memory stays near one batch.

    CSV/TSV headers are decided per file (``data.source.header``, :func:`header_lines`):
    a first line that looks like data where a header is expected, or like a header where
    data is, is an error naming the file, never a silently lost or misnamed row."""

    def __init__(self, where: str, files: list[Path], kind: str, cfg: Config) -> None:
        self.files, self.kind, self.src = files, kind, cfg.data.source
        self.skip: dict[Path, int] = {}  # CSV/TSV: header lines of each file (0 or 1)
        if kind == "parquet":
            schema = _read(files[0], _parquet_schema)
        else:
            names = None
            for path in files:
                self.skip[path], header = header_lines(path, self.src, self._delimiter())
                if not self.src.column_names:
                    if names is None:
                        names = header
                    elif header != names:
                        raise SourceError(f"{path}: header {header[:8]} differs from that of {files[0]} "
                                          f"{names[:8]}")
            self.column_names = list(self.src.column_names) or names
            try:
                with pacsv.open_csv(files[0], read_options=self._read_options(files[0]),
                                    parse_options=self._parse_options()) as r:
                    schema = _text_types(r.schema, cfg)
            except pa.ArrowException as e:
                raise self._text_error(files[0], e) from None
            except OSError as e:
                raise SourceError(f"{files[0]}: cannot read: {e}") from None
        super().__init__(where, schema)

    def _delimiter(self) -> str:
        return self.src.delimiter or ("\t" if self.kind == "tsv" else ",")

    def _read_options(self, path: Path) -> pacsv.ReadOptions:
        # the names given explicitly, so a file's header (or its absence) never shifts a row
        return pacsv.ReadOptions(block_size=8 << 20, column_names=self.column_names, skip_rows=self.skip[path])

    def _parse_options(self) -> pacsv.ParseOptions:
        return pacsv.ParseOptions(delimiter=self._delimiter())

    def batches(self, columns: list[str]) -> Iterator[Batch]:
        # every file (and every CSV block) is parsed with the column types of the first
        # file's first block, so a type that changes midway is an error naming the file
        types = {c: self.schema.field(c).type for c in columns}
        for path in self.files:
            where = str(path)
            row = 0
            try:
                if self.kind == "parquet":
                    with source(path) as src:
                        pf = pq.ParquetFile(src, pre_buffer=False, buffer_size=1 << 20)
                        missing = [c for c in columns if c not in pf.schema_arrow.names]
                        if missing:
                            raise SourceError(f"{where}: missing column(s) {missing} (the first file has them)")
                        for b in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False):
                            yield Batch(where, pa.Table.from_batches([b]), row)
                            row += b.num_rows
                else:
                    convert = pacsv.ConvertOptions(include_columns=columns, column_types=types)
                    with pacsv.open_csv(path, read_options=self._read_options(path),
                                        parse_options=self._parse_options(), convert_options=convert) as reader:
                        for b in reader:
                            yield Batch(where, pa.Table.from_batches([b]), row, self.skip[path] + row + 1)
                            row += b.num_rows
            except pa.ArrowException as e:
                if self.kind == "parquet":
                    raise SourceError(f"{where}: cannot read: {e}") from None
                raise self._text_error(path, e) from None

    def _text_error(self, path: Path, e: Exception) -> SourceError:
        line = _csv_error_line(path, self.skip[path], self._delimiter(), len(self.column_names or []), str(e))
        return SourceError(f"{path}{f': line {line}' if line else ''}: cannot read: {e}")

    def estimate(self, columns: list[str]) -> tuple[int, int]:
        """Parquet: rows from the footers times the decoded size per row of the first row
        group; CSV/TSV: 1.5 x the file size, rows unknown."""
        return estimate_bytes(self.files, columns)


_CONVERSION_ERROR = re.compile(r"In CSV column #(\d+): CSV conversion error to .*: invalid value '(.*)'$", re.S)


def _csv_error_line(path: Path, skip: int, delimiter: str, columns: int, message: str) -> int | None:
    """The line where the record Arrow's CSV reader failed on starts (1-based), or None if
    it cannot be told. Arrow's streaming reader names the record's text or the column and
    value, never the line; so, on this error path only, the file is read again with Python's
    csv module (the same quoting rules: a quoted field may span lines) up to the first
    record with another number of fields than ``columns`` (a truncated last line, say), or
    with the value Arrow could not convert in the column it names."""
    m = _CONVERSION_ERROR.search(message)

    def bad(rec: list[str]) -> bool:
        if m:
            col = int(m.group(1))
            return col < len(rec) and rec[col] == m.group(2)
        return len(rec) != columns

    try:
        with pa.input_stream(str(path)) as raw:  # decompressed as Arrow read it
            reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=""),
                                delimiter=delimiter)
            records = 0
            while True:
                start = reader.line_num + 1
                try:
                    rec = next(reader)
                except StopIteration:
                    return None
                except csv.Error:  # e.g. a quoted field cut off by the end of the file
                    return start
                if not rec:  # a blank line: Arrow skips it too
                    continue
                records += 1
                if records > skip and bad(rec):
                    return start
    except (OSError, pa.ArrowException, UnicodeError):
        return None


_SNIFF_BYTES = 1 << 18  # of a text file read to decide on its header
_SNIFF_LINES = 200


def parse_number(text: str) -> float | None:
    """``text`` as a number, or None if it is not one (headers, labels, libSVM tokens)."""
    try:
        return float(text)
    except ValueError:
        return None


def _is_number(text: str) -> bool:
    return parse_number(text) is not None


def _head_lines(path: Path) -> list[str]:
    """The first non-blank lines of a text file (decompressed as pyarrow would)."""
    try:
        with pa.input_stream(str(path)) as f:  # detects .gz/.bz2/... from the extension
            head = f.read(_SNIFF_BYTES)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"{path}: cannot read: {e}") from None
    text = head.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if len(head) == _SNIFF_BYTES:
        lines = lines[:-1]  # the last one may be cut
    return [ln.rstrip("\r") for ln in lines if ln.strip()][:_SNIFF_LINES]


def _first_lines(path: Path, delimiter: str) -> list[list[str]]:
    """The first lines of a CSV/TSV file, split into fields."""
    return list(csv.reader(io.StringIO("\n".join(_head_lines(path))), delimiter=delimiter))


def header_lines(path: Path, src: SourceConfig, delimiter: str) -> tuple[int, list[str]]:
    """(lines to skip, the header's names) of one CSV/TSV file under ``data.source.header``.

    A first line *looks like data* when one of its fields is a number (a column name never
    is), and *like a header* when it equals ``column_names`` or holds text in a column
    whose other lines are all numbers."""
    rows = _first_lines(path, delimiter)
    if not rows:
        return 0, []
    first, rest = rows[0], rows[1:]
    names = list(src.column_names)
    show = ", ".join(repr(v) for v in first[:6]) + (", ..." if len(first) > 6 else "")
    data_like = any(_is_number(v.strip()) for v in first)
    numeric_cols = [j for j in range(len(first))
                    if rest and all(j < len(r) for r in rest)
                    and any(r[j].strip() for r in rest)
                    and all(_is_number(r[j].strip()) for r in rest if r[j].strip())]
    header_like = [v.strip() for v in first] == names or (
        not data_like and any(first[j].strip() for j in numeric_cols))
    if names and len(first) != len(names) and not (src.header is True or header_like):
        raise SourceError(f"{path}: line 1 has {len(first)} fields, data.source.column_names names {len(names)}")
    if src.header is False:
        if header_like:
            raise SourceError(f"{path}: data.source.header is false but the first line looks like a header "
                              f"({show}); set data.source.header: true to skip it")
        return 0, names
    if src.header is True or not names:
        if data_like:
            if src.header is True:
                raise SourceError(f"{path}: data.source.header is true but the first line looks like data "
                                  f"({show}); set data.source.header: false and name the columns in "
                                  "data.source.column_names")
            raise SourceError(f"{path}: the first line looks like data, not a header ({show}): the file seems "
                              "to have no header; name its columns in data.source.column_names "
                              "(data.source.header: auto or false)")
        return 1, [v.strip() for v in first]
    # header auto with column_names: a header only if it is exactly those names
    if [v.strip() for v in first] == names:
        return 1, names
    if header_like:
        raise SourceError(f"{path}: the first line looks like a header ({show}) but is not "
                          f"data.source.column_names {names[:6]}; set data.source.header: true to skip it "
                          "and name the columns by column_names")
    return 0, names


def _text_types(guessed: pa.Schema, cfg: Config) -> pa.Schema:
    """Column types of a CSV/TSV input: Arrow's guess from the first block, made safe for
    the rest of the input. Ids (task key, sparse features) guessed as floats or left empty
    there are read as text (no precision lost above 2^53, no null-typed column), multi-hot
    fields always as text, other empty columns as float64."""
    f = cfg.features
    multi = {s.name for s in f.sparse if s.multi_hot}
    ids = {f.task_key} | {s.name for s in f.sparse if not s.multi_hot}
    fields = []
    for fld in guessed:
        t = fld.type
        if fld.name in multi or (fld.name in ids and (pa.types.is_floating(t) or pa.types.is_null(t))):
            t = pa.string()
        elif pa.types.is_null(t):
            t = pa.float64()
        fields.append(pa.field(fld.name, t))
    return pa.schema(fields)


def estimate_bytes(files: list[Path], columns: list[str]) -> tuple[int, int]:
    rows = 0
    per_row = 0.0
    total_text = 0
    for p in files:
        if p.suffix != ".parquet":
            total_text += p.stat().st_size
            continue
        try:
            with source(p) as src:
                pf = pq.ParquetFile(src)
                rows += pf.metadata.num_rows
                if not per_row and pf.metadata.num_row_groups and pf.metadata.row_group(0).num_rows:
                    sample = pf.read_row_group(0, columns=[c for c in columns if c in pf.schema_arrow.names])
                    per_row = sample.nbytes / sample.num_rows
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"{p}: cannot read Parquet file: {e}") from None
    return int(rows * per_row + 1.5 * total_text), rows


def split_field(text: pa.Array, sep: str) -> pa.Array:
    """Values held in one text field -> a list per row; an empty field is an empty list
    (not [""]), a null stays null."""
    return pc.if_else(pc.equal(text, ""), pa.scalar([], pa.list_(pa.string())), pc.split_pattern(text, sep))


def _parquet_schema(path: Path) -> pa.Schema:
    with source(path) as src:
        return pq.read_schema(src)


def _read(path: Path, fn):
    try:
        return fn(path)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"{path}: cannot read: {e}") from None


def _row_files(path: Path, fmt: str) -> tuple[list[Path], str]:
    """The files of a row-level input and their kind (parquet, csv or tsv)."""
    if not path.exists():
        raise SourceError(f"input not found: {path} (data.raw_dir)")
    if path.is_dir():  # skipping hidden and "_" entries at every level (_SUCCESS, _temporary/, .cache/)
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and (fmt != "auto" or p.suffix in _ROW_SUFFIXES)  # a named format: any extension
                       and not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts))
        if not files:
            what = "files" if fmt != "auto" else " or ".join(sorted(_ROW_SUFFIXES)) + " files"
            raise SourceError(f"{path}: no {what} inside (data.source.format: {fmt})")
    else:
        files = [path]
    kinds = {_ROW_SUFFIXES.get(p.suffix, fmt) for p in files}
    if fmt != "auto":
        return files, fmt
    if len(kinds) > 1 or not kinds <= set(_ROW_SUFFIXES.values()):
        raise SourceError(f"{path}: expected .parquet, .csv or .tsv files of one kind, got "
                          f"{sorted(p.suffix for p in files)[:5]}; set data.source.format")
    return files, kinds.pop()


def open_source(cfg: Config, input_path: str | Path) -> Source:
    """The reader data.source.format names, over ``input_path`` (data.raw_dir): a local
    path, or for Parquet files also an object-store URL."""
    path = location(input_path)
    fmt = cfg.data.source.format
    if is_url(path) and fmt not in ("auto", "parquet"):
        raise SourceError(f"{path}: data.source.format {fmt!r} is read from local files only; from an object "
                          "store gmeta reads Parquet files (data.source.format auto or parquet): copy the input "
                          "to local disk, or convert it")
    if fmt == "movielens":
        return TableSource(str(ratings_file(path)), read_movielens(path, cfg.data.source.click_threshold))
    if fmt == "recbole":
        return TableSource(str(_atomic_files(path)["inter"]), read_recbole(path), first_line=2)
    files, kind = _row_files(path, fmt)
    if is_url(path) and kind != "parquet":
        raise SourceError(f"{path}: {kind} files are read from local disk only; from an object store gmeta "
                          "reads Parquet files: copy the input to local disk, or convert it")
    if kind in ("libsvm", "libfm"):
        return LibsvmSource(str(path), files, cfg)
    return FileSource(str(path), files, kind, cfg)


# --------------------------------------------------------------------------------------
# libSVM / libFM
# --------------------------------------------------------------------------------------


class LibsvmSource(Source):
    """libSVM / libFM text files: ``label idx:val idx:val ...`` per line (whitespace
    separated; an optional ``qid:N`` token gives the column ``qid``). ``data.source.fields``
    maps ranges of indices to columns (see ``LibsvmField``); an index in no range is an
    error naming the file and line, so no feature is dropped unnoticed.

    Parsed block by block with Arrow compute kernels (split, cast, list offsets) and numpy:
    a Python loop per token would take minutes on Criteo-sized files. Arrow's CSV reader
    supplies the blocks of lines (one column, a delimiter that never occurs in the format)
    and decompression; the format itself has no reader in pyarrow."""

    _LINE_SEP = "\x1f"  # the "column" delimiter: never in a libSVM line

    def __init__(self, where: str, files: list[Path], cfg: Config) -> None:
        self.files, self.cfg = files, cfg
        self.fields = list(cfg.data.source.fields)
        multi = {s.name for s in cfg.features.sparse if s.multi_hot}
        self.multi = {fl.name for fl in self.fields if fl.name in multi}
        label = cfg.features.label
        clash = [fl.name for fl in self.fields if fl.name in (label, "qid")]
        if clash:
            raise SourceError(f"data.source.fields: {clash} is the label or qid column of the format")
        cols = [pa.field(label, pa.float64())]
        if self._has_qid(files[0]):
            cols.append(pa.field("qid", pa.int64()))
        for fl in self.fields:
            t = pa.float64() if fl.kind == "dense" else pa.list_(pa.int64()) if fl.name in self.multi else pa.int64()
            cols.append(pa.field(fl.name, t))
        super().__init__(where, pa.schema(cols))

    def _has_qid(self, path: Path) -> bool:
        lines = _head_lines(path)
        toks = lines[0].split() if lines else []
        return len(toks) > 1 and toks[1].startswith("qid:")

    def estimate(self, columns: list[str]) -> tuple[int, int]:
        return estimate_bytes(self.files, columns)

    def _lines(self, path: Path) -> Iterator[tuple[int, pa.Array]]:
        """(line number of the block's first line, the block's lines), blank lines included."""
        opts = dict(read_options=pacsv.ReadOptions(column_names=["line"], block_size=8 << 20),
                    parse_options=pacsv.ParseOptions(delimiter=self._LINE_SEP, quote_char=False,
                                                     ignore_empty_lines=False),
                    convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()},
                                                         strings_can_be_null=False))
        line = 1
        try:
            with pacsv.open_csv(path, **opts) as reader:
                for b in reader:
                    yield line, b.column(0)
                    line += b.num_rows
        except pa.ArrowException as e:
            raise SourceError(f"{path}: cannot read: {e}") from None

    def batches(self, columns: list[str]) -> Iterator[Batch]:
        for path in self.files:
            row = 0
            for first_line, lines in self._lines(path):
                table, line_no = self._parse(path, first_line, lines, columns)
                for lo in range(0, table.num_rows, BATCH_ROWS):
                    part = table.slice(lo, BATCH_ROWS)
                    yield Batch(str(path), part, row, lines=line_no[lo: lo + part.num_rows])
                    row += part.num_rows

    def _parse(self, path: Path, first_line: int, lines: pa.Array, columns: list[str]):
        texts = pc.utf8_trim_whitespace(lines)
        keep = np.flatnonzero(np.asarray(pc.not_equal(texts, "").to_numpy(zero_copy_only=False), dtype=bool))
        line_no = keep + first_line  # file line of each row
        texts = texts.take(pa.array(keep))
        n = len(texts)

        def at(i: int) -> str:
            return f"{path}: line {int(line_no[i])}"

        tokens = pc.utf8_split_whitespace(texts)
        ntok = pc.list_value_length(tokens).to_numpy().astype(np.int64)
        label_text = pc.list_element(tokens, 0) if n else pa.array([], pa.string())
        out: dict[str, pa.Array] = {}
        try:
            out[self.cfg.features.label] = label_text.cast(pa.float64())
        except pa.ArrowInvalid:
            bad = next(i for i, v in enumerate(label_text.to_pylist()) if not _is_number(v))
            raise SourceError(f"{at(bad)}: label {label_text[bad].as_py()!r} is not a number (libSVM lines "
                              "start with the label)") from None
        rest = pc.list_flatten(pc.list_slice(tokens, 1)) if n else pa.array([], pa.string())
        line_of = np.repeat(np.arange(n), np.maximum(ntok - 1, 0))
        parts = pc.split_pattern(rest, ":", max_splits=1)
        two = pc.list_value_length(parts).to_numpy() == 2
        if not two.all():
            i = int(np.argmax(~two))
            raise SourceError(f"{at(line_of[i])}: token {rest[i].as_py()!r} is not index:value")
        keys = pc.list_element(parts, 0)
        vals = pc.list_element(parts, 1)
        is_qid = np.asarray(pc.equal(keys, "qid").to_numpy(zero_copy_only=False), dtype=bool)
        if "qid" in self.schema.names:
            q_line = line_of[is_qid]
            counts = np.bincount(q_line, minlength=n)
            if n and (counts != 1).any():
                i = int(np.argmax(counts != 1))
                raise SourceError(f"{at(i)}: {counts[i]} qid tokens (the first line of the file has one, so "
                                  "every line must)")
            try:
                qid = np.empty(n, dtype=np.int64)
                qid[q_line] = vals.filter(pa.array(is_qid)).cast(pa.int64()).to_numpy()
            except pa.ArrowInvalid:
                raise SourceError(f"{path}: a qid is not an integer (first lines from {at(0)})") from None
            out["qid"] = pa.array(qid)
        elif is_qid.any():
            i = int(line_of[np.argmax(is_qid)])
            raise SourceError(f"{at(i)}: a qid token, but the file's first line has none")
        feat = ~is_qid
        line_f = line_of[feat]
        try:
            idx = keys.filter(pa.array(feat)).cast(pa.int64()).to_numpy()
            val = vals.filter(pa.array(feat)).cast(pa.float64()).to_numpy()
        except pa.ArrowInvalid:
            k = keys.filter(pa.array(feat)).to_pylist()
            v = vals.filter(pa.array(feat)).to_pylist()
            i = next(i for i in range(len(k)) if not (k[i].lstrip("-").isdigit() and _is_number(v[i])))
            raise SourceError(f"{at(line_f[i])}: token '{k[i]}:{v[i]}' is not index:value (an integer index "
                              "and a number)") from None
        mapped = np.zeros(len(idx), dtype=bool)
        for fl in self.fields:
            m = (idx >= fl.first) & (idx <= fl.last)
            mapped |= m
            if fl.name not in columns:
                continue
            rows = line_f[m]
            counts = np.bincount(rows, minlength=n)
            if fl.kind == "dense" or fl.name not in self.multi:
                if n and counts.max(initial=0) > 1:
                    i = int(np.argmax(counts > 1))
                    raise SourceError(f"{at(i)}: {counts[i]} indices in {fl.first}..{fl.last} "
                                      f"(data.source.fields {fl.name!r}); a single-valued field has at most one "
                                      "(declare a multi-hot feature for several)")
            if fl.kind == "dense":
                dense = np.zeros(n)
                dense[rows] = val[m]  # an absent index is 0 in libSVM
                out[fl.name] = pa.array(dense)
            elif fl.name in self.multi:
                offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
                out[fl.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(idx[m]))
            else:
                ids = np.zeros(n, dtype=np.int64)
                ids[rows] = idx[m]
                out[fl.name] = pa.array(ids, mask=counts == 0)  # absent: a missing id (fill_missing)
        if not mapped.all():
            i = int(np.argmax(~mapped))
            raise SourceError(f"{at(line_f[i])}: index {idx[i]} is in no data.source.fields range")
        table = pa.table({c: out[c] for c in columns if c in out})
        missing = [c for c in columns if c not in out]
        if missing:
            raise SourceError(f"{path}: no column(s) {missing} in libSVM input: its columns are the label "
                              f"({self.cfg.features.label!r}), qid if present, and data.source.fields "
                              f"{[fl.name for fl in self.fields]}")
        return table, line_no


# --------------------------------------------------------------------------------------
# RecBole atomic files
# --------------------------------------------------------------------------------------

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
    table = _read(path, lambda p: pacsv.read_csv(
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


def _join(left: pa.Table, right: pa.Table, key: str, where: str) -> pa.Table:
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


def _atomic_files(path: Path) -> dict[str, Path]:
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
    files = _atomic_files(path)
    table = read_atomic(files["inter"])
    for kind in ("user", "item"):
        if kind in files:
            side = read_atomic(files[kind])
            key = side.column_names[0]
            if key not in table.column_names:
                raise SourceError(f"{files[kind]}: its first column {key!r} is not a column of {files['inter'].name}")
            table = _join(table, side, key, str(files[kind]))
    return table


# --------------------------------------------------------------------------------------
# MovieLens
# --------------------------------------------------------------------------------------

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
    table = _read(path, lambda p: pacsv.read_csv(
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
        return _atomic_files(Path(path))["inter"]
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
        t = _join(_join(t, users, "user_id", str(path / names[1])), items, "item_id", str(path / names[2]))
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
