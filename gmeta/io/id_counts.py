"""How often each (hashed) id occurs in each split: written by ``gmeta prepare`` to
``OUT/id_counts/<feature>.parquet`` (columns ``id`` and one count per split), read by
training to find the ids it never (or rarely) saw, which then share a learned default row
(``features.sparse[].min_count``; ``MetaDLRM.set_known_ids``).

The counts are per table row (hashed id), the unit the model sees. Distinct ids per split
are kept as sorted (id, count) arrays and merged as buckets arrive: memory grows with the
ids that occur, not with the table size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gmeta.config import Config, SparseFeature
from gmeta.io import partitions as parts
from gmeta.io.errors import PrepareError
from gmeta.io.features import salted_hash
from gmeta.storage import location, source

log = logging.getLogger(__name__)

DIR = "id_counts"


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    u, inverse = np.unique(ids, return_inverse=True)
    return u, np.bincount(inverse, weights=counts, minlength=len(u)).astype(np.int64)


class IdCounts:
    """Occurrences of every id per feature and split, accumulated bucket by bucket."""

    def __init__(self, features: list[str], splits: tuple[str, ...]) -> None:
        self.features, self.splits = features, splits
        self.parts: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {
            (f, s): [] for f in features for s in splits}

    def add(self, split: str, feature: str, ids: np.ndarray) -> None:
        if not len(ids):
            return
        parts = self.parts[(feature, split)]
        parts.append(np.unique(ids, return_counts=True))
        if len(parts) > 1:  # one merged pair per (feature, split): memory of the distinct ids only
            parts[:] = [_merge(parts)]

    def counts(self, feature: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        parts = self.parts[(feature, split)]
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        parts[:] = [_merge(parts)]
        return parts[0]

    def unseen(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per feature and held-out split: the share of its distinct ids and of its id
        occurrences that never occur in the train split."""
        return unseen_shares({f: {s: self.counts(f, s) for s in self.splits} for f in self.features},
                             [s for s in self.splits if s != "train"])

    def write(self, out_dir: Path) -> None:
        """One Parquet file per feature: every id that occurs in any split, with its count
        in each split (0 where it does not occur), sorted by id."""
        d = out_dir / DIR
        d.mkdir(parents=True, exist_ok=True)
        for f in self.features:
            per = {s: self.counts(f, s) for s in self.splits}
            ids = np.unique(np.concatenate([p[0] for p in per.values()])) if per else np.zeros(0, np.int64)
            columns = {"id": pa.array(ids, pa.int64())}
            for s, (u, c) in per.items():
                full = np.zeros(len(ids), dtype=np.int64)
                full[np.searchsorted(ids, u)] = c
                columns[s] = pa.array(full)
            pq.write_table(pa.table(columns), d / f"{f}.parquet")


def unseen_shares(counts: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
                  held_out: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per feature and held-out split: the share of its distinct ids and of its id
    occurrences that never occur in the train split. ``counts``: feature -> split ->
    (sorted distinct ids, their counts)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for f, per in counts.items():
        train = per.get("train", (np.zeros(0, np.int64),))[0]
        out[f] = {}
        for s in held_out:
            ids, c = per.get(s, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
            new = ~np.isin(ids, train, assume_unique=True)
            out[f][s] = {"ids": float(new.mean()) if len(ids) else 0.0,
                         "occurrences": float(c[new].sum() / c.sum()) if len(ids) else 0.0}
    return out


def _read(shards_dir: str | Path, feature: str, columns: list[str] | None = None) -> pa.Table:
    path = location(shards_dir) / DIR / f"{feature}.parquet"
    if not path.is_file():
        raise PrepareError(f"{path}: not found; the id counts are written by `gmeta prepare`: prepare the shards "
                           "again with this version of gmeta")
    with source(path) as src:
        return pq.read_table(src, columns=columns)


def merged_counts(dirs: list[Path], feature: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split -> (sorted distinct ids, occurrences) of one feature over several prepared
    data sets (the partitions of a selection): the counts of each summed, exactly."""
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for d in dirs:
        t = _read(d, feature)
        ids = t.column("id").to_numpy()
        for split in t.column_names[1:]:
            c = t.column(split).to_numpy()
            parts.setdefault(split, []).append((ids[c > 0], c[c > 0]))
    return {s: _merge(p) for s, p in parts.items()}


def read_all_ids(shards_dir: str | Path, feature: str) -> np.ndarray:
    """Every (hashed) id of ``feature`` that occurs in any split, sorted."""
    return _read(shards_dir, feature, ["id"]).column("id").to_numpy()


def train_counts(shards_dir: str | Path, feature: str, partitions: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(ids, occurrences in the train split) of one feature, from what prepare wrote; over
    the partitions ``partitions`` selects of a partitioned data set (``data.partitions``)."""
    root = location(shards_dir)
    if parts.is_partitioned(root):
        chosen = parts.select(root, partitions)
        return merged_counts([parts.partition_dir(root, n) for n in chosen], feature).get(
            "train", (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    t = _read(root, feature, ["id", "train"])
    ids, counts = t.column("id").to_numpy(), t.column("train").to_numpy()
    return ids[counts > 0], counts[counts > 0]


def known_ids(cfg: Config) -> dict[str, torch.Tensor]:
    """``known_mask`` of every feature with a default row (``features.sparse[].min_count``),
    logging what share of the training occurrences the default row takes."""
    out = {}
    for i, sf in enumerate(cfg.features.sparse):
        if sf.min_count <= 0 and sf.holdout_share <= 0:
            continue
        mask = known_mask(cfg.data.shards_dir, sf, cfg.data.partitions)
        ids, counts = train_counts(cfg.data.shards_dir, sf.name, cfg.data.partitions)
        mapped = int(counts[~mask[ids]].sum())
        share = mapped / max(1, int(counts.sum()))
        if mapped == 0:
            log.warning("features.sparse[%d] (%s): no training id maps to the default row (min_count %d, "
                        "holdout_share %g), so it will not learn; raise min_count or set holdout_share",
                        i, sf.name, sf.min_count, sf.holdout_share)
        else:
            log.info("features.sparse[%d] (%s): %d of %d ids seen in training keep their own row; the default row "
                     "takes %.2f%% of the training occurrences", i, sf.name, int(mask.sum()), len(ids), 100 * share)
        out[sf.name] = torch.from_numpy(mask)
    return out


def known_mask(shards_dir: str | Path, feature: SparseFeature, partitions: str = "") -> np.ndarray:
    """Table rows of ``feature`` that keep their own embedding: ids seen at least
    ``min_count`` times in training, less a hashed ``holdout_share`` of them (those train the
    default row, as a new id would use it). [num_embeddings] bool; the rest map to the
    feature's default row."""
    ids, counts = train_counts(shards_dir, feature.name, partitions)
    keep = ids[counts >= max(1, feature.min_count)]
    if feature.holdout_share > 0:
        u = (salted_hash(keep, f"holdout:{feature.name}") >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        keep = keep[u >= feature.holdout_share]
    mask = np.zeros(feature.num_embeddings, dtype=bool)
    mask[keep[keep < feature.num_embeddings]] = True
    return mask
