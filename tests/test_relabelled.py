"""Data whose binary labels are not 0/1 (libFM's -1/+1, text such as yes/no), mapped by
features.positive_labels / negative_labels: it trains, its MLflow model is logged, and the
logged model scores raw rows in the data's own label encoding; a sweep's trials complete."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from gmeta.cli import main as cli_main
from gmeta.config import load_config
from gmeta.io.features import ID_HASH
from gmeta.io.prepare import prepare
from tests.support.cli import run_gmeta

COMMON = ["features.true_prob=''", "features.dense=[price]", "model.embedding_dim=4", "model.dense_arch=[4]",
          "model.over_arch=[4]", "meta.tasks_per_batch=4", "eval.tasks_per_batch=8",
          "data.split.min_support=2", "data.split.min_query=2", "data.split.max_support=8",
          "data.split.max_query=8", "data.split.eval_fraction=0.2", "data.split.val_fraction=0.2",
          "train.nproc_per_node=1", "train.log_every=1", "train.eval_at_end=false", "tracking.system_metrics_s=0"]
LIBFM = ["data.source.format=libfm", "features.task_key=qid", "features.timestamp=''", "features.label=y",
         "features.positive_labels=[1]", "features.negative_labels=[-1]",
         "features.sparse=[{name: item, num_embeddings: 1000}, {name: tags, num_embeddings: 1000, multi_hot: true}]",
         "data.source.fields=[{name: item, first: 0, last: 999}, {name: tags, first: 1000, last: 1099}, "
         "{name: price, first: 2000, last: 2000, kind: dense}]"]
CSV = ["data.source.format=csv", "features.task_key=campaign", "features.timestamp=ts", "features.label=converted",
       "features.positive_labels=[yes]", "features.negative_labels=[no]",
       "features.sparse=[{name: item, num_embeddings: 1000}]"]


def _rows(seed: int = 0, tasks: int = 30, per_task: int = 16) -> pd.DataFrame:
    """Tasks whose positive rate depends on the task and the item, labels 0/1 (``y01``)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(tasks):
        bias = rng.normal()
        for i in range(per_task):
            item = int(rng.integers(0, 40))
            p = 1 / (1 + np.exp(-(bias + (item % 3 - 1))))
            out.append({"task": t, "ts": i, "item": item, "tag": int(rng.integers(0, 20)),
                        "price": round(float(rng.random()), 3), "y01": int(rng.random() < p)})
    return pd.DataFrame(out)


def _write(kind: str, rows: pd.DataFrame, raw: Path) -> pd.DataFrame:
    """The rows as the raw input of ``kind`` (libFM lines, or a CSV of yes/no labels), and as
    the DataFrame a client of the served model sends (raw columns, raw labels)."""
    raw.mkdir(parents=True)
    if kind == "libfm":
        (raw / "train.libfm").write_text("".join(
            f"{2 * r.y01 - 1:+d} qid:{r.task} {r.item}:1 {1000 + r.tag}:1 2000:{r.price}\n" for r in rows.itertuples()))
        return pd.DataFrame({"qid": rows["task"], "y": (2 * rows["y01"] - 1).astype(float), "item": rows["item"],
                             "tags": [[1000 + t] for t in rows["tag"]], "price": rows["price"]})
    frame = pd.DataFrame({"campaign": [f"c{t}" for t in rows["task"]], "ts": rows["ts"], "item": rows["item"],
                          "price": rows["price"], "converted": np.where(rows["y01"] == 1, "yes", "no")})
    frame.to_csv(raw / "train.csv", index=False)
    return frame


@pytest.fixture(scope="module", params=["libfm", "csv"])
def relabelled(request, tmp_path_factory) -> dict:
    """Raw data of each label encoding, prepared: {kind, overrides, rows (the client's view), 01 labels}."""
    kind = request.param
    base = tmp_path_factory.mktemp(f"relabelled_{kind}")
    rows = _rows()
    client_rows = _write(kind, rows, base / "raw")
    overrides = COMMON + (LIBFM if kind == "libfm" else CSV) + [f"data.raw_dir={base / 'raw'}",
                                                                 f"data.shards_dir={base / 'shards'}"]
    prepare(load_config(None, overrides), base / "raw", base / "shards")
    (base / "config.yaml").write_text("{}\n")  # the defaults: the overrides say the rest
    return {"config": base / "config.yaml", "kind": kind, "overrides": overrides, "rows": client_rows,
            "y01": rows["y01"].to_numpy(), "label": "y" if kind == "libfm" else "converted"}


