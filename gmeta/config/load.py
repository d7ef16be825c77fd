"""Reading a config: YAML files (with ``base:`` files), ``key=value`` overrides, typed
conversion into the schema, validation; and writing one back (``dump_yaml``)."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from typing import cast as typing_cast

import yaml

from gmeta.config.checks import validate
from gmeta.config.schema import Config, ConfigError, LabelText


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    text = None
    if isinstance(value, _Plain):
        value, text = value.value, value.text
    if text is not None and tp in (str, LabelText):
        return text  # a text field takes unquoted YAML as written: [yes] is "yes", 1.0 is "1.0"
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        # "is" for booleans: 1 == True, but header: 1 is not header: true
        if not any(value is c if isinstance(c, bool) or isinstance(value, bool) else value == c for c in choices):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type in schema at {key}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {typing_cast(type, tp).__name__} fields, got {value!r}")
        return _build(typing_cast(type, tp), value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is LabelText:
        if isinstance(value, bool):
            return "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a label value (text, number or boolean), got {value!r}")
        return str(value)  # plain str: the config is dumped to YAML and JSON
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads 2026-12-01 as a date (a partition's name)
            return value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    raise TypeError(f"unsupported type {tp!r} in schema at {key}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading ``1e-3`` as a float. PyYAML follows YAML 1.1, where a
    float needs a dot (``1.0e-3``), so ``optim.dense_lr: 1e-3`` would be the string
    '1e-3'; YAML 1.2 and every other reader of configs take it as a number."""


class _Dumper(yaml.SafeDumper):
    """The safe dumper with the loader's float rule: text such as '1e-5' is quoted, so a
    dumped config reads back as it was."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X)
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


@dataclass(frozen=True)
class _Plain:
    """An unquoted YAML scalar that YAML 1.1 reads as a boolean or a number, with the text
    it was written as. The schema decides which it is: a bool, int or float field takes
    ``value``, a text field (str, a label value) ``text``, since ``positive_labels: [yes]``
    means the label "yes", not True, and ``task_key: 2024`` the column "2024"."""

    value: Any
    text: str

    def __str__(self) -> str:
        return self.text


class _TextLoader(_Loader):
    """``_Loader`` whose unquoted booleans, numbers and dates come as ``_Plain`` (value and text)."""


def _keep_text(construct):
    def build(loader: _TextLoader, node: yaml.ScalarNode) -> Any:
        try:
            value = construct(loader, node)
        except ValueError:  # a date that does not exist (2026-13-01): the text, which the key's check names
            value = node.value
        return _Plain(value, node.value) if node.style is None else value
    return build


# (a date too: synth.start_date: 2026-12-01 is the text, which YAML 1.1 reads as a date)
for _tag, _construct in (("bool", yaml.SafeLoader.construct_yaml_bool),
                         ("int", yaml.SafeLoader.construct_yaml_int),
                         ("float", yaml.SafeLoader.construct_yaml_float),
                         ("timestamp", yaml.SafeLoader.construct_yaml_timestamp)):
    _TextLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _keep_text(_construct))


def _yaml(text: str, keep_text: bool = False) -> Any:
    """``text`` as YAML; ``keep_text``: unquoted booleans and numbers as ``_Plain``, for
    ``_build`` (which takes ``value`` or ``text`` by the field's type)."""
    return yaml.load(text, Loader=_TextLoader if keep_text else _Loader)  # noqa: S506 (SafeLoader subclasses)


def _plain(value: Any) -> Any:
    """``value`` with every ``_Plain`` replaced by its YAML value."""
    if isinstance(value, _Plain):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar or list)."""
    parts, value = _parse_override(item)
    return parts, _plain(value)


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``parse_override`` with unquoted booleans and numbers as ``_Plain`` (for ``_build``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = _yaml(raw, keep_text=True) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def _apply_override(data: dict, parts: list[str], value: Any) -> str:
    """Set ``parts`` in ``data``. An item of a list of mappings is named by its ``name`` or
    its position, as ``flatten`` names it: ``features.sparse.item_id.min_count=3``. Returns
    the key as errors name it (``features.sparse[1].min_count``)."""
    node: Any = data
    key = ""
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            named = [j for j, x in enumerate(node)
                     if isinstance(x, dict) and x.get("name") is not None and str(x["name"]) == p]
            if named:
                node = node[named[0]]
                key += f"[{named[0]}]"
                continue
            if p.isdigit() and int(p) < len(node):
                node = node[int(p)]
                key += f"[{int(p)}]"
                continue
            names = [_plain(x.get("name")) for x in node if isinstance(x, dict)]
            raise ConfigError(f"{'.'.join(parts[:i])}: no item named {p!r} (items: {names}), cannot set "
                              f"{'.'.join(parts)}")
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, (dict, list)) or (isinstance(nxt, list) and not all(isinstance(x, dict) for x in nxt)):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {'.'.join(parts)}")
        node = nxt
        key = f"{key}.{p}" if key else p
    if isinstance(node, list):
        raise ConfigError(f"{'.'.join(parts)}: names an item of a list, not a key; set one of its keys")
    node[parts[-1]] = value
    return f"{key}.{parts[-1]}" if key else parts[-1]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML, safe loader) over the defaults, apply ``key=value`` overrides,
    check types and values. Raises ConfigError naming the key (and the file)."""
    data: dict = {}
    where = ""
    if path is not None:
        files: list[Path] = []
        data = _read_file(Path(path), files)
        where = f" (in {files[0]}" + (f", over {', '.join(map(str, files[1:]))})" if len(files) > 1 else ")")
    from_file = _keys(data)  # the keys the YAML file sets, to tell its errors from the overrides'
    applied: list[tuple[str, str]] = []  # (the key as errors name it, the override as typed)
    for item in overrides or []:
        parts, value = _parse_override(item)
        try:
            key = _apply_override(data, parts, value)
        except ConfigError as e:
            raise ConfigError(f"{e} (in the command-line override {item!r})") from None
        applied.append((key, item))
    try:
        cfg = _build(Config, data, "")
        validate(cfg)
    except ConfigError as e:
        culprit = _override_of(str(e).split(":", 1)[0], applied, from_file)
        raise ConfigError(f"{e} (in the command-line override {culprit!r})" if culprit else f"{e}{where}") from None
    return cfg


