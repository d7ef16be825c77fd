"""The id hash: one versioned function for prepare, serving, predict --input and the library;
integer ids keyed by their feature in new shards; old shards and checkpoints keep theirs."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from gmeta.config import load_config
from gmeta.io.errors import PrepareError
from gmeta.io.features import ID_HASH, hash_ids, id_hash_of
from gmeta.io.prepare import prepare
from tests.support.cli import run_gmeta

ROOT = Path(__file__).resolve().parents[1]

# Avazu's small integer features and their whole vocabularies (train.csv, 40M rows)
AVAZU_SMALL = {"C1": [1001, 1002, 1005, 1007, 1008, 1010, 1012], "banner_pos": [0, 1, 2, 3, 4, 5, 7],
               "device_type": [0, 1, 2, 4, 5], "device_conn_type": [0, 2, 3, 5], "C18": [0, 1, 2, 3]}


def _shared(rows: np.ndarray) -> float:
    """Share of the ids whose table row another id takes too."""
    _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
    return float(np.mean(counts[inverse] > 1))


def test_hash_1_is_the_hash_old_shards_hold():
    """Rows as gmeta prepare wrote them before the id hash had versions (manifests without
    ``id_hash``): integers unkeyed, strings keyed by the feature name."""
    ints = np.array([0, 1, 2, 3, 5, -1, 1005, 100084])
    assert hash_ids(ints, "device_conn_type", 16, 1).tolist() == [0, 5, 10, 0, 12, 11, 12, 0]
    assert hash_ids(ints, "C20", 1000, 1).tolist() == [0, 789, 730, 856, 132, 67, 652, 968]
    text = np.array(["1fbe01fe", "a99f214a", "\x00missing"], dtype=object)
    assert hash_ids(text, "site_domain", 100000, 1).tolist() == [53106, 26720, 86580]
    # the new hash keeps text ids where they were: only integer ids move
    assert hash_ids(text, "site_domain", 100000, 2).tolist() == [53106, 26720, 86580]
    with pytest.raises(ValueError, match=r"id_hash 3: must be one of \(1, 2\)"):
        hash_ids(ints, "C20", 1000, 3)


def test_small_integer_ids_collide_only_by_chance():
    """Four ids 0..3 of 400 features: under hash 1 every feature puts them in the same rows
    (0 and 3 share row 0 of every 16-row table); the hash new shards get puts them in rows
    that vary with the feature, colliding as often as a random function does."""
    ids = np.arange(4)
    names = [f"f{i}" for i in range(400)]
    for m in (16, 64, 1000):
        old = {tuple(hash_ids(ids, n, m, 1)) for n in names}
        assert len(old) == 1  # the key is ignored: one placement for every feature
        placements = [hash_ids(ids, n, m, ID_HASH) for n in names]
        assert len({tuple(p) for p in placements}) > 300
        collide = np.mean([_shared(p) > 0 for p in placements])
        p = 1 - np.prod([(m - i) / m for i in range(4)])  # some pair of 4 random rows is the same
        assert abs(collide - p) < 4 * np.sqrt(p * (1 - p) / len(names)) + 1e-9, (m, collide, p)
    assert _shared(hash_ids(ids, "C18", 16, 1)) == 0.5  # 0 and 3
    # Avazu's device_conn_type and C18 in tables of 1000 rows: no shared row
    for name in ("device_conn_type", "C18"):
        assert _shared(hash_ids(np.array(AVAZU_SMALL[name]), name, 1000, ID_HASH)) == 0.0, name


def test_shipped_avazu_tables_leave_room_for_avazu_vocabularies():
    """configs/avazu.yaml: each table holds Avazu's vocabulary of the feature (train.csv)
    with an expected shared-row share under 2.5% for a random hash, and its small integer
    features' whole vocabularies share no row."""
    vocab = {"C1": 7, "banner_pos": 7, "site_domain": 7745, "site_category": 26, "app_id": 8552,
             "app_domain": 559, "app_category": 36, "device_model": 8251, "device_type": 5, "device_conn_type": 4,
             "C14": 2626, "C17": 435, "C18": 4, "C19": 68, "C20": 172, "C21": 60}
    cfg = load_config(ROOT / "configs" / "avazu.yaml")
    sizes = {s.name: s.num_embeddings for s in cfg.features.sparse}
    assert set(sizes) == set(vocab)
    for name, n in vocab.items():
        assert 1 - (1 - 1 / sizes[name]) ** (n - 1) < 0.025, (name, sizes[name])
    for name, ids in AVAZU_SMALL.items():
        assert _shared(hash_ids(np.array(ids), name, sizes[name], ID_HASH)) == 0.0, name


