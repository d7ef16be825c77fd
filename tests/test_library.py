"""gmeta as a library: batches from DataFrames, and the meta step in a plain process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gmeta.config import load_config
from gmeta.io.batch import BatchError, task_batch
from gmeta.io.reader import TaskReader
from gmeta.models.dlrm import build_model

ROOT = Path(__file__).resolve().parents[1]


def _frame_of(batch, features, dense_names) -> pd.DataFrame:
    """The rows of a reader batch as a user's DataFrame, rows shuffled."""
    lay = batch.layout
    n_s = lay.num_support
    per = batch.sparse.to_dict()
    df = pd.DataFrame({"task": lay.row_task.numpy(), "is_query": np.arange(lay.num_rows) >= n_s,
                       "label": batch.labels.numpy()})
    for f in features:
        jt = per[f["name"]]
        if f["multi_hot"]:
            df[f["name"]] = [v.tolist() for v in torch.split(jt.values(), jt.lengths().tolist())]
        else:
            df[f["name"]] = jt.values().numpy()
    for i, name in enumerate(dense_names):
        df[name] = batch.dense[:, i].numpy()
    return df.sample(frac=1.0, random_state=0)


def test_task_batch_from_a_dataframe_equals_the_readers_batch(debug_config_path, debug_data):
    cfg = load_config(debug_config_path)
    model = build_model(cfg)
    batch = next(iter(TaskReader(debug_data["shards"], "train", 6, shuffle=False, size_buckets=2)))
    df = _frame_of(batch, model.features, cfg.features.dense)
    got = task_batch(df.sort_values("task", kind="stable"), task="task", query="is_query", label="label",
                     sparse=[f["name"] for f in model.features], dense=cfg.features.dense, features=model.features,
                     size_buckets=2, ids="rows")
    # rows were shuffled; within a task and side they keep their order, so sort the reference alike
    for a, b in [(got.support_offsets, batch.support_offsets), (got.query_offsets, batch.query_offsets)]:
        assert torch.equal(a, b)
    key = lambda bt: sorted(zip(bt.layout.row_task.tolist(), bt.labels.tolist(), bt.dense[:, 0].tolist()))  # noqa: E731
    assert key(got) == key(batch)
    assert got.layout.num_unique == batch.layout.num_unique and got.layout.num_groups == batch.layout.num_groups
    assert len(got.layout.buckets) == len(batch.layout.buckets)


def test_task_batch_errors_name_the_column(debug_config_path):
    df = pd.DataFrame({"t": [1, 1, 2, 2], "q": [False, True, False, False], "y": [1, 0, 1, 0], "a": [1, 2, 3, 4]})
    kw = dict(task="t", query="q", label="y", sparse=["a"], ids="rows")
    with pytest.raises(BatchError, match=r"task 2 \(column 't'\) has no query rows"):
        task_batch(df, **kw)
    df.loc[3, "q"] = True
    with pytest.raises(BatchError, match="no column 'b'"):
        task_batch(df, **{**kw, "sparse": ["b"]})
    with pytest.raises(BatchError, match="column 'y'.*booleans"):
        task_batch(df, **{**kw, "query": "y"})
    with pytest.raises(BatchError, match="sparse column 'a': id 4 is outside its table of 4 rows"):
        task_batch(df, **kw, features=[{"name": "a", "num_embeddings": 4}])
    with pytest.raises(BatchError, match="sparse column 'a': id -1 is negative"):
        task_batch(df.assign(a=[1, -1, 2, 3]), **kw)
    assert task_batch(df, **kw).num_tasks == 2


SCRIPT = """
import json, sys
import numpy as np, pandas as pd, torch
from gmeta import MetaLearner, task_batch
import torch.distributed as dist
cfg, out = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
learner = MetaLearner(cfg, ["model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]"])
assert dist.get_world_size() == 1
rows = 240
df = pd.DataFrame({"campaign": np.repeat(np.arange(12), 20), "q": np.tile(np.arange(20) >= 10, 12),
                   "label": (rng.random(rows) < 0.3).astype(float)})
for f in learner.features:
    ids = rng.integers(0, min(30, f["num_embeddings"]), rows)
    df[f["name"]] = [list(ids[i: i + 2]) for i in range(rows)] if f["multi_hot"] else ids
for name in learner.dense_names:
    df[name] = rng.random(rows)
batch = task_batch(df, task="campaign", query="q", label="label", sparse=learner.sparse_names,
                   dense=learner.dense_names, features=learner.features, size_buckets=learner.cfg.meta.size_buckets)
losses = [float(learner.step(batch).loss) for _ in range(30)]
before = learner.predict(batch)
learner.save(out)
again = MetaLearner(checkpoint=out)
after = again.predict(batch)
print(json.dumps({"first": losses[0], "last": losses[-1], "same": bool(np.allclose(before, after, atol=1e-6)),
                  "n": len(after), "steps": again.steps}))
"""


