"""Derived totals written once per closed day: daily time-of-use and hourly rollups.

Contract
--------
* A batch writes its readings and its validated **intervals**; it writes no totals. It owes the
  rollup of every local day its intervals start in (:func:`periods_of`), recorded with its dedup
  mark in one transaction before its MQTT ack (:meth:`DedupStore.mark`).
* :class:`RollupJob` (one per worker, every ``[pipeline] rollup_check_s``) claims the days that
  are due (:meth:`DedupStore.claim_due`: the day ended and no batch touched it for
  ``rollup_delay_s``), reads each one's **stored intervals** back per gateway in one query
  (:meth:`Sink.day_intervals`), computes the totals with the pure :func:`day_rows` /
  :func:`hour_rows`, writes **one** ``daily_tou`` row per (meter, gateway, day) and one
  ``hourly`` row per (meter, gateway, hour of that day), stamped with the period's start,
  publishes each day's :class:`~protocols.aggregates.DailyTotal` items on
  ``ami/v1/agg/daily/{gateway}``, and only then drops the keys (each only if no batch touched it
  meanwhile). Data that arrives after a day was rolled up touches its key again, and the day is
  rolled up again: the rows are rewritten in place (same series and time).
* Hours are rolled up with their day, not as each hour ends: influxd answers a read of a day's
  intervals for a fraction of what 24 reads of an hour each cost it (a series' overhead per
  query, paid per meter), so an hourly row appears once its day is rolled up.
* The stored intervals are the shared state: whichever worker (or machine) rolls a day up
  reads every batch's intervals of it, however the shared subscription spread the batches. A
  crash before the keys are dropped only repeats the rollup: the same rows, the same messages.
* Totals are the rule stages' (:mod:`ingest.rules.stages`): billable energy, the calendar's TOU
  split of the total register, the tariff registers' own deltas, VEE-15 mismatches per day,
  interval counts, LL-01's export terms. Summing the rows of any split of a period's intervals
  gives the row of the whole period (tested), except ``tou_mismatch``, a judgement of the whole
  day.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ingest.model.registry import MeterParams
from ingest.pipeline.dedup import PERIOD_MS, DedupStore, PendingPeriod, Period
from ingest.rules import stages as st
from ingest.sinks.base import PeriodTotals, Rollup, Sink, StoredIntervals, Writes
from protocols import topics
from protocols.aggregates import DailyTotal, encode_daily_columns
from protocols.errors import SinkError, StateUnavailable, TransportError
from protocols.quantities import ENERGY_FORWARD, ENERGY_REVERSE

if TYPE_CHECKING:
    from ingest.metrics import IngestMetrics
    from ingest.pipeline.transform import Settings

__all__ = [
    "DAY_QUANTITIES",
    "RollupJob",
    "daily_message",
    "daily_totals",
    "day_rows",
    "hour_rows",
    "periods_of",
    "rollups",
]

log = logging.getLogger(__name__)

DAY_MS = PERIOD_MS["day"]
HOUR_MS = PERIOD_MS["hour"]
_EPOCH = dt.date(1970, 1, 1)
Q_TARIFF_LAST = 5  # energy_fwd_active_t1 .. _t4 are codes 2..5, right after the total
DAY_QUANTITIES = (ENERGY_FORWARD, 2, 3, 4, Q_TARIFF_LAST, ENERGY_REVERSE)
"""The channels a day's totals are computed from: the total register, T1..T4, reverse."""
_DAILY_FIELDS = (
    b"total", b"sharp", b"peak", b"flat", b"valley", b"intervals", b"estimated", b"invalid",
    b"reg_sharp", b"reg_peak", b"reg_flat", b"reg_valley", b"tou_mismatch",
)  # fmt: skip
_REVERSE_FIELDS = (b"rev_total", b"rev_intervals", b"rev_invalid")
_HOURLY_FIELDS = (b"total", b"intervals", b"estimated", b"invalid")


# -- pure: periods and rows ------------------------------------------------------------------


def periods_of(iv: st.Intervals, interval_ms: int, utc_offset_ms: int) -> tuple[Period, ...]:
    """The local days (``("day", start ms)``) the energy intervals ``iv`` start in: the days
    whose totals (and hours) a batch of them changes."""
    channels = (iv.quantity >= ENERGY_FORWARD) & (iv.quantity <= ENERGY_REVERSE)
    if not channels.any():
        return ()
    local = np.unique(iv.end_ts[channels] - interval_ms) + utc_offset_ms
    days = np.unique(local - local % DAY_MS) - utc_offset_ms
    return tuple(("day", int(d)) for d in days.tolist())


