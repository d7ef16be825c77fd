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

One module per format behind one interface (``base.Source``): ``files`` (Parquet, CSV,
TSV), ``libsvm``, ``recbole``, ``movielens``. A new format is one new module whose reader
``open_source`` dispatches to by its ``data.source.format`` name.

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers, gmeta.models.heads, gmeta.config.
"""

from __future__ import annotations

from pathlib import Path

from gmeta.config import Config
from gmeta.io.sources.base import (
    BATCH_ROWS,
    Batch,
    Source,
    SourceError,
    TableSource,
    estimate_bytes,
    parse_number,
    split_field,
)
from gmeta.io.sources.files import FileSource, header_lines, row_files
from gmeta.io.sources.libsvm import LibsvmSource
from gmeta.io.sources.movielens import ML100K_GENRES, ratings_file, read_movielens, title_words
from gmeta.io.sources.recbole import atomic_files, read_recbole
from gmeta.storage import is_url, location

__all__ = ["BATCH_ROWS", "ML100K_GENRES", "Batch", "FileSource", "LibsvmSource", "Source", "SourceError", "TableSource",
           "estimate_bytes", "header_lines", "open_source", "parse_number", "read_movielens", "read_recbole",
           "split_field", "title_words"]


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
        return TableSource(str(atomic_files(path)["inter"]), read_recbole(path), first_line=2)
    files, kind = row_files(path, fmt)
    if is_url(path) and kind != "parquet":
        raise SourceError(f"{path}: {kind} files are read from local disk only; from an object store gmeta "
                          "reads Parquet files: copy the input to local disk, or convert it")
    if kind in ("libsvm", "libfm"):
        return LibsvmSource(str(path), files, cfg)
    return FileSource(str(path), files, kind, cfg)


