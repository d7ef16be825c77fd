"""Several labels per row (features.labels): read from their columns, checked, written into
the shards of both formats, read back as ``[R, L]``; the manifest names them, and shards of
other labels than the config's are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gmeta.config import ConfigError, load_config
from gmeta.io.errors import PrepareError
from gmeta.io.features import shard_schema
from gmeta.io.manifest import check_manifest_matches, content_hash, load_manifest
from gmeta.io.prepare import prepare
from gmeta.io.reader import ShardError, TaskReader
from tests.conftest import DEBUG_CONFIG, TWO_LABELS


def _batches(shards: Path, split: str = "train") -> list:
    return list(TaskReader(shards, split, 8, shuffle=False, drop_last=False, num_workers=0))


def test_two_labels_round_trip_through_prepare_and_the_reader(two_label_data, debug_data):
    m = load_manifest(two_label_data["shards"])
    assert m["schema"]["labels"] == ["label", "conversion"]
    one, two = _batches(debug_data["shards"]), _batches(two_label_data["shards"])
    assert len(one) == len(two) > 5
    conversions = 0
    for a, b in zip(one, two):
        assert a.labels.shape == (a.num_rows,) and a.num_labels == 1
        assert b.labels.shape == (b.num_rows, 2) and b.num_labels == 2 and b.num_rows == a.num_rows
        assert torch.equal(a.task_ids, b.task_ids) and torch.equal(a.dense, b.dense)
        # the first label is the one-label shards' label, the second the conversion of its row
        assert torch.equal(b.labels[:, 0], a.labels)
        assert torch.equal(b.labels[:, 1], ((a.labels == 1) & (a.dense[:, 0] > 0.5)).float())
        conversions += int(b.labels[:, 1].sum())
    assert conversions > 0
    mean = m["splits"]["train"]["label_mean"]
    labels = torch.cat([b.labels for b in _batches(two_label_data["shards"])])
    assert isinstance(mean, list) and mean == pytest.approx(labels.double().mean(0).tolist())
    assert mean[0] == pytest.approx(load_manifest(debug_data["shards"])["splits"]["train"]["label_mean"])


def test_two_labels_webdataset_shards_give_the_parquet_batches(two_label_data, tmp_path):
    out = tmp_path / "wds"
    prepare(load_config(DEBUG_CONFIG, [*TWO_LABELS, "data.format=webdataset"]), two_label_data["raw"], out)
    pq_batches, wds_batches = _batches(two_label_data["shards"], "eval"), _batches(out, "eval")
    assert len(pq_batches) == len(wds_batches) > 1
    for a, b in zip(pq_batches, wds_batches):
        assert b.labels.shape == (b.num_rows, 2)
        for name in ("labels", "dense", "task_ids", "support_offsets", "query_offsets"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_one_label_keeps_its_schema_and_manifest(debug_data, tmp_path):
    """features.labels of one column is features.label: the shards' manifest is the same."""
    assert "labels" not in shard_schema(load_config(DEBUG_CONFIG), True)
    out = tmp_path / "one"
    m = prepare(load_config(DEBUG_CONFIG, ["features.labels=[label]"]), debug_data["raw"], out)
    assert content_hash(m) == content_hash(load_manifest(debug_data["shards"]))
    assert isinstance(m["splits"]["train"]["label_mean"], float)


def test_shards_of_other_labels_than_the_config_are_refused(two_label_data, debug_data):
    one_cfg, two_cfg = load_config(DEBUG_CONFIG), load_config(DEBUG_CONFIG, TWO_LABELS)
    with pytest.raises(PrepareError, match=r"features.labels: \["):
        check_manifest_matches(load_manifest(two_label_data["shards"]), one_cfg, "two/manifest.json")
    with pytest.raises(PrepareError, match=r"features.labels: \"\(one label\)\""):
        check_manifest_matches(load_manifest(debug_data["shards"]), two_cfg, "one/manifest.json")
    swapped = load_config(DEBUG_CONFIG, ["features.labels=[conversion, label]"])
    with pytest.raises(PrepareError, match="features.labels"):
        check_manifest_matches(load_manifest(two_label_data["shards"]), swapped, "two/manifest.json")
    check_manifest_matches(load_manifest(two_label_data["shards"]), two_cfg, "two/manifest.json")


def test_reader_refuses_label_arrays_of_another_width_than_the_schema(two_label_data, tmp_path):
    import json
    import shutil

    out = tmp_path / "s"
    shutil.copytree(two_label_data["shards"], out)
    m = json.loads((out / "manifest.json").read_text())
    m["schema"]["labels"] = ["label", "conversion", "other"]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="label holds .*3 labels"):
        _batches(out)


