"""The VictoriaMetrics implementation of :class:`~ingest.sinks.base.Sink`: readings and
intervals in VictoriaMetrics, the records it cannot hold in InfluxDB.

Contract
--------
* VictoriaMetrics keeps float samples per series and cannot overwrite one: a second sample at
  the same timestamp with another value is kept beside the first (and its deduplication picks
  one by rules that changed between versions). So it holds what the pipeline writes once and
  rewrites only identically: ``meter_reading`` (wide or narrow), ``reading_duplicate`` and the
  worker's ``intervals`` (energies and flags), through its InfluxDB line-protocol ``/write``
  (the InfluxDB sink's encoder and writer, ``db`` label ``[victoriametrics] database``). Every
  record that is rewritten with new values, or carries strings (edge and OUT-01 events, alarms,
  ``daily_tou`` / ``hourly`` rollups, the daily report, the flags the daily job rewrites), goes
  to the ``records`` :class:`~ingest.sinks.influx.sink.InfluxSink`, which overwrites in place.
* :meth:`VictoriaSink.prepare` splits a :class:`~ingest.sinks.base.Writes` in two prepared
  writes, once; :meth:`VictoriaSink.send` posts VictoriaMetrics' bodies first, then the
  records', each resuming at its first body not done. VictoriaMetrics answers 204 and skips a
  line it cannot parse (it logs it): only the encoder's numeric lines are sent to it. It also
  answers 204 and drops samples more than two days ahead of its clock: the readings, duplicates
  and intervals stamped over ``FUTURE_BOUND_MS`` ahead of this machine's clock are not sent but
  come back rejected (reason ``beyond victoriametrics time bound``), for the caller to
  dead-letter; the records' rejections come back as InfluxDB's do.
* Reads: :meth:`day_intervals` and :meth:`completeness` come from VictoriaMetrics'
  ``/api/v1/export`` (raw samples, :mod:`.export`), with the daily job's flag rewrites (kept in
  the records store) applied over the worker's flags; every other read is the records store's.
  A series holding two different values at one time raises ``SinkError`` (not retryable)
  rather than answer one of them.
* Refusals: a write or export URL the server does not serve (a wrong cluster path) raises
  ``SinkRefused(reason="not_found")``; unreachable or 5xx ``SinkError(retryable=True)``.
* Freshness: VictoriaMetrics makes a sample searchable about a second after it is written, and
  a new series up to ~10 s after (1.79's in-memory buffers and index caches;
  ``/internal/force_flush`` makes them searchable at once). The pipeline reads back only closed
  days, ``[pipeline] rollup_delay_s`` after their last batch (docs/victoriametrics.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ingest.rules import stages as st
from ingest.rules.kernels import NOT_BILLABLE
from ingest.sinks.base import (
    AreaAlarm,
    BatchColumns,
    DaySums,
    OutageEvent,
    PreparedWrite,
    Rejected,
    StoredIntervals,
    WriteResult,
    Writes,
)
from ingest.sinks.influx.http import InfluxWriter, PreparedLines, split_lines
from ingest.sinks.influx.lines import (
    LineTables,
    TagCache,
    encode_lines,
    encode_writes,
    stored_tag,
    unescape_stored,
)
from ingest.sinks.influx.sink import InfluxSink, interval_flag_lines
from ingest.sinks.victoria.config import VictoriaConfig
from ingest.sinks.victoria.export import Series, VictoriaExport, selector
from protocols.errors import SinkRefused
from protocols.flags import Flag
from protocols.quantities import by_code, by_name

if TYPE_CHECKING:
    from ingest.reports.daily import DailyReport

__all__ = ["FUTURE_BOUND_MS", "PreparedSplit", "VictoriaSink", "split_ahead", "split_writes"]

DAY_MS = 86_400_000
# VictoriaMetrics (lib/storage) drops rows more than 2 days ahead of its clock; an hour of margin
FUTURE_BOUND_MS = 2 * DAY_MS - 3_600_000
_EPOCH = dt.date(1970, 1, 1)
_NO_I64 = np.empty(0, np.int64)
_NO_READINGS = st.Readings(
    np.empty(0, np.uint32), _NO_I64, np.empty(0, np.uint16), _NO_I64, np.empty(0, np.uint32)
)
_NO_INTERVALS = st.Intervals(
    np.empty(0, np.uint32), np.empty(0, np.uint16), _NO_I64, _NO_I64, np.empty(0, np.uint32)
)


def split_ahead(numeric: Writes, bound_ms: int) -> tuple[Writes, Writes]:
    """``numeric`` (of :func:`split_writes`) without the readings, duplicates and intervals
    stamped after ``bound_ms``, and those (VictoriaMetrics stores no sample more than two days
    ahead of its clock)."""
    if not any(_after(b, bound_ms) for b in numeric.batches):
        return numeric, Writes()
    keep, ahead = [], []
    for b in numeric.batches:
        if not _after(b, bound_ms):
            keep.append(b)
            continue
        parts = []
        for late in (False, True):
            r, iv, d = b.readings, b.intervals, b.duplicates
            sel_r, sel_i = (r.ts > bound_ms) == late, (iv.end_ts > bound_ms) == late
            dup = None if d is None else _readings(d, (d.ts > bound_ms) == late)
            intervals = st.Intervals(
                iv.meter[sel_i], iv.quantity[sel_i], iv.end_ts[sel_i], iv.energy[sel_i], iv.flags[sel_i]
            )
            parts.append(
                dataclasses.replace(
                    b, readings=_readings(r, sel_r), order=None, duplicates=dup, intervals=intervals
                )
            )
        keep.append(parts[0])
        ahead.append(parts[1])
    return Writes(keep), Writes(ahead)


def _after(b: BatchColumns, bound_ms: int) -> bool:
    late = bool((b.readings.ts > bound_ms).any()) or bool((b.intervals.end_ts > bound_ms).any())
    return late or (b.duplicates is not None and bool((b.duplicates.ts > bound_ms).any()))


def _readings(r: st.Readings, sel: np.ndarray) -> st.Readings:
    return st.Readings(r.meter[sel], r.ts[sel], r.quantity[sel], r.value[sel], r.flags[sel])


def split_writes(writes: Writes) -> tuple[Writes, Writes]:
    """``(numeric, records)``: the batches' readings, duplicates and intervals (written once,
    numbers only: VictoriaMetrics'), and everything else (the records store's)."""
    numeric = Writes(
        [dataclasses.replace(b, collapsed_meter=_NO_I64, collapsed_ts=_NO_I64) for b in writes.batches]
    )
    events_only = [
        dataclasses.replace(b, readings=_NO_READINGS, order=None, duplicates=None, intervals=_NO_INTERVALS)
        for b in writes.batches
        if b.collapsed_ts.shape[0]
    ]
    records = Writes(events_only, writes.events, writes.rollups, writes.area_alarms, writes.loss_alarms)
    return numeric, records


@dataclass(slots=True, eq=False)
class PreparedSplit:
    """A write prepared once for both stores: VictoriaMetrics' bodies, then the records'."""

    victoria: PreparedLines
    records: PreparedLines

    @property
    def bodies(self) -> int:
        return self.victoria.bodies + self.records.bodies

    @property
    def done(self) -> int:
        return self.victoria.done + self.records.done

    @property
    def lines(self) -> int:
        return self.victoria.lines + self.records.lines

    def result(self) -> WriteResult:
        return WriteResult(
            self.victoria.written + self.records.written, (*self.victoria.rejected, *self.records.rejected)
        )


class VictoriaSink:
    """The pipeline's store on VictoriaMetrics plus InfluxDB for the records (module contract)."""

    def __init__(self, config: VictoriaConfig, records: InfluxSink, *, wide: bool = True) -> None:
        self.config = config
        self.records = records
        self.wide = wide
        self.writer = InfluxWriter(config.writer_config())
        self.export = VictoriaExport(config.reads_from, config.timeout_s, config.ca_file)
        self._tags = TagCache()

    async def __aenter__(self) -> VictoriaSink:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await asyncio.gather(self.writer.aclose(), self.export.aclose(), self.records.aclose())

    @property
    def api(self) -> Literal["v1", "v2"] | None:
        """The records store's InfluxDB API generation (see :attr:`InfluxSink.api`)."""
        return self.records.api

    def _refused(self, exc: SinkRefused, what: str, url: str, key: str) -> SinkRefused:
        message = str(exc)
        reason = "not_found" if "unsupported path" in message else exc.reason
        detail = message.split("): ", 1)[-1]
        return SinkRefused(
            f"victoriametrics refused {what} at {url} ({exc.status} {reason}): {detail[:300]}; "
            f"check [victoriametrics] {key}",
            reason=reason,
            status=exc.status,
        )

    async def probe(self, *, create: bool = True) -> str:
        """Both stores: an empty write and an empty export to VictoriaMetrics, then the records
        store's probe. Raises: SinkRefused / SinkError naming the store."""
        await self.probe_victoria()
        records = await self.records.probe(create=create)
        return f"victoriametrics {self.config.writes_to} (write), {self.config.reads_from} (read): " \
               f"db label {self.config.database!r} accepted; records: {records}"  # fmt: skip

    async def probe_victoria(self) -> None:
        """VictoriaMetrics alone: an empty write and an empty export answered.

        Raises: SinkRefused (a URL it does not serve), SinkError (unreachable)."""
        try:
            await self.writer.probe(create=False)
        except SinkRefused as exc:
            raise self._refused(exc, "the probe write", self.config.writes_to, "write_url") from None
        await self._export(selector(["amigw_probe"], {"db": self.config.database}, {}), 0, 0)

    def warm_up(self, sample: Writes) -> None:
        encode_writes(sample, TagCache(), wide=self.wide)
        self.records.warm_up(sample)

    def prepare(self, writes: Writes) -> PreparedSplit:
        numeric, records = split_writes(writes)
        bound_ms = int(time.time() * 1000) + FUTURE_BOUND_MS
        numeric, ahead = split_ahead(numeric, bound_ms)
        lines = encode_writes(numeric, self._tags, wide=self.wide)
        prepared = PreparedSplit(self.writer.prepare(lines), self.records.prepare(records))
        if ahead.batches:  # VictoriaMetrics would answer 204 and drop them: rejected, dead-lettered
            detail = f"timestamp after {bound_ms} ms: victoriametrics drops samples over 2 days ahead"
            prepared.victoria.rejected += [
                Rejected(line, "beyond victoriametrics time bound", detail)
                for line in split_lines(encode_writes(ahead, TagCache(), wide=self.wide))
            ]
        return prepared

    async def send(self, prepared: PreparedWrite) -> WriteResult:
        if not isinstance(prepared, PreparedSplit):
            raise TypeError(f"not prepared by a VictoriaSink: {type(prepared).__name__}")
        if prepared.victoria.done < prepared.victoria.bodies:
            try:
                await self.writer.send(prepared.victoria)
            except SinkRefused as exc:
                raise self._refused(exc, "the write", self.config.writes_to, "write_url") from None
        await self.records.send(prepared.records)
        return prepared.result()

    async def write(self, writes: Writes) -> WriteResult:
        return await self.send(self.prepare(writes))

    # -- reads of the records store ----------------------------------------------------------

    async def outage_events(self, t_lo_ms: int, t_hi_ms: int) -> list[OutageEvent]:
        return await self.records.outage_events(t_lo_ms, t_hi_ms)

    async def open_area_alarm(self, area: str, t_lo_ms: int, t_hi_ms: int) -> AreaAlarm | None:
        return await self.records.open_area_alarm(area, t_lo_ms, t_hi_ms)

    async def drop_area_alarms(self, area: str, after_ms: int, until_ms: int) -> None:
        await self.records.drop_area_alarms(area, after_ms, until_ms)

    async def day_sums(self, start_ms: int, end_ms: int, fields: Sequence[str]) -> list[DaySums]:
        return await self.records.day_sums(start_ms, end_ms, fields)

    async def area_classes(self, start_ms: int, end_ms: int) -> dict[str, dict[int, str]]:
        return await self.records.area_classes(start_ms, end_ms)

    async def write_report(self, report: DailyReport) -> WriteResult:
        return await self.records.write_report(report)

    # -- reads of VictoriaMetrics ------------------------------------------------------------

    async def _export(self, match: str, start_ms: int, end_ms: int) -> list[Series]:
        try:
            return await self.export.series(match, start_ms, end_ms)
        except SinkRefused as exc:
            raise self._refused(exc, "the export", self.config.reads_from, "read_url") from None

    async def completeness(
        self,
        meter_id: str,
        day: dt.date,
        *,
        utc_offset_ms: int = 8 * 3_600_000,
        interval_ms: int = 900_000,
        quantity: str = "energy_fwd_active_total",
    ) -> st.DayCompleteness:
        """The meter-day's intervals (:meth:`day_intervals`, end-labelled: ``(start, end]``) and
        its ``reading_duplicate`` samples of ``quantity``, counted as InfluxDB counts them."""
        start = (day - _EPOCH).days * DAY_MS - utc_offset_ms
        end = start + DAY_MS
        got = await self.day_intervals(start, end, (by_name(quantity).code,), meters=[meter_id])
        flags = got.flags.astype(np.int64)
        bad = (flags & NOT_BILLABLE) != 0
        est = ~bad & ((flags & int(Flag.ESTIMATED)) != 0)
        labels = {"db": self.config.database, "meter": stored_tag(meter_id), "quantity": quantity}
        dups = await self._export(selector(["reading_duplicate_flags"], labels, {}), start + 1, end)
        n_dup = sum(int(s.ts.shape[0]) for s in dups)
        per_day = DAY_MS // interval_ms
        n_ok, n_est, n_bad = int((~bad & ~est).sum()), int(est.sum()), int(bad.sum())
        return st.DayCompleteness(meter_id, day, per_day, n_ok, n_est, n_bad, n_dup)

    async def day_intervals(
        self,
        start_ms: int,
        end_ms: int,
        quantities: Sequence[int],
        meters: Sequence[str] | None = None,
        gateways: Sequence[str] | None = None,
    ) -> StoredIntervals:
        """The ``intervals_<channel>`` and ``intervals_<channel>_flags`` series ending in
        ``(start_ms, end_ms]`` (one export), the daily job's flag rewrites applied."""
        if (meters is not None and not meters) or (gateways is not None and not gateways) or not quantities:
            return _no_intervals()
        names = {f"intervals_{by_code(q).name}": q for q in quantities}
        regex = {k: [stored_tag(v) for v in vs] for k, vs in (("meter", meters), ("gateway", gateways)) if vs}
        match = selector([*names, *(f"{n}_flags" for n in names)], {"db": self.config.database}, regex)
        got = _interval_columns(await self._export(match, start_ms + 1, end_ms), names)
        if len(got):
            rewritten = await self.records.day_intervals(start_ms, end_ms, quantities, meters, gateways)
            got = _with_flags_of(got, rewritten)
        return got

    async def write_interval_flags(self, rows: StoredIntervals) -> WriteResult:
        """The rows whole (energy and flags, as the worker encodes intervals) and their flags
        field explicitly (a zero too) to the records store, where they overwrite in place;
        :meth:`day_intervals` applies them over VictoriaMetrics' flags."""
        if not len(rows):
            return WriteResult(0)
        parts = []
        for g, gateway in enumerate(rows.gateways):
            mine = np.flatnonzero(rows.gateway == g)
            if mine.shape[0]:
                sub = rows.take(mine.astype(np.int64))
                readings = st.Readings(sub.meter, sub.end_ts, sub.quantity, sub.energy, sub.flags)
                parts.append(
                    encode_lines(readings, LineTables.build(rows.meters, gateway, "intervals"), wide=True)
                )
        parts.append(interval_flag_lines(rows))
        return await self.records.writer.write(b"".join(parts))


