"""``gmeta`` command line: synth, prepare, train, plan, evaluate, predict.

Thin by design: each subcommand loads the config and calls one function. ``train`` with
``--nproc-per-node N > 1`` hands off to ``torch.distributed.run`` (torchrun), which starts N
processes that each run ``gmeta train`` again, now under torchrun.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from gmeta.config import ConfigError, load_config
from gmeta.storage import StorageError

log = logging.getLogger("gmeta")


def _setup_logging(verbose: bool = False) -> None:
    # torchrec, fbgemm and torch print ~100 lines per training: quiet unless --verbose (or
    # GMETA_VERBOSE=1, which torchrun's workers inherit); see gmeta.logs
    from gmeta.logs import setup_logging

    setup_logging(verbose or None)


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. meta.inner_lr=0.05")


_VERBOSE_HELP = ("show the output of torchrec's planner, fbgemm, torch and torchrun, quiet by default "
                 "(also GMETA_VERBOSE=1)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gmeta", description="Meta-learning for DLRM recommendation models.")
    ap.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic ads-CVR logs (row-level Parquet)",
                       description="Write synthetic ads-CVR logs with hidden per-task effects (with "
                                   "synth.days N: N daily partitions, OUT/dt=YYYY-MM-DD/).")
    _add_config(p)
    p.add_argument("--out", help="output directory (default: data.raw_dir)")

    p = sub.add_parser("prepare", help="raw row-level logs -> task shards + manifest.json",
                       description="Group rows by task, split support/query, hash ids, write task shards.")
    _add_config(p)
    p.add_argument("--input", help="raw input file or directory, read as data.source.format says "
                                   "(default: data.raw_dir)")
    p.add_argument("--out", help="shard directory (default: data.shards_dir)")
    p.add_argument("--partition", default="", help="write the input as this partition (e.g. a day, 2026-12-01) of "
                   "the partitioned data set --out, replacing only that partition; data.partitions selects "
                   "which partitions training reads")
    p.add_argument("--partition-dirs", default="", metavar="KEY",
                   help="prepare each KEY=VALUE directory of --input (Hive layout, e.g. dt=2026-12-01 as gmeta synth "
                        "writes days) as partition VALUE, in order; --new-only skips those the data set holds")
    p.add_argument("--new-only", action="store_true", help="with --partition-dirs: only the partitions not yet "
                   "prepared")

    p = sub.add_parser("train", help="meta-train (MAML) or train the ERM baseline",
                       description="Train on task shards; N processes via torchrun when N > 1.")
    _add_config(p)
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes (default: train.nproc_per_node)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: tracking.uri, "
                   "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--continue-from", default=None, metavar="CHECKPOINT",
                   help="train the model of this checkpoint further on this config's data (e.g. the next day's "
                   "partitions: data.partitions), its weights and optimizer states included "
                   "(train.continue_from)")
    p.add_argument("--resume", default=None, help="auto (newest checkpoint in train.output_dir, if any), none, "
                   "or a checkpoint path (default: train.resume)")
    p.add_argument("--nnodes", default="1", help="machines in the job (each runs this command with its "
                   "--node-rank; shards and train.output_dir on a filesystem all of them share), or MIN:MAX for an "
                   "elastic job: it goes on with at least MIN nodes after one is lost (from the last checkpoint, "
                   "with --max-restarts >= 1), and a node that comes back joins at the next restart")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0 .. nnodes-1 (elastic: unused, "
                   "the rendezvous numbers the nodes)")
    p.add_argument("--rdzv-endpoint", default="", help="host:port of the rendezvous (torchrun's c10d), reachable "
                   "from every node; required with --nnodes > 1. The node at that host holds the rendezvous: it "
                   "must outlive the others")
    p.add_argument("--rdzv-id", default="gmeta", help="job id, the same on every node")
    p.add_argument("--rdzv-conf", default="", help="torchrun's rendezvous settings, key=value,... (e.g. "
                   "last_call_timeout=5: how long a rendezvous that has MIN nodes waits for more, in seconds)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="with N > 1 processes: restarts of the whole job after a process fails (torchrun); "
                        "use with --resume auto to continue from the last checkpoint")
    p.add_argument("--allow-other-shards", action="store_true",
                   help="resume a checkpoint on shards other than those it was trained on (their manifest's content "
                        "hash differs): a warning instead of an error")

    p = sub.add_parser("sweep", help="hyperparameter search (Optuna) over sweep.params, scored on validation tasks",
                       description="Train one run per trial, score it on the validation tasks, prune trials that "
                                   "fall behind, write the best configuration as YAML.")
    _add_config(p)
    p.add_argument("--trials", type=int, default=None, help="trials in all (default: sweep.trials); a sweep "
                   "continued in the same --out counts the trials it already ran")
    p.add_argument("--out", default=None, help="sweep directory: the study, every trial's run, best.yaml, trials.md "
                   "(default: runs/sweep/<config name>)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: tracking.uri, "
                   "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")

    p = sub.add_parser("plan", help="the sharding plan for a cluster, with the planner's memory and cost estimates",
                       description="Run torchrec's planner for --world-size processes (--local-world-size per "
                                   "node) on --device, without a process group or a GPU: per table its sharding, "
                                   "per rank its table memory and estimated embedding compute and communication.")
    _add_config(p)
    p.add_argument("--world-size", type=int, required=True, help="processes in the job (nodes x processes per node)")
    p.add_argument("--local-world-size", type=int, default=None, help="processes per node (default: --world-size)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device of each process (default: cuda)")
    p.add_argument("--rows-per-step", type=int, default=None, help="rows each rank looks up per step (default: "
                   "meta.tasks_per_batch x the mean rows per task of the shards' manifest, when there is one)")
    p.add_argument("--json", default=None, help="also write the plan as JSON to this file")

    p = sub.add_parser("evaluate", help="cold-start evaluation of a checkpoint on held-out tasks",
                       description="Adapt on each held-out task's support set, score its query set; write "
                                   "eval_report.{json,md,html} and plots, and log them to the training run.")
    _add_config(p, required=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory written by gmeta train")
    src.add_argument("--run-id", help="MLflow run of a gmeta train (its tag gmeta.checkpoint)")
    src.add_argument("--next-day", nargs="+", metavar="CHECKPOINT",
                     help="next-day evaluation: each checkpoint (one per day, trained on data.partitions up to it) "
                          "scored on the tasks new on the partition after the last it trained on; writes "
                          "next_day.{json,md,png} to --out and a parent MLflow run with a child per day")
    p.add_argument("--baseline", default=None, help="checkpoint of an ERM model to compare against")
    p.add_argument("--generator", default=None,
                   help="warm-up protocol: checkpoint of a model with an id generator of the task-key feature "
                        "(generator.mode base_fixed on the base model), scored as one more row")
    p.add_argument("--shards", default=None, help="task shard directory (default: a data.shards_dir=... override, "
                   "else the shards the checkpoint was trained on; not --config's data.shards_dir)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps K (default: eval.inner_steps)")
    p.add_argument("--split", default=None, choices=["eval", "val"],
                   help="test tasks (eval) or validation tasks (val) (default: eval.split)")
    p.add_argument("--protocol", default=None, choices=["tasks", "warmup"],
                   help="tasks: adapt on each task's support, score its query; warmup: the warm-up protocol of item "
                        "cold start on shards of data.split.rule warmup (cold / a / a+b / a+b+c stages, "
                        "warmup_report.{json,md}) (default: eval.protocol)")
    p.add_argument("--out", default=None, help="report directory (default: <checkpoint>/../eval)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes, tables sharded (default: 1, unsharded)")
    p.add_argument("--allow-other-shards", action="store_true",
                   help="score shards other than those the checkpoint (and --baseline) was trained on (their "
                        "manifest's content hash differs): a warning instead of an error")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: the training run's)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")

    p = sub.add_parser("predict", help="batch prediction: adapt on each task's support set, score its query set",
                       description="Stream task shards, adapt per task, write query-row scores to Parquet parts; "
                                   "--resume continues an interrupted run without duplicate or missing rows.")
    p.add_argument("--checkpoint", required=True, action="append",
                   help="checkpoint directory written by gmeta train; with --input, repeat it to score several "
                        "models in one pass (columns score_0, score_1, ...)")
    p.add_argument("--shards", default=None, help="task shard directory (default: the checkpoint's data.shards_dir)")
    p.add_argument("--input", default=None,
                   help="row-level logs of new tasks instead of shards, in the config's data.source.format; each "
                        "row's role from its 'role' column (support / query / ''), else the config's data.split")
    p.add_argument("--split", default="eval", choices=["eval", "val", "train"], help="which tasks (default: eval)")
    p.add_argument("--out", required=True, help="output directory of Parquet parts")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps K (default: eval.inner_steps)")
    p.add_argument("--tasks-per-batch", type=int, default=None, help="default: eval.tasks_per_batch")
    p.add_argument("--rows-per-part", type=int, default=200_000, help="query rows per Parquet part")
    p.add_argument("--max-tasks", type=int, default=0, help="predict only the first N tasks (0: all)")
    p.add_argument("--resume", action="store_true", help="continue the predictions already in --out")
    p.add_argument("--allow-other-shards", action="store_true",
                   help="predict on shards other than those the checkpoint was trained on (their manifest's content "
                        "hash differs): a warning instead of an error")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="with --input: worker processes taking units of tasks from a shared queue (default: 1, "
                        "in this process)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="with --input: dead workers replaced (on each node) before their units go to the others "
                        "(default: 3)")
    p.add_argument("--shard-tables", action="store_true",
                   help="with --input and --nproc-per-node >= 2: shard the embedding tables among each node's "
                        "workers (tables too large for one process) instead of a copy in each")
    p.add_argument("--nnodes", type=int, default=1, help="with --input: machines taking part (default: 1)")
    p.add_argument("--node-rank", type=int, default=0,
                   help="with --input and --nnodes > 1: this machine's rank; node 0 reads the input and holds the "
                        "queue, the others only score (the same command on each, --out on storage all share)")
    p.add_argument("--rdzv-endpoint", default="",
                   help="with --nnodes > 1: host:port of node 0's queue (a c10d TCPStore), reachable by every node")
    for p in sub.choices.values():  # also after the subcommand; SUPPRESS keeps a --verbose given before it
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    return ap


def _explicit_shards(args: argparse.Namespace) -> tuple[str | None, str]:
    """The shards evaluate/predict were told to use, and by what: --shards, else a
    ``data.shards_dir=...`` override on the command line; (None, "") for the checkpoint's own.
    The data.shards_dir of a --config file does not count: it names the data the config is
    for, not necessarily the data this checkpoint was trained on."""
    if getattr(args, "shards", None):
        return args.shards, "--shards"
    from gmeta.config import parse_override

    found = None
    for item in getattr(args, "overrides", None) or []:
        parts, value = parse_override(item)
        if parts == ["data", "shards_dir"]:
            found = str(value)  # the last one wins, as in load_config
    return (found, "override data.shards_dir") if found else (None, "")


# A directory gmeta's launcher gives its workers (environment) for what they have to say:
# an expected error (``error-rank<R>.txt``) or a Ctrl-C's resume hint (``interrupted.txt``),
# printed once by the launcher instead of once per worker plus torchrun's failure report.
MESSAGES_ENV = "GMETA_LAUNCHER_MESSAGES"


_NO_CHECKPOINT = (" before a checkpoint of the interrupt was written; --resume auto goes on from the newest "
                  "checkpoint of train.output_dir, if any")


def _say(text: str, name: str) -> bool:
    """A worker of gmeta's launcher leaves ``text`` for it to print (True); otherwise, or
    if the launcher's directory is gone, the caller prints it (False)."""
    folder = os.environ.get(MESSAGES_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)
    return True


