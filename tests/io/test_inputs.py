"""Real logs in, nothing lost: every reader accounts for every input row (read = written +
dropped by reason), headers are never guessed silently, tied times can be support, libSVM /
libFM input, all-categorical data, other label encodings, loud hash collisions, empty splits,
and task splits by hash within binomial noise of the configured fractions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gmeta.config import load_config
from gmeta.inference.serving import assign_roles
from gmeta.io.errors import PrepareError
from gmeta.io.features import ID_HASH, Cardinality, hash_ids, salted_hash, task_uniform
from gmeta.io.manifest import load_manifest
from gmeta.io.prepare import prepare
from gmeta.io.reader import TaskReader
from tests.support.cli import run_gmeta

COLUMNS = ["k", "ts", "y", "a", "b", "d"]
BASE = ["features.task_key=k", "features.timestamp=ts", "features.label=y", "features.true_prob=''",
        "features.sparse=[{name: a, num_embeddings: 100000}, {name: b, num_embeddings: 100000}]",
        "features.dense=[d]", "data.split.min_support=2", "data.split.min_query=2", "data.split.max_support=6",
        "data.split.max_query=5", "data.split.eval_fraction=0.2", "data.split.val_fraction=0.1",
        "data.tasks_per_row_group=4"]


def _rows(n_tasks: int = 30, seed: int = 0) -> list[list]:
    """Rows of tasks of 1 to 20 rows (some dropped as too small, some cut at max_support /
    max_query), with a few tied times."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_tasks):
        n = int(rng.integers(1, 21))
        ts = np.sort(rng.integers(0, 12, size=n))
        for t in ts:
            rows.append([k, int(t), int(rng.random() < 0.4), int(rng.integers(0, 50)), f"b{int(rng.integers(0, 9))}",
                         round(float(rng.normal()), 4)])
    return rows


def _write_csv(path: Path, rows: list[list], header: bool, sep: str = ",") -> None:
    text = (sep.join(COLUMNS) + "\n" if header else "") + "".join(sep.join(map(str, r)) + "\n" for r in rows)
    path.write_text(text)


def _balance(m: dict, expected_rows: int) -> None:
    """Rows read equal the input's, and every one is written once or dropped for a reason."""
    r = m["rows"]
    assert r["read"] == m["input_rows"] == expected_rows
    assert sum(r["written"].values()) + sum(r["dropped"].values()) == expected_rows
    for split, s in m["splits"].items():
        assert r["written"][split] == s["support_rows"] + s["query_rows"]
    assert sum(s["tasks"] for s in m["splits"].values()) + sum(m["dropped_tasks"].values()) == m["input_tasks"]


def _shard_rows(shards: Path) -> int:
    """Rows of every split as the reader yields them (support + query)."""
    m = load_manifest(shards)
    total = 0
    for split, s in m["splits"].items():
        if not s["tasks"]:
            continue
        for b in TaskReader(shards, split, 4, shuffle=False, drop_last=False, num_workers=0):
            total += len(b.labels)
    return total


# --------------------------------------------------------------------------------------
# headers and row balance of every format
# --------------------------------------------------------------------------------------


def test_headerless_csv_with_column_names_keeps_the_first_row(tmp_path):
    rows = _rows()
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_csv(raw / "part-0.csv", rows[:200], header=False)
    _write_csv(raw / "part-1.csv", rows[200:], header=False)
    names = "data.source.column_names=[" + ", ".join(COLUMNS) + "]"
    m = prepare(load_config(None, BASE + [names]), raw, tmp_path / "s")  # header left at its default
    _balance(m, len(rows))
    assert _shard_rows(tmp_path / "s") == sum(m["rows"]["written"].values())
    # the same files with a header: the header is recognised as the names and skipped
    raw2 = tmp_path / "raw2"
    raw2.mkdir()
    _write_csv(raw2 / "part-0.csv", rows, header=True)
    _balance(prepare(load_config(None, BASE + [names]), raw2, tmp_path / "s2"), len(rows))
    _balance(prepare(load_config(None, BASE), raw2, tmp_path / "s3"), len(rows))


