"""The InfluxDB implementation of :class:`~ingest.sinks.base.Sink`: line protocol, HTTP, InfluxQL.

Contract
--------
* :class:`InfluxSink` is a thin adapter: :meth:`InfluxSink.prepare` encodes the columns
  (:func:`~ingest.sinks.influx.lines.encode_writes`, ``wide`` or narrow readings) and has
  :class:`~ingest.sinks.influx.http.InfluxWriter` cut and compress them into request bodies,
  once; :meth:`InfluxSink.send` posts the bodies not yet done (bisection of rejected lines,
  refusals, no retry: an outage raises ``SinkError(retryable=True)`` for the caller's retry
  layer); the rejected lines come back in the result, nothing is dead-lettered here.
* Every read is one or two InfluxQL statements (here and nowhere else) on
  :class:`~ingest.sinks.influx.query.InfluxQuery`; tag values are compared as
  :func:`~ingest.sinks.influx.lines.stored_tag` and returned unescaped, times as epoch ms.
* Two connections: one for writes, one for queries, each one request at a time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from ingest.rules import stages as st
from ingest.rules.kernels import NOT_BILLABLE
from ingest.sinks.base import (
    AreaAlarm,
    DaySums,
    OutageEvent,
    PreparedWrite,
    StoredIntervals,
    WriteResult,
    Writes,
)
from ingest.sinks.influx.http import InfluxWriter, PreparedLines, SinkConfig
from ingest.sinks.influx.lines import TagCache, encode_writes, escape_tag, stored_tag, unescape_stored
from ingest.sinks.influx.query import InfluxQuery, quote_str
from protocols.errors import SinkError
from protocols.flags import Flag
from protocols.quantities import by_code, by_name

if TYPE_CHECKING:
    from ingest.reports.daily import DailyReport

__all__ = ["InfluxSink", "interval_flag_lines", "report_lines"]

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
_EPOCH = dt.date(1970, 1, 1)


class InfluxSink:
    """The pipeline's store on InfluxDB 1.x/2.x (see the module contract)."""

    def __init__(self, config: SinkConfig, *, wide: bool = True) -> None:
        self.config = config
        self.wide = wide
        self.writer = InfluxWriter(config)
        self.query = InfluxQuery(config)
        self._tags = TagCache()

    async def __aenter__(self) -> InfluxSink:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await asyncio.gather(self.writer.aclose(), self.query.aclose())

    @property
    def api(self) -> Literal["v1", "v2"] | None:
        """The API generation in use; ``None`` until ``auto`` detection has run."""
        return self.writer.api

    async def probe(self, *, create: bool = True) -> str:
        return await self.writer.probe(create=create)

    def warm_up(self, sample: Writes) -> None:
        """Encode ``sample`` once, nothing written: numba's cache loads now, not in a write."""
        encode_writes(sample, TagCache(), wide=self.wide)

    def prepare(self, writes: Writes) -> PreparedLines:
        return self.writer.prepare(encode_writes(writes, self._tags, wide=self.wide))

    async def send(self, prepared: PreparedWrite) -> WriteResult:
        if not isinstance(prepared, PreparedLines):
            raise TypeError(f"not prepared by an InfluxSink: {type(prepared).__name__}")
        return await self.writer.send(prepared)

    async def write(self, writes: Writes) -> WriteResult:
        return await self.writer.send(self.prepare(writes))

    # -- reads -------------------------------------------------------------------------------

    async def outage_events(self, t_lo_ms: int, t_hi_ms: int) -> list[OutageEvent]:
        rows = await self.query.rows(
            "SELECT \"id\" FROM \"events\" WHERE (kind = 'power_down' OR kind = 'voltage_collapsed') "
            f"AND time >= {t_lo_ms}ms AND time <= {t_hi_ms}ms GROUP BY meter, gateway"
        )
        return [
            OutageEvent(unescape_stored(r["meter"]), unescape_stored(r.get("gateway") or ""), int(r["time"]))
            for r in rows
            if r.get("meter")
        ]

    async def open_area_alarm(self, area: str, t_lo_ms: int, t_hi_ms: int) -> AreaAlarm | None:
        rows = await self.query.rows(
            f'SELECT "events" FROM "alarms" WHERE area = {quote_str(stored_tag(area))} '
            f"AND kind = 'area_outage' AND time >= {t_lo_ms}ms AND time <= {t_hi_ms}ms"
        )
        if not rows:
            return None
        first = min(rows, key=lambda r: r["time"])
        return AreaAlarm(area, int(first["time"]), int(first["events"]))

    async def drop_area_alarms(self, area: str, after_ms: int, until_ms: int) -> None:
        """InfluxDB 2.x's v1-compatibility ``/query`` takes no DELETE: the points are kept, logged."""
        window = f"\"kind\" = 'area_outage' AND time > {after_ms}ms AND time <= {until_ms}ms"
        try:
            await self.query.rows(
                f'DELETE FROM "alarms" WHERE "area" = {quote_str(stored_tag(area))} AND {window}'
            )
        except SinkError as exc:
            if exc.retryable:
                raise
            log.warning("superseded area alarm not removed area=%s after_ms=%d error=%s", area, after_ms, exc)

    async def completeness(
        self,
        meter_id: str,
        day: dt.date,
        *,
        utc_offset_ms: int = 8 * 3_600_000,
        interval_ms: int = 900_000,
        quantity: str = "energy_fwd_active_total",
    ) -> st.DayCompleteness:
        """From the ``intervals`` and ``reading_duplicate`` measurements: intervals are
        end-labelled, so day D holds ``time > start AND time <= end``."""
        start = (day - _EPOCH).days * DAY_MS - utc_offset_ms
        end = start + DAY_MS
        where = f"meter = {quote_str(stored_tag(meter_id))} AND time > {start}ms AND time <= {end}ms"
        # intervals are wide: the channel is a field, its flags a "<channel>_flags" field where non-zero
        field = by_name(quantity).name  # a known quantity name: safe as an identifier
        rows = await self.query.rows(f'SELECT "{field}", "{field}_flags" FROM "intervals" WHERE {where}')
        rows = [r for r in rows if r.get(field) is not None]
        flags = np.array([int(r.get(f"{field}_flags") or 0) for r in rows], dtype=np.int64)
        bad = (flags & NOT_BILLABLE) != 0
        est = ~bad & ((flags & int(Flag.ESTIMATED)) != 0)
        dup_where = f"{where} AND quantity = {quote_str(quantity)}"
        dups = await self.query.rows(f'SELECT count("flags") FROM "reading_duplicate" WHERE {dup_where}')
        n_dup = int(dups[0]["count"]) if dups else 0
        per_day = DAY_MS // interval_ms
        n_ok, n_est, n_bad = int((~bad & ~est).sum()), int(est.sum()), int(bad.sum())
        return st.DayCompleteness(meter_id, day, per_day, n_ok, n_est, n_bad, n_dup)

    async def day_sums(self, start_ms: int, end_ms: int, fields: Sequence[str]) -> list[DaySums]:
        """A ``daily_tou`` row is stamped with its day's start, so the day is ``[start, end)``."""
        sums = ", ".join(f'sum("{f}") AS "{f}"' for f in fields)
        rows = await self.query.rows(
            f'SELECT {sums} FROM "daily_tou" WHERE time >= {start_ms}ms AND time < {end_ms}ms '
            'GROUP BY "meter", "gateway"'
        )
        return [
            DaySums(
                unescape_stored(r["meter"]),
                unescape_stored(r["gateway"]),
                {f: None if r.get(f) is None else int(r[f]) for f in fields},
            )
            for r in rows
            if r.get("meter") and r.get("gateway")
        ]

    async def area_classes(self, start_ms: int, end_ms: int) -> dict[str, dict[int, str]]:
        rows = await self.query.rows(
            f'SELECT "class" FROM "area_loss" WHERE time >= {start_ms}ms AND time < {end_ms}ms '
            'GROUP BY "area"'
        )
        out: dict[str, dict[int, str]] = {}
        for r in rows:
            if r.get("area"):
                out.setdefault(unescape_stored(r["area"]), {})[int(r["time"])] = str(r.get("class") or "")
        return out

    async def day_intervals(
        self,
        start_ms: int,
        end_ms: int,
        quantities: Sequence[int],
        meters: Sequence[str] | None = None,
        gateways: Sequence[str] | None = None,
    ) -> StoredIntervals:
        """One query over the wide ``intervals`` points (a field per channel, its flags in
        ``<channel>_flags`` where non-zero), of the channels the store has fields for, with the
        tags as columns and no ``GROUP BY`` (one series: a series per meter costs influxd about
        twice the CPU); energies come back as decimals of the quantity's fixed point and are
        scaled back to integers, a column at a time."""
        where = f"time > {start_ms}ms AND time <= {end_ms}ms"
        for tag, values in (("meter", meters), ("gateway", gateways)):
            if values is None:
                continue
            if not values:
                return _no_intervals()
            where += " AND (" + " OR ".join(f"{tag} = {quote_str(stored_tag(v))}" for v in values) + ")"
        fields = await self._interval_fields()
        names = [by_code(q).name for q in quantities]  # known quantity names: safe as identifiers
        chans = [(q, n) for q, n in zip(quantities, names, strict=True) if fields is None or n in fields]
        if not chans:
            return _no_intervals()
        cols = ", ".join(
            f'"{n}"' + (f', "{n}_flags"' if fields is None or f"{n}_flags" in fields else "")
            for _, n in chans
        )
        series = await self.query.series(f'SELECT "meter", "gateway", {cols} FROM "intervals" WHERE {where}')
        return _interval_columns(series, chans)

    async def _interval_fields(self) -> set[str] | None:
        """The field keys of ``intervals`` (any shard), so a read selects only those; None where
        the server does not answer ``SHOW FIELD KEYS`` (then every channel is selected)."""
        try:
            rows = await self.query.rows('SHOW FIELD KEYS FROM "intervals"')
        except SinkError as exc:
            if exc.retryable:
                raise
            return None
        return {str(r["fieldKey"]) for r in rows if r.get("fieldKey")}

    async def write_interval_flags(self, rows: StoredIntervals) -> WriteResult:
        lines = interval_flag_lines(rows)
        return await self.writer.write(lines) if lines else WriteResult(0)

    async def write_report(self, report: DailyReport) -> WriteResult:
        lines = report_lines(report)
        result = await self.writer.write(lines) if lines else WriteResult(0)
        await self._drop_stale_alarms(report)
        return result

    async def _drop_stale_alarms(self, report: DailyReport) -> None:
        """An earlier run's ``line_loss`` alarm of this day whose area is no longer anomalous is
        deleted (InfluxDB 2.x's v1-compatibility ``/query`` takes no DELETE: kept, logged)."""
        start, end = report.start_ms, report.start_ms + DAY_MS
        window = f"\"kind\" = 'line_loss' AND time >= {start}ms AND time < {end}ms"
        rows = await self.query.rows(f'SELECT "rate_bp" FROM "alarms" WHERE {window} GROUP BY "area"')
        current = {stored_tag(a.area) for a in report.alarms}
        for area in sorted({r["area"] for r in rows if r.get("area")} - current):
            try:
                await self.query.rows(f'DELETE FROM "alarms" WHERE "area" = {quote_str(area)} AND {window}')
            except SinkError as exc:
                if exc.retryable:
                    raise
                log.warning(
                    "stale line-loss alarm not removed area=%s day=%s error=%s", area, report.day, exc
                )