def _report_error(command: str, error: Exception) -> None:
    """An expected error (config, data, checkpoint): printed once, by the launcher when there
    is one (every rank usually fails alike; the lowest rank's is shown), else here."""
    text = f"gmeta {command}: {error}"
    if not _say(text, f"error-rank{int(os.environ.get('RANK', '0')):06d}.txt"):
        print(text, file=sys.stderr)


def resume_command(argv: list[str]) -> str:
    """The command line that goes on from the newest checkpoint: ``argv`` with
    ``--resume auto`` right after the subcommand (overrides may still be appended) in place
    of any --resume."""
    import shlex

    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            out.append(a)
    at = out.index("train") + 1 if "train" in out else len(out)
    return shlex.join(["gmeta", *out[:at], "--resume", "auto", *out[at:]])


class _ForwardInterrupt:
    """The launcher's Ctrl-C: torchrun is told to leave SIGINT alone
    (``--signals-to-handle``), so that its workers stop after a step and checkpoint
    rather than being killed. A SIGINT sent to the launcher alone is forwarded to them (a
    terminal's Ctrl-C reaches them directly too: they take two within ``REPEAT_S`` as one);
    another one ``REPEAT_S`` or more later aborts (KeyboardInterrupt: torchrun ends the
    workers, no checkpoint)."""

    def __init__(self) -> None:
        import signal

        from gmeta.training.step import StopRequest

        self.repeat_s = StopRequest.REPEAT_S
        self.at: float | None = None
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        import time

        import psutil

        now = time.monotonic()
        if self.at is not None and now - self.at >= self.repeat_s:
            raise KeyboardInterrupt
        if self.at is None:
            self.at = now
            for child in psutil.Process().children():  # torchrun's workers
                try:
                    child.send_signal(signum)
                except psutil.NoSuchProcess:
                    pass

    def restore(self) -> None:
        import signal

        signal.signal(signal.SIGINT, self.previous)


