"""The benchmark's torch.func contenders compute exactly gmeta's meta-loss and gradients."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.contenders import bucket_views, loop_loss, task_views, vmap_bucketed_loss, vmap_loss
from gmeta.meta.maml import maml_loss
from tests.conftest import TWO_LABELS
from tests.meta.test_maml import _lookup, _setup


@pytest.fixture(autouse=True)
def _restore_environment():
    """The benchmarks' in-process runs set torchrun's variables (RANK, MASTER_PORT, ...):
    a later test's subprocess that inherited them would take itself for a rank of a job
    and listen on a port already used."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("first_order, arch, adapt", [
    (False, "dlrm", ["dense_arch", "over_arch"]), (True, "dlrm", ["dense_arch", "over_arch"]),
    (False, "dcn_v2", ["all"]), (False, "deepfm", ["all"]), (True, "wide_deep", ["all"]), (False, "esmm", ["all"]),
    (True, "mmoe", ["all"])])
def test_torch_func_contenders_equal_gmeta(debug_config_path, debug_data, two_label_data, first_order, arch, adapt):
    """The contenders adapt the same layers as gmeta, of every head (``all`` included); the
    multi-task heads on rows of two labels."""
    two = arch in ("esmm", "mmoe")
    model, head, batch, tables = _setup(debug_config_path, two_label_data if two else debug_data, n_tasks=6,
                                        extra=[f"model.arch={arch}", *(TWO_LABELS if two else [])])
    assert batch.labels.dim() == (2 if two else 1)
    rows, layout = _lookup(model, batch, tables, 2)
    rows = rows.detach().requires_grad_(True)
    kw = dict(steps=2, lr=0.3, emb_lr=0.6, adapt_dense=adapt, adapt_embeddings=True, first_order=first_order)
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


@pytest.mark.parametrize("arch", ["dlrm", "dcn_v2", "esmm"])
def test_meta_step_reports_every_contender_as_a_share_of_erm(debug_config_path, debug_data, capsys, arch):
    """benchmarks/meta_step.py's model section on a small model whose tasks fill two size
    buckets: every contender (both vmap variants included) runs, first and second order, and
    each one's rows/s is also given as a share of ERM's on the same rows; with another head
    (--archs), every layer of it adapted."""
    from benchmarks.meta_step import bench_model, with_arch, with_conversion
    from gmeta.config import load_config
    from gmeta.io.reader import TaskReader

    cfg = with_arch(load_config(debug_config_path, ["meta.size_buckets=2"]), arch)
    assert cfg.model.arch == arch and cfg.meta.adapt_dense == ["all"]
    batch = next(iter(TaskReader(debug_data["shards"], "train", 4, shuffle=False, size_buckets=2)))
    if arch == "esmm":  # click and conversion: a conversion only where there is a click
        assert cfg.features.label_names() == ["label", "conversion"]
        batch = with_conversion(batch, seed=0)
        y = batch.labels
        assert y.shape == (batch.num_rows, 2) and (y[:, 1] <= y[:, 0]).all() and 0 < y[:, 1].sum() < y[:, 0].sum()
    results: dict = {}
    bench_model("debug", cfg, batch, repeats=1, threads=1, results=results)
    contenders = ("gmeta", "gmeta-imp", "gmeta-mat", "loop", "vmap", "vmap-bucketed")
    for order in ("first", "second"):
        res = results[f"debug_t1_{order}"]
        for k in contenders:
            assert res[f"{k}_share_of_erm"] == pytest.approx(res[f"{k}_rows_per_s"] / res["erm_rows_per_s"])
            assert res[f"{k}_peak_mib"] > 0
        assert res["erm_saved_mib"] > 0 and res["gmeta_saved_mib"] > 0
    out = capsys.readouterr().out
    assert "bucket 1:" in out and out.count("as a share of ERM's") == 2 and "vmap-bucketed" in out


def test_memory_benchmark_counts_the_step_not_the_tables(debug_config_path, debug_data):
    """benchmarks/memory.py's figure is what the step saves for its backward: the same with
    tables 200 times larger (the fused sharded lookup keeps a reference to the whole table
    for its backward, which is no memory the step adds)."""
    import torch.distributed as dist

    from benchmarks.memory import step_saved_mib
    from gmeta.config import load_config
    from gmeta.io.reader import TaskReader
    from gmeta.models.dlrm import build_model
    from gmeta.parallel.dist import free_port
    from gmeta.parallel.sharding import shard_model

    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        figures = []
        for scale in (1, 200):
            cfg = load_config(debug_config_path)
            for f in cfg.features.sparse:
                f.num_embeddings *= scale  # the prepared ids stay in range
            torch.manual_seed(0)
            model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu")).module
            batch = next(iter(TaskReader(debug_data["shards"], "train", 8, shuffle=False,
                                         size_buckets=cfg.meta.size_buckets)))
            figures.append(step_saved_mib(model, batch, cfg.meta, 2, first_order=False))
        assert figures[0] > 0 and figures[0] == figures[1]
    finally:
        dist.destroy_process_group()
