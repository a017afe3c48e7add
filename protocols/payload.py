"""MQTT payload v1: reading batches (binary and JSON) and the small JSON messages.

Contract
--------
* :func:`encode` turns a :class:`ReadingBatch` into bytes, ``encoding="binary"`` (default) or
  ``"json"``. :func:`decode` takes any payload bytes and returns a :class:`ReadingBatch`; the
  encoding and the version are recognised from the bytes themselves.
* Malformed input -- truncated, wrong types, inconsistent lengths, unknown version, oversize --
  raises :class:`~protocols.errors.PayloadError` with a reason, and nothing else.
* Decoding binary creates no per-reading Python objects: each column is one typed
  ``memoryview`` over one ``bytes`` object, which ingest wraps with ``numpy.frombuffer`` without
  a copy. This module never imports numpy (the edge must stay small).

Binary layout (``docs/payload.md`` has the full schema and an example)::

    b"AMI" 0x01  msgpack map {"t": "readings", "gw": str, "seq": int, "meters": [str, ...],
                              "meter": bin(u32le * n), "ts": bin(i64le * n), "q": bin(u16le * n),
                              "v": bin(i64le * n), "f": bin(u16le * n),
                              "prev": {"meter": bin(u32le*k), "q": bin(u16le*k),
                                       "v": bin(i64le*k), "ts": bin(i64le*k)},
                              "sent": int}

JSON starts with ``{`` and carries ``"v": 1, "type": "readings"``.
"""

from __future__ import annotations

import array
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from protocols.errors import PayloadError

__all__ = [
    "MAGIC",
    "MAX_PAYLOAD_BYTES",
    "VERSION",
    "BatchBuilder",
    "Column",
    "Event",
    "PrevRegisters",
    "ReadingBatch",
    "Status",
    "decode",
    "decode_event",
    "decode_status",
    "encode",
    "load_json_message",
]

VERSION = 1
MAGIC = b"AMI" + bytes([VERSION])
# A batch is one bus-cycle of readings; 16 MiB is ~600,000 readings, far past any real batch.
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
_MAX_ID_LEN = 256
_UINT63 = (1 << 63) - 1

Column = array.array | memoryview  # type: ignore[type-arg]
"""A column: ``array.array`` at the edge, a typed ``memoryview`` after binary decode. Anything
exposing a contiguous buffer of the right item size works for :func:`encode` (numpy arrays too)."""

# column name -> (array typecode, item size, accepted memoryview formats)
_I64 = ("q", 8, frozenset({"q", "l"}))
_U32 = ("I", 4, frozenset({"I", "L"}))
_U16 = ("H", 2, frozenset({"H"}))
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def _empty(spec: tuple[str, int, frozenset[str]]) -> array.array:  # type: ignore[type-arg]
    return array.array(spec[0])


def _as_view(name: str, col: Any, spec: tuple[str, int, frozenset[str]]) -> memoryview:
    """A flat memoryview of ``col``, checked for the column's item type (programming errors)."""
    try:
        view = memoryview(col)
    except TypeError:
        raise TypeError(
            f"column {name!r}: expected a buffer (array.array, memoryview), got {type(col).__name__}"
        ) from None
    fmt = view.format.lstrip("@=<")
    if view.ndim != 1 or view.itemsize != spec[1] or fmt not in spec[2]:
        raise TypeError(
            f"column {name!r}: expected 1-d items of type {spec[0]!r}, got format {view.format!r}"
        )
    if not view.c_contiguous:
        raise TypeError(f"column {name!r}: must be contiguous")
    return view


def _column_bytes(name: str, col: Any, spec: tuple[str, int, frozenset[str]]) -> bytes:
    view = _as_view(name, col, spec)
    if _BIG_ENDIAN_HOST:  # the wire is little-endian
        swapped = array.array(spec[0], view.tobytes())
        swapped.byteswap()
        return swapped.tobytes()
    return view.tobytes()


