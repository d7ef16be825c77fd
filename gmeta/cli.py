"""``gmeta`` command line: synth, prepare, train, evaluate.

Thin by design: each subcommand loads the config and calls one function. ``train`` with
``--nproc-per-node N > 1`` hands off to ``torch.distributed.run`` (torchrun), which starts N
processes that each run ``gmeta train`` again, now under torchrun.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from gmeta.config import ConfigError, load_config

log = logging.getLogger("gmeta")


def _setup_logging() -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    # torchrec and fbgemm log plenty at INFO on the root logger: keep the root at WARNING.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {prefix}%(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("gmeta").setLevel(logging.INFO)


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. meta.inner_lr=0.05")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gmeta", description="Meta-learning for DLRM recommendation models.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic ads-CVR logs (row-level Parquet)",
                       description="Write synthetic ads-CVR logs with hidden per-task effects.")
    _add_config(p)
    p.add_argument("--out", help="output directory (default: data.raw_dir)")

    p = sub.add_parser("prepare", help="raw row-level logs -> task shards + manifest.json",
                       description="Group rows by task, split support/query, hash ids, write task shards.")
    _add_config(p)
    p.add_argument("--input", help="raw Parquet/CSV file or directory (default: data.raw_dir)")
    p.add_argument("--out", help="shard directory (default: data.shards_dir)")

    p = sub.add_parser("train", help="meta-train (MAML) or train the ERM baseline",
                       description="Train on task shards; N processes via torchrun when N > 1.")
    _add_config(p)
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes (default: train.nproc_per_node)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: tracking.uri, "
                   "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")

    p = sub.add_parser("evaluate", help="cold-start evaluation of a checkpoint on held-out tasks",
                       description="Adapt on each held-out task's support set, score its query set.")
    _add_config(p, required=False)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by gmeta train")
    p.add_argument("--baseline", default=None, help="checkpoint of an ERM model to compare against")
    p.add_argument("--shards", default=None, help="task shard directory (default: data.shards_dir)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: the training run's)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return ap


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _launch(nproc: int, argv: list[str]) -> int:
    """Re-run this command in ``nproc`` processes through torch.distributed.run."""
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "gmeta.cli", *argv])
    try:
        run(args)
    except Exception as e:  # torchrun raises ChildFailedError with the failing rank's log
        log.error("%s", e)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        cfg = load_config(args.config, args.overrides) if args.config else None
    except ConfigError as e:
        print(f"gmeta {args.command}: config error: {e}", file=sys.stderr)
        return 2

    if args.command == "synth":
        from gmeta.synth import generate

        out = args.out or cfg.data.raw_dir
        summary = generate(cfg, out)
        print(f"wrote {summary['rows']} rows of {summary['tasks']} tasks to {out}")
        return 0

    if args.command == "prepare":
        from gmeta.io.prepare import PrepareError, prepare

        try:
            m = prepare(cfg, args.input or cfg.data.raw_dir, args.out or cfg.data.shards_dir)
        except PrepareError as e:
            print(f"gmeta prepare: {e}", file=sys.stderr)
            return 2
        print(f"train: {m['splits']['train']['tasks']} tasks, eval: {m['splits']['eval']['tasks']} tasks, "
              f"dropped: {m['dropped_tasks']} -> {args.out or cfg.data.shards_dir}")
        return 0

    if args.command == "train":
        nproc = args.nproc_per_node or cfg.train.nproc_per_node
        if nproc < 1:
            print("gmeta train: --nproc-per-node must be >= 1", file=sys.stderr)
            return 2
        if nproc > 1 and not _under_torchrun():
            return _launch(nproc, argv)
        from gmeta.io.prepare import PrepareError
        from gmeta.train import main as train_main

        try:
            train_main(cfg, tracking_uri=args.tracking_uri)
        except (PrepareError, ConfigError) as e:
            print(f"gmeta train: {e}", file=sys.stderr)
            return 2
        return 0

    if args.command == "evaluate":
        from gmeta.checkpoint import CheckpointError
        from gmeta.evaluate import format_table, run_evaluate
        from gmeta.io.prepare import PrepareError

        try:
            result = run_evaluate(args.checkpoint, cfg_override=cfg, baseline=args.baseline, shards_dir=args.shards,
                                  tracking=not args.no_tracking, tracking_uri=args.tracking_uri)
        except (CheckpointError, PrepareError) as e:
            print(f"gmeta evaluate: {e}", file=sys.stderr)
            return 2
        print(format_table(result))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
