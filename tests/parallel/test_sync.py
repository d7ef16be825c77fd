"""A training step reads nothing back from the device, and a non-finite step changes nothing."""

from __future__ import annotations

import pytest
import torch

from gmeta.config import load_config
from gmeta.io.reader import TaskReader
from gmeta.models.dlrm import build_model
from gmeta.parallel.dist import DenseGradSync, broadcast_params
from gmeta.parallel.pipeline import SparseDistPipeline
from gmeta.parallel.sharding import shard_model
from gmeta.training.step import run_steps, tables_skip_on_device
from tests.support.multiprocess import run_ranks
from tests.support.sync_counter import SyncCounter

OVERRIDES = ["model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]", "meta.tasks_per_batch=4",
             "meta.size_buckets=2"]


def _setup(cfg):
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    params = model.module.dense_parameters()
    broadcast_params(params)
    return model, params, DenseGradSync(params), torch.optim.Adam(params, lr=1e-2, fused=True)


def _count_syncs(rank, world, cfg_path, shards, overrides):
    cfg = load_config(cfg_path, OVERRIDES + overrides)
    model, params, sync, opt = _setup(cfg)
    it = iter(TaskReader(shards, "train", cfg.meta.tasks_per_batch, rank=rank, world_size=world, seed=2,
                         size_buckets=cfg.meta.size_buckets))
    steps = run_steps(model, cfg, sync, opt, lambda: next(it, None), 3, SparseDistPipeline(model.module, 2))
    next(steps)  # warm-up: fbgemm copies its feature dims to the host once
    with SyncCounter() as c:
        outs = [out for _, out in steps]
    assert len(outs) == 2
    assert not c.syncs, "\n".join(f"{call} at {where}: {line}" for call, where, line in c.syncs)
    # what remains is torchrec reading the id all-to-all's split sizes and sending its own
    # (host lists made into tensors), on the input-dist stream, one batch ahead
    assert all(call in ("tolist", "tensor from host data") and "torchrec" in where
               for call, where, _ in c.input_dist), c.input_dist
    # and the probe sees a real read-back when there is one
    with SyncCounter() as probe:
        float(outs[-1].loss)
    assert len(probe.syncs) == 1


@pytest.mark.parametrize("overrides", [["meta.first_order=false", "meta.inner_steps=2"],
                                       ["meta.algorithm=erm"], ["meta.meta_sgd=true", "meta.first_order=true"],
                                       ["meta.adapt_features=[user_id,ad_id]"]])
def test_training_steps_read_nothing_back_from_the_device(debug_config_path, debug_data, overrides):
    """Two ranks, the pipelined trainer: lookup (id and embedding all-to-alls), inner loop
    (with the rows of some features adapting), query loss and the agreement of the ranks on
    it, backward with the fused table update, dense all-reduce and Adam. Neither a read-back
    nor a tensor made from host data (a pageable copy on a GPU)."""
    run_ranks(_count_syncs, 2, debug_config_path, debug_data["shards"], overrides)


def _nan_step_changes_nothing(rank, world, cfg_path, shards, overrides=()):
    import gmeta.training.step as train

    cfg = load_config(cfg_path, OVERRIDES + list(overrides))
    model, params, sync, opt = _setup(cfg)
    batches = iter(TaskReader(shards, "train", cfg.meta.tasks_per_batch, rank=rank, world_size=world, seed=2,
                              size_buckets=cfg.meta.size_buckets))
    train.train_step(model, next(batches), cfg, sync, opt)  # a real step first: optimizer state exists

    def local(t):
        """A plain copy of a tensor, or of this rank's shards of a ShardedTensor."""
        if hasattr(t, "local_shards"):
            return torch.cat([s.tensor.detach().reshape(-1) for s in t.local_shards()]) if t.local_shards() \
                else torch.zeros(0)
        return t.detach().clone()

    def snapshot():
        fused = model.fused_optimizer.state_dict()["state"]
        return ({k: local(v) for k, v in model.state_dict().items() if hasattr(v, "shape")},
                {k: {n: local(t) for n, t in s.items() if hasattr(t, "shape")} for k, s in fused.items()},
                {i: {n: local(t) for n, t in s.items()} for i, s in opt.state_dict()["state"].items()})

    before = snapshot()
    real = train.meta_step
    bad_rank = 1  # the loss is NaN on one rank only: no rank may update

    def nan_on_one_rank(*a, **kw):
        out = real(*a, **kw)
        if rank == bad_rank:
            out.loss = out.loss * float("nan")
        return out

    train.meta_step = nan_on_one_rank
    try:
        out = train.train_step(model, next(batches), cfg, sync, opt)
    finally:
        train.meta_step = real
    assert bool(out.skipped)
    after = snapshot()
    for a, b in zip(before, after):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], dict):
                for n in a[k]:
                    assert torch.equal(a[k][n], b[k][n]), (k, n)
            else:
                assert torch.equal(a[k], b[k]), k
    out = train.train_step(model, next(batches), cfg, sync, opt)  # and training goes on
    assert not bool(out.skipped)
    moved = snapshot()[0]
    assert any(not torch.equal(v, after[0][k]) for k, v in moved.items())


