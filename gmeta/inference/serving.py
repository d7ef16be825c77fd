"""Adapt-then-predict on raw rows, and the MLflow pyfunc model built on it.

``score_rows`` takes a pandas DataFrame of raw rows (the columns of the training logs) with
a ``role`` column: for each task (``features.task_key``), the "support" rows (labelled) are
what the model adapts on, the "query" rows are scored. Ids are hashed and values checked
exactly as ``gmeta prepare`` does, each task's rows are ordered by timestamp as in the
shards, and tasks are adapted and scored together in meta-batches as ``gmeta predict``
does, so the scores equal those of ``gmeta predict`` on the same tasks. A model of several
labels (``features.labels``) takes every label column (support rows labelled in each, query
rows' labels unknown) and gives a score per label, named as ``gmeta predict`` names them.

The trained model is logged to MLflow as a pyfunc (``mlflow.pyfunc.load_model(uri)
.predict(df)``) with the checkpoint as its artifact and gmeta's code inside.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from gmeta.config import Config
from gmeta.io.block import SplitArrays, TaskBlock
from gmeta.io.collate import collate_packed
from gmeta.io.errors import PrepareError
from gmeta.io.features import check_values, hash_batch, input_columns, shard_schema, stable_hash
from gmeta.io.sources import parse_number
from gmeta.io.split import split_tasks

ROLE = "role"
SUPPORT, QUERY = "support", "query"


def _times(df: pd.DataFrame, cfg: Config) -> np.ndarray:
    """Time of each row: features.timestamp, or the row order without one (as in prepare)."""
    f = cfg.features
    return df[f.timestamp].to_numpy().astype(np.int64) if f.timestamp else np.arange(len(df), dtype=np.int64)


def assign_roles(df: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """``df`` with a ``role`` column set by ``gmeta prepare``'s split rule (data.split):
    "support", "query", or "" for rows the rule leaves out (beyond max_support/max_query,
    or tasks it drops as too small). For scoring logged tasks as training/evaluation saw them."""
    f = cfg.features
    missing = [c for c in (f.task_key, f.timestamp) if c and c not in df.columns]
    if missing:
        raise PrepareError(f"input rows: missing column(s) {missing}")
    times = _times(df, cfg)
    order = np.lexsort((times, stable_hash(df[f.task_key].to_numpy(), "order")))
    keys = df[f.task_key].to_numpy()[order]
    ts = times[order]
    start = np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1]).astype(np.int64)
    counts = np.diff(np.concatenate([start, [len(keys)]]))
    s_idx, q_idx, _ = split_tasks(cfg, start, counts, ts, stable_hash(keys[start], "task"))
    role = np.full(len(df), "", dtype=object)
    for s, q in zip(s_idx, q_idx):
        if s is not None:
            role[order[s]] = SUPPORT
            role[order[q]] = QUERY
    return df.assign(**{ROLE: role})


def _side(t: pa.Table, sel: np.ndarray, task_of_row: np.ndarray, num_tasks: int, cfg: Config) -> SplitArrays:
    rows = np.zeros(num_tasks + 1, dtype=np.int64)
    np.add.at(rows, task_of_row + 1, 1)
    ids, id_offsets = {}, {}
    idx = pa.array(sel)
    for s in cfg.features.sparse:
        col = t.column(s.name).combine_chunks().take(idx)
        if s.multi_hot:
            off = col.offsets.to_numpy().astype(np.int64)
            id_offsets[s.name] = off - off[0]
            ids[s.name] = col.flatten().to_numpy().astype(np.int64)
        else:
            ids[s.name] = col.to_numpy().astype(np.int64)
    dense = np.asarray(t.column("dense").combine_chunks().take(idx).flatten().to_numpy(), dtype=np.float32)
    num_labels = len(cfg.features.label_names())
    if num_labels == 1:
        label = t.column("__label").to_numpy()[sel].astype(np.float32)
    else:  # [R, L]: a fixed-size list of L per row (label_array)
        label = np.asarray(t.column("__label").combine_chunks().take(idx).flatten().to_numpy(), dtype=np.float32)
        label = label.reshape(len(sel), num_labels)
    return SplitArrays(np.cumsum(rows), ids, id_offsets, dense.reshape(len(sel), len(cfg.features.dense)), label)


def _arrow_type(name: str) -> pa.DataType | None:
    try:
        return pa.type_for_alias(name)
    except ValueError:  # nested types (lists) have no alias: taken as pandas gives them
        return None


def _typed_table(frame: pd.DataFrame, column_types: dict[str, str] | None) -> pa.Table:
    """Rows as Arrow, each column cast to its type in the training input (the manifest's
    ``input_columns``). Ids hash by value and type, so an integer id column that pandas
    turned into floats (a gap in it) must hash as the integers prepare saw."""
    arrays = []
    for c in frame.columns:
        arr = pa.array(frame[c], from_pandas=True)  # NaN -> null (a missing value)
        want = _arrow_type((column_types or {}).get(c, ""))
        if want is not None and arr.type != want:
            try:
                arr = arr.cast(want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise PrepareError(f"input rows: column {c!r} cannot be read as {want} (its type in the "
                                   f"training data): {e}") from None
        arrays.append(arr)
    return pa.table(arrays, names=list(frame.columns))


_TEXT_TYPES = ("string", "large_string", "utf8", "large_utf8")


def _fill_query_labels(col: pd.Series, is_query: np.ndarray, cfg: Config, arrow_type: str | None) -> pd.Series:
    """``col`` with the missing labels of query rows set to a negative label (one the label
    check accepts) of the column's own kind: its type in the training data (``arrow_type``),
    else what its values are. A boolean column stays boolean, a numeric one numeric, a text
    one text (a value of another kind would not read as one Arrow column)."""
    missing = is_query & col.isna().to_numpy()
    if not missing.any():
        return col
    f = cfg.features
    neg = f.negative_labels[0] if f.negative_labels else None
    t = (arrow_type or "").strip()
    if t:
        kind = "bool" if t == "bool" else "text" if t in _TEXT_TYPES else "number"
    else:
        inferred = pd.api.types.infer_dtype(col, skipna=True)
        kind = "bool" if inferred == "boolean" else "text" if inferred in ("string", "bytes", "mixed") else "number"
    value: object
    if kind == "bool":
        value = neg == "true"  # a boolean label reads as "true" / "false"; unmapped, False is 0
    elif kind == "number":
        number = parse_number(neg) if neg is not None else 0.0
        value = neg if number is None else number  # (not a number: the label check names it)
    else:
        value = neg if neg is not None else "0"  # (unmapped text labels: the label check refuses them)
    numeric = kind == "number" and pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
    return (col if numeric and not isinstance(value, str) else col.astype(object)).where(~missing, value)


def rows_to_blocks(df: pd.DataFrame, cfg: Config, tasks_per_batch: int,
                   column_types: dict[str, str] | None = None, *,
                   id_hash: int) -> list[tuple[TaskBlock, np.ndarray]]:
    """Raw rows with roles -> TaskBlocks of at most ``tasks_per_batch`` tasks, each with
    the input positions of its query rows in query-block order. ``column_types``: the raw
    column types of the training data (``input_columns`` of the manifest); ``id_hash``: the
    id hash the model's tables were trained with (``id_hash_of`` its checkpoint metadata).
    Tasks without support rows (query rows only: a new task with no history) come last, in
    blocks of their own with no support rows; ``score_featurised`` scores them unadapted."""
    f = cfg.features
    cols = input_columns(cfg)
    missing = [c for c in cols + [ROLE] if c not in df.columns]
    if missing:
        raise PrepareError(f"input rows: missing column(s) {missing}; expected {cols + [ROLE]}")
    role = df[ROLE].astype(str).to_numpy()
    bad = ~np.isin(role, [SUPPORT, QUERY, ""])
    if bad.any():
        raise PrepareError(f"input rows: column {ROLE!r} must be 'support' or 'query' (or '' to ignore a row), "
                           f"got {role[bad][0]!r} at row {int(np.argmax(bad))}")
    frame = df[cols].copy()
    is_query = role == QUERY
    # query labels are unknown at serving time: NaN there is allowed (they are not used),
    # in every label column; a support row's labels are checked as prepare checks them
    if is_query.any():
        for name in f.label_names():
            frame[name] = _fill_query_labels(frame[name], is_query, cfg, (column_types or {}).get(name))
    keep = np.flatnonzero(role != "")
    table = _typed_table(frame.iloc[keep], column_types)
    labels = check_values(table, cfg, "input rows")
    hashed = hash_batch(table, cfg, None, "input rows", labels=labels, id_hash=id_hash)
    keys = df[f.task_key].to_numpy()[keep]
    ts = _times(df, cfg)[keep]
    uniq, first, task = np.unique(keys, return_index=True, return_inverse=True)
    q = is_query[keep]
    num_tasks = len(uniq)
    n_support = np.bincount(task[~q], minlength=num_tasks)
    n_query = np.bincount(task[q], minlength=num_tasks)
    if (n_query == 0).any():
        key = uniq[int(np.argmax(n_query == 0))]
        raise PrepareError(f"input rows: task {key!r} ({f.task_key}) has no {QUERY} rows")
    # tasks numbered in order of appearance, those with support rows first: a task without
    # any (a new campaign) is scored by the shared model, in meta-batches of its own
    appearance = np.argsort(first, kind="stable")
    cold = n_support[appearance] == 0
    order = np.concatenate([appearance[~cold], appearance[cold]])
    task = np.argsort(order)[task]
    task_keys = uniq[order]
    task_ids = stable_hash(task_keys, "task").astype(np.int64)
    n_warm = int((~cold).sum())
    bounds = [(lo, min(lo + tasks_per_batch, n_warm)) for lo in range(0, n_warm, tasks_per_batch)] + \
        [(lo, min(lo + tasks_per_batch, num_tasks)) for lo in range(n_warm, num_tasks, tasks_per_batch)]
    out = []
    for lo, hi in bounds:
        in_batch = (task >= lo) & (task < hi)
        sides = {}
        positions = None
        for name, mask in ((SUPPORT, ~q), (QUERY, q)):
            sel = np.flatnonzero(in_batch & mask)
            sel = sel[np.lexsort((ts[sel], task[sel]))]  # task-major, by time inside a task
            sides[name] = _side(hashed, sel, task[sel] - lo, hi - lo, cfg)
            if name == QUERY:
                positions = keep[sel]
        assert positions is not None  # set by the loop's query pass
        out.append((TaskBlock("input rows", task_ids[lo:hi], sides[SUPPORT], sides[QUERY]), positions))
    return out


def score_rows(model, cfg: Config, df: pd.DataFrame, inner_steps: int = -1,
               column_types: dict[str, str] | None = None, *, id_hash: int) -> pd.DataFrame:
    """Scores of the query rows of ``df`` after adapting each task on its support rows
    (``inner_steps``; -1: the evaluation default). One row per input row, same index, with
    the columns ``score_columns(cfg)``: ``score`` for a model of one label, ``score_<name>``
    per label of ``features.labels`` (the names ``gmeta predict`` writes; model.arch esmm:
    ``score_<click>`` is pCTR, ``score_<conversion>`` pCTCVR, as the labels are scored, and
    ``score_pcvr`` pCVR = pCTCVR / pCTR, the probability of a conversion given a click).
    NaN on support rows and ignored rows. ``column_types``, ``id_hash``: as in
    ``rows_to_blocks`` (the checkpoint's meta.json records them)."""
    scores = score_rows_models([(model, cfg)], df, inner_steps, column_types, id_hash=id_hash)[0]
    return scores_frame(scores, score_columns(cfg), df.index)


def score_columns(cfg: Config, prefix: str = "score") -> list[str]:
    """The columns of a model's scores: ``prefix`` for one label, ``<prefix>_<name>`` per
    label of ``features.labels`` (in their order), as ``gmeta predict`` names them; for
    model.arch esmm then ``<prefix>_pcvr``, pCVR = pCTCVR / pCTR (``head_outputs``)."""
    labels = cfg.features.label_names()
    cols = [prefix] if len(labels) == 1 else [f"{prefix}_{name}" for name in labels]
    if cfg.model.arch == "esmm":
        if "pcvr" in labels:
            raise ValueError(f"features.labels {labels}: a label named 'pcvr' would share its score column with "
                             "model.arch esmm's pCVR; rename the label column")
        cols.append(f"{prefix}_pcvr")
    return cols


def head_outputs(cfg: Config):
    """What serving returns of a head's outputs ``[Q, L]`` (``gmeta.scoring.OutputsFn``),
    one value per ``score_columns``: None (``Head.predict``, a probability or value per
    label) but for model.arch esmm, whose (pCTR, pCTCVR) are followed by pCVR =
    pCTCVR / pCTR, computed by ``ESMMHead.pcvr`` from the logits (in log space: exact where
    the ratio of two rounded probabilities would not be, for a tiny pCTR)."""
    if cfg.model.arch != "esmm":
        return None
    import torch

    def esmm(head, out: torch.Tensor) -> torch.Tensor:
        return torch.cat([head.predict(out), head.pcvr(out).unsqueeze(-1)], dim=-1)

    return esmm


def put_scores(scores: np.ndarray, model: int, positions: np.ndarray, preds: np.ndarray) -> None:
    """``preds`` ``[Q]`` or ``[Q, W]`` of model ``model`` into ``scores`` (``score_array``) at
    the rows ``positions``; a model of fewer columns than the widest leaves the rest NaN."""
    if scores.ndim == 2:
        scores[model, positions] = preds
    else:
        preds = preds.reshape(len(positions), -1)
        scores[model, positions, :preds.shape[1]] = preds


def scores_frame(scores: np.ndarray, columns: list[str], index) -> pd.DataFrame:
    """Scores ``[rows]`` or ``[rows, L]`` as a DataFrame of the ``columns`` (``score_columns``)."""
    scores = scores.reshape(len(scores), -1)[:, :len(columns)]  # (a narrower model's: NaN beyond its own)
    if scores.shape[1] != len(columns):
        raise ValueError(f"{scores.shape[1]} score(s) per row for the columns {columns}")
    return pd.DataFrame({c: scores[:, i] for i, c in enumerate(columns)}, index=index)


def featurise_rows(df: pd.DataFrame, cfg: Config, column_types: dict[str, str] | None = None, *,
                   id_hash: int) -> list:
    """Raw rows with roles -> [(batch, input positions of its query rows)]: checked, hashed
    (``id_hash``, as in ``rows_to_blocks``) and collated into meta-batches of
    ``cfg.eval.tasks_per_batch`` tasks, ready for any model of these features and id hash
    (``score_featurised``)."""
    schema = shard_schema(cfg, has_true_prob=False)
    return [(collate_packed([(block, np.arange(block.num_tasks))], schema, cfg.meta.size_buckets).unpack(), positions)
            for block, positions in rows_to_blocks(df, cfg, cfg.eval.tasks_per_batch, column_types, id_hash=id_hash)]


def score_featurised(models: Sequence[tuple[object, Config]], featurised: list, num_rows: int,
                     inner_steps: int | None = -1) -> np.ndarray:
    """Every model adapts on and scores each batch of ``featurise_rows``: [models, rows],
    or [models, rows, L] for the L labels of ``features.labels`` (the models read the rows
    alike, so have the same labels); NaN where a row is not a query row; tasks without
    support rows get the unadapted model's scores. One model over all the batches, then
    the next: its tables and weights stay in cache (model by model within each batch was slower)."""
    from gmeta.scoring import inner_steps_for, predict_query

    scores = score_array(models, num_rows)
    for i, (model, model_cfg) in enumerate(models):
        steps = inner_steps_for(model_cfg, inner_steps)
        outputs = head_outputs(model_cfg)
        for batch, positions in featurised:
            put_scores(scores, i, positions, predict_query(model, model_cfg, batch, steps_for_batch(batch, steps),
                                                           outputs))
    return scores


def score_array(models: Sequence[tuple[object, Config]], num_rows: int) -> np.ndarray:
    """NaN scores of ``models`` for ``num_rows`` rows: [models, rows] when each model has
    one score column, else [models, rows, W], W the most ``score_columns`` of a model (the
    labels of ``features.labels``, and esmm's pCVR)."""
    labels = models[0][1].features.label_names()
    for _, other in models[1:]:
        if other.features.label_names() != labels:
            raise ValueError(f"models scored together have features.labels {labels} and "
                             f"{other.features.label_names()}: score them in separate runs")
    width = max(len(score_columns(c)) for _, c in models)
    return np.full((len(models), num_rows) + ((width,) if width > 1 else ()), np.nan)


def steps_for_batch(batch, steps: int) -> int:
    """The inner steps a batch of ``featurise_rows`` is adapted with: ``steps``, or 0 for a
    batch of tasks without support rows, which the shared model scores as it is (an inner
    step on no rows changes nothing, and is not run)."""
    return steps if batch.num_support else 0


def score_rows_models(models: Sequence[tuple[object, Config]], df: pd.DataFrame, inner_steps: int | None = -1,
                      column_types: dict[str, str] | None = None, *, id_hash: int) -> np.ndarray:
    """``score_rows`` for several models of the same features and id hash at once: the rows
    are checked, hashed and batched once (by the first model's config), then every model
    adapts and scores each batch. [models, rows] (or [models, rows, L], see
    ``score_featurised``); NaN where a row is not a query row."""
    return score_featurised(models, featurise_rows(df, models[0][1], column_types, id_hash=id_hash), len(df),
                            inner_steps)


def _example_column(arrow_type: str, n: int):
    """n example values of a raw column of the given Arrow type (as the manifest records it)."""
    t = arrow_type.strip()
    if t.startswith(("list<", "large_list<")):
        item = t[t.index("<") + 1: -1].split(":")[-1].strip()
        return [list(_example_column(item, 2)) for _ in range(n)]
    if t in ("string", "large_string", "utf8"):
        return [f"v{i}" for i in range(n)]
    if t.startswith("timestamp"):
        return pd.date_range("2024-01-01", periods=n, freq="h")
    if t.startswith(("double", "float", "halffloat")):
        return np.linspace(0.0, 1.0, n)
    return np.arange(n, dtype=np.int64)


def example_labels(cfg: Config, arrow_type: str | None, n: int) -> np.ndarray:
    """Labels of ``example_rows`` (one label column) as the raw data holds them: a negative
    then a positive support label in the data's own encoding (``features.negative_labels`` /
    ``positive_labels``: -1/+1, yes/no ...; else 0/1) for the label column's raw type
    (``arrow_type``), then unknown (missing) query labels."""
    f = cfg.features
    t = (arrow_type or "").strip()
    zero_one = np.array([0.0, 1.0] + [np.nan] * (n - 2))
    if not f.positive_labels or t == "bool":  # (0/1 read as a boolean column: false/true)
        return zero_one
    neg, pos = f.negative_labels[0], f.positive_labels[0]
    nums = [parse_number(neg), parse_number(pos)]
    text_type = t in ("string", "large_string", "utf8", "large_utf8")
    if not text_type and None not in nums:
        return np.array(nums + [np.nan] * (n - 2), dtype=np.float64)
    return np.array([neg, pos] + [None] * (n - 2), dtype=object)


def example_rows(cfg: Config, column_types: dict[str, str] | None = None, n: int = 4) -> pd.DataFrame:
    """Input rows of one task (2 support, the rest query) with the raw column types of the
    training data (``column_types``: ``input_columns`` of the manifest), for the model's signature."""
    f = cfg.features
    types = column_types or {}
    data: dict = {}
    for col in input_columns(cfg):
        multi = any(s.name == col and s.multi_hot for s in f.sparse)
        data[col] = _example_column(types.get(col, "list<int64>" if multi else "int64"), n)
    data[f.task_key] = [data[f.task_key][0]] * n
    for name in f.label_names():  # every label column, each of its own raw type
        data[name] = example_labels(cfg, types.get(name), n)
    for d in f.dense:
        data[d] = np.zeros(n)
    data[ROLE] = [SUPPORT, SUPPORT] + [QUERY] * (n - 2)
    return pd.DataFrame(data)
