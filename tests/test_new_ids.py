"""New ids: prepare's per-split id counts, the default row that ids seen fewer than
``min_count`` times (or held out) map to, and its math against a per-task reference."""

from __future__ import annotations

import copy
import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from gmeta.config import load_config
from gmeta.io.errors import PrepareError
from gmeta.io.id_counts import known_mask, train_counts
from gmeta.io.reader import TaskReader
from gmeta.layout import layout_of
from gmeta.meta.maml import maml_loss
from gmeta.models.dlrm import build_model, lookup_rows
from tests.conftest import DEBUG_CONFIG
from tests.support.cli import run_gmeta
from tests.support.reference import task_query_losses


def _split_ids(shards: Path, split: str, feature: str) -> Counter:
    """Occurrences of each id of ``feature`` in a split, record by record (plain Python)."""
    m = json.loads((shards / "manifest.json").read_text())
    c: Counter = Counter()
    for f in m["splits"][split]["files"]:
        for rec in pq.read_table(shards / f["path"]).to_pylist():
            for side in ("support", "query"):
                for cell in rec[side][feature]:
                    c.update(cell if isinstance(cell, list) else [cell])
    return c


def test_prepare_counts_every_id_per_split_and_the_share_new_to_training(debug_data):
    shards = debug_data["shards"]
    m = json.loads((shards / "manifest.json").read_text())
    for feature in ("ad_id", "interests"):  # single-valued and multi-hot
        t = pq.read_table(shards / "id_counts" / f"{feature}.parquet").to_pydict()
        for split in m["splits"]:
            want = _split_ids(shards, split, feature)
            got = {i: c for i, c in zip(t["id"], t[split]) if c}
            assert got == dict(want), (feature, split)
        train = _split_ids(shards, "train", feature)
        held = _split_ids(shards, "eval", feature)
        new = [i for i in held if i not in train]
        assert m["unseen"][feature]["eval"]["ids"] == pytest.approx(len(new) / len(held))
        assert m["unseen"][feature]["eval"]["occurrences"] == pytest.approx(
            sum(held[i] for i in new) / sum(held.values()))
    assert m["unseen"]["ad_id"]["eval"]["occurrences"] > 0  # the debug data has cold ads


def test_known_mask_keeps_ids_seen_min_count_times_less_a_hashed_holdout(tmp_path):
    cfg = load_config(DEBUG_CONFIG)
    sf = copy.deepcopy(cfg.features.sparse[1])
    sf.num_embeddings = 5000
    ids = np.arange(0, 4000, dtype=np.int64)
    counts = ids % 5  # 0 .. 4
    (tmp_path / "id_counts").mkdir()
    pq.write_table(pa.table({"id": ids, "train": counts, "eval": np.ones_like(ids)}),
                   tmp_path / "id_counts" / f"{sf.name}.parquet")
    sf.min_count = 3
    mask = known_mask(tmp_path, sf)
    assert mask.shape == (5000,) and mask.dtype == bool
    np.testing.assert_array_equal(np.flatnonzero(mask), ids[counts >= 3])
    sf.holdout_share = 0.25
    held = known_mask(tmp_path, sf)
    assert not (held & ~mask).any()  # a subset of the known ids
    share = 1 - held.sum() / mask.sum()
    assert 0.2 < share < 0.3
    np.testing.assert_array_equal(held, known_mask(tmp_path, sf))  # a pure function of the ids
    sf.min_count = 0  # the holdout alone: every id seen in training, less the same hashed share
    alone = known_mask(tmp_path, sf)
    np.testing.assert_array_equal(alone & mask, held)
    assert not alone[ids[counts == 0]].any() and alone[ids[counts > 0]].mean() > 0.7
    assert train_counts(tmp_path, sf.name)[0].min() == 1  # ids with no train occurrence are not train ids
    with pytest.raises(PrepareError, match=r"id_counts/user_id.parquet: not found.*prepare the shards again"):
        known_mask(tmp_path, cfg.features.sparse[0])


def _default_row_setup(debug_data, known_share: float):
    cfg = load_config(DEBUG_CONFIG, ["model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]",
                                     "features.sparse.ad_id.min_count=1", "features.sparse.interests.min_count=1"])
    torch.manual_seed(0)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(2)
    known = {name: torch.rand(model.default_rows.default[name], generator=gen) < known_share
             for name in ("ad_id", "interests")}
    model.set_known_ids(known)
    head = copy.deepcopy(model.head).double()
    batch = next(iter(TaskReader(debug_data["shards"], "train", 5, shuffle=False)))
    batch.dense, batch.labels = batch.dense.double(), batch.labels.double()
    tables = {f["name"]: (torch.randn(f["num_embeddings"] + int(f["name"] in known), 4, dtype=torch.float64)
                          * 0.3).requires_grad_() for f in model.features}
    return model, head, batch, tables, known


