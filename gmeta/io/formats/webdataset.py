"""WebDataset task shards: one tar sample per task.

Sample ``<key>`` (the task's position in the split, zero-padded) holds::

    <key>.json                      {"task_key": ..., "task_id": ...}
    <key>.support.<feature>.npy     int64 [R] hashed ids (multi-hot: all ids of the rows)
    <key>.support.<feature>.len.npy int64 [R] ids per row (multi-hot features only)
    <key>.support.dense.npy         float32 [R, num_dense]
    <key>.support.label.npy         float32 [R], or [R, L] for the L labels of features.labels
    <key>.support.true_prob.npy     float32 [R] (when the data has it)
    ... and the same for query.

Members are decoded only as ``.npy`` (numpy without pickle) and ``.json``: a tar cannot
make the reader execute code, whatever it contains.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import numpy.lib.format
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from gmeta.io.block import ShardError, SplitArrays, TaskBlock
from gmeta.io.features import schema_labels
from gmeta.storage import location, temp_name


def _npy(data: bytes) -> np.ndarray:
    return numpy.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def write_tar(path: Path, block: TaskBlock, task_keys: list, first_index: int, schema: dict) -> None:
    """Write the tasks of ``block`` to ``path`` (atomically: a temporary name, then rename)."""
    tmp = temp_name(path)
    with wds.TarWriter(str(tmp), mtime=0.0) as sink:
        for t in range(block.num_tasks):
            sample = {"__key__": f"{first_index + t:09d}",
                      "json": {"task_key": _jsonable(task_keys[t]), "task_id": int(block.task_id[t])}}
            for side_name in ("support", "query"):
                side: SplitArrays = getattr(block, side_name)
                r0, r1 = int(side.rows[t]), int(side.rows[t + 1])
                for feat in schema["sparse"]:
                    name = feat["name"]
                    if feat["multi_hot"]:
                        off = side.id_offsets[name]
                        sample[f"{side_name}.{name}.npy"] = side.ids[name][off[r0]: off[r1]]
                        sample[f"{side_name}.{name}.len.npy"] = np.diff(off[r0: r1 + 1])
                    else:
                        sample[f"{side_name}.{name}.npy"] = side.ids[name][r0:r1]
                sample[f"{side_name}.dense.npy"] = side.dense[r0:r1]
                sample[f"{side_name}.label.npy"] = side.label[r0:r1]
                if side.true_prob is not None:
                    sample[f"{side_name}.true_prob.npy"] = side.true_prob[r0:r1]
            sink.write(sample)
    tmp.replace(path)


def _jsonable(v):
    return v.item() if hasattr(v, "item") else v


def _side(samples: list[dict], side_name: str, schema: dict, where: str) -> SplitArrays:
    def get(sample: dict, member: str) -> np.ndarray:
        data = sample.get(member)
        if data is None:
            raise ShardError(f"{where}: sample {sample['__key__']} has no member {member!r}")
        try:
            return _npy(data)
        except Exception as e:  # numpy's header parser raises SyntaxError, TokenError, ValueError, ...
            raise ShardError(f"{where}: sample {sample['__key__']} member {member!r} is not a valid .npy: "
                             f"{e}") from None

    labels = [get(s, f"{side_name}.label.npy").astype(np.float32, copy=False) for s in samples]
    names = schema_labels(schema)
    for s, lab in zip(samples, labels):
        if lab.shape[1:] != ((len(names),) if names else ()):
            want = f"[rows, {len(names)}] for the labels {names}" if names else "[rows] (one label)"
            raise ShardError(f"{where}: sample {s['__key__']} {side_name}.label has shape {list(lab.shape)}, the "
                             f"manifest schema says {want}")
    counts = np.array([len(x) for x in labels], dtype=np.int64)
    rows = np.concatenate([[0], np.cumsum(counts)])
    ids, id_offsets = {}, {}
    for feat in schema["sparse"]:
        name = feat["name"]
        ids[name] = np.concatenate([get(s, f"{side_name}.{name}.npy") for s in samples]).astype(np.int64, copy=False)
        if feat["multi_hot"]:
            lens = np.concatenate([get(s, f"{side_name}.{name}.len.npy") for s in samples]).astype(np.int64)
            id_offsets[name] = np.concatenate([[0], np.cumsum(lens)])
            if id_offsets[name][-1] != len(ids[name]):
                raise ShardError(f"{where}: {side_name}.{name}: lengths add up to {id_offsets[name][-1]} ids, "
                                 f"found {len(ids[name])}")
        elif len(ids[name]) != rows[-1]:
            raise ShardError(f"{where}: {side_name}.{name}: {len(ids[name])} ids for {rows[-1]} rows")
    nd = len(schema["dense"])
    parts: list[np.ndarray] = []
    for s, n in zip(samples, np.diff(rows)):
        d = get(s, f"{side_name}.dense.npy")
        if d.size != n * nd:
            raise ShardError(f"{where}: sample {s['__key__']} {side_name}.dense: {d.size} values for {n} rows x "
                             f"{nd} features")
        parts.append(d.reshape(n, nd))  # not (-1, nd): with no dense feature nd is 0
    dense = np.concatenate(parts).astype(np.float32)
    if len(dense) != rows[-1]:
        raise ShardError(f"{where}: {side_name}.dense: {len(dense)} rows, labels have {rows[-1]}")
    true_prob = None
    if schema["has_true_prob"]:
        true_prob = np.concatenate([get(s, f"{side_name}.true_prob.npy") for s in samples]).astype(np.float32)
    return SplitArrays(rows, ids, id_offsets, dense, np.concatenate(labels), true_prob)


def _samples(path: Path):
    """The samples of one tar shard, in file order, read by webdataset's tar iterators from
    the file (local or remote) opened here. One whole shard per call: gmeta.io.plan already
    decided who reads it, so webdataset must not split it again by node or worker."""
    with location(path).open("rb") as f:
        yield from group_by_keys(tar_file_expander([{"url": str(path), "stream": f}]))


def read_tar(path: Path, schema: dict) -> TaskBlock:
    """Read a whole tar shard into a TaskBlock (samples in file order)."""
    if not location(path).is_file():
        raise ShardError(f"{path}: task shard listed in the manifest is missing")
    samples = []
    try:
        for sample in _samples(path):
            samples.append(sample)
    except Exception as e:  # tarfile.ReadError, truncated streams, ... from inside webdataset
        raise ShardError(f"{path}: cannot read tar shard (after {len(samples)} samples): {e}") from None
    if not samples:
        raise ShardError(f"{path}: no samples")
    task_ids = []
    for s in samples:
        try:
            task_ids.append(int(json.loads(s["json"])["task_id"]))
        except (KeyError, ValueError, TypeError) as e:
            raise ShardError(f"{path}: sample {s.get('__key__')} has no valid .json task_id: {e}") from None
    try:
        return TaskBlock(source=str(path), task_id=np.array(task_ids, dtype=np.int64),
                         support=_side(samples, "support", schema, str(path)),
                         query=_side(samples, "query", schema, str(path)))
    except ShardError:
        raise
    except (ValueError, TypeError, IndexError) as e:  # arrays of the wrong dtype or shape
        raise ShardError(f"{path}: sample arrays do not match the manifest schema: {e}") from None


def read_task_keys(path: Path) -> list[tuple[object, int]]:
    """(task_key, task_id) of every sample of a tar shard, reading only the .json members."""
    out = []
    try:
        for sample in _samples(path):
            if "json" not in sample:
                continue
            info = json.loads(sample["json"])
            out.append((info["task_key"], int(info["task_id"])))
    except Exception as e:
        raise ShardError(f"{path}: cannot read task keys: {e}") from None
    return out