def _read_file(p: Path, chain: list[Path]) -> dict:
    """The config data of the YAML file ``p``: a file that sets ``base`` (a path, relative to
    the file) holds the values it changes over that file's (mappings merged key by key,
    anything else, lists too, replaced); ``chain`` gets every file read, ``p`` first.
    (A few lines rather than Hydra or OmegaConf: one key, and errors that name the file.)"""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}" + (f" (the base of {chain[-1]})" if chain else ""))
    if p.resolve() in [c.resolve() for c in chain]:
        raise ConfigError(f"{chain[-1]}: base: {p} is already in the chain of bases ({' -> '.join(map(str, chain))})")
    chain.append(p)
    try:
        loaded = _yaml(p.read_text(), keep_text=True)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    if "base" not in loaded:
        return loaded
    base = _plain(loaded.pop("base"))
    if not isinstance(base, str) or not base:
        raise ConfigError(f"base: must be the path of a config file (relative to {p.parent}), got {base!r} (in {p})")
    return _merged(_read_file(p.parent / base, chain), loaded)


def _merged(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merged(base[k], v) if k in base else v for k, v in over.items()}}
    return over


def _keys(data: Any, prefix: str = "") -> set[str]:
    """Every key and section of plain config data, named as errors name them
    (``features.sparse[0].min_count``)."""
    out = set()
    items = enumerate(data) if isinstance(data, list) else data.items() if isinstance(data, dict) else []
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(data, list) else f"{prefix}.{k}" if prefix else str(k)
        out.add(key)
        out |= _keys(v, key)
    return out


def _override_of(key: str, applied: list[tuple[str, str]], from_file: set[str]) -> str | None:
    """The command-line override an error at ``key`` comes from, if any (the last one that
    set it or a section around it; or that created the section ``key`` the file never named,
    e.g. a misspelt section)."""
    for set_key, item in reversed(applied):
        if key == set_key or key.startswith((set_key + ".", set_key + "[")):
            return item
        if key not in from_file and set_key.startswith((key + ".", key + "[")):
            return item
    return None


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with ``to_dict`` (e.g. from a checkpoint)."""
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}. Items of a list of dicts are keyed by their
    ``name`` (``features.sparse.user_id.num_embeddings``), else by position. (Tracking
    stores such as MLflow accept only letters, digits and ``_-. :/`` in keys.)"""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{x.get('name') or i}"))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False)
