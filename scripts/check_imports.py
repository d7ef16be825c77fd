"""Check gmeta's import graph: no cycle among its modules (counting imports inside
functions too, which only defer a cycle), and no module importing another's private
(underscore) names. Prints what it finds; exit status 1 if anything.

    python scripts/check_imports.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
                if a.name in known:
                    found.append((a.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base in known:
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
        for target, names, line in imports(name, path, known):
            if target != name:
                graph[name].add(target)
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: imports private name {n!r} from {target}")
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


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s) in {len(modules())} modules")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
