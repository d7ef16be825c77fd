"""Write docs/configuration.md from the config dataclasses of gmeta/config/schema.py: every key with
its type, default and the comment written above (or beside) it. tests/test_docs.py fails
when the file is stale.

    python scripts/config_reference.py [--check]
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"
sys.path.insert(0, str(ROOT))

from gmeta import config as C  # noqa: E402

HEADER = """# Configuration reference

Generated from the dataclasses of `gmeta/config/schema.py` by `python scripts/config_reference.py`
(`tests/test_docs.py` fails when this page is stale). A YAML file in `configs/` supplies
values; `key=value` arguments override them (`meta.inner_lr=0.05`, `model.over_arch=[64,32]`).
Unknown keys, wrong types and impossible values are errors that name the key and the file:

```
$ gmeta train --config bad.yaml
gmeta train: config error: meta.inner_lr: expected float, got 'fast' (in bad.yaml)
```
"""


def _comments(cls) -> dict[str, str]:
    """Field name -> the comment lines right above it and the comment beside it."""
    lines = inspect.getsource(cls).splitlines()
    out, pending = {}, []
    for line in lines[1:]:
        s = line.strip()
        if s.startswith("#"):
            pending.append(s.lstrip("#").strip())
            continue
        name = s.split(":")[0].strip() if ":" in s and not s.startswith(('"', "def ", "@")) else ""
        if name.isidentifier():
            beside = s.split("#", 1)[1].strip() if "#" in s.split("=", 1)[-1] and "#" in s else ""
            out[name] = " ".join(pending + ([beside] if beside else []))
        pending = []
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(v):
        return ""
    return f"`{v!r}`".replace("|", "\\|")


def _type(t) -> str:
    s = str(t).replace("typing.", "").replace("gmeta.config.schema.", "").replace("gmeta.config.", "")
    s = s.replace("<class '", "").replace("'>", "")
    return f"`{s}`".replace("|", "\\|")


def _section(name: str, cls, out: list[str], seen: set) -> None:
    hints = typing.get_type_hints(cls)
    doc = inspect.getdoc(cls) or ""
    own = doc if cls.__doc__ and cls.__module__.startswith(C.__name__) else ""
    out += ["", f"## `{name}`" if name else "## (top level)", ""]
    if own:
        out += [own, ""]
    notes = _comments(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        inner = typing.get_args(t)
        sub = t if dataclasses.is_dataclass(t) else next((a for a in inner if dataclasses.is_dataclass(a)), None)
        key = f"{name}.{f.name}" if name else f.name
        if sub is not None:
            nested.append((key if dataclasses.is_dataclass(t) else f"{key}[]", sub))
            if dataclasses.is_dataclass(t):
                continue
        rows.append(f"| `{key}` | {_type(t)} | {_default(f)} | {notes.get(f.name, '').replace('|', chr(92) + '|')} |")
    if rows:
        out += ["| key | type | default | meaning |", "|---|---|---|---|", *rows]
    for key, sub in nested:
        if (key, sub) not in seen:
            seen.add((key, sub))
            _section(key, sub, out, seen)


def render() -> str:
    out = [HEADER.rstrip()]
    seen: set = set()
    for f in dataclasses.fields(C.Config):
        _section(f.name, typing.get_type_hints(C.Config)[f.name], out, seen)
    return "\n".join(out) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/config_reference.py")
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
