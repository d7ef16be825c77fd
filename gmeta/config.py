"""Typed configuration.

Dataclasses below are the schema; YAML files only supply values, and ``key=value``
command-line overrides are applied on top. Every error names the dotted key that caused it
(``meta.inner_lr: expected float, got 'fast'``) and, when it comes from a file, the file.

Nothing in a config can name code to import: pluggable parts (algorithms, optimizers,
sharding types) are picked from small fixed vocabularies validated here.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from typing import cast as typing_cast

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the key (and file)."""


class LabelText(str):
    """A label value as text, kept as written: ``[-1, yes, "no", false]`` are the texts
    "-1", "yes", "no", "false" (YAML 1.1 would read yes/no/on/off as booleans). A number or
    boolean that comes from elsewhere than YAML text (a config saved as JSON) reads as its
    text, booleans as ``true`` / ``false``."""


# --------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------


@dataclass
class SparseFeature:
    """One categorical feature, looked up in its own embedding table.

    ``multi_hot`` features hold a list of ids per row and are pooled (``pooling``);
    single-valued features hold exactly one id per row.
    """

    name: str = ""
    num_embeddings: int = 1000
    multi_hot: bool = False
    pooling: Literal["sum", "mean"] = "sum"
    # New ids: ids seen fewer than this many times in the train split (and ids never seen:
    # a new ad, user, item) share one learned default row of the table, which the inner loop
    # then adapts, instead of each an untrained random row (0: off, every id its own row).
    min_count: int = 0
    # ... and this hashed share of the training ids that pass min_count map to the default
    # row as well, in training and after it, so that the default row learns from ids that
    # are new to the model (0: only rare ids train it). Set alone (min_count 0), it gives
    # the feature a default row for the ids never seen and the held-out ones.
    holdout_share: float = 0.0
    # How raw ids reach table rows. "hash": hashed into the num_embeddings rows at prepare
    # time (distinct ids may share a row). "managed": every live id owns a row; the shards
    # hold a 63-bit hash of the raw id, and the model admits ids to the num_embeddings slots
    # as it trains (torchrec's MCHManagedCollisionModule), the last slot being the shared
    # row of ids not admitted (the miss row). Not with min_count / holdout_share, nor with
    # train.pipeline.
    ids: Literal["hash", "managed"] = "hash"
    # ids: managed only. Which ids keep the slots when more want one than there are:
    # "distance_lfu" (occurrences divided by the steps since last seen), "lfu" (occurrences),
    # "lru" (last seen).
    eviction_policy: Literal["distance_lfu", "lfu", "lru"] = "distance_lfu"
    # ids: managed only. Training steps between admissions: 1 admits an id in the step it
    # first appears (its own row to adapt at once); larger intervals coalesce the ids of
    # that many steps, which route to the miss row until then.
    eviction_interval: int = 1
    # ids: managed only. Where an id that holds no slot goes when the model scores
    # (evaluate, predict, serving: nothing is admitted then): "miss_row", the shared miss
    # row that not-admitted ids trained; "zero", an all-zero embedding.
    unknown_ids: Literal["miss_row", "zero"] = "miss_row"
    # ids: managed only, incremental training (train.continue_from on a partitioned data
    # set): when a run continues, the ids that occur in none of the last D partitions (days)
    # up to the last it reads lose their slot, for new ids to take (their rows reset to the
    # miss row when taken). 0: an id keeps its slot until the eviction policy gives it away.
    evict_after_days: int = 0
    # > 0: the feature is a sequence (a user's behaviour: the last ads or items clicked, most
    # recent first), a multi_hot list column cut to its first max_length ids when prepared and
    # scored. It takes max_length cells per row, one id each (zeros past its end): model.arch
    # din attends over them; other heads see their sum. 0: not a sequence.
    max_length: int = 0
    # The name of another sparse feature whose table this one shares (one table, two
    # features; e.g. a clicked-ads sequence and the candidate ad_id): its ids hash as that
    # feature's do, into as many rows (num_embeddings must be equal). Hashed ids only, with no
    # default row (min_count, holdout_share 0 on both). Empty: the feature's own table.
    table: str = ""


# the fields of SparseFeature that shape the shards (the rest are model choices)
SHARD_FIELDS = ("name", "num_embeddings", "multi_hot", "pooling", "ids", "max_length", "table")


@dataclass
class FeaturesConfig:
    """Column names of the raw row-level data and the table size of each sparse feature."""

    task_key: str = "campaign_id"
    # Orders each task's rows (support before query under the time rule). Empty string: the
    # input has none, and the row order of the input is its time order.
    timestamp: str = "ts"
    # 0/1 for model.objective "binary"; any finite number for "regression".
    label: str = "label"
    # Several label columns per row, trained together (e.g. [click, conversion]): the head
    # outputs one value per label and a row's loss is the sum of the labels' losses
    # weighted by label_weights. Empty: the one column features.label. Each is checked as
    # features.label is (positive_labels / negative_labels apply to every one).
    labels: list[str] = field(default_factory=list)
    # The weight of each label's loss, in the order of features.labels (empty: 1 each).
    label_weights: list[float] = field(default_factory=list)
    # Binary labels in another encoding than 0/1 (e.g. -1/+1, true/false, "click"/"none"):
    # the values read as 1 and those read as 0, compared as numbers when both sides are
    # numbers, else as text. Values are text as written ([yes] is "yes", not a YAML
    # boolean; a boolean label column reads as "true" / "false"). Both empty: labels must
    # be 0/1 (booleans read as 1/0). Set: a label in neither list is an error naming the
    # file and line.
    positive_labels: list[LabelText] = field(default_factory=list)
    negative_labels: list[LabelText] = field(default_factory=list)
    # Column with the true probability of a positive label (synthetic data only), used for
    # the oracle AUC. Empty string: not available.
    true_prob: str = "p_true"
    sparse: list[SparseFeature] = field(
        default_factory=lambda: [
            SparseFeature("user_id", 20000),
            SparseFeature("ad_id", 20000),
            SparseFeature("advertiser_id", 2000),
            SparseFeature("hour", 24),
            SparseFeature("device", 8),
            SparseFeature("site_id", 200),
            SparseFeature("interests", 200, multi_hot=True, pooling="mean"),
        ]
    )
    # Numeric columns; may be empty (an all-categorical data set: the model's dense input
    # is then a learned vector).
    dense: list[str] = field(default_factory=lambda: ["bid_price", "user_activity", "ad_position"])
    # Applied to every dense value by prepare and serving: "log1p" is sign(x) * log(1 + |x|)
    # (for heavy-tailed counts such as Criteo's integer features).
    dense_transform: Literal["none", "log1p"] = "none"

    def label_names(self) -> list[str]:
        """The label columns: ``labels``, or the one ``label``."""
        return list(self.labels) or [self.label]

    def loss_weights(self) -> list[float]:
        """The weight of each label's loss (``label_weights``, or 1 each)."""
        return [float(w) for w in self.label_weights] or [1.0] * len(self.label_names())


@dataclass
class SynthConfig:
    """Synthetic ads-CVR generator (see gmeta/io/synth.py for the hidden model)."""

    seed: int = 0
    num_tasks: int = 4000
    num_users: int = 20000
    num_interests: int = 200
    num_sites: int = 200
    latent_dim: int = 8
    min_rows_per_task: int = 16
    max_rows_per_task: int = 400
    # Pareto tail index of task sizes (smaller = heavier tail).
    size_alpha: float = 1.3
    # Scales of the hidden per-task part of the logit: base-rate offset, audience preference
    # over the user latent, slope on the bid price.
    task_bias_scale: float = 1.0
    task_pref_scale: float = 1.5
    task_slope_scale: float = 0.8
    # Ad attributes, constant per ad and written as the columns ad_category, creative_type
    # and landing_page: the number of values of each.
    num_ad_categories: int = 50
    num_creative_types: int = 8
    num_landing_pages: int = 300
    # Share of the variance of an ad's hidden latent (and quality) that its attributes
    # explain: each attribute value has a hidden latent, and the ad's is sqrt(share) times
    # the (unit-variance) sum of its attributes' latents plus sqrt(1 - share) times a
    # residual of its own, which only the ad's rows reveal. 0: attributes carry no signal
    # (the hidden model of the data before attributes existed, drawn from the same seed).
    ad_attribute_share: float = 0.5
    rows_per_file: int = 200_000
    # A conversion column of this name (empty: none): 1 only on a click (the label), with
    # the probability of a hidden model of its own given the click (an offset, the ad's
    # quality, and per-campaign hidden terms: a base rate and an audience preference), for
    # conversion models (features.labels: [label, conversion], model.arch esmm or mmoe).
    conversion: str = ""
    # The mean conversion logit given a click (before the per-campaign terms).
    conversion_offset: float = -0.5
    # A behaviour-sequence column of this name (empty: none): per row, the ads the user
    # clicked before (raw ad ids, as the ad_id column's), drawn with a preference given by
    # the user's hidden latent, so that it shows the user's taste (e.g. a sequence feature
    # sharing ad_id's table, for model.arch din). Its own random stream: every other column
    # is the same with or without it.
    history: str = ""
    # The longest history (a row's length is uniform in 0..history_length).
    history_length: int = 10
    # Daily partitions: 0 writes one data set (part files in the output directory); N > 0
    # writes N days, one directory per day (dt=YYYY-MM-DD/part-*.parquet, Hive style), in
    # which campaigns start, run and end, users come and go and the shared part of the
    # logit drifts (random streams of their own: 0 gives the one data set as before).
    days: int = 0
    # The date of the first day (ISO, YYYY-MM-DD); timestamps are UTC seconds of the day.
    start_date: str = "2026-12-01"
    # Mean number of days a campaign runs (at least 1, at most as many days as it has rows;
    # geometric): its rows are spread over those days, and its ads exist only then.
    campaign_days: float = 3.0
    # Mean number of days a user is active (at least 1; geometric): a day's rows draw their
    # users among that day's active users, by the same popularity skew.
    user_days: float = 4.0
    # Standard deviation per day of the random walk of the shared logit's intercept and of
    # its weights on the three dense columns (0 on the first day; 0: no drift).
    daily_drift: float = 0.05


