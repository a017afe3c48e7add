"""Aggregates published by ingest for downstream consumers (fee control, billing).

Topics (QoS 1):

* ``ami/v1/agg/intervals/{gateway}`` -- validated interval consumption, one message per
  ingested batch, in one of two encodings (``decode_intervals`` recognises either from its
  first bytes; ingest's ``pipeline.aggregates_encoding`` picks, binary by default):

  - JSON: ``{"v": 1, "type": "intervals", "gateway", "batch_seq", "intervals": [...]}`` with
    items ``{"meter", "quantity", "start_ms", "end_ms", "energy", "flags"}``;
  - binary, columnar like the readings payload (a third of the JSON's bytes, and no text to
    format or parse per interval)::

        b"AMA" 0x02  msgpack map {"t": "intervals", "gw": str, "seq": int, "meters": [str, ...],
                                  "meter": bin(u32le*n), "q": bin(u16le*n), "start": bin(i64le*n),
                                  "end": bin(i64le*n), "e": bin(i64le*n), "f": bin(u32le*n)}

    Binary version 2 (written) carries the 32 flag bits; version 1 (``b"AMA" 0x01``, the same
    map with ``"f": bin(u16le*n)``) is still decoded, widened, so an older ingest keeps working.
    JSON numbers have no width: JSON stays ``"v": 1`` with flags up to 32 bits.

  ``energy`` is the register delta in the quantity's fixed point (0.01 kWh); ``flags`` carries
  the quality bits (``ESTIMATED`` for estimated intervals); ``meter`` indexes ``meters``.
* ``ami/v1/agg/daily/{gateway}`` -- daily time-of-use totals per meter:
  ``{"v": 1, "type": "daily", "gateway", "days": [...]}`` with items ``{"meter", "day",
  "total", "sharp", "peak", "flat", "valley", "estimated_intervals", "intervals"}``.

Every item is keyed by ``(meter, quantity, start_ms)`` (intervals) or ``(meter, day)`` (daily):
a redelivered or replayed message carries the same keys, and consumers apply each key once.
"""

from __future__ import annotations

import array
import functools
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from protocols.errors import PayloadError
from protocols.payload import (
    _I64,
    _U16,
    _U32,
    _column_bytes,
    _column_from_bytes,
    _flags_from_u16,
    _get,
    _id_table,
    _uint63,
    load_json_message,
)

__all__ = [
    "INTERVALS_MAGIC",
    "MAX_MESSAGE_BYTES",
    "DailyTotal",
    "IntervalRecord",
    "decode_daily",
    "decode_intervals",
    "encode_daily",
    "encode_daily_columns",
    "encode_interval_columns",
    "encode_intervals",
]

