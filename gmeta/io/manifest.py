"""``manifest.json``: what ``gmeta prepare`` wrote (schema, splits, files, counts), read and
checked by everything that reads shards.

The manifest's *content hash* identifies a set of shards: a sha256 over the canonical JSON
(sorted keys, no spaces) of every manifest field except those in ``NOT_IDENTITY``. It thus
covers the schema, the id hashing, the split rule and its seed, the fractions, the task and
row counts per split, the drop counts, the per-feature id statistics and the sha256 of every
shard file. Training records it in each checkpoint (``shards_record``); evaluate, predict
and ``train --resume`` compare it with the manifest of the shards they are given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gmeta.config import PARTITIONS_HELP, Config, flatten
from gmeta.io.errors import PrepareError
from gmeta.io.features import SHARD_FIELDS, id_hash_of, schema_labels
from gmeta.io.id_counts import merged_counts, read_all_ids, unseen_shares
from gmeta.io.partitions import (
    DIR,
    INDEX,
    SHARED_FIELDS,
    input_keys,
    is_partitioned,
    names,
    new_task_ids,
    partition_dir,
    select,
)
from gmeta.storage import absolute, check_bucket, location

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: per-file "units" (row groups / tars) for the streaming reader
SPLITS = ("train", "eval")


def splits_of(cfg: Config) -> tuple[str, ...]:
    """Shard splits prepare writes: train, eval (test), and val if data.split.val_fraction."""
    return SPLITS + (("val",) if cfg.data.split.val_fraction > 0 else ())


def load_manifest(shards_dir: str | Path, partitions: str = "") -> dict:
    """The manifest of the shards in ``shards_dir``; of a partitioned data set
    (``gmeta.io.partitions``), the merged manifest of the partitions ``partitions`` selects
    (``data.partitions``)."""
    root = location(shards_dir)
    if is_partitioned(root):
        if not partitions:
            raise PrepareError(f"{root}: a partitioned data set ({INDEX}: {', '.join(names(root)[-4:])}"
                               f"{' ...' if len(names(root)) > 4 else ''}): set data.partitions to the "
                               f"partitions to read: {PARTITIONS_HELP}")
        return merged_manifest(root, select(root, partitions))
    if partitions:
        raise PrepareError(f"{root}: data.partitions is {partitions!r}, but the data set is not partitioned (no "
                           f"{INDEX}); clear data.partitions, or prepare it with gmeta prepare --partition")
    path = root / MANIFEST
    if not _exists(path):
        check_bucket(shards_dir, "task shards")  # an object store: a denied read or no bucket, not "not found"
        raise PrepareError(f"{path}: not found; run `gmeta prepare` first (data.shards_dir)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path}: not valid JSON: {e}") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise PrepareError(f"{path}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}; "
                           "prepare the shards again with this version of gmeta")
    return m


def _exists(path) -> bool:
    try:
        return path.is_file()
    except OSError:  # (an object store's denied access: check_bucket says which)
        return False


def describe_shards(shards_dir: str | Path, partitions: str = "") -> str:
    """The manifest of ``shards_dir`` for messages: its manifest.json, or the partitions
    index and the selection of a partitioned data set."""
    root = location(shards_dir)
    return f"{root}/partitions.json (data.partitions {partitions})" if partitions else str(root / MANIFEST)


class OtherShardsError(PrepareError):
    """Shards whose manifest differs from those a checkpoint was trained on."""


# Manifest fields that do not tell one set of shards from another: how long prepare took,
# the path it read (the same rows read from a copy make the same shards, and the files'
# checksums tell different rows apart) and how many buckets its memory cap asked for (when
# that reorders the tasks, the files' checksums differ too).
NOT_IDENTITY = ("seconds", "input", "partitions")


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def content_hash(manifest: dict) -> str:
    """sha256 (hex) of the manifest's identifying content (see the module docstring)."""
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k not in NOT_IDENTITY})).hexdigest()


