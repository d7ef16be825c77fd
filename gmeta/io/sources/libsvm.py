"""libSVM / libFM text files (``data.source.format`` libsvm, libfm)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from gmeta.config import Config
from gmeta.io.sources.base import BATCH_ROWS, Batch, Source, SourceError, estimate_bytes, head_lines, is_number


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
        lines = head_lines(path)
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
            bad = next(i for i, v in enumerate(label_text.to_pylist()) if not is_number(v))
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
            i = next(i for i in range(len(k)) if not (k[i].lstrip("-").isdigit() and is_number(v[i])))
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