class _DropFailureLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("failed (exitcode", "Sending process"))


def _node_range(text: str) -> tuple[int, int] | None:
    """``--nnodes``: "N" -> (N, N), "MIN:MAX" -> (MIN, MAX); None if not well formed."""
    low, _, high = str(text).partition(":")
    try:
        a, b = int(low), int(high or low)
    except ValueError:
        return None
    return (a, b) if 1 <= a <= b else None


def _launch(nproc: int, argv: list[str], max_restarts: int = 0, nodes: tuple | None = None,
            command: str = "train") -> int:
    """Re-run this command in ``nproc`` processes through torch.distributed.run; on one
    machine (standalone), or as one of ``nodes = (nnodes, node_rank, endpoint, job_id,
    rdzv_conf)`` meeting at a c10d rendezvous (``nnodes`` "MIN:MAX": elastic). What the
    workers have to say (an error, a Ctrl-C's resume hint) is printed here, once."""
    import shutil
    import tempfile

    from torch.distributed.run import get_args_parser, run

    # The rendezvous TCP store shared with the workers is not restart-safe: after a
    # restart, gloo/NCCL can read the previous attempt's addresses (pytorch#135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # Each worker sets its own thread count (configure_threads); this only spares torchrun's
    # warning banner about OMP_NUM_THREADS.
    from gmeta.parallel.dist import threads_per_process

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(0, nproc)[0]))
    if nodes is None:
        where = ["--standalone"]
    else:
        nnodes, node_rank, endpoint, job, conf = nodes
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job}"]
        if ":" not in str(nnodes):  # (an elastic job's rendezvous numbers its nodes)
            where.append(f"--node-rank={node_rank}")
        if conf:
            where.append(f"--rdzv-conf={conf}")
    # SIGINT is left to _ForwardInterrupt (torchrun would kill the workers)
    args = get_args_parser().parse_args(
        [*where, f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
         "--signals-to-handle=SIGTERM,SIGHUP,SIGQUIT", "--module", "gmeta.cli", *argv])
    messages = tempfile.mkdtemp(prefix="gmeta-launch-")
    saved = os.environ.get(MESSAGES_ENV)
    os.environ[MESSAGES_ENV] = messages
    interrupt = _ForwardInterrupt()
    # torchrun's own lines per failed worker, and per worker it then ends: the worker's
    # message (or the failure report, printed below) says it
    failure_line = _DropFailureLine()
    elastic = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    elastic.addFilter(failure_line)
    try:
        try:
            run(args)
            failed: Exception | None = None
        except KeyboardInterrupt:  # a second Ctrl-C: torchrun has ended the workers
            print(f"gmeta {command}: interrupted again" + (_NO_CHECKPOINT if command == "train" else ""),
                  file=sys.stderr)
            return 130
        except Exception as e:  # torchrun raises ChildFailedError with the failing rank's log
            failed = e
        said = sorted(os.listdir(messages))
        if "interrupted.txt" in said:
            with open(os.path.join(messages, "interrupted.txt")) as f:
                print(f.read(), file=sys.stderr)
            return 130
        errors = [n for n in said if n.startswith("error-rank")]
        if errors:  # expected errors, told by the workers: the lowest rank's, once
            with open(os.path.join(messages, errors[0])) as f:
                print(f.read(), file=sys.stderr)
            return 2
        if interrupt.at is not None:
            print(f"gmeta {command}: interrupted" + (_NO_CHECKPOINT if command == "train" else ""), file=sys.stderr)
            return 130
        if failed is not None:
            log.error("%s", failed)
            return 1
        return 0
    finally:
        interrupt.restore()
        elastic.removeFilter(failure_line)
        if saved is None:
            os.environ.pop(MESSAGES_ENV, None)
        else:
            os.environ[MESSAGES_ENV] = saved
        shutil.rmtree(messages, ignore_errors=True)


