"""Row-level files in Parquet, CSV and TSV (``data.source.format`` parquet, csv, tsv, or
auto by suffix), streamed one row group or CSV block at a time."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gmeta.config import Config, SourceConfig
from gmeta.io.sources.base import (
    BATCH_ROWS,
    Batch,
    Source,
    SourceError,
    estimate_bytes,
    head_lines,
    is_number,
    read_or_raise,
)
from gmeta.storage import source

_ROW_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}


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
            schema = read_or_raise(files[0], _parquet_schema)
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


def _first_lines(path: Path, delimiter: str) -> list[list[str]]:
    """The first lines of a CSV/TSV file, split into fields."""
    return list(csv.reader(io.StringIO("\n".join(head_lines(path))), delimiter=delimiter))


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
    data_like = any(is_number(v.strip()) for v in first)
    numeric_cols = [j for j in range(len(first))
                    if rest and all(j < len(r) for r in rest)
                    and any(r[j].strip() for r in rest)
                    and all(is_number(r[j].strip()) for r in rest if r[j].strip())]
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


def _parquet_schema(path: Path) -> pa.Schema:
    with source(path) as src:
        return pq.read_schema(src)


def row_files(path: Path, fmt: str) -> tuple[list[Path], str]:
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