def test_header_that_looks_like_data_and_data_that_looks_like_a_header(tmp_path):
    rows = _rows()
    headerless, with_header = tmp_path / "a.csv", tmp_path / "b.csv"
    _write_csv(headerless, rows, header=False)
    _write_csv(with_header, rows, header=True)
    names = "data.source.column_names=[" + ", ".join(COLUMNS) + "]"
    with pytest.raises(PrepareError, match=r"a\.csv: the first line looks like data, not a header \('0', .*"
                                           r"seems to have no header.*data\.source\.column_names"):
        prepare(load_config(None, BASE), headerless, tmp_path / "o")
    with pytest.raises(PrepareError, match=r"a\.csv: data\.source\.header is true but the first line looks like data"):
        prepare(load_config(None, BASE + [names, "data.source.header=true"]), headerless, tmp_path / "o")
    with pytest.raises(PrepareError, match=r"b\.csv: data\.source\.header is false but the first line looks like a "
                                           r"header \('k', 'ts'"):
        prepare(load_config(None, BASE + [names, "data.source.header=false"]), with_header, tmp_path / "o")
    # a header other than column_names is not read as a row
    other = "data.source.column_names=[k, ts, y, a, b, dd]"
    with pytest.raises(PrepareError, match=r"b\.csv: the first line looks like a header .* is not "
                                           r"data\.source\.column_names"):
        prepare(load_config(None, BASE + [other]), with_header, tmp_path / "o")
    # header: true replaces a header by column_names
    m = prepare(load_config(None, BASE + [other, "data.source.header=true", "features.dense=[dd]"]), with_header,
                tmp_path / "o")
    _balance(m, len(rows))
    assert not (tmp_path / "o" / ".prepare-").exists()


def test_every_format_balances(tmp_path):
    """Parquet, TSV, MovieLens (ML-100K), RecBole, WebDataset round trip: rows read are the
    input's rows, and written + dropped equal them."""
    from tests.support.movielens import ML_CONFIG, make_data, write_ml100k, write_recbole

    rows = _rows()
    table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)})
    (tmp_path / "pq").mkdir()
    pq.write_table(table.slice(0, 100), tmp_path / "pq" / "a.parquet")
    pq.write_table(table.slice(100), tmp_path / "pq" / "b.parquet")
    _balance(prepare(load_config(None, BASE), tmp_path / "pq", tmp_path / "s_pq"), len(rows))
    _write_csv(tmp_path / "x.tsv", rows, header=True, sep="\t")
    _balance(prepare(load_config(None, BASE), tmp_path / "x.tsv", tmp_path / "s_tsv"), len(rows))
    m = prepare(load_config(None, BASE + ["data.format=webdataset"]), tmp_path / "pq", tmp_path / "s_wds")
    _balance(m, len(rows))
    assert _shard_rows(tmp_path / "s_wds") == sum(m["rows"]["written"].values())
    data = make_data()
    ml = write_ml100k(tmp_path / "ml", data)
    n_lines = len((ml / "u.data").read_text().splitlines())
    m = prepare(load_config(ML_CONFIG), ml, tmp_path / "s_ml")
    _balance(m, n_lines)
    assert m["rows"]["dropped"]["too_few_rows"] == 10 and m["rows"]["dropped"]["too_many_rows"] == 120
    rb = write_recbole(tmp_path / "rb", data)
    n_lines = len((rb / "ml-tiny.inter").read_text().splitlines()) - 1  # the typed header
    _balance(prepare(load_config(ML_CONFIG), rb, tmp_path / "s_rb"), n_lines)


