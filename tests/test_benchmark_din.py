"""The meta-step benchmark with DIN (``--archs din``): its torch.func contenders compute
exactly gmeta's meta-loss and gradients on rows with behaviour sequences (a sequence takes
max_length cells per row), the Criteo-shaped batches get a sequence column, and the
benchmark runs end to end."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from benchmarks.contenders import bucket_views, loop_loss, task_views, vmap_bucketed_loss, vmap_loss
from gmeta.meta.maml import maml_loss
from tests.conftest import DEBUG_CONFIG
from tests.meta.test_maml import _lookup, _setup
from tests.support.sequences import MAX_LENGTH, seq_overrides


@pytest.fixture(autouse=True)
def _restore_environment():
    """The benchmark's in-process run sets torchrun's variables (RANK, MASTER_PORT, ...): a
    later test's subprocess that inherited them would take itself for a rank of a job."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("first_order, arch", [(False, "din"), (True, "din"), (False, "dlrm")])
def test_torch_func_contenders_equal_gmeta_with_sequences(seq_data, first_order, arch):
    """Rows whose clicked_ads sequence fills 0 to max_length of its cells: the loop, vmap and
    vmap per size bucket equal gmeta's loss and every gradient, DIN reading the cells and the
    DLRM summing them; given the number of features instead of cells, they refuse."""
    model, head, batch, tables = _setup(DEBUG_CONFIG, {"shards": seq_data["pq"]}, n_tasks=6,
                                        extra=[*seq_overrides(DEBUG_CONFIG), f"model.arch={arch}",
                                               "model.attention_arch=[3]"])
    lengths = batch.sparse["clicked_ads"].lengths()
    assert int(lengths.min()) == 0 and int(lengths.max()) == MAX_LENGTH  # empty, short and full sequences
    rows, layout = _lookup(model, batch, tables, 2)
    assert layout.num_cells == model.num_features + MAX_LENGTH - 1
    rows = rows.detach().requires_grad_(True)
    kw = dict(steps=2, lr=0.3, emb_lr=0.6, adapt_dense=["all"], adapt_embeddings=True, first_order=first_order)
    wrt = list(head.parameters()) + [rows]
    ref = maml_loss(head, rows, batch, layout, **kw).loss
    ref_grads = torch.autograd.grad(ref, wrt)
    views, buckets = task_views(batch, layout), bucket_views(batch, layout)
    assert len(buckets) == 2 and sum(len(b.loop) for b in buckets) == 6
    for fn, arg in ((loop_loss, views), (vmap_loss, views), (vmap_bucketed_loss, buckets)):
        loss = fn(head, rows, arg, layout.num_cells, kw)
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)  # float64
        for g, r in zip(torch.autograd.grad(loss, wrt), ref_grads):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
        with pytest.raises(ValueError, match=f"{layout.num_cells} cells per row"):
            fn(head, rows, arg, model.num_features, kw)
    # the attention adapts and learns: its gradient is not zero
    if arch == "din":
        names = [n for n, _ in head.named_parameters()]
        assert float(ref_grads[names.index("attention.0.layers.0.weight")].abs().sum()) > 0


def test_criteo_batch_of_din_adds_a_sequence_and_keeps_the_other_columns():
    """with_arch(cfg, "din") adds hist (max_length 10, C1's table); criteo_batch fills it with
    lists of 0 to 10 ids drawn as C1's (a task's own C1 id most often), and every other column
    is the batch of the same seed without it."""
    from benchmarks.meta_step import DIN_LENGTH, criteo_batch, criteo_config, with_arch

    base = criteo_config("criteo_narrow")
    cfg = with_arch(base, "din")
    hist = cfg.features.sparse[-1]
    assert cfg.model.arch == "din" and len(cfg.features.sparse) == len(base.features.sparse) + 1
    assert (hist.name, hist.max_length, hist.table, hist.multi_hot) == ("hist", DIN_LENGTH, "C1", True)
    assert hist.num_embeddings == base.features.sparse[0].num_embeddings
    assert not any(f.max_length for f in with_arch(base, "dlrm").features.sparse)
    plain, din = criteo_batch(with_arch(base, "dlrm"), 8, 10, 10, seed=3), criteo_batch(cfg, 8, 10, 10, seed=3)
    lengths = din.sparse["hist"].lengths()
    assert int(lengths.min()) == 0 and int(lengths.max()) == DIN_LENGTH and 3 < float(lengths.float().mean()) < 7
    ids = din.sparse["hist"].values()
    assert int(ids.min()) >= 0 and int(ids.max()) < hist.num_embeddings
    assert din.layout.num_cells == len(base.features.sparse) + DIN_LENGTH
    for f in base.features.sparse:
        assert torch.equal(din.sparse[f.name].values(), plain.sparse[f.name].values()), f.name
    assert torch.equal(din.dense, plain.dense) and torch.equal(din.labels, plain.labels)
    # per task, the id its histories hold most is the one its candidates (C1) hold most
    row_task = din.layout.row_task.numpy()
    seq_task = np.repeat(row_task, lengths.numpy())
    c1 = din.sparse["C1"].values().numpy()
    for t in range(8):
        assert np.bincount(ids.numpy()[seq_task == t]).argmax() == np.bincount(c1[row_task == t]).argmax()


def test_meta_step_runs_din_end_to_end(monkeypatch, capsys):
    """``python -m benchmarks.meta_step --archs din`` on a tiny Criteo-shaped model: every
    contender of both orders and the full training step are timed and reported for
    ``<model>_din``; din with the ads_cvr model (no sequence in its shards) is refused."""
    from benchmarks import meta_step

    monkeypatch.setattr(meta_step, "CRITEO", {"criteo_narrow": (4, [6], [8, 4], 3)})
    monkeypatch.setattr(meta_step, "CRITEO_TABLE", 500)
    monkeypatch.setattr(meta_step, "CRITEO_TASKS", 6)
    monkeypatch.setattr(sys, "argv", ["meta_step", "--models", "criteo_narrow", "--threads", "1", "--repeats", "1",
                                      "--archs", "din"])
    meta_step.main()
    out = capsys.readouterr().out
    assert "[criteo_narrow_din_N6, 1 thread(s)] N=6 tasks, 36 rows" in out
    assert out.count("as a share of ERM's") == 2 and "full training step rows/s" in out
    results = json.loads(out[out.index("RESULT meta_step ") + len("RESULT meta_step "):].splitlines()[0])
    assert set(results) == {f"criteo_narrow_din_N6_t1_{k}" for k in ("first", "second", "train_step")}
    for order in ("first", "second"):
        res = results[f"criteo_narrow_din_N6_t1_{order}"]
        for k in ("loop", "vmap", "vmap-bucketed", "gmeta-imp", "gmeta-mat"):
            assert res[f"gmeta_over_{k}"] > 0 and res[f"{k}_peak_mib"] > 0
    assert results["criteo_narrow_din_N6_t1_train_step"]["second_rows_per_s"] > 0

    monkeypatch.setattr(sys, "argv", ["meta_step", "--models", "ads_cvr", "--archs", "din"])
    with pytest.raises(SystemExit):
        meta_step.main()
    assert "--archs din: din attends over a behaviour sequence" in capsys.readouterr().err
