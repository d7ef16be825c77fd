"""The reader interface every input format implements (``Source``: column names and
Arrow types, rows in ``Batch``es) and what several formats share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gmeta.storage import source

BATCH_ROWS = 8192


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


_SNIFF_BYTES = 1 << 18  # of a text file read to decide on its header
_SNIFF_LINES = 200


def parse_number(text: str) -> float | None:
    """``text`` as a number, or None if it is not one (headers, labels, libSVM tokens)."""
    try:
        return float(text)
    except ValueError:
        return None


def is_number(text: str) -> bool:
    return parse_number(text) is not None


def head_lines(path: Path) -> list[str]:
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


def read_or_raise(path: Path, fn):
    try:
        return fn(path)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"{path}: cannot read: {e}") from None


