"""A CSV/TSV that cannot be parsed is an error naming the file and the line."""

from __future__ import annotations

import gzip

import pytest

from gmeta.config import load_config
from gmeta.io.errors import PrepareError
from gmeta.io.prepare import prepare
from tests.io.test_inputs import BASE, _rows, _write_csv


def _csv(tmp_path, rows, name="part-0.csv"):
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    _write_csv(raw / name, rows, header=True)
    return raw, raw / name


def _line_of_last_row(path) -> int:
    return len(path.read_text().splitlines())


def test_truncated_csv_names_file_and_line(tmp_path):
    raw, path = _csv(tmp_path, _rows(60))
    text = path.read_text()
    path.write_text(text[: text.rstrip("\n").rfind(",")])  # the last line cut inside a row
    with pytest.raises(PrepareError) as e:
        prepare(load_config(None, BASE), raw, tmp_path / "s")
    line = _line_of_last_row(path)
    assert line > 100 and f"{path}: line {line}: cannot read" in str(e.value), str(e.value)


def test_truncated_gzipped_csv_after_blank_lines_and_a_quoted_newline(tmp_path):
    raw, path = _csv(tmp_path, _rows(60))
    lines = path.read_text().splitlines()
    head = lines[:5]
    k, ts, y, a, b, d = head[3].split(",")
    head[3] = ",".join([k, ts, y, f'"{a}\nx"', b, d])  # one record over two lines
    body = head + [""] + lines[5:]  # and a blank line, which no reader counts as a row
    body[-1] = body[-1][: body[-1].rfind(",")]
    gz = raw / "part-0.csv.gz"
    gz.write_bytes(gzip.compress(("\n".join(body) + "\n").encode()))
    path.unlink()
    cfg = load_config(None, BASE + ["data.source.format=csv"])
    with pytest.raises(PrepareError) as e:
        prepare(cfg, raw, tmp_path / "s")
    assert f"{gz}: line {len(body) + 1}: cannot read" in str(e.value), str(e.value)  # +1: the quoted newline


def test_a_value_of_the_wrong_type_in_a_later_block_names_the_line(tmp_path):
    """Column types come from the first 8 MiB block; a later value that does not convert
    names its line."""
    from gmeta.io.sources import SourceError, open_source

    n = 500_000  # about 11 MB: the bad value is in the second block
    bad_line = n - 7
    lines = ["k,ts,y,a,b,d"] + [f"{i % 997},{i},{i % 2},{i % 13},{i % 7},{i % 100 / 10}" for i in range(n)]
    lines[bad_line - 1] = lines[bad_line - 1].rsplit(",", 1)[0] + ",not-a-number"
    path = tmp_path / "big.csv"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 9 << 20
    src = open_source(load_config(None, BASE), path)
    with pytest.raises(SourceError) as e:
        for _ in src.batches(["k", "ts", "y", "a", "b", "d"]):
            pass
    assert f"{path}: line {bad_line}: cannot read" in str(e.value) and "not-a-number" in str(e.value), str(e.value)
