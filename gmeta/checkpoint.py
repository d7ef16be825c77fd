"""Checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a directory::

    *.distcp, .metadata  DCP: the model state dict (sharded embedding tables as ShardedTensors,
                         dense parameters) and, for training checkpoints, the tensors of the
                         fused embedding optimizer's state (sharded like the tables) and of the
                         dense Adam state, under "optim.fused" / "optim.dense"
    rank-<r>.json        rank r's own state: reader position, RNG states (each rank writes its own)
    meta.json            resolved config, step, epoch, world size, MLflow run; written last by
                         rank 0, so a directory without it is incomplete and never loaded

It is written under ``<name>.tmp`` and renamed into place after every rank has finished,
so a crash mid-write leaves the previous checkpoints untouched. Locally every file and the
directory are flushed to the disk (fsync) before meta.json is written, and meta.json and the
directory again before the rename, so that after a machine crash (power loss, kernel panic)
a checkpoint with meta.json is whole, not only after a process crash. A checkpoint that
replaces another (``checkpoint``, ``best``) moves the old one aside to ``<name>.old`` first;
while ``<name>`` is missing (a crash between the two renames), :func:`resolve` and so every
loader take the aside copy. In an object store
(``train.output_dir=s3://...``: DCP's fsspec storage), which cannot rename, a new
checkpoint is written in place and meta.json, written last, completes it; one that replaces
an existing checkpoint (``checkpoint``, ``best``) is written under ``<name>.tmp`` and then
copied over the old one, meta.json first deleted and last copied. DCP reshards on load: a
checkpoint written by N processes loads into M processes, or into one process with whole
tables, or into a different sharding plan.

Loading never executes code from the files: DCP reads tensors with ``weights_only=True``;
its ``.metadata`` file is a pickle, read here by an unpickler that admits only DCP's own
metadata classes; the checkpoint must hold tensors only (DCP would unpickle non-tensor
entries without restriction, so none are written and a file declaring any is refused);
everything else is JSON.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

from gmeta.config import Config, ConfigError, config_from_dict, flatten, to_dict
from gmeta.models.dlrm import MetaDLRM, build_model
from gmeta.storage import check_bucket, is_url, location, rmtree
from gmeta.version import __version__

META = "meta.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
ASIDE, TMP, DAMAGED = ".old", ".tmp", ".damaged"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged or unsafe. The message names the path."""


# ------------------------------------------------------------------ safe reading

_SAFE_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata dataclasses, torch dtypes and torch.Size: nothing callable
    beyond them can be reached from a crafted ``.metadata`` file."""

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.metadata as md

        allowed = (module, name) in _SAFE_GLOBALS
        allowed |= module == md.__name__ and isinstance(getattr(md, name, None), type)
        allowed |= module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with a restricted unpickler for ``.metadata``, which it reads
    with plain ``pickle.load``, and a check that every entry is a tensor (DCP loads
    non-tensor entries with ``torch.load(weights_only=False)``)."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except Exception as e:  # truncated, corrupt or hostile
                raise CheckpointError(f"{path}: unreadable checkpoint metadata: {e}") from None
        entries = getattr(metadata, "state_dict_metadata", None)
        if not isinstance(entries, dict):
            raise CheckpointError(f"{path}: not DCP checkpoint metadata")
        for key, value in entries.items():
            if not isinstance(value, TensorStorageMetadata):
                raise CheckpointError(f"{path}: entry {key!r} is not a tensor; gmeta checkpoints hold tensors only")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeFsspecReader(SafeFileSystemReader, FsspecReader):
    """DCP's reader of checkpoints in an object store (fsspec), reading metadata safely."""


def safe_reader(path) -> FileSystemReader:
    return SafeFsspecReader(str(path)) if is_url(path) else SafeFileSystemReader(str(path))