def _flags_to_u16(raw: bytes) -> bytes:
    """u32le flags as the u16le items of the v1 wire; ValueError if a bit above 15 is set
    (dropping it would lose a quality flag). Byte slicing: C speed, no object per reading."""
    high = raw[2::4] + raw[3::4]
    if high.count(0) != len(high):
        raise ValueError("column 'flags': a bit above 15 is set; payload v1 carries 16 flag bits")
    out = bytearray(len(raw) // 2)
    out[0::2] = raw[0::4]
    out[1::2] = raw[1::4]
    return bytes(out)


def _flags_from_u16(raw: bytes) -> bytes:
    """The v1 wire's u16le flags widened to u32le (high halves zero). PayloadError for an odd
    number of bytes."""
    if len(raw) % 2:
        raise PayloadError(f"column 'flags': {len(raw)} bytes is not a multiple of 2")
    out = bytearray(2 * len(raw))
    out[0::4] = raw[0::2]
    out[1::4] = raw[1::2]
    return bytes(out)


def _column_from_bytes(name: str, raw: bytes, spec: tuple[str, int, frozenset[str]]) -> Column:
    if len(raw) % spec[1]:
        raise PayloadError(f"column {name!r}: {len(raw)} bytes is not a multiple of {spec[1]}")
    if _BIG_ENDIAN_HOST:
        col = array.array(spec[0], raw)
        col.byteswap()
        return col
    view: memoryview = memoryview(raw).cast(spec[0])  # type: ignore[call-overload]  # typecode from the spec
    return view


@dataclass(frozen=True, slots=True)
class PrevRegisters:
    """For each cumulative channel in a batch, the previous value and time the edge sent.

    It makes every batch self-contained: any ingest worker can compute interval deltas for the
    batch's first readings without having seen the previous batch."""

    meter: Column = field(default_factory=lambda: _empty(_U32))
    quantity: Column = field(default_factory=lambda: _empty(_U16))
    value: Column = field(default_factory=lambda: _empty(_I64))
    ts: Column = field(default_factory=lambda: _empty(_I64))

    def __post_init__(self) -> None:
        n = len(_as_view("prev.meter", self.meter, _U32))
        for name, col, spec in (
            ("prev.quantity", self.quantity, _U16),
            ("prev.value", self.value, _I64),
            ("prev.ts", self.ts, _I64),
        ):
            if len(_as_view(name, col, spec)) != n:
                raise ValueError(f"column {name!r}: length differs from prev.meter ({n})")

    def __len__(self) -> int:
        return len(self.meter)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrevRegisters):
            return NotImplemented
        return all(
            list(a) == list(b)
            for a, b in zip(
                (self.meter, self.quantity, self.value, self.ts),
                (other.meter, other.quantity, other.value, other.ts),
                strict=True,
            )
        )