@dataclass
class SplitConfig:
    """How each task's rows become support and query, and which tasks are held out."""

    # "time": the earliest rows are the support; "ratio": a seeded random share; "warmup":
    # the warm-up protocol of item cold start (the task key is the new-id feature, e.g. the
    # item or ad id): ids with more than warmup_train_rows rows are training tasks (split by
    # the time rule), colder ids evaluation tasks whose support is their first 3 *
    # warmup_rows rows (warm-up sets a, b, c) and whose query is every later row.
    rule: Literal["time", "ratio", "warmup"] = "time"
    # Time rule, rows of a task with equal times (e.g. Avazu's hour): "input_order" orders
    # them as they come in the input, "shuffle" in a seeded order (from seed and the task),
    # so that tied rows can be support; "strict" keeps every support row strictly earlier
    # than every query row (a tie at the boundary goes to the query).
    tie_break: Literal["input_order", "shuffle", "strict"] = "input_order"
    support_ratio: float = 0.5
    min_support: int = 4
    max_support: int = 64
    min_query: int = 4
    max_query: int = 64
    # Share of tasks (chosen by a hash of the task key) held out for cold-start evaluation
    # (split "eval"), and a further share held out for validation (split "val").
    eval_fraction: float = 0.1
    val_fraction: float = 0.0
    seed: int = 0
    # A fixed number of query rows per task (the last ones by time under the time rule, a
    # seeded random choice under the ratio rule), the rest support; 0: by support_ratio.
    query_size: int = 0
    # Keep only tasks with this many rows or more / at most this many (0: no limit), counted
    # before the split: e.g. 13 and 100 for the MovieLens user-cold-start protocol.
    min_task_rows: int = 0
    max_task_rows: int = 0
    # A training task with more rows than one task holds (max_task_rows, else max_support +
    # max_query): "drop" leaves the extra rows out (and the task, when over max_task_rows);
    # "chunk" cuts it, in time order, into the fewest consecutive tasks of at most that many
    # rows (nearly equal sizes), each split by the rule above, so that training sees every
    # row. Held-out tasks (eval, val) keep the protocol whatever this says.
    long_train_tasks: Literal["drop", "chunk"] = "drop"
    # Warm-up rule: N, an id with more than this many rows trains the base model (all its
    # rows go to split "train"); an id with at most N rows and at least 3 * warmup_rows + 1
    # is an evaluation id (split "val" for a val_fraction share of them by a hash of the key,
    # else "eval"; eval_fraction is not used); a colder one is left out (too_few_warmup_rows).
    warmup_train_rows: int = 200
    # Warm-up rule: K, the rows of each warm-up set a, b and c of an evaluation id.
    warmup_rows: int = 20


@dataclass
class LibsvmField:
    """A range of feature indices of a libSVM/libFM line (``label idx:val ...``) read as one
    column ``name`` (a sparse feature, the task key, or a dense feature).

    ``kind: id``: the index is the id (the value is ignored, as in one-hot encodings); a
    single-valued feature has at most one index of its range per line, a multi-hot feature
    any number. ``kind: dense``: the value at index ``first`` (``last`` must equal it); an
    absent index is 0, as the format defines.
    """

    name: str = ""
    first: int = 0
    last: int = 0
    kind: Literal["id", "dense"] = "id"


@dataclass
class SourceConfig:
    """How ``gmeta prepare`` reads data.raw_dir.

    - ``auto``: Parquet or CSV files by their suffix (``.parquet``, ``.csv``, ``.tsv``).
    - ``parquet`` / ``csv`` / ``tsv``: row-level logs (e.g. Criteo- or Avazu-style CTR logs)
      whose columns the features section declares.
    - ``movielens``: the MovieLens files as distributed (ML-100K ``u.data``/``u.user``/
      ``u.item``, ML-1M ``ratings.dat``/``users.dat``/``movies.dat``) or as RecBole atomic
      files (``*.inter``/``*.user``/``*.item``), joined into the columns listed in
      gmeta/io/sources/.
    - ``recbole``: any data set in RecBole's atomic-file format; columns are named by the
      header (``user_id:token`` -> ``user_id``), user and item features joined in.
    - ``libsvm`` / ``libfm`` (the same text format): ``label idx:val idx:val ...`` per line,
      index ranges mapped to columns by ``fields``; an optional ``qid:N`` token is the
      column ``qid`` (usable as the task key).

    With a format other than ``auto``, every file of a directory is read whatever its
    extension (``.txt``, ``.libfm``, ``.data``), hidden and ``_`` entries excepted.
    """

    format: Literal["auto", "parquet", "csv", "tsv", "movielens", "recbole", "libsvm", "libfm"] = "auto"
    # csv/tsv: field separator (one character; empty: "," for csv, tab for tsv).
    delimiter: str = ""
    # csv/tsv: whether the first line of each file is a header. "auto": a header unless
    # column_names is set and the first line differs from it. true: a header (replaced by
    # column_names if set); false: data (column_names required). A first line that looks
    # like data where a header is expected, or like a header where data is, is an error.
    header: Literal["auto", True, False] = "auto"
    column_names: list[str] = field(default_factory=list)
    # libsvm/libfm: which index ranges are which column.
    fields: list[LibsvmField] = field(default_factory=list)
    # csv/tsv: separator of the ids of a multi-hot column held in one text field.
    multi_hot_separator: str = "|"
    # Missing values (nulls, empty numeric fields): false is an error naming file and
    # column; true maps a missing sparse id to its own "missing" id and a missing dense
    # value to 0. (An empty text id is that "missing" id either way.) Task key, timestamp
    # and label must never be missing.
    fill_missing: bool = False
    # movielens: the "click" column is rating >= this.
    click_threshold: float = 4.0


@dataclass
class DataConfig:
    raw_dir: str = "data/ads_cvr/raw"
    source: SourceConfig = field(default_factory=SourceConfig)
    shards_dir: str = "data/ads_cvr/shards"
    # The partitions to read when shards_dir is a partitioned data set (gmeta prepare
    # --partition, e.g. one per day): "all", "last:N" (the last N), "A..B" (A to B, both
    # included; "..B": up to B), or names separated by commas. Empty: the data set is not
    # partitioned.
    partitions: str = ""
    # prepare: shard format, tasks per shard file and per Parquet row group
    format: Literal["parquet", "webdataset"] = "parquet"
    # memory prepare may use; a larger input is partitioned on disk by task key first
    prepare_memory_mb: int = 2048
    tasks_per_shard: int = 2000
    tasks_per_row_group: int = 256
    split: SplitConfig = field(default_factory=SplitConfig)
    # reader: background worker processes per rank, batches each prepares ahead, tasks in
    # each worker's shuffle buffer, and what to do with a task holding invalid values
    num_workers: int = 1
    prefetch_factor: int = 4
    shuffle_buffer: int = 1024
    on_bad_task: Literal["error", "skip"] = "error"
    # training: how the epoch's tasks reach the ranks. "static": an equal, fixed share per
    # rank (reproducible; the slowest rank sets the pace, and a resume at another world
    # size starts the epoch again). "dynamic": units handed out as work from a queue on the
    # job's store, taken by each rank as it consumes them; no task left out, and a resume
    # (at any world size) trains only the epoch's tasks no checkpointed step trained.
    sharding: Literal["static", "dynamic"] = "static"
    # prepare warns when more than this share of a sparse feature's rows have an id that
    # shares its table row with another raw id (raise that feature's num_embeddings).
    collision_warn_share: float = 0.05


