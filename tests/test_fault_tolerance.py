"""Fault tolerance: kill-and-resume under torchrun with exactly-once data, resharded
checkpoint loading, non-finite losses, and checkpoint safety."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from gmeta.checkpoint import CheckpointError, complete_checkpoints, load_unsharded
from tests.conftest import DEBUG_CONFIG
from tests.support.cli import run_gmeta
from tests.support.steps import surviving_records, torchrun_harness

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(out: Path, record: Path, shards: Path, kills: str, extra: list[str], max_restarts: int):
    return torchrun_harness(out, record, shards, kills, extra, max_restarts)


def _surviving_steps(record: Path) -> dict[int, dict[int, list[int]]]:
    """step -> rank -> task ids of the steps that survived (see ``surviving_records``)."""
    return {step: {rank: rec["task_ids"] for rank, rec in ranks.items()}
            for step, ranks in surviving_records(record).items()}


def test_killed_ranks_resume_with_exactly_once_data_and_equal_parameters(debug_data, tmp_path, monkeypatch):
    from tests.support.multiprocess import run_gmeta_ranks

    extra = ["train.max_steps=26", "train.checkpoint_every_steps=4", "train.keep_checkpoints=2", "train.log_every=5"]
    # the uninterrupted run: the same two workers, recorded by the same harness, forked (its
    # launch is not what is compared; the killed run below is torchrun's, with its restarts)
    (tmp_path / "rec-whole").mkdir()
    with monkeypatch.context() as m:
        m.setenv("GMETA_TEST_RECORD", str(tmp_path / "rec-whole"))
        run_gmeta_ranks(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", "2", "--resume", "auto",
                         f"data.shards_dir={debug_data['shards']}", f"train.output_dir={tmp_path / 'whole'}",
                         "tracking.enabled=false", "train.eval_at_end=false", *extra], 2, cwd=ROOT,
                        harness="tests.support.fault_harness")
    whole = _surviving_steps(tmp_path / "rec-whole")
    assert sorted(whole) == list(range(1, 27))

    # two kills, each before the next checkpoint is written: rank 1 after step 6 (back to step
    # 4), then rank 0 of the restarted job after its 7th step, step 11, which resumes from the
    # checkpoint of step 8 that the restarted job wrote (two kills, not more: each restart
    # starts both ranks afresh, seconds of imports apiece)
    kills = "0:6:1,1:7:0"
    _torchrun(tmp_path / "killed", tmp_path / "rec-killed", debug_data["shards"], kills, extra, 2)
    killed = _surviving_steps(tmp_path / "rec-killed")
    attempts = {p.name.split("-")[0] for p in (tmp_path / "rec-killed").glob("*.jsonl")}
    assert len(attempts) == 3, (kills, attempts)  # two restarts happened
    resumed = {p.name.split("-")[0]: int(p.read_text()) for p in (tmp_path / "rec-killed").glob("*.resume")}
    assert resumed == {"attempt1": 4, "attempt2": 8}, resumed

    # every surviving optimizer step consumed what the uninterrupted run consumed at that
    # step: each task of an epoch exactly once, none lost, none repeated
    assert sorted(killed) == sorted(whole)
    assert killed == whole
    per_epoch = Counter(t for step in range(1, 21) for ids in killed[step].values() for t in ids)
    assert max(per_epoch.values()) == 1  # steps 1-20 are the first epoch (20 steps per epoch)

    a, _, meta_a = load_unsharded(tmp_path / "whole" / "checkpoint")
    b, _, meta_b = load_unsharded(tmp_path / "killed" / "checkpoint")
    assert meta_a["step"] == meta_b["step"] == 26
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)
    # retention: the newest two periodic checkpoints, complete
    assert [s for s, _ in complete_checkpoints(tmp_path / "killed" / "checkpoints")] == [20, 24]
    # no process of the killed attempts (ranks or their reader workers) outlived the job
    import psutil

    marker = str(tmp_path / "killed")
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert not left, left


def _harness(args: list[str], nan_at: set[int], monkeypatch) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``gmeta ARGS`` in this process with what tests.support.fault_harness does to a worker:
    the meta-loss of the ``nan_at``-th meta-batches made NaN; returns the run and the test's
    own record of each optimizer step ({"call", "skipped"}), taken as train_step returns."""
    import gmeta.training.step as gtrain

    real_meta, real_step = gtrain.meta_step, gtrain.train_step
    forwards, recs = [0], []

    def nan_meta_step(*a, **k):
        out = real_meta(*a, **k)
        forwards[0] += 1
        if forwards[0] in nan_at:
            out.loss = out.loss * float("nan")
        return out

    def recorded_train_step(*a, **k):
        out = real_step(*a, **k)
        recs.append({"call": len(recs) + 1, "skipped": bool(out.skipped)})
        return out

    with monkeypatch.context() as m:
        m.setattr(gtrain, "meta_step", nan_meta_step)
        m.setattr(gtrain, "train_step", recorded_train_step)
        return run_gmeta(args, cwd=ROOT), recs


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(debug_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", "1", f"data.shards_dir={debug_data['shards']}",
            f"train.output_dir={out}", "tracking.enabled=false", "train.eval_at_end=false", "train.max_steps=12",
            "train.checkpoint_every_steps=3"]
    proc, _ = _harness(args, {8}, monkeypatch)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "step 8: the meta-loss was not finite (1 such step(s) up to step 9); no update was applied" in proc.stderr
    assert "step-00000006" in proc.stderr  # names the last good checkpoint
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [3, 6]
    load_unsharded(out / "checkpoints" / "step-00000006")  # intact and loadable
    assert not (out / "checkpoint").exists()