VERSION = 1  # JSON messages
INTERVALS_BINARY_VERSION = 2  # written; 1 (u16 flags) is decoded too
INTERVALS_MAGIC = b"AMA" + bytes([INTERVALS_BINARY_VERSION])
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""The largest aggregates message decoded (either encoding)."""
# (wire key, record field, column spec) of the binary intervals columns, in record order
_COLUMNS = (
    ("meter", "meter", _U32),
    ("q", "quantity", _U16),
    ("start", "start_ms", _I64),
    ("end", "end_ms", _I64),
    ("e", "energy", _I64),
    ("f", "flags", _U32),  # u16 in binary version 1
)


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


_JSON_ITEM = '{"meter":%s,"quantity":%d,"start_ms":%d,"end_ms":%d,"energy":%d,"flags":%d}'


@functools.lru_cache(maxsize=65_536)
def _json_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def encode_interval_columns(
    gateway: str,
    batch_seq: int,
    meters: Sequence[str],
    columns: Sequence[Any],
    encoding: Literal["json", "binary"] = "binary",
) -> bytes:
    """The intervals message from columns ``(meter index, quantity, start_ms, end_ms, energy,
    flags)``, ``meter`` indexing ``meters``: buffers of integers (``array.array``, numpy arrays).
    Binary: u32, u16, i64, i64, i64, u32 items (TypeError for a column of another type). JSON: the
    same text :func:`encode_intervals` writes, formatted in one ``%`` over all the rows (no
    object per row besides the column values). Raises ValueError for an unknown encoding or (JSON)
    a meter index off the table."""
    if encoding == "json":
        meter, *rest = (memoryview(c).tolist() for c in columns)
        names = [_json_str(m) for m in meters]  # per meter, not per interval
        if meter and max(meter) >= len(names):
            raise ValueError(f"column 'meter': index {max(meter)} beyond {len(names)} meter ids")
        values = tuple(itertools.chain.from_iterable(zip(map(names.__getitem__, meter), *rest, strict=True)))
        items = ",".join([_JSON_ITEM] * len(meter)) % values
        head = _dump(
            {"v": VERSION, "type": "intervals", "gateway": gateway, "batch_seq": batch_seq, "intervals": []}
        )
        return head[:-2] + items.encode() + b"]}"
    if encoding != "binary":
        raise ValueError(f"unknown encoding {encoding!r}: expected 'json' or 'binary'")
    body: dict[str, Any] = {"t": "intervals", "gw": gateway, "seq": batch_seq, "meters": list(meters)}
    for (key, name, spec), col in zip(_COLUMNS, columns, strict=True):
        body[key] = _column_bytes(name, col, spec)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return INTERVALS_MAGIC + packed


def encode_intervals(
    gateway: str,
    batch_seq: int,
    items: Sequence[IntervalRecord],
    encoding: Literal["json", "binary"] = "json",
) -> bytes:
    """The intervals message of ``items`` (see the module docstring for both encodings): their
    columns through :func:`encode_interval_columns`, the one encoder of both."""
    if encoding not in ("json", "binary"):
        raise ValueError(f"unknown encoding {encoding!r}: expected 'json' or 'binary'")
    index: dict[str, int] = {}
    cols = [array.array(spec[0]) for _, _, spec in _COLUMNS]
    for it in items:
        cols[0].append(index.setdefault(it.meter, len(index)))
        row = (it.quantity, it.start_ms, it.end_ms, it.energy, it.flags)
        for col, value in zip(cols[1:], row, strict=True):
            col.append(value)
    return encode_interval_columns(gateway, batch_seq, list(index), cols, encoding)


_DAILY_INT_FIELDS = tuple(f for f in DailyTotal.__dataclass_fields__ if f not in ("meter", "day"))
_DAILY_ITEM = '{"meter":%s,"day":%s,' + ",".join(f'"{f}":%d' for f in _DAILY_INT_FIELDS) + "}"


def encode_daily(gateway: str, items: Sequence[DailyTotal]) -> bytes:
    """The daily message of ``items``: :func:`encode_daily_columns` of their fields."""
    values = [[getattr(i, f) for f in _DAILY_INT_FIELDS] for i in items]
    return encode_daily_columns(gateway, [i.meter for i in items], [i.day for i in items], values)


def encode_daily_columns(
    gateway: str, meters: Sequence[str], days: Sequence[str], values: Sequence[Sequence[int]]
) -> bytes:
    """The daily message of items given as columns: item r is meter ``meters[r]``, day
    ``days[r]`` and the integer fields of :class:`DailyTotal` after those two, in their order,
    ``values[r]``. One ``%`` format per item, no object per item."""
    rows = [
        _DAILY_ITEM % (_json_str(m), _json_str(d), *v) for m, d, v in zip(meters, days, values, strict=True)
    ]
    head = _dump({"v": VERSION, "type": "daily", "gateway": gateway, "days": []})
    return head[:-2] + ",".join(rows).encode() + b"]}"


def _load(data: bytes, kind: str, key: str) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    doc = load_json_message(data, kind, max_bytes=MAX_MESSAGE_BYTES)
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
    """``(gateway, batch_seq, records)`` of either encoding. Raises :class:`PayloadError`."""
    if data[:3] == INTERVALS_MAGIC[:3]:
        return _decode_binary_intervals(data)
    gateway, items, doc = _load(data, "intervals", "intervals")
    seq = doc.get("batch_seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise PayloadError("intervals: 'batch_seq' must be an integer")
    return gateway, seq, _items(IntervalRecord, items, "intervals")


def decode_daily(data: bytes) -> tuple[str, list[DailyTotal]]:
    """``(gateway, totals)``. Raises :class:`PayloadError`."""
    gateway, items, _ = _load(data, "daily", "days")
    return gateway, _items(DailyTotal, items, "daily")


def _decode_binary_intervals(data: bytes) -> tuple[str, int, list[IntervalRecord]]:
    n = len(data)
    if n > MAX_MESSAGE_BYTES:
        raise PayloadError(f"intervals: {n} bytes exceeds the {MAX_MESSAGE_BYTES}-byte bound")
    if n < 4 or data[3] not in (1, INTERVALS_BINARY_VERSION):
        raise PayloadError(f"intervals: binary version {data[3] if n > 3 else None} not supported")
    try:
        body = msgpack.unpackb(
            data[4:], raw=False, strict_map_key=True, max_str_len=n, max_bin_len=n,
            max_array_len=n, max_map_len=n, max_ext_len=0,
        )  # fmt: skip
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise PayloadError(f"intervals: binary {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict) or body.get("t") != "intervals":
        raise PayloadError("intervals: binary message is not of type 'intervals'")
    gateway = _get(body, "gw", str)
    seq = _uint63(_get(body, "seq", int), "seq")
    meters = _id_table(_get(body, "meters", list), "meters")
    raw = {key: _get(body, key, bytes) for key, _, _ in _COLUMNS}
    if data[3] == 1:
        raw["f"] = _flags_from_u16(raw["f"])
    cols = [_column_from_bytes(name, raw[key], spec) for key, name, spec in _COLUMNS]
    if len({len(c) for c in cols}) > 1:
        raise PayloadError("intervals: columns differ in length: " + "/".join(str(len(c)) for c in cols))
    meter, quantity, start, end, energy, flags = (c.tolist() for c in cols)
    if meter and max(meter) >= len(meters):
        raise PayloadError(f"intervals: meter index {max(meter)} outside the {len(meters)}-entry meter table")
    return (
        gateway,
        seq,
        [
            IntervalRecord(meters[m], q, a, b, e, f)
            for m, q, a, b, e, f in zip(meter, quantity, start, end, energy, flags, strict=True)
        ],
    )
