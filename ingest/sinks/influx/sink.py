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
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

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
F64 = npt.NDArray[np.float64]
_Columns = tuple[int, int, int, F64, F64, F64]  # meter, gateway, quantity; ends, energies, flags
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
        ``<channel>_flags`` where non-zero); energies come back as decimals of the quantity's
        fixed point and are scaled back to integers, a column of a series at a time."""
        names = [by_code(q).name for q in quantities]  # known quantity names: safe as identifiers
        cols = ", ".join(f'"{n}", "{n}_flags"' for n in names)
        where = f"time > {start_ms}ms AND time <= {end_ms}ms"
        for tag, values in (("meter", meters), ("gateway", gateways)):
            if values is None:
                continue
            if not values:
                return _stored_intervals({}, {}, [])
            where += " AND (" + " OR ".join(f"{tag} = {quote_str(stored_tag(v))}" for v in values) + ")"
        group = 'GROUP BY "meter", "gateway"'
        ids: dict[str, int] = {}
        gateway_ids: dict[str, int] = {}
        parts: list[_Columns] = []
        for series in await self.query.series(f'SELECT {cols} FROM "intervals" WHERE {where} {group}'):
            tags = series.get("tags") or {}
            if not tags.get("meter") or not tags.get("gateway") or not series.get("values"):
                continue
            m = ids.setdefault(unescape_stored(tags["meter"]), len(ids))
            g = gateway_ids.setdefault(unescape_stored(tags["gateway"]), len(gateway_ids))
            columns = series["columns"]
            table = np.array(series["values"], dtype=np.float64)  # null -> nan
            for q, n in zip(quantities, names, strict=True):
                if n not in columns:
                    continue
                e = table[:, columns.index(n)]
                f = table[:, columns.index(f"{n}_flags")] if f"{n}_flags" in columns else np.zeros_like(e)
                ok = ~np.isnan(e)
                if ok.any():
                    parts.append((m, g, q, table[ok, 0], e[ok] * 10 ** by_code(q).decimals, f[ok]))
        return _stored_columns(ids, gateway_ids, parts)

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


def _stored_intervals(
    meters: Mapping[str, int], gateways: Mapping[str, int], rows: list[tuple[int, int, int, int, int, int]]
) -> StoredIntervals:
    """Rows (meter, gateway, quantity, end, energy, flags) as :class:`StoredIntervals` columns."""
    cols = list(zip(*rows, strict=True)) if rows else [()] * 6
    return StoredIntervals(
        tuple(meters), tuple(gateways),
        np.array(cols[0], np.uint32), np.array(cols[1], np.uint32), np.array(cols[2], np.uint16),
        np.array(cols[3], np.int64), np.array(cols[4], np.int64), np.array(cols[5], np.uint32),
    )  # fmt: skip


def _stored_columns(
    meters: Mapping[str, int],
    gateways: Mapping[str, int],
    parts: list[_Columns],
) -> StoredIntervals:
    """Per (meter, gateway, quantity) columns of end times, scaled energies and flags (nan: 0),
    concatenated as :class:`StoredIntervals`."""
    if not parts:
        return _stored_intervals(meters, gateways, [])
    n = [p[3].shape[0] for p in parts]
    flags = np.concatenate([p[5] for p in parts])
    return StoredIntervals(
        tuple(meters), tuple(gateways),
        np.repeat(np.array([p[0] for p in parts], np.uint32), n),
        np.repeat(np.array([p[1] for p in parts], np.uint32), n),
        np.repeat(np.array([p[2] for p in parts], np.uint16), n),
        np.concatenate([p[3] for p in parts]).astype(np.int64),
        np.rint(np.concatenate([p[4] for p in parts])).astype(np.int64),
        np.where(np.isnan(flags), 0, flags).astype(np.uint32),
    )  # fmt: skip