def test_tables_with_a_default_row_have_one_row_more(debug_data):
    model, *_ = _default_row_setup(debug_data, 0.5)
    rows = {name: w.shape[0] for name, w in model.sparse_arch.state_dict().items()}
    assert rows["ec.embeddings.t_ad_id.weight"] == 2001 and rows["ec.embeddings.t_user_id.weight"] == 2000
    assert "default_rows.known_ad_id" in model.state_dict()  # saved with the weights


@pytest.mark.parametrize("first_order", [False, True])
def test_new_ids_adapt_from_the_default_row_as_in_a_per_task_reference(debug_data, first_order):
    """Adapted with ids mapped to the default row = the per-task reference on tables whose
    unknown ids' rows are copies of the default row; the default row's gradient is the sum
    of those copies' gradients."""
    model, head, batch, tables, known = _default_row_setup(debug_data, 0.5)
    layout = layout_of(batch, model.pooling, 2)
    per = model.table_ids(layout).to_dict()
    mapped = int((per["ad_id"].values() == 2000).sum())
    assert 0 < mapped < len(per["ad_id"].values())  # some ids of the batch are new, some known
    emb = {n: JaggedTensor(values=tables[n][per[n].values()], lengths=per[n].lengths()) for n in tables}
    rows = lookup_rows(emb, model.features)
    kw = dict(steps=2, lr=0.3, emb_lr=0.7, adapt_dense=["over_arch"], adapt_embeddings=True, first_order=first_order)
    out = maml_loss(head, rows, batch, layout, **kw)

    ref_tables = {n: torch.where(known[n].unsqueeze(1), t[:-1], t[-1]) if n in known else t
                  for n, t in tables.items()}
    ref = torch.stack(task_query_losses(head, ref_tables, model.features, batch, **kw))
    wrt = list(head.parameters()) + list(tables.values())
    torch.testing.assert_close(out.query_loss, ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.loss, wrt)
    for g, r in zip(grads, torch.autograd.grad(ref.mean(), wrt)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    ad = len(list(head.parameters())) + list(tables).index("ad_id")
    assert float(grads[ad][-1].abs().sum()) > 0  # the default row learns


def test_plain_forward_maps_new_ids_to_the_default_row(debug_data):
    model, _, batch, _, known = _default_row_setup(debug_data, 0.0)  # nothing known: every id is new
    with torch.no_grad():
        for name in ("ad_id", "interests"):
            w = model.sparse_arch.ec.embeddings[f"t_{name}"].weight
            w[-1] = torch.arange(4.0)
    dense = batch.dense.float()
    same = model(batch.sparse, dense)
    with torch.no_grad():  # rows of the known-nothing features are never read: changing them changes nothing
        model.sparse_arch.ec.embeddings["t_ad_id"].weight[:-1] += 1.0
    torch.testing.assert_close(model(batch.sparse, dense), same)
    with torch.no_grad():
        model.sparse_arch.ec.embeddings["t_ad_id"].weight[-1] += 1.0
    assert not torch.allclose(model(batch.sparse, dense), same)


def _train(debug_data, out: Path, steps: int) -> subprocess.CompletedProcess:
    proc = run_gmeta(
        ["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "1", f"data.shards_dir={debug_data['shards']}",
         f"train.output_dir={out}", f"train.max_steps={steps}", "tracking.enabled=false",
         "features.sparse.ad_id.min_count=2", "features.sparse.ad_id.holdout_share=0.2", "eval.max_tasks=64",
         f"train.eval_at_end={'true' if steps > 1 else 'false'}"], cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_training_learns_the_default_row_and_evaluation_uses_the_saved_mask(debug_data, tmp_path):
    from gmeta.checkpoint import load_unsharded

    proc = _train(debug_data, tmp_path / "long", 12)
    assert "(ad_id): " in proc.stderr and "the default row takes" in proc.stderr
    _train(debug_data, tmp_path / "short", 1)
    model, cfg, _ = load_unsharded(tmp_path / "long" / "checkpoint")
    want = torch.from_numpy(known_mask(debug_data["shards"], cfg.features.sparse[1]))
    assert torch.equal(model.default_rows.known_ad_id, want) and 0 < int((~want).sum()) < 2000
    short = load_unsharded(tmp_path / "short" / "checkpoint")[0]
    w, w1 = (m.sparse_arch.ec.embeddings["t_ad_id"].weight.detach() for m in (model, short))
    assert w.shape[0] == 2001
    # both runs start from the same draw: rows no step looks up are equal (ids never seen in
    # training, mapped to the default row), and the default row went on learning
    ids, _ = train_counts(debug_data["shards"], "ad_id")
    never = np.setdiff1d(np.arange(2000), ids)
    assert len(never) > 0
    torch.testing.assert_close(w[never], w1[never], rtol=0, atol=0)
    assert not torch.allclose(w[-1], w1[-1])
    report = json.loads((tmp_path / "long" / "eval" / "eval_report.json").read_text())
    assert report["new_ids"]["ad_id"]["occurrences"] > 0