@dataclass(frozen=True, slots=True, eq=False)
class ReadingBatch:
    """A columnar batch of readings from one gateway, with its per-gateway sequence number.

    ``meter[i]`` indexes ``meters`` (the batch's meter-id table); ``ts`` is epoch ms (meter time
    where the meter reports it); ``quantity`` a quantity code; ``value`` the fixed-point value;
    ``flags`` the quality bits (:mod:`protocols.flags`). ``sent_ms`` is when the edge built it.
    Construction checks shapes and types (``TypeError``/``ValueError``: a programming error);
    :func:`decode` turns the same problems in received bytes into ``PayloadError``.
    """

    gateway: str
    seq: int
    meters: tuple[str, ...]
    meter: Column
    ts: Column
    quantity: Column
    value: Column
    flags: Column
    prev: PrevRegisters = field(default_factory=PrevRegisters)
    sent_ms: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.gateway, str) or not self.gateway or len(self.gateway) > _MAX_ID_LEN:
            raise ValueError(f"gateway: expected a non-empty str of at most {_MAX_ID_LEN} chars")
        if not isinstance(self.seq, int) or not 0 <= self.seq <= _UINT63:
            raise ValueError(f"seq: expected an int in 0..2**63-1, got {self.seq!r}")
        if not isinstance(self.sent_ms, int) or not 0 <= self.sent_ms <= _UINT63:
            raise ValueError(f"sent_ms: expected an int in 0..2**63-1, got {self.sent_ms!r}")
        if not isinstance(self.meters, tuple) or not _all_str(self.meters):
            raise TypeError("meters: expected a tuple of str")
        n = len(_as_view("meter", self.meter, _U32))
        for name, col, spec in (
            ("ts", self.ts, _I64),
            ("quantity", self.quantity, _U16),
            ("value", self.value, _I64),
            ("flags", self.flags, _U32),
        ):
            if len(_as_view(name, col, spec)) != n:
                raise ValueError(f"column {name!r}: length differs from 'meter' ({n})")

    def __len__(self) -> int:
        return len(self.meter)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReadingBatch):
            return NotImplemented
        return (
            (self.gateway, self.seq, self.meters, self.sent_ms)
            == (other.gateway, other.seq, other.meters, other.sent_ms)
            and all(list(a) == list(b) for a, b in zip(self._columns(), other._columns(), strict=True))
            and self.prev == other.prev
        )

    def _columns(self) -> tuple[Column, ...]:
        return (self.meter, self.ts, self.quantity, self.value, self.flags)

    def check_meter_indices(self) -> None:
        """Raise ``PayloadError`` if a ``meter`` or ``prev.meter`` index is outside ``meters``.

        Iterates in C over the columns (``max``); ingest may do the same check vectorised."""
        limit = len(self.meters)
        for name, col in (("meter", self.meter), ("prev.meter", self.prev.meter)):
            if len(col) and max(col) >= limit:
                raise PayloadError(f"column {name!r}: index {max(col)} outside the {limit}-entry meter table")


class BatchBuilder:
    """Collects readings into columns at the edge (one append per reading, stdlib arrays).

    >>> b = BatchBuilder()
    >>> b.add("000012345678", 1_700_000_000_000, 1, 12345)
    >>> batch = b.build("gw-1", seq=7)
    """

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._cols = tuple(_empty(s) for s in (_U32, _I64, _U16, _I64, _U32))
        self._prev = tuple(_empty(s) for s in (_U32, _U16, _I64, _I64))
        self._prev_keys: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        return len(self._cols[0])

    def _meter_index(self, meter_id: str) -> int:
        idx = self._index.get(meter_id)
        if idx is None:
            idx = self._index[meter_id] = len(self._index)
        return idx

    def add(self, meter_id: str, ts_ms: int, quantity: int, value: int, flags: int = 0) -> None:
        m = self._meter_index(meter_id)
        for col, v in zip(self._cols, (m, ts_ms, quantity, value, flags), strict=True):
            col.append(v)

    def set_prev(self, meter_id: str, quantity: int, value: int, ts_ms: int) -> None:
        """Record the previous sent value of a cumulative channel (once per channel per batch)."""
        m = self._meter_index(meter_id)
        if (m, quantity) in self._prev_keys:
            return
        self._prev_keys.add((m, quantity))
        for col, v in zip(self._prev, (m, quantity, value, ts_ms), strict=True):
            col.append(v)

    def build(self, gateway: str, seq: int, sent_ms: int = 0) -> ReadingBatch:
        meter, ts, quantity, value, flags = self._cols
        return ReadingBatch(
            gateway,
            seq,
            tuple(self._index),
            meter,
            ts,
            quantity,
            value,
            flags,
            prev=PrevRegisters(*self._prev),
            sent_ms=sent_ms,
        )


# --------------------------------------------------------------------------------------------
# encode


