"""The meta-learning model: the sparse arch (torchrec tables, sharded) under a dense head.

::

    KeyedJaggedTensor ──► SparseArch (torchrec EmbeddingCollection, one table per feature)
                              │ per-id embeddings  (the unit MAML can adapt per task)
                              ▼ pool per (row, feature): sum or mean  ──► [R, F, D]
    dense [R, nd] ──────────► head (model.arch: dlrm, dcn_v2, deepfm, wide_deep;
                              gmeta.models.heads) ──► output [R]

The sparse arch returns *unpooled* per-id embeddings (an EmbeddingCollection, not an
EmbeddingBagCollection) so the inner loop can differentiate with respect to each looked-up
row: a task's fast embedding rows are then exact per-row fast weights. The head's dense
layers are ``MetaLinear`` layers taking per-task weights (see gmeta.models.heads).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.modules.embedding_configs import DataType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from gmeta.config import Config
from gmeta.layout import BatchLayout, cell_widths
from gmeta.models.generator import IdGenerator
from gmeta.models.heads import (  # noqa: F401
    FILM,
    DLRMHead,
    Head,
    LinearHook,
    MetaLinear,
    Params,
    adapted_layers,
    adapted_shapes,
    build_head,
)
from gmeta.models.managed import ManagedIds


class SparseArch(nn.Module):
    """One embedding table per sparse feature; returns per-id embeddings per feature. A
    feature with a default row for new ids (``min_count``, ``holdout_share``) has one row more than its hash
    range: row ``num_embeddings`` (``DefaultRows``). A feature naming another's ``table``
    has no table of its own: torchrec's table of the named feature serves both
    (``feature_names=[owner, sharer, ...]``), sharded and optimized as one table."""

    def __init__(self, features: list[dict], embedding_dim: int, device: torch.device | None = None,
                 dtype: str = "fp32") -> None:
        super().__init__()
        self.feature_names = [f["name"] for f in features]
        data_type = {"fp32": DataType.FP32, "fp16": DataType.FP16}[dtype]
        sharers: dict[str, list[str]] = {}
        for f in features:
            if f.get("table"):
                sharers.setdefault(f["table"], []).append(f["name"])
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name=f"t_{f['name']}", embedding_dim=embedding_dim, data_type=data_type,
                                num_embeddings=f["num_embeddings"] + int(has_default_row(f)),
                                feature_names=[f["name"], *sharers.get(f["name"], [])])
                for f in features if not f.get("table")
            ],
            device=device,
        )

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        return self.ec(kjt)


def has_default_row(feature: dict) -> bool:
    return feature.get("min_count", 0) > 0 or feature.get("holdout_share", 0.0) > 0


class DefaultRows(nn.Module):
    """Maps the ids a feature's ``known_<name>`` buffer marks as not known (seen fewer than
    ``min_count`` times in training, or held out) to the feature's default row, the table's
    row ``num_embeddings``; before any table lookup, so sharded tables see only table rows.

    The masks are buffers: saved in checkpoints with the weights, so evaluation, prediction
    and serving map exactly the ids the model was trained to map. Each distinct new id of a
    task still adapts its own copy of the default row in the inner loop (the layout's groups
    are made of the ids before this map), so two new ids in one task stay apart.
    """

    def __init__(self, features: list[dict]) -> None:
        super().__init__()
        self.default = {f["name"]: f["num_embeddings"] for f in features if has_default_row(f)}
        for name, n in self.default.items():  # all known until set_known: nothing is mapped
            self.register_buffer(f"known_{name}", torch.ones(n, dtype=torch.bool))

    def set_known(self, name: str, known: torch.Tensor) -> None:
        buf = getattr(self, f"known_{name}")
        if known.shape != buf.shape:
            raise ValueError(f"known ids of {name}: {tuple(known.shape)} rows, the table has {tuple(buf.shape)}")
        buf.copy_(known)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if not self.default:
            return kjt
        values, bounds = kjt.values(), kjt.offset_per_key()  # (host-side when the KJT was built with them)
        parts = []
        for i, key in enumerate(kjt.keys()):
            seg = values[bounds[i]: bounds[i + 1]]
            if key in self.default:
                known: torch.Tensor = getattr(self, f"known_{key}")
                seg = torch.where(known[seg], seg, torch.full_like(seg, self.default[key]))
            parts.append(seg)
        return KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(parts), lengths=kjt.lengths(),
                                 offsets=kjt.offsets(), stride=kjt.stride(), length_per_key=kjt.length_per_key(),
                                 offset_per_key=bounds)

    def shares(self, kjt: KeyedJaggedTensor) -> dict[str, tuple[int, int]]:
        """Per feature with a default row: (occurrences mapped to it, occurrences) in ``kjt``."""
        out = {}
        values, bounds = kjt.values(), kjt.offset_per_key()
        for i, key in enumerate(kjt.keys()):
            if key in self.default:
                seg = values[bounds[i]: bounds[i + 1]]
                out[key] = (int((~getattr(self, f"known_{key}")[seg]).sum()), int(seg.numel()))
        return out


def lookup_rows(emb: dict[str, JaggedTensor], features: list[dict]) -> torch.Tensor:
    """The sparse arch's output for a KJT of distinct ids (``BatchLayout.kjt``) as one
    ``[U, D]`` tensor, features in order: the rows the layout's indices point into. fp32
    whatever the tables store (model.embedding_dtype)."""
    rows = torch.cat([emb[f["name"]].values() for f in features])
    return rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows


class MetaDLRM(nn.Module):
    """The model for meta learning: ``sparse_arch`` (sharded by torchrec) + ``head`` (dense;
    a DLRM's unless ``head`` is given: any head of gmeta.models.heads)."""

    def __init__(self, features: list[dict], num_dense: int, embedding_dim: int, dense_sizes: list[int],
                 over_sizes: list[int], device: torch.device | None = None, objective: str = "binary",
                 embedding_dtype: str = "fp32", generator: dict | None = None, head: Head | None = None) -> None:
        """``generator``: the id generator of new ids' rows (``gmeta.models.generator``), as
        {"feature", "attributes" (names), "hidden", "base_fixed", "every_id"}; None: none."""
        super().__init__()
        self.features = [dict(f) for f in features]
        self.embedding_dim = embedding_dim
        self.sparse_arch = SparseArch(self.features, embedding_dim, device=device, dtype=embedding_dtype)
        self.head: Head = head if head is not None else DLRMHead(num_dense, len(features), embedding_dim,
                                                                 dense_sizes, over_sizes, objective)
        self.default_rows = DefaultRows(self.features)
        self.generator: IdGenerator | None = None
        self.generator_only = False  # generator.mode base_fixed: the generator is the only dense part trained
        # features no head reads (features.sparse[].head false): the generator's inputs only,
        # whose tables learn with the generator even under base_fixed (nothing else trains them)
        self.generator_tables = [i for i, f in enumerate(self.features) if not f.get("head", True)]
        # generator.train_ids all: the feature's default row [D], a constant of the (fixed) tables,
        # that every id of the feature starts from in training (``default_row``, set by training)
        self.generator_base: torch.Tensor | None = None
        if generator is not None:
            names = [f["name"] for f in self.features]
            self.generator = IdGenerator(names.index(generator["feature"]),
                                         [names.index(a) for a in generator["attributes"]], embedding_dim,
                                         generator["hidden"], every_id=bool(generator.get("every_id", False)))
            self.generator_only = bool(generator["base_fixed"])
        self.managed = ManagedIds(self.features, device)  # features.sparse[].ids: managed
        if device is not None and device.type != "meta":
            self.head.to(device)
            self.default_rows.to(device)
            if self.generator is not None:
                self.generator.to(device)

    @property
    def num_features(self) -> int:
        return len(self.features)

    def enable_meta_sgd(self, adapt_dense: list[str], inner_lr: float, embedding_inner_lr: float,
                        dense_adaptation: str = "weights") -> None:
        """Meta-SGD: learn one inner learning rate per element of every adapted dense
        parameter (``adapted_shapes``), and one per (feature, embedding dim) for the
        embedding rows."""
        device = next(self.head.parameters()).device
        self.inner_lr_dense = nn.ParameterDict({
            name.replace(".", "__"): nn.Parameter(torch.full(shape, inner_lr, device=device))
            for name, shape in adapted_shapes(self.head, adapt_dense, dense_adaptation).items()})
        self.inner_lr_emb = nn.Parameter(torch.full((self.num_features, self.embedding_dim), embedding_inner_lr,
                                                    device=device))

    def dense_to(self, device: torch.device) -> None:
        """Move the data-parallel part (head, Meta-SGD rates) to ``device``, leaving the tables
        where they are: torchrec places those when it shards them, and
        ``DistributedModelParallel(init_data_parallel=False)`` moves nothing else. Call it
        before making optimizers: a parameter held directly may be replaced."""
        self.head.to(device)
        self.default_rows.to(device)
        if self.generator is not None:
            self.generator.to(device)
        self.managed.to_device(device)
        if hasattr(self, "inner_lr_dense"):
            self.inner_lr_dense.to(device)
            self.inner_lr_emb = nn.Parameter(self.inner_lr_emb.detach().to(device))

    def inner_lrs(self, inner_lr: float, embedding_inner_lr: float) -> tuple:
        """(dense lr, embedding lr) for the inner loop: the learned tensors under Meta-SGD,
        else the configured constants."""
        if not hasattr(self, "inner_lr_dense"):
            return inner_lr, embedding_inner_lr
        return {k.replace("__", "."): v for k, v in self.inner_lr_dense.items()}, self.inner_lr_emb

    def dense_parameters(self) -> list[nn.Parameter]:
        """Data-parallel parameters: the head, the Meta-SGD learning rates if any and the id
        generator if any; the generator's alone under generator.mode base_fixed."""
        gen = list(self.generator.parameters()) if self.generator is not None else []
        if self.generator_only:
            return gen
        extra = list(self.inner_lr_dense.parameters()) + [self.inner_lr_emb] if hasattr(self, "inner_lr_dense") else []
        return list(self.head.parameters()) + extra + gen

    @property
    def pooling(self) -> list[str]:
        return [f["pooling"] for f in self.features]

    @property
    def cell_widths(self) -> list[int]:
        """Cells per row of each feature (``BatchLayout``): a sequence's max_length, else 1."""
        return cell_widths(self.features)

    def lookup(self, layout: BatchLayout) -> torch.Tensor:
        """One embedding lookup (one all-to-all when sharded) of the distinct ids of a
        batch: ``[U, D]`` rows, expanded to every occurrence by the layout's indices."""
        counts = None
        if self.managed.names and self.managed.admitting():  # occurrences per distinct id: the miss-row share
            counts = torch.bincount(layout.occ_unique, minlength=layout.unique_ids.numel())
        kjt, zero = self._table_ids(layout, counts)
        rows = lookup_rows(self.sparse_arch(kjt), self.features)
        return rows if zero is None else rows * zero.unsqueeze(1)

    def table_ids(self, layout: BatchLayout) -> KeyedJaggedTensor:
        """The batch's distinct ids as the tables are asked for them: new ids mapped to their
        feature's default row (``DefaultRows``), managed ids to their slots (``ManagedIds``;
        in a training step, admitting them first)."""
        return self._table_ids(layout)[0]

    def _table_ids(self, layout: BatchLayout, counts: torch.Tensor | None = None):
        kjt = self.default_rows(layout.kjt([f["name"] for f in self.features]))
        return self.managed(kjt, self.sparse_arch.ec, counts=counts)

    def start_rows(self, rows: torch.Tensor, layout: BatchLayout, every_id: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows a batch's distinct ids start from (``lookup``'s ``[U, D]``): the generated
        row for each new id of the generator's feature (``IdGenerator.generated_rows``; under
        base_fixed from constant table rows). ``every_id`` (generator.train_ids all, in
        training): every id of the feature is taken for new, starting from the default row
        ``generator_base``. Returns (rows, which distinct ids were generated [U] bool, or
        None without a generator)."""
        if self.generator is None:
            return rows, None
        known: torch.Tensor = getattr(self.default_rows, f"known_{self.features[self.generator.feature]['name']}")
        if every_id:
            if self.generator_base is None:
                raise RuntimeError("generator.train_ids all: the default row was not looked up (default_row)")
            lo, hi = layout.key_span(self.generator.feature)
            base = self.generator_base.to(rows.dtype).expand(hi - lo, -1)
            # no id known: a stride-0 view of one False (no [num_embeddings] mask made each step)
            rows, known = torch.cat([rows[:lo], base, rows[hi:]]), known.new_zeros(()).expand(known.shape)
        return self.generator.generated_rows(rows, layout, known,
                                             detach_inputs=self.generator_only and not self.generator_tables)

    def fixed_rows(self, rows: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Under generator.mode base_fixed: the looked-up rows ``[U, D]`` as constants, but
        those of the features only the generator reads, which learn with it."""
        if not self.generator_tables:
            return rows.detach()
        parts, lo = [], 0
        for f, n in enumerate(layout.unique_per_key):  # each feature's distinct ids, in order
            parts.append(rows[lo:lo + n] if f in self.generator_tables else rows[lo:lo + n].detach())
            lo += n
        return torch.cat(parts)

    def default_row(self, feature: int) -> torch.Tensor:
        """Feature ``feature``'s default row ``[D]`` (its table's row ``num_embeddings``),
        looked up as a batch of one row that holds it alone: one all-to-all when sharded, so
        every rank calls this together."""
        f = self.features[feature]
        device = next(self.head.parameters()).device
        lengths = torch.zeros(len(self.features), dtype=torch.int64, device=device)
        lengths[feature] = 1
        kjt = KeyedJaggedTensor(keys=[g["name"] for g in self.features], lengths=lengths,
                                values=torch.tensor([f["num_embeddings"]], dtype=torch.int64, device=device))
        ids, _ = self.managed(kjt, admit=False)
        with torch.no_grad():
            return lookup_rows(self.sparse_arch(ids), [f])[0].clone()

    def set_known_ids(self, known: dict[str, torch.Tensor]) -> None:
        """The ids that keep their own rows, per feature with a default row ([num_embeddings]
        bool each; ``gmeta.io.id_counts.known_mask``)."""
        for name, mask in known.items():
            self.default_rows.set_known(name, mask)

    def forward(self, kjt: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """Plain forward without adaptation: outputs ``[R]`` (see ``Head.predict``)."""
        ids, zero = self.managed(self.default_rows(kjt), admit=False)  # scoring: nothing is admitted
        emb = self.sparse_arch(ids)
        num_rows = kjt.stride()
        bounds = kjt.offset_per_key()
        cells = []
        for i, (f, width) in enumerate(zip(self.features, self.cell_widths)):
            jt = emb[f["name"]]
            lengths, values = jt.lengths(), jt.values()
            values = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
            if zero is not None:  # unknown managed ids as zeros (unknown_ids: zero)
                values = values * zero[bounds[i]: bounds[i + 1]].unsqueeze(1)
            rows = torch.repeat_interleave(torch.arange(num_rows, device=lengths.device), lengths)
            if width > 1:  # a sequence: its i-th id in the row's i-th cell of the feature
                starts = torch.cumsum(lengths, 0) - lengths
                pos = torch.arange(values.shape[0], device=lengths.device) - torch.repeat_interleave(starts, lengths)
                if values.shape[0]:  # (an assert on the device: no host sync; prepare and scoring cut sequences)
                    torch._assert_async(pos.max() < width, f"sequence feature {f['name']!r} holds more than its "
                                        f"max_length {width} ids in a row (features.sparse[].max_length)")
                rows = rows * width + pos
            cell = values.new_zeros(num_rows * width, values.shape[-1]).index_add(0, rows, values)
            if f["pooling"] == "mean":
                cell = cell / lengths.clamp(min=1).unsqueeze(1).to(cell.dtype)
            cells.append(cell.view(num_rows, width, -1))
        pooled = torch.cat(cells, dim=1)
        if self.generator is not None:  # new ids of its feature start from their generated row
            name = self.features[self.generator.feature]["name"]
            known: torch.Tensor = getattr(self.default_rows, f"known_{name}")
            pooled = self.generator.generate_cells(pooled, ~known[kjt[name].values()])
        return self.head(dense, pooled)


def model_device(model) -> torch.device:
    """The device of a model's dense part (a MetaDLRM, or one sharded by torchrec): where its
    batches go."""
    inner = model.module if hasattr(model, "module") else model
    return next(inner.head.parameters()).device


def dense_autocast(cfg: Config, device: torch.device):
    """The mixed-precision context of the dense head (model.dense_autocast) on ``device``."""
    if cfg.model.dense_autocast == "none":  # (autocast refuses some device types even when disabled)
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def build_model(cfg: Config, device: torch.device | None = None) -> MetaDLRM:
    from dataclasses import asdict

    model = MetaDLRM(
        features=[asdict(s) for s in cfg.features.sparse],
        num_dense=len(cfg.features.dense),
        embedding_dim=cfg.model.embedding_dim,
        dense_sizes=cfg.model.dense_arch,
        over_sizes=cfg.model.over_arch,
        device=device,
        objective=cfg.model.objective,
        embedding_dtype=cfg.model.embedding_dtype,
        generator={"feature": g.feature, "attributes": g.attributes, "hidden": g.hidden,
                   "base_fixed": g.mode == "base_fixed", "every_id": g.offset_ids == "all"}
        if (g := cfg.generator).feature else None,
        head=build_head(cfg.model, len(cfg.features.dense), len(cfg.features.sparse), cfg.features.loss_weights(),
                        features=[asdict(s) for s in cfg.features.sparse]),
    )
    if cfg.meta.meta_sgd:
        model.enable_meta_sgd(cfg.meta.adapt_dense, cfg.meta.inner_lr, cfg.meta.embedding_inner_lr,
                              cfg.meta.dense_adaptation)
    return model