def test_relabelled_data_trains_logs_its_model_and_serves_raw_rows(relabelled, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_gmeta(
        ["train", "--config", relabelled["config"], *relabelled["overrides"], "train.max_steps=3",
         f"train.output_dir={tmp_path / 'run'}", f"tracking.uri={uri}", "tracking.experiment=relabelled"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("relabelled")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    (logged,) = client.search_logged_models([exp.experiment_id])
    assert logged.source_run_id == run.info.run_id
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(logged.model_uri)

    # a client's rows: raw columns, labels as the data writes them, query labels unknown
    rows, y01 = relabelled["rows"], relabelled["y01"]
    key = rows.columns[0]
    some = rows[rows[key].isin(rows[key].unique()[:6])].copy()
    role = np.where(some.groupby(key).cumcount() < 8, "support", "query")
    label = relabelled["label"]
    some = some.assign(role=role)
    some.loc[some["role"] == "query", label] = None
    out = model.predict(some, params={"inner_steps": 2})
    q = (some["role"] == "query").to_numpy()
    assert out["score"][~q].isna().all()
    scores = out["score"][q].to_numpy()
    assert np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()

    # the raw labels are mapped as training mapped them: the same rows with 0/1 labels score
    # the same under a config that reads 0/1
    from gmeta.checkpoint import load_unsharded
    from gmeta.inference.serving import score_rows

    m, cfg, meta = load_unsharded(tmp_path / "run" / "checkpoint")
    plain = load_config(None, relabelled["overrides"] + ["features.positive_labels=[]", "features.negative_labels=[]"])
    as01 = some.assign(**{label: np.where(q, np.nan, y01[some.index]).astype(float)})
    want = score_rows(m, plain, as01, 2, id_hash=meta["id_hash"])["score"].to_numpy()
    np.testing.assert_allclose(scores, want[q], rtol=1e-5, atol=1e-6)
    # and they are used: the same rows with every support label flipped score otherwise
    flipped = some.copy()
    pos, neg = cfg.features.positive_labels[0], cfg.features.negative_labels[0]
    raw_pos = float(pos) if relabelled["kind"] == "libfm" else pos
    raw_neg = float(neg) if relabelled["kind"] == "libfm" else neg
    s = ~q
    flipped.loc[s, label] = np.where(some.loc[s, label] == raw_pos, raw_neg, raw_pos)
    assert not np.allclose(model.predict(flipped, params={"inner_steps": 2})["score"][q].to_numpy(), scores)


@pytest.mark.parametrize("relabelled", ["libfm"], indirect=True)  # one label encoding is enough for the sweep
def test_a_sweep_over_relabelled_data_completes_its_trials(relabelled, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tmp_path / "sweep.yaml"  # the defaults and a search space: the overrides say the rest
    cfg.write_text("sweep:\n  trials: 1\n  params:\n    - {key: meta.inner_lr, low: 0.05, high: 0.2}\n")
    rc = cli_main(["sweep", "--config", str(cfg), "--out", str(tmp_path / "sweep"), "--tracking-uri", uri,
                   *relabelled["overrides"], "train.max_steps=2", "train.val_every_steps=2"])
    assert rc == 0
    trials = json.loads((tmp_path / "sweep" / "trials.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"]
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("gmeta")
    assert len(client.search_logged_models([exp.experiment_id])) == 1  # the trial's model


@pytest.mark.parametrize("labels, support, column_type", [
    ([], [0, 1, 1], "int64"),
    ([], [False, True, True], "bool"),
    (["[1]", "[-1]"], [-1.0, 1.0, 1.0], "double"),
    (["[yes]", "[no]"], ["no", "yes", "yes"], "string"),
    (["[true]", "[false]"], [False, True, True], "bool"),
])
def test_query_labels_may_be_missing_whatever_the_label_type(labels, support, column_type):
    """A client sends support labels in the data's encoding and no query labels (None/NaN):
    the rows read in every label type, support labels mapped as training mapped them."""
    from gmeta.inference.serving import example_rows, rows_to_blocks

    over = ["features.task_key=k", "features.timestamp=''", "features.label=y", "features.true_prob=''",
            "features.sparse=[{name: a, num_embeddings: 100}]", "features.dense=[]"]
    if labels:
        over += [f"features.positive_labels={labels[0]}", f"features.negative_labels={labels[1]}"]
    cfg = load_config(None, over)
    types = {"k": "int64", "y": column_type, "a": "int64"}
    rows = pd.DataFrame({"k": [7] * 5, "y": pd.Series(support + [None, None], dtype=object),
                         "a": [1, 2, 3, 4, 5], "role": ["support"] * 3 + ["query"] * 2})
    (block, positions), = rows_to_blocks(rows, cfg, 4, types, id_hash=ID_HASH)
    np.testing.assert_array_equal(block.support.label, [0.0, 1.0, 1.0])
    assert positions.tolist() == [3, 4]
    # and the model's signature example, written in the same encoding and type
    example = example_rows(cfg, types)
    (block, _), = rows_to_blocks(example, cfg, 4, types, id_hash=ID_HASH)
    np.testing.assert_array_equal(block.support.label, [0.0, 1.0])
