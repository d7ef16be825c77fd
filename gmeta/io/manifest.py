"""``manifest.json``: what ``gmeta prepare`` wrote (schema, splits, files, counts), read and
checked by everything that reads shards."""

from __future__ import annotations

import json
from pathlib import Path

from gmeta.config import Config
from gmeta.io.errors import PrepareError
from gmeta.io.features import shard_fields
from gmeta.storage import check_bucket, location

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: per-file "units" (row groups / tars) for the streaming reader
SPLITS = ("train", "eval")


def splits_of(cfg: Config) -> tuple[str, ...]:
    """Shard splits prepare writes: train, eval (test), and val if data.split.val_fraction."""
    return SPLITS + (("val",) if cfg.data.split.val_fraction > 0 else ())


def load_manifest(shards_dir: str | Path) -> dict:
    path = location(shards_dir) / MANIFEST
    if not _exists(path):
        check_bucket(shards_dir, "task shards")  # an object store: a denied read or no bucket, not "not found"
        raise PrepareError(f"{path}: not found; run `gmeta prepare` first (data.shards_dir)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path}: not valid JSON: {e}") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise PrepareError(f"{path}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}; "
                           "prepare the shards again with this version of gmeta")
    return m


def _exists(path) -> bool:
    try:
        return path.is_file()
    except OSError:  # (an object store's denied access: check_bucket says which)
        return False


def check_manifest_matches(manifest: dict, cfg: Config, path: str) -> None:
    """The shards must have been prepared with the features the config declares."""
    want = [shard_fields(s) for s in cfg.features.sparse]
    got = manifest["schema"]["sparse"]
    if want != got:
        raise PrepareError(f"{path}: sparse features {got} differ from the config's features.sparse {want};"
                           " prepare the shards again with this config")
    if manifest["schema"]["dense"] != list(cfg.features.dense):
        raise PrepareError(f"{path}: dense features {manifest['schema']['dense']} differ from the config's "
                           f"features.dense {list(cfg.features.dense)}")
    objective = manifest["schema"].get("objective", "binary")
    if objective != cfg.model.objective:
        raise PrepareError(f"{path}: shards prepared for model.objective {objective!r} (labels checked for it), "
                           f"the config has {cfg.model.objective!r}; prepare the shards again with this config")
