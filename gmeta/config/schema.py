"""The config schema: one dataclass per section, each field's type, default and meaning
(docs/configuration.md is generated from them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
    # false: the feature's table is looked up but its rows are not the head's input; only the
    # id generator reads them (generator.attributes), as the description of a new id. The
    # base model then learns nothing from the feature, and a new id's attributes reach the
    # model only through its generated row (a model with no generator keeps the table for one
    # trained on it later, generator.mode base_fixed). true: an input of the head.
    head: bool = True


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
    # Standard deviation of an ad's quality (its main effect on the logit, b_ad; the
    # attributes explain ad_attribute_share of its variance as of the latent's). The
    # interaction <u_user, a_ad> has a standard deviation of about 0.45 over the rows.
    ad_quality_scale: float = 0.3
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
    # With train.init_from the starting weights are validated at step 0 and compete too.
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
    # Which ids of the feature the generator's offset is added to: "new", those the default
    # row stands for (Meta-Embedding: a start for new ids alone); "all", every id, a known id
    # as its own row + offset (its row learns what the attributes do not say) and a new id as
    # the default row + offset, so that the attributes reach the model through the id's row on
    # every training row, not only on the few rows of new ids. "all" needs mode joint (a
    # base_fixed generator's base model scored its known ids without an offset).
    offset_ids: Literal["new", "all"] = "new"


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