def test_a_named_format_reads_any_extension(tmp_path):
    rows = _rows()
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_csv(raw / "day_0.txt", rows, header=True)
    (raw / "_SUCCESS").write_text("")
    with pytest.raises(PrepareError, match=r"no \.csv or \.parquet or \.tsv files inside"):
        prepare(load_config(None, BASE), raw, tmp_path / "s")
    _balance(prepare(load_config(None, BASE + ["data.source.format=csv"]), raw, tmp_path / "s"), len(rows))


# --------------------------------------------------------------------------------------
# tied times, empty splits
# --------------------------------------------------------------------------------------


def _avazu_like(path: Path, sites: int = 12, hours: int = 1) -> dict[str, int]:
    """Avazu's layout: `hour` (YYMMDDHH) is the same for every row of an hour (the first
    rows of Avazu's train.csv, as in public samples of it, are all of one hour)."""
    rng = np.random.default_rng(1)
    lines = ["id,click,hour,C1,banner_pos,site_id,site_domain,C15,C16"]
    sizes = {}
    n = 0
    for h in range(hours):
        for s in range(sites):
            for _ in range(int(rng.integers(3, 17)) if s % 4 else 2):
                lines.append(f"{n},{int(rng.random() < 0.2)},{14102100 + h},1005,{int(rng.integers(0, 7))},site{s},"
                             f"dom{s % 3},320,50")
                sizes[f"site{s}"] = sizes.get(f"site{s}", 0) + 1
                n += 1
    path.write_text("\n".join(lines) + "\n")
    return sizes


AVAZU = ["features.task_key=site_id", "features.timestamp=hour", "features.label=click", "features.true_prob=''",
         "features.sparse=[{name: C1, num_embeddings: 64}, {name: banner_pos, num_embeddings: 64}, "
         "{name: site_domain, num_embeddings: 1000}]", "features.dense=[C15, C16]",
         "data.split.min_support=4", "data.split.min_query=4", "data.split.eval_fraction=0.0"]


def test_tied_times_can_be_support(tmp_path):
    sizes = _avazu_like(tmp_path / "train.csv")
    # the old rule (tied rows all to the query) keeps no site: an error at prepare time,
    # naming the split, the rule and the counts, and the shards of the last run stay
    good = prepare(load_config(None, AVAZU), tmp_path / "train.csv", tmp_path / "s")
    before = json.loads((tmp_path / "s" / "manifest.json").read_text())
    files = sorted(p.name for p in (tmp_path / "s" / "train").iterdir())
    with pytest.raises(PrepareError, match=r"split 'train' has 0 tasks: of 12 task\(s\) \(site_id\), dropped "
                                           r"support_too_small 12.*tie_break strict.*Nothing was written"):
        prepare(load_config(None, AVAZU + ["data.split.tie_break=strict"]), tmp_path / "train.csv", tmp_path / "s")
    assert json.loads((tmp_path / "s" / "manifest.json").read_text()) == before
    assert sorted(p.name for p in (tmp_path / "s" / "train").iterdir()) == files
    # input order (the default) keeps every site with 8 rows or more (min support + min query)
    assert good["splits"]["train"]["tasks"] == sum(1 for n in sizes.values() if n >= 8) > 0
    _balance(good, sum(sizes.values()))
    t = pq.read_table(tmp_path / "s" / "train").to_pylist()
    for task in t:
        ts = task["support"]["timestamp"] + task["query"]["timestamp"]
        assert ts == sorted(ts) and max(task["support"]["timestamp"]) == min(task["query"]["timestamp"])
    # shuffle: a seeded order within tied rows, the same again, and another than the input's
    sh = ["data.split.tie_break=shuffle"]
    prepare(load_config(None, AVAZU + sh), tmp_path / "train.csv", tmp_path / "sh1")
    prepare(load_config(None, AVAZU + sh), tmp_path / "train.csv", tmp_path / "sh2")
    a, b = (pq.read_table(tmp_path / d / "train").to_pylist() for d in ("sh1", "sh2"))
    assert a == b
    rows_of = lambda x: x["support"]["banner_pos"] + x["query"]["banner_pos"]  # noqa: E731
    assert [sorted(rows_of(x)) for x in a] == [sorted(rows_of(x)) for x in t]  # the same rows
    assert [rows_of(x) for x in a] != [rows_of(x) for x in t]  # in another order


