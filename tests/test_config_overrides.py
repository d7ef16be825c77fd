"""An error in a ``key=value`` override is blamed on the command line, not on the YAML file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gmeta.config import ConfigError, load_config
from tests.conftest import DEBUG_CONFIG


@pytest.mark.parametrize("overrides, blamed, key", [
    (["meta.inner_lrr=0.1"], "meta.inner_lrr=0.1", "meta.inner_lrr: unknown key (did you mean 'inner_lr'?)"),
    (["train.max_steps=3", "meta.inner_lr=fast"], "meta.inner_lr=fast", "meta.inner_lr: expected float"),
    (["metaa.inner_lr=0.1"], "metaa.inner_lr=0.1", "metaa: unknown key (did you mean 'meta'?)"),
    (["meta.tasks_per_batch=0"], "meta.tasks_per_batch=0", "meta.tasks_per_batch: must be >= 1"),
    (["features.sparse.user_id.num_embeddings=0"], "features.sparse.user_id.num_embeddings=0",
     "features.sparse[0].num_embeddings: must be >= 1"),
    (["features.sparse.nobody.min_count=1"], "features.sparse.nobody.min_count=1", "no item named 'nobody'"),
])
def test_override_errors_name_the_override_not_the_file(overrides, blamed, key):
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG_CONFIG, overrides)
    msg = str(e.value)
    assert key in msg and f"command-line override {blamed!r}" in msg and str(DEBUG_CONFIG) not in msg


def test_errors_of_the_file_still_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEBUG_CONFIG.read_text().replace("meta:\n", "meta:\n  inner_lrr: 0.1\n", 1))
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["meta.inner_lr=0.2", "train.max_steps=5"])
    msg = str(e.value)
    assert "meta.inner_lrr: unknown key" in msg and str(bad) in msg and "command-line" not in msg


def test_cli_blames_the_override(tmp_path):
    p = subprocess.run([sys.executable, "-m", "gmeta.cli", "train", "--config", str(DEBUG_CONFIG),
                        "meta.inner_lrr=0.1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "command-line override 'meta.inner_lrr=0.1'" in p.stderr and "ads_cvr_debug.yaml" not in p.stderr