def _zipf_choice(rng, values, n, a=1.3):
    w = 1.0 / np.arange(1, len(values) + 1) ** a
    return rng.choice(np.asarray(values, dtype=object), size=n, p=w / w.sum())


def write_avazu_sample(path: Path, rows: int = 4000, seed: int = 0) -> None:
    """Rows in the layout of Avazu's train.csv with its value distributions: the small
    integer features with their real vocabularies and skew, hex-string ids, integer C14-C21."""
    rng = np.random.default_rng(seed)
    hexes = lambda k: [f"{int(v):08x}" for v in rng.integers(1 << 32, size=k)]  # noqa: E731
    small = {"C1": [0.0005, 0.0005, 0.92, 0.0005, 0.0005, 0.05, 0.0285], "banner_pos": [0.72, 0.27, 0.002, 0.002,
             0.002, 0.002, 0.002], "device_type": [0.05, 0.92, 0.001, 0.02, 0.009],
             "device_conn_type": [0.86, 0.08, 0.05, 0.01], "C18": [0.42, 0.06, 0.17, 0.35]}
    cols: dict[str, np.ndarray] = {}
    for name, p in small.items():
        cols[name] = rng.choice(AVAZU_SMALL[name], size=rows, p=np.array(p) / sum(p))
    sites = hexes(60)
    cols["site_id"] = _zipf_choice(rng, sites, rows, 0.8)
    cols["site_domain"] = np.array([f"d{s[:6]}" for s in cols["site_id"]], dtype=object)
    for name, k in (("site_category", 26), ("app_id", 300), ("app_domain", 60), ("app_category", 36),
                    ("device_model", 900)):
        cols[name] = _zipf_choice(rng, hexes(k), rows)
    for name, k, lo, hi in (("C14", 900, 375, 24052), ("C17", 250, 112, 2758), ("C19", 68, 33, 1959),
                            ("C21", 60, 1, 219)):
        cols[name] = _zipf_choice(rng, rng.choice(np.arange(lo, hi), size=k, replace=False), rows)
    cols["C20"] = _zipf_choice(rng, [-1] + list(rng.choice(np.arange(100000, 100250), 171, replace=False)), rows, 1.0)
    size = rng.choice(3, size=rows, p=[0.9, 0.07, 0.03])
    cols["C15"], cols["C16"] = np.array([320, 300, 728])[size], np.array([50, 250, 90])[size]
    header = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
              "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")
    hours = 14102100 + np.sort(rng.integers(0, 24, rows))
    lines = [header]
    for i in range(rows):
        c = {k: v[i] for k, v in cols.items()}
        lines.append(f"{i},{int(rng.random() < 0.17)},{hours[i]},{c['C1']},{c['banner_pos']},{c['site_id']},"
                     f"{c['site_domain']},{c['site_category']},{c['app_id']},{c['app_domain']},{c['app_category']},"
                     f"a99f214a,{int(rng.integers(1 << 32)):08x},{c['device_model']},{c['device_type']},"
                     f"{c['device_conn_type']},{c['C14']},{c['C15']},{c['C16']},{c['C17']},{c['C18']},{c['C19']},"
                     f"{c['C20']},{c['C21']}")
    path.write_text("\n".join(lines) + "\n")