def test_avazu_config_on_a_sample_of_one_hour(tmp_path):
    """configs/avazu.yaml on rows of one hour, as the first rows of Avazu's train.csv (and
    public samples of it) are: every site with enough rows is kept (none was before)."""
    header = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
              "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")
    rng = np.random.default_rng(2)
    sites = [f"{int(v):08x}" for v in rng.integers(1 << 30, size=10)]
    sizes = dict(zip(sites, [40, 30, 20, 16, 15, 10, 5, 3, 2, 1]))
    lines = [header]
    for site, n in sizes.items():
        for _ in range(n):
            lines.append(f"{int(rng.integers(1 << 62))},{int(rng.random() < 0.2)},14102100,1005,0,{site},f3845767,"
                         f"28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,{int(rng.integers(1 << 30)):08x},"
                         f"{int(rng.integers(1 << 30)):08x},1,0,15706,320,50,1722,0,35,-1,79")
    order = rng.permutation(len(lines) - 1) + 1
    (tmp_path / "train.csv").write_text("\n".join([header] + [lines[i] for i in order]) + "\n")
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "avazu.yaml",
                      ["data.split.eval_fraction=0.0", "data.split.val_fraction=0.0"])
    m = prepare(cfg, tmp_path / "train.csv", tmp_path / "s")
    _balance(m, sum(sizes.values()))
    kept = {t["task_key"] for t in pq.read_table(tmp_path / "s" / "train").to_pylist()}
    assert kept == {s for s, n in sizes.items() if n >= 16}  # min_support 8 + min_query 8


def test_shuffled_ties_agree_with_serving(tmp_path):
    """Serving assigns support/query roles with the same tie rule as prepare."""
    import pandas as pd

    _avazu_like(tmp_path / "train.csv")
    cfg = load_config(None, AVAZU + ["data.split.tie_break=shuffle"])
    prepare(cfg, tmp_path / "train.csv", tmp_path / "s")
    df = pd.read_csv(tmp_path / "train.csv")
    roles = assign_roles(df, cfg)
    for task in pq.read_table(tmp_path / "s" / "train").to_pylist():
        rows = roles[roles.site_id == task["task_key"]]
        for side in ("support", "query"):
            got = hash_ids(rows[rows.role == side].banner_pos.to_numpy(), "banner_pos", 64, ID_HASH).tolist()
            assert sorted(got) == sorted(task[side]["banner_pos"])


def test_empty_heldout_split_is_a_warning(tmp_path, caplog):
    _avazu_like(tmp_path / "train.csv", sites=4)
    with caplog.at_level(logging.WARNING, logger="gmeta"):
        prepare(load_config(None, AVAZU + ["data.split.eval_fraction=0.01"]), tmp_path / "train.csv", tmp_path / "s")
    assert any("split 'eval' has 0 tasks (data.split.eval_fraction 0.01" in r.message for r in caplog.records)


# --------------------------------------------------------------------------------------
# libSVM / libFM
# --------------------------------------------------------------------------------------

LIBSVM = ["data.source.format=libsvm", "features.task_key=qid", "features.timestamp=''", "features.label=y",
          "features.true_prob=''", "features.positive_labels=[1]", "features.negative_labels=[-1]",
          "features.sparse=[{name: item, num_embeddings: 10000}, {name: tags, num_embeddings: 1000, multi_hot: true}]",
          "features.dense=[price]",
          "data.source.fields=[{name: item, first: 0, last: 999}, {name: tags, first: 1000, last: 1099}, "
          "{name: price, first: 2000, last: 2000, kind: dense}]",
          "data.split.min_support=1", "data.split.min_query=1", "data.split.eval_fraction=0.0"]


