"""``gmeta sweep``: hyperparameter search with Optuna over the config keys ``sweep.params``.

Each trial is one ``gmeta train`` (``sweep.nproc_per_trial`` processes) in its own output
directory, nested in MLflow under the sweep's run, scored by its best validation metric
(``train.val_every_steps`` / ``train.val_metric``: validation tasks only, never the test
tasks). The sweep reads each running trial's validations (``<output_dir>/validation.jsonl``,
written by rank 0) and reports its best so far at each validation of meta-training
(pretraining epochs not counted, so that trials with and without them compare at the same
point); Optuna's median pruner stops a trial that falls behind the earlier trials there
(its processes are ended). The study
lives in a SQLite file in the sweep directory, so a sweep that is stopped continues where
it was when run again with the same ``--out``. At the end the
best trial's configuration is written out as YAML, with the table of every trial.

    gmeta sweep --config configs/movielens.yaml --trials 30 --out runs/sweep/movielens
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from gmeta.config import Config, ConfigError, SweepParam, dump_yaml, load_config
from gmeta.tracking import make_tracker, resolve_tracking_uri

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a running trial's validation history is read


def suggest(trial, p: SweepParam) -> Any:
    if p.choices:
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.integer:
        return trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(p.key, p.low, p.high, log=p.log)


def _overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in params.items()]


def check_sweep(cfg: Config, config_path: str | Path | None, overrides: list[str]) -> str:
    """The metric to optimise; ConfigError naming the key when the sweep cannot run."""
    from gmeta.training.run import val_metric  # (run imports the model stack: only when a sweep runs)

    if not cfg.sweep.params:
        raise ConfigError("sweep.params: nothing to search (list config keys with low/high or choices)")
    if cfg.train.val_every_steps <= 0:
        raise ConfigError("train.val_every_steps: must be > 0 for a sweep (trials are scored on validation tasks)")
    for p in cfg.sweep.params:  # every key exists and takes the values of its range
        values: list = list(p.choices) or [p.low, p.high]
        for value in values:
            v = int(value) if p.integer and not p.choices else value
            try:
                load_config(config_path, [*overrides, f"{p.key}={v}"])
            except ConfigError as e:
                raise ConfigError(f"sweep.params ({p.key}): {e}") from None
    return val_metric(cfg)


def run_sweep(config_path: str | Path, overrides: list[str], out: str | Path, *, trials: int | None = None,
              tracking_uri: str = "") -> dict:
    """Run the sweep (see the module docstring); returns its summary."""
    import optuna

    from gmeta.metrics import HIGHER_IS_BETTER

    cfg = load_config(config_path, overrides)
    metric = check_sweep(cfg, config_path, overrides)
    sw = cfg.sweep
    total = trials or sw.trials
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{out / 'optuna.db'}"
    # pruned: below the median of earlier trials at the same validation of meta-training,
    # once sweep.prune_startup_trials trials have ended
    pruner = optuna.pruners.MedianPruner(n_startup_trials=sw.prune_startup_trials) if sw.prune \
        else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name="gmeta", storage=storage, load_if_exists=True,
                                direction="maximize" if HIGHER_IS_BETTER[metric] else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=sw.seed), pruner=pruner)
    # a continued study: a sampler seeded as the first one would draw the first trials' points
    # again (its random start-up draws restart from the seed); offset by the trials it holds
    study.sampler = optuna.samplers.TPESampler(seed=sw.seed + len(study.trials))
    uri = resolve_tracking_uri(cfg.tracking.uri, tracking_uri)
    parent = make_tracker(cfg.tracking.enabled, uri, cfg.tracking.experiment,
                          cfg.tracking.run_name or f"sweep-{out.name}")
    previous = _sigterm_raises()
    try:
        parent.log_params({"sweep.trials": total, "sweep.metric": metric, "sweep.config": str(config_path),
                           **{f"sweep.space.{p.key}": str(p.choices or f"[{p.low}, {p.high}]") for p in sw.params}})
        for t in study.trials:  # trials of an earlier sweep of this study that never ended
            if t.state == optuna.trial.TrialState.RUNNING:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        # trials that ran to an end; one a stopped sweep cut short (just marked failed) runs again
        done = len([t for t in study.trials
                    if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)])
        for _ in range(max(0, total - done)):
            _run_trial(study, cfg, config_path, overrides, out, metric, uri, parent.run_id)
        summary = _summarise(study, cfg, config_path, overrides, out, metric)
        if summary.get("best"):
            parent.log_metrics({f"best_{metric}": summary["best"]["value"]})
            parent.log_params({f"best.{k}": v for k, v in summary["best"]["params"].items()})
            parent.log_artifact(out / "best.yaml")
        parent.log_artifact(out / "trials.md")
    except BaseException:
        parent.finish(status="FAILED")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    parent.finish()
    return summary


def _sigterm_raises():
    """SIGTERM (``kill``, a scheduler's stop) raises SystemExit in the main thread, so a
    stopped sweep runs its cleanup: the running trial's processes, in a session of their own,
    are stopped and the sweep's MLflow run marked failed. Returns the handler it replaced
    (None off the main thread, where no handler can be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def _run_trial(study, cfg: Config, config_path, overrides: list[str], out: Path, metric: str, uri: str,
               parent_run_id: str) -> None:
    import optuna

    trial = study.ask()
    params = {p.key: suggest(trial, p) for p in cfg.sweep.params}
    run_dir = out / f"trial-{trial.number:03d}"
    trial_overrides = [*overrides, *_overrides(params), f"train.output_dir={run_dir}", "train.resume=none",
                       f"tracking.run_name=trial-{trial.number:03d}", f"tracking.parent_run_id={parent_run_id}"]
    try:
        load_config(config_path, trial_overrides)
    except ConfigError as e:  # a combination the schema refuses (e.g. meta_sgd with implicit fast weights)
        log.warning("trial %d: %s: not run", trial.number, e)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    if run_dir.exists():  # a trial interrupted by an earlier sweep of this study: start it afresh
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "gmeta.cli", "train", "--config", str(config_path), "--nproc-per-node",
           str(cfg.sweep.nproc_per_trial), "--tracking-uri", uri, *trial_overrides]
    log.info("trial %d: %s", trial.number, " ".join(_overrides(params)))
    history = run_dir / "validation.jsonl"
    with open(out / f"trial-{trial.number:03d}.log", "w") as f:
        # a session of its own: a pruned trial's processes (torchrun and its workers) end together
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, pruned, step, reported = _follow(proc, trial, history, metric)
        finally:  # the sweep stopped (Ctrl-C, SIGTERM, an error): its trial's processes stop with it
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
    if pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log.info("trial %d: pruned at step %s (validation %d of meta-training)", trial.number, step, reported)
        return
    meta_path = run_dir / "checkpoint" / "meta.json"
    if rc != 0 or not meta_path.is_file():
        log.warning("trial %d: training failed (exit %s); see %s", trial.number, rc,
                    out / f"trial-{trial.number:03d}.log")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    best = json.loads(meta_path.read_text())["validation"]["best"]
    study.tell(trial, float(best))
    log.info("trial %d: best %s %.4f", trial.number, metric, best)


def _follow(proc: subprocess.Popen, trial, history: Path, metric: str) -> tuple[int | None, bool, int, int]:
    """Report the trial's validations to Optuna as they are written, and prune it (its whole
    process group) when Optuna says so: (exit code, pruned, step of the last validation,
    validations of meta-training reported)."""
    from gmeta.metrics import HIGHER_IS_BETTER

    seen = reported = step = 0
    running: float | None = None
    higher = HIGHER_IS_BETTER[metric]
    while True:
        try:
            rc = proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            rc = None
        lines = history.read_text().splitlines() if history.is_file() else []
        for line in lines[seen:]:
            if not line.endswith("}"):
                break  # a line still being written
            v = json.loads(line)
            seen += 1
            step = v["step"]
            if v.get("stage") == "pretrain":  # not compared: an ERM model scored adapted is not yet meta-trained
                continue
            # the best so far, at the trial's n-th validation of meta-training: trials with and
            # without pretraining epochs are compared at the same point of their meta-training
            value = float(v[metric])
            running = value if running is None else (max(running, value) if higher else min(running, value))
            reported += 1
            trial.report(running, reported)
            if rc is None and trial.should_prune():
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                return None, True, step, reported
        if rc is not None:
            return rc, False, step, reported


def _summarise(study, cfg: Config, config_path, overrides: list[str], out: Path, metric: str) -> dict:
    import optuna

    rows = []
    keys = [p.key for p in cfg.sweep.params]
    lines = [f"| trial | state | {metric} | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for t in study.trials:
        value = "" if t.value is None else f"{t.value:.4f}"
        lines.append(f"| {t.number} | {t.state.name.lower()} | {value} | "
                     + " | ".join(str(t.params.get(k, "")) for k in keys) + " |")
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "params": t.params})
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    summary: dict = {"metric": metric, "trials": rows, "best": None}
    if complete:
        best = study.best_trial
        best_cfg = load_config(config_path, [*overrides, *_overrides(best.params)])
        (out / "best.yaml").write_text(
            f"# gmeta sweep: best of {len(complete)} complete trial(s) by validation {metric} = {best.value:.4f} "
            f"(trial {best.number})\n" + dump_yaml(best_cfg))
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params}
        lines.append(f"\nbest: trial {best.number}, {metric} {best.value:.4f}: " + " ".join(_overrides(best.params)))
    (out / "trials.md").write_text("\n".join(lines) + "\n")
    (out / "trials.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


