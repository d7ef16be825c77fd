"""The benchmark's torch.func contenders compute exactly gmeta's meta-loss and gradients."""

from __future__ import annotations

import pytest
import torch

from benchmarks.contenders import bucket_views, loop_loss, task_views, vmap_bucketed_loss, vmap_loss
from gmeta.meta.maml import maml_loss
from tests.meta.test_maml import _lookup, _setup


@pytest.mark.parametrize("first_order", [False, True])
def test_torch_func_contenders_equal_gmeta(debug_config_path, debug_data, first_order):
    model, head, batch, tables = _setup(debug_config_path, debug_data, n_tasks=6)
    rows, layout = _lookup(model, batch, tables, 2)
    rows = rows.detach().requires_grad_(True)
    kw = dict(steps=2, lr=0.3, emb_lr=0.6, adapt_dense=["dense_arch", "over_arch"], adapt_embeddings=True,
              first_order=first_order)
    wrt = list(head.parameters()) + [rows]
    ref = maml_loss(head, rows, batch, layout, **kw).loss
    ref_grads = torch.autograd.grad(ref, wrt)
    views, buckets = task_views(batch, layout), bucket_views(batch, layout)
    # the buckets pad to widths of their own, narrower than the batch's largest task
    widths = sorted(b.padded["dense_s"].shape[1] for b in buckets)
    assert len(buckets) == 2 and widths[0] < widths[1] == views.padded["dense_s"].shape[1]
    assert sum(len(b.loop) for b in buckets) == 6
    for fn, arg in ((loop_loss, views), (vmap_loss, views), (vmap_bucketed_loss, buckets)):
        loss = fn(head, rows, arg, model.num_features, kw)
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)  # float64; reduction order differs by torch version
        for g, r in zip(torch.autograd.grad(loss, wrt), ref_grads):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_gpu_check_script_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py, as scripts/gpu_check.sh runs it on a GPU, here with the CPU
    standing in for the GPU: its comparisons pass and its table is printed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--parts", "equal",
                        "sync", "serve", "--workdir", str(tmp_path)], cwd=root, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = p.stdout[p.stdout.index("| part | what |"):]
    assert table.count("| PASS |") == 8 and "ERROR" not in table  # 4 equal, 2 sync, 2 serve


def test_bias_baseline_recovers_item_means_and_task_offsets():
    """Ratings that are an item effect plus a task offset: with no shrinkage the item + task
    offset predictor is exact on a new task; the item mean alone misses by the offset."""
    import numpy as np

    from benchmarks.bias_baseline import predict

    item_effect = {1: 4.0, 2: 2.0, 3: 3.0}
    train = {"task": np.array([0, 0, 0, 1, 1, 1]), "side": np.array([0, 0, 1, 0, 0, 1]),
             "item": np.array([1, 2, 3, 1, 2, 3]), "label": np.array([4.0, 2.0, 3.0, 4.0, 2.0, 3.0])}
    # a new task rating every item 0.5 above its effect; item 9 never seen in training
    new = {"task": np.array([0, 0, 0, 0]), "side": np.array([0, 0, 1, 1]), "item": np.array([1, 2, 3, 9]),
           "label": np.array([4.5, 2.5, 3.5, 3.5])}
    g, item, both = predict(train, new, 0, 0)
    np.testing.assert_allclose(g, [3.0, 3.0])
    np.testing.assert_allclose(item, [item_effect[3], 3.0])  # unseen item -> the global mean
    np.testing.assert_allclose(both, [3.5, 3.5])
    # shrinkage pulls the offset toward 0: 2 support rows, k_task 2 -> half of it
    np.testing.assert_allclose(predict(train, new, 0, 2)[2], [3.25, 3.25])