def _libsvm_lines(n: int = 60, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tags = sorted(rng.choice(100, size=int(rng.integers(0, 3)), replace=False).tolist())
        price = round(float(rng.random()) * 10, 3) if rng.random() < 0.7 else None  # absent: 0
        out.append((1 if rng.random() < 0.3 else -1, i % 5, int(rng.integers(0, 1000)), tags, price))
    return out


def _libsvm_text(lines: list[tuple]) -> str:
    text = []
    for y, q, item, tags, price in lines:
        toks = [f"{y:+d}", f"qid:{q}", f"{item}:1"] + [f"{1000 + t}:1" for t in tags]
        toks += [f"2000:{price}"] if price is not None else []
        text.append(" ".join(toks))
    return "\n".join(text[:10]) + "\n\n" + "\n".join(text[10:]) + "\n"  # a blank line: no row


def test_libsvm_reads_every_line_into_its_fields(tmp_path):
    lines = _libsvm_lines()
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.libsvm.txt").write_text(_libsvm_text(lines))
    m = prepare(load_config(None, LIBSVM), raw, tmp_path / "s")
    _balance(m, len(lines))
    got = {}
    for task in pq.read_table(tmp_path / "s" / "train").to_pylist():
        side = [task["support"], task["query"]]
        got[task["task_key"]] = [(y, it, tg, d[0]) for s in side
                                 for y, it, tg, d in zip(s["label"], s["item"], s["tags"], s["dense"])]
    for q in range(5):  # no time column: the line order is the time order
        want = [(1.0 if y > 0 else 0.0, int(hash_ids(np.array([it]), "item", 10000, ID_HASH)[0]),
                 hash_ids(np.array([1000 + t for t in tg], dtype=np.int64), "tags", 1000, ID_HASH).tolist(),
                 pytest.approx(p or 0.0, abs=1e-6))
                for y, qq, it, tg, p in lines if qq == q]
        assert got[q] == want
    # libfm is the same format
    _balance(prepare(load_config(None, LIBSVM + ["data.source.format=libfm"]), raw, tmp_path / "s2"), len(lines))


def test_libsvm_errors_name_file_and_line(tmp_path):
    lines = _libsvm_lines(20)
    p = tmp_path / "a.libfm"
    text = _libsvm_text(lines).splitlines()
    bad = {"index": "+1 qid:1 5000:1", "token": "+1 qid:1 7", "label": "yes qid:1 5:1",
           "double": "+1 qid:1 5:1 6:1", "value": "+1 qid:1 5:x"}
    want = {"index": "index 5000 is in no data.source.fields range", "token": "token '7' is not index:value",
            "label": "label 'yes' is not a number", "double": "2 indices in 0..999",
            "value": "token '5:x' is not index:value"}
    for kind, line in bad.items():
        p.write_text("\n".join(text[:5] + [line] + text[5:]) + "\n")
        # line 6 of the file (the blank line comes later)
        with pytest.raises(PrepareError, match=rf"a\.libfm: line 6: {want[kind]}"):
            prepare(load_config(None, LIBSVM), p, tmp_path / "s")
    # labels: -1 without a mapping names the line and says how to map it
    p.write_text(_libsvm_text(lines))
    first_neg = next(i for i, x in enumerate(lines) if x[0] < 0) + 1
    no_map = [o for o in LIBSVM if "_labels=" not in o]
    with pytest.raises(PrepareError, match=rf"a\.libfm: line {first_neg}: column 'y' .* must be 0 or 1 .*got -1 "
                                           r"\(for -1/\+1 labels set features\.positive_labels"):
        prepare(load_config(None, no_map), p, tmp_path / "s")


# --------------------------------------------------------------------------------------
# label encodings, all-categorical data
# --------------------------------------------------------------------------------------


def test_label_encodings(tmp_path):
    rows = _rows()
    base = [o for o in BASE if not o.startswith("features.label")]
    text = pa.table({c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)})
    y = text.column("y").to_pylist()
    t_text = text.set_column(2, "y", pa.array(["click" if v else "none" for v in y]))
    t_bool = text.set_column(2, "y", pa.array([bool(v) for v in y]))
    for name, t, extra in (("bool", t_bool, []),
                           ("text", t_text, ["features.positive_labels=[click]", "features.negative_labels=[none]"]),
                           ("bool_mapped", t_bool, ["features.positive_labels=[true]",
                                                    "features.negative_labels=[false]"])):
        pq.write_table(t, tmp_path / f"{name}.parquet")
        prepare(load_config(None, base + ["features.label=y"] + extra), tmp_path / f"{name}.parquet",
                tmp_path / name)
        labels = [v for task in pq.read_table(tmp_path / name / "train").to_pylist()
                  for v in task["support"]["label"] + task["query"]["label"]]
        ref = [v for task in pq.read_table(tmp_path / "bool" / "train").to_pylist()
               for v in task["support"]["label"] + task["query"]["label"]] if name != "bool" else labels
        assert labels == ref and set(labels) == {0.0, 1.0}
    with pytest.raises(PrepareError, match=r"text\.parquet: row 0: column 'y' .* holds string values such as "
                                           r"'none'.*features\.positive_labels"):
        prepare(load_config(None, base + ["features.label=y"]), tmp_path / "text.parquet", tmp_path / "x")
    t_odd = t_text.set_column(2, "y", pa.array(["click" if v else "none" for v in y[:-1]] + ["maybe"]))
    pq.write_table(t_odd, tmp_path / "odd.parquet")
    with pytest.raises(PrepareError, match=rf"odd\.parquet: row {len(y) - 1}: label 'maybe' \(column 'y'\) is in "
                                           r"neither features\.positive_labels \['click'\]"):
        prepare(load_config(None, base + ["features.label=y", "features.positive_labels=[click]",
                                          "features.negative_labels=[none]"]), tmp_path / "odd.parquet", tmp_path / "x")


