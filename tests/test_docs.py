"""The docs: a README of at most 150 lines that links every page, links that resolve, a
configuration reference that is not stale, and every documented command valid (it parses
with gmeta's own command line, its config files and overrides load, its modules and
scripts exist)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gmeta.cli import _parser
from gmeta.config import load_config

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
