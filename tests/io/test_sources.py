"""Raw-input readers: MovieLens (ML-100K, ML-1M, RecBole atomic files), RecBole atomic
files in general, and CTR logs (CSV/TSV without header, missing values); the MovieLens
cold-start protocol. Every input is written here, in the real formats, from one small
generated data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gmeta.config import load_config
from gmeta.io.errors import PrepareError
from gmeta.io.prepare import prepare
from gmeta.io.sources import ML100K_GENRES, SourceError, read_movielens, read_recbole
from tests.support.movielens import ML_CONFIG, RATING_COUNTS, ROOT, make_data, write_ml1m, write_ml100k, write_recbole


def _ml_config(tmp_path: Path, raw: Path, *extra: str):
    return load_config(ML_CONFIG, [f"data.raw_dir={raw}", f"data.shards_dir={tmp_path / 'shards'}",
                                   "data.tasks_per_row_group=4", "data.tasks_per_shard=8", *extra])


def _tasks(shards: Path, split: str) -> dict:
    """task key -> (support timestamps, query timestamps, query labels) of a split."""
    out = {}
    for f in sorted((shards / split).glob("*.parquet")):
        t = pq.read_table(f).to_pydict()
        for key, s, q in zip(t["task_key"], t["support"], t["query"]):
            out[key] = (s["timestamp"], q["timestamp"], q["label"])
    return out


def test_ml100k_original_and_recbole_files_read_the_same(tmp_path):
    data = make_data()
    a = read_movielens(write_ml100k(tmp_path / "ml-100k", data))
    b = read_movielens(write_recbole(tmp_path / "recbole", data))
    assert a.num_rows == b.num_rows == len(data["ratings"])
    assert a.schema == b.schema
    assert a.to_pydict() == b.to_pydict()
    row = a.slice(0, 1).to_pylist()[0]
    u, i, r, t = data["ratings"][0]
    user = data["users"][u - 1]
    item = data["items"][i - 1]
    assert (row["user_id"], row["item_id"], row["rating"], row["timestamp"]) == (u, i, r, t)
    assert row["click"] == int(r >= 4)
    assert (row["age"], row["gender"], row["occupation"], row["zip3"]) == (str(user[1]), user[2], user[3], user[4][:3])
    assert row["genres"] == [g for g, f in zip(ML100K_GENRES, item[3]) if f]
    # the title's words, lowercased, without its "(year)" (u.item) or as RecBole's movie_title splits it
    assert row["title_words"] == ["film", str(i), *(["é"] if i % 10 == 0 else [])]
    assert row["age_norm"] == pytest.approx(user[1] / 100)
    # the movie without a release date: an "unknown" year token and the mean year as dense value
    no_year = a.filter(pa.compute.equal(a.column("item_id"), 7)).to_pylist()
    if no_year:
        assert no_year[0]["year"] == "unknown"


def test_ml1m_files(tmp_path):
    data = make_data()
    t = read_movielens(write_ml1m(tmp_path / "ml-1m", data), click_threshold=5.0)
    assert t.num_rows == len(data["ratings"])
    got = {(r["user_id"], r["item_id"]): r for r in t.to_pylist()}
    for u, i, r, ts in data["ratings"][:50]:
        row = got[(u, i)]
        assert row["rating"] == r and row["timestamp"] == ts and row["click"] == int(r >= 5)
        _, age, gender, _, zip_code = data["users"][u - 1]
        assert (row["age"], row["gender"], row["zip3"]) == (str(age), gender, zip_code[:3])
        year = data["items"][i - 1][2]
        assert row["year"] == (year or "unknown")  # from "Title: The Sequel (1995)", Latin-1 titles
        assert row["title_words"] == ["film", str(i), *(["é"] if i % 10 == 0 else []), *(["the", "sequel"] if year
                                                                                     else [])]
        if year:
            assert row["year_norm"] == pytest.approx((int(year) - 1900) / 100)


def test_movielens_cold_start_protocol(tmp_path):
    data = make_data()
    raw = write_ml100k(tmp_path / "ml-100k", data)
    cfg = _ml_config(tmp_path, raw)
    m = prepare(cfg, raw, tmp_path / "shards")
    assert m["dropped_tasks"]["too_few_rows"] == 2 and m["dropped_tasks"]["too_many_rows"] == 1
    assert m["input_tasks"] == len(RATING_COUNTS) and m["input_rows"] == len(data["ratings"])
    splits = {s: _tasks(tmp_path / "shards", s) for s in ("train", "val", "eval")}
    assert set(m["splits"]) == {"train", "val", "eval"}
    keys = [set(v) for v in splits.values()]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])  # user-cold
    assert set().union(*keys) == {u for u, n in enumerate(RATING_COUNTS, 1) if 13 <= n <= 100}
    by_user: dict[int, list] = {}
    for u, _, r, t in data["ratings"]:
        by_user.setdefault(u, []).append((t, r))
    for tasks in splits.values():
        for u, (s_ts, q_ts, q_lab) in tasks.items():
            assert len(q_ts) == 10 and len(s_ts) == len(by_user[u]) - 10  # fixed query size, the rest support
            assert max(s_ts) <= min(q_ts)  # the user's latest ratings are the query
            assert sorted(q_ts) == sorted(t for t, _ in by_user[u])[-10:]
            assert set(q_lab) <= {0.0, 1.0}


def test_movielens_rating_label_needs_regression(tmp_path):
    data = make_data()
    raw = write_recbole(tmp_path / "recbole", data)
    with pytest.raises(PrepareError, match=r"'rating'.*0 or 1.*model.objective"):
        prepare(_ml_config(tmp_path, raw, "features.label=rating"), raw, tmp_path / "shards")
    cfg = _ml_config(tmp_path, raw, "features.label=rating", "model.objective=regression")
    m = prepare(cfg, raw, tmp_path / "shards")
    labels = [lab for _, _, q in _tasks(tmp_path / "shards", "train").values() for lab in q]
    assert set(labels) <= {1.0, 2.0, 3.0, 4.0, 5.0} and len(set(labels)) > 2
    # the mean label of the training tasks (where a regression model's output starts)
    t = pq.read_table(tmp_path / "shards" / "train").to_pylist()
    every = [lab for task in t for side in ("support", "query") for lab in task[side]["label"]]
    assert m["splits"]["train"]["label_mean"] == pytest.approx(np.mean(every))


def test_movielens_missing_or_bad_files(tmp_path):
    with pytest.raises(SourceError, match="no MovieLens files found.*u.data.*ratings.dat.*inter"):
        read_movielens(tmp_path)
    data = make_data()
    raw = write_ml100k(tmp_path / "ml-100k", data)
    (raw / "u.item").unlink()
    with pytest.raises(SourceError, match=r"u\.item: not found"):
        read_movielens(raw)
    raw = write_ml1m(tmp_path / "ml-1m", data)
    with open(raw / "ratings.dat", "a") as fh:
        fh.write("7::x::4::880000000\n")
    with pytest.raises(SourceError, match=r"ratings\.dat: field item_id"):
        read_movielens(raw)
    # through prepare: a PrepareError naming the directory
    with pytest.raises(PrepareError, match="no MovieLens files"):
        prepare(_ml_config(tmp_path, tmp_path / "empty"), tmp_path, tmp_path / "shards")


def test_recbole_atomic_files_of_any_data_set(tmp_path):
    d = tmp_path / "ads"
    d.mkdir()
    (d / "ads.inter").write_text("uid:token\tad:token\tlabel:float\tts:float\tprice:float\n"
                                 "u1\ta1\t1\t10\t0.5\nu1\ta2\t0\t11\t1.5\nu2\ta1\t0\t12\t2.5\nu3\ta3\t1\t13\t0\n")
    (d / "ads.item").write_text("ad:token\ttags:token_seq\tbids:float_seq\n"
                                "a1\tsports news\t0.1 0.2\na2\t\t\n")
    t = read_recbole(d)
    assert t.column_names == ["uid", "ad", "label", "ts", "price", "tags", "bids"]
    assert t.column("tags").to_pylist() == [["sports", "news"], [], ["sports", "news"], None]  # a3: no item row
    assert t.column("bids").to_pylist()[0] == [0.1, 0.2]
    assert t.column("price").type == pa.float64()
    (d / "ads.user").write_text("uid\tage:token\n")
    with pytest.raises(SourceError, match=r"ads\.user: header field 1 'uid'"):
        read_recbole(d)
    (d / "ads.user").write_text("user:token\tage:token\nu1\t3\n")
    with pytest.raises(SourceError, match=r"ads\.user: its first column 'user'"):
        read_recbole(d)


def _criteo_like(path: Path, rows: int, seed: int = 0) -> list[list[str]]:
    """Criteo-style TSV without a header: label, 3 integer features, 3 categorical (hex),
    an advertiser column (the task key) and a multi-hot field; empty fields are missing."""
    rng = np.random.default_rng(seed)
    lines = []
    for n in range(rows):
        ints = [str(int(v)) if rng.random() > 0.2 else "" for v in rng.integers(-2, 5000, size=3)]
        ints[0] = str(n)  # increasing: shows the row order is the time order
        cats = [f"{int(v):08x}" if rng.random() > 0.2 else "" for v in rng.integers(0, 50, size=3)]
        tags = ",".join(f"t{int(v)}" for v in rng.integers(0, 9, size=int(rng.integers(0, 3))))
        lines.append([str(int(rng.random() < 0.3)), *ints, *cats, f"adv{n % 6}", tags])
    path.write_text("".join("\t".join(r) + "\n" for r in lines))
    return lines


_CRITEO = ["data.source.format=tsv", "data.source.header=false",
           "data.source.column_names=[label, i1, i2, i3, c1, c2, c3, advertiser, tags]",
           "data.source.multi_hot_separator=','", "features.task_key=advertiser", "features.timestamp=''",
           "features.label=label", "features.true_prob=''", "features.dense=[i1, i2, i3]",
           "features.dense_transform=log1p",
           "features.sparse=[{name: c1, num_embeddings: 64}, {name: c2, num_embeddings: 64}, "
           "{name: c3, num_embeddings: 64}, {name: tags, num_embeddings: 16, multi_hot: true}]",
           "data.split.rule=time", "data.split.support_ratio=0.5", "data.split.min_support=1",
           "data.split.min_query=1", "data.split.eval_fraction=0.0", "data.tasks_per_row_group=2"]


def test_ctr_log_tsv_without_header(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = _criteo_like(raw / "day_0.tsv", 120)
    cfg = load_config(None, _CRITEO)
    first_null = next(n for n, r in enumerate(lines) if r[2] == "") + 1  # no header: row n is line n + 1
    with pytest.raises(PrepareError, match=rf"day_0\.tsv: line {first_null}: column 'i2' has a null.*fill_missing"):
        prepare(cfg, raw, tmp_path / "shards")
    cfg = load_config(None, _CRITEO + ["data.source.fill_missing=true"])
    m = prepare(cfg, raw, tmp_path / "shards")
    assert m["input_rows"] == 120 and m["splits"]["train"]["tasks"] == 6
    assert m["input_columns"]["c1"] == "string" and m["input_columns"]["tags"] == "string"
    t = pq.read_table(tmp_path / "shards" / "train").to_pylist()
    for task in t:
        adv = int(task["task_key"][3:])
        s, q = task["support"], task["query"]
        # no timestamp column: the file's row order is the time order (i1 is the row number)
        rows_s = [round(np.expm1(d[0])) for d in s["dense"]]
        rows_q = [round(np.expm1(d[0])) for d in q["dense"]]
        assert rows_s + rows_q == list(range(adv, 120, 6))
        for d, n in zip(s["dense"] + q["dense"], rows_s + rows_q):
            raw_i2 = lines[n][2]
            want = np.sign(int(raw_i2)) * np.log1p(abs(int(raw_i2))) if raw_i2 else 0.0  # missing -> 0
            assert d[1] == pytest.approx(want, rel=1e-6)
        for ids, n in zip(s["tags"] + q["tags"], rows_s + rows_q):
            assert len(ids) == (len(lines[n][8].split(",")) if lines[n][8] else 0)
    # an empty categorical field is one more value: each raw value has one id in every row
    c1: dict[str, set] = {}
    for task in t:
        rows = [round(np.expm1(d[0])) for d in task["support"]["dense"] + task["query"]["dense"]]
        for n, i in zip(rows, task["support"]["c1"] + task["query"]["c1"]):
            c1.setdefault(lines[n][4], set()).add(i)
    assert "" in c1 and all(len(ids) == 1 for ids in c1.values())


def test_csv_ids_hash_alike_whatever_the_first_block_holds(tmp_path):
    """Multi-hot tokens hash token by token (a numeric token as its integer, in any company),
    ids guessed as floats are read as text (no precision lost), empty columns are no error."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.csv").write_text("k,ts,y,m,big,d\n1,1,0,1|2,18446744073709551615,\n1,2,1,3,18446744073709551614,\n")
    (raw / "b.csv").write_text("k,ts,y,m,big,d\n1,3,0,1|x,18446744073709551613,2.5\n1,4,1,2,18446744073709551615,1\n")
    cfg = load_config(None, ["features.task_key=k", "features.timestamp=ts", "features.label=y",
                             "features.true_prob=''",
                             "features.sparse=[{name: m, num_embeddings: 1000, multi_hot: true}, "
                             "{name: big, num_embeddings: 100000}]", "features.dense=[d]",
                             "data.source.fill_missing=true", "data.split.min_support=1", "data.split.min_query=1",
                             "data.split.eval_fraction=0.0"])
    m = prepare(cfg, raw, tmp_path / "shards")
    assert m["input_columns"]["big"] == "string" and m["input_columns"]["m"] == "string"
    assert m["cardinality"]["m"]["distinct_raw"] == 4 and m["cardinality"]["big"]["distinct_raw"] == 3
    task = pq.read_table(tmp_path / "shards" / "train").to_pylist()[0]
    m_ids = task["support"]["m"] + task["query"]["m"]
    assert m_ids[0][0] == m_ids[2][0] and m_ids[0][1] == m_ids[3][0]  # "1" and "2" alike in both files
    big = task["support"]["big"] + task["query"]["big"]
    assert big[0] == big[3] and len({big[0], big[1], big[2]}) == 3