def test_all_categorical_data_trains(tmp_path):
    """No dense feature: prepare, both shard formats, and a short training run."""
    rows = _rows(60)
    raw = tmp_path / "raw.csv"
    _write_csv(raw, rows, header=True)
    opts = BASE + ["features.dense=[]"]
    m = prepare(load_config(None, opts), raw, tmp_path / "s")
    _balance(m, len(rows))
    prepare(load_config(None, opts + ["data.format=webdataset"]), raw, tmp_path / "w")
    a = [b.dense.shape for b in TaskReader(tmp_path / "s", "train", 4, shuffle=False, num_workers=0)]
    b = [b.dense.shape for b in TaskReader(tmp_path / "w", "train", 4, shuffle=False, num_workers=0)]
    assert a == b and all(s[1] == 0 for s in a)
    from gmeta.config import dump_yaml

    (tmp_path / "c.yaml").write_text(dump_yaml(load_config(None, opts)))
    proc = run_gmeta(["train", "--nproc-per-node", "1", "--config", tmp_path / "c.yaml",
                      f"data.shards_dir={tmp_path / 's'}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4",
                      "meta.tasks_per_batch=4", "train.eval_at_end=false", "tracking.enabled=false",
                      "train.log_every=1", "data.num_workers=0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint").exists()
    # the checkpoint (with its dense layer of no inputs) loads and scores held-out tasks
    from gmeta.cli import main

    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoint"), "--no-tracking",
                 "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["tasks"] == m["splits"]["eval"]["tasks"] > 0


# --------------------------------------------------------------------------------------
# hash collisions
# --------------------------------------------------------------------------------------


def test_collisions_are_counted_exactly_and_warned(tmp_path, caplog):
    rng = np.random.default_rng(0)
    rows = _rows(40)
    for r in rows:
        r[3] = int(rng.integers(0, 40))  # 40 distinct ids of `a` in a table of 16 rows
    table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)})
    pq.write_table(table, tmp_path / "x.parquet")
    opts = [o if "features.sparse" not in o else
            "features.sparse=[{name: a, num_embeddings: 16}, {name: b, num_embeddings: 100000}]" for o in BASE]
    with caplog.at_level(logging.WARNING, logger="gmeta"):
        m = prepare(load_config(None, opts), tmp_path / "x.parquet", tmp_path / "s")
    raw = np.array([r[3] for r in rows])
    slot = hash_ids(raw, "a", 16, ID_HASH)
    owners = {}
    for v, s in zip(raw, slot):
        owners.setdefault(int(s), set()).add(int(v))
    want = float(np.mean([len(owners[int(s)]) > 1 for s in slot]))
    c = m["cardinality"]["a"]
    assert c["colliding_share_exact"] and c["colliding_share"] == pytest.approx(want, abs=1e-6) and want > 0.5
    assert c["distinct_raw"] == len(set(raw.tolist())) and c["distinct_hashed"] == len(owners)
    assert m["cardinality"]["b"]["colliding_share"] == 0.0
    msgs = [r.message for r in caplog.records if "share their table row" in r.message]
    assert len(msgs) == 1 and "features.sparse[0].num_embeddings" in msgs[0] and "data.collision_warn_share" in msgs[0]


