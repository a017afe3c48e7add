"""Aggregates published by ingest for downstream consumers (fee control, billing), JSON v1.

Topics (QoS 1):

* ``ami/v1/agg/intervals/{gateway}`` -- validated interval consumption, one message per
  ingested batch: ``{"v": 1, "type": "intervals", "gateway", "batch_seq", "intervals": [...]}``
  with items ``{"meter", "quantity", "start_ms", "end_ms", "energy", "flags"}``. ``energy`` is
  the register delta in the quantity's fixed point (0.01 kWh); ``flags`` carries the quality
  bits (``ESTIMATED`` for estimated intervals).
* ``ami/v1/agg/daily/{gateway}`` -- daily time-of-use totals per meter:
  ``{"v": 1, "type": "daily", "gateway", "days": [...]}`` with items ``{"meter", "day",
  "total", "sharp", "peak", "flat", "valley", "estimated_intervals", "intervals"}``.

Every item is keyed by ``(meter, quantity, start_ms)`` (intervals) or ``(meter, day)`` (daily):
a redelivered or replayed message carries the same keys, and consumers apply each key once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from protocols.errors import PayloadError
from protocols.payload import load_json_message

__all__ = [
    "DailyTotal",
    "IntervalRecord",
    "decode_daily",
    "decode_intervals",
    "encode_daily",
    "encode_intervals",
]

VERSION = 1
_MAX = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class IntervalRecord:
    meter: str
    quantity: int
    start_ms: int
    end_ms: int
    energy: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class DailyTotal:
    meter: str
    day: str  # YYYY-MM-DD, local calendar day of the tariff zone
    total: int
    sharp: int
    peak: int
    flat: int
    valley: int
    intervals: int
    estimated_intervals: int


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def encode_intervals(gateway: str, batch_seq: int, items: Sequence[IntervalRecord]) -> bytes:
    return _dump(
        {
            "v": VERSION,
            "type": "intervals",
            "gateway": gateway,
            "batch_seq": batch_seq,
            "intervals": [asdict(i) for i in items],
        }
    )


def encode_daily(gateway: str, items: Sequence[DailyTotal]) -> bytes:
    return _dump({"v": VERSION, "type": "daily", "gateway": gateway, "days": [asdict(i) for i in items]})


def _load(data: bytes, kind: str, key: str) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    doc = load_json_message(data, kind, max_bytes=_MAX)
    items = doc.get(key)
    if not isinstance(doc.get("gateway"), str) or not isinstance(items, list):
        raise PayloadError(f"{kind}: 'gateway' must be a string and '{key}' a list")
    return doc["gateway"], items, doc


def _items(cls: type, items: list[Any], kind: str) -> list[Any]:
    fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != set(fields):
            raise PayloadError(f"{kind}[{i}]: expected keys {sorted(fields)}")
        for name, f in fields.items():
            want = str if f.type in ("str", str) else int
            value = item[name]
            if not isinstance(value, want) or isinstance(value, bool):
                raise PayloadError(f"{kind}[{i}].{name}: expected {want.__name__}")
        out.append(cls(**item))
    return out


def decode_intervals(data: bytes) -> tuple[str, int, list[IntervalRecord]]:
    """``(gateway, batch_seq, records)``. Raises :class:`PayloadError`."""
    gateway, items, doc = _load(data, "intervals", "intervals")
    seq = doc.get("batch_seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise PayloadError("intervals: 'batch_seq' must be an integer")
    return gateway, seq, _items(IntervalRecord, items, "intervals")


def decode_daily(data: bytes) -> tuple[str, list[DailyTotal]]:
    """``(gateway, totals)``. Raises :class:`PayloadError`."""
    gateway, items, _ = _load(data, "daily", "days")
    return gateway, _items(DailyTotal, items, "daily")