def _no_intervals() -> StoredIntervals:
    u32 = np.empty(0, np.uint32)
    return StoredIntervals((), (), u32, u32, np.empty(0, np.uint16), _NO_I64, _NO_I64, u32)


def _interval_columns(series: list[Series], names: dict[str, int]) -> StoredIntervals:
    """Exported interval series as :class:`StoredIntervals`: a row per energy sample (its flags
    sample at the same time, else 0), meters and gateways numbered in the sorted order of their
    stored labels, rows in (meter, gateway, quantity, end) order, like the InfluxDB sink."""
    energy = [s for s in series if s.labels.get("__name__") in names]
    flags = {
        (s.labels.get("meter"), s.labels.get("gateway"), s.labels["__name__"][: -len("_flags")]): s
        for s in series
        if s.labels.get("__name__", "").endswith("_flags")
    }
    energy = [s for s in energy if s.labels.get("meter") and s.labels.get("gateway") and s.ts.shape[0]]
    if not energy:
        return _no_intervals()
    meters = sorted({s.labels["meter"] for s in energy})
    gateways = sorted({s.labels["gateway"] for s in energy})
    m_index = {m: i for i, m in enumerate(meters)}
    g_index = {g: i for i, g in enumerate(gateways)}
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("meter", "gateway", "quantity", "end", "energy", "flags")
    }
    for s in energy:
        name = s.labels["__name__"]
        q = names[name]
        n = s.ts.shape[0]
        f = np.zeros(n, np.uint32)
        fs = flags.get((s.labels["meter"], s.labels["gateway"], name))
        if fs is not None and fs.ts.shape[0]:
            at = np.clip(np.searchsorted(fs.ts, s.ts), 0, fs.ts.shape[0] - 1)
            hit = fs.ts[at] == s.ts
            f[hit] = fs.values[at[hit]].astype(np.uint32)
        cols["meter"].append(np.full(n, m_index[s.labels["meter"]], np.uint32))
        cols["gateway"].append(np.full(n, g_index[s.labels["gateway"]], np.uint32))
        cols["quantity"].append(np.full(n, q, np.uint16))
        cols["end"].append(s.ts)
        cols["energy"].append(np.rint(s.values * 10 ** by_code(q).decimals).astype(np.int64))
        cols["flags"].append(f)
    c = {k: np.concatenate(v) for k, v in cols.items()}
    out = StoredIntervals(
        tuple(unescape_stored(m) for m in meters), tuple(unescape_stored(g) for g in gateways),
        c["meter"], c["gateway"], c["quantity"], c["end"], c["energy"], c["flags"],
    )  # fmt: skip
    return out.take(np.lexsort((out.end_ts, out.quantity, out.gateway, out.meter)).astype(np.int64))


def _with_flags_of(got: StoredIntervals, rewritten: StoredIntervals) -> StoredIntervals:
    """``got`` with the flags of the rows ``rewritten`` holds (same meter, gateway, channel, end)."""
    if not len(rewritten):
        return got
    new = {
        (rewritten.meters[m], rewritten.gateways[g], q, t): f
        for m, g, q, t, f in zip(
            rewritten.meter.tolist(), rewritten.gateway.tolist(), rewritten.quantity.tolist(),
            rewritten.end_ts.tolist(), rewritten.flags.tolist(), strict=True,
        )
    }  # fmt: skip
    flags = got.flags.copy()
    for r, key in enumerate(
        zip(
            (got.meters[m] for m in got.meter.tolist()), (got.gateways[g] for g in got.gateway.tolist()),
            got.quantity.tolist(), got.end_ts.tolist(), strict=True,
        )
    ):  # fmt: skip
        f = new.get(key)
        if f is not None:
            flags[r] = f
    return got.take(np.arange(len(got), dtype=np.int64), flags)