def test_ctr_log_errors_name_file_and_key(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _criteo_like(raw / "day_0.tsv", 30)
    with pytest.raises(PrepareError, match=r"missing column\(s\) \['advertiser'\]"):
        prepare(load_config(None, _CRITEO + ["data.source.fill_missing=true",
                                             "data.source.column_names=[label, i1, i2, i3, c1, c2, c3, adv, tags]"]),
                raw, tmp_path / "shards")
    with open(raw / "day_0.tsv", "a") as fh:
        fh.write("1\t2\n")
    with pytest.raises(PrepareError, match=r"day_0\.tsv: line 31: cannot read"):
        prepare(load_config(None, _CRITEO + ["data.source.fill_missing=true"]), raw, tmp_path / "shards")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "_SUCCESS").write_text("")
    with pytest.raises(PrepareError, match=r"other: no files inside \(data.source.format: tsv\)"):
        prepare(load_config(None, _CRITEO), tmp_path / "other", tmp_path / "out")
    (tmp_path / "other" / "day_0.csv").write_text("1,2\n")  # any extension is read as the format says
    with pytest.raises(PrepareError, match=r"day_0\.csv: line 1 has 1 fields, data.source.column_names names 9"):
        prepare(load_config(None, _CRITEO), tmp_path / "other", tmp_path / "out")