def report_lines(report: DailyReport) -> bytes:
    """Line protocol of every daily report point, all stamped with the day's start (ms)."""
    ts = report.start_ms
    out = []
    for a in report.areas:
        tag = escape_tag(a.area)
        out.append(
            b'area_loss,area=%s supply=%di,sales=%di,loss=%di,rate_bp=%di,class="%s",'
            b"customers_present=%di,customers_expected=%di,days_not_qualified=%di,high_bp=%di %d\n"
            % (tag, a.supply, a.sales, a.loss, a.rate_bp, a.klass.encode(), a.customers_present,
               a.customers_expected, a.days_not_qualified, a.high_bp, ts)
        )  # fmt: skip
        if a.anomaly:
            out.append(
                b'alarms,area=%s,kind=line_loss class="%s",rate_bp=%di %d\n'
                % (tag, a.klass.encode(), a.rate_bp, ts)
            )
    for c in report.collection:
        out.append(
            b"collection,id=%s,level=%s received=%di,expected=%di,estimated=%di,invalid=%di,"
            b"rate_bp=%di %d\n"
            % (escape_tag(c.id), c.level.encode(), c.received, c.expected, c.estimated, c.invalid,
               c.rate_bp, ts)
        )  # fmt: skip
    return b"".join(out)


def interval_flag_lines(rows: StoredIntervals) -> bytes:
    """Line protocol setting the ``<channel>_flags`` field of each row's ``intervals`` point (the
    same series and time as the worker wrote it; the energy field is left as it is)."""
    meters = [escape_tag(m) for m in rows.meters]
    gateways = [escape_tag(g) for g in rows.gateways]
    return b"".join(
        b"intervals,meter=%s,gateway=%s %s_flags=%di %d\n"
        % (meters[m], gateways[g], by_code(q).name.encode(), f, t)
        for m, g, q, f, t in zip(
            rows.meter.tolist(), rows.gateway.tolist(), rows.quantity.tolist(), rows.flags.tolist(),
            rows.end_ts.tolist(), strict=True,
        )
    )  # fmt: skip