def _dcp_load(state: dict, path: Path, no_dist: bool = False) -> None:
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            reader = safe_reader(path)
            # checked here first: some torch releases (2.11) catch the reader's errors inside
            # dcp.load and go on without metadata, which would hide why a file is refused
            reader.read_metadata()
            dcp.load(state, storage_reader=reader, no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # damaged files (DCP's own exception is a BaseException)
        raise CheckpointError(f"{path}: cannot load checkpoint state: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------ state

def _tensors_only(d):
    """The tensor leaves of a nested dict (same objects, so loading into them is in place)."""
    if isinstance(d, dict):
        out = {k: _tensors_only(v) for k, v in d.items()}
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) or (isinstance(v, dict) and v)}
    return d if isinstance(d, torch.Tensor) else None


def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state tensors (one step with zero gradients and lr 0), so
    that a checkpoint can be loaded into them. torch's own helper for this
    (``torch.distributed.checkpoint.state_dict._init_optim_state``) is private."""
    if opt.state:
        return
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)


def _fused_optimizer(model):
    return getattr(model, "fused_optimizer", None)


def _training_state(model, dense_opt: torch.optim.Optimizer | None) -> tuple[dict, dict | None, dict | None]:
    state = dict(model.state_dict())
    fused_sd = dense_sd = None
    if dense_opt is not None:
        init_optimizer_state(dense_opt)
        dense_sd = dense_opt.state_dict()
        optim = {"dense": _tensors_only(dense_sd["state"])}
        fused = _fused_optimizer(model)
        if fused is not None:
            fused_sd = fused.state_dict()
            optim["fused"] = _tensors_only(fused_sd["state"])
        state["optim"] = optim
    return state, fused_sd, dense_sd


def rng_state() -> dict:
    """This process's torch RNG states, JSON-able."""
    out = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def set_rng_state(state: dict) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


# ------------------------------------------------------------------ save / find / prune