@dataclass
class ModelConfig:
    # "binary": logits, binary cross-entropy, AUC/GAUC/logloss; "regression": the output
    # is the prediction itself (e.g. a rating), squared error, RMSE/MAE.
    objective: Literal["binary", "regression"] = "binary"
    # The dense head over the pooled rows (gmeta.models.heads): "dlrm" (dot interaction),
    # "dcn_v2" (cross layers), "deepfm" (first order + FM + deep), "wide_deep" (wide + deep),
    # "mmoe" (shared experts, a gate and a tower per label of features.labels), "esmm" (CTR
    # and CVR towers; features.labels: [click, conversion], trained as pCTR and pCTCVR),
    # "din" (target attention of each sequence feature's candidate, the feature named by its
    # table, over the sequence; see docs/design.md).
    arch: Literal["dlrm", "dcn_v2", "deepfm", "wide_deep", "mmoe", "esmm", "din"] = "dlrm"
    embedding_dim: int = 16
    # Hidden sizes of the bottom MLP on dense features; its output has embedding_dim units.
    dense_arch: list[int] = field(default_factory=lambda: [64])
    # Hidden sizes of the top MLP (the deep tower of dcn_v2, deepfm and wide_deep); a final
    # layer with one logit is appended (dcn_v2 parallel: the ``output`` layer joins it and
    # the cross layers).
    over_arch: list[int] = field(default_factory=lambda: [64, 32])
    # dcn_v2: the number of cross layers, their rank (0: full rank, W [d, d]; r > 0: W = U V,
    # U [d, r], V [r, d]; d = (sparse features + 1) x embedding_dim), and whether the deep
    # tower follows them ("stacked") or runs beside them ("parallel").
    cross_layers: int = 3
    cross_rank: int = 0
    cross_structure: Literal["stacked", "parallel"] = "stacked"
    # mmoe: the number of experts and their hidden sizes (MLPs over the F+1 vectors side by
    # side); each label's tower has the hidden sizes of over_arch.
    experts: int = 4
    expert_arch: list[int] = field(default_factory=lambda: [64])
    # din: hidden sizes of the attention MLP over [behaviour, candidate, their difference,
    # their product], which has one output, the behaviour's weight.
    attention_arch: list[int] = field(default_factory=lambda: [32])
    # Storage of the embedding tables: "fp16" halves their memory and all-to-all bytes;
    # looked-up rows are computed with in fp32.
    embedding_dtype: Literal["fp32", "fp16"] = "fp32"
    # Mixed precision of the dense head's matrix products (training, evaluation, prediction):
    # "bf16" runs them under torch.autocast in bfloat16 (losses stay fp32).
    dense_autocast: Literal["none", "bf16"] = "none"


@dataclass
class MetaConfig:
    # maml (also first-order MAML, Meta-SGD), reptile (first order: the shared weights move
    # toward each task's adapted ones, no query-loss gradient), or erm (plain training).
    algorithm: Literal["maml", "reptile", "erm"] = "maml"
    tasks_per_batch: int = 16
    inner_steps: int = 1
    inner_lr: float = 0.1
    first_order: bool = False
    # Dense layers adapted in the inner loop: "all" (every layer of the head), whole parts
    # (dense_arch, over_arch; dcn_v2: cross, and deep and output when parallel; deepfm:
    # linear; wide_deep: wide; mmoe: experts, gates, towers, no over_arch; esmm: ctr, cvr,
    # no over_arch), single layers by name (over_arch.mlp.layers.1), or "last": the output
    # layer only (ANIL; every tower's with mmoe and esmm).
    adapt_dense: list[str] = field(default_factory=lambda: ["all"])
    # What the inner loop changes in those layers: their weights and biases ("weights"),
    # their biases only ("bias"), or a per-task scale and shift of their outputs ("film",
    # FiLM: y * (1 + s) + h, s and h starting from 0).
    dense_adaptation: Literal["weights", "bias", "film"] = "weights"
    # Also adapt the embedding rows the task looks up (per-task fast rows) ...
    adapt_embeddings: bool = True
    # ... of these sparse features only (e.g. the task's own ids; empty: every feature).
    adapt_features: list[str] = field(default_factory=list)
    embedding_inner_lr: float = 0.1
    # Meta-SGD: learn the inner learning rates (per element of each adapted parameter, per
    # feature and dim for embeddings), starting from inner_lr / embedding_inner_lr.
    meta_sgd: bool = False
    # Pad tasks in this many groups of similar size (1: all to the largest task's size).
    size_buckets: int = 2
    # How adapted dense layers hold each task's fast weights: "implicit" (never formed, the
    # fast path for layers of a few hundred units), "materialized" (one [N, out, in] copy per
    # task; needed by meta_sgd), "auto" (per layer and size bucket, whichever is cheaper).
    fast_weights: Literal["auto", "implicit", "materialized"] = "auto"
    # Outer loss of maml: the query loss after adaptation, averaged over the tasks ("task")
    # or over every query row ("row": a task weighs as many query rows as it has) ...
    query_weighting: Literal["task", "row"] = "task"
    # ... plus this weight times the plain (unadapted) loss over every row of the meta-batch,
    # support and query (0: none): the shared model and the tables then learn from every
    # row, as ERM does, and not only from the query rows after adaptation.
    erm_weight: float = 0.0


@dataclass
class OptimConfig:
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0
    embedding_optimizer: Literal["sgd", "rowwise_adagrad", "adagrad", "adam"] = "rowwise_adagrad"
    embedding_lr: float = 0.05
    # L2 penalty on the rows a step touches, applied by the fused optimizer (row-wise Adagrad:
    # fbgemm's weight_decay_mode L2, wd x row added to the row's gradient, lazily, only for
    # the rows in the batch; Adam: fbgemm's decoupled decay, row -= lr x wd x row). Keeps the
    # per-id rows of users and ads from memorising their few rows. With it, a step reads its
    # finite-loss flag on the host (see docs/fault_tolerance.md).
    embedding_weight_decay: float = 0.0
    # Learning-rate schedule of both optimizers (dense Adam and the tables' fused one):
    # linear warm-up from 0 over this many steps, then "none" (constant), "linear" or
    # "cosine" decay to min_lr_factor x the rate at the last step.
    warmup_steps: int = 0
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    min_lr_factor: float = 0.0
    # Clip the dense gradients (after the all-reduce) to this global L2 norm (0: off). The
    # tables' gradients are applied inside backward by their fused optimizer, unclipped.
    grad_clip_norm: float = 0.0


_SHARDING = Literal["table_wise", "row_wise", "column_wise", "auto"]


@dataclass
class TableSharding:
    name: str = ""  # a sparse feature name
    sharding_type: _SHARDING = "table_wise"


@dataclass
class ShardingConfig:
    # default for every table; "auto" lets the planner choose
    sharding_type: _SHARDING = "table_wise"
    # per-table overrides
    tables: list[TableSharding] = field(default_factory=list)
    # embedding memory each process may hold (MiB, 0: no limit); a table larger than this
    # is sharded by rows whatever sharding_type says
    memory_budget_mb: float = 0.0