def test_avazu_config_does_not_warn_on_an_avazu_sample(tmp_path, caplog):
    """docs/data.md: the shipped configs size their tables so that none warns on their data.
    Before, 94% of device_conn_type's ids shared a row (0 and 3 in row 0 of 16)."""
    write_avazu_sample(tmp_path / "train.csv")
    cfg = load_config(ROOT / "configs" / "avazu.yaml", [f"data.shards_dir={tmp_path / 's'}"])
    with caplog.at_level(logging.WARNING, logger="gmeta"):
        m = prepare(cfg, tmp_path / "train.csv", tmp_path / "s")
    assert m["input_columns"]["device_conn_type"] == "int64" and m["input_columns"]["site_id"] == "string"
    shares = {k: c["colliding_share"] for k, c in m["cardinality"].items()}
    assert not [r.message for r in caplog.records if "share their table row" in r.message], shares
    for name in AVAZU_SMALL:
        assert m["cardinality"][name]["colliding_share_exact"] and shares[name] == 0.0, name
    assert m["id_hash"] == ID_HASH == 2
    # the shards hold the ids as hash_ids puts them (the function serving and task_batch use)
    raw = np.loadtxt(tmp_path / "train.csv", delimiter=",", skiprows=1, usecols=15, dtype=np.int64)
    held = {v for t in pq.read_table(tmp_path / "s" / "train").to_pylist() for side in ("support", "query")
            for v in t[side]["device_conn_type"]}
    assert held <= set(hash_ids(raw, "device_conn_type", 2000, 2).tolist()) and len(held) > 1


def test_id_hash_of_manifests_and_checkpoints():
    assert id_hash_of({}, "m.json") == 1  # written before the field: the old hash
    assert id_hash_of({"id_hash": 2}, "m.json") == 2
    for bad in (3, True, "2"):
        with pytest.raises(PrepareError, match=r"m\.json: id_hash .* is not one this version of gmeta knows"):
            id_hash_of({"id_hash": bad}, "m.json")


# --------------------------------------------------------------------------------------
# one hash for every path: MetaLearner + task_batch, serving, predict --input
# --------------------------------------------------------------------------------------

SCRIPT = """
import json, sys
import numpy as np, pandas as pd
from gmeta import MetaLearner, task_batch
from gmeta.inference.serving import assign_roles
raw, out = sys.argv[1], {}
for ck in sys.argv[2:]:
    learner = MetaLearner(checkpoint=ck)
    rows = pd.read_parquet(raw)
    rows = rows[rows["campaign_id"].isin(sorted(rows["campaign_id"].unique())[:30])]
    df = assign_roles(rows, learner.cfg)
    df = df[df["role"] != ""].sort_values(["campaign_id", "ts"], kind="stable")
    df["is_query"] = df["role"] == "query"
    batch = task_batch(df, task="campaign_id", query="is_query", label="label", sparse=learner.sparse_names,
                       dense=learner.dense_names, features=learner.features,
                       size_buckets=learner.cfg.meta.size_buckets)
    p = learner.predict(batch, steps=2)
    out[ck] = {"id_hash": learner.id_hash, "index": df.index[df["is_query"]].tolist(), "p": p.tolist()}
print(json.dumps(out))
"""


