"""The support/query split rule of a task (``data.split``), and why a task or row is left out."""

from __future__ import annotations

import numpy as np

from gmeta.config import Config
from gmeta.io.features import salted_hash


def _tie_order(cfg: Config, task_start: np.ndarray, counts: np.ndarray, ts: np.ndarray,
               task_hash: np.ndarray) -> np.ndarray | None:
    """data.split.tie_break "shuffle": a permutation of the task-sorted rows that orders the
    rows of equal time within a task in a seeded order, a function of (seed, task, time,
    position among the tied rows), so that it does not depend on which other rows were
    read together. None for the other rules (the rows stay in input order within a tie)."""
    if cfg.data.split.tie_break != "shuffle" or not len(ts):
        return None
    task = np.repeat(np.arange(len(counts)), counts)
    new_run = np.ones(len(ts), dtype=bool)
    new_run[1:] = (task[1:] != task[:-1]) | (ts[1:] != ts[:-1])
    run_start = np.flatnonzero(new_run)
    pos = np.arange(len(ts)) - run_start[np.cumsum(new_run) - 1]
    with np.errstate(over="ignore"):
        mix = task_hash[task].astype(np.uint64) ^ (ts.astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        key = salted_hash(salted_hash(mix, f"tie{cfg.data.split.seed}") ^ pos.astype(np.uint64), "tie")
    return np.lexsort((key, ts, task))


def chunk_length(cfg: Config) -> int:
    """Rows one task holds under data.split (what data.split.long_train_tasks "chunk" cuts
    a longer training task to)."""
    sp = cfg.data.split
    return sp.max_task_rows or sp.max_support + sp.max_query


def chunk_tasks(cfg: Config, task_start: np.ndarray, counts: np.ndarray, task_hash: np.ndarray,
                chunked: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut each task marked in ``chunked`` that has more than chunk_length(cfg) rows into the
    fewest consecutive runs of at most that many rows, of nearly equal sizes (so each has
    more than half of it: none too short to keep). Returns the new (task_start, counts,
    task_hash, source task index); a chunk past the first gets a hash of (task, chunk)."""
    size = chunk_length(cfg)
    pieces = np.where(chunked & (counts > size), -(-counts // size), 1)
    source = np.repeat(np.arange(len(counts)), pieces)
    part = np.arange(len(source)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # chunk index in its task
    n, k = counts[source], pieces[source]
    # chunk j of a task of n rows in k chunks: rows [floor(j n / k), floor((j + 1) n / k))
    lo, hi = part * n // k, (part + 1) * n // k
    new_hash = task_hash[source].copy()
    later = part > 0
    new_hash[later] = salted_hash(task_hash[source][later] ^ part[later].astype(np.uint64), "chunk")
    return task_start[source] + lo, hi - lo, new_hash, source


def warmup_splits(cfg: Config, counts: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """data.split.rule "warmup": the split of each id (task) from its row count and its
    key's uniform draw (``task_uniform``): "train" for more than warmup_train_rows rows,
    else "val" when the draw is below val_fraction, else "eval". Too cold an id is still
    "val" or "eval" here: ``split_tasks`` leaves it out (too_few_warmup_rows)."""
    sp = cfg.data.split
    return np.where(counts > sp.warmup_train_rows, "train", np.where(uniform < sp.val_fraction, "val", "eval"))


def split_tasks(cfg: Config, task_start: np.ndarray, counts: np.ndarray, ts: np.ndarray,
                task_hash: np.ndarray, held_out: np.ndarray | None = None
                ) -> tuple[list[np.ndarray | None], list[np.ndarray | None], dict[str, dict[str, int]]]:
    """Per task, support and query row indices (into the task-sorted table); None for a
    dropped task. Also {"tasks": dropped tasks by reason, "rows": rows left out by reason}.

    The ratio rule draws each task's split from (seed, task), so the result does not depend
    on which other tasks were prepared together. The time rule puts the earliest rows in
    the support, rows of equal time ordered by data.split.tie_break. The warmup rule splits
    a training task (``held_out`` False) by the time rule, and gives an evaluation id
    (``held_out`` True) its first 3 * warmup_rows rows as support (warm-up sets a, b, c, in
    time order) and every later row as query, whatever max_support and max_query say."""
    sp = cfg.data.split
    support_idx: list[np.ndarray | None] = []
    query_idx: list[np.ndarray | None] = []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    rows_out = dict.fromkeys(ROW_DROP_REASONS, 0)
    perm = _tie_order(cfg, task_start, counts, ts, task_hash)

    def drop(reason: str, n: int) -> None:
        dropped[reason] += 1
        rows_out[reason] += n
        support_idx.append(None)
        query_idx.append(None)

    if sp.rule == "warmup" and held_out is None:
        raise ValueError("data.split.rule warmup: split_tasks needs which tasks are held out (warmup_splits)")
    warm = 3 * sp.warmup_rows
    for i, (start, n, th) in enumerate(zip(task_start.tolist(), counts.tolist(), task_hash.tolist())):
        if sp.rule == "warmup" and held_out is not None and held_out[i]:
            if n < warm + 1:
                drop("too_few_warmup_rows", n)
                continue
            rows = np.arange(start, start + n) if perm is None else perm[start: start + n]
            support_idx.append(rows[:warm])
            query_idx.append(rows[warm:])
            continue
        too = "too_few_rows" if n < sp.min_task_rows else "too_many_rows" if 0 < sp.max_task_rows < n else ""
        if too:
            drop(too, n)
            continue
        rows = np.arange(start, start + n) if perm is None else perm[start: start + n]
        n_s = n - sp.query_size if sp.query_size else int(round(n * sp.support_ratio))
        n_s = min(max(n_s, 0), n)
        if sp.rule in ("time", "warmup"):
            # "strict": support strictly earlier than query, the boundary moved before any tie
            # (with a fixed query size ties keep the input order: the query must have
            # query_size rows). Otherwise ties are ordered by tie_break and cut anywhere.
            while sp.tie_break == "strict" and not sp.query_size and 0 < n_s < n \
                    and ts[start + n_s - 1] == ts[start + n_s]:
                n_s -= 1
            s_rows, q_rows = rows[:n_s], rows[n_s:]
            s_rows = s_rows[-sp.max_support:]  # the most recent rows before the boundary
        else:
            shuffled = np.random.default_rng([sp.seed, th]).permutation(rows)
            s_rows, q_rows = np.sort(shuffled[:n_s])[: sp.max_support], np.sort(shuffled[n_s:])
        q_rows = q_rows[: sp.max_query]
        if len(s_rows) < sp.min_support:
            drop("support_too_small", n)
            continue
        if len(q_rows) < sp.min_query:
            drop("query_too_small", n)
            continue
        support_idx.append(s_rows)
        query_idx.append(q_rows)
        rows_out["support_over_max"] += n_s - len(s_rows)
        rows_out["query_over_max"] += (n - n_s) - len(q_rows)
    return support_idx, query_idx, {"tasks": dropped, "rows": rows_out}


DROP_REASONS = ("too_few_rows", "too_many_rows", "support_too_small", "query_too_small", "too_few_warmup_rows")
# rows not written: all rows of a dropped task (by the task's reason), and rows of a kept
# task beyond data.split.max_support (the earliest support rows) or max_query (the latest)
ROW_DROP_REASONS = DROP_REASONS + ("support_over_max", "query_over_max")
