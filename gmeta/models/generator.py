"""A meta-learned start for new ids' rows (Meta-Embedding, Pan et al., SIGIR 2019).

An id the model treats as new (``DefaultRows``: seen fewer than ``min_count`` times in
training, or in the hashed holdout) is looked up as its feature's default row. With
``generator.feature`` set, such an id of that feature starts instead from

    generated row = default row + IdGenerator(attribute embeddings of a row holding the id)

where the attribute embeddings are the pooled cells of ``generator.attributes`` (e.g. the
ad's advertiser), concatenated: ``[A * D] -> MLP -> [D]``. The output layer starts at zero,
so a fresh generator gives exactly the default row (the learned start gmeta uses without
it: training from a trained model's ``train.init_from`` then starts from that model's own
scores). Meta-Embedding scales its output down so that a fresh generator is near a typical
row; an offset from the learned default row gets there without a scale to choose.

Two places apply it, both vectorised, with no loop over ids:

* ``generated_rows``: a meta-batch's distinct looked-up rows ``[U, D]`` (``BatchLayout``),
  before any adaptation; each distinct new id's input is taken from the smallest-numbered
  row of the batch that holds it. The meta step, evaluation, prediction and serving go
  through here, so every task (also one with no support rows, scored zero-shot) starts a
  new id from its generated row and the inner loop adapts it per (task, feature, id) group.
* ``generate_cells``: the plain forward's pooled cells ``[R, F, D]``, row by row.

Both give the same row when an id's attributes are the same in every row (an ad has one
advertiser).

``generator.offset_ids: all`` (``every_id``) adds the offset to every id of the feature, a
known id's own row included (``row + IdGenerator(...)``); a new id's looked-up row is the
default row, so it starts from the generated row as above. Trained jointly with the model,
the attributes then reach it through the id's row on every training row.
"""

from __future__ import annotations

import torch
from torch import nn

from gmeta.layout import BatchLayout


class IdGenerator(nn.Module):
    """``[..., A * D]`` attribute embeddings -> ``[..., D]`` offsets from the default row.

    ``feature`` / ``attributes``: indices into the model's sparse features. Dense,
    data-parallel parameters of the model (trained by the dense optimizer, saved with it).
    ``every_id``: the offset is added to every id's row, not only to new ids' default row.
    """

    def __init__(self, feature: int, attributes: list[int], embedding_dim: int, hidden: list[int],
                 every_id: bool = False) -> None:
        super().__init__()
        self.feature, self.attributes, self.every_id = feature, list(attributes), every_id
        dims = [len(attributes) * embedding_dim] + list(hidden)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        out = nn.Linear(dims[-1], embedding_dim)
        nn.init.zeros_(out.weight)  # a fresh generator gives the default row itself
        nn.init.zeros_(out.bias)
        self.mlp = nn.Sequential(*layers, out)

    def forward(self, attributes: torch.Tensor) -> torch.Tensor:
        return self.mlp(attributes)

    def generate_cells(self, cells: torch.Tensor, new: torch.Tensor, detach_inputs: bool = False) -> torch.Tensor:
        """Pooled cells ``[R, F, D]`` of rows whose id of ``feature`` is new (``new [R]``
        bool) get their generated row: that cell (the default row) plus the offset from the
        row's own attribute cells."""
        x = cells[:, self.attributes].flatten(1)
        base = cells[:, self.feature]
        if detach_inputs:
            x, base = x.detach(), base.detach()
        generated = base + self(x)
        if not self.every_id:
            generated = torch.where(new.unsqueeze(1), generated, cells[:, self.feature])
        return torch.cat([cells[:, :self.feature], generated.unsqueeze(1), cells[:, self.feature + 1:]], dim=1)

    def generated_rows(self, rows: torch.Tensor, layout: BatchLayout, known: torch.Tensor,
                       detach_inputs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's distinct looked-up rows ``[U, D]`` with each new id of ``feature``
        (``known [num_embeddings]`` False for it) replaced by its generated row (with
        ``every_id``, every id of ``feature`` offset). Returns (rows ``[U, D]``, new ``[U]``
        bool: the distinct new ids, whose rows the cold-start term scores). ``detach_inputs``:
        the default row and the attribute embeddings enter as constants (the tables learn
        nothing through the generator)."""
        L, f = layout, self.feature
        nf = L.num_cells  # (= num_features: the generator does not combine with sequences)
        lo, hi = L.key_span(f)
        ids = L.unique_ids[lo:hi]
        new_f = ~known[ids]
        # one row holding each distinct id: the smallest, a deterministic choice (a plain
        # scatter keeps an arbitrary one of the duplicates on a GPU)
        occ_row = torch.div(L.slot, nf, rounding_mode="floor")
        holder = torch.full((L.num_unique,), L.num_rows, dtype=occ_row.dtype, device=occ_row.device)
        holder = holder.scatter_reduce(0, L.occ_unique, occ_row, reduce="amin")[lo:hi]
        source = rows.detach() if detach_inputs else rows
        cells = L.pool(source.index_select(0, L.occ_unique), L.slot, L.divisor, L.num_rows)  # [R, F, D]
        x = cells.index_select(0, holder)[:, self.attributes].flatten(1)  # [U_f, A * D]
        generated = source[lo:hi] + self(x)
        if not self.every_id:
            generated = torch.where(new_f.unsqueeze(1), generated, rows[lo:hi])
        new = torch.zeros(L.num_unique, dtype=torch.bool, device=rows.device)
        new[lo:hi] = new_f
        return torch.cat([rows[:lo], generated, rows[hi:]]), new