def _learner_scores(raw: Path, *checkpoints: Path) -> list[dict]:
    """MetaLearner's scores of the raw rows, per checkpoint, in one plain process of its own
    (one interpreter's imports for all of them)."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(raw), *map(str, checkpoints)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return [out[str(ck)] for ck in checkpoints]


def _marked_old(checkpoint: Path, out: Path) -> Path:
    """A copy of the checkpoint as gmeta wrote them before the id hash had versions."""
    shutil.copytree(checkpoint, out)
    meta = json.loads((out / "meta.json").read_text())
    del meta["id_hash"]
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_learner_scores_raw_rows_as_serving_and_predict_do(debug_checkpoint, debug_data, tmp_path):
    """The same raw rows through MetaLearner.predict (task_batch hashing them) and through
    score_rows (the pyfunc model) and gmeta predict --input: the same scores, for a new
    checkpoint and for one from before the id hash had versions (which hashes the old way)."""
    import pandas as pd

    from gmeta.checkpoint import load_unsharded
    from gmeta.inference.predict_raw import run_predict_raw
    from gmeta.inference.pyfunc import GMetaModel
    from gmeta.inference.serving import assign_roles, score_rows

    old = _marked_old(debug_checkpoint, tmp_path / "old")
    scores = {}
    learned = dict(zip(("new", "old"), _learner_scores(debug_data["raw"], debug_checkpoint, old)))
    for name, ck in (("new", debug_checkpoint), ("old", old)):
        got = learned[name]
        model, cfg, meta = load_unsharded(ck)
        assert got["id_hash"] == meta.get("id_hash", 1) == {"new": 2, "old": 1}[name]
        rows = pd.read_parquet(debug_data["raw"])
        rows = rows[rows["campaign_id"].isin(sorted(rows["campaign_id"].unique())[:30])]
        df = assign_roles(rows, cfg)
        want = score_rows(model, cfg, df, 2, meta.get("input_columns"), id_hash=got["id_hash"])["score"]
        assert len(got["p"]) == int((df["role"] == "query").sum()) > 100
        np.testing.assert_allclose(got["p"], want.loc[got["index"]].to_numpy(), atol=1e-5)
        # gmeta predict --input: the checkpoint's hash too
        src = tmp_path / f"logs-{name}"
        src.mkdir()
        rows.to_parquet(src / "a.parquet")
        run_predict_raw(ck, src, tmp_path / f"out-{name}", inner_steps=2, progress=False)
        part = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / f"out-{name}").glob("part-*.parquet"))])
        pos = rows.index[part["input_row"].to_numpy()]
        np.testing.assert_allclose(part["score"].to_numpy(), want.loc[pos].to_numpy(), atol=1e-5)
        # the pyfunc model: the checkpoint's hash as well
        pyfunc = GMetaModel()
        pyfunc.load_context(SimpleNamespace(artifacts={"checkpoint": str(ck)}))
        np.testing.assert_allclose(pyfunc.predict(None, df, {"inner_steps": 2})["score"].loc[got["index"]],
                                   got["p"], atol=1e-5)
        scores[name] = np.asarray(got["p"])
    # the hash matters: the same weights score the rows otherwise under the other hash
    assert np.abs(scores["new"] - scores["old"]).max() > 1e-3


def test_models_of_other_id_hashes_are_not_scored_in_one_pass():
    """gmeta predict --input with several checkpoints featurises the rows once: a model whose
    tables were trained on ids of another hash is refused, naming it."""
    from gmeta.inference.predict import PredictError
    from gmeta.inference.predict_raw import _same_reading

    cfg = load_config(ROOT / "configs" / "ads_cvr_debug.yaml")
    _same_reading([(None, cfg, {"id_hash": 1}), (None, cfg, {})], ["a", "b"], True)  # both the old hash
    with pytest.raises(PredictError, match=r"--checkpoint b: its id_hash differ from those of --checkpoint a"):
        _same_reading([(None, cfg, {"id_hash": 2}), (None, cfg, {})], ["a", "b"], True)
    with pytest.raises(PrepareError, match=r"b/meta\.json: id_hash 9 is not one"):
        _same_reading([(None, cfg, {"id_hash": 2}), (None, cfg, {"id_hash": 9})], ["a", "b"], True)


def test_resume_refuses_a_checkpoint_of_another_id_hash(debug_checkpoint, debug_data, tmp_path):
    """Training on shards of hash 2 does not continue tables trained on ids of hash 1 (and
    then record hash 2 for them)."""
    old = _marked_old(debug_checkpoint, tmp_path / "old")
    proc = run_gmeta(
        ["train", "--config", ROOT / "configs" / "ads_cvr_debug.yaml", "--nproc-per-node", "1", "--resume", old,
         f"data.shards_dir={debug_data['shards']}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=50",
         "train.eval_at_end=false", "tracking.enabled=false"], cwd=tmp_path)
    assert proc.returncode != 0
    assert ("old/meta.json: its tables were trained on ids of id_hash 1, the shards in data.shards_dir hold "
            "id_hash 2") in proc.stderr, proc.stderr[-3000:]


def test_a_new_learner_hashes_as_the_shards_beside_it(tmp_path):
    """MetaLearner from a config: the id hash of the shards in data.shards_dir (their id
    counts may set its default rows; gmeta evaluate reads them), else the current one."""
    from gmeta.io.manifest import FORMAT_VERSION
    from gmeta.training.learner import _shards_id_hash

    cfg = load_config(ROOT / "configs" / "ads_cvr_debug.yaml", [f"data.shards_dir={tmp_path / 's'}"])
    assert _shards_id_hash(cfg) == ID_HASH  # no shards
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    assert _shards_id_hash(cfg) == 1  # shards from before the id hash had versions
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "id_hash": 5}))
    with pytest.raises(PrepareError, match=r"s/manifest\.json: id_hash 5 is not one"):
        _shards_id_hash(cfg)