def identity(manifest: dict) -> dict[str, Any]:
    """The identifying content as flat ``{"split_rule.eval_fraction": 0.2, ...}`` (what a
    checkpoint records, to name the fields that differ); each split's file list is one
    ``sha256:...`` of its entries (paths, counts and checksums), to keep checkpoints small."""
    content = {k: v for k, v in manifest.items() if k not in NOT_IDENTITY}
    splits = content.get("splits")
    if isinstance(splits, dict):
        content["splits"] = {s: ({**v, "files": "sha256:" + hashlib.sha256(_canonical(v["files"])).hexdigest()}
                                 if isinstance(v, dict) and "files" in v else v) for s, v in splits.items()}
    return flatten(content)


def shards_record(shards_dir: str | Path, manifest: dict) -> dict:
    """What a checkpoint keeps of the shards it was trained on (meta.json ``shards``)."""
    return {"dir": absolute(location(shards_dir)), "content_hash": content_hash(manifest),
            "manifest": identity(manifest)}


# the fields named first when manifests differ: those that say why, before the counts they change
_FIRST = ("format_version", "id_hash", "task_key", "schema.", "split_rule.", "splits.", "input_rows", "input_tasks")
_ABSENT = object()


def _rank(key: str) -> int:
    return next((i for i, p in enumerate(_FIRST) if key == p or key.startswith(p)), len(_FIRST))


def identity_diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) of every identifying field that differs, the telling
    ones first; a value missing on one side is ``"(absent)"``."""
    keys = list(old) + [k for k in new if k not in old]
    out = [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
    out.sort(key=lambda d: _rank(d[0]))
    return [(k, "(absent)" if a is _ABSENT else a, "(absent)" if b is _ABSENT else b) for k, a, b in out]


def _show(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]  # enough to tell two digests apart
    return value if value == "(absent)" else json.dumps(value)


def format_diff(diffs: list[tuple[str, Any, Any]], old: str, new: str, limit: int = 12) -> str:
    """One line per difference, ``key: <old value> (old) vs <new value> (new)``."""
    lines = [f"  {k}: {_show(a)} ({old}) vs {_show(b)} ({new})" for k, a, b in diffs[:limit]]
    if len(diffs) > limit:
        lines.append(f"  ... and {len(diffs) - limit} more field(s)")
    return "\n".join(lines)


def check_same_shards(recorded: dict | None, manifest: dict, shards_dir: str | Path, checkpoint: str | Path, *,
                      allow: bool, doing: str, quiet: bool = False) -> None:
    """The shards in ``shards_dir`` (their ``manifest``) must be those ``checkpoint`` was
    trained on (``recorded``: its meta.json ``shards``): else an OtherShardsError naming
    the manifest fields that differ, both paths and the ``--allow-other-shards`` escape,
    which turns it into a warning. ``doing``: what the shards are for, e.g. "evaluating".
    A checkpoint that records nothing (written before checkpoints did) gets a warning.
    ``quiet``: no warnings (the other ranks of a job whose rank 0 gives them)."""
    path = location(shards_dir) / MANIFEST
    if not recorded or "content_hash" not in recorded:
        if not quiet:
            log.warning("%s records no manifest content hash (written by an older gmeta): cannot check that %s "
                        "belongs to the shards it was trained on", checkpoint, path)
        return
    got = content_hash(manifest)
    if got == recorded["content_hash"]:
        return
    diffs = identity_diff(recorded.get("manifest") or {}, identity(manifest))
    head = (f"{path} (content hash {got[:12]}) is not the manifest of the shards {checkpoint} was trained on "
            f"({recorded.get('dir', '?')}, content hash {recorded['content_hash'][:12]}); fields that differ:\n"
            + (format_diff(diffs, "trained on", "these shards") or "  (none recorded: the content hashes differ)"))
    if allow:
        if not quiet:
            log.warning("%s\n%s them anyway (--allow-other-shards)", head, doing)
        return
    raise OtherShardsError(f"{head}\n{doing} them would mix held-out and training tasks or read another data set: "
                           "give the shards it was trained on (--shards, data.shards_dir), prepare them again with "
                           "its config, or pass --allow-other-shards to go on")


def schema_differences(manifest: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(config key, the shards' value, the config's value) of each part of the record schema
    that differs: what a model built from ``cfg`` cannot read from these shards."""
    schema = manifest["schema"]
    out: list[tuple[str, Any, Any]] = []
    got = {s["name"]: s for s in schema["sparse"]}
    want = list(cfg.features.sparse)
    if [s["name"] for s in schema["sparse"]] != [s.name for s in want]:
        out.append(("features.sparse (names, in order)", [s["name"] for s in schema["sparse"]], [s.name for s in want]))
    for i, s in enumerate(want):
        if s.name not in got:
            continue
        mine = asdict(s)
        # (shards older than these keys hashed their ids, held no sequence, shared no table)
        theirs = {"ids": "hash", "max_length": 0, "table": "", **got[s.name]}
        # managed ids are hashes whatever the number of slots: it is the model's to change
        slots_free = mine["ids"] == "managed" == theirs["ids"]
        out += [(f"features.sparse[{i}].{k} ({s.name})", theirs.get(k), mine[k]) for k in SHARD_FIELDS
                if k != "name" and theirs.get(k) != mine[k] and not (slots_free and k == "num_embeddings")]
    if schema["dense"] != list(cfg.features.dense):
        out.append(("features.dense", schema["dense"], list(cfg.features.dense)))
    labels = cfg.features.label_names()
    if schema_labels(schema) != (labels if len(labels) > 1 else None):  # (one label's schema names none)
        out.append(("features.labels", schema_labels(schema) or "(one label)", labels if len(labels) > 1
                    else "(one label)"))
    objective = schema.get("objective", "binary")  # (labels were checked for it)
    if objective != cfg.model.objective:
        out.append(("model.objective", objective, cfg.model.objective))
    return out