def _no_intervals() -> StoredIntervals:
    u32 = np.empty(0, np.uint32)
    i64 = np.empty(0, np.int64)
    return StoredIntervals((), (), u32, u32, np.empty(0, np.uint16), i64, i64, u32)


def _interval_columns(series: list[dict[str, Any]], chans: list[tuple[int, str]]) -> StoredIntervals:
    """The answer of :meth:`InfluxSink.day_intervals` (series of ``time``, ``meter``,
    ``gateway`` and the channels' columns) as :class:`StoredIntervals`: a row per present
    channel value, meters and gateways numbered in sorted order, in (meter, quantity, end) order."""
    parts = [s for s in series if s.get("values")]
    if not parts:
        return _no_intervals()
    columns: list[str] = list(parts[0]["columns"])
    if any(list(s["columns"]) != columns for s in parts):
        raise SinkError(
            f"influxdb answered series of other columns: {[s['columns'] for s in parts]}", retryable=False
        )
    table: npt.NDArray[Any] = np.array([row for s in parts for row in s["values"]], dtype=object)
    tagged = (table[:, 1] != None) & (table[:, 2] != None)  # noqa: E711 (elementwise)
    table = table[tagged]
    table = table[(table[:, 1] != "") & (table[:, 2] != "")]
    meters, meter = np.unique(table[:, 1].astype(str), return_inverse=True)
    gateways, gateway = np.unique(table[:, 2].astype(str), return_inverse=True)
    ends = table[:, 0].astype(np.int64)
    take: list[npt.NDArray[np.intp]] = []
    quantity: list[npt.NDArray[np.uint16]] = []
    energy: list[npt.NDArray[np.int64]] = []
    flags: list[npt.NDArray[np.uint32]] = []
    for q, n in chans:
        if n not in columns:
            continue
        e = table[:, columns.index(n)].astype(np.float64)  # null -> nan
        has = ~np.isnan(e)
        f = table[:, columns.index(f"{n}_flags")].astype(np.float64) if f"{n}_flags" in columns else None
        rows = np.flatnonzero(has)
        take.append(rows)
        quantity.append(np.full(rows.shape[0], q, np.uint16))
        energy.append(np.rint(e[rows] * 10 ** by_code(q).decimals).astype(np.int64))
        flags.append(
            np.zeros(rows.shape[0], np.uint32) if f is None else np.nan_to_num(f[rows]).astype(np.uint32)
        )
    if not take:
        return _no_intervals()
    row = np.concatenate(take)
    out = StoredIntervals(
        tuple(unescape_stored(m) for m in meters.tolist()),
        tuple(unescape_stored(g) for g in gateways.tolist()),
        meter[row].astype(np.uint32), gateway[row].astype(np.uint32), np.concatenate(quantity),
        ends[row], np.concatenate(energy), np.concatenate(flags),
    )  # fmt: skip
    return out.take(np.lexsort((out.end_ts, out.quantity, out.gateway, out.meter)).astype(np.int64))
