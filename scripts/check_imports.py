"""Check gmeta's import graph: every import goes down the layers of ``LAYERS`` (counting
imports inside functions too, which only defer a wrong one), so there is no cycle among
its modules either; no module imports another's private (underscore) names; and each
package's ``__init__`` docstring says what the package may import (a ``May import:``
paragraph naming exactly the units of the layers below its own, in any order); and every
``gmeta.*`` module imported, here or in tests, benchmarks and scripts, exists (an import
inside a function fails only when it runs). Prints what it finds; exit status 1 if anything.

    python scripts/check_imports.py           # the checks
    python scripts/check_imports.py --tree    # the package tree of docs/design.md
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# gmeta's layers, lowest first. A unit is a top-level module or a package (a dotted name
# under gmeta; "" is gmeta/__init__.py, the library's front door); a module belongs to the
# unit of the longest name that prefixes it. A unit may import itself and the units of
# lower layers, never a unit of its own layer or above.
LAYERS: list[tuple[str, ...]] = [
    ("version", "logs", "storage", "metrics", "layout"),  # shared leaves: nothing of gmeta
    ("types", "tracking", "models.layers"),
    ("models.heads",),  # torch modules from plain arguments: the config builds one to check names
    ("config",),
    ("io",),
    ("models",),
    ("meta",),
    ("parallel",),
    ("checkpoint", "scoring"),  # shared by what judges, serves and trains models
    ("evaluation", "inference"),
    ("training",),  # trains, validates (evaluation) and logs the served model (inference)
    ("experiments",),  # trains and judges many models: the published tables
    ("cli", "", "pyfunc"),  # pyfunc: the MLflow model's class under the name old models use
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str | None:
    """The unit of a dotted module name ("gmeta.io.sources.files" -> "io"), None if none."""
    name = module.removeprefix("gmeta").removeprefix(".")
    parts = name.split(".") if name else []
    if not parts:
        return ""  # gmeta/__init__.py itself: a module of no unit below is the front door's
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    return None


def may_import(unit: str) -> list[str]:
    """The units ``unit`` may import besides itself, in layer order."""
    return [u for layer in LAYERS[: RANK[unit]] for u in layer]


def declared_imports(doc: str) -> list[str] | None:
    """The units a package docstring's ``May import:`` paragraph names (``gmeta.X``, or
    ``nothing of gmeta``), None without one."""
    for para in doc.split("\n\n"):
        para = " ".join(para.split())
        if para.startswith("May import:"):
            body = para.removeprefix("May import:").strip().rstrip(".")
            if body.startswith("nothing of gmeta"):
                return []
            return [w.strip().removeprefix("gmeta.") for w in body.split(",")]
    return None


def modules(package: str = "gmeta") -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported gmeta module, names taken from it, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known or a.name.split(".")[0] == "gmeta":  # (an unknown one: check() names it)
                    found.append((a.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] == "gmeta" and base not in known:
                found.append((base, [a.name for a in node.names], node.lineno))
            elif base in known:
                names = []
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in known:  # "from gmeta.io import reader": the submodule itself
                        found.append((sub, [], node.lineno))
                    else:
                        names.append(a.name)
                if names:
                    found.append((base, names, node.lineno))
    return found


def check() -> list[str]:
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    problems = []
    for name, path in known.items():
        if not summary(path):
            problems.append(f"{path.relative_to(ROOT)}: no docstring "
                            "(its first sentence is its line in docs/design.md)")
        unit = unit_of(name)
        if unit is None:
            problems.append(f"{path.relative_to(ROOT)}: {name} belongs to no unit of LAYERS (scripts/check_imports.py)")
        if path.name == "__init__.py" and unit is not None and name != "gmeta":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            declared, allowed = declared_imports(doc), may_import(unit)
            if declared is None:
                problems.append(f"{path.relative_to(ROOT)}: its docstring has no 'May import:' paragraph "
                                f"(the {unit} layer may import: {', '.join(allowed) or 'nothing of gmeta'})")
            elif sorted(declared) != sorted(allowed):
                problems.append(f"{path.relative_to(ROOT)}: its docstring says 'May import: "
                                f"{', '.join(declared) or 'nothing of gmeta'}', the layers say "
                                f"{', '.join(allowed) or 'nothing of gmeta'}")
        for target, names, line in imports(name, path, known):
            if target not in known:  # a module that moved or never was: found only when the line runs
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {target}, which is no module of gmeta")
                continue
            if target != name:
                graph[name].add(target)
            theirs = unit_of(target)
            if unit is not None and theirs is not None and theirs != unit and RANK[theirs] >= RANK[unit]:
                where = "its own" if RANK[theirs] == RANK[unit] else "a higher"
                problems.append(f"{path.relative_to(ROOT)}:{line}: {name} ({unit or 'gmeta'}) imports {target} "
                                f"({theirs or 'gmeta'}), a unit of {where} layer (LAYERS in scripts/check_imports.py)")
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: imports private name {n!r} from {target}")
    # the code around the package (tests, benchmarks, scripts) may import only what exists too
    for folder in ("tests", "benchmarks", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for target, _, line in imports("_outside", path, known):
                if target not in known:
                    problems.append(f"{path.relative_to(ROOT)}:{line}: imports {target}, which is no module of gmeta")
    # a package imports its parent implicitly: edges to a parent package's __init__ count only
    # when that __init__ imports something
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                problems.append("import cycle: " + " -> ".join(cycle))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return problems


def _cut(text: str, seps: tuple[str, ...], shortest: int) -> str:
    """``text`` up to the first of ``seps`` at or after ``shortest`` characters that is not
    inside ``code`` or parentheses; all of it if none."""
    best = None
    for sep in seps:
        for m in re.finditer(re.escape(sep), text):
            i, head = m.start(), text[: m.start()]
            if i >= shortest and head.count("``") % 2 == 0 and head.count("(") == head.count(")"):
                best = i if best is None else min(best, i)
                break
    return text[:best] if best is not None else text


def summary(path: Path) -> str:
    """A module's role in a line: the first sentence of its docstring, shortened at a
    colon, a semicolon, a parenthesis or a comma while longer than 90 characters."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = _cut(" ".join(doc.split("\n\n")[0].split()), (". ",), 0).rstrip(".")
    for sep in (": ", "; ", " (", ", "):
        if len(text) > 90:
            text = _cut(text, (sep,), 32)
    return text


def tree() -> str:
    """gmeta's package tree, one line per package and module with its summary: the block
    of docs/design.md under "Where each stage lives" (tests/test_imports.py checks it)."""
    lines = []
    for path in sorted(modules().values(), key=lambda p: p.relative_to(ROOT).parts):
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py":
            depth, label = len(rel.parts) - 2, rel.parts[-2] + "/"
        else:
            depth, label = len(rel.parts) - 1, rel.name
        lines.append(f"{'  ' * depth + label:<30}{summary(path)}".rstrip())
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:] == ["--tree"]:
        print(tree())
        return 0
    problems = check()
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s) in {len(modules())} modules")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
