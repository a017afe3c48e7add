"""Alarms the head-end publishes for other services: the codec of ``ami/v1/agg/alarms``.

Today one kind: an OUT-02 area outage, raised by ingest's outage correlation (one alarm per
outage of a transformer area, not one per meter) and read by fee control, which notifies the
customers of that area. Topic :data:`protocols.topics.ALARMS`, ingest -> fee control (and anyone
allowed to read ``ami/v1/agg/#``), QoS 1, not retained.

JSON, compact::

    {"v":1,"type":"area_outage","area":"TA-0042","ts_ms":1717200000000,"events":60}

* ``area``: the transformer area (:func:`check_area`);
* ``ts_ms``: when the outage was recognised (the event that reached the OUT-02 threshold);
* ``events``: the meters' power-down events that made it (>= 1).

An (area, ts_ms) pair names one outage: a repeated message is the same alarm, and receivers
treat it so. Anything else, or more than :data:`MAX_ALARM_BYTES`, raises
:class:`~protocols.errors.PayloadError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from protocols.errors import PayloadError
from protocols.payload import VERSION, load_json_message

__all__ = ["MAX_ALARM_BYTES", "AreaOutage", "check_area", "decode_alarm"]

MAX_ALARM_BYTES = 4096
_AREA = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")
_MAX_MS = 2**63 - 1


def check_area(area: str) -> str | None:
    """Why ``area`` cannot be a transformer-area name, or None if it can: 1-128 characters, no
    whitespace or control characters (the names of ingest's meter registry, e.g. ``TA-0042``)."""
    if not _AREA.fullmatch(area):
        return "expected 1-128 characters without whitespace or control characters"
    return None


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class AreaOutage:
    """OUT-02: area ``area`` lost supply at ``ts_ms``, seen in ``events`` power-down events."""

    area: str
    ts_ms: int
    events: int

    def __post_init__(self) -> None:
        why = check_area(self.area)
        if why is not None:
            raise ValueError(f"area: {why}")
        if not _int(self.ts_ms) or not 0 <= self.ts_ms <= _MAX_MS:
            raise ValueError("ts_ms: expected a non-negative integer")
        if not _int(self.events) or not 1 <= self.events <= _MAX_MS:
            raise ValueError("events: expected a positive integer")

    def to_json(self) -> bytes:
        doc = {
            "v": VERSION,
            "type": "area_outage",
            "area": self.area,
            "ts_ms": self.ts_ms,
            "events": self.events,
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def decode_alarm(data: bytes) -> AreaOutage:
    """Parse and check an alarm message. Raises :class:`PayloadError` with the reason."""
    doc = load_json_message(data, "area_outage", max_bytes=MAX_ALARM_BYTES)
    unknown = sorted(set(doc) - {"v", "type", "area", "ts_ms", "events"})
    if unknown:
        raise PayloadError(f"area_outage: unknown key {unknown[0]!r}")
    area, ts_ms, events = doc.get("area"), doc.get("ts_ms"), doc.get("events")
    if not isinstance(area, str):
        raise PayloadError("area_outage: area must be a string")
    try:
        return AreaOutage(area, ts_ms, events)  # type: ignore[arg-type]
    except ValueError as exc:
        raise PayloadError(f"area_outage: {exc}") from None