def test_nonfinite_loss_skipped_and_counted(debug_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", "1", f"data.shards_dir={debug_data['shards']}",
            f"train.output_dir={out}", "tracking.enabled=false", "train.eval_at_end=false", "train.max_steps=12",
            "train.on_nonfinite_loss=skip", "train.log_every=4", "train.checkpoint_every_minutes=0.000001",
            "train.keep_checkpoints=5"]
    proc, recs = _harness(args, {2, 7}, monkeypatch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["call"] for r in recs if r["skipped"]] == [2, 7]
    model, _, meta = load_unsharded(out / "checkpoint")
    assert meta["skipped_nonfinite_steps"] == 2 and meta["step"] == 12
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    # the minutes trigger (checked at log steps) is due at every log step here
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [4, 8]


# ------------------------------------------------------------------ resharding

def _small_cfg(shards, sharding_type: str, extra=()):
    from gmeta.config import load_config

    return load_config(DEBUG_CONFIG, [f"data.shards_dir={shards}", f"sharding.sharding_type={sharding_type}",
                                      "meta.tasks_per_batch=4", *extra])


def _state_on_rank(model, dense_opt) -> dict:
    """This rank's local pieces: table shards, fused-optimizer state shards (by global
    offsets), the dense parameters and the Adam state."""
    out = {"tables": {}, "fused": {}}
    for key, value in model.state_dict().items():
        if hasattr(value, "local_shards"):
            for sh in value.local_shards():
                out["tables"][(key, *sh.metadata.shard_offsets)] = sh.tensor.clone()
        else:
            out.setdefault("dense", {})[key] = value.clone()
    for st in model.fused_optimizer.state_dict()["state"].values():
        for name, value in st.items():
            for sh in value.local_shards():
                out["fused"][(name, *sh.metadata.shard_offsets)] = sh.tensor.clone()
    out["adam"] = {i: {k: v.clone() for k, v in s.items()} for i, s in dense_opt.state_dict()["state"].items()}
    return out


def _assemble(pieces: list[dict]) -> dict:
    """Whole tensors from the local pieces of every rank."""
    whole: dict = {}
    for part in ("tables", "fused"):
        groups: dict = {}
        for p in pieces:
            for (name, *off), t in p[part].items():
                groups.setdefault(name, []).append((off, t))
        for name, items in groups.items():
            rows = max(o[0] + t.shape[0] for o, t in items)
            shape = (rows,) if items[0][1].dim() == 1 else (rows, max(o[1] + t.shape[1] for o, t in items))
            full = torch.zeros(shape)
            for o, t in items:
                full[tuple(slice(a, a + n) for a, n in zip(o, t.shape))] = t
            whole[(part, name)] = full
    whole["dense"] = pieces[0]["dense"]
    whole["adam"] = pieces[0]["adam"]
    return whole


