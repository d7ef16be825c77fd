"""Sequence features (``max_length``) and shared tables (``table``) through the data path:
prepare (parquet and webdataset shards), the reader, raw-row hashing, the model's tables,
and the config errors."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gmeta.config import ConfigError, load_config
from gmeta.io.features import ID_HASH, hash_batch, hash_ids
from gmeta.io.manifest import load_manifest, schema_differences
from gmeta.io.reader import TaskReader
from gmeta.meta.base import gather_rows
from gmeta.models.dlrm import build_model
from tests.conftest import DEBUG_CONFIG
from tests.support.sequences import MAX_LENGTH, SEQ, clicked
from tests.support.sequences import seq_overrides as sequence_overrides


def seq_overrides(extra: str = SEQ) -> list[str]:
    return sequence_overrides(DEBUG_CONFIG, extra)


def test_prepared_sequences_are_truncated_and_hashed_as_the_feature_whose_table_they_share(seq_data):
    m = load_manifest(seq_data["pq"])
    assert m["schema"]["sparse"][-1] == {"name": "clicked_ads", "num_embeddings": 2000, "multi_hot": True,
                                         "pooling": "sum", "ids": "hash", "max_length": MAX_LENGTH, "table": "ad_id"}
    checked = cut = 0
    for rec in pq.read_table(seq_data["pq"] / m["splits"]["train"]["files"][0]["path"]).slice(0, 40).to_pylist():
        for side in (rec["support"], rec["query"]):
            for ts, got in zip(side["timestamp"], side["clicked_ads"]):
                raw = clicked(ts)
                want = hash_ids(np.array(raw[:MAX_LENGTH], np.int64), "ad_id", 2000, ID_HASH) if raw else []
                assert list(got) == list(want)
                checked += 1
                cut += len(raw) > MAX_LENGTH
    assert checked > 500 and cut > 50


def test_parquet_and_webdataset_shards_give_the_same_sequence_batches(seq_data):
    pq_batches = list(TaskReader(seq_data["pq"], "train", 6, shuffle=False, size_buckets=2))
    wds_batches = list(TaskReader(seq_data["wds"], "train", 6, shuffle=False, size_buckets=2))
    assert len(pq_batches) == len(wds_batches) > 5
    for a, b in zip(pq_batches, wds_batches):
        assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
        assert a.layout is not None and b.layout is not None
        assert a.layout.num_cells == b.layout.num_cells == 10 + MAX_LENGTH and a.layout.num_features == 11
        assert torch.equal(a.layout.slot, b.layout.slot)
    lengths = pq_batches[0].sparse["clicked_ads"].lengths()
    assert int(lengths.max()) == MAX_LENGTH and int(lengths.min()) == 0


def test_one_table_serves_both_features_and_the_plain_forward_equals_the_layout(seq_data):
    torch.manual_seed(0)
    model = build_model(seq_data["cfg"])
    tables = {c.name: c.feature_names for c in model.sparse_arch.ec.embedding_configs()}
    assert tables["t_ad_id"] == ["ad_id", "clicked_ads"] and "t_clicked_ads" not in tables
    from gmeta.parallel.sharding import table_sharding_types

    assert "ad_id" in table_sharding_types(model, seq_data["cfg"])
    assert "clicked_ads" not in table_sharding_types(model, seq_data["cfg"])
    keys = [f["name"] for f in model.features]
    ids = torch.tensor([7, 1999, 7, 1999])
    lengths = torch.tensor([2 if k in ("ad_id", "clicked_ads") else 0 for k in keys])
    emb = model.sparse_arch(KeyedJaggedTensor(keys=keys, values=ids, lengths=lengths, stride=1))
    assert torch.equal(emb["ad_id"].values(), emb["clicked_ads"].values())
    # the plain forward pools a sequence into its cells as the layout does
    batch = next(iter(TaskReader(seq_data["pq"], "train", 6, shuffle=False)))
    from gmeta.layout import layout_of

    lay = layout_of(batch, model.pooling, 1, model.cell_widths)
    with torch.no_grad():
        rows = model.lookup(lay)
        pooled = lay.pool(gather_rows(rows, lay.occ_unique), lay.slot, lay.divisor, lay.num_rows)
        assert torch.allclose(model(batch.sparse, batch.dense), model.head(batch.dense, pooled), atol=1e-6)
    assert pooled.shape[1] == 10 + MAX_LENGTH


def test_raw_rows_are_truncated_when_scored(seq_data):
    t = pq.read_table(sorted(seq_data["raw"].glob("*.parquet"))[0]).slice(0, 200)
    hashed = hash_batch(t, seq_data["cfg"], None, "rows", id_hash=ID_HASH)
    lengths = pc.list_value_length(hashed.column("clicked_ads")).to_numpy()
    raw_lengths = pc.list_value_length(t.column("clicked_ads")).to_numpy()
    assert (lengths == np.minimum(raw_lengths, MAX_LENGTH)).all() and (raw_lengths > MAX_LENGTH).any()


def test_task_batch_cuts_sequences_and_hashes_them_as_the_shared_feature(seq_data):
    from gmeta.io.batch import task_batch

    model = build_model(seq_data["cfg"])
    feats = [dict(f, id_hash=ID_HASH) for f in model.features]
    seqs = [[1, 2, 3, 4, 5, 6, 7], [], [8]]
    data = {"task": ["a", "a", "a"], "q": [False, True, True], "label": [0.0, 1.0, 0.0],
            **{f["name"]: ([s for s in seqs] if f["multi_hot"] else [1, 2, 3]) for f in feats}}
    batch = task_batch(data, task="task", query="q", label="label", sparse=[f["name"] for f in feats], dense=[],
                       features=feats)
    jt = batch.sparse["clicked_ads"]
    assert jt.lengths().tolist() == [MAX_LENGTH, 0, 1]
    assert jt.values().tolist() == hash_ids(np.array([1, 2, 3, 4, 5, 8]), "ad_id", 2000, ID_HASH).tolist()
    assert batch.layout is not None and batch.layout.num_cells == 10 + MAX_LENGTH


def test_shards_of_another_max_length_are_named(seq_data):
    cfg = load_config(DEBUG_CONFIG, seq_overrides(SEQ.replace(f"max_length: {MAX_LENGTH}", "max_length: 6")))
    assert ("features.sparse[10].max_length (clicked_ads)", MAX_LENGTH, 6) in \
        schema_differences(load_manifest(seq_data["pq"]), cfg)


@pytest.mark.parametrize("extra, key", [
    ("{name: s, num_embeddings: 2000, max_length: 5}", r"features.sparse\[10\].multi_hot"),
    ("{name: s, num_embeddings: 2000, multi_hot: true, pooling: mean, max_length: 5}",
     r"features.sparse\[10\].pooling"),
    ("{name: s, num_embeddings: 2000, multi_hot: true, max_length: -1}", r"features.sparse\[10\].max_length"),
    ("{name: s, num_embeddings: 2000, multi_hot: true, max_length: 5, min_count: 2}",
     r"features.sparse\[10\].min_count"),
    ("{name: s, num_embeddings: 2000, multi_hot: true, max_length: 5, ids: managed}", r"features.sparse\[10\].ids"),
    ("{name: s, num_embeddings: 2000, multi_hot: true, table: nope}", r"features.sparse\[10\].table.*nope"),
    ("{name: s, num_embeddings: 2000, multi_hot: true, table: s}", r"features.sparse\[10\].table"),
    ("{name: s, num_embeddings: 1000, multi_hot: true, table: ad_id}", r"features.sparse\[10\].num_embeddings"),
    ("{name: s, num_embeddings: 2000, multi_hot: true, table: ad_id, min_count: 2}", r"features.sparse\[10\].table"),
    ("{name: s, num_embeddings: 2000, multi_hot: true, table: ad_id}, {name: t, num_embeddings: 2000, table: s}",
     r"features.sparse\[11\].table.*owns the table"),
])
def test_bad_sequences_and_shared_tables_name_the_key(extra, key):
    with pytest.raises(ConfigError, match=key):
        load_config(DEBUG_CONFIG, seq_overrides(extra))


def test_a_shared_table_with_a_default_row_on_its_owner_is_refused():
    with pytest.raises(ConfigError, match=r"features.sparse\[10\].table: ad_id has a default row"):
        load_config(DEBUG_CONFIG, seq_overrides() + ["features.sparse.ad_id.min_count=2"])


def test_the_generator_does_not_take_sequences():
    with pytest.raises(ConfigError, match="generator.feature"):
        load_config(DEBUG_CONFIG, seq_overrides() + ["features.sparse.user_id.min_count=2",
                                                     "generator.feature=user_id", "generator.attributes=[device]"])


def test_a_sharding_override_of_a_feature_without_its_own_table_names_the_owner():
    with pytest.raises(ConfigError, match=r"sharding.tables\[0\].name: clicked_ads shares the table of ad_id"):
        load_config(DEBUG_CONFIG, seq_overrides() + ["sharding.tables=[{name: clicked_ads, sharding_type: row_wise}]"])