@dataclass
class TrainConfig:
    # Epochs of meta.algorithm over the training tasks ...
    epochs: int = 1
    # ... after this many epochs of plain training (ERM: every row, no adaptation) of the
    # same model in the same run: the two-stage recipe (pretrain, then meta-train).
    pretrain_epochs: int = 0
    # Start from the weights of this checkpoint (any gmeta checkpoint of the same model
    # shape, e.g. an ERM run; tables resharded to this job's plan), with fresh optimizers.
    # Parameters it lacks (Meta-SGD's learned rates) keep their initial values. Empty: none.
    # Ignored when resuming (the resumed checkpoint has the weights).
    init_from: str = ""
    # Continue training the model of this training checkpoint on new data (incremental
    # training: yesterday's model on today's partitions, data.partitions): its weights, both
    # optimizers' states (Adam moments, the tables' fused optimizer state), managed-id
    # remapping and known-id masks (joined with this data's), with this run's own steps,
    # epochs, rates and schedule. The checkpoint's config must describe the same model.
    # Ignored when resuming (this run's own checkpoint has all of it); not with init_from.
    continue_from: str = ""
    # Stop after this many meta-batches (0: run all epochs).
    max_steps: int = 0
    log_every: int = 20
    seed: int = 0
    nproc_per_node: int = 2
    # Intra-op threads of each process (0: the usable cores divided by the processes on
    # this node, at least 1).
    threads: int = 0
    output_dir: str = "runs/ads_cvr"
    # Evaluate on the held-out tasks when training ends (rank 0, unsharded checkpoint).
    eval_at_end: bool = True
    # Start the id all-to-all of the next meta-batch before this one computes.
    pipeline: bool = True
    # Per-rank meta-batch sizes that follow each rank's speed (needs data.sharding: dynamic;
    # several ranks). The global batch stays meta.tasks_per_batch x ranks; every
    # adaptive_batch_every steps the ranks share their measured meta-step time per task
    # (one all-gather), smoothed, and each takes a share of the global batch in proportion
    # to its speed, at least adaptive_batch_min_share of an equal share. A step is the same
    # training whatever the shares (each rank's loss weighs by its share of the global count).
    adaptive_batch: bool = False
    adaptive_batch_every: int = 10
    adaptive_batch_min_share: float = 0.25
    # Training checkpoints under <output_dir>/checkpoints every N steps and/or M minutes
    # (0: off; the minutes trigger is checked at log steps), keeping the newest K.
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 0.0
    keep_checkpoints: int = 3
    # "none": start fresh (refused if output_dir holds checkpoints), "auto": continue from
    # the newest complete checkpoint in output_dir if any, or the path of a checkpoint.
    resume: str = "none"
    # Validation during training, every N steps and at the end (0: off; needs
    # data.split.val_fraction > 0): the first val_max_tasks tasks of split "val" (a fixed
    # subset), adapted with eval.inner_steps, scored by val_metric ("auto": gauc for a binary
    # objective, rmse for regression). The best weights so far are kept in
    # <output_dir>/best (and are what eval_at_end evaluates and the MLflow model holds).
    val_every_steps: int = 0
    val_max_tasks: int = 256
    val_metric: Literal["auto", "auc", "gauc", "logloss", "rmse", "mae"] = "auto"
    # Stop when this many validations in a row did not improve on the best (0: never).
    early_stopping_patience: int = 0
    # A non-finite meta-loss never updates anything (checked on the device every step). "error"
    # stops at the next log or checkpoint step, naming the first such step (the last
    # checkpoint stays as it was); "skip" counts them (train/skipped_nonfinite_steps).
    on_nonfinite_loss: Literal["error", "skip"] = "error"


@dataclass
class EvalConfig:
    # Inner steps at evaluation; -1 means meta.inner_steps.
    inner_steps: int = -1
    tasks_per_batch: int = 64
    # Which held-out tasks to evaluate: "eval" (test) or "val" (data.split.val_fraction).
    split: Literal["eval", "val"] = "eval"
    # "tasks": adapt on each task's support, score its query; "warmup": the warm-up protocol
    # of item cold start (shards of data.split.rule warmup): the test rows scored at the cold
    # stage and after updates on the first K, 2K, 3K support rows (docs/evaluation.md).
    protocol: Literal["tasks", "warmup"] = "tasks"
    # Evaluate on at most this many held-out tasks (0: all).
    max_tasks: int = 0
    # Inner steps of the AUC-vs-K curve (K = 0 is no adaptation).
    curve_steps: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 5])
    # Cold-start buckets by support-set size: lower edges, ascending ([8, 16] -> 8-15, 16+).
    support_buckets: list[int] = field(default_factory=lambda: [1, 8, 16, 32, 64])
    # Bins of the calibration (reliability) table and plot.
    calibration_bins: int = 10


@dataclass
class TrackingConfig:
    enabled: bool = True
    # Empty: MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the working directory.
    uri: str = ""
    experiment: str = "gmeta"
    run_name: str = ""
    # Sample host metrics (CPU, memory, disk, network, GPU) every this many seconds (0: off).
    system_metrics_s: float = 5.0
    # Log the trained model as an MLflow pyfunc (adapt-then-predict on raw rows).
    log_model: bool = True
    # The run this one is nested under in MLflow (gmeta sweep sets it for its trials).
    parent_run_id: str = ""


@dataclass
class GeneratorConfig:
    """A meta-learned start for new ids (Meta-Embedding): a small network maps an id's
    attribute features (their looked-up embeddings, pooled as the model pools them, of a row
    holding the id) to an offset from the feature's default row; ids the default row stands
    for start from default row + offset in training, evaluation, prediction and serving."""

    # The id feature whose new ids get generated rows (empty: no generator). It must be
    # single-valued and have a default row (its min_count or holdout_share > 0).
    feature: str = ""
    # Sparse features that describe the id (e.g. advertiser_id, category for an ad): the
    # generator's input, one pooled embedding each, concatenated.
    attributes: list[str] = field(default_factory=list)
    # Hidden layer sizes of the generator's MLP (ReLU); its output has embedding_dim units
    # and starts at zero, so a fresh generator gives the default row itself.
    hidden: list[int] = field(default_factory=lambda: [16])
    # The weight w of the cold-start term (loss of the support rows with the generated row):
    # "base_fixed" trains on w x cold + (1 - w) x warm-up (query loss after one step of the
    # generated row on the support rows); "joint" adds w x cold to the meta-learner's loss,
    # whose query loss after the inner loop is the warm-up term.
    cold_weight: float = 0.1
    # Learning rate of the warm-up step on the generated row ("base_fixed").
    warmup_lr: float = 0.1
    # "joint": the generator trains with the whole model under meta.algorithm; "base_fixed":
    # only the generator trains, on the Meta-Embedding loss, tables and head left exactly as
    # train.init_from (a trained checkpoint, required) holds them.
    mode: Literal["joint", "base_fixed"] = "joint"
    # The ids a base_fixed generator learns from: "new", those the default row stands for
    # (min_count, holdout_share); "all", every id of the feature in the training rows, each
    # started from the default row and generated as a new id would be (Meta-Embedding trains
    # its generator on old items this way: many more ids to learn from than the held-out few).
    # Evaluation, prediction and serving generate new ids only, whichever is set.
    train_ids: Literal["new", "all"] = "new"


@dataclass
class SweepParam:
    """One dimension of ``gmeta sweep``'s search: the config key ``key`` (dotted, e.g.
    meta.inner_lr) drawn from [low, high] (``log``: on a log scale; ``integer``: whole
    numbers), or from ``choices``, YAML values as text (["0", "1", "2"], ["[over_arch]"])."""

    key: str = ""
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False
    choices: list[str] = field(default_factory=list)


@dataclass
class SweepConfig:
    """``gmeta sweep``: Optuna's TPE sampler over ``params``, each trial one training run
    scored by its best validation metric (train.val_every_steps must be set); a trial whose
    best so far falls behind the median of earlier trials at the same validation of
    meta-training (pretraining epochs not counted) is pruned."""

    trials: int = 20
    seed: int = 0
    prune: bool = True
    # trials that end before any is pruned (the median needs a few to be meaningful)
    prune_startup_trials: int = 5
    # processes of each trial's training (torchrun when > 1)
    nproc_per_trial: int = 1
    params: list[SweepParam] = field(default_factory=list)


@dataclass
class Config:
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


# --------------------------------------------------------------------------------------
# validation of values (types are checked while building)
# --------------------------------------------------------------------------------------

# A partition's name (gmeta prepare --partition): names sort in time order (2026-12-01).
PARTITION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")
PARTITIONS_HELP = ("'all', 'last:N' (the last N partitions), 'A..B' (A to B, both included; either end may be "
                   "left out), or names separated by commas")


def check_partitions(spec: str, key: str = "data.partitions") -> None:
    """The syntax of a selection (``data.partitions``), before any data is read."""
    if spec in ("", "all"):
        return
    if spec.startswith("last:"):
        n = spec[5:]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"{key}: {spec!r}: last:N needs a whole number N >= 1")
        return
    if ".." in spec:
        lo, _, hi = spec.partition("..")
        for end in (lo, hi):
            if end and not PARTITION_NAME.match(end):
                raise ValueError(f"{key}: {spec!r}: {end!r} is not a partition name; {PARTITIONS_HELP}")
        if not lo and not hi:
            raise ValueError(f"{key}: {spec!r}: give at least one end; {PARTITIONS_HELP}")
        return
    for name in spec.split(","):
        if not PARTITION_NAME.match(name.strip()):
            raise ValueError(f"{key}: {spec!r}: {name!r} is not a partition name; {PARTITIONS_HELP}")