def _plan(args: argparse.Namespace, cfg) -> int:
    import json
    from pathlib import Path

    from gmeta.parallel.sharding import format_plan, plan_report

    world, local = args.world_size, args.local_world_size or args.world_size
    if world < 1 or local < 1 or world % local:
        print(f"gmeta plan: --world-size ({world}) must be a positive multiple of --local-world-size ({local})",
              file=sys.stderr)
        return 2
    rows = args.rows_per_step
    manifest = Path(cfg.data.shards_dir) / "manifest.json"
    if rows is None and manifest.is_file():
        train = json.loads(manifest.read_text())["splits"]["train"]
        if train["tasks"]:
            per_task = (train["support_rows"] + train["query_rows"]) / train["tasks"]
            rows = max(1, round(cfg.meta.tasks_per_batch * per_task))
    try:
        report = plan_report(cfg, world, local, args.device, rows)
    except ConfigError as e:
        print(f"gmeta plan: config error: {e}", file=sys.stderr)
        return 2
    print(format_plan(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _prepare_dirs(cfg, raw: str, out: str, key: str, new_only: bool, partition: str) -> int:
    """gmeta prepare --partition-dirs KEY: each KEY=VALUE directory of ``raw`` as partition VALUE."""
    from gmeta.io import partitions
    from gmeta.io.errors import PrepareError
    from gmeta.io.prepare import prepare
    from gmeta.storage import location

    if partition:
        print("gmeta prepare: --partition and --partition-dirs: give one (a directory's partition is its VALUE)",
              file=sys.stderr)
        return 2
    root, src = location(out), location(raw)
    found = sorted((d.name.split("=", 1)[1], d) for d in src.iterdir() if d.is_dir() and d.name.startswith(key + "="))
    if not found:
        print(f"gmeta prepare: {src}: no {key}=VALUE directory (--partition-dirs {key})", file=sys.stderr)
        return 2
    have = set(partitions.names(root)) if new_only else set()
    todo = [(v, d) for v, d in found if v not in have]
    for value, d in todo:
        try:
            m = prepare(cfg, d, out, partition=value)
        except (PrepareError, StorageError) as e:
            print(f"gmeta prepare: {d}: {e}", file=sys.stderr)
            return 2
        print(f"prepare: {d} -> partition {value}: {m['input_rows']:,} rows, "
              + ", ".join(f"{k} {v['tasks']:,} tasks" for k, v in m["splits"].items()))
    if len(todo) < len(found):
        print(f"prepare: {len(found) - len(todo)} partition(s) already in {root} left as they are (--new-only)")
    if partitions.is_partitioned(root):
        print(partitions.format_index(json.loads((root / partitions.INDEX).read_text())))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        overrides = list(getattr(args, "overrides", None) or [])
        if getattr(args, "continue_from", None):
            overrides.append(f"train.continue_from={args.continue_from}")
        cfg = load_config(args.config, overrides) if getattr(args, "config", None) else None
    except ConfigError as e:
        print(f"gmeta {args.command}: config error: {e}", file=sys.stderr)
        return 2

    if args.command == "synth":
        assert cfg is not None  # --config is required (argparse)
        from gmeta.io.synth import day_line, generate

        out = args.out or cfg.data.raw_dir
        try:
            summary = generate(cfg, out)
        except ValueError as e:  # a config whose features the generator does not write
            print(f"gmeta synth: {e}", file=sys.stderr)
            return 2
        per_day = summary.get("per_day", [])
        days = f" in {len(per_day)} days, dt={per_day[0]['date']} to dt={per_day[-1]['date']}," if per_day else ""
        print(f"wrote {summary['rows']} rows of {summary['tasks']} tasks{days} to {out}")
        for entry in per_day:
            print(day_line(entry))
        return 0

    if args.command == "prepare":
        assert cfg is not None
        from gmeta.io.errors import PrepareError
        from gmeta.io.prepare import format_report, prepare

        out = args.out or cfg.data.shards_dir
        if args.partition_dirs:
            return _prepare_dirs(cfg, args.input or cfg.data.raw_dir, out, args.partition_dirs, args.new_only,
                                 args.partition)
        try:
            m = prepare(cfg, args.input or cfg.data.raw_dir, out, partition=args.partition)
        except (PrepareError, StorageError) as e:
            print(f"gmeta prepare: {e}", file=sys.stderr)
            return 2
        if not args.partition:
            print(format_report(m) + f"\n  -> {out}")
            return 0
        from gmeta.io import partitions
        from gmeta.storage import location

        root = location(out)
        index = json.loads((root / partitions.INDEX).read_text())
        print(format_report(m) + f"\n  -> {partitions.partition_dir(root, args.partition)}\n"
              + partitions.format_index(index))
        return 0

    if args.command == "train":
        assert cfg is not None
        nproc = args.nproc_per_node or cfg.train.nproc_per_node
        if nproc < 1:
            print("gmeta train: --nproc-per-node must be >= 1", file=sys.stderr)
            return 2
        from gmeta.parallel.dist import under_torchrun

        if args.max_restarts < 0:
            print("gmeta train: --max-restarts must be >= 0", file=sys.stderr)
            return 2
        if args.resume is not None:
            cfg.train.resume = args.resume
        nodes = _node_range(args.nnodes)
        if nodes is None:
            print(f"gmeta train: --nnodes {args.nnodes!r}: a number of machines >= 1, or MIN:MAX with "
                  "1 <= MIN <= MAX", file=sys.stderr)
            return 2
        low, high = nodes
        elastic = low < high
        if not elastic and not 0 <= args.node_rank < high:
            print(f"gmeta train: --node-rank must be in 0..{high - 1} and --nnodes >= 1", file=sys.stderr)
            return 2
        if high > 1 and not under_torchrun():
            if ":" not in args.rdzv_endpoint:
                print("gmeta train: --nnodes > 1 needs --rdzv-endpoint host:port (a machine every node reaches; "
                      "node 0's address, say)", file=sys.stderr)
                return 2
            if elastic and args.max_restarts < 1:
                print(f"gmeta train: --nnodes {args.nnodes} (elastic) needs --max-restarts >= 1: the job goes on "
                      "after a lost node by restarting from its last checkpoint", file=sys.stderr)
                return 2
            if elastic and cfg.train.resume == "none":  # a restart must continue, not start again
                argv = [*argv, "--resume", "auto"]
            return _launch(nproc, argv, args.max_restarts,
                           (args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id, args.rdzv_conf))
        if nproc > 1 and not under_torchrun():
            return _launch(nproc, argv, args.max_restarts)
        from gmeta.checkpoint import CheckpointError
        from gmeta.io.errors import PrepareError
        from gmeta.training.run import main as train_main
        from gmeta.training.step import NonFiniteLossError, TrainingInterrupted

        launched = bool(os.environ.get(MESSAGES_ENV))  # a worker of gmeta's own launcher
        main_rank = os.environ.get("RANK", "0") == "0"
        try:
            train_main(cfg, tracking_uri=args.tracking_uri, allow_other_shards=args.allow_other_shards)
        except (PrepareError, ConfigError, CheckpointError, NonFiniteLossError, StorageError) as e:
            _report_error("train", e)
            return 2
        except TrainingInterrupted as e:
            text = (f"gmeta train: interrupted after step {e.step}; checkpoint: {e.checkpoint}\n"
                    f"to resume: {resume_command(argv)}")
            if main_rank and not _say(text, "interrupted.txt"):
                print(text, file=sys.stderr)
            return 0 if launched else 130  # (non-zero would make torchrun report a failure, or restart)
        except KeyboardInterrupt:  # before the training loop, or a second Ctrl-C: nothing to resume from here
            if main_rank and not launched:
                print("gmeta train: interrupted" + _NO_CHECKPOINT, file=sys.stderr)
            return 130
        return 0

    if args.command == "plan":
        return _plan(args, cfg)

    if args.command == "sweep":
        from pathlib import Path

        from gmeta.training.sweep import run_sweep

        if args.trials is not None and args.trials < 1:
            print("gmeta sweep: --trials must be >= 1", file=sys.stderr)
            return 2
        out = args.out or str(Path("runs") / "sweep" / Path(args.config).stem)
        try:
            summary = run_sweep(args.config, args.overrides, out, trials=args.trials, tracking_uri=args.tracking_uri)
        except ConfigError as e:
            print(f"gmeta sweep: config error: {e}", file=sys.stderr)
            return 2
        print((Path(out) / "trials.md").read_text(), end="")
        if summary["best"] is None:
            print("gmeta sweep: no trial completed", file=sys.stderr)
            return 1
        print(f"best configuration: {Path(out) / 'best.yaml'}")
        return 0

    if args.command == "evaluate":
        from gmeta.checkpoint import CheckpointError
        from gmeta.evaluation.evaluate import run_evaluate
        from gmeta.evaluation.render import format_table
        from gmeta.io.errors import PrepareError
        from gmeta.parallel.dist import under_torchrun

        if args.nproc_per_node < 1:
            print("gmeta evaluate: --nproc-per-node must be >= 1", file=sys.stderr)
            return 2
        if args.nproc_per_node > 1 and not under_torchrun():
            return _launch(args.nproc_per_node, argv, command="evaluate")
        if args.next_day:
            from gmeta.evaluation.next_day import format_series, run_next_day

            if not args.out or args.nproc_per_node > 1 or args.baseline or args.generator or args.protocol \
                    or args.split:
                print("gmeta evaluate: --next-day needs --out, in one process, without --baseline, --generator, "
                      "--protocol or --split", file=sys.stderr)
                return 2
            try:
                shards, _ = _explicit_shards(args)
                series = run_next_day(args.next_day, out_dir=args.out, inner_steps=args.inner_steps,
                                      shards_dir=shards, tracking=not args.no_tracking,
                                      tracking_uri=args.tracking_uri)
            except (CheckpointError, PrepareError, ValueError, StorageError) as e:
                _report_error("evaluate", e)
                return 2
            print(format_series(series))
            return 0
        try:
            shards, why = _explicit_shards(args)
            result = run_evaluate(args.checkpoint, run_id=args.run_id or "", cfg_override=cfg,
                                  baseline=args.baseline, shards_dir=shards, shards_why=why,
                                  tracking=not args.no_tracking, tracking_uri=args.tracking_uri, out_dir=args.out,
                                  inner_steps=args.inner_steps, split=args.split,
                                  allow_other_shards=args.allow_other_shards, protocol=args.protocol,
                                  generator=args.generator)
        except (CheckpointError, PrepareError, ValueError, StorageError) as e:
            _report_error("evaluate", e)
            return 2
        if result is not None and result.get("protocol") == "warmup":
            from gmeta.evaluation.warmup import format_warmup

            print(format_warmup(result))
        elif result is not None:
            print(format_table(result))
        return 0

    if args.command == "predict":
        from gmeta.checkpoint import CheckpointError
        from gmeta.inference.predict import PredictError, run_predict
        from gmeta.io.errors import PrepareError

        if (args.rows_per_part < 1 or args.max_tasks < 0 or (args.tasks_per_batch or 1) < 1
                or args.nproc_per_node < 1 or args.max_restarts < 0):
            print("gmeta predict: --rows-per-part, --tasks-per-batch and --nproc-per-node must be >= 1, "
                  "--max-tasks and --max-restarts >= 0", file=sys.stderr)
            return 2
        try:
            shards, why = _explicit_shards(args)
            if args.input:
                if (shards or args.max_tasks or args.tasks_per_batch or args.split != "eval"
                        or args.allow_other_shards):
                    print("gmeta predict: --input reads raw rows; --shards, --split, --max-tasks, "
                          "--tasks-per-batch and --allow-other-shards are for task shards", file=sys.stderr)
                    return 2
                from gmeta.inference.predict_raw import run_predict_node, run_predict_raw

                if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes or (args.nnodes > 1
                                                                                 and not args.rdzv_endpoint):
                    print(f"gmeta predict: --node-rank must be in 0..{args.nnodes - 1}, --nnodes >= 1, and "
                          "--nnodes > 1 needs --rdzv-endpoint host:port", file=sys.stderr)
                    return 2
                if args.node_rank > 0:
                    return run_predict_node(args.rdzv_endpoint, args.node_rank, args.nproc_per_node, args.out,
                                            max_restarts=args.max_restarts)
                summary = run_predict_raw(args.checkpoint, args.input, args.out, inner_steps=args.inner_steps,
                                          resume=args.resume, progress=sys.stderr.isatty(),
                                          nproc=args.nproc_per_node, max_restarts=args.max_restarts,
                                          nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
                                          shard_tables=args.shard_tables)
            elif args.nproc_per_node != 1 or args.nnodes != 1:
                print("gmeta predict: --nproc-per-node and --nnodes are for --input; task shards are predicted in "
                      "one process", file=sys.stderr)
                return 2
            elif len(args.checkpoint) > 1:
                print("gmeta predict: several --checkpoint are scored in one pass with --input", file=sys.stderr)
                return 2
            else:
                summary = run_predict(args.checkpoint[0], args.out, shards_dir=shards, shards_why=why,
                                      split=args.split, inner_steps=args.inner_steps,
                                      tasks_per_batch=args.tasks_per_batch,
                                      rows_per_part=args.rows_per_part, resume=args.resume,
                                      max_tasks=args.max_tasks, progress=sys.stderr.isatty(),
                                      allow_other_shards=args.allow_other_shards)
        except (CheckpointError, PrepareError, PredictError, StorageError) as e:
            print(f"gmeta predict: {e}", file=sys.stderr)
            return 2
        print(f"{summary['rows']} query rows of {summary['tasks']} tasks in {summary['parts']} part(s) -> "
              f"{summary['out']} ({summary['rows_per_s']:.0f} rows/s)")
        for m in summary.get("models", []) if len(args.checkpoint) > 1 else []:
            print(f"  {', '.join(m.get('columns', [m['column']]))}: {m['checkpoint']} (K = {m['inner_steps']})")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
