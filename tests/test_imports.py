"""The package's shape: imports only down the layers (so no cycle), no module taking
another's private names, each package's docstring naming what it may import, the tree of
docs/design.md current, every module importable on its own in a fresh interpreter, and the
algorithm registry in step with the config."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_imports  # noqa: E402


def test_no_import_cycle_and_no_private_imports():
    assert check_imports.check() == []


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    pkg = tmp_path / "gmeta"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from gmeta.b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from gmeta import a\n_hidden = 1\n")
    monkeypatch.setattr(check_imports, "ROOT", tmp_path)
    problems = check_imports.check()
    assert any("private name '_hidden'" in p for p in problems)
    assert any(p.startswith("import cycle: gmeta.a -> gmeta.b -> gmeta.a") for p in problems)


def _package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_checker_sees_an_import_against_the_layers(tmp_path, monkeypatch):
    io_doc = '"""Data.\n\nMay import: ' + ", ".join("gmeta." + u for u in check_imports.may_import("io")) + '."""\n'
    _package(tmp_path / "gmeta", {
        "__init__.py": '"""The package."""\n',
        "config.py": '"""The config."""\n',
        "cli.py": '"""The command line."""\nfrom gmeta.io import reader\n',  # down: fine
        "io/__init__.py": io_doc,
        "io/reader.py": '"""The reader."""\nfrom gmeta.config import Config\n'  # down: fine
                        'def f():\n    from gmeta.training.run import main\n',  # up, even deferred: refused
        "training/__init__.py": '"""Training.\n\nMay import: gmeta.config."""\n',  # says less than the layers
        "training/run.py": '"""The recipe."""\nfrom gmeta.io.reader import f\n'
                           'def g():\n    from gmeta.train import main\n',  # moved away: fails only when run
        "evaluation/__init__.py": '"""Evaluation."""\n',  # says nothing
        "evaluation/a.py": '"""A."""\nimport gmeta.inference.b\n',  # same layer: refused
        "inference/__init__.py": '"""Inference.\n\nMay import: ' +
                                 ", ".join("gmeta." + u for u in check_imports.may_import("inference")) + '."""\n',
        "inference/b.py": "x = 1\n",  # no docstring
        "newpkg/c.py": '"""In no layer."""\n',
    })
    monkeypatch.setattr(check_imports, "ROOT", tmp_path)
    problems = check_imports.check()
    up = [p for p in problems if "a unit of a higher layer" in p]
    assert up == ["gmeta/io/reader.py:4: gmeta.io.reader (io) imports gmeta.training.run (training), a unit of a "
                  "higher layer (LAYERS in scripts/check_imports.py)"], problems
    assert any(p.startswith("gmeta/evaluation/a.py:2: gmeta.evaluation.a (evaluation) imports gmeta.inference.b "
                            "(inference), a unit of its own layer") for p in problems)
    assert any(p.startswith("gmeta/training/__init__.py: its docstring says 'May import: config'") for p in problems)
    assert any(p.startswith("gmeta/evaluation/__init__.py: its docstring has no 'May import:'") for p in problems)
    assert any(p.startswith("gmeta/newpkg/c.py: gmeta.newpkg.c belongs to no unit of LAYERS") for p in problems)
    assert any(p.startswith("gmeta/inference/b.py: no docstring") for p in problems)
    assert "gmeta/training/run.py:4: imports gmeta.train, which is no module of gmeta" in problems
    fine = ("gmeta/cli.py", "gmeta/training/run.py", "gmeta/io/__init__", "gmeta/inference/__init__")
    assert not [p for p in problems if p.startswith(fine) and "no module of gmeta" not in p], problems
    assert not [p for p in problems if "import cycle" in p and "reader" not in p], problems


def test_the_design_tree_is_current_and_the_data_flow_names_real_files():
    design = (ROOT / "docs/design.md").read_text()
    section = design[design.index("## Where each stage lives"):]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    flow, tree = blocks[0], blocks[1]
    assert tree.rstrip("\n") == check_imports.tree(), \
        "docs/design.md's tree is stale: python scripts/check_imports.py --tree"
    named = re.findall(r"\b([a-z_]+/(?:[a-z_]+/)*(?:[a-z_0-9]+\.py)?)", flow)
    assert len(named) > 25
    for path in named:
        assert (ROOT / "gmeta" / path).exists(), f"docs/design.md's data flow names gmeta/{path}, which does not exist"
    # every package of gmeta is in the flow
    packages = {p.parent.relative_to(ROOT / "gmeta").parts[0] for p in (ROOT / "gmeta").rglob("__init__.py")
                if p.parent != ROOT / "gmeta"}
    assert packages <= {path.split("/")[0] for path in named}, packages


def test_every_module_imports_alone():
    mods = sorted(check_imports.modules())
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    # all of them, in both orders, each order in a fresh interpreter: its first module (the
    # first and the last of the sorted list) is imported there alone, before any other
    for order in (mods, mods[::-1]):
        p = subprocess.run([sys.executable, "-c", code, *order], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, (order[0], p.stderr[-2000:])


def test_algorithm_registry_matches_the_config():
    from gmeta.config import MetaConfig
    from gmeta.meta.algorithms import ALGORITHMS

    allowed = typing.get_args(typing.get_type_hints(MetaConfig)["algorithm"])
    assert set(ALGORITHMS) == set(allowed)