def _is_iso_date(text: str) -> bool:
    """Whether ``text`` is a calendar date written YYYY-MM-DD."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Check values that are well typed but impossible. Raises ConfigError naming the key."""
    f = cfg.features
    _check(bool(f.task_key), "features.task_key", "must not be empty")
    _check(bool(f.label), "features.label", "must not be empty")
    for i, name in enumerate(f.labels):
        _check(bool(name), f"features.labels[{i}]", "must not be empty")
    _check(len(set(f.labels)) == len(f.labels), "features.labels", f"names repeat: {list(f.labels)}")
    _check(not f.labels or f.label in (FeaturesConfig.label, f.labels[0]), "features.label",
           f"is {f.label!r} but features.labels {list(f.labels)} lists the label columns: leave features.label "
           "unset or make it the first of features.labels")
    _check(not f.label_weights or len(f.label_weights) == len(f.label_names()), "features.label_weights",
           f"{len(f.label_weights)} weight(s) for {len(f.label_names())} label(s) {f.label_names()}: give one "
           "per label, in the order of features.labels")
    for i, w in enumerate(f.label_weights):
        _check(math.isfinite(w) and w >= 0, f"features.label_weights[{i}]", f"must be finite and >= 0, got {w}")
    _check(not f.label_weights or sum(f.label_weights) > 0, "features.label_weights", "must not all be 0")
    _check(len(f.label_names()) == 1 or cfg.data.source.format not in ("libsvm", "libfm"), "features.labels",
           f"data.source.format {cfg.data.source.format} has one label per line (its first token): several "
           "labels need an input format with named columns (parquet, csv, tsv, movielens, recbole)")
    _check(len(f.sparse) > 0, "features.sparse", "at least one sparse feature is required")
    pos, neg = set(f.positive_labels), set(f.negative_labels)
    _check(bool(pos) == bool(neg), "features.positive_labels" if not pos else "features.negative_labels",
           "set both features.positive_labels and features.negative_labels, or neither")
    _check(not (pos & neg), "features.negative_labels", f"values {sorted(pos & neg)} are also positive_labels")
    _check(not pos or cfg.model.objective == "binary", "features.positive_labels",
           "label mappings are for model.objective binary")
    names = [s.name for s in f.sparse] + list(f.dense)
    for i, sf in enumerate(f.sparse):
        _check(bool(sf.name), f"features.sparse[{i}].name", "must not be empty")
        _check(sf.num_embeddings >= 1, f"features.sparse[{i}].num_embeddings", "must be >= 1")
        _check(sf.min_count >= 0, f"features.sparse[{i}].min_count", "must be >= 0 (0: no default row)")
        _check(0.0 <= sf.holdout_share < 1.0, f"features.sparse[{i}].holdout_share", "must be in [0, 1)")
        if sf.ids == "managed":
            _check(sf.min_count == 0 and sf.holdout_share == 0.0, f"features.sparse[{i}].ids",
                   "managed ids have their own miss row for ids not admitted; they do not combine with "
                   f"features.sparse[{i}].min_count / holdout_share (set both to 0, or ids: hash)")
            _check(sf.num_embeddings >= 2, f"features.sparse[{i}].num_embeddings",
                   "must be >= 2 with ids: managed (the slots, the last of which is the miss row)")
            _check(sf.eviction_interval >= 1, f"features.sparse[{i}].eviction_interval", "must be >= 1")
            _check(sf.evict_after_days >= 0, f"features.sparse[{i}].evict_after_days", "must be >= 0 (0: never)")
            _check(not cfg.train.pipeline, f"features.sparse[{i}].ids",
                   "managed ids need train.pipeline: false (the pipeline remaps the next batch's ids before "
                   "this batch's lookup and update, so a slot evicted for the next batch could still be read "
                   "and updated for this one)")
        else:
            for k, default in (("eviction_policy", "distance_lfu"), ("eviction_interval", 1),
                               ("unknown_ids", "miss_row"), ("evict_after_days", 0)):
                _check(getattr(sf, k) == default, f"features.sparse[{i}].{k}",
                       f"applies to ids: managed only (this feature has ids: {sf.ids})")
    dup = {n for n in names if names.count(n) > 1}
    _check(not dup, "features", f"duplicate feature names {sorted(dup)}")
    _validate_sequences(cfg)
    warmup = cfg.data.split.rule == "warmup"
    # under the warm-up rule the task is one id of a sparse feature: the key is that feature too
    reserved = {f.task_key, f.timestamp, *f.label_names(), f.true_prob} - {""} - ({f.task_key} if warmup else set())
    clash = reserved & set(names)
    _check(not clash, "features", f"feature names {sorted(clash)} clash with task key/label/timestamp")

    s = cfg.synth
    for k in ("num_tasks", "num_users", "num_interests", "num_sites", "latent_dim", "rows_per_file",
              "num_ad_categories", "num_creative_types", "num_landing_pages"):
        _check(getattr(s, k) >= 1, f"synth.{k}", "must be >= 1")
    _check(0.0 <= s.ad_attribute_share <= 1.0, "synth.ad_attribute_share", "must be in [0, 1]")
    _check(s.min_rows_per_task >= 2, "synth.min_rows_per_task", "must be >= 2")
    _check(s.max_rows_per_task >= s.min_rows_per_task, "synth.max_rows_per_task",
           "must be >= synth.min_rows_per_task")
    _check(s.size_alpha > 0, "synth.size_alpha", "must be > 0")
    _check(s.conversion not in (set(names) | {f.task_key, f.timestamp, f.label, f.true_prob}) - {""},
           "synth.conversion", f"{s.conversion!r} is already a column gmeta synth writes (a feature, the task "
           "key, the label, the timestamp or the true probability)")
    _check(s.history_length >= 1, "synth.history_length", "must be >= 1")
    _check(s.history not in {f.task_key, f.timestamp, *f.label_names(), f.true_prob, s.conversion} - {""},
           "synth.history", f"{s.history!r} is already a column gmeta synth writes (the task key, a label, the "
           "timestamp, the true probability or the conversion)")
    _check(s.days >= 0, "synth.days", "must be >= 0 (0: one data set, N: N daily partitions)")
    _check(_is_iso_date(s.start_date), "synth.start_date", f"{s.start_date!r} is not an ISO date (YYYY-MM-DD)")
    for k in ("campaign_days", "user_days"):
        _check(math.isfinite(getattr(s, k)) and getattr(s, k) >= 1.0, f"synth.{k}",
               "must be a finite number of days >= 1")
    _check(math.isfinite(s.daily_drift) and s.daily_drift >= 0.0, "synth.daily_drift", "must be finite and >= 0")
    if s.days > 0:  # every day has a campaign and a user active
        _check(s.num_tasks >= s.days, "synth.num_tasks", f"must be >= synth.days ({s.days}) so that every day "
               "has a campaign running")
        _check(s.num_users >= s.days, "synth.num_users", f"must be >= synth.days ({s.days}) so that every day "
               "has a user active")

    sp = cfg.data.split
    _check(0.0 < sp.support_ratio < 1.0, "data.split.support_ratio", "must be in (0, 1)")
    _check(sp.min_support >= 1, "data.split.min_support", "must be >= 1")
    _check(sp.min_query >= 1, "data.split.min_query", "must be >= 1")
    _check(sp.max_support >= sp.min_support, "data.split.max_support", "must be >= data.split.min_support")
    _check(sp.max_query >= sp.min_query, "data.split.max_query", "must be >= data.split.min_query")
    _check(0.0 <= sp.eval_fraction < 1.0, "data.split.eval_fraction", "must be in [0, 1)")
    _check(0.0 <= sp.val_fraction < 1.0 - sp.eval_fraction, "data.split.val_fraction",
           "must be >= 0, and below 1 - data.split.eval_fraction (some tasks must remain for training)")
    _check(sp.query_size >= 0, "data.split.query_size", "must be >= 0 (0: by support_ratio)")
    _check(sp.query_size <= sp.max_query, "data.split.query_size", "must be <= data.split.max_query")
    _check(sp.min_task_rows >= 0, "data.split.min_task_rows", "must be >= 0 (0: no limit)")
    _check(sp.max_task_rows >= 0, "data.split.max_task_rows", "must be >= 0 (0: no limit)")
    _check(sp.max_task_rows == 0 or sp.max_task_rows >= sp.min_task_rows, "data.split.max_task_rows",
           "must be >= data.split.min_task_rows (or 0: no limit)")
    if warmup:
        _check(f.task_key in [s.name for s in f.sparse], "features.task_key",
               f"data.split.rule warmup: the task key must be a sparse feature (the new id whose rows warm up), "
               f"got {f.task_key!r}, not one of {[s.name for s in f.sparse]}")
        _check(sp.warmup_rows >= 1, "data.split.warmup_rows", "must be >= 1")
        _check(sp.warmup_train_rows >= 3 * sp.warmup_rows + 1, "data.split.warmup_train_rows",
               f"must be >= 3 * data.split.warmup_rows + 1 = {3 * sp.warmup_rows + 1}: an evaluation id needs its "
               "three warm-up sets and a test row, and has at most warmup_train_rows rows")
    src = cfg.data.source
    _check(len(src.delimiter) <= 1, "data.source.delimiter", "must be one character (or empty for the default)")
    _check(src.header is not False or bool(src.column_names), "data.source.column_names",
           "must name the columns when data.source.header is false")
    _check(len(set(src.column_names)) == len(src.column_names), "data.source.column_names", "names repeat")
    if src.format in ("libsvm", "libfm"):
        _check(bool(src.fields), "data.source.fields", f"required for data.source.format {src.format}: "
               "which index ranges are which column ({name, first, last, kind})")
    spans: list[tuple[int, int, str]] = []
    for i, fl in enumerate(src.fields):
        key = f"data.source.fields[{i}]"
        _check(bool(fl.name), f"{key}.name", "must not be empty")
        _check(0 <= fl.first <= fl.last, f"{key}.last", "must be >= first >= 0")
        _check(fl.kind == "id" or fl.first == fl.last, f"{key}.last",
               "a dense field is one index: last must equal first")
        for j, (lo, hi, name) in enumerate(spans):
            _check(fl.last < lo or fl.first > hi, f"{key}.first",
                   f"indices {fl.first}..{fl.last} overlap data.source.fields[{j}] ({name}: {lo}..{hi})")
        spans.append((fl.first, fl.last, fl.name))
    _check(len({fl.name for fl in src.fields}) == len(src.fields), "data.source.fields", "names repeat")
    _check(0.0 <= cfg.data.collision_warn_share <= 1.0, "data.collision_warn_share", "must be in [0, 1]")
    _check(len(src.multi_hot_separator) >= 1, "data.source.multi_hot_separator", "must not be empty")
    _check(cfg.data.tasks_per_shard >= 1, "data.tasks_per_shard", "must be >= 1")
    _check(cfg.data.tasks_per_row_group >= 1, "data.tasks_per_row_group", "must be >= 1")
    _check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(cfg.data.prepare_memory_mb >= 1, "data.prepare_memory_mb", "must be >= 1")
    _check(cfg.data.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
    _check(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    try:
        check_partitions(cfg.data.partitions)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check(not (cfg.train.init_from and cfg.train.continue_from), "train.continue_from",
           "set train.init_from (weights, fresh optimizers) or train.continue_from (the whole training state), "
           "not both")
    _check(not cfg.train.adaptive_batch or cfg.data.sharding == "dynamic", "train.adaptive_batch",
           "needs data.sharding: dynamic (with static shares a faster rank would run out of data first)")
    _check(cfg.train.adaptive_batch_every >= 1, "train.adaptive_batch_every", "must be >= 1")
    _check(0 < cfg.train.adaptive_batch_min_share <= 1, "train.adaptive_batch_min_share", "must be in (0, 1]")

    m = cfg.model
    _check(m.embedding_dim >= 1, "model.embedding_dim", "must be >= 1")
    _check(all(h >= 1 for h in m.dense_arch), "model.dense_arch", "layer sizes must be >= 1")
    _check(all(h >= 1 for h in m.over_arch), "model.over_arch", "layer sizes must be >= 1")

    me = cfg.meta
    _check(me.tasks_per_batch >= 1, "meta.tasks_per_batch", "must be >= 1")
    _check(me.inner_steps >= 0, "meta.inner_steps", "must be >= 0")
    _check(me.inner_lr > 0, "meta.inner_lr", "must be > 0")
    _check(me.embedding_inner_lr > 0, "meta.embedding_inner_lr", "must be > 0")
    _check(me.size_buckets >= 1, "meta.size_buckets", "must be >= 1")
    _check(me.erm_weight >= 0, "meta.erm_weight", "must be >= 0 (0: no ERM term)")
    _check(m.experts >= 1, "model.experts", "must be >= 1")
    _check(bool(m.expert_arch) and all(h >= 1 for h in m.expert_arch), "model.expert_arch",
           "at least one layer, of sizes >= 1")
    if m.arch == "esmm":
        _check(len(f.label_names()) == 2, "features.labels",
               f"model.arch esmm trains two labels, click then conversion (e.g. features.labels: [click, "
               f"conversion]), got {f.label_names()}")
        _check(m.objective == "binary", "model.objective", "model.arch esmm's labels are binary (click, conversion)")
    _check(bool(m.attention_arch) and all(h >= 1 for h in m.attention_arch), "model.attention_arch",
           f"at least one hidden layer, sizes >= 1, got {m.attention_arch}")
    if m.arch == "din":
        seqs = [(i, sf) for i, sf in enumerate(f.sparse) if sf.max_length]
        _check(bool(seqs), "model.arch", "din attends over a sequence feature: give one features.sparse[].max_length "
               "> 0 and name its candidate's table (features.sparse[].table, e.g. ad_id)")
        sparse = {sf.name: sf for sf in f.sparse}
        for i, sf in seqs:
            _check(bool(sf.table), f"features.sparse[{i}].table", f"model.arch din compares each behaviour of "
                   f"{sf.name} with the candidate: name the candidate feature whose table it shares")
            _check(not sparse[sf.table].max_length, f"features.sparse[{i}].table",
                   f"{sf.table} is a sequence itself; din's candidate holds one id per row")
    _check(m.cross_layers >= 1, "model.cross_layers", "must be >= 1")
    _check(m.cross_rank >= 0, "model.cross_rank", "must be >= 0 (0: full rank)")
    _check(not (m.arch == "dcn_v2" and m.cross_structure == "parallel" and not m.over_arch), "model.over_arch",
           "dcn_v2 parallel runs a deep tower beside the cross layers: give it at least one layer")
    # the head's parts and linear layers, named as the model will name them (a head is small:
    # built here on the CPU, from torch alone)
    from torch.nn import Linear

    from gmeta.models.heads import build_head, head_parts

    head = build_head(m, len(f.dense), len(f.sparse), f.loss_weights(),
                      features=[dataclasses.asdict(sf) for sf in f.sparse])
    parts = head_parts(head)
    layer_names = [n for n, mod in head.named_modules() if isinstance(mod, Linear)]
    for i, part in enumerate(me.adapt_dense):
        _check(part in parts or part in ("all", "last") or part in layer_names, f"meta.adapt_dense[{i}]",
               f"must be 'all', one of the {m.arch} head's parts {parts}, 'last' (the output layer) or a layer "
               f"name ({', '.join(layer_names)}), got {part!r}")
    for i, name in enumerate(me.adapt_features):
        _check(name in [s.name for s in f.sparse], f"meta.adapt_features[{i}]",
               f"must name a sparse feature ({', '.join(s.name for s in f.sparse)}), got {name!r}")
    if me.algorithm in ("maml", "reptile"):
        _check(me.inner_steps >= 1, "meta.inner_steps", f"must be >= 1 for {me.algorithm}")
        _check(bool(me.adapt_dense) or me.adapt_embeddings, "meta.adapt_dense",
               f"{me.algorithm} must adapt something: list a dense part or set meta.adapt_embeddings")
    if me.algorithm == "reptile":
        _check(not me.meta_sgd, "meta.meta_sgd", "reptile has no meta-gradient to learn inner rates from: "
               "use meta.algorithm maml")
        _check(me.dense_adaptation != "film", "meta.dense_adaptation",
               "reptile moves shared weights toward adapted ones; FiLM's scale and shift are not shared "
               "weights: use weights or bias")
    _check(not (me.meta_sgd and me.fast_weights == "implicit"), "meta.fast_weights",
           "implicit fast weights need one scalar inner_lr; meta.meta_sgd learns one per weight element: use "
           "fast_weights auto or materialized")

    o = cfg.optim
    _check(o.dense_lr > 0, "optim.dense_lr", "must be > 0")
    _check(o.dense_weight_decay >= 0, "optim.dense_weight_decay", "must be >= 0")
    _check(o.embedding_lr > 0, "optim.embedding_lr", "must be > 0")
    _check(o.embedding_weight_decay >= 0, "optim.embedding_weight_decay", "must be >= 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0 (0: no warm-up)")
    _check(0.0 <= o.min_lr_factor <= 1.0, "optim.min_lr_factor", "must be in [0, 1]")
    _check(o.grad_clip_norm >= 0, "optim.grad_clip_norm", "must be >= 0 (0: off)")

    t = cfg.train
    _check(t.epochs >= 1, "train.epochs", "must be >= 1")
    _check(t.pretrain_epochs >= 0, "train.pretrain_epochs", "must be >= 0 (0: none)")
    _check(t.max_steps >= 0, "train.max_steps", "must be >= 0")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1")
    _check(t.nproc_per_node >= 1, "train.nproc_per_node", "must be >= 1")
    _check(t.threads >= 0, "train.threads", "must be >= 0 (0: cores / processes on the node)")
    _check(bool(t.output_dir), "train.output_dir", "must not be empty")
    _check(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0 (0: off)")
    _check(t.checkpoint_every_minutes >= 0, "train.checkpoint_every_minutes", "must be >= 0 (0: off)")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(bool(t.resume), "train.resume", "must be 'none', 'auto' or a checkpoint path")
    _check(t.val_every_steps >= 0, "train.val_every_steps", "must be >= 0 (0: no validation)")
    _check(t.val_max_tasks >= 0, "train.val_max_tasks", "must be >= 0 (0: every validation task)")
    _check(t.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0 (0: never stop early)")
    _check(t.early_stopping_patience == 0 or t.val_every_steps > 0, "train.early_stopping_patience",
           "needs train.val_every_steps > 0 (validation to stop on)")
    metric = t.val_metric
    _check(metric in ("auto", "rmse", "mae") if cfg.model.objective == "regression" else metric not in ("rmse", "mae"),
           "train.val_metric", f"{metric!r} is not a metric of model.objective {cfg.model.objective}")

    sparse_names = {s.name for s in f.sparse}
    for i, tb in enumerate(cfg.sharding.tables):
        _check(tb.name in sparse_names, f"sharding.tables[{i}].name",
               f"{tb.name!r} is not a sparse feature ({sorted(sparse_names)})")
    _check(cfg.sharding.memory_budget_mb >= 0, "sharding.memory_budget_mb", "must be >= 0")

    _validate_generator(cfg)

    e = cfg.eval
    _check(e.inner_steps >= -1, "eval.inner_steps", "must be >= 0, or -1 for meta.inner_steps")
    _check(e.tasks_per_batch >= 1, "eval.tasks_per_batch", "must be >= 1")
    _check(e.max_tasks >= 0, "eval.max_tasks", "must be >= 0")
    _check(all(k >= 0 for k in e.curve_steps), "eval.curve_steps", "inner steps must be >= 0")
    _check(len(e.support_buckets) >= 1 and e.support_buckets == sorted(set(e.support_buckets))
           and e.support_buckets[0] >= 0, "eval.support_buckets", "must be ascending, distinct lower edges >= 0")
    _check(e.calibration_bins >= 2, "eval.calibration_bins", "must be >= 2")
    _check(cfg.tracking.system_metrics_s >= 0, "tracking.system_metrics_s", "must be >= 0 (0: off)")
    sw = cfg.sweep
    _check(sw.trials >= 1, "sweep.trials", "must be >= 1")
    _check(sw.prune_startup_trials >= 0, "sweep.prune_startup_trials", "must be >= 0")
    _check(sw.nproc_per_trial >= 1, "sweep.nproc_per_trial", "must be >= 1")
    keys = [p.key for p in sw.params]
    _check(len(set(keys)) == len(keys), "sweep.params", "keys repeat")
    for i, param in enumerate(sw.params):
        k = f"sweep.params[{i}]"
        _check(bool(param.key) and not param.key.startswith("sweep."), f"{k}.key",
               "must name a config key outside sweep")
        if param.choices:
            _check(not (param.log or param.integer), f"{k}.choices", "choices take no log or integer")
        else:
            _check(param.low < param.high, f"{k}.high", "must be > low (or give choices)")
            _check(not param.log or param.low > 0, f"{k}.low", "must be > 0 on a log scale")


def _validate_sequences(cfg: Config) -> None:
    """Sequence features (``max_length``) and shared tables (``table``)."""
    sparse = {s.name: s for s in cfg.features.sparse}
    for i, sf in enumerate(cfg.features.sparse):
        k = f"features.sparse[{i}]"
        _check(sf.max_length >= 0, f"{k}.max_length", f"must be >= 0 (0: not a sequence), got {sf.max_length}")
        if sf.max_length:
            _check(sf.multi_hot, f"{k}.multi_hot", f"{sf.name} is a sequence (max_length {sf.max_length}): it is read "
                   "from a list column, set multi_hot: true")
            _check(sf.pooling == "sum", f"{k}.pooling", f"{sf.name} is a sequence: its cells hold one id each and "
                   "heads other than din sum them; pooling must be sum")
            _check(sf.ids == "hash", f"{k}.ids", f"{sf.name} is a sequence: managed ids are not supported for "
                   "sequences (ids: hash)")
            _check(sf.min_count == 0 and sf.holdout_share == 0.0, f"{k}.min_count",
                   f"{sf.name} is a sequence: default rows for new ids are not supported for sequences "
                   "(min_count and holdout_share 0)")
        if not sf.table:
            continue
        _check(sf.table in sparse and sf.table != sf.name, f"{k}.table",
               f"must name another sparse feature ({', '.join(n for n in sparse if n != sf.name)}), got {sf.table!r}")
        owner = sparse[sf.table]
        _check(not owner.table, f"{k}.table", f"{sf.table} shares the table of {owner.table}: name {owner.table}, "
               "the feature that owns the table")
        _check(owner.num_embeddings == sf.num_embeddings, f"{k}.num_embeddings",
               f"{sf.name} shares the table of {sf.table}, which has {owner.num_embeddings} rows; got "
               f"{sf.num_embeddings}")
        for who, f in ((sf.name, sf), (sf.table, owner)):
            _check(f.ids == "hash", f"{k}.table", f"{who} has ids: {f.ids}; a shared table holds hashed ids only")
            _check(f.min_count == 0 and f.holdout_share == 0.0, f"{k}.table",
                   f"{who} has a default row (min_count / holdout_share); a shared table has none")
    seqs = [s.name for s in cfg.features.sparse if s.max_length]
    _check(not (seqs and cfg.generator.feature), "generator.feature",
           f"the id generator reads one cell per feature; it does not combine with sequence features {seqs}")
    shared = {s.name for s in cfg.features.sparse if s.table}
    for i, t in enumerate(cfg.sharding.tables):
        _check(t.name not in shared, f"sharding.tables[{i}].name",
               f"{t.name} shares the table of {sparse[t.name].table if t.name in sparse else ''}: name that feature")


def _validate_generator(cfg: Config) -> None:
    g = cfg.generator
    if not g.feature:
        changed = [k for k in ("attributes", "hidden", "cold_weight", "warmup_lr", "mode", "train_ids")
                   if getattr(g, k) != getattr(GeneratorConfig(), k)]
        _check(not changed, "generator.feature", f"empty (no generator), but generator.{', generator.'.join(changed)} "
               "set: name the id feature whose new ids it generates rows for")
        return
    sparse = {s.name: s for s in cfg.features.sparse}
    names = ", ".join(sparse)
    _check(g.feature in sparse, "generator.feature", f"must name a sparse feature ({names}), got {g.feature!r}")
    sf = sparse[g.feature]
    _check(not sf.multi_hot, "generator.feature", f"{g.feature} is multi_hot: the generated row replaces the one id "
           "of a row, so the feature must be single-valued")
    _check(sf.min_count > 0 or sf.holdout_share > 0, "generator.feature",
           f"{g.feature} has no default row: the generated row replaces it for new ids; set "
           f"features.sparse.{g.feature}.min_count or .holdout_share > 0")
    _check(len(g.attributes) >= 1, "generator.attributes", "name at least one sparse feature that describes "
           f"{g.feature} (e.g. its advertiser or category)")
    for i, a in enumerate(g.attributes):
        _check(a in sparse, f"generator.attributes[{i}]", f"must name a sparse feature ({names}), got {a!r}")
        _check(a != g.feature, f"generator.attributes[{i}]", f"{a} is generator.feature itself: its row is what "
               "is generated")
    _check(len(set(g.attributes)) == len(g.attributes), "generator.attributes", "names repeat")
    _check(all(h >= 1 for h in g.hidden), "generator.hidden", "layer sizes must be >= 1")
    _check(0.0 <= g.cold_weight <= 1.0, "generator.cold_weight", "must be in [0, 1]")
    _check(g.warmup_lr > 0, "generator.warmup_lr", "must be > 0")
    if g.mode == "base_fixed":
        _check(bool(cfg.train.init_from), "train.init_from", "generator.mode base_fixed trains the generator "
               "alone on a trained model: name its checkpoint")
        _check(cfg.train.pretrain_epochs == 0, "train.pretrain_epochs", "generator.mode base_fixed trains no base "
               "model: must be 0")
    else:
        _check(g.train_ids == "new", "generator.train_ids", "'all' needs generator.mode base_fixed: in joint mode the "
               f"tables learn, and {g.feature}'s ids would never train their own rows")


# --------------------------------------------------------------------------------------
# building dataclasses from plain data
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    text = None
    if isinstance(value, _Plain):
        value, text = value.value, value.text
    if text is not None and tp in (str, LabelText):
        return text  # a text field takes unquoted YAML as written: [yes] is "yes", 1.0 is "1.0"
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        # "is" for booleans: 1 == True, but header: 1 is not header: true
        if not any(value is c if isinstance(c, bool) or isinstance(value, bool) else value == c for c in choices):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type in schema at {key}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {typing_cast(type, tp).__name__} fields, got {value!r}")
        return _build(typing_cast(type, tp), value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is LabelText:
        if isinstance(value, bool):
            return "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a label value (text, number or boolean), got {value!r}")
        return str(value)  # plain str: the config is dumped to YAML and JSON
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads 2026-12-01 as a date (a partition's name)
            return value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    raise TypeError(f"unsupported type {tp!r} in schema at {key}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading ``1e-3`` as a float. PyYAML follows YAML 1.1, where a
    float needs a dot (``1.0e-3``), so ``optim.dense_lr: 1e-3`` would be the string
    '1e-3'; YAML 1.2 and every other reader of configs take it as a number."""


class _Dumper(yaml.SafeDumper):
    """The safe dumper with the loader's float rule: text such as '1e-5' is quoted, so a
    dumped config reads back as it was."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X)
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


@dataclass(frozen=True)
class _Plain:
    """An unquoted YAML scalar that YAML 1.1 reads as a boolean or a number, with the text
    it was written as. The schema decides which it is: a bool, int or float field takes
    ``value``, a text field (str, a label value) ``text``, since ``positive_labels: [yes]``
    means the label "yes", not True, and ``task_key: 2024`` the column "2024"."""

    value: Any
    text: str

    def __str__(self) -> str:
        return self.text


class _TextLoader(_Loader):
    """``_Loader`` whose unquoted booleans, numbers and dates come as ``_Plain`` (value and text)."""


def _keep_text(construct):
    def build(loader: _TextLoader, node: yaml.ScalarNode) -> Any:
        try:
            value = construct(loader, node)
        except ValueError:  # a date that does not exist (2026-13-01): the text, which the key's check names
            value = node.value
        return _Plain(value, node.value) if node.style is None else value
    return build


# (a date too: synth.start_date: 2026-12-01 is the text, which YAML 1.1 reads as a date)
for _tag, _construct in (("bool", yaml.SafeLoader.construct_yaml_bool),
                         ("int", yaml.SafeLoader.construct_yaml_int),
                         ("float", yaml.SafeLoader.construct_yaml_float),
                         ("timestamp", yaml.SafeLoader.construct_yaml_timestamp)):
    _TextLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _keep_text(_construct))


def _yaml(text: str, keep_text: bool = False) -> Any:
    """``text`` as YAML; ``keep_text``: unquoted booleans and numbers as ``_Plain``, for
    ``_build`` (which takes ``value`` or ``text`` by the field's type)."""
    return yaml.load(text, Loader=_TextLoader if keep_text else _Loader)  # noqa: S506 (SafeLoader subclasses)


def _plain(value: Any) -> Any:
    """``value`` with every ``_Plain`` replaced by its YAML value."""
    if isinstance(value, _Plain):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar or list)."""
    parts, value = _parse_override(item)
    return parts, _plain(value)


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``parse_override`` with unquoted booleans and numbers as ``_Plain`` (for ``_build``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = _yaml(raw, keep_text=True) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def _apply_override(data: dict, parts: list[str], value: Any) -> str:
    """Set ``parts`` in ``data``. An item of a list of mappings is named by its ``name`` or
    its position, as ``flatten`` names it: ``features.sparse.item_id.min_count=3``. Returns
    the key as errors name it (``features.sparse[1].min_count``)."""
    node: Any = data
    key = ""
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            named = [j for j, x in enumerate(node)
                     if isinstance(x, dict) and x.get("name") is not None and str(x["name"]) == p]
            if named:
                node = node[named[0]]
                key += f"[{named[0]}]"
                continue
            if p.isdigit() and int(p) < len(node):
                node = node[int(p)]
                key += f"[{int(p)}]"
                continue
            names = [_plain(x.get("name")) for x in node if isinstance(x, dict)]
            raise ConfigError(f"{'.'.join(parts[:i])}: no item named {p!r} (items: {names}), cannot set "
                              f"{'.'.join(parts)}")
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, (dict, list)) or (isinstance(nxt, list) and not all(isinstance(x, dict) for x in nxt)):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {'.'.join(parts)}")
        node = nxt
        key = f"{key}.{p}" if key else p
    if isinstance(node, list):
        raise ConfigError(f"{'.'.join(parts)}: names an item of a list, not a key; set one of its keys")
    node[parts[-1]] = value
    return f"{key}.{parts[-1]}" if key else parts[-1]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML, safe loader) over the defaults, apply ``key=value`` overrides,
    check types and values. Raises ConfigError naming the key (and the file)."""
    data: dict = {}
    where = ""
    if path is not None:
        files: list[Path] = []
        data = _read_file(Path(path), files)
        where = f" (in {files[0]}" + (f", over {', '.join(map(str, files[1:]))})" if len(files) > 1 else ")")
    from_file = _keys(data)  # the keys the YAML file sets, to tell its errors from the overrides'
    applied: list[tuple[str, str]] = []  # (the key as errors name it, the override as typed)
    for item in overrides or []:
        parts, value = _parse_override(item)
        try:
            key = _apply_override(data, parts, value)
        except ConfigError as e:
            raise ConfigError(f"{e} (in the command-line override {item!r})") from None
        applied.append((key, item))
    try:
        cfg = _build(Config, data, "")
        validate(cfg)
    except ConfigError as e:
        culprit = _override_of(str(e).split(":", 1)[0], applied, from_file)
        raise ConfigError(f"{e} (in the command-line override {culprit!r})" if culprit else f"{e}{where}") from None
    return cfg


def _read_file(p: Path, chain: list[Path]) -> dict:
    """The config data of the YAML file ``p``: a file that sets ``base`` (a path, relative to
    the file) holds the values it changes over that file's (mappings merged key by key,
    anything else, lists too, replaced); ``chain`` gets every file read, ``p`` first.
    (A few lines rather than Hydra or OmegaConf: one key, and errors that name the file.)"""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}" + (f" (the base of {chain[-1]})" if chain else ""))
    if p.resolve() in [c.resolve() for c in chain]:
        raise ConfigError(f"{chain[-1]}: base: {p} is already in the chain of bases ({' -> '.join(map(str, chain))})")
    chain.append(p)
    try:
        loaded = _yaml(p.read_text(), keep_text=True)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    if "base" not in loaded:
        return loaded
    base = _plain(loaded.pop("base"))
    if not isinstance(base, str) or not base:
        raise ConfigError(f"base: must be the path of a config file (relative to {p.parent}), got {base!r} (in {p})")
    return _merged(_read_file(p.parent / base, chain), loaded)


def _merged(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merged(base[k], v) if k in base else v for k, v in over.items()}}
    return over


def _keys(data: Any, prefix: str = "") -> set[str]:
    """Every key and section of plain config data, named as errors name them
    (``features.sparse[0].min_count``)."""
    out = set()
    items = enumerate(data) if isinstance(data, list) else data.items() if isinstance(data, dict) else []
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(data, list) else f"{prefix}.{k}" if prefix else str(k)
        out.add(key)
        out |= _keys(v, key)
    return out


def _override_of(key: str, applied: list[tuple[str, str]], from_file: set[str]) -> str | None:
    """The command-line override an error at ``key`` comes from, if any (the last one that
    set it or a section around it; or that created the section ``key`` the file never named,
    e.g. a misspelt section)."""
    for set_key, item in reversed(applied):
        if key == set_key or key.startswith((set_key + ".", set_key + "[")):
            return item
        if key not in from_file and set_key.startswith((key + ".", key + "[")):
            return item
    return None


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with ``to_dict`` (e.g. from a checkpoint)."""
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}. Items of a list of dicts are keyed by their
    ``name`` (``features.sparse.user_id.num_embeddings``), else by position. (Tracking
    stores such as MLflow accept only letters, digits and ``_-. :/`` in keys.)"""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{x.get('name') or i}"))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False)
