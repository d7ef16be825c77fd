"""What a config's values must satisfy together (``validate``), each error naming its key."""

from __future__ import annotations

import dataclasses
import datetime
import math
import re

from gmeta.config.schema import Config, ConfigError, FeaturesConfig, GeneratorConfig

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
    _validate_head_features(cfg)
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
    _check(s.ad_quality_scale > 0.0, "synth.ad_quality_scale", "must be > 0")
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


def _validate_head_features(cfg: Config) -> None:
    """features.sparse[].head false: a feature only the id generator reads."""
    sparse, g = cfg.features.sparse, cfg.generator
    for i, sf in enumerate(sparse):
        if sf.head:
            continue
        key = f"features.sparse[{i}].head"
        # (with no generator: the base model a generator is trained on later, generator.mode
        # base_fixed, which needs the same tables)
        _check(not g.feature or sf.name in g.attributes, key,
               f"false: {sf.name} would be read by nothing; a feature no head reads is an input of the id "
               "generator: list it in generator.attributes (or set head: true)")
        _check(not sf.max_length, key, f"false: {sf.name} is a sequence; only single or multi-hot features can be "
               "the generator's alone")
        _check(sf.name not in cfg.meta.adapt_features, key,
               f"false: {sf.name} is in meta.adapt_features, but no head reads its rows")
        _check(not any(o.table == sf.name for o in sparse), key,
               f"false: another feature shares {sf.name}'s table (features.sparse[].table)")
    _check(any(sf.head for sf in sparse) or not sparse, "features.sparse",
           "every feature has head: false; the head needs at least one")


def _validate_generator(cfg: Config) -> None:
    g = cfg.generator
    if not g.feature:
        changed = [k for k in ("attributes", "hidden", "cold_weight", "warmup_lr", "mode", "train_ids",
                                   "offset_ids")
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
        _check(g.offset_ids == "new", "generator.offset_ids", "'all' needs generator.mode joint: the base model "
               f"of a base_fixed generator learned {g.feature}'s known rows without an offset, which would move "
               "every known id's scores")
    else:
        _check(g.train_ids == "new", "generator.train_ids", "'all' needs generator.mode base_fixed: in joint mode the "
               f"tables learn, and {g.feature}'s ids would never train their own rows")


# --------------------------------------------------------------------------------------
# building dataclasses from plain data
# --------------------------------------------------------------------------------------