def _rows(iv: st.Intervals, take: npt.NDArray[np.bool_]) -> st.Intervals:
    return st.Intervals(iv.meter[take], iv.quantity[take], iv.end_ts[take], iv.energy[take], iv.flags[take])


def _periods(iv: st.Intervals, meters: MeterParams, s: Settings) -> npt.NDArray[np.uint8]:
    """TOU period of each interval: its meter's tariff calendar, else the default calendar."""
    period = st.tou_periods(iv.end_ts, s.calendar, interval_ms=s.interval_ms)
    if not s.tariff_calendars or meters.tariff.shape[0] == 0 or iv.end_ts.shape[0] == 0:
        return period
    tariff = meters.tariff[iv.meter]
    names = s.registry.tariffs
    for t in np.unique(tariff).tolist():
        cal = s.tariff_calendars.get(names[t]) if t >= 0 else None
        if cal is not None:
            rows = tariff == t
            period[rows] = st.tou_periods(iv.end_ts[rows], cal, interval_ms=s.interval_ms)
    return period


def _totals(iv1: st.Intervals, bucket_ms: int, s: Settings) -> tuple[st.Totals, npt.NDArray[np.int64]]:
    """Per (meter, local bucket) of ``iv1`` in (meter, bucket) order: the totals, and each row's
    index into the distinct bucket starts (``np.unique(tot.start_ts)``)."""
    tot, _ = st.bucket_partials(
        iv1, bucket_ms=bucket_ms, interval_ms=s.interval_ms, utc_offset_ms=s.calendar.utc_offset_ms
    )
    _, row_bucket = np.unique(tot.start_ts, return_inverse=True)
    return tot, row_bucket.astype(np.int64)