def _train_save(rank, world, shards, sharding_type, out, steps, load_from=None, dump=None):
    """Train ``steps`` steps (after loading ``load_from`` if given) on this rank's share of
    a fixed batch order, save a training checkpoint to ``out``, dump the local state."""
    from gmeta import checkpoint
    from gmeta.io.reader import TaskReader
    from gmeta.models.dlrm import build_model
    from gmeta.parallel.dist import DenseGradSync
    from gmeta.parallel.sharding import shard_model
    from gmeta.training.step import train_step

    cfg = _small_cfg(shards, sharding_type)
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    params = model.module.dense_parameters()
    opt = torch.optim.Adam(params, lr=0.01)
    sync = DenseGradSync(params)
    if load_from is not None:
        checkpoint.load_training_state(load_from, model, opt)
    reader = TaskReader(shards, "train", 4, rank=rank, world_size=world, seed=5)
    for _, batch in zip(range(steps), reader):
        train_step(model, batch, cfg, sync, opt)
    checkpoint.save(model, cfg, out, {"step": steps}, dense_opt=opt, rank_state={"rank": rank})
    if dump is not None:
        torch.save(_state_on_rank(model, opt), f"{dump}-{rank}.pt")


def _whole(dump: Path, world: int) -> dict:
    return _assemble([torch.load(f"{dump}-{r}.pt", weights_only=False) for r in range(world)])


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key in ("dense", "adam"):
            for k in a[key]:
                va, vb = a[key][k], b[key][k]
                for x, y in (zip(va.values(), vb.values()) if isinstance(va, dict) else [(va, vb)]):
                    torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"{key} {k}")
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=str(key))


@pytest.fixture(scope="module")
def written_2_table_wise(debug_data, tmp_path_factory) -> Path:
    """A training checkpoint of 3 steps on 2 ranks, tables table-wise (``/ "a"``), and the
    ranks' state dumped (``/ "written"``): written once for the tests below, which only read it."""
    from tests.support.multiprocess import run_ranks

    base = tmp_path_factory.mktemp("written_2_table_wise")
    run_ranks(_train_save, 2, debug_data["shards"], "table_wise", base / "a", 3, None, base / "written")
    return base


@pytest.mark.parametrize("written, read", [((2, "table_wise"), (1, "table_wise")),
                                           ((1, "table_wise"), (2, "row_wise")),
                                           ((2, "table_wise"), (2, "row_wise"))])
def test_training_checkpoint_reshards_across_world_sizes_and_plans(debug_data, tmp_path, written, read, request):
    from tests.support.multiprocess import run_ranks

    shards = debug_data["shards"]
    if written == (2, "table_wise"):
        src = request.getfixturevalue("written_2_table_wise")
    else:
        src = tmp_path
        run_ranks(_train_save, written[0], shards, written[1], src / "a", 3, None, src / "written")
    # loaded with another world size / plan and saved again without a step: same state
    run_ranks(_train_save, read[0], shards, read[1], tmp_path / "b", 0, src / "a", tmp_path / "read")
    _assert_same_state(_whole(src / "written", written[0]), _whole(tmp_path / "read", read[0]))