def test_serving_reads_movielens_rows(tmp_path):
    """Raw MovieLens rows (string tokens, a list of genres) go through the serving path."""
    from gmeta.inference.serving import ROLE, assign_roles, rows_to_blocks, score_rows
    from gmeta.io.features import ID_HASH
    from gmeta.models.dlrm import build_model

    data = make_data()
    cfg = _ml_config(tmp_path, tmp_path)
    df = read_movielens(write_ml100k(tmp_path / "ml-100k", data)).to_pandas()
    df = assign_roles(df[df["user_id"].isin([3, 4])], cfg)
    assert (df[ROLE] == "query").sum() == 20
    torch.manual_seed(0)
    model = build_model(cfg)
    scores = score_rows(model, cfg, df, inner_steps=1, id_hash=ID_HASH)["score"]
    assert scores[df[ROLE] == "query"].between(0, 1).all() and scores[df[ROLE] != "query"].isna().all()
    # an integer id column that arrives as floats (as pandas makes it when a value is
    # missing) is read with its training type, so its ids hash to the same rows
    types = {"item_id": "int64", "user_id": "int64", "timestamp": "int64"}
    as_float = df.assign(item_id=df["item_id"].astype("float64"))
    again = score_rows(model, cfg, as_float, inner_steps=1, column_types=types, id_hash=ID_HASH)["score"]
    np.testing.assert_allclose(again.to_numpy(), scores.to_numpy(), rtol=1e-6)
    # read untyped, the float ids ("3.0") hash to other rows: checked on the hashed ids
    # themselves, since how much a fresh model's score moves with an item row is chance
    def item_ids(frame, types=None):
        blocks = rows_to_blocks(frame, cfg, 4, types, id_hash=ID_HASH)
        return np.concatenate([b.query.ids["item_id"] for b, _ in blocks])
    np.testing.assert_array_equal(item_ids(as_float, types), item_ids(df))
    assert (item_ids(as_float) != item_ids(df)).mean() > 0.9
    with pytest.raises(PrepareError, match=r"column 'gender' cannot be read as int64"):
        score_rows(model, cfg, df, inner_steps=1, column_types={"gender": "int64"}, id_hash=ID_HASH)