def test_meta_learner_in_a_plain_process(debug_config_path, tmp_path):
    """No process group, no torchrun: MetaLearner makes its own; it learns, saves and reloads."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(debug_config_path), str(tmp_path / "ck")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["last"] < res["first"]  # 30 meta-updates on one batch fit it
    assert res["same"] and res["n"] == 120 and res["steps"] == 30


def _raw_frame() -> pd.DataFrame:
    """Raw rows of 3 tasks, support rows first: integer, string and multi-hot string ids."""
    rng = np.random.default_rng(3)
    n = 24
    return pd.DataFrame({
        "k": np.repeat(["u1", "u2", "u3"], 8), "ts": np.tile(np.arange(8), 3),
        "q": np.tile(np.arange(8) >= 5, 3), "y": (rng.random(n) < 0.4).astype(float),
        "item": rng.integers(0, 5, n) * 1_000_003 - 2, "city": rng.choice(["paris", "oslo", "rome"], n),
        "tags": [list(rng.choice(["x", "y", "z", "w"], int(rng.integers(0, 3)), replace=False)) for _ in range(n)],
        "d": rng.random(n)})


def test_task_batch_hashes_raw_ids_as_serving_does():
    """Raw ids, integers or strings (a string column was refused: 'ids must be integers,
    got <U1'), hash into the same rows as through gmeta prepare's and serving's featuriser."""
    from gmeta.inference.serving import rows_to_blocks
    from gmeta.io.features import ID_HASH, hash_ids

    cfg = load_config(None, ["features.task_key=k", "features.timestamp=ts", "features.label=y",
                             "features.true_prob=''", "features.dense=[d]",
                             "features.sparse=[{name: item, num_embeddings: 1000}, {name: city, num_embeddings: 50}, "
                             "{name: tags, num_embeddings: 64, multi_hot: true}]"])
    df = _raw_frame()
    feats = [{"name": s.name, "num_embeddings": s.num_embeddings, "pooling": s.pooling, "id_hash": ID_HASH}
             for s in cfg.features.sparse]
    kw = dict(task="k", query="q", label="y", sparse=["item", "city", "tags"], dense=["d"])
    got = task_batch(df, **kw, features=feats).sparse.to_dict()
    served = rows_to_blocks(df.assign(role=np.where(df["q"], "query", "support")), cfg, 8, id_hash=ID_HASH)[0][0]
    for name in ("item", "city"):
        want = np.concatenate([served.support.ids[name], served.query.ids[name]])
        np.testing.assert_array_equal(got[name].values().numpy(), want)
    want_tags = np.concatenate([served.support.ids["tags"], served.query.ids["tags"]])
    np.testing.assert_array_equal(got["tags"].values().numpy(), want_tags)
    order = np.lexsort((df["k"], df["q"]))
    np.testing.assert_array_equal(got["city"].values().numpy(),
                                  hash_ids(df["city"].to_numpy()[order].astype(object), "city", 50, ID_HASH))
    # the id hash comes from the features or id_hash=; hash 1 puts integer ids elsewhere
    old = task_batch(df, **kw, features=[{k: v for k, v in f.items() if k != "id_hash"} for f in feats], id_hash=1)
    assert not np.array_equal(old.sparse.to_dict()["item"].values().numpy(), got["item"].values().numpy())
    np.testing.assert_array_equal(old.sparse.to_dict()["city"].values().numpy(), got["city"].values().numpy())
    # plain Python lists of ids are raw ids too
    lists = {c: (df[c].tolist() if c != "q" else df[c].to_numpy()) for c in df.columns}
    np.testing.assert_array_equal(task_batch(lists, **kw, features=feats).sparse.to_dict()["item"].values().numpy(),
                                  got["item"].values().numpy())


def test_task_batch_raw_id_errors_name_the_column_and_option():
    from gmeta.io.features import ID_HASH

    df = _raw_frame()
    feats = [{"name": "item", "num_embeddings": 1000, "id_hash": ID_HASH}]
    kw = dict(task="k", query="q", label="y", sparse=["item"])
    with pytest.raises(BatchError, match=r"ids='raw': raw ids are hashed .* needs features="):
        task_batch(df, **kw)
    with pytest.raises(BatchError, match=r"features do not carry one id_hash .* pass id_hash="):
        task_batch(df, **kw, features=[{"name": "item", "num_embeddings": 1000}])
    with pytest.raises(BatchError, match=r"id_hash 7: must be one of \[1, 2\]"):
        task_batch(df, **kw, features=feats, id_hash=7)
    with pytest.raises(BatchError, match=r"ids='table': 'raw' .* or 'rows'"):
        task_batch(df, **kw, features=feats, ids="table")
    with pytest.raises(BatchError, match=r"sparse column 'item': raw ids must be integers or strings, got float64 "
                                         r"\(pandas reads an integer column with a gap as floats"):
        task_batch(df.assign(item=df["item"] + 0.5), **kw, features=feats)
    mixed = df.assign(item=df["item"].astype(object))
    mixed.loc[3, "item"] = "abc"
    with pytest.raises(BatchError, match=r"sparse column 'item': raw ids must be all integers or all strings"):
        task_batch(mixed, **kw, features=feats)
    with pytest.raises(BatchError, match=r"sparse column 'item': with ids='rows' ids are table rows and must be "
                                         r"integers"):
        task_batch(df.assign(item=df["city"]), **kw, ids="rows")
