"""Reading task shards into meta-batches (``TaskBatch``).

The reader is a plain iterator over ``TaskBatch``; prefetching and pipelining wrap it.
Each epoch every rank sees a disjoint, equally long share of the tasks (a global
permutation from ``seed + epoch``, strided by rank), so all ranks run the same number of
steps: a collective never waits on a rank that has run out of data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gmeta.io.prepare import PrepareError, load_manifest
from gmeta.types import TaskBatch


class ShardError(PrepareError):
    """A task shard is unreadable or does not match the manifest. Names the file."""


def _split_arrays(struct: pa.StructArray) -> dict[str, pa.ListArray]:
    return {struct.type.field(i).name: child for i, child in enumerate(struct.flatten())}


def _flat(arr: pa.ListArray) -> np.ndarray:
    return arr.flatten().to_numpy(zero_copy_only=False)


def collate(records: pa.Table, sparse: list[dict], has_true_prob: bool) -> TaskBatch:
    """N task records (rows of a shard table) -> one TaskBatch (layout in its docstring)."""
    sup = _split_arrays(records.column("support").combine_chunks())
    qry = _split_arrays(records.column("query").combine_chunks())
    s_len = sup["label"].value_lengths().to_numpy()
    q_len = qry["label"].value_lengths().to_numpy()
    n_s, n_q = int(s_len.sum()), int(q_len.sum())
    values, lengths = [], []
    for feat in sparse:
        name = feat["name"]
        if feat["multi_hot"]:
            for part in (sup[name], qry[name]):
                rows = part.flatten()  # one list of ids per row
                lengths.append(rows.value_lengths().to_numpy())
                values.append(_flat(rows))
        else:
            values += [_flat(sup[name]), _flat(qry[name])]
            lengths.append(np.ones(n_s + n_q, dtype=np.int64))
    kjt = KeyedJaggedTensor(
        keys=[f["name"] for f in sparse],
        values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int64, copy=False)),
    )
    dense = np.concatenate([_flat(sup["dense"].flatten()), _flat(qry["dense"].flatten())])
    dense_t = torch.from_numpy(dense.astype(np.float32, copy=False)).reshape(n_s + n_q, -1)
    labels = torch.from_numpy(np.concatenate([_flat(sup["label"]), _flat(qry["label"])]).astype(np.float32))
    true_prob = None
    if has_true_prob:
        true_prob = torch.from_numpy(
            np.concatenate([_flat(sup["true_prob"]), _flat(qry["true_prob"])]).astype(np.float32))
    return TaskBatch(
        sparse=kjt,
        dense=dense_t,
        labels=labels,
        support_offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(s_len)]).astype(np.int64)),
        query_offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(q_len)]).astype(np.int64)),
        task_ids=torch.from_numpy(records.column("task_id").to_numpy().astype(np.int64)),
        true_prob=true_prob,
    )


class TaskShardReader:
    """Iterate meta-batches of ``tasks_per_batch`` tasks from one split of a shard dir.

    Args:
        shards_dir: output directory of ``gmeta prepare`` (holds manifest.json).
        split: "train" or "eval".
        tasks_per_batch: N, tasks per meta-batch.
        rank, world_size: this process's share of every epoch.
        seed: base of the per-epoch task permutation.
        shuffle: permute tasks each epoch (False: manifest order).
        drop_last: drop the tail that does not fill a meta-batch on every rank (training);
            False keeps every task (evaluation on one process).
        max_tasks: use only the first max_tasks tasks of the split (0: all).
    """

    def __init__(self, shards_dir: str | Path, split: str, tasks_per_batch: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 max_tasks: int = 0) -> None:
        self.dir = Path(shards_dir)
        self.manifest = load_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise ShardError(f"{self.dir / 'manifest.json'}: no split {split!r}")
        self.sparse = self.manifest["schema"]["sparse"]
        self.has_true_prob = self.manifest["schema"]["has_true_prob"]
        self.tasks_per_batch = tasks_per_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        tables = [self._read(e) for e in self.manifest["splits"][split]["files"]]
        if not tables:
            raise ShardError(f"{self.dir}: split {split!r} has no tasks")
        self.table = pa.concat_tables(tables)
        if max_tasks:
            self.table = self.table.slice(0, max_tasks)
        self.num_tasks = self.table.num_rows
        per_rank = self.num_tasks // world_size
        if drop_last:
            self._batches = per_rank // tasks_per_batch
        else:
            per_rank = -(-self.num_tasks // world_size)
            self._batches = -(-per_rank // tasks_per_batch)
        if self._batches == 0:
            raise ShardError(
                f"{self.dir}: split {split!r} has {self.num_tasks} tasks, fewer than "
                f"{world_size} rank(s) x {tasks_per_batch} tasks per batch (meta.tasks_per_batch)")

    def _read(self, entry: dict) -> pa.Table:
        path = self.dir / entry["path"]
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"{path}: cannot read task shard: {e}") from None
        if table.num_rows != entry["tasks"]:
            raise ShardError(f"{path}: {table.num_rows} tasks, manifest says {entry['tasks']}")
        for col in ("task_id", "support", "query"):
            if col not in table.column_names:
                raise ShardError(f"{path}: missing column {col!r}")
        fields = {table.schema.field("support").type.field(i).name
                  for i in range(table.schema.field("support").type.num_fields)}
        need = {f["name"] for f in self.sparse} | {"dense", "label"} | ({"true_prob"} if self.has_true_prob else set())
        if not need <= fields:
            raise ShardError(f"{path}: support/query lack field(s) {sorted(need - fields)} listed in the manifest")
        return table

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_tasks)
        else:
            order = np.arange(self.num_tasks)
        mine = order[self.rank:: self.world_size]
        n = self.tasks_per_batch
        for b in range(self._batches):
            idx = mine[b * n: (b + 1) * n]
            yield collate(self.table.take(pa.array(idx)), self.sparse, self.has_true_prob)