def test_avazu_config_reads_avazu_csv(tmp_path):
    """configs/avazu.yaml on a few rows in the layout of Avazu's train.csv."""
    header = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
              "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")
    rng = np.random.default_rng(1)
    lines = [header]
    for n in range(200):
        site = ["1fbe01fe", "85f751fd", "d6137915", "e151e245"][n % 4]
        lines.append(f"{10000949271186029916 - n},{int(rng.random() < 0.2)},{14102100 + n // 20},1005,0,{site},"
                     f"f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,{rng.integers(1 << 30):08x},"
                     f"{rng.integers(1 << 30):08x},1,0,15706,320,50,1722,0,35,{[-1, 100084][n % 2]},79")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.csv").write_text("\n".join(lines) + "\n")
    cfg = load_config(ROOT / "configs" / "avazu.yaml", ["data.split.min_support=2", "data.split.min_query=2",
                                                        "data.split.eval_fraction=0.0", "data.split.val_fraction=0.0"])
    m = prepare(cfg, raw, tmp_path / "shards")
    assert m["input_rows"] == 200 and m["splits"]["train"]["tasks"] == 4
    t = pq.read_table(tmp_path / "shards" / "train").to_pylist()
    for task in t:
        assert task["support"]["dense"][0] == pytest.approx([np.log1p(320), np.log1p(50)])
        assert max(task["support"]["timestamp"]) <= min(task["query"]["timestamp"])  # by hour