def test_collision_tracking_beyond_its_memory_is_an_expected_share():
    cfg = load_config(None, ["features.sparse=[{name: a, num_embeddings: 100000000}]", "data.prepare_memory_mb=64"])
    card = Cardinality(cfg)
    raw = np.arange(5000)
    card.add("a", raw, hash_ids(raw, "a", 100_000_000, ID_HASH))
    c = card.summary()["a"]
    assert not c["colliding_share_exact"] and c["colliding_share"] == pytest.approx(5e-5, rel=0.05)


# --------------------------------------------------------------------------------------
# task splits by hash
# --------------------------------------------------------------------------------------


def test_task_split_fractions_within_binomial_noise():
    """Many key sets (MovieLens-like user ids, offsets, strides, random 64-bit, strings) and
    seeds: the share of keys below each cut is within 4 sd of the cut, and the z-scores have
    mean ~0 and sd ~1, as for a uniform hash."""
    rng = np.random.default_rng(0)
    zs = []
    for n in (943, 1610, 6040, 20000):
        for keys in (np.arange(1, n + 1), np.arange(0, 7 * n, 7), 1_000_000 + np.arange(n),
                     rng.integers(0, 2**62, n), np.array([f"u{i}" for i in range(n)], dtype=object)):
            for seed in range(4):
                u = task_uniform(keys, seed)
                for lo, hi in ((0.0, 0.2), (0.2, 0.3), (0.3, 1.0)):
                    p = hi - lo
                    z = (((u >= lo) & (u < hi)).sum() - n * p) / np.sqrt(n * p * (1 - p))
                    assert abs(z) < 4, (n, seed, lo, z)
                    zs.append(z)
    zs = np.array(zs)
    assert abs(zs.mean()) < 0.25 and 0.75 < zs.std() < 1.25


def test_task_split_is_a_pure_function_of_key_and_seed():
    keys = np.arange(1, 2001)
    u = task_uniform(keys, 0)
    assert np.array_equal(task_uniform(keys[::-1], 0), u[::-1])  # whatever else is hashed with it
    assert not np.array_equal(task_uniform(keys, 1) < 0.2, u < 0.2)  # the seed changes integer keys' split
    assert not np.array_equal(salted_hash(keys, "a"), salted_hash(keys, "b"))