def day_rows(iv: st.Intervals, meters: MeterParams, s: Settings) -> PeriodTotals | None:
    """One ``daily_tou`` row per (meter, local day) of the total-register intervals in ``iv``,
    with the calendar's TOU split, the tariff registers' own deltas and the VEE-15 mismatches
    (from the register intervals T1..T4 in ``iv``), and LL-01's export terms where the meter reads
    reverse energy; stamped with the day's start. Columns: the Python work is per distinct day."""
    iv1 = _rows(iv, iv.quantity == ENERGY_FORWARD)
    if iv1.end_ts.shape[0] == 0:
        return None
    off = s.calendar.utc_offset_ms
    tot, row_day = _totals(iv1, DAY_MS, s)
    # VEE-15: the calendar's split of the total register against the meter's own tariff
    # registers T1..T4 over the same (meter, day); its groups cover tot's (and days with tariff
    # intervals only), both in (meter, day) order, so tot's rows are found by searchsorted.
    ivr = _rows(iv, (iv.quantity >= ENERGY_FORWARD) & (iv.quantity <= Q_TARIFF_LAST))
    tou = st.tou_split(ivr, s.calendar, interval_ms=s.interval_ms, period=_periods(ivr, meters, s))
    day0 = int(tou.day_start_ts.min())
    tou_key = (tou.meter.astype(np.int64) << 24) | ((tou.day_start_ts - day0) // DAY_MS)
    tot_key = (tot.meter.astype(np.int64) << 24) | ((tot.start_ts - day0) // DAY_MS)
    row = np.searchsorted(tou_key, tot_key)
    days = np.unique(tot.start_ts)
    labels = tuple((_EPOCH + dt.timedelta(days=(int(d) + off) // DAY_MS)).isoformat().encode() for d in days)
    cal = np.asarray(tou.calendar, dtype=np.int64)[row]
    reg = np.asarray(tou.registers, dtype=np.int64)[row]
    columns = [
        tot.energy, cal[:, 0], cal[:, 1], cal[:, 2], cal[:, 3],
        tot.n_actual + tot.n_estimated, tot.n_estimated, tot.n_invalid,
        reg[:, 0], reg[:, 1], reg[:, 2], reg[:, 3], tou.mismatch[row].sum(axis=1),
    ]  # fmt: skip
    names: tuple[bytes, ...] = _DAILY_FIELDS
    reverse = _rows(iv, iv.quantity == ENERGY_REVERSE)
    if reverse.end_ts.shape[0]:  # LL-01's export terms; fields only where a meter reads them
        columns += _reverse_columns(reverse, tot, s)
        names = _DAILY_FIELDS + _REVERSE_FIELDS
    values = np.column_stack(columns).astype(np.int64)
    ts = tot.start_ts.astype(np.int64)
    return PeriodTotals(tot.meter.astype(np.int64), row_day, labels, names, values, ts)


def _reverse_columns(reverse: st.Intervals, tot: st.Totals, s: Settings) -> list[npt.NDArray[np.int64]]:
    """Billable reverse active energy of each of ``tot``'s (meter, day) rows, with its interval
    counts (actual + estimated, not billable); zeros where the meter has none that day. A day's
    export travels with its forward total: a meter-day without forward intervals has no row."""
    off = s.calendar.utc_offset_ms
    rev, _ = st.bucket_partials(reverse, bucket_ms=DAY_MS, interval_ms=s.interval_ms, utc_offset_ms=off)
    day0 = min(int(tot.start_ts.min()), int(rev.start_ts.min()))
    rev_key = rev.meter.astype(np.int64) * (1 << 32) + (rev.start_ts - day0) // DAY_MS
    tot_key = tot.meter.astype(np.int64) * (1 << 32) + (tot.start_ts - day0) // DAY_MS
    pos = np.minimum(np.searchsorted(rev_key, tot_key), rev_key.shape[0] - 1)
    hit = rev_key[pos] == tot_key
    return [np.where(hit, c[pos], 0) for c in (rev.energy, rev.n_actual + rev.n_estimated, rev.n_invalid)]


def hour_rows(iv: st.Intervals, s: Settings) -> PeriodTotals | None:
    """One ``hourly`` row per (meter, local hour) of the total-register intervals in ``iv``:
    billable energy and interval counts, stamped with the hour's start."""
    iv1 = _rows(iv, iv.quantity == ENERGY_FORWARD)
    if iv1.end_ts.shape[0] == 0:
        return None
    off = s.calendar.utc_offset_ms
    tot, row_hour = _totals(iv1, HOUR_MS, s)
    labels = tuple(
        (dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=int(h) + off)).strftime("%Y-%m-%dT%H").encode()
        for h in np.unique(tot.start_ts)
    )
    values = np.column_stack(
        (tot.energy, tot.n_actual + tot.n_estimated, tot.n_estimated, tot.n_invalid)
    ).astype(np.int64)
    ts = tot.start_ts.astype(np.int64)
    return PeriodTotals(tot.meter.astype(np.int64), row_hour, labels, _HOURLY_FIELDS, values, ts)


def _select(p: PeriodTotals | None, starts: set[int]) -> PeriodTotals | None:
    """The rows of ``p`` whose period starts in ``starts`` (a read window holds more)."""
    if p is None:
        return None
    keep = np.isin(p.ts, np.fromiter(starts, np.int64, len(starts)))
    if keep.all():
        return p
    if not keep.any():
        return None
    return PeriodTotals(p.meter[keep], p.bucket[keep], p.labels, p.fields, p.values[keep], p.ts[keep])


def rollups(stored: StoredIntervals, gateway: str, days: set[int], s: Settings) -> list[Rollup]:
    """The ``daily_tou`` rows of ``days`` (local day starts) and the ``hourly`` rows of every
    hour in them, of ``gateway``, from its stored intervals (other gateways' rows and other
    days' are ignored)."""
    if len(stored) == 0 or gateway not in stored.gateways or not days:
        return []
    mine = stored.gateway == stored.gateways.index(gateway)
    iv = stored.take(np.flatnonzero(mine)).intervals()
    out = []
    p = _select(day_rows(iv, s.registry.params(stored.meters), s), days)
    if p is not None:
        out.append(Rollup(gateway, stored.meters, "day", p))
    hours = {day + h * HOUR_MS for day in days for h in range(DAY_MS // HOUR_MS)}
    p = _select(hour_rows(iv, s), hours)
    if p is not None:
        out.append(Rollup(gateway, stored.meters, "hour", p))
    return out


_PUBLISHED = (b"total", b"sharp", b"peak", b"flat", b"valley", b"intervals", b"estimated")
"""The ``daily_tou`` fields a :class:`DailyTotal` carries, in its field order after meter and day."""


def _published(r: Rollup) -> tuple[list[str], list[str], list[list[int]]]:
    """A day rollup's rows as :class:`DailyTotal` columns (meters, days, integer fields), sorted
    by (meter, day)."""
    p = r.rows
    rank = np.argsort(np.argsort(np.array(r.meter_ids, dtype=str)))
    order = np.lexsort((p.bucket, rank[p.meter])) if p.meter.shape[0] else p.meter
    meters = [r.meter_ids[m] for m in p.meter[order].tolist()]
    days = [p.labels[b].decode() for b in p.bucket[order].tolist()]
    values = p.values[order][:, [p.fields.index(n) for n in _PUBLISHED]].tolist()
    return meters, days, values


def daily_totals(r: Rollup) -> list[DailyTotal]:
    """The published form of a day rollup's rows, sorted by (meter, day)."""
    return [DailyTotal(m, d, *v) for m, d, v in zip(*_published(r), strict=True)]


def daily_message(r: Rollup) -> bytes:
    """The ``ami/v1/agg/daily`` message of a day rollup: :func:`daily_totals` encoded from
    columns (no object per meter)."""
    return encode_daily_columns(r.gateway, *_published(r))


# -- the job ---------------------------------------------------------------------------------

Publish = Callable[[Sequence[tuple[str, bytes]]], Awaitable[None]]


@dataclass
class RollupJob:
    """Rolls up the due periods of this machine's pending keys (see the module contract).
    ``sink`` lends a sink for the duration of one call; ``publish`` (None: do not publish)
    sends the daily totals and returns after their PUBACKs."""

    dedup: DedupStore
    settings: Settings
    sink: Callable[[], Awaitable[Sink]]
    release: Callable[[Sink], None]
    publish: Publish | None
    metrics: IngestMetrics
    delay_s: float
    owner: str = ""
    lease_s: float = 600.0

    async def run(self, every_s: float) -> None:
        """Roll up what is due every ``every_s`` seconds, forever (failures: tried next time,
        the shared state database unavailable included), first taking back the claims this owner
        held before a crash (when that fails, they expire after ``lease_s``)."""
        try:
            await asyncio.to_thread(self.dedup.release_claims, self.owner)
        except StateUnavailable as exc:
            log.warning("rollup claims not released, they expire error=%s", exc)
        while True:
            try:
                await self.run_once()
            except StateUnavailable as exc:  # owed keys stay owed; claims expire
                self.metrics.rollup_failures.inc()
                log.warning("rollup not done yet, state database unavailable error=%s", exc)
            await asyncio.sleep(every_s)

    async def run_once(self) -> int:
        """Claim the due periods and roll them up, gateway by gateway; the keys of a gateway
        whose read, write or publish failed stay owed. Returns the periods rolled up."""
        due = await asyncio.to_thread(self.dedup.claim_due, self.delay_s, self.lease_s, self.owner)
        by_gateway: dict[str, list[PendingPeriod]] = {}
        for p in due:
            by_gateway.setdefault(p.gateway, []).append(p)
        done = 0
        for gateway, keys in by_gateway.items():
            try:
                made = await self._gateway(gateway, keys)
            except (SinkError, TransportError) as exc:
                self.metrics.rollup_failures.inc()
                await asyncio.to_thread(self.dedup.done_periods, (), keys)
                level = logging.ERROR if isinstance(exc, SinkError) and not exc.retryable else logging.WARNING
                log.log(
                    level,
                    "rollup not done yet, will retry gateway=%s periods=%d error=%s",
                    gateway,
                    len(keys),
                    exc,
                )
                continue
            await asyncio.to_thread(self.dedup.done_periods, keys)
            for r in made:  # periods written: days, and the hours in them
                self.metrics.rollups.labels(r.kind).inc(int(np.unique(r.rows.ts).shape[0]))
            done += len(keys)
        self.metrics.rollup_pending.set(await asyncio.to_thread(self.dedup.pending_periods))
        return done

    async def _gateway(self, gateway: str, keys: list[PendingPeriod]) -> list[Rollup]:
        """Roll up the days of ``keys`` (an hour key, which no batch makes now, stands for its day):
        one read per day gives the day's totals and its hours'."""
        off = self.settings.calendar.utc_offset_ms
        days = {
            k.period_ms if k.kind == "day" else (k.period_ms + off) // DAY_MS * DAY_MS - off for k in keys
        }
        sink = await self.sink()
        try:
            made: list[Rollup] = []
            for day in sorted(days):
                stored = await sink.day_intervals(day, day + DAY_MS, DAY_QUANTITIES, gateways=[gateway])
                made += rollups(stored, gateway, {day}, self.settings)
            if made:
                result = await sink.write(Writes(rollups=made))
                if result.rejected:  # our own rows: a schema conflict an operator must see
                    raise SinkError(f"rollup rows rejected: {result.rejected[0].detail}", retryable=False)
        finally:
            self.release(sink)
        if self.publish is not None:
            items = [(topics.agg("daily", gateway), daily_message(r)) for r in made if r.kind == "day"]
            if items:
                await self.publish(items)
                self.metrics.published.labels("daily").inc(len(items))
        return made