def encode(batch: ReadingBatch, encoding: Literal["binary", "json"] = "binary") -> bytes:
    """Serialise ``batch``. Raises ``ValueError`` for an unknown encoding."""
    if encoding == "binary":
        return _encode_binary(batch)
    if encoding == "json":
        return _encode_json(batch)
    raise ValueError(f"unknown encoding {encoding!r}: expected 'binary' or 'json'")


def _encode_binary(batch: ReadingBatch) -> bytes:
    p = batch.prev
    body = {
        "t": "readings",
        "gw": batch.gateway,
        "seq": batch.seq,
        "sent": batch.sent_ms,
        "meters": list(batch.meters),
        "meter": _column_bytes("meter", batch.meter, _U32),
        "ts": _column_bytes("ts", batch.ts, _I64),
        "q": _column_bytes("quantity", batch.quantity, _U16),
        "v": _column_bytes("value", batch.value, _I64),
        "f": _flags_to_u16(_column_bytes("flags", batch.flags, _U32)),
        "prev": {
            "meter": _column_bytes("prev.meter", p.meter, _U32),
            "q": _column_bytes("prev.quantity", p.quantity, _U16),
            "v": _column_bytes("prev.value", p.value, _I64),
            "ts": _column_bytes("prev.ts", p.ts, _I64),
        },
    }
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return MAGIC + packed