def settings_differences(manifest: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(config key, the manifest's value, the config's value) of the settings that decide
    which tasks and rows the shards hold, beyond the schema: the task key and every
    ``data.split`` key the manifest records. (data.format and the tasks per file or row
    group only lay out the same tasks: the reader yields the same batches from any.)"""
    out = []
    if manifest.get("task_key", cfg.features.task_key) != cfg.features.task_key:
        out.append(("features.task_key", manifest["task_key"], cfg.features.task_key))
    rule = manifest.get("split_rule") or {}
    out += [(f"data.split.{k}", rule[k], v) for k, v in asdict(cfg.data.split).items() if k in rule and rule[k] != v]
    return out


def _differences(diffs: list[tuple[str, Any, Any]], theirs: str, mine: str) -> str:
    return "\n".join(f"  {k}: {json.dumps(a)} ({theirs}) vs {json.dumps(b)} ({mine})" for k, a, b in diffs)


def check_schema(manifest: dict, cfg: Config, path: str | Path, whose: str) -> None:
    """The shards' record schema must be the one ``cfg`` (``whose`` config: "the config",
    "the checkpoint's") reads; else a PrepareError naming each field that differs."""
    diffs = schema_differences(manifest, cfg)
    if diffs:
        raise PrepareError(f"{path}: shards of another schema than {whose} config (a model built from it cannot "
                           f"read them):\n{_differences(diffs, 'these shards', whose + ' config')}")


def check_manifest_matches(manifest: dict, cfg: Config, path: str) -> None:
    """The shards must be what ``gmeta prepare`` writes with this config: its schema and the
    settings that choose the tasks and rows. A config that disagrees (another split, or a
    prepare with it that failed and left the previous shards in place) is refused, as a
    model trained on these shards would claim settings they were not prepared with."""
    diffs = schema_differences(manifest, cfg) + settings_differences(manifest, cfg)
    if diffs:
        raise PrepareError(f"{path}: prepared with other settings than the config (data.shards_dir holds shards "
                           f"this config did not prepare):\n{_differences(diffs, 'manifest', 'config')}\n"
                           "prepare the shards again with this config (gmeta prepare), or set data.shards_dir to "
                           "the shards it prepared")


# --------------------------------------------------------------------------------------
# partitioned data sets (gmeta.io.partitions): the merged manifest of a selection, the index
# --------------------------------------------------------------------------------------


def merged_manifest(root: Path, chosen: list[str]) -> dict:
    """One manifest for the partitions ``chosen`` of the partitioned data set ``root``:
    their files (paths relative to ``root``), counts summed, the ids new to the train split
    recomputed from the merged id counts, and ``selected_partitions`` (each name with its
    own content hash), so that its content hash names the partitions and their contents
    (``gmeta.io.partitions``)."""
    parts = [(n, load_manifest(partition_dir(root, n))) for n in chosen]
    first_name, first = parts[0]
    for name, m in parts[1:]:
        for k in SHARED_FIELDS:
            if m.get(k) != first.get(k):
                raise PrepareError(f"{partition_dir(root, name) / MANIFEST}: {k} differs from partition "
                                   f"{first_name}'s ({json.dumps(m.get(k))[:200]} vs "
                                   f"{json.dumps(first.get(k))[:200]}): the partitions of one data set share "
                                   "their schema, id hashing, task key and split rule; prepare it again with "
                                   "one config")
    out: dict[str, Any] = {k: first[k] for k in SHARED_FIELDS if k in first}
    out["input_columns"] = first.get("input_columns")
    out["input"] = [m["input"] for _, m in parts]
    out["seconds"] = round(sum(m.get("seconds", 0.0) for _, m in parts), 3)
    for k in ("input_rows", "input_tasks"):
        out[k] = sum(int(m[k]) for _, m in parts)
    out["dropped_tasks"] = _sum_dicts([m["dropped_tasks"] for _, m in parts])
    out["chunked_tasks"] = _sum_dicts([m.get("chunked_tasks", {}) for _, m in parts])
    out["rows"] = {"read": sum(m["rows"]["read"] for _, m in parts),
                   "written": _sum_dicts([m["rows"]["written"] for _, m in parts]),
                   "dropped": _sum_dicts([m["rows"]["dropped"] for _, m in parts])}
    splits: dict[str, Any] = {}
    for name, m in parts:
        for split, s in m["splits"].items():
            acc = splits.setdefault(split, {"tasks": 0, "support_rows": 0, "query_rows": 0, "label_sum": None,
                                            "files": []})
            rows = s["support_rows"] + s["query_rows"]
            acc["tasks"] += s["tasks"]
            acc["support_rows"] += s["support_rows"]
            acc["query_rows"] += s["query_rows"]
            if s.get("label_mean") is not None:
                acc["label_sum"] = np.asarray(s["label_mean"], dtype=np.float64) * rows + (
                    0 if acc["label_sum"] is None else acc["label_sum"])
            acc["files"] += [{**f, "path": f"{DIR}/{name}/{f['path']}"} for f in s["files"]]
    for s in splits.values():
        total, label_sum = s["support_rows"] + s["query_rows"], s.pop("label_sum")
        mean = None if label_sum is None or not total else (label_sum / total).tolist()
        s["label_mean"] = mean
    out["splits"] = splits
    out["cardinality"] = {n: m.get("cardinality", {}) for n, m in parts}
    features = [s["name"] for s in first["schema"]["sparse"]]
    counts = {f: merged_counts([partition_dir(root, n) for n in chosen], f) for f in features}
    out["unseen"] = unseen_shares(counts, [s for s in splits if s != "train"])
    out["selected_partitions"] = [{"name": n, "content_hash": content_hash(m)} for n, m in parts]
    return out


def _sum_dicts(ds: list[dict]) -> dict:
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = _sum_dicts([out.get(k, {}), v])
            else:
                out[k] = out.get(k, 0) + v
    return out


def build_index(root: Path) -> dict:
    """The index of every partition of ``root`` (recomputed from the partitions: a partition
    re-prepared changes what is new on the days after it)."""
    entries = []
    seen_ids: dict[str, np.ndarray] = {}
    seen_keys = np.zeros(0, dtype=np.int64)  # the input task keys of the partitions so far
    for name in names(root):
        m = load_manifest(partition_dir(root, name))
        new_tasks = len(new_task_ids(root, name, before=seen_keys))
        seen_keys = np.union1d(seen_keys, input_keys(root, name))
        ids = {}
        for s in m["schema"]["sparse"]:
            f = s["name"]
            have = read_all_ids(partition_dir(root, name), f)
            before = seen_ids.get(f, np.zeros(0, dtype=np.int64))
            ids[f] = {"distinct": int(len(have)), "new": int((~np.isin(have, before, assume_unique=True)).sum())}
            seen_ids[f] = np.union1d(before, have)
        entries.append({"name": name, "content_hash": content_hash(m), "input": m["input"],
                        "input_rows": m["input_rows"], "seconds": m.get("seconds"),
                        "tasks": {k: v["tasks"] for k, v in m["splits"].items()},
                        "rows": m["rows"]["written"], "new_tasks": new_tasks, "ids": ids})
    return {"partitions": entries}


def write_index(root: Path) -> dict:
    index = build_index(root)
    tmp = root / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    tmp.replace(root / INDEX)
    return index


def choose_shards(shards_dir: str | Path | None, why: str, cfg: Config, checkpoint: str | Path,
                  command: str = "evaluate") -> Path:
    """The task shards to score: ``shards_dir`` when given (``why`` says by what: --shards, an
    override), else those the checkpoint was trained on (data.shards_dir of its saved config),
    not the data.shards_dir of a --config file, which may name other data. Logs the choice."""
    if shards_dir:
        shards = location(shards_dir)
    else:
        shards, why = location(cfg.data.shards_dir), "the checkpoint's data.shards_dir: the shards it was trained on"
        if not (shards / MANIFEST).is_file() and not is_partitioned(shards):
            raise PrepareError(f"{shards / MANIFEST}: not found; {checkpoint} was trained on {shards} (its saved "
                               "data.shards_dir, relative to the directory training ran in); pass --shards DIR "
                               "or data.shards_dir=DIR to score other shards")
    if os.environ.get("RANK", "0") == "0":  # one line, not one per rank
        log.info("%s: shards %s (%s)", command, shards, why)
    return shards


def check_shards(checkpoint: str | Path, meta: dict, cfg: Config, shards: str | Path, *,
                 allow_other_shards: bool = False, doing: str = "evaluating") -> None:
    """Before any model is loaded: the shards must hold records the checkpoint's model
    (``cfg``, from ``meta``) reads, else an error naming the schema fields that differ
    (there is no scoring such shards); and they must be the shards it was trained on, else
    an error naming the manifest fields that differ, a warning with ``allow_other_shards``."""
    manifest = load_manifest(shards, cfg.data.partitions)
    check_schema(manifest, cfg, location(shards) / MANIFEST, f"{checkpoint}'s")
    # its table rows stand for ids hashed one way: shards of another id hash are never right,
    # whatever allow_other_shards says (their ids would land on other rows)
    ours, theirs = id_hash_of(meta, f"{checkpoint}/meta.json"), id_hash_of(manifest, str(location(shards) / MANIFEST))
    if ours != theirs:
        raise PrepareError(f"{location(shards) / MANIFEST}: ids hashed with id_hash {theirs}, but {checkpoint}'s "
                           f"tables were trained on ids of id_hash {ours} (its meta.json; none recorded: 1); "
                           "prepare the shards again with the gmeta that trained it, or score raw rows with "
                           "gmeta predict --input, which hashes as the checkpoint's tables were trained")
    # every rank refuses alike; the warnings come once, not once per rank
    check_same_shards(meta.get("shards"), manifest, shards, checkpoint, allow=allow_other_shards, doing=doing,
                      quiet=os.environ.get("RANK", "0") != "0")
