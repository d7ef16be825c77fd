"""The docs: a README of at most 150 lines that links every page, links that resolve, a
configuration reference that is not stale, every documented command valid (it parses with
gmeta's own command line, its config files and overrides load, its modules and scripts
exist), and every documented command run: here, in a scratch copy of the project's configs
on data written for it (shrunk to test size by overrides appended to the command), or by the
test or job named for it in RUN_ELSEWHERE. Output a page shows after a ``$ `` command must
appear in what the command prints."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gmeta.cli import _parser
from gmeta.config import load_config
from tests.support.cli import NotInProcess, run_gmeta
from tests.support.movielens import make_data, write_ml100k

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_configuration_reference_is_current():
    p = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_readme_is_short_and_maps_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def _commands(text: str) -> list[str]:
    """Command lines of ```bash blocks (continuations joined, comments dropped) and the
    ``$ ``-prompted lines of other blocks."""
    out = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if lang == "bash" and line and not line.startswith("#"):
                out.append(line.split(" #")[0].strip())
            elif line.startswith("$ "):
                out.append(line[2:].strip())
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_commands_are_valid(page):
    for cmd in _commands(page.read_text()):
        words = shlex.split(cmd)
        while words and re.match(r"^[A-Z_]+=", words[0]):  # environment assignments
            words = words[1:]
        prog = words[0].rsplit("/", 1)[-1]
        if prog == "gmeta":
            try:
                args = _parser().parse_args(words[1:])
            except SystemExit as e:
                pytest.fail(f"{page.name}: `{cmd}` does not parse ({e})")
            cfg = getattr(args, "config", None)
            if cfg and (ROOT / cfg).is_file():
                load_config(ROOT / cfg, [o for o in args.overrides])  # a ConfigError names the key
        elif prog.startswith("python"):
            assert words[1] == "-m", cmd
            assert importlib.util.find_spec(words[2]) is not None, f"{page.name}: no module {words[2]}"
        elif prog == "bash":
            assert (ROOT / words[1]).is_file(), f"{page.name}: no script {words[1]}"
        else:
            pytest.fail(f"{page.name}: `{cmd}`: a command this test does not know how to check")


# Commands that are a job or a test of their own.
RUN_ELSEWHERE = {
    "bash scripts/main.sh": "the main job",
    "bash scripts/test.sh": "the test command, which CI runs through .ci/run",
    "python -m gmeta.evaluation.ceiling": "tests/test_ceiling.py::test_ceiling_command_prints_the_table, which runs "
                                          "its main on a smaller debug config",
    "gmeta train --config configs/ads_cvr.yaml --nproc-per-node 8 --nnodes 2:4":
        "tests/parallel/test_elastic.py::test_an_elastic_job_goes_on_without_a_lost_node_and_trains_each_task_once, "
        "which runs an elastic job on two localhost nodes with dynamic sharding and loses one",
    "python -m gmeta.experiments.cold_start": "tests/test_cold_start.py::"
                                             "test_table_searches_every_row_alike_then_trains_and_scores_every_seed, "
                                             "which runs cold_start.run (what the command runs) on three rows, two "
                                             "trials, two seeds",
}


def _small_tables(*names: str) -> list[str]:
    """Tables of 4096 rows for test-sized data: the configs size them for the full data sets
    (up to 2M rows), which a test would allocate, optimize and checkpoint for a few hundred ids.
    prepare hashes ids into the table size, so every command of a page gets the same ones."""
    return [f"features.sparse.{n}.num_embeddings=4096" for n in names]


_ADS_TABLES = _small_tables("user_id", "ad_id", "advertiser_id", "device", "site_id", "interests", "ad_category",
                            "creative_type", "landing_page")
_ML_TABLES = _small_tables("item_id", "year", "age", "zip3")
_ADS_SMALL = ["synth.num_tasks=200", "synth.num_users=400", *_ADS_TABLES]
_FAST = ["meta.tasks_per_batch=4", "eval.tasks_per_batch=8", "data.num_workers=0", "train.nproc_per_node=1"]
# (subcommand, config) -> overrides appended to a documented command to run it at test size
SHRINK = {
    ("prepare", "configs/movielens.yaml"): _ML_TABLES,
    ("train", "configs/movielens.yaml"): ["train.epochs=1", *_FAST, *_ML_TABLES],
    ("evaluate", "configs/movielens.yaml"): ["eval.tasks_per_batch=8", "data.num_workers=0", *_ML_TABLES],
    ("train", "configs/ads_cvr.yaml"): ["train.max_steps=6", "train.checkpoint_every_steps=3", *_FAST, *_ADS_TABLES],
    # the debug data's three epochs are what its figures need, not what running the command proves
    ("train", "configs/ads_cvr_debug.yaml"): ["train.epochs=1"],
    # daily.md runs its own synth: 8 days of a few hundred campaigns
    ("synth", "configs/ads_daily.yaml"): ["synth.num_tasks=600", "synth.num_users=800", "synth.max_rows_per_task=200"],
    ("prepare", "configs/ads_daily.yaml"): _ADS_TABLES,
    ("train", "configs/ads_daily.yaml"): ["train.max_steps=4", *_FAST, *_ADS_TABLES],
}


def _setup_movielens(work: Path) -> None:
    write_ml100k(work / "data" / "movielens" / "raw", make_data())


def _setup_ads(work: Path) -> None:
    # what `gmeta synth` and `gmeta prepare` write, called here: the data is the page's input,
    # not one of its commands, and two more interpreters would cost seconds of imports
    from gmeta.io.prepare import prepare
    from gmeta.io.synth import generate

    cfg = load_config(work / "configs" / "ads_cvr.yaml", _ADS_SMALL)
    generate(cfg, work / cfg.data.raw_dir)
    prepare(cfg, work / cfg.data.raw_dir, work / cfg.data.shards_dir)


PAGE_SETUP = {"data.md": _setup_movielens, "fault_tolerance.md": _setup_ads}


def _gmeta(work: Path, args: list[str]) -> subprocess.CompletedProcess:
    # in this process where the command runs in one (an interpreter's imports cost seconds);
    # a command that starts torchrun stops before doing anything and runs as a process
    try:
        return run_gmeta(args, cwd=work)
    except NotInProcess:
        pass
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gmeta.cli", *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)


def _expected_output(text: str) -> dict[str, list[str]]:
    """``$ `` command -> the lines shown after it, up to the next command or the block's end."""
    out: dict[str, list[str]] = {}
    for _lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        cmd = None
        for line in block.splitlines():
            if line.startswith("$ "):
                cmd = line[2:].strip()
                out[cmd] = []
            elif cmd is not None and line.strip() and line.strip() != "...":  # "..." elides lines
                out[cmd].append(line.strip())
    return out


def _documented_runs() -> list[tuple[str, str]]:
    return [(page.name, cmd) for page in PAGES for cmd in _commands(page.read_text())]


def _run_elsewhere(cmd: str) -> bool:
    return any(cmd.removeprefix(".venv/bin/").startswith(k) for k in RUN_ELSEWHERE)


@pytest.mark.parametrize("page", sorted({p for p, _ in _documented_runs()}))
def test_documented_commands_run(page, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(ROOT / "configs", work / "configs")
    (work / "bad.yaml").write_text("meta:\n  inner_lr: fast\n")  # the config error configuration.md shows
    if page in PAGE_SETUP:
        PAGE_SETUP[page](work)
    text = next(p for p in PAGES if p.name == page).read_text()
    shown = _expected_output(text)
    for cmd in _commands(text):
        if _run_elsewhere(cmd):
            continue
        words = shlex.split(cmd)
        assert words[0].rsplit("/", 1)[-1] == "gmeta", f"{page}: `{cmd}` is neither run here nor in RUN_ELSEWHERE"
        args = words[1:]
        config = args[args.index("--config") + 1] if "--config" in args else None
        p = _gmeta(work, args + SHRINK.get((args[0], config), []))
        printed = p.stdout + p.stderr
        if shown.get(cmd):
            for line in shown[cmd]:
                assert line in printed, f"{page}: `{cmd}` does not print {line!r}:\n{printed[-3000:]}"
        else:
            assert p.returncode == 0, f"{page}: `{cmd}` failed:\n{printed[-3000:]}"
        if "--resume" in args and args[0] == "train":  # run again: it continues from its checkpoint
            p = _gmeta(work, args + SHRINK.get((args[0], config), []) + ["train.max_steps=9"])
            assert p.returncode == 0 and "resum" in (p.stdout + p.stderr).lower(), p.stdout + p.stderr


def test_commands_run_elsewhere_exist():
    for cmd, where in RUN_ELSEWHERE.items():
        assert any(c.removeprefix(".venv/bin/").startswith(cmd) for _, c in _documented_runs()), cmd
        if where.startswith("tests/"):
            path, name = where.split(" ")[0].rstrip(",").split("::")
            assert f"def {name}(" in (ROOT / path).read_text(), where