def _encode_json(batch: ReadingBatch) -> bytes:
    if len(batch.flags) and max(batch.flags) > 0xFFFF:
        raise ValueError("column 'flags': a bit above 15 is set; payload v1 carries 16 flag bits")
    readings = [
        {"meter": m, "ts": t, "quantity": q, "value": v, "flags": f}
        for m, t, q, v, f in zip(*batch._columns(), strict=True)
    ]
    p = batch.prev
    prev = [
        {"meter": m, "quantity": q, "value": v, "ts": t}
        for m, q, v, t in zip(p.meter, p.quantity, p.value, p.ts, strict=True)
    ]
    doc = {
        "v": VERSION,
        "type": "readings",
        "gateway": batch.gateway,
        "seq": batch.seq,
        "sent_ms": batch.sent_ms,
        "meters": list(batch.meters),
        "readings": readings,
        "prev": prev,
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# decode


def decode(data: bytes, *, check_meter_indices: bool = True) -> ReadingBatch:
    """Decode a readings payload of either encoding.

    ``check_meter_indices=False`` skips the index bound check, for callers (ingest) that do it
    vectorised. Raises :class:`PayloadError` (only) for anything malformed.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload of {len(data)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte bound")
    if data[:3] == MAGIC[:3]:
        if len(data) < 4 or data[3] != VERSION:
            version = data[3] if len(data) > 3 else None
            raise PayloadError(f"binary payload version {version} not supported (this build reads {VERSION})")
        batch = _decode_binary(data)
    elif data.lstrip()[:1] == b"{":
        batch = _decode_json(data)
    else:
        raise PayloadError(f"not a v{VERSION} payload: starts with {data[:8].hex(' ') or 'nothing'}")
    if check_meter_indices:
        batch.check_meter_indices()
    return batch


def _get(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    if key not in doc:
        raise PayloadError(f"missing field {where}{key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PayloadError(
            f"field {where}{key!r}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}"
        )
    return value


def _all_str(values: list[Any] | tuple[Any, ...]) -> bool:
    """Every item a str (C-speed for exact str; a table holds hundreds of ids per batch)."""
    return set(map(type, values)) <= {str} or all(isinstance(m, str) for m in values)


def _id_table(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not _all_str(value) or max(map(len, value), default=0) > _MAX_ID_LEN:
        raise PayloadError(f"field {key!r}: expected a list of strings of at most {_MAX_ID_LEN} chars")
    return tuple(value)


def _uint63(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT63:
        raise PayloadError(f"field {key!r}: expected an int in 0..2**63-1, got {value!r:.40}")
    return value


def _decode_binary(data: bytes) -> ReadingBatch:
    n = len(data)
    try:
        body = msgpack.unpackb(
            data[4:],
            raw=False,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=0,
        )
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise PayloadError(f"binary payload: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise PayloadError(f"binary payload: expected a map, got {type(body).__name__}")
    if body.get("t") != "readings":
        raise PayloadError(f"binary payload: type {body.get('t')!r:.40} is not 'readings'")
    gateway = _get(body, "gw", str)
    seq = _uint63(_get(body, "seq", int), "seq")
    sent = _uint63(body.get("sent", 0), "sent")
    meters = _id_table(_get(body, "meters", list), "meters")
    cols = [
        _column_from_bytes(name, _get(body, key, bytes), spec)
        for name, key, spec in (
            ("meter", "meter", _U32),
            ("ts", "ts", _I64),
            ("quantity", "q", _U16),
            ("value", "v", _I64),
        )
    ]
    cols.append(_column_from_bytes("flags", _flags_from_u16(_get(body, "f", bytes)), _U32))
    prev_doc = _get(body, "prev", dict)
    prev = [
        _column_from_bytes(name, _get(prev_doc, key, bytes, "prev."), spec)
        for name, key, spec in (
            ("prev.meter", "meter", _U32),
            ("prev.quantity", "q", _U16),
            ("prev.value", "v", _I64),
            ("prev.ts", "ts", _I64),
        )
    ]
    return _checked_batch(gateway, seq, meters, cols, prev, sent)


def _checked_batch(
    gateway: str, seq: int, meters: tuple[str, ...], cols: list[Column], prev: list[Column], sent: int
) -> ReadingBatch:
    if not gateway or len(gateway) > _MAX_ID_LEN:
        raise PayloadError(f"field 'gateway': expected a non-empty string of at most {_MAX_ID_LEN} chars")
    if len({len(c) for c in cols}) > 1:
        raise PayloadError(
            "columns meter/ts/quantity/value/flags differ in length: " + "/".join(str(len(c)) for c in cols)
        )
    if len({len(c) for c in prev}) > 1:
        raise PayloadError("prev columns differ in length: " + "/".join(str(len(c)) for c in prev))
    meter, ts, quantity, value, flags = cols
    return ReadingBatch(
        gateway, seq, meters, meter, ts, quantity, value, flags, prev=PrevRegisters(*prev), sent_ms=sent
    )


def _json_rows(
    doc: dict[str, Any], key: str, names: tuple[str, ...], specs: tuple[tuple[str, int, frozenset[str]], ...]
) -> list[Column]:
    rows = _get(doc, key, list)
    arrays = [_empty(s) for s in specs]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PayloadError(f"{key}[{i}]: expected an object")
        for col, name in zip(arrays, names, strict=True):
            value = row.get(name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PayloadError(f"{key}[{i}].{name}: expected an integer, got {value!r:.40}")
            try:
                col.append(value)
            except OverflowError:
                raise PayloadError(f"{key}[{i}].{name}: {value} out of range for {col.typecode!r}") from None
    cols: list[Column] = [*arrays]
    return cols


def _decode_json(data: bytes) -> ReadingBatch:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PayloadError(f"json payload: {type(exc).__name__}: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError("json payload: expected an object")
    if doc.get("v") != VERSION or isinstance(doc.get("v"), bool):
        raise PayloadError(
            f"json payload version {doc.get('v')!r:.40} not supported (this build reads {VERSION})"
        )
    if doc.get("type") != "readings":
        raise PayloadError(f"json payload: type {doc.get('type')!r:.40} is not 'readings'")
    gateway = _get(doc, "gateway", str)
    seq = _uint63(_get(doc, "seq", int), "seq")
    sent = _uint63(doc.get("sent_ms", 0), "sent_ms")
    meters = _id_table(_get(doc, "meters", list), "meters")
    cols = _json_rows(
        doc, "readings", ("meter", "ts", "quantity", "value", "flags"), (_U32, _I64, _U16, _I64, _U16)
    )
    cols[4] = array.array("I", cols[4])
    prev = _json_rows(doc, "prev", ("meter", "quantity", "value", "ts"), (_U32, _U16, _I64, _I64))
    return _checked_batch(gateway, seq, meters, cols, prev, sent)


# --------------------------------------------------------------------------------------------
# small JSON messages: events and status (commands and their results: protocols.commands)


def load_json_message(data: bytes, kind: str, *, max_bytes: int = 1024 * 1024) -> dict[str, Any]:
    """Parse a small versioned JSON message (``{"v": 1, "type": kind, ...}``): events, status,
    commands and their results, aggregates. Raises :class:`PayloadError` for anything else,
    including input over ``max_bytes`` and nesting deep enough to exhaust the parser."""
    if len(data) > max_bytes:
        raise PayloadError(f"{kind} message of {len(data)} bytes is too large")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"{kind} message: {type(exc).__name__}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION or doc.get("type") != kind:
        raise PayloadError(f"not a v{VERSION} {kind} message")
    return doc


EVENT_KINDS = frozenset(
    {
        "power_down",
        "power_up",
        "relay_changed",
        "clock_adjusted",
        "cover_opened",
        "meter_replaced",
        "meter_unreachable",
        "meter_recovered",
        "outbox_dropped",
        "bus_down",
        "bus_up",
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    """A meter or gateway event, on ``ami/v1/{gateway}/up/events`` (JSON).

    ``id`` is unique per event at its gateway (ingest de-duplicates by it); ``detail`` holds
    event-specific JSON values (e.g. ``{"from": 0, "to": 1}`` for ``relay_changed``)."""

    id: str
    gateway: str
    kind: str
    ts_ms: int
    meter: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"event kind {self.kind!r} not one of {sorted(EVENT_KINDS)}")

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "v": VERSION,
                "type": "event",
                "id": self.id,
                "gateway": self.gateway,
                "kind": self.kind,
                "ts_ms": self.ts_ms,
                "meter": self.meter,
                "detail": self.detail,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()


def decode_event(data: bytes) -> Event:
    """Raises :class:`PayloadError` for anything that is not a valid v1 event."""
    doc = load_json_message(data, "event")
    meter = doc.get("meter")
    detail = doc.get("detail", {})
    if (meter is not None and not isinstance(meter, str)) or not isinstance(detail, dict):
        raise PayloadError("event: 'meter' must be a string or null and 'detail' an object")
    try:
        return Event(
            _get(doc, "id", str),
            _get(doc, "gateway", str),
            _get(doc, "kind", str),
            _uint63(_get(doc, "ts_ms", int), "ts_ms"),
            meter,
            detail,
        )
    except ValueError as exc:
        raise PayloadError(f"event: {exc}") from None


@dataclass(frozen=True, slots=True)
class Status:
    """Gateway health on ``ami/v1/{gateway}/status`` (retained). The last-will is
    ``Status(gateway, online=False)``; ``counters`` holds numbers only (reads, failures, outbox
    depth and drops by kind, read success rate in per mille)."""

    gateway: str
    online: bool
    ts_ms: int = 0
    version: str = ""
    counters: dict[str, int | float] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "v": VERSION,
                "type": "status",
                "gateway": self.gateway,
                "online": self.online,
                "ts_ms": self.ts_ms,
                "version": self.version,
                "counters": self.counters,
            },
            separators=(",", ":"),
        ).encode()


def decode_status(data: bytes) -> Status:
    """Raises :class:`PayloadError` for anything that is not a valid v1 status message."""
    doc = load_json_message(data, "status")
    counters = doc.get("counters", {})
    if not isinstance(counters, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in counters.values()
    ):
        raise PayloadError("status: 'counters' must map names to numbers")
    return Status(
        _get(doc, "gateway", str),
        _get(doc, "online", bool),
        _uint63(doc.get("ts_ms", 0), "ts_ms"),
        str(doc.get("version", "")),
        counters,
    )