@pytest.mark.parametrize("overrides", [[], ["optim.embedding_weight_decay=0.5", "optim.embedding_lr=0.2"]])
def test_nonfinite_step_leaves_tables_weights_and_optimizer_state_unchanged(debug_config_path, debug_data,
                                                                           overrides):
    """With table weight decay too: fbgemm would add wd x row to a zeroed gradient."""
    run_ranks(_nan_step_changes_nothing, 2, debug_config_path, debug_data["shards"], overrides)


def _one_step(rank, world, cfg_path, shards, overrides, step_overrides, nan, reads):
    """One training step (NaN loss on every rank if ``nan``), the model built with
    ``overrides``, the step told ``step_overrides`` too: it reads the device ``reads``
    times (in train_step), and runs backward unless it reads a non-finite flag."""
    import gmeta.training.step as train

    cfg = load_config(cfg_path, OVERRIDES + overrides)
    model, params, sync, opt = _setup(cfg)
    batches = iter(TaskReader(shards, "train", cfg.meta.tasks_per_batch, rank=rank, world_size=world, seed=2,
                              size_buckets=cfg.meta.size_buckets))
    train.train_step(model, next(batches), cfg, sync, opt)  # warm-up: fbgemm's one-time host copies
    real_step, real_backward = train.meta_step, torch.autograd.backward
    backwards = []

    def maybe_nan(*a, **kw):
        out = real_step(*a, **kw)
        if nan:
            out.loss = out.loss * float("nan")
        return out

    def counted_backward(*a, **kw):
        backwards.append(1)
        return real_backward(*a, **kw)

    train.meta_step, torch.autograd.backward = maybe_nan, counted_backward
    try:
        with SyncCounter() as c:
            out = train.train_step(model, next(batches), load_config(cfg_path, OVERRIDES + overrides + step_overrides),
                                   sync, opt)
    finally:
        train.meta_step, torch.autograd.backward = real_step, real_backward
    assert bool(out.skipped) == nan
    # (the lookup is not pipelined here: torchrec's id all-to-all reads its sizes in the step too)
    ours = [(call, where) for call, where, _ in c.syncs if "site-packages" not in where]
    assert [call for call, _ in ours] == ["__bool__"] * reads, c.syncs
    assert all("gmeta/training/step.py" in where for _, where in ours), c.syncs
    assert len(backwards) == (0 if nan and reads else 1)


@pytest.mark.parametrize("nan", [False, True])
def test_with_table_weight_decay_a_step_reads_its_finite_flag_once_before_backward(debug_config_path, debug_data,
                                                                                   nan):
    """The price of an exact skip with weight decay: one read of the agreed flag per step,
    in train_step, and no backward at all when it says non-finite."""
    run_ranks(_one_step, 2, debug_config_path, debug_data["shards"], ["optim.embedding_weight_decay=0.5"], [], nan, 1)
    # without weight decay: no read, and backward runs (the update is zeroed on the device)
    run_ranks(_one_step, 2, debug_config_path, debug_data["shards"], [], [], nan, 0)


def test_adam_tables_skip_a_nonfinite_step_without_backward(debug_config_path, debug_data):
    """Adam tables (fused on GPU only) would move rows that have momentum on a zero
    gradient: the step is told ``optim.embedding_optimizer=adam`` (the CPU tables stay
    row-wise Adagrad) and must read the flag and skip backward."""
    assert not tables_skip_on_device(load_config(debug_config_path, ["optim.embedding_optimizer=adam"]))
    run_ranks(_one_step, 2, debug_config_path, debug_data["shards"], [], ["optim.embedding_optimizer=adam"], True, 1)
