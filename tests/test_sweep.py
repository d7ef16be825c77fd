"""gmeta sweep end to end on the debug config: Optuna trials as nested MLflow runs in a real
SQLite store, scored on validation tasks, the best configuration written as YAML."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
import yaml

from gmeta.cli import main as cli_main
from gmeta.config import load_config
from tests.conftest import DEBUG_CONFIG


@pytest.fixture(scope="module")
def val_shards(debug_val_shards) -> Path:
    return debug_val_shards


def _sweep_config(tmp_path: Path) -> Path:
    p = tmp_path / "sweep.yaml"
    text = DEBUG_CONFIG.read_text() + """
sweep:
  trials: 2
  seed: 1
  params:
    - {key: meta.inner_lr, low: 0.01, high: 0.5, log: true}
    - {key: meta.erm_weight, choices: ["0", "1.0"]}
"""
    p.write_text(text)
    return p


def test_sweep_runs_trials_as_nested_runs_and_writes_the_best_config(val_shards, tmp_path, capsys):
    cfg_path = _sweep_config(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "sweep"
    common = [f"data.shards_dir={val_shards}", "data.split.val_fraction=0.15", "train.max_steps=8",
              "train.val_every_steps=4", "train.val_max_tasks=32", "train.eval_at_end=false",
              "tracking.log_model=false", "tracking.system_metrics_s=0", "train.nproc_per_node=1"]
    rc = cli_main(["sweep", "--config", str(cfg_path), "--out", str(out), "--tracking-uri", uri, *common])
    assert rc == 0
    summary = json.loads((out / "trials.json").read_text())
    assert len(summary["trials"]) == 2
    done = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 2 and all(t["state"] in ("COMPLETE", "PRUNED") for t in summary["trials"])
    # each trial's figure is its own best validation GAUC, read back from its checkpoint
    for t in done:
        meta = json.loads((out / f"trial-{t['number']:03d}" / "checkpoint" / "meta.json").read_text())
        assert meta["validation"]["metric"] == "gauc"
        assert t["value"] == pytest.approx(meta["validation"]["best"])
        assert meta["config"]["meta"]["inner_lr"] == pytest.approx(t["params"]["meta.inner_lr"])
    best = max(done, key=lambda t: t["value"])
    assert summary["best"]["number"] == best["number"]
    # best.yaml is a config: the sweep's base with the best trial's values
    best_cfg = load_config(out / "best.yaml")
    assert best_cfg.meta.inner_lr == pytest.approx(best["params"]["meta.inner_lr"])
    assert best_cfg.meta.erm_weight == float(best["params"]["meta.erm_weight"])
    assert yaml.safe_load((out / "best.yaml").read_text())["train"]["val_every_steps"] == 4
    assert "best configuration:" in capsys.readouterr().out
    # MLflow: one parent run, the trials nested under it
    con = sqlite3.connect(tmp_path / "mlflow.db")
    parents = [r[0] for r in con.execute("SELECT run_uuid FROM runs WHERE name LIKE 'sweep-%'")]
    assert len(parents) == 1
    children = con.execute("SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId' AND value = ?",
                           (parents[0],)).fetchone()[0]
    assert children == 2
    params = dict(con.execute("SELECT key, value FROM params WHERE run_uuid = ?", (parents[0],)).fetchall())
    assert params["sweep.metric"] == "gauc"
    # run again with more trials: the study continues (2 done, 1 more)
    rc = cli_main(["sweep", "--config", str(cfg_path), "--out", str(out), "--tracking-uri", uri, "--trials", "3",
                   *common])
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert rc == 0 and len(trials) == 3
    # ... at new points: a sampler seeded as the first sweep's would draw trial 0's again
    assert all(trials[2]["params"]["meta.inner_lr"] != t["params"]["meta.inner_lr"] for t in trials[:2])


def test_a_stopped_sweep_stops_its_running_trial(val_shards, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "gmeta.cli", "sweep", "--config", str(_sweep_config(tmp_path)), "--out", str(out),
           f"data.shards_dir={val_shards}", "data.split.val_fraction=0.15", "train.epochs=1000",
           "train.val_every_steps=4", "train.val_max_tasks=8",
           "train.eval_at_end=false", "tracking.enabled=false", "train.nproc_per_node=1", "data.num_workers=0"]
    sweep = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)

    def trial_processes() -> list[int]:  # processes whose command line names this sweep's trial 0
        mine = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"{out}/trial-000" in line and int(pid) != sweep.pid:
                mine.append(int(pid))
        return mine

    deadline = time.monotonic() + 240
    while not (out / "trial-000" / "validation.jsonl").is_file():  # the trial is training
        assert sweep.poll() is None and time.monotonic() < deadline, "the trial never started"
        time.sleep(0.5)
    assert trial_processes()
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 30
    while trial_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert trial_processes() == []


@pytest.mark.parametrize("extra, message", [
    ([], "train.val_every_steps: must be > 0 for a sweep"),
    (["train.val_every_steps=4", "sweep.params=[]"], "sweep.params: nothing to search"),
    (["train.val_every_steps=4", "sweep.params=[{key: meta.inner_lr, choices: [fast]}]"],
     r"sweep.params \(meta.inner_lr\): meta.inner_lr: expected float, got 'fast'"),
    (["train.val_every_steps=4", "sweep.params=[{key: meta.inner_lr, low: 0.5, high: 0.1}]"],
     r"sweep.params\[0\].high: must be > low"),
])
def test_sweep_config_errors_name_the_key(tmp_path, capsys, extra, message):
    rc = cli_main(["sweep", "--config", str(_sweep_config(tmp_path)), "--out", str(tmp_path / "s"),
                   "tracking.enabled=false", *extra])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)


def test_sweep_trials_of_two_processes_and_searchable_list_items(val_shards, tmp_path):
    """sweep.nproc_per_trial=2: each trial a 2-rank job (validation collective, rank 0
    writing validation.jsonl); a key inside a list item (a feature's min_count) is searchable."""
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(DEBUG_CONFIG.read_text() + """
sweep:
  trials: 1
  prune: false
  nproc_per_trial: 2
  params:
    - {key: features.sparse.ad_id.min_count, choices: ["2", "3"]}
""")  # one trial (a 2-rank job costs seconds of start-up per rank); neither choice is the default 0
    out = tmp_path / "sweep"
    rc = cli_main(["sweep", "--config", str(cfg_path), "--out", str(out), f"data.shards_dir={val_shards}",
                   "data.split.val_fraction=0.15", "train.max_steps=6", "train.val_every_steps=3",
                   "train.val_max_tasks=32", "train.eval_at_end=false",
                   "tracking.enabled=false"])
    assert rc == 0
    summary = json.loads((out / "trials.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["COMPLETE"]
    for t in summary["trials"]:
        meta = json.loads((out / f"trial-{t['number']:03d}" / "checkpoint" / "meta.json").read_text())
        assert meta["world_size"] == 2
        ad = [f for f in meta["config"]["features"]["sparse"] if f["name"] == "ad_id"][0]
        assert ad["min_count"] == int(t["params"]["features.sparse.ad_id.min_count"])