def test_continuing_in_another_plan_equals_continuing_in_the_same(debug_data, tmp_path, written_2_table_wise):
    """Optimizer state carried over: one more step after loading a table-wise checkpoint
    row-wise gives the same tables as that step table-wise."""
    from tests.support.multiprocess import run_ranks

    shards, a = debug_data["shards"], written_2_table_wise / "a"
    run_ranks(_train_save, 2, shards, "table_wise", tmp_path / "tw", 2, a, None)
    run_ranks(_train_save, 2, shards, "row_wise", tmp_path / "rw", 2, a, None)
    tw, rw = load_unsharded(tmp_path / "tw")[0], load_unsharded(tmp_path / "rw")[0]
    for (name, x), (_, y) in zip(tw.state_dict().items(), rw.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    base = load_unsharded(a)[0]
    assert not torch.equal(base.head.over_arch.mlp.layers[0].weight, tw.head.over_arch.mlp.layers[0].weight)


# ------------------------------------------------------------------ damaged and hostile checkpoints

@pytest.fixture
def saved_checkpoint(debug_checkpoint, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(debug_checkpoint, dst)
    return dst


def test_truncated_checkpoint_data_is_a_checkpoint_error(saved_checkpoint):
    data = next(saved_checkpoint.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=str(saved_checkpoint)):
        load_unsharded(saved_checkpoint)


def test_corrupt_or_missing_checkpoint_files(saved_checkpoint, tmp_path):
    (saved_checkpoint / ".metadata").write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="metadata"):
        load_unsharded(saved_checkpoint)
    with pytest.raises(CheckpointError, match="not found"):
        load_unsharded(tmp_path / "nowhere")
    (saved_checkpoint / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_unsharded(saved_checkpoint)
    (saved_checkpoint / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete|not a complete"):
        load_unsharded(saved_checkpoint)


def test_checkpoint_metadata_cannot_run_code(saved_checkpoint, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (saved_checkpoint / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_unsharded(saved_checkpoint)
    assert not marker.exists()


def test_checkpoint_declaring_non_tensor_entries_is_refused(saved_checkpoint):
    """DCP would unpickle a bytes entry without restriction: such a file is refused."""
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from gmeta.checkpoint import _MetadataUnpickler

    meta_file = saved_checkpoint / ".metadata"
    md = _MetadataUnpickler(open(meta_file, "rb")).load()
    key = next(iter(md.state_dict_metadata))
    md.state_dict_metadata[key] = BytesStorageMetadata()
    meta_file.write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_unsharded(saved_checkpoint)


def test_cli_errors_for_missing_inputs(debug_data, tmp_path):
    def run(*args):
        return run_gmeta(args, cwd=tmp_path)

    p = run("train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", "1", "data.shards_dir=no/such/dir")
    assert p.returncode == 2 and "no/such/dir" in p.stderr
    p = run("evaluate", "--checkpoint", "no/such/ckpt")
    assert p.returncode == 2 and "checkpoint not found: no/such/ckpt" in p.stderr
    p = run("predict", "--checkpoint", "no/such/ckpt", "--out", "o")
    assert p.returncode == 2 and "no/such/ckpt" in p.stderr
    p = run("train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", "1", "--resume", "no/such/ckpt",
            f"data.shards_dir={debug_data['shards']}")
    assert p.returncode == 2 and "no/such/ckpt" in p.stderr


def test_resumed_training_continues_its_mlflow_run(debug_data, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["train", "--config", str(DEBUG_CONFIG), "--nproc-per-node", "1", "--tracking-uri", uri,
            f"data.shards_dir={debug_data['shards']}", f"train.output_dir={tmp_path / 'run'}",
            "train.eval_at_end=false", "tracking.log_model=false", "train.log_every=3",
            "train.checkpoint_every_steps=3", "tracking.system_metrics_s=0"]
    for extra in (["train.max_steps=6"], ["train.max_steps=12", "--resume", "auto"]):
        p = run_gmeta([*base, *extra], cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("gmeta-ads-cvr-debug").experiment_id])
    assert len(runs) == 1  # the restart continued the run instead of opening another
    run = runs[0]
    assert run.info.status == "FINISHED" and "gmeta.resumed_from" in run.data.tags
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/query_loss")]
    assert steps == [3, 6, 9, 12]


def test_interrupted_checkpoint_writes_are_ignored_and_resume_picks_the_newest_complete(debug_checkpoint, tmp_path):
    import shutil

    from gmeta.config import load_config
    from gmeta.training.run import _resume_path

    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(debug_checkpoint, root / "step-00000004")
    # a write that died before the rename, and one renamed without its meta.json (never
    # produced by gmeta, which writes meta.json before renaming, but a damaged copy)
    shutil.copytree(debug_checkpoint, root / "step-00000008.tmp")
    shutil.copytree(debug_checkpoint, root / "step-00000012")
    (root / "step-00000012" / "meta.json").unlink()
    assert complete_checkpoints(root) == [(40, root / "step-00000004")]  # step as its meta.json says
    cfg = load_config(DEBUG_CONFIG, [f"train.output_dir={tmp_path / 'run'}", "train.resume=auto"])
    assert _resume_path(cfg, tmp_path / "run") == root / "step-00000004"
    cfg.train.resume = "none"
    with pytest.raises(CheckpointError, match="--resume auto"):
        _resume_path(cfg, tmp_path / "run")
