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
from radpretrain.files import write_text
from radpretrain.registry import did_you_mean

C = TypeVar("C")

_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"


def load_config(schema: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Build a `schema` dataclass from its defaults, an optional YAML file and dotted overrides.

    Dict-typed fields are replaced, not merged, by a layer that sets them (so `tasks: {mae: 1}` in a
    file means only mae). A value is read as YAML, except that a field typed as text keeps the text as
    written (`precision=no` is "no", not YAML 1.1's False). Every error names the offending key and
    says how to fix it.
    """
    values: dict[str, Any] = {}
    if path is not None:
        node, _ = _read(path)
        values = _merge(schema, values, _entries(node) if node is not None else {}, where=str(path))
    values = _merge(schema, values, _override_layer(overrides), where="command line")
    return build(schema, values)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML file holds, as plain YAML values (no schema)."""
    return _read(path)[1]


def _read(path: str | Path) -> tuple[yaml.Node | None, dict[str, Any]]:
    """The file's YAML document as a node tree (typed later, by the schema) and as plain values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
        data = None if node is None else _construct(node)  # a tag that cannot be built is refused now
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; give a YAML file (see configs/)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return None, {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return node, data


def _override_layer(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn `["a.b=1", "tasks={simclr: 1.0}"]` into a nested dict whose leaves are the values' YAML nodes."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' must look like key=value (e.g. optim.lr=3e-4)")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _override_node(raw)
    return nested


def _override_node(raw: str) -> yaml.Node:
    """The YAML node of one override's value; text that is not valid YAML (or empty) stays that text."""
    if raw.strip():
        try:
            node = yaml.compose(raw, Loader=yaml.SafeLoader)
            if node is None:  # only a comment: YAML's null
                return yaml.ScalarNode(_NULL_TAG, "")
            _construct(node)  # a tag that cannot be built (e.g. !!python/name:...) keeps the text
            return node
        except yaml.YAMLError:
            pass
    return yaml.ScalarNode(_STR_TAG, raw)


def _construct(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_document(node)


def _entries(item: Any) -> dict[Any, Any]:
    """A mapping's keys (plain values) and their still untyped values: a dict of overrides, or a mapping node."""
    if isinstance(item, dict):
        return item
    yaml.SafeLoader("").flatten_mapping(item)  # resolves YAML merge keys (<<: *base)
    return {_construct(key): value for key, value in item.value}


def _is_mapping(item: Any) -> bool:
    return isinstance(item, dict) or (isinstance(item, yaml.MappingNode) and item.tag == _MAP_TAG)


def _value(item: Any, tp: Any) -> Any:
    """The plain value of a layer's `item` (a YAML node, or a dict of them from dotted overrides) for type `tp`.

    Where `tp` takes only text (str, Path, Literals of strings, optionally None), a plain scalar keeps the text
    as written instead of YAML 1.1's reading of it: `no`, `off`, `on`, `yes`, `true` and numbers such as `1.10`
    stay text; `null` still means None where `tp` allows None.
    """
    if _is_mapping(item):
        section = _dataclass_of(tp)
        hints = typing.get_type_hints(section) if section is not None else {}
        inner = _item_type(tp, dict)
        return {key: _value(value, hints.get(key, inner)) for key, value in _entries(item).items()}
    if isinstance(item, yaml.SequenceNode) and item.tag == _SEQ_TAG:
        inner = _item_type(tp, list)
        return [_value(value, inner) for value in item.value]
    value = _construct(item)
    if isinstance(item, yaml.ScalarNode) and not isinstance(value, str) and _takes_text(tp):
        if value is None and (not item.value or _allows_none(tp)):
            return None
        return item.value
    return value


def _arms(tp: Any) -> list[Any]:
    """The types a value of `tp` may have, None left out."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [arm for arm in typing.get_args(tp) if arm is not type(None)]
    return [tp]


def _takes_text(tp: Any) -> bool:
    def textual(arm: Any) -> bool:
        if typing.get_origin(arm) is typing.Literal:
            return all(isinstance(choice, str) for choice in typing.get_args(arm))
        return arm in (str, Path)

    return all(textual(arm) for arm in _arms(tp))


def _allows_none(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _item_type(tp: Any, kind: type) -> Any:
    """The item type of the list (kind=list) or value type of the dict (kind=dict) that `tp` is; Any otherwise."""
    for arm in _arms(tp):
        origin = typing.get_origin(arm) or arm
        args = typing.get_args(arm)
        if kind is list and origin in (list, tuple, Sequence) and args:
            return args[0]
        if kind is dict and origin in (dict, Mapping) and len(args) == 2:
            return args[1]
    return Any


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs."""
    write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


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
    schema: type, base: dict[str, Any], layer: Mapping[Any, Any], where: str, prefix: str = ""
) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    merged = dict(base)
    for key, item in layer.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(_unknown_key(full, key, list(hints), where))
        inner = _dataclass_of(hints[key])
        if inner is not None and _is_mapping(item):
            merged[key] = _merge(inner, merged.get(key) or {}, _entries(item), where, prefix=f"{full}.")
        else:
            merged[key] = _value(item, hints[key])
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
