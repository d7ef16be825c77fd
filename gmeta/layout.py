"""Where every row and every id occurrence of a meta-batch goes, worked out once per batch.

A ``BatchLayout`` holds the index arithmetic of a meta step: the size buckets (tasks
padded to their bucket's largest task), the row -> task map, the deduplicated ids and the
per-(task, feature, id) groups the inner loop adapts. It is built with numpy in the reader's
worker processes (``build_arrays``) and travels inside the batch, so a training step on
the GPU never waits for the host: no ``unique``, ``nonzero``, ``item`` or shape that
depends on values is left for the step to compute.

Deduplicated lookups. The ids sent to the embedding tables are the distinct (feature, id)
pairs of the batch (``unique_ids``; on one ``configs/ads_cvr.yaml`` meta-batch 1,605
for 10,958 occurrences). The looked-up rows ``[U, D]`` are expanded locally:

    rows [U, D] --group_unique--> groups [G, D]: one per distinct (task, feature, id),
                                  the unit a task adapts (its fast embedding row)
    groups      --occ_group-----> occurrences [nnz, D] --slot--> pooled cells [R, C, D]

Cells. A feature takes one cell per row, where its ids are pooled, except a sequence
(``features.sparse[].max_length`` T > 0), which takes T: occurrence i of row r goes to cell
``r * C + base_f + i`` (C cells per row, ``base_f`` the feature's first), one id per cell,
and cells past the sequence's end stay zero. Distinct ids and groups stay per feature: an id
that appears twice in a task's sequences is one group, one fast row. ``num_features`` counts
features (what is per feature: Meta-SGD's rates, ``group_feature``), ``num_cells`` cells
(C: what pooled tensors are made of); they are equal without sequences.

torch.unique would find the groups on the device in one call, but its output size is data
dependent, which is a host sync on a GPU; numpy in the worker costs a few ms per batch
that the worker overlaps with the previous step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def pool(values: torch.Tensor, slot: torch.Tensor, divisor: torch.Tensor, num_rows: int,
         num_cells: int) -> torch.Tensor:
    """Sum (or mean, through ``divisor``) occurrences into cells: -> ``[num_rows, C, D]``."""
    out = values.new_zeros(num_rows * num_cells, values.shape[-1]).index_add(0, slot, values)
    return (out / divisor.unsqueeze(-1)).view(num_rows, num_cells, -1)


def _padded(offsets: np.ndarray, tasks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts, counts = offsets[:-1][tasks], (offsets[1:] - offsets[:-1])[tasks]
    width = int(counts.max()) if counts.size else 0
    ar = np.arange(width)
    mask = ar[None, :] < counts[:, None]
    index = np.where(mask, starts[:, None] + ar[None, :], 0)
    return index, mask, counts


def split_points(sizes: list[int], num_buckets: int) -> list[int]:
    """Cut points of ascending ``sizes`` into at most ``num_buckets`` contiguous groups,
    chosen greedily to minimise the padded work sum(len(group) * max(group)): the most
    costly group is split where that saves most, until no split saves anything."""
    cuts = [0, len(sizes)]
    for _ in range(num_buckets - 1):
        best: tuple[int, int | None] = (0, None)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            whole = (hi - lo) * sizes[hi - 1]
            for c in range(lo + 1, hi):
                saved = whole - (c - lo) * sizes[c - 1] - (hi - c) * sizes[hi - 1]
                if saved > best[0]:
                    best = (saved, c)
        if best[1] is None:
            break
        cuts = sorted(cuts + [best[1]])
    return cuts


def build_arrays(values: np.ndarray, lengths: np.ndarray, support_offsets: np.ndarray,
                 query_offsets: np.ndarray, pooling: list[str], num_buckets: int,
                 widths: list[int] | None = None) -> dict[str, np.ndarray]:
    """The layout of one batch as flat numpy arrays (names as in ``BatchLayout``; bucket
    b's arrays are ``b{b}.<name>``). ``values``/``lengths`` are the batch's KJT, feature-
    major (``lengths[f * R + r]`` ids of feature f in row r); ``pooling`` per feature;
    ``widths`` the cells per row of each feature (a sequence's max_length, else 1; None:
    1 each). A row may hold no more ids of a sequence than its width (ValueError)."""
    so, qo = np.asarray(support_offsets, np.int64), np.asarray(query_offsets, np.int64)
    n, nf = len(so) - 1, len(pooling)
    width = np.ones(nf, np.int64) if widths is None else np.asarray(widths, np.int64)
    if width.shape != (nf,) or (width < 1).any():
        raise ValueError(f"cell widths {list(width)}: one per feature ({nf}), each >= 1")
    seq = width > 1
    cell_base = np.cumsum(width) - width
    nc = int(width.sum())
    s_count, q_count = np.diff(so), np.diff(qo)
    num_s, num_q = int(so[-1]), int(qo[-1])
    r_total = num_s + num_q
    lengths = np.asarray(lengths, np.int64).reshape(nf, r_total)
    values = np.asarray(values, np.int64)
    out: dict[str, np.ndarray] = {}

    # size buckets, and the orders that undo them
    size = s_count + q_count
    order = np.argsort(size, kind="stable")
    cuts = split_points(size[order].tolist(), max(1, num_buckets)) if n else [0, 0]
    q_positions, q_rows, base = [], [], 0
    for b, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        tasks = order[lo:hi] if num_buckets > 1 else np.arange(n)
        s_index, s_mask, sc = _padded(so, tasks)
        q_index, q_mask, qc = _padded(qo, tasks)
        out.update({f"b{b}.tasks": tasks, f"b{b}.s_index": s_index, f"b{b}.s_mask": s_mask,
                    f"b{b}.s_count": sc.astype(np.float32), f"b{b}.q_index": q_index, f"b{b}.q_mask": q_mask,
                    f"b{b}.q_count": qc.astype(np.float32)})
        q_positions.append(base + np.flatnonzero(q_mask))
        q_rows.append(q_index[q_mask])
        base += q_mask.size
        if num_buckets <= 1:
            break
    bucket_order = np.concatenate([out[k] for k in out if k.endswith(".tasks")])
    out["task_order"] = np.argsort(bucket_order, kind="stable")  # bucket order -> task order
    query_order = np.zeros(num_q, np.int64)  # padded query slots (all buckets, flattened) -> query-block order
    query_order[np.concatenate(q_rows)] = np.concatenate(q_positions)
    out["query_order"] = query_order
    row_task = np.concatenate([np.repeat(np.arange(n), s_count), np.repeat(np.arange(n), q_count)])
    out["row_task"] = row_task
    out["s_count"], out["q_count"] = s_count.astype(np.float32), q_count.astype(np.float32)

    # occurrences: feature, row and id of every id in the batch
    occ_feature = np.repeat(np.repeat(np.arange(nf), r_total), lengths.reshape(-1))
    occ_row = np.repeat(np.tile(np.arange(r_total), nf), lengths.reshape(-1))
    # distinct ids per feature (the lookup), in feature order
    unique_ids, unique_lengths, occ_unique = [], np.zeros(nf, np.int64), np.empty(len(values), np.int64)
    bounds = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))])
    first = 0
    for f in range(nf):
        u, inv = np.unique(values[bounds[f]:bounds[f + 1]], return_inverse=True)
        unique_ids.append(u)
        unique_lengths[f] = len(u)
        occ_unique[bounds[f]:bounds[f + 1]] = first + inv.reshape(-1)
        first += len(u)
    num_unique = first
    # groups: distinct (task, distinct id)
    key = row_task[occ_row] * max(num_unique, 1) + occ_unique
    gkey, occ_group = np.unique(key, return_inverse=True)
    group_unique = gkey % max(num_unique, 1)
    out["unique_ids"] = np.concatenate(unique_ids) if unique_ids else np.zeros(0, np.int64)
    out["unique_lengths"] = unique_lengths
    out["group_unique"] = group_unique
    out["group_feature"] = np.repeat(np.arange(nf), unique_lengths)[group_unique]
    is_q = occ_row >= num_s
    if seq.any():
        over = lengths[seq] > width[seq][:, None]
        if over.any():
            f, r = np.argwhere(over)[0]
            f = int(np.flatnonzero(seq)[f])
            raise ValueError(f"sequence feature {f} holds {int(lengths[f, r])} ids in row {r}, more than its "
                             f"max_length {int(width[f])} (features.sparse[{f}].max_length)")
        # each occurrence's position within its (feature, row) list: the cell it takes
        flat = lengths.reshape(-1)
        pos = np.arange(len(values)) - np.repeat(np.cumsum(flat) - flat, flat)
        slot = occ_row * nc + cell_base[occ_feature] + np.where(seq[occ_feature], pos, 0)
    else:
        slot = occ_row * nc + occ_feature
    # one id in every cell (single-valued features, full sequences): occurrences in cell
    # order pool by a reshape, with no scatter; else support occurrences first, feature-major
    one_per_cell = bool(len(values) == r_total * nc and (lengths == width[:, None]).all())
    perm = np.argsort(slot, kind="stable") if one_per_cell else \
        np.concatenate([np.flatnonzero(~is_q), np.flatnonzero(is_q)])
    out["occ_unique"] = occ_unique[perm]
    out["occ_group"] = occ_group.reshape(-1)[perm]
    out["slot"] = slot[perm]  # cell of the whole batch, row * C + cell
    out["slot_q"] = slot[perm][int((~is_q).sum()):] - num_s * nc  # cell of the query block
    # divisor per cell, row-major like slot: the length for mean pooling (an exact integer,
    # divided in the compute dtype), 1 for sum and for a sequence's cells
    divisor = np.ones((r_total, nc), np.float32)
    for f, mode in enumerate(pooling):
        if mode == "mean" and not seq[f]:
            divisor[:, cell_base[f]] = np.maximum(lengths[f], 1)
    out["divisor"] = divisor.reshape(-1)
    out["unique_offsets"] = np.concatenate([[0], np.cumsum(unique_lengths)]).astype(np.int64)
    out["sizes"] = np.array([num_s, num_q, int((~is_q).sum()), num_unique, len(group_unique), nf,
                             max(1, num_buckets), int(one_per_cell), nc], np.int64)
    return out


@dataclass
class SizeBucket:
    """Index tensors that move rows of some tasks into a padded layout.

    tasks   [N_b]        the tasks (indices into the batch)
    s_index [N_b, S_b]   support row (0..S-1) at each padded slot, 0 where padding
    s_mask  [N_b, S_b]   True at real rows
    s_count [N_b]        support rows per task (float)
    q_index, q_mask, q_count   the same for query rows, indexing the query block (0..Q-1)
    """

    tasks: torch.Tensor
    s_index: torch.Tensor
    s_mask: torch.Tensor
    s_count: torch.Tensor
    q_index: torch.Tensor
    q_mask: torch.Tensor
    q_count: torch.Tensor


_INT_FIELDS = ("num_support", "num_query", "num_support_occurrences", "num_unique", "num_groups", "num_features",
               "requested_buckets", "one_per_cell", "num_cells")


@dataclass
class BatchLayout:
    """The index tensors of one meta-batch (see the module docstring); ints are plain ints.

    buckets        size buckets; with one bucket: all tasks in order
    task_order     [N]   bucket-order position of each task (per-task results back to task order)
    query_order    [Q]   padded query slot (buckets concatenated, flattened) of each query row
    row_task       [R]   task of every row (support rows, then query rows)
    s_count, q_count [N] support / query rows per task (float)
    unique_ids     [U]   the distinct ids of the batch, feature by feature: what is looked up
    unique_lengths [F]   distinct ids per feature
    unique_offsets [F+1] their offsets
    group_unique   [G]   distinct-id index of each (task, feature, id) group
    group_feature  [G]   feature of each group
    occ_unique     [nnz] distinct-id index of each occurrence (support occurrences first)
    occ_group      [nnz] group of each occurrence
    slot           [nnz] pooled cell (row * C + cell) of each occurrence
    slot_q         [nnz_q] the cell of each query occurrence within the query block
    divisor        [R*C] pooling divisor per cell (1 for sum, the length for mean)
    num_features   F, the features; num_cells C, the cells of a row (F without sequences)
    """

    buckets: list[SizeBucket]
    task_order: torch.Tensor
    query_order: torch.Tensor
    row_task: torch.Tensor
    s_count: torch.Tensor
    q_count: torch.Tensor
    unique_ids: torch.Tensor
    unique_lengths: torch.Tensor
    unique_offsets: torch.Tensor
    group_unique: torch.Tensor
    group_feature: torch.Tensor
    occ_unique: torch.Tensor
    occ_group: torch.Tensor
    slot: torch.Tensor
    slot_q: torch.Tensor
    divisor: torch.Tensor
    num_support: int
    num_query: int
    num_support_occurrences: int
    num_unique: int
    num_groups: int
    num_features: int
    requested_buckets: int  # the num_buckets asked for (a batch may need fewer)
    one_per_cell: int  # 1: exactly one id per cell, occurrences in cell order
    num_cells: int

    def pool(self, values: torch.Tensor, slot: torch.Tensor, divisor: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Occurrence embeddings (in this layout's order) -> pooled cells ``[num_rows, C, D]``:
        a reshape when every cell holds one id, else a sum (or mean) by scatter."""
        if self.one_per_cell:
            return values.view(num_rows, self.num_cells, -1)
        return pool(values, slot, divisor, num_rows, self.num_cells)
    unique_per_key: list[int]

    @staticmethod
    def from_arrays(arrays: Mapping[str, np.ndarray | torch.Tensor]) -> BatchLayout:
        t = {k: torch.as_tensor(v) for k, v in arrays.items()}
        nb = sum(1 for k in t if k.endswith(".tasks"))
        buckets = [SizeBucket(*(t[f"b{b}.{f.name}"] for f in fields(SizeBucket))) for b in range(nb)]
        sizes = [int(x) for x in np.asarray(arrays["sizes"])]
        plain: dict[str, Any] = {f.name: t[f.name] for f in fields(BatchLayout) if f.name in t}
        ints: dict[str, Any] = dict(zip(_INT_FIELDS, sizes))
        return BatchLayout(buckets=buckets, **plain, **ints,
                           unique_per_key=[int(x) for x in np.asarray(arrays["unique_lengths"])])

    @property
    def num_rows(self) -> int:
        return self.num_support + self.num_query

    def in_order(self) -> tuple[bool, bool]:
        """Whether the one size bucket's padded support (query) index is every support
        (query) row in order, ``arange(R).view(N, W)``: then a reshape moves rows into it,
        and no gather (and no scatter in its backward) is needed. Known from shapes alone,
        without reading the index: a bucket of all tasks with no padded slot (each task has
        W rows) takes them in order when one bucket was asked for, or when every task has
        the same size, support and query (``build_arrays``'s stable sort keeps their order)."""
        if len(self.buckets) != 1:
            return False, False
        b = self.buckets[0]
        full_s, full_q = b.s_index.numel() == self.num_support, b.q_index.numel() == self.num_query
        ordered = self.requested_buckets == 1 or (full_s and full_q)
        return ordered and full_s, ordered and full_q

    def key_span(self, feature: int) -> tuple[int, int]:
        """Where feature ``feature``'s distinct ids lie among all of them ([U], features in
        order): ``[lo, hi)``."""
        lo = sum(self.unique_per_key[:feature])
        return lo, lo + self.unique_per_key[feature]

    def kjt(self, keys: list[str]) -> KeyedJaggedTensor:
        """The distinct ids as a KeyedJaggedTensor of one row per feature (stride 1), with
        its per-key lengths given so that torchrec need not read them from the device."""
        offset_per_key = [0]
        for n in self.unique_per_key:
            offset_per_key.append(offset_per_key[-1] + n)
        return KeyedJaggedTensor(keys=keys, values=self.unique_ids, lengths=self.unique_lengths,
                                 offsets=self.unique_offsets, stride=1,
                                 length_per_key=list(self.unique_per_key), offset_per_key=offset_per_key)

    def _map(self, fn) -> BatchLayout:
        kwargs = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "buckets":
                v = [SizeBucket(*(fn(getattr(b, g.name)) for g in fields(SizeBucket))) for b in v]
            elif torch.is_tensor(v):
                v = fn(v)
            kwargs[f.name] = v
        return BatchLayout(**kwargs)

    def to(self, device: torch.device | None = None, non_blocking: bool = False) -> BatchLayout:
        return self._map(lambda v: v.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> BatchLayout:
        return self._map(lambda v: v.pin_memory())

    def record_stream(self, stream: torch.Stream) -> None:
        self._map(lambda v: v.record_stream(stream) or v)


def cell_widths(features: Sequence[Mapping]) -> list[int]:
    """Cells per row of each feature (``build_arrays``' ``widths``): a sequence's
    ``max_length``, else 1."""
    return [f.get("max_length", 0) or 1 for f in features]


def layout_of(batch, pooling: list[str], num_buckets: int, widths: list[int] | None = None) -> BatchLayout:
    """The batch's own layout when it has one built for ``num_buckets`` buckets and these
    cell ``widths`` (``build_arrays``), else one built now from its tensors (on the host: for
    batches made outside the reader)."""
    lay = getattr(batch, "layout", None)
    cells = len(pooling) if widths is None else sum(widths)
    if lay is not None and lay.requested_buckets == max(1, num_buckets) and lay.num_cells == cells:
        return lay
    kjt = batch.sparse
    arrays = build_arrays(kjt.values().cpu().numpy(), kjt.lengths().cpu().numpy(),
                          batch.support_offsets.cpu().numpy(), batch.query_offsets.cpu().numpy(), pooling,
                          num_buckets, widths)
    return BatchLayout.from_arrays(arrays).to(batch.labels.device)