def save(model: torch.nn.Module, cfg: Config, path: str | Path, meta: dict, *,
         dense_opt: torch.optim.Optimizer | None = None, rank_state: dict | None = None) -> Path:
    """Collective: every rank calls it. With ``dense_opt`` it is a training checkpoint
    (optimizer states too); ``rank_state`` is this rank's own JSON-able state. Returns the
    final checkpoint directory."""
    path = location(path)
    remote = is_url(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = dist.get_rank()
    # remote: in place when nothing is there yet (step-N), else beside it and copied over;
    # every rank must decide alike, so rank 0 looks and tells the others
    flag = [remote and path.exists()]
    dist.broadcast_object_list(flag, src=0)
    target = tmp if (flag[0] or not remote) else path
    if rank == 0:
        _finish_swap(path)
        rmtree(tmp)
    dist.barrier()
    state, _, _ = _training_state(model, dense_opt)
    if remote:
        dcp.save(state, storage_writer=FsspecWriter(str(target)))
    else:
        # DCP's FileSystemWriter fsyncs each file it writes (sync_files, on by default), not
        # the directory that names them: that is done below
        dcp.save(state, checkpoint_id=str(target))
    if rank_state is not None:
        _write_text(target / f"rank-{rank}.json", json.dumps(rank_state))
    if not remote:
        _fsync(target)  # this rank's new file names
    dist.barrier()  # every rank's files are in target, on the disk
    if rank == 0:
        info = {"gmeta_version": __version__, "config": to_dict(cfg), "world_size": dist.get_world_size(),
                "training_state": dense_opt is not None, **meta}
        _write_text(target / META, json.dumps(info, indent=2))
        if not remote:
            _fsync(target)  # meta.json's name: on the disk before the rename publishes the checkpoint
            old = path.with_name(path.name + ASIDE)
            if path.exists():
                rmtree(old)  # a whole previous copy left by a crash after the swap below
                path.rename(old)  # aside first: resolve() loads it while ``path`` is missing
            tmp.rename(path)
            _fsync(path.parent)  # the renames
            rmtree(old)
        elif target == tmp:
            _copy_over(tmp, path)
    dist.barrier()
    return path


def _write_text(path, text: str) -> None:
    """Write a file of a checkpoint: locally flushed to the disk; an object is stored whole
    and durably once its upload returns (S3 and the other stores acknowledge a PUT only
    then), which an fsync could not add to."""
    if is_url(path):
        path.write_text(text)
        return
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush a local directory's entries (new files, renames) to the disk: an fsync of a file
    does not make its name durable, and ext4/xfs may lose a rename at a machine crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_swap(path: Path) -> None:
    """Before a new ``path`` is written, complete a swap a crash interrupted (local): put the
    complete aside or temporary copy back at ``path``, so that clearing ``<name>.tmp`` for the
    new write never deletes the only complete copy."""
    if is_url(path) or path.exists():
        return
    for suffix in (ASIDE, TMP):
        other = path.with_name(path.name + suffix)
        if _has_meta(other):
            other.rename(path)
            _fsync(path.parent)
            return


def _copy_over(src, dst) -> None:
    """Replace the remote checkpoint ``dst`` by ``src`` (server-side copies): dst's meta.json
    goes first and src's comes last, so ``dst`` is never a complete checkpoint of mixed files."""
    fs = src.fs
    (dst / META).unlink(missing_ok=True)
    rmtree(dst)
    files = sorted(fs.find(src.path), key=lambda f: f.endswith("/" + META))
    for f in files:
        fs.copy(f, dst.path + f[len(src.path):])
    rmtree(src)


def step_dir(root: str | Path, step: int) -> Path:
    return location(root) / f"step-{step:08d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints under ``root`` (``step-NNNNNNNN`` with a
    readable meta.json), oldest first; temporary and incomplete ones are ignored, and one
    whose meta.json is not valid is ignored with a warning naming it."""
    root = location(root)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / META).is_file():
                try:
                    step = int(json.loads((p / META).read_text())["step"])
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("checkpoint %s is damaged and ignored: %s: %s", p, META, e)
                    continue
                out.append((step, p))
    return sorted(out)


def damage(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded, or None when it is whole as far as
    can be told without reading its tensors: meta.json missing or not valid; DCP's
    ``.metadata`` unreadable; a data file the metadata names missing or shorter than the
    bytes it places in it; a training checkpoint's ``rank-<r>.json`` missing or not valid.
    (DCP keeps no checksums: bytes changed in place inside a data file are not seen.)"""
    path = location(path)
    try:
        meta = _read_meta_at(path)
        metadata = safe_reader(path).read_metadata()
    except CheckpointError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001  # the store failing to list or read: damaged for this purpose
        return f"{path}: cannot read checkpoint metadata: {type(e).__name__}: {e}"
    ends: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if isinstance(rel, str):
            ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(ends.items()):
        f = path / rel
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            return f"{f}: missing (named in the checkpoint's metadata)"
        if size < end:
            return f"{f}: {size} bytes, the checkpoint's metadata places data up to byte {end} (truncated)"
    if meta.get("training_state"):
        for r in range(int(meta.get("world_size") or 0)):
            own = path / f"rank-{r}.json"
            try:
                json.loads(own.read_text())
            except FileNotFoundError:
                return f"{own}: missing"
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return f"{own}: not valid JSON: {e}"
    return None


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftovers of crashed
    writes (rank 0 only). A damaged checkpoint (:func:`damage`) does not count among the
    kept: it is renamed ``step-N.damaged`` (kept for inspection, never loaded; in an object
    store, which cannot rename, its meta.json is deleted, which makes it a leftover), so that
    a damaged newest one cannot make the whole ones older than it be deleted."""
    ckpts = []
    for step, p in complete_checkpoints(root):
        why = damage(p)
        if why is None:
            ckpts.append((step, p))
            continue
        log.warning("checkpoint %s is damaged (%s): renamed %s", p, why, p.name + DAMAGED)
        aside = p.with_name(p.name + DAMAGED)
        rmtree(aside)
        if is_url(p):  # an object store cannot rename: its meta.json goes, which makes it incomplete
            (p / META).unlink(missing_ok=True)
        else:
            p.rename(aside)
    for _, p in ckpts[:-keep] if keep > 0 else []:
        rmtree(p)
    newest = ckpts[-1][1] if ckpts else None
    complete = {p.name for _, p in ckpts}
    for p in location(root).glob("step-*"):
        # leftovers: a crashed local write's .tmp/.old; in an object store, a step written in
        # place that never got its meta.json (prune runs between saves, never during one)
        leftover = p.name.endswith((".tmp", ".old")) or (is_url(p) and p.name not in complete)
        if leftover and newest is not None:
            rmtree(p)


# ------------------------------------------------------------------ load

def _has_meta(path: Path) -> bool:
    try:
        return (path / META).is_file()
    except OSError:
        return False


def resolve(path: str | Path) -> Path:
    """``path``, or the copy that stands in for it while :func:`save` swaps a new version in:
    the previous version moved aside (``<name>.old``) when ``path`` is missing, or, with no
    aside copy (the first save of that name; in an object store, ``<name>`` being copied over),
    the new version in ``<name>.tmp`` once its meta.json is written (it is whole then)."""
    path = location(path)
    if _has_meta(path):
        return path
    for suffix in (ASIDE, TMP):
        other = path.with_name(path.name + suffix)
        if _has_meta(other):
            log.warning("checkpoint %s is being replaced (a save was interrupted): loading %s", path, other)
            return other
    return path


def read_meta(path: str | Path) -> dict:
    return _read_meta_at(resolve(path))


def _read_meta_at(path: Path) -> dict:
    meta_path = path / META
    try:
        found = path.is_dir()
    except OSError:  # (an object store's denied access: check_bucket says which)
        found = False
    if not found:
        check_bucket(path, "checkpoint")  # an object store: a denied read or no bucket, not "not found"
        raise CheckpointError(f"checkpoint not found: {path}")
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a complete gmeta checkpoint ({META} missing)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step", 0), int):
        raise CheckpointError(f"{meta_path}: not gmeta checkpoint metadata")
    return meta


def config_of(path: str | Path, meta: dict) -> Config:
    """The config a checkpoint was trained with (its metadata's copy)."""
    try:
        return config_from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{location(path) / META}: invalid config: {e}") from None


def load_training_state(path: str | Path, model, dense_opt: torch.optim.Optimizer) -> tuple[dict, dict | None]:
    """Collective: restore a training checkpoint into this process group's (sharded) model
    and both optimizers, whatever world size or sharding plan wrote it. Returns (meta, this
    rank's own state, or None when the checkpoint was written by a different world size)."""
    path = resolve(path)
    meta = load_model_and_optimizers(path, model, dense_opt)
    rank_state = None
    own = path / f"rank-{dist.get_rank()}.json"
    if meta.get("world_size") == dist.get_world_size() and own.is_file():
        try:
            rank_state = json.loads(own.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{own}: not valid JSON: {e}") from None
    return meta, rank_state


def load_model_and_optimizers(path: str | Path, model, dense_opt: torch.optim.Optimizer) -> dict:
    """Collective: the model and both optimizers' states of a training checkpoint (any world
    size or plan), not its data position or random state. Returns its meta."""
    path = resolve(path)
    meta = read_meta(path)
    if not meta.get("training_state"):
        raise CheckpointError(f"{path}: holds model weights only, not optimizer and reader state")
    state, fused_sd, dense_sd = _training_state(model, dense_opt)
    _dcp_load(state, path)
    model.load_state_dict({k: v for k, v in state.items() if k != "optim"})
    if dense_sd is not None:
        dense_opt.load_state_dict(dense_sd)  # its tensors were loaded in place
    if fused_sd is not None:
        _fused_optimizer(model).load_state_dict(fused_sd)
    return meta


def load_weights(state: dict, path: str | Path) -> None:
    """Collective: fill a (sharded) model's ``state_dict()`` from a checkpoint's weights."""
    _dcp_load(state, resolve(path))


# what the shape of a model is made of: a checkpoint's weights fit a model when these agree
_SHAPE_KEYS = ("model.arch", "model.embedding_dim", "model.dense_arch", "model.over_arch", "model.objective")
# and the keys that shape one model.arch's head only
_ARCH_SHAPE_KEYS = {"dcn_v2": ("model.cross_layers", "model.cross_rank", "model.cross_structure"),
                    "mmoe": ("model.experts", "model.expert_arch"),
                    "din": ("model.attention_arch",)}


def _shape_keys(cfg: Config) -> tuple[str, ...]:
    """The keys that shape this config's model: _SHAPE_KEYS and its arch's own."""
    return _SHAPE_KEYS + _ARCH_SHAPE_KEYS.get(cfg.model.arch, ())


def load_init(path: str | Path, model, cfg: Config, key: str = "train.init_from") -> list[str]:
    """Collective: fill a (sharded) model's weights from a checkpoint of a model of the same
    shape (its tables resharded to this model's plan by DCP); optimizer state is not read.
    Returns the names of this model's tensors the checkpoint does not hold (they keep their
    values: e.g. Meta-SGD's learned rates when starting from an ERM checkpoint). Raises
    CheckpointError naming ``key`` and what differs."""
    path = resolve(path)
    meta = read_meta(path)
    theirs = config_of(path, meta)
    for k in _shape_keys(cfg):
        a, b = _dotted(theirs, k), _dotted(cfg, k)
        if a != b:
            raise CheckpointError(f"{key}: {path} holds a model with {k} {a!r}, this config has {b!r}")
    def rows(c: Config) -> list[tuple]:  # a default row for new ids is one row more
        return [(s.name, s.num_embeddings + int(s.min_count > 0 or s.holdout_share > 0), s.ids, s.table)
                for s in c.features.sparse] + [("dense", len(c.features.dense))]

    mine, other = rows(cfg), rows(theirs)
    if mine != other:
        raise CheckpointError(f"{key}: {path} holds a model of other features (name, table rows, ids, shared table; "
                              "dense count) "
                              f"{other}, this config has {mine} (a feature with min_count or holdout_share > 0 "
                              "has a default row, one row more)")
    reader = safe_reader(path)
    try:
        stored = set(reader.read_metadata().state_dict_metadata)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{key}: {path}: cannot read checkpoint metadata: {type(e).__name__}: {e}") from None
    state = model.state_dict()
    missing = sorted(k for k in state if k not in stored)
    wanted = {k: v for k, v in state.items() if k in stored}
    _dcp_load(wanted, path)
    model.load_state_dict({**state, **wanted})
    return missing


def _dotted(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


# ------------------------------------------------------------------ resuming another config's checkpoint

def model_differences(theirs: Config, mine: Config) -> list[tuple[str, Any, Any]]:
    """(config key, the checkpoint's value, this config's value) of each setting that shapes
    the model's tensors and differs: _SHAPE_KEYS, the sparse features and their table
    rows, the dense features."""
    out = [(k, _dotted(theirs, k), _dotted(mine, k)) for k in _shape_keys(mine)
           if _dotted(theirs, k) != _dotted(mine, k)]
    a, b = [s.name for s in theirs.features.sparse], [s.name for s in mine.features.sparse]
    if a != b:
        out.append(("features.sparse (names, in order)", a, b))
    rows = {s.name: s.num_embeddings for s in theirs.features.sparse}
    out += [(f"features.sparse[{i}].num_embeddings ({s.name})", rows[s.name], s.num_embeddings)
            for i, s in enumerate(mine.features.sparse) if s.name in rows and rows[s.name] != s.num_embeddings]
    ids = {s.name: s.ids for s in theirs.features.sparse}  # hashed rows and managed slots are not the same rows
    out += [(f"features.sparse[{i}].ids ({s.name})", ids[s.name], s.ids)
            for i, s in enumerate(mine.features.sparse) if s.name in ids and ids[s.name] != s.ids]
    for key in ("table", "max_length"):  # whose table a feature reads; how many cells a sequence takes
        had = {s.name: getattr(s, key) for s in theirs.features.sparse}
        out += [(f"features.sparse[{i}].{key} ({s.name})", had[s.name], getattr(s, key))
                for i, s in enumerate(mine.features.sparse) if s.name in had and had[s.name] != getattr(s, key)]
    if list(theirs.features.dense) != list(mine.features.dense):
        out.append(("features.dense", list(theirs.features.dense), list(mine.features.dense)))
    return out


def _listed(diffs: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {json.dumps(a)} (checkpoint) vs {json.dumps(b)} (this config)" for k, a, b in diffs)


def check_resumable(path: str | Path, cfg: Config, key: str = "train.resume") -> dict:
    """Before a model is built: the checkpoint at ``path`` must hold this config's model.
    Returns its metadata; raises CheckpointError naming ``key`` and each config key that differs."""
    path = location(path)
    meta = read_meta(path)
    diffs = model_differences(config_of(path, meta), cfg)
    if diffs:
        raise CheckpointError(f"{key}: {path} holds a model of another config:\n{_listed(diffs)}\nresume with the "
                              "config it was trained with, or start afresh (another train.output_dir, or "
                              "train.init_from for its weights where they fit)")
    return meta


# the config sections whose keys can change a training checkpoint's tensors
_STATE_SECTIONS = ("model.", "features.", "meta.", "optim.", "sharding.", "generator.")


def _flat_tensors(state: dict, prefix: str = "") -> dict[str, Any]:
    # the keys DCP stores a nested state dict under (its flatten_state_dict joins the path by ".")
    out: dict[str, Any] = {}
    for k, v in state.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat_tensors(v, name))
        elif isinstance(v, torch.Tensor):
            out[name] = v
    return out


def check_state_fits(path: str | Path, model, dense_opt: torch.optim.Optimizer, cfg: Config,
                     key: str = "train.resume") -> None:
    """The training state of ``path`` must fit this model and its optimizers, tensor by
    tensor (global shapes, so any world size): else a CheckpointError naming the tensors
    and the config keys that differ between the checkpoint's config and ``cfg``, rather
    than DCP's error from inside its load plan."""
    path = location(path)
    try:
        stored = safe_reader(path).read_metadata().state_dict_metadata
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{key}: {path}: cannot read checkpoint metadata: {type(e).__name__}: {e}") from None
    state, _, _ = _training_state(model, dense_opt)
    bad = []
    for name, t in _flat_tensors(state).items():
        m = stored.get(name)
        if not isinstance(m, TensorStorageMetadata):  # (the safe reader admits tensors only)
            bad.append(f"{name} (not in the checkpoint)")
        elif tuple(m.size) != tuple(t.size()):
            bad.append(f"{name} ({list(m.size)} in the checkpoint, {list(t.size())} here)")
    if not bad:
        return
    theirs = flatten(to_dict(config_of(path, read_meta(path))))
    mine = flatten(to_dict(cfg))
    diffs = [(k, theirs.get(k), mine.get(k)) for k in list(theirs) + [k for k in mine if k not in theirs]
             if k.startswith(_STATE_SECTIONS) and theirs.get(k) != mine.get(k)]
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    raise CheckpointError(f"{key}: {path} holds a training state that does not fit this model: "
                          f"{'; '.join(bad[:4])}{more}; config keys that differ:\n"
                          + (_listed(diffs) or "  (none in model, features, meta, optim, sharding, generator)"))


def load_sharded(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, Config, dict]:
    """Collective: load a checkpoint's model into this process group's sharded model (tables
    sharded by the config's plan for the current world size; DCP reshards)."""
    from gmeta.parallel.sharding import shard_model

    path = resolve(path)
    meta = read_meta(path)
    cfg = config_of(path, meta)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, device)
    state = model.state_dict()
    _dcp_load(state, location(path))
    model.load_state_dict(state)
    return model, cfg, meta


def load_unsharded(path: str | Path, device: torch.device | None = None) -> tuple[MetaDLRM, Config, dict]:
    """Load a checkpoint into one process: the model with whole (unsharded) tables."""
    path = resolve(path)
    meta = read_meta(path)
    cfg = config_of(path, meta)
    model = build_model(cfg, device=device or torch.device("cpu"))
    state = model.state_dict()
    _dcp_load(state, location(path), no_dist=True)
    model.load_state_dict(state)
    model.eval()
    return model, cfg, meta
