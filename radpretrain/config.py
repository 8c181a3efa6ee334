"""Typed dataclass configs: defaults <- YAML file <- `key=value` overrides, unknown keys and wrong types refused."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from radpretrain.errors import ConfigError
from radpretrain.registry import did_you_mean

C = TypeVar("C")


def load_config(schema: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Build a `schema` dataclass from its defaults, an optional YAML file and dotted overrides.

    Dict-typed fields are replaced, not merged, by a layer that sets them (so `tasks: {mae: 1}` in a
    file means only mae). Every error names the offending key and says how to fix it.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values = _merge(schema, values, read_yaml(path), where=str(path))
    values = _merge(schema, values, parse_overrides(overrides), where="command line")
    return build(schema, values)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; give a YAML file (see configs/)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn `["a.b=1", "tasks={simclr: 1.0}"]` into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' must look like key=value (e.g. optim.lr=3e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def to_dict(config: Any) -> dict[str, Any]:
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _merge(
    schema: type, base: dict[str, Any], layer: Mapping[str, Any], where: str, prefix: str = ""
) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    merged = dict(base)
    for key, value in layer.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(_unknown_key(full, key, list(hints), where))
        inner = _dataclass_of(hints[key])
        if inner is not None and isinstance(value, Mapping):
            merged[key] = _merge(inner, merged.get(key) or {}, value, where, prefix=f"{full}.")
        else:
            merged[key] = value
    return merged


def build(schema: type[C], values: Mapping[str, Any], prefix: str = "") -> C:
    """Instantiate `schema` from plain values, checking every type."""
    hints = typing.get_type_hints(schema)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(_unknown_key(full, key, list(hints), "config"))
        kwargs[key] = _coerce(hints[key], value, full)
    try:
        obj = schema(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"config section '{prefix.rstrip('.') or schema.__name__}': {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _unknown_key(full: str, key: str, known: list[str], where: str) -> str:
    return f"unknown config key '{full}' ({where}).{did_you_mean(key, known)} Known here: {', '.join(sorted(known))}"


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' is a section; give it keys, e.g. {key}.<name>=...")
        return build(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r} (write [a, b])")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r} (write {{name: value}})")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 3e-4 as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"config key '{key}' must be a path, got {value!r}")
    return value
