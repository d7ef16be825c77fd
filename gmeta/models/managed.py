"""Managed-collision id tables: every live id of a feature owns a table row.

A feature with ``ids: managed`` reaches the model as 63-bit hashes of its raw ids
(``gmeta.io.features.hash_ids``), not as table rows. ``ManagedIds`` maps them to the
feature's ``num_embeddings`` slots with torchrec's ``MCHManagedCollisionModule``, one per
feature: ``profile`` records the ids a training step sees and, every ``eviction_interval``
steps, the eviction policy decides which ids hold the slots; ``remap`` sends an id to its
slot, or to the last slot (``num_embeddings - 1``), the *miss row* shared by the ids that
hold none.

::

    distinct ids of the step (BatchLayout.kjt, this rank)   ──► all_gather (rank order)
                                                                  │ every rank's ids
                                                                  ▼
    MCH.profile (replicated: same ids, same order on every rank ─► same state)
         │ slots given to new ids: their table rows reset to the miss row (each rank
         │ writes the rows of its own shards; one all_reduce of the miss rows)
         ▼
    MCH.remap (this rank's ids only) ──► slots ──► the sharded lookup, as for hashed ids

Why the remapping is replicated on every rank rather than torchrec's sharded
``ManagedCollisionEmbeddingCollection``:

- gmeta's lookup is its own KJT of a batch's distinct ids (``MetaDLRM.table_ids``),
  remapped before the sharded ``EmbeddingCollection`` sees it; the tables stay sharded as
  any other (table-, row- or column-wise).
- a replicated remapping reshards to any world size by construction: a checkpoint holds
  one copy of each buffer, which loads alike in 1 process or N. torchrec's sharded MC state
  is split by rank and does not restore at another GPU count (TorchEasyRec issue #360), and
  its size must divide by the world size (torchrec issue #1591).
- its cost: per rank, ``num_embeddings`` x (8 bytes of raw id + 8 of slot mapping + 8 per
  int64 metadata buffer) = 32 bytes per slot with distance_lfu (counts and last access),
  24 with lfu or lru: 0.6 MiB for a table of 20,000 slots, 305 MiB for 10M. Plus the
  history buffer of ``eviction_interval`` steps of ids (16 bytes per id, x1.25). Per step,
  one all_gather of the step's distinct managed ids (8 bytes each, padded to the largest
  rank's count) after one all_gather of the counts; none in a single process.

A slot given to a new id (also a slot never used before) has its row reset to the miss
row's current value, so the new id starts from what the ids without a row learned, not from
the row of the id it evicted (torchrec's unsharded ``evict()`` hook leaves that to its
caller). Its fused optimizer state is zeroed: the accumulated squared gradients of another
id (or of the miss row, which every not-admitted occurrence updates) would shrink the new
id's first steps.

Admission happens only in training: when the module is in training mode and gradients are
enabled (a training step's lookup). Scoring (evaluation, validation during training,
prediction, serving) looks up under ``torch.no_grad()`` or after ``eval()``: nothing is
admitted, and an id holding no slot goes where ``features.sparse[].unknown_ids`` says.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from gmeta.io.features import MANAGED_HASH_SIZE

POLICIES = {"distance_lfu": DistanceLFU_EvictionPolicy, "lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy}
_EMPTY = torch.iinfo(torch.int64).max  # the raw id of an empty slot in MCH's buffers


def _live(mc: MCHManagedCollisionModule) -> torch.Tensor:
    """Ids holding a slot: the raw ids are sorted with the empty slots (int64 max) last, so
    a binary search counts them (O(log slots), not a pass over the buffer)."""
    raw = mc._mch_sorted_raw_ids
    return torch.searchsorted(raw, raw.new_tensor([_EMPTY]))[0]


def is_managed(feature: dict) -> bool:
    return feature.get("ids", "hash") == "managed"


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_ids(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's ``parts`` (one 1-d int64 tensor per managed feature), concatenated
    feature by feature in rank order: the same tensors on every rank."""
    world = _world()
    if world == 1:
        return parts
    counts = torch.tensor([p.numel() for p in parts], dtype=torch.int64, device=parts[0].device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    per_rank = torch.stack(all_counts).tolist()  # host sync: the sizes of the next gather
    width = max(sum(c) for c in per_rank)
    mine = torch.cat(parts)
    padded = mine.new_zeros(max(width, 1))
    padded[: mine.numel()] = mine
    got = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(got, padded)
    out: list[list[torch.Tensor]] = [[] for _ in parts]
    for r, counts_r in enumerate(per_rank):
        at = 0
        for f, c in enumerate(counts_r):
            out[f].append(got[r][at: at + c])
            at += c
    return [torch.cat(x) for x in out]


def _grow_history(mc: MCHManagedCollisionModule, incoming: int) -> None:
    """Make room in MCH's history buffer for ``incoming`` more ids. torchrec sizes it once,
    from its first ``profile`` call (that call's ids x eviction_interval x 1.25), and drops
    the ids of a later call that do not fit: they would silently never be admitted."""
    size = mc._input_history_buffer_size
    off = mc._current_history_buffer_offset
    if size < 0 or off + incoming <= size:
        return
    new_size = max(off + incoming, 2 * size)
    acc = mc._history_accumulator.new_empty(new_size)
    acc[:off] = mc._history_accumulator[:off]
    mc._history_accumulator = acc
    for name in list(mc._history_metadata):
        old = getattr(mc, "_history_" + name)
        buf = old.new_zeros(new_size)
        buf[:off] = old[:off]
        setattr(mc, "_history_" + name, buf)  # (replaces the registered buffer)
        mc._history_metadata[name] = buf
    mc._input_history_buffer_size = new_size


class _TableViews:
    """The local pieces of one table (and of its fused optimizer state) as writable views:
    ``(first row, first column, tensor)``. torchrec exposes a sharded table as a
    ShardedTensor whose local shards are views of fbgemm's weights, and an unsharded one as
    its parameter; DCP and ``load_state_dict`` copy into these tensors, so the views stay
    valid for the module's life."""

    def __init__(self, ec, table: str) -> None:
        key = f"embeddings.{table}.weight"
        whole = ec.state_dict()[key]
        self.weight = self._pieces(whole)
        self.dim = whole.size(1)
        self.state: list[tuple[int, int, torch.Tensor]] = []
        fused = getattr(ec, "fused_optimizer", None)
        if fused is not None:
            per_param = fused.state_dict()["state"]
            for k, states in per_param.items():
                if k == key or k.endswith("." + key):
                    for v in states.values():
                        if isinstance(v, torch.Tensor) and v.dim() >= 1:
                            self.state += self._pieces(v)

    @staticmethod
    def _pieces(t) -> list[tuple[int, int, torch.Tensor]]:
        if hasattr(t, "local_shards"):
            out = []
            for s in t.local_shards():
                offs = s.metadata.shard_offsets
                out.append((offs[0], offs[1] if len(offs) > 1 else 0, s.tensor))
            return out
        return [(0, 0, t.data if isinstance(t, nn.Parameter) else t)]


class ManagedIds(nn.Module):
    """The managed-collision remapping of every ``ids: managed`` feature (see the module
    docstring). Buffers: each MCH module's (saved with the model: the remapping travels with
    the checkpoint) and ``evictions_<feature>``, the ids evicted from a slot so far."""

    miss_occurrences: torch.Tensor  # buffers, registered in __init__
    occurrences: torch.Tensor

    def __init__(self, features: list[dict], device: torch.device | None = None) -> None:
        super().__init__()
        here = torch.device("cpu") if device is None or device.type == "meta" else device
        managed = [f for f in features if is_managed(f)]
        self.names = [f["name"] for f in managed]
        self.slots = {f["name"]: int(f["num_embeddings"]) for f in managed}
        self.unknown = {f["name"]: f.get("unknown_ids", "miss_row") for f in managed}
        self.mc = nn.ModuleDict({
            f["name"]: MCHManagedCollisionModule(
                zch_size=int(f["num_embeddings"]), device=here,
                eviction_policy=POLICIES[f.get("eviction_policy", "distance_lfu")](),
                eviction_interval=int(f.get("eviction_interval", 1)), input_hash_size=MANAGED_HASH_SIZE,
                name=f["name"])
            for f in managed})
        for name in self.names:
            self.register_buffer(f"evictions_{name}", torch.zeros((), dtype=torch.int64, device=here))
        # occurrences on the miss row, and all occurrences, per feature since the last read
        self.register_buffer("miss_occurrences", torch.zeros(len(managed), dtype=torch.float64, device=here),
                             persistent=False)
        self.register_buffer("occurrences", torch.zeros(len(managed), dtype=torch.float64, device=here),
                             persistent=False)
        self._views: dict[str, _TableViews] = {}
        self._views_of: int | None = None

    def module_of(self, name: str) -> MCHManagedCollisionModule:
        return cast(MCHManagedCollisionModule, self.mc[name])

    def to_device(self, device: torch.device) -> None:
        """Move to ``device``; MCH modules allocate their history buffer on the device they
        were built for, so that is updated too."""
        self.to(device)
        for name in self.names:
            self.module_of(name)._device = device

    def admitting(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def live_ids(self) -> dict[str, int]:
        """Ids holding a slot, per feature (a host read)."""
        return {n: int(_live(self.module_of(n))) for n in self.names}

    # ------------------------------------------------------------------ remap
    def forward(self, kjt: KeyedJaggedTensor, ec=None, admit: bool | None = None,
                counts: torch.Tensor | None = None) -> tuple[KeyedJaggedTensor, torch.Tensor | None]:
        """``kjt`` with every managed feature's ids replaced by their slots, and a ``[nnz]``
        float mask that is 0 where an id must look up zeros (``unknown_ids: zero`` when not
        admitting), else None. ``admit`` (default: ``admitting()``): profile the ids first
        (collective when a process group runs: every rank must call it for the same steps)
        and reset the rows of ``ec`` (the sparse arch's EmbeddingCollection, sharded or not)
        that new ids took. ``counts``: occurrences of each id of ``kjt`` in the batch (for
        the miss-row share; None: one each)."""
        if not self.names:
            return kjt, None
        admit = self.admitting() if admit is None else admit
        keys = kjt.keys()
        values, bounds = kjt.values(), kjt.offset_per_key()
        segs = [values[bounds[i]: bounds[i + 1]] for i in range(len(keys))]
        mine = [keys.index(n) for n in self.names]
        if admit:
            self._admit([segs[i] for i in mine], ec)
        zero = None
        for k, i in enumerate(mine):
            name = keys[i]
            mc = self.module_of(name)
            remapped = mc.remap({name: JaggedTensor(values=segs[i], lengths=segs[i].new_tensor([segs[i].numel()]))})
            slots = remapped[name].values()
            miss = slots == self.slots[name] - 1
            if admit:
                c = counts[bounds[i]: bounds[i + 1]].double() if counts is not None \
                    else torch.ones_like(miss, dtype=torch.float64)
                self.occurrences[k] += c.sum()
                self.miss_occurrences[k] += (c * miss).sum()
            if not admit and self.unknown[name] == "zero":
                if zero is None:
                    zero = torch.ones(values.numel(), dtype=torch.float32, device=values.device)
                zero[bounds[i]: bounds[i + 1]] = (~miss).float()
            segs[i] = slots
        out = KeyedJaggedTensor(keys=keys, values=torch.cat(segs), lengths=kjt.lengths(), offsets=kjt.offsets(),
                                stride=kjt.stride(), length_per_key=kjt.length_per_key(), offset_per_key=bounds)
        return out, zero

    @torch.no_grad()
    def _admit(self, parts: list[torch.Tensor], ec) -> None:
        gathered = gather_ids(parts)
        evicted: dict[str, torch.Tensor] = {}
        for name, ids in zip(self.names, gathered):
            mc = self.module_of(name)
            before = _live(mc)
            _grow_history(mc, ids.numel())
            mc.profile({name: JaggedTensor(values=ids, lengths=ids.new_tensor([ids.numel()]))})
            slots = mc.evict()
            if slots is not None and slots.numel():
                after = _live(mc)
                # slots given = slots filled for the first time + slots taken from another id
                getattr(self, f"evictions_{name}").add_(slots.numel() - (after - before))
                evicted[name] = slots
        if evicted and ec is not None:
            self.reset_rows(ec, evicted)

    @torch.no_grad()
    def reset_rows(self, ec, slots: dict[str, torch.Tensor]) -> None:
        """Set the table rows ``slots`` (per feature) of ``ec`` to the feature's miss row and
        zero their fused optimizer state. Each rank writes the rows it holds; the miss rows
        reach every rank by one all_reduce (each column of a miss row lives on one rank,
        zeros elsewhere). Collective when a process group runs: the MCH state, so ``slots``,
        is the same on every rank."""
        if self._views_of != id(ec):
            self._views, self._views_of = {}, id(ec)
        names = list(slots)
        for n in names:
            if n not in self._views:
                self._views[n] = _TableViews(ec, f"t_{n}")
        dim = self._views[names[0]].dim
        device = self.occurrences.device  # (a rank may hold no piece of a table)
        miss = torch.zeros(len(names), dim, dtype=torch.float32, device=device)
        for j, n in enumerate(names):
            row = self.slots[n] - 1
            for r0, c0, t in self._views[n].weight:
                if r0 <= row < r0 + t.size(0):
                    miss[j, c0: c0 + t.size(1)] = t[row - r0].float()
        if _world() > 1:
            dist.all_reduce(miss)
        for j, n in enumerate(names):
            s = slots[n]
            for r0, c0, t in self._views[n].weight:
                local = s[(s >= r0) & (s < r0 + t.size(0))] - r0
                if local.numel():
                    t[local] = miss[j, c0: c0 + t.size(1)].to(t.dtype)
            for r0, _, t in self._views[n].state:
                local = s[(s >= r0) & (s < r0 + t.size(0))] - r0
                if local.numel():
                    t[local] = 0

    @torch.no_grad()
    def drop_ids(self, name: str, keep: torch.Tensor) -> int:
        """Free the slot of every id of feature ``name`` that is not in ``keep`` (int64 id
        hashes, as the shards hold them); returns how many. A freed slot is empty to MCH:
        the next id admitted takes it (its row reset then, as for any slot given). The same
        on every rank: ``keep`` comes from the data set, not from this rank's batches."""
        mc = self.module_of(name)
        raw = mc._mch_sorted_raw_ids
        stale = (raw != _EMPTY) & ~torch.isin(raw, keep.to(raw.device))
        n = int(stale.sum())
        if n:
            raw[stale] = _EMPTY
            for buf in mc._mch_metadata.values():  # occurrences, last seen: those of an empty slot
                buf[stale] = 0
            mc._sort_mch_buffers()  # (empty slots last: what remap and open_slots search)
            getattr(self, f"evictions_{name}").add_(n)
        return n

    def read_stats(self) -> dict[str, torch.Tensor]:
        """Per feature: ``[occurrences on the miss row, occurrences]`` since the last read
        (this rank's), then reset."""
        out = {n: torch.stack([self.miss_occurrences[k], self.occurrences[k]]).clone()
               for k, n in enumerate(self.names)}
        self.miss_occurrences.zero_()
        self.occurrences.zero_()
        return out


def training_metrics(managed: ManagedIds) -> dict[str, float]:
    """What training logs per managed feature on a log step: ``live_ids`` (ids holding a
    slot), ``evictions`` (ids evicted from a slot so far) and ``miss_share`` (the share of
    the id occurrences since the last log step, over every rank, that went to the miss
    row). Collective when a process group runs (one all_reduce); reads the device."""
    if not managed.names:
        return {}
    stats = managed.read_stats()
    sums = torch.stack([stats[n] for n in managed.names])  # [features, 2]
    if _world() > 1:
        dist.all_reduce(sums)
    live = managed.live_ids()
    out = {}
    for k, n in enumerate(managed.names):
        miss, occ = sums[k].tolist()
        out[f"train/managed/{n}/live_ids"] = float(live[n])
        out[f"train/managed/{n}/evictions"] = float(getattr(managed, f"evictions_{n}"))
        out[f"train/managed/{n}/miss_share"] = miss / occ if occ else 0.0
    return out
