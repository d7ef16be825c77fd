"""The package's shape: no import cycle, no module taking another's private names, every
module importable on its own in a fresh interpreter, and the algorithm registry in step
with the config."""

from __future__ import annotations

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
