"""InfluxDB line protocol of everything the pipeline stores (the InfluxDB sink's encoding).

Contract
--------
* :func:`encode_writes` turns :class:`~ingest.sinks.base.Writes` into line protocol (``ms``
  timestamps, one point per ``\\n``-terminated line). Readings, intervals and the rolled-up
  daily/hourly rows are encoded by numba kernels (:mod:`ingest.sinks.influx.kernels`) from the
  columns: no Python object per reading, interval or row. The schema (measurements, tags, fields) is
  ``docs/ingest-kernels.md``'s and is the stored contract: it must not change byte for byte.
* Tag values go through :func:`escape_tag` (reversible: :func:`unescape_tag` of what InfluxDB
  returns); :func:`stored_tag` is the value InfluxDB stores, what a query compares with.
* :class:`TagCache` keeps the escaped tag tables per (meter table, gateway): a gateway sends the
  same meter table batch after batch, and escaping 500 ids costs more than the batch's whole
  encoding. It holds derived bytes only, so it cannot change an output.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ingest.rules import stages as st
from ingest.sinks.base import AreaAlarm, BatchColumns, PeriodTotals, Rollup, Writes
from ingest.sinks.influx import kernels as k
from protocols.payload import Event
from protocols.quantities import QUANTITIES

__all__ = [
    "LineTables",
    "TagCache",
    "area_alarm_line",
    "encode_batch",
    "encode_int_lines",
    "encode_lines",
    "encode_writes",
    "escape_tag",
    "event_line",
    "field_str",
    "rollup_lines",
    "stored_tag",
    "unescape_stored",
    "unescape_tag",
]

I64 = npt.NDArray[np.int64]
_TAG_CACHE_MAX = 256  # meter tables kept: one per active gateway is the steady state

_BACKSLASH_ESCAPED = {ord(","): b"\\,", ord("="): b"\\=", ord(" "): b"\\ "}


def escape_tag(text: str) -> bytes:
    """Tag key/value bytes that cannot break out of their tag, reversibly (see docs).

    Step 1, percent-encoding: ``%``, ``\\``, every C0 control (``\\n``, ``\\r``, ``\\t``…) and DEL become
    ``%XX`` (line protocol cannot carry a raw newline, and a trailing or doubled backslash is read
    differently by InfluxDB 1.x and 2.x). Step 2, line protocol: comma, equals and space get a
    backslash. Quotes and non-ASCII (UTF-8) pass through. Raises: ValueError for an empty string
    (InfluxDB rejects an empty tag value)."""
    if not text:
        raise ValueError("an empty string cannot be a tag value")
    out = bytearray()
    for b in text.encode("utf-8"):
        if b < 0x20 or b in (0x25, 0x5C, 0x7F):
            out += b"%%%02X" % b
        elif b in _BACKSLASH_ESCAPED:
            out += _BACKSLASH_ESCAPED[b]
        else:
            out.append(b)
    return bytes(out)


def unescape_tag(raw: str) -> str:
    """Inverse of :func:`escape_tag` applied to the tag value a parser returns (after it removed
    the line-protocol backslashes): percent-decoding."""
    out = bytearray()
    data = raw.encode("utf-8")
    i = 0
    while i < len(data):
        if data[i] == 0x25:
            out.append(int(data[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(data[i])
            i += 1
    return out.decode("utf-8")


def _table(parts: list[bytes]) -> tuple[npt.NDArray[np.uint8], I64]:
    off = np.zeros(len(parts) + 1, dtype=np.int64)
    off[1:] = np.cumsum([len(p) for p in parts])
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy(), off


_FIELD_NAMES = [b"q%d" % c for c in range(1 << 16)]
for _q in QUANTITIES:
    _FIELD_NAMES[_q.code] = _q.name.encode()
FNAME, FNAME_OFF = _table(_FIELD_NAMES)
FNAME_LEN = np.diff(FNAME_OFF)


@dataclass(frozen=True, slots=True)
class LineTables:
    """Escaped ``measurement,meter=<id>,gateway=<gw>`` prefix per meter of one batch."""

    head: npt.NDArray[np.uint8]
    head_off: I64

    @classmethod
    def build(
        cls, meter_ids: list[str] | tuple[str, ...], gateway_id: str, measurement: str = "meter_reading"
    ) -> LineTables:
        """Escape once per batch (per meter, not per reading). Raises: ValueError for an empty id."""
        gw = escape_tag(gateway_id)
        meas = measurement.encode().replace(b",", b"\\,").replace(b" ", b"\\ ")
        return cls(*_table([meas + b",meter=" + escape_tag(m) + b",gateway=" + gw for m in meter_ids]))


def encode_lines(
    readings: st.Readings, tables: LineTables, *, wide: bool = False, order: I64 | None = None
) -> bytes:
    """Line protocol (ms timestamps) for a batch; narrow = one point per reading, wide = one point
    per (meter, ts) with a field per quantity. ``order`` is :func:`sort_order` of ``readings`` when
    the caller has it (``Checked.order``). Raises: ValueError for a meter index off the table."""
    nmeters = tables.head_off.shape[0] - 1
    if len(readings) and int(readings.meter.max()) >= nmeters:
        raise ValueError(f"column 'meter': index {int(readings.meter.max())} beyond {nmeters} meter ids")
    head_len = np.diff(tables.head_off)
    bound = int((head_len[readings.meter] + 2 * FNAME_LEN[readings.quantity] + 100).sum())
    buf = np.empty(bound, dtype=np.uint8)
    if order is None:
        order = st.sort_order(readings)
    elif order.shape[0] != len(readings):
        raise ValueError(f"order: {order.shape[0]} positions for {len(readings)} readings")
    used = k.encode_lines(
        order,
        readings.meter,
        readings.ts,
        readings.quantity,
        readings.value,
        readings.flags,
        tables.head,
        tables.head_off,
        FNAME,
        FNAME_OFF,
        st.Q_DECIMALS,
        wide,
        buf,
    )
    return buf[:used].tobytes()


def encode_int_lines(
    heads: LineTables,
    row_head: I64,
    texts: list[bytes],
    row_text: I64,
    names: list[bytes],
    values: I64,
    ts: I64,
) -> bytes:
    """Points with one string field and integer fields, one per row (see the kernel):
    ``names[0]`` is the string field's ``key=``, ``names[1:]`` the integer fields' ``key=``, one per
    column of ``values`` (rows x fields, int64). Raises: ValueError on shape or index mismatches."""
    n = ts.shape[0]
    if values.ndim != 2 or values.shape[0] != n or values.shape[1] != len(names) - 1:
        raise ValueError(f"values: expected ({n}, {len(names) - 1}), got {values.shape}")
    if row_head.shape[0] != n or row_text.shape[0] != n:
        raise ValueError("row_head and row_text need one entry per row")
    if n and (int(row_head.max()) >= heads.head_off.shape[0] - 1 or int(row_text.max()) >= len(texts)):
        raise ValueError("row_head or row_text: index beyond its table")
    text, text_off = _table(texts)
    name, name_off = _table(names)
    per_row = int(name_off[-1]) + 23 * (len(names) + 1) + 4
    bound = int(np.diff(heads.head_off)[row_head].sum() + np.diff(text_off)[row_text].sum()) + n * per_row
    buf = np.empty(bound, dtype=np.uint8)
    used = k.encode_int_lines(
        heads.head, heads.head_off, row_head.astype(np.int64), text, text_off, row_text.astype(np.int64),
        name, name_off, np.ascontiguousarray(values, dtype=np.int64), ts.astype(np.int64), buf,
    )  # fmt: skip
    return buf[:used].tobytes()


@functools.lru_cache(maxsize=65_536)
def stored_tag(text: str) -> str:
    """The tag value InfluxDB stores for ``text`` (``escape_tag`` minus line-protocol escapes)."""
    raw = escape_tag(text).decode("utf-8")
    return raw.replace("\\,", ",").replace("\\=", "=").replace("\\ ", " ")


@functools.lru_cache(maxsize=65_536)
def unescape_stored(raw: str) -> str:
    """:func:`unescape_tag`, cached (query results repeat the same meters)."""
    return unescape_tag(raw)


def field_str(text: str) -> bytes:
    """A line-protocol string field value (quoted, ``\\``, ``"`` and newlines escaped)."""
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").encode() + b'"'


class _Tags:
    """Escaped tag values of one meter table and gateway, with the line tables built from them."""

    def __init__(self, meter_ids: tuple[str, ...], gateway: str) -> None:
        self.meters = [escape_tag(m) for m in meter_ids]
        self.gateway = escape_tag(gateway)
        self._tables: dict[bytes, LineTables] = {}

    def table(self, measurement: bytes) -> LineTables:
        t = self._tables.get(measurement)
        if t is None:
            tail = b",gateway=" + self.gateway
            t = self._tables[measurement] = LineTables(
                *_table([measurement + b",meter=" + m + tail for m in self.meters])
            )
        return t


class TagCache:
    """(meter ids, gateway) -> escaped tags, at most ``_TAG_CACHE_MAX`` (oldest dropped first)."""

    def __init__(self) -> None:
        self._d: dict[tuple[tuple[str, ...], str], _Tags] = {}

    def get(self, meter_ids: tuple[str, ...], gateway: str) -> _Tags:
        key = (meter_ids, gateway)
        tags = self._d.get(key)
        if tags is None:
            if len(self._d) >= _TAG_CACHE_MAX:
                del self._d[next(iter(self._d))]
            tags = self._d[key] = _Tags(meter_ids, gateway)
        return tags


def _period_lines(tags: _Tags, measurement: bytes, label: bytes, p: PeriodTotals) -> bytes:
    names = [label + b"=", *(f + b"=" for f in p.fields)]
    return encode_int_lines(tags.table(measurement), p.meter, list(p.labels), p.bucket, names, p.values, p.ts)


def encode_batch(b: BatchColumns, cache: TagCache, *, wide: bool) -> bytes:
    """The line protocol of one batch: ``meter_reading`` (wide or narrow), ``reading_duplicate``
    (narrow), ``intervals`` (wide), ``events`` (voltage_collapsed)."""
    tags = cache.get(b.meter_ids, b.gateway)
    parts = [encode_lines(b.readings, tags.table(b"meter_reading"), wide=wide, order=b.order)]
    if b.duplicates is not None:  # their own series, so they never overwrite the first arrival
        parts.append(encode_lines(b.duplicates, tags.table(b"reading_duplicate")))
    iv = b.intervals
    # wide, like the readings: one point per (meter, interval end), a field per energy channel
    iv_r = st.Readings(iv.meter, iv.end_ts, iv.quantity, iv.energy, iv.flags)
    parts.append(encode_lines(iv_r, tags.table(b"intervals"), wide=True))
    for m, t in zip(b.collapsed_meter.tolist(), b.collapsed_ts.tolist(), strict=True):  # per event
        parts.append(
            b'events,gateway=%s,meter=%s,kind=voltage_collapsed id=%s,detail="{}" %d\n'
            % (tags.gateway, tags.meters[m], field_str(f"vc-{b.meter_ids[m]}-{t}"), t)
        )
    return b"".join(parts)


def event_line(ev: Event) -> bytes:
    """``events`` point of one edge event (tags gateway, meter, kind; fields id, detail JSON)."""
    tags = b"events,gateway=" + escape_tag(ev.gateway)
    if ev.meter:
        tags += b",meter=" + escape_tag(ev.meter)
    tags += b",kind=" + escape_tag(ev.kind)
    detail = json.dumps(ev.detail, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return tags + b" id=%s,detail=%s %d\n" % (field_str(ev.id), field_str(detail), ev.ts_ms)


def area_alarm_line(a: AreaAlarm) -> bytes:
    """``alarms`` point of an OUT-02 area outage (tags area, kind=area_outage; field events)."""
    return b"alarms,area=%s,kind=area_outage events=%di %d\n" % (escape_tag(a.area), a.events, a.ts_ms)


_ROLLUP = {"day": (b"daily_tou", b"day"), "hour": (b"hourly", b"hour")}


def rollup_lines(r: Rollup, cache: TagCache) -> bytes:
    """``daily_tou`` or ``hourly`` points of one rollup: a label field (``day``/``hour``) and the
    integer totals, one point per (meter, period), stamped with the period's start."""
    measurement, label = _ROLLUP[r.kind]
    return _period_lines(cache.get(r.meter_ids, r.gateway), measurement, label, r.rows)


def encode_writes(w: Writes, cache: TagCache, *, wide: bool) -> bytes:
    """Line protocol of every record of ``w`` (batches, rollups, edge events, alarms), in that
    order."""
    parts = [encode_batch(b, cache, wide=wide) for b in w.batches]
    parts += [rollup_lines(r, cache) for r in w.rollups]
    parts += [event_line(ev) for ev in w.events]
    parts += [area_alarm_line(a) for a in w.area_alarms]
    parts += [
        b"alarms,gateway=%s,kind=%s gaps=%di,missing=%di,first=%di,last=%di %d\n"
        % (escape_tag(a.gateway), a.kind.encode(), a.gaps, a.missing, a.first, a.last, a.ts_ms)
        for a in w.loss_alarms
    ]
    return b"".join(parts)