def _raw(tmp_path: Path, conversion) -> Path:
    """A small CSV with two label columns y and c (``conversion``: the c of each row)."""
    rng = np.random.default_rng(0)
    lines = ["k,ts,y,c,a,d"]
    for i in range(120):
        y = int(rng.random() < 0.5)
        lines.append(f"{i // 12},{i},{y},{conversion(i, y)},{int(rng.integers(0, 9))},{rng.normal():.3f}")
    raw = tmp_path / "raw"
    raw.mkdir(parents=True)
    (raw / "part-0.csv").write_text("\n".join(lines) + "\n")
    return raw


OPTS = ["features.task_key=k", "features.timestamp=ts", "features.labels=[y, c]", "features.true_prob=''",
        "features.sparse=[{name: a, num_embeddings: 100}]", "features.dense=[d]", "data.split.min_support=2",
        "data.split.min_query=2", "data.split.eval_fraction=0.2"]


def test_label_values_of_each_column_are_checked(tmp_path):
    raw = _raw(tmp_path / "ok", lambda i, y: y * (i % 2))
    m = prepare(load_config(None, OPTS), raw, tmp_path / "ok" / "s")
    assert m["schema"]["labels"] == ["y", "c"]
    with pytest.raises(PrepareError, match=r"part-0.csv: line 9: column 'c' \(features.labels\) must be 0 or 1"):
        prepare(load_config(None, OPTS), _raw(tmp_path / "two", lambda i, y: 2 if i == 7 else 0), tmp_path / "s2")
    with pytest.raises(PrepareError, match=r"column 'c' has a null value"):
        prepare(load_config(None, OPTS), _raw(tmp_path / "null", lambda i, y: "" if i == 30 else y),
                tmp_path / "s3")
    with pytest.raises(PrepareError, match=r"missing column\(s\) \['z'\]"):
        prepare(load_config(None, [*OPTS, "features.labels=[y, z]"]), raw, tmp_path / "s4")
    # encoded labels: the mapping applies to every label column
    enc = _raw(tmp_path / "enc", lambda i, y: "yes" if y and i % 2 else "no")
    (enc / "part-0.csv").write_text((enc / "part-0.csv").read_text().replace(",1,yes,", ",yes,yes,")
                                    .replace(",1,no,", ",yes,no,").replace(",0,no,", ",no,no,"))
    m = prepare(load_config(None, [*OPTS, "features.positive_labels=[yes]", "features.negative_labels=[no]"]),
                enc, tmp_path / "enc" / "s")
    labels = torch.cat([b.labels for b in _batches(tmp_path / "enc" / "s")])
    assert labels.shape[1] == 2 and bool((labels[:, 1] <= labels[:, 0]).all()) and labels[:, 1].sum() > 0
    with pytest.raises(PrepareError, match=r"label 'maybe' \(column 'c'\) is in neither"):
        (enc / "part-0.csv").write_text((enc / "part-0.csv").read_text().replace(",yes,no,", ",yes,maybe,", 1))
        prepare(load_config(None, [*OPTS, "features.positive_labels=[yes]", "features.negative_labels=[no]"]),
                enc, tmp_path / "enc" / "s5")


def test_labels_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="features.labels: names repeat"):
        load_config(DEBUG_CONFIG, ["features.labels=[label, label]"])
    with pytest.raises(ConfigError, match=r"features.label_weights: 1 weight\(s\) for 2 label"):
        load_config(DEBUG_CONFIG, [*TWO_LABELS, "features.label_weights=[1]"])
    with pytest.raises(ConfigError, match=r"features.label_weights\[1\]: must be finite and >= 0"):
        load_config(DEBUG_CONFIG, [*TWO_LABELS, "features.label_weights=[1, -1]"])
    with pytest.raises(ConfigError, match="features.label: is 'click'"):
        load_config(DEBUG_CONFIG, [*TWO_LABELS, "features.label=click"])
    with pytest.raises(ConfigError, match="features.labels: data.source.format libsvm has one label per line"):
        load_config(DEBUG_CONFIG, [*TWO_LABELS, "data.source.format=libsvm",
                                   "data.source.fields=[{name: a, first: 0, last: 9}]"])
    with pytest.raises(ConfigError, match=r"features: feature names \['bid_price'\] clash"):
        load_config(DEBUG_CONFIG, ["features.labels=[label, bid_price]"])
    cfg = load_config(DEBUG_CONFIG, [*TWO_LABELS, "features.label_weights=[1, 0.25]"])
    assert cfg.features.label_names() == ["label", "conversion"] and cfg.features.loss_weights() == [1.0, 0.25]
