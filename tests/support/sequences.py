"""The debug data with a behaviour sequence per row: ``clicked_ads``, a list of ad ids that
is a function of the row's timestamp, sharing ``ad_id``'s table."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gmeta.config import load_config

MAX_LENGTH = 5
SEQ = f"{{name: clicked_ads, num_embeddings: 2000, multi_hot: true, max_length: {MAX_LENGTH}, table: ad_id}}"


def clicked(ts: int) -> list[int]:
    """The raw sequence of a row, a function of its timestamp: 0 to 8 ids (some longer than
    MAX_LENGTH), ids of the ad_id column's kind."""
    return [50_000_000 + (ts * (k + 3)) % 997 for k in range(ts % 9)]


def seq_overrides(config: Path, extra: str = SEQ) -> list[str]:
    """``features.sparse`` of ``config`` with ``extra`` features appended, as one override."""
    keys = ("name", "num_embeddings", "multi_hot", "pooling")
    feats = [", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}"
                       for k, v in asdict(s).items() if k in keys) for s in load_config(config).features.sparse]
    return ["features.sparse=[" + ", ".join("{" + f + "}" for f in feats) + (", " + extra if extra else "") + "]"]


def with_sequences(raw: Path, out: Path) -> Path:
    """The parquet files of ``raw`` with the ``clicked_ads`` column, written to ``out``."""
    out.mkdir(parents=True)
    for path in sorted(raw.glob("*.parquet")):
        t = pq.read_table(path)
        seqs = [clicked(int(ts)) for ts in t.column("ts").to_pylist()]
        pq.write_table(t.append_column("clicked_ads", pa.array(seqs, pa.list_(pa.int64()))), out / path.name)
    return out
