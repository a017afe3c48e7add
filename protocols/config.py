"""Typed configuration: TOML text -> frozen dataclasses, validated once at start (STYLE H6).

:func:`load` walks a dataclass's type hints and builds it from a mapping, rejecting unknown
keys, missing required keys and wrong types with :class:`~protocols.errors.ConfigError` naming
the dotted key path (``buses[1].baud: expected int, got 'fast'``). Defaults come from the
dataclass. A dataclass's ``__post_init__`` may raise ``ValueError("field: reason")`` for value
checks; the loader turns it into a ``ConfigError`` at that dataclass's path.

Supported field types: ``int``, ``float`` (ints accepted), ``str``, ``bool``, ``Literal[...]``,
``X | None``, an ``Enum`` (by value), ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses.
Pure: no file or environment access (the caller reads the file and passes its text).
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from protocols.errors import ConfigError

__all__ = ["load", "loads_toml"]

T = TypeVar("T")


def loads_toml(cls: type[T], text: str, source: str = "config") -> T:
    """Parse TOML ``text`` and :func:`load` it as ``cls``. Raises :class:`ConfigError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{source}: not valid TOML: {exc}") from None
    return load(cls, data)


def load(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``. Raises :class:`ConfigError` naming the key path."""
    return typing.cast(T, _convert(cls, data, path))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _dataclass(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # ``X | None``: X's own error, with its own key path
            return _convert(options[0], value, path)
        errors = []
        for arg in options:
            try:
                return _convert(arg, value, path)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(path, " or ".join(errors))
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(path, f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {_describe(value)}")
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        _, item_tp = typing.get_args(tp) or (str, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a table, got {_describe(value)}")
        return {str(k): _convert(item_tp, v, _join(path, str(k))) for k, v in value.items()}
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(path, f"expected one of {allowed}, got {_describe(value)}") from None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r:.60}"


def _dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a table, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(
            _join(path, unknown[0]), f"unknown key (expected one of: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        message = str(exc)
        key, sep, reason = message.partition(": ")
        if sep and key in fields:
            raise ConfigError(_join(path, key), reason) from None
        raise ConfigError(path, message) from None
