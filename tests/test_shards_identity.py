"""Which shards a checkpoint was trained on: the manifest's content hash in its metadata,
compared by evaluate, predict and ``train --resume``; configs that disagree with the
shards they train on; shards and checkpoints of another data set."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from gmeta.config import load_config
from gmeta.io.errors import PrepareError
from gmeta.io.manifest import (
    OtherShardsError,
    check_manifest_matches,
    content_hash,
    identity,
    identity_diff,
    load_manifest,
)
from gmeta.io.prepare import prepare
from tests.conftest import DEBUG_CONFIG
from tests.support.cli import run_gmeta

# a few held-out tasks and one curve point: what these tests check is which shards are scored
FAST_EVAL = ["eval.max_tasks=8", "eval.curve_steps=[0]", "eval.inner_steps=1"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_gmeta(args, cwd=cwd)


def _train(cwd: Path, shards: Path, out: Path, *overrides: str, config: Path = DEBUG_CONFIG,
           options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return _cli("train", "--config", str(config), "--nproc-per-node", "1", *options, f"data.shards_dir={shards}",
                f"train.output_dir={out}", "train.eval_at_end=false", "tracking.enabled=false", *overrides, cwd=cwd)


@pytest.fixture(scope="module")
def trained(debug_data, tmp_path_factory) -> dict[str, Path]:
    """Shards of the debug data (this module's own copy) and a checkpoint trained on them
    for a few steps: {"root", "shards", "run", "checkpoint"}."""
    root = tmp_path_factory.mktemp("identity")
    shards = root / "shards"
    prepare(load_config(DEBUG_CONFIG), debug_data["raw"], shards)
    proc = _train(root, shards, root / "run", "train.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "shards": shards, "run": root / "run", "checkpoint": root / "run" / "checkpoint"}


def _moved_checkpoint(trained: dict, shards: Path, dest: Path) -> Path:
    """A copy of the checkpoint whose saved data.shards_dir is ``shards`` (as if it had been
    trained in a directory where its shards lay there)."""
    shutil.copytree(trained["checkpoint"], dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta["config"]["data"]["shards_dir"] = str(shards)
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


def test_content_hash_identifies_the_data_not_the_directory(trained, debug_data, tmp_path):
    first = load_manifest(trained["shards"])
    prepare(load_config(DEBUG_CONFIG), debug_data["raw"], tmp_path / "again")  # the same data elsewhere
    assert content_hash(load_manifest(tmp_path / "again")) == content_hash(first)
    prepare(load_config(DEBUG_CONFIG, ["data.split.seed=1"]), debug_data["raw"], tmp_path / "seed1")
    other = load_manifest(tmp_path / "seed1")
    assert content_hash(other) != content_hash(first)
    diffs = identity_diff(identity(first), identity(other))
    assert diffs[0] == ("split_rule.seed", 0, 1)  # the cause first, then the counts it changed
    assert "splits.eval.files" in [k for k, _, _ in diffs]
    meta = json.loads((trained["checkpoint"] / "meta.json").read_text())
    assert meta["shards"]["content_hash"] == content_hash(first)
    assert meta["shards"]["dir"] == str(trained["shards"].resolve())
    assert meta["shards"]["manifest"]["split_rule.eval_fraction"] == 0.2


def test_evaluate_refuses_shards_prepared_again_in_the_checkpoint_dir(trained, debug_data, tmp_path, caplog):
    from gmeta.evaluation.evaluate import run_evaluate

    shards = tmp_path / "shards"
    shutil.copytree(trained["shards"], shards)
    ckpt = _moved_checkpoint(trained, shards, tmp_path / "checkpoint")
    fast = load_config(DEBUG_CONFIG, FAST_EVAL)
    # moved, unchanged: the same content, scored without a word
    report = run_evaluate(ckpt, cfg_override=fast, tracking=False, out_dir=tmp_path / "eval")
    assert report is not None and report["tasks"] == 8
    # prepared again into the same directory with another eval_fraction: most "held-out"
    # tasks of these shards were trained on
    prepare(load_config(DEBUG_CONFIG, ["data.split.eval_fraction=0.5"]), debug_data["raw"], shards)
    with pytest.raises(OtherShardsError) as e:
        run_evaluate(ckpt, cfg_override=fast, tracking=False, out_dir=tmp_path / "eval")
    msg = str(e.value)
    assert "split_rule.eval_fraction: 0.2 (trained on) vs 0.5 (these shards)" in msg
    assert str(shards / "manifest.json") in msg and str(trained["shards"].resolve()) in msg
    assert "--allow-other-shards" in msg
    with caplog.at_level(logging.WARNING, logger="gmeta.io.manifest"):
        report = run_evaluate(ckpt, cfg_override=fast, tracking=False, out_dir=tmp_path / "eval",
                              allow_other_shards=True)
    assert report is not None and report["tasks"] == 8
    assert any("split_rule.eval_fraction" in r.message and "anyway (--allow-other-shards)" in r.message
               for r in caplog.records)


def test_predict_refuses_other_shards(trained, debug_data, tmp_path):
    from gmeta.inference.predict import run_predict

    prepare(load_config(DEBUG_CONFIG, ["data.split.seed=3"]), debug_data["raw"], tmp_path / "seed3")
    with pytest.raises(OtherShardsError, match=r"split_rule.seed: 0 \(trained on\) vs 3 \(these shards\)"):
        run_predict(trained["checkpoint"], tmp_path / "pred", shards_dir=str(tmp_path / "seed3"), max_tasks=4,
                    progress=False)
    assert not (tmp_path / "pred").exists()  # refused before anything was written
    summary = run_predict(trained["checkpoint"], tmp_path / "pred", shards_dir=str(tmp_path / "seed3"), max_tasks=4,
                          progress=False, allow_other_shards=True)
    assert summary["tasks"] == 4


def test_checkpoint_without_content_hash_is_a_warning(trained, tmp_path, caplog):
    from gmeta.checkpoint import config_of
    from gmeta.io.manifest import check_shards

    meta = json.loads((trained["checkpoint"] / "meta.json").read_text())
    del meta["shards"]  # as written before checkpoints recorded their shards
    with caplog.at_level(logging.WARNING, logger="gmeta.io.manifest"):
        check_shards(trained["checkpoint"], meta, config_of(trained["checkpoint"], meta), trained["shards"])
    assert any("records no manifest content hash" in r.message for r in caplog.records)


def test_shards_of_another_id_hash_are_refused_even_when_other_shards_are_allowed(trained):
    from gmeta.checkpoint import config_of
    from gmeta.io.manifest import check_shards

    meta = json.loads((trained["checkpoint"] / "meta.json").read_text())
    cfg = config_of(trained["checkpoint"], meta)
    check_shards(trained["checkpoint"], meta, cfg, trained["shards"])  # its own shards: fine
    del meta["id_hash"]  # a checkpoint whose tables learnt ids of the first hash (none recorded: 1)
    for allow in (False, True):
        with pytest.raises(PrepareError, match="ids hashed with id_hash 2, but .* id_hash 1"):
            check_shards(trained["checkpoint"], meta, cfg, trained["shards"], allow_other_shards=allow)


def test_train_refuses_a_config_that_disagrees_with_the_manifest(trained, debug_data, tmp_path):
    m = load_manifest(trained["shards"])
    check_manifest_matches(m, load_config(DEBUG_CONFIG), "manifest.json")
    for override, line in [("data.split.min_support=4", "data.split.min_support: 8 (manifest) vs 4 (config)"),
                           ("data.split.eval_fraction=0.5", "data.split.eval_fraction: 0.2 (manifest) vs 0.5 (config)"),
                           ("data.split.val_fraction=0.1", "data.split.val_fraction: 0.0 (manifest) vs 0.1 (config)"),
                           ("data.split.seed=2", "data.split.seed: 0 (manifest) vs 2 (config)"),
                           ("features.task_key=advertiser",
                            'features.task_key: "campaign_id" (manifest) vs "advertiser" (config)')]:
        with pytest.raises(PrepareError) as e:
            check_manifest_matches(m, load_config(DEBUG_CONFIG, [override]), "x/manifest.json")
        assert line in str(e.value), (override, str(e.value))
    # laying out the same tasks otherwise is no disagreement
    check_manifest_matches(m, load_config(DEBUG_CONFIG, ["data.format=webdataset", "data.tasks_per_shard=100"]),
                           "manifest.json")
    # end to end: a prepare with new settings that failed leaves the old shards; train must not use them
    proc = _train(tmp_path, trained["shards"], tmp_path / "run", "train.max_steps=2",
                  "data.split.min_support=4", "data.split.eval_fraction=0.5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.split.min_support: 8 (manifest) vs 4 (config)" in proc.stderr
    assert "data.split.eval_fraction: 0.2 (manifest) vs 0.5 (config)" in proc.stderr
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_resume_refuses_other_shards(trained, debug_data, tmp_path):
    shards = tmp_path / "half"
    prepare(load_config(DEBUG_CONFIG, ["data.split.eval_fraction=0.5"]), debug_data["raw"], shards)
    args = ("train.max_steps=6", "data.split.eval_fraction=0.5")
    resume = ("--resume", str(trained["checkpoint"]))
    proc = _train(tmp_path, shards, tmp_path / "run", *args, options=resume)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "split_rule.eval_fraction: 0.2 (trained on) vs 0.5 (these shards)" in proc.stderr
    assert "resuming training on them would" in proc.stderr and "Traceback" not in proc.stderr
    proc = _train(tmp_path, shards, tmp_path / "run", *args, options=(*resume, "--allow-other-shards"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming training on them anyway (--allow-other-shards)" in proc.stderr
    meta = json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["shards"]["content_hash"] == content_hash(load_manifest(shards))


def _other_dataset(tmp_path: Path, raw: Path) -> tuple[Path, Path]:
    """Another data set's config (other sparse features, table sizes and dense columns) and its shards."""
    text = DEBUG_CONFIG.read_text()
    text = text.replace("    - {name: advertiser_id, num_embeddings: 500}\n", "")
    text = text.replace("{name: user_id, num_embeddings: 2000}", "{name: user_id, num_embeddings: 3000}")
    text = text.replace("dense: [bid_price, user_activity, ad_position]", "dense: [bid_price]")
    config = tmp_path / "other.yaml"
    config.write_text(text)
    prepare(load_config(config), raw, tmp_path / "other")
    return config, tmp_path / "other"


def test_another_datasets_shards_name_the_schema(trained, debug_data, tmp_path, monkeypatch):
    from gmeta import checkpoint
    from gmeta.evaluation.evaluate import run_evaluate

    _, other = _other_dataset(tmp_path, debug_data["raw"])

    def no_model(*a, **k):
        raise AssertionError("a model was built before the shards were checked")

    monkeypatch.setattr(checkpoint, "load_unsharded", no_model)
    for allow in (False, True):  # no escape: a model cannot read records of another schema
        with pytest.raises(PrepareError) as e:
            run_evaluate(trained["checkpoint"], shards_dir=str(other), tracking=False, out_dir=tmp_path / "eval",
                         allow_other_shards=allow)
        msg = str(e.value)
        assert "shards of another schema" in msg and str(other / "manifest.json") in msg
        assert "features.sparse (names, in order)" in msg and '"advertiser_id"' in msg
        assert "features.sparse[0].num_embeddings (user_id): 3000 (these shards) vs 2000" in msg
        assert 'features.dense: ["bid_price"] (these shards)' in msg
    monkeypatch.undo()
    proc = _cli("evaluate", "--checkpoint", str(trained["checkpoint"]), "--shards", str(other), "--no-tracking",
                "--out", str(tmp_path / "eval"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "features.sparse[0].num_embeddings (user_id): 3000 (these shards) vs 2000" in proc.stderr


def test_resume_of_another_configs_checkpoint_names_the_keys(trained, debug_data, tmp_path):
    config, other = _other_dataset(tmp_path, debug_data["raw"])
    resume = ("--resume", str(trained["checkpoint"]))
    proc = _train(tmp_path, other, tmp_path / "run", "train.max_steps=6", config=config, options=resume)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"train.resume: {trained['checkpoint']} holds a model of another config" in proc.stderr
    assert "features.sparse[0].num_embeddings (user_id): 2000 (checkpoint) vs 3000 (this config)" in proc.stderr
    assert 'features.dense: ["bid_price", "user_activity", "ad_position"] (checkpoint) vs ["bid_price"]' \
        in proc.stderr
    # the same data, a model of another width
    proc = _train(tmp_path, trained["shards"], tmp_path / "run", "train.max_steps=6", "model.embedding_dim=4",
                  options=resume)
    assert proc.returncode == 2 and "model.embedding_dim: 8 (checkpoint) vs 4 (this config)" in proc.stderr
    # a setting outside the model's shape whose tensors the checkpoint lacks: named by the state check
    proc = _train(tmp_path, trained["shards"], tmp_path / "run", "train.max_steps=6", "meta.meta_sgd=true",
                  options=resume)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "holds a training state that does not fit this model" in proc.stderr
    assert "meta.meta_sgd: false (checkpoint) vs true (this config)" in proc.stderr


def test_allow_other_shards_flag_on_the_command_line(trained, debug_data, tmp_path):
    prepare(load_config(DEBUG_CONFIG, ["data.split.seed=5"]), debug_data["raw"], tmp_path / "seed5")
    fast = tmp_path / "fast.yaml"
    fast.write_text(DEBUG_CONFIG.read_text() + "eval: {max_tasks: 8, curve_steps: [0], inner_steps: 1}\n")
    base = ("evaluate", "--config", str(fast), "--checkpoint", str(trained["checkpoint"]), "--shards",
            str(tmp_path / "seed5"), "--no-tracking", "--out", str(tmp_path / "eval"))
    proc = _cli(*base, cwd=tmp_path)
    assert proc.returncode == 2 and "split_rule.seed: 0 (trained on) vs 5 (these shards)" in proc.stderr
    proc = _cli(*base, "--allow-other-shards", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluating them anyway (--allow-other-shards)" in proc.stderr
    proc = _cli("predict", "--checkpoint", str(trained["checkpoint"]), "--input", str(debug_data["raw"]), "--out",
                str(tmp_path / "p"), "--allow-other-shards", cwd=tmp_path)
    assert proc.returncode == 2 and "--allow-other-shards are for task shards" in proc.stderr
