"""Typed configuration.

The dataclasses of ``schema`` are the schema; YAML files only supply values, and ``key=value``
command-line overrides are applied on top. Every error names the dotted key that caused it
(``meta.inner_lr: expected float, got 'fast'``) and, when it comes from a file, the file.

Nothing in a config can name code to import: pluggable parts (algorithms, optimizers,
sharding types) are picked from small fixed vocabularies validated here.

- ``schema``: the dataclasses, one per section (``Config`` holds them all);
- ``checks``: ``validate``, what the values must satisfy together;
- ``load``: ``load_config`` (YAML files, ``base:`` files, ``key=value`` overrides, typed
  conversion, validation), ``dump_yaml``, ``flatten``.

Everything is imported from here: ``from gmeta.config import Config, load_config``.

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers, gmeta.models.heads.
"""

from __future__ import annotations

from gmeta.config.checks import (  # noqa: F401
    PARTITION_NAME,
    PARTITIONS_HELP,
    check_partitions,
    validate,
)
from gmeta.config.load import (  # noqa: F401
    config_from_dict,
    dump_yaml,
    flatten,
    load_config,
    parse_override,
    to_dict,
)
from gmeta.config.schema import (  # noqa: F401
    SHARD_FIELDS,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    FeaturesConfig,
    GeneratorConfig,
    LabelText,
    LibsvmField,
    MetaConfig,
    ModelConfig,
    OptimConfig,
    ShardingConfig,
    SourceConfig,
    SparseFeature,
    SplitConfig,
    SweepConfig,
    SweepParam,
    SynthConfig,
    TableSharding,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "FeaturesConfig", "GeneratorConfig",
    "LabelText", "LibsvmField", "MetaConfig", "ModelConfig", "OptimConfig", "PARTITIONS_HELP",
    "PARTITION_NAME", "SHARD_FIELDS", "ShardingConfig", "SourceConfig", "SparseFeature",
    "SplitConfig", "SweepConfig", "SweepParam", "SynthConfig", "TableSharding", "TrackingConfig",
    "TrainConfig", "check_partitions", "config_from_dict", "dump_yaml", "flatten", "load_config",
    "parse_override", "to_dict", "validate",
]
