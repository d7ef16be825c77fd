"""Sequence features in the layout: T cells per row, one id each; groups per feature."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmeta.layout import BatchLayout, build_arrays
from gmeta.models.heads import DLRMHead

# features a (one id), s (a sequence of 3 cells), b (one id); one task: support rows 0, 1,
# query row 2. Values feature-major: a [10, 11, 10]; s [5, 6], [6], [5, 5, 7]; b [1, 1, 2].
VALUES = np.array([10, 11, 10, 5, 6, 6, 5, 5, 7, 1, 1, 2])
LENGTHS = np.array([1, 1, 1, 2, 1, 3, 1, 1, 1])
SO, QO = np.array([0, 2]), np.array([0, 1])


def _layout(widths=(1, 3, 1), lengths=LENGTHS, values=VALUES) -> BatchLayout:
    return BatchLayout.from_arrays(build_arrays(values, lengths, SO, QO, ["sum"] * 3, 1, list(widths)))


def test_cells_and_groups_of_a_batch_with_a_sequence_match_the_hand_computed_layout():
    lay = _layout()
    assert (lay.num_features, lay.num_cells, lay.one_per_cell) == (3, 5, 0)
    # cells per row: a 0, s 1..3, b 4; support occurrences first, feature-major
    assert lay.slot.tolist() == [0, 5, 1, 2, 6, 4, 9, 10, 11, 12, 13, 14]
    assert lay.slot_q.tolist() == [0, 1, 2, 3, 4]
    assert lay.unique_ids.tolist() == [10, 11, 5, 6, 7, 1, 2] and lay.unique_lengths.tolist() == [2, 3, 2]
    # id 5 of s occurs three times in the task (rows 0 and 2, twice in row 2): one group
    assert lay.num_groups == 7 and lay.group_feature.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert lay.occ_unique.tolist() == [0, 1, 2, 3, 3, 5, 5, 0, 2, 2, 4, 6]
    assert lay.divisor.tolist() == [1.0] * 15
    rows = torch.arange(7, dtype=torch.float64).unsqueeze(1) + 1  # row of distinct id u: u + 1
    cells = lay.pool(rows[lay.occ_unique], lay.slot, lay.divisor, lay.num_rows)[..., 0]
    assert cells.tolist() == [[1, 3, 4, 0, 6], [2, 4, 0, 0, 6], [1, 3, 3, 5, 7]]  # empty cells zero


def test_full_sequences_keep_one_per_cell_and_pool_by_reshape():
    values = np.array([10, 11, 5, 6, 7, 8, 9, 5, 1, 2])  # two rows (a support, a query), s of 3 ids each
    lay = BatchLayout.from_arrays(build_arrays(values, np.array([1, 1, 3, 3, 1, 1]), np.array([0, 1]),
                                               np.array([0, 1]), ["sum"] * 3, 1, [1, 3, 1]))
    assert lay.one_per_cell == 1 and lay.slot.tolist() == list(range(10))
    plain = BatchLayout.from_arrays(build_arrays(np.arange(6), np.ones(6, np.int64), np.array([0, 1]),
                                                 np.array([0, 1]), ["sum"] * 3, 1))
    assert plain.one_per_cell == 1 and plain.num_cells == plain.num_features == 3


def test_a_sequence_longer_than_its_cells_is_an_error_naming_max_length():
    with pytest.raises(ValueError, match=r"features.sparse\[1\].max_length"):
        _layout(widths=(1, 2, 1))


def test_heads_see_a_sequence_summed_into_one_cell():
    torch.manual_seed(0)
    plain = DLRMHead(2, 3, 4, [5], [6]).double()
    seq = DLRMHead(2, 3, 4, [5], [6]).double()
    seq.load_state_dict(plain.state_dict())
    seq.set_cells([1, 3, 1])
    dense, cells = torch.randn(2, 7, 2, dtype=torch.float64), torch.randn(2, 7, 5, 4, dtype=torch.float64)
    summed = torch.stack([cells[..., 0, :], cells[..., 1:4, :].sum(-2), cells[..., 4, :]], dim=-2)
    assert torch.allclose(seq(dense, cells), plain(dense, summed))
    with pytest.raises(ValueError, match="cell widths"):
        seq(dense, summed)  # pooled by a layout that did not know the sequence
