"""Strict reading of TOML-shaped mappings into typed values (STYLE H6).

Accepts a ``Mapping`` as produced by :func:`tomllib.loads`; returns plain values checked for
type; raises :class:`~protocols.errors.ConfigError` naming the dotted key path of the first bad
key. It never fills a value it was not told the default of and never ignores an unknown key
(:meth:`Section.done`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from protocols.errors import ConfigError

__all__ = ["MISSING", "Section", "parse_hhmm", "parse_zone"]

MISSING: Any = object()
_HHMM = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)$")
_OFFSET = re.compile(r"^([+-])(\d\d):(\d\d)$")


class Section:
    """One table of a config document, with its dotted path for error messages."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected a table, got {type(data).__name__}")
        self.data = data
        self.path = path
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = MISSING) -> Any:
        """The value of ``name``, checked to be of ``kind`` (bool never passes for int)."""
        self._seen.add(name)
        if name not in self.data:
            if default is MISSING:
                raise ConfigError(self.key(name), "required key is missing")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(self.key(name), f"expected {_names(kinds)}, got bool")
        if not isinstance(value, kinds):
            raise ConfigError(
                self.key(name), f"expected {_names(kinds)}, got {type(value).__name__} {value!r}"
            )
        return value

    def get_list(self, name: str, item: type | tuple[type, ...], default: Any = MISSING) -> list[Any]:
        """A list whose every element is of ``item``."""
        value = self.get(name, list, default)
        items = item if isinstance(item, tuple) else (item,)
        for i, element in enumerate(value):
            if (isinstance(element, bool) and bool not in items) or not isinstance(element, items):
                raise ConfigError(f"{self.key(name)}[{i}]", f"expected {_names(items)}, got {element!r}")
        return list(value)

    def section(self, name: str, default: Any = MISSING) -> Section | None:
        value = self.get(name, dict, default)
        return None if value is None else Section(value, self.key(name))

    def sections(self, name: str, default: Any = MISSING) -> list[Section]:
        value = self.get(name, list, default)
        return [Section(v, f"{self.key(name)}[{i}]") for i, v in enumerate(value)]

    def fail(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.key(name), reason)

    def done(self) -> None:
        """Reject keys nobody asked for: a misspelt key is an error, never silently ignored."""
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def parse_hhmm(text: str, key_path: str) -> int:
    """``"07:30"`` → minutes after local midnight; ``"24:00"`` → 1440 (an end bound)."""
    m = _HHMM.match(text)
    if m is None or (m.group(1) == "24" and m.group(2) != "00"):
        raise ConfigError(key_path, f"expected HH:MM between 00:00 and 24:00, got {text!r}")
    return int(m.group(1)) * 60 + int(m.group(2))


def parse_zone(text: str, key_path: str) -> dt.tzinfo:
    """A fixed offset ``"+08:00"`` (DST-free, preferred) or an IANA name via :mod:`zoneinfo`."""
    m = _OFFSET.match(text)
    if m is not None:
        minutes = int(m.group(2)) * 60 + int(m.group(3))
        if minutes >= 24 * 60:
            raise ConfigError(key_path, f"offset out of range: {text!r}")
        sign = -1 if m.group(1) == "-" else 1
        return dt.timezone(dt.timedelta(minutes=sign * minutes))
    try:
        import zoneinfo

        return zoneinfo.ZoneInfo(text)
    except (ValueError, LookupError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise ConfigError(key_path, f"unknown time zone {text!r}") from exc
