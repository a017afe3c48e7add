"""The pure per-batch part of ingest: decoded batch -> the columns a sink stores.

Contract
--------
* :func:`transform` is pure: one decoded :class:`~protocols.payload.ReadingBatch` (plus the
  registry, the tariff calendar and the settings) in, a :class:`BatchOutput` out: the
  :class:`~ingest.sinks.base.BatchColumns` the sink stores (checked readings, duplicates,
  intervals, collapsed-voltage events), the flags, the hours and days whose totals changed (their
  rollups are owed: :mod:`ingest.pipeline.rollup`), the outage span and the run state to carry to
  the next batch. It reads nothing
  but the batch and the run state it is given -- the first interval of each channel comes from
  the batch's own ``prev`` columns, the runs of VEE-08/09/19 continue from the carried state
  (:mod:`ingest.pipeline.state`) only where it ends exactly where the batch starts -- so a
  redelivered or replayed batch gives the same interval energies whatever arrived before it
  (DESIGN §6); only a run flag (and so a not-billable count) can differ, when a replay no longer
  continues the stored run.
  Columns are wrapped with ``numpy.frombuffer``; there is no Python object per reading or per
  interval.
  How the columns are stored (InfluxDB line protocol, by numba kernels) is the sink's business
  (:mod:`ingest.sinks.influx.lines`); the intervals aggregate is encoded by
  :mod:`protocols.aggregates` straight from the interval columns.
* :func:`split_foreign` (pure too) cuts out of a batch the readings and previous registers of
  meters the registry binds to another gateway, as a batch of their own, on columns (the worker
  dead-letters that part and transforms the rest).
* Raises :class:`~protocols.errors.PayloadError` for what the decoder leaves to ingest (meter
  index, empty id); data problems are flags, never exceptions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ingest.config import IngestConfig, load_calendar, load_registry, load_tariff_calendars
from ingest.model.registry import MeterRegistry
from ingest.model.tariff import TariffCalendar
from ingest.pipeline.dedup import Period
from ingest.pipeline.rollup import periods_of
from ingest.rules import stages as st
from ingest.rules.kernels import NOT_ANCHOR
from ingest.sinks.base import BatchColumns, Writes
from protocols.aggregates import IntervalRecord, encode_interval_columns
from protocols.errors import PayloadError
from protocols.flags import Flag
from protocols.payload import BatchBuilder, PrevRegisters, ReadingBatch, decode, encode

__all__ = [
    "BatchOutput",
    "Settings",
    "columns",
    "split_foreign",
    "transform",
    "warm_up",
]

Mask = npt.NDArray[np.bool_]
I64 = npt.NDArray[np.int64]
_VOLTAGE = (30, 31, 32)  # voltage_a, _b, _c (consecutive codes, protocols.quantities)


@dataclass(frozen=True, slots=True)
class Settings:
    """What :func:`transform` needs besides the batch (built once per worker)."""

    registry: MeterRegistry
    calendar: TariffCalendar
    interval_ms: int = 900_000
    max_gap_intervals: int = 8
    future_tol_ms: int = 300_000
    check_topic_gateway: bool = True
    min_ts_ms: int = st.MIN_TS_MS
    tariff_calendars: dict[str, TariffCalendar] = field(default_factory=dict)  # registry tariff -> calendar
    validation: st.ValidationParams = field(default_factory=st.ValidationParams)  # [pipeline] fields win

    @classmethod
    def from_config(cls, cfg: IngestConfig) -> Settings:
        p = cfg.pipeline
        calendar = load_calendar(cfg)
        return cls(
            load_registry(cfg),
            calendar,
            interval_ms=p.interval_s * 1000,
            max_gap_intervals=p.max_gap_intervals,
            future_tol_ms=p.future_tol_s * 1000,
            check_topic_gateway=p.check_topic_gateway,
            min_ts_ms=p.min_ts_ms,
            tariff_calendars=load_tariff_calendars(cfg, calendar),
            validation=cfg.validation_params(),
        )


@dataclass(frozen=True, slots=True)
class BatchOutput:
    """Everything one batch becomes: ``columns`` is what the sink stores."""

    columns: BatchColumns
    readings: int
    flags: npt.NDArray[np.uint32]
    periods: tuple[Period, ...]  # the local days whose totals (and hours) this batch changed
    outage_events: int  # collapsed-voltage events (they feed the area-outage check)
    outage_ts: tuple[int, int] = (0, 0)
    interval_ms: int = 900_000
    carry: st.RunCarry = field(default_factory=st.RunCarry.empty)  # run state after the batch

    @property
    def iv(self) -> st.Intervals:
        """Validated intervals, one row per (meter, quantity, end)."""
        return self.columns.intervals

    @property
    def flat_gaps(self) -> bool:
        """Are some intervals spread flat over a long gap (EST_FLAT)? Then like days may shape them."""
        return st.has_flat_gaps(self.iv)

    @property
    def meter_ids(self) -> tuple[str, ...]:
        return self.columns.meter_ids

    @property
    def n_intervals(self) -> int:
        return int(self.iv.end_ts.shape[0])

    def interval_records(self) -> list[IntervalRecord]:
        """The intervals as :class:`IntervalRecord` objects (tests, tools; not the hot path)."""
        iv = self.iv
        cols = (
            iv.meter.tolist(),
            iv.quantity.tolist(),
            iv.end_ts.tolist(),
            iv.energy.tolist(),
            iv.flags.tolist(),
        )
        return [
            IntervalRecord(self.meter_ids[m], q, e - self.interval_ms, e, v, f)
            for m, q, e, v, f in zip(*cols, strict=True)
        ]

    def intervals_payload(
        self, gateway: str, batch_seq: int, encoding: Literal["json", "binary"] = "json"
    ) -> bytes:
        """The intervals aggregate of this batch, encoded by
        :func:`protocols.aggregates.encode_interval_columns` from the interval columns."""
        iv = self.iv
        cols = (iv.meter, iv.quantity, iv.end_ts - self.interval_ms, iv.end_ts, iv.energy, iv.flags)
        return encode_interval_columns(gateway, batch_seq, self.meter_ids, cols, encoding)


def _u(col: Any, dtype: Any) -> Any:
    return np.frombuffer(col, dtype=dtype) if len(col) else np.empty(0, dtype=dtype)


def columns(batch: ReadingBatch) -> tuple[st.Readings, st.PreviousRegisters]:
    """Wrap a decoded batch's columns without copying; check meter indices vectorised.

    Raises: PayloadError for an index outside the meter table or an empty id."""
    r = st.Readings(
        _u(batch.meter, np.uint32),
        _u(batch.ts, np.int64),
        _u(batch.quantity, np.uint16),
        _u(batch.value, np.int64),
        _u(batch.flags, np.uint32),
    )
    p = batch.prev
    prev = st.PreviousRegisters(
        _u(p.meter, np.uint32), _u(p.quantity, np.uint16), _u(p.value, np.int64), _u(p.ts, np.int64)
    )
    n = len(batch.meters)
    for name, col in (("meter", r.meter), ("prev.meter", prev.meter)):
        if col.shape[0] and int(col.max()) >= n:
            raise PayloadError(f"column {name!r}: index {int(col.max())} outside the {n}-entry meter table")
    if "" in batch.meters:
        raise PayloadError("empty meter id in the meter table")
    return r, prev


def _subset(r: st.Readings, mask: npt.NDArray[np.bool_]) -> st.Readings:
    return st.Readings(r.meter[mask], r.ts[mask], r.quantity[mask], r.value[mask], r.flags[mask])


def _rows(iv: st.Intervals, take: npt.NDArray[Any]) -> st.Intervals:
    """The rows of ``iv`` that ``take`` (a mask or positions) selects."""
    return st.Intervals(iv.meter[take], iv.quantity[take], iv.end_ts[take], iv.energy[take], iv.flags[take])


def _dedup_intervals(iv: st.Intervals) -> st.Intervals:
    """One row per (meter, quantity, end): the first (VEE-10, as the encoder does for readings)."""
    if iv.end_ts.shape[0] < 2:
        return iv
    _, _, first = st.group_labels(iv.meter.astype(np.int64), iv.quantity.astype(np.int64), iv.end_ts)
    if first.shape[0] == iv.end_ts.shape[0]:
        return iv
    return _rows(iv, first)


def split_foreign(batch: ReadingBatch, s: Settings) -> tuple[ReadingBatch, ReadingBatch | None]:
    """``(own, foreign)``: the batch without the readings and previous registers of meters the
    registry binds to another gateway (:meth:`MeterRegistry.foreign`), and those as a batch of
    their own (same gateway, seq, meter table and send time; None when there are none). One mask
    per meter table, one take per column: no Python per reading.

    Raises: PayloadError for a meter index outside the table or an empty id."""
    foreign = s.registry.foreign(s.registry.params(batch.meters), batch.gateway)
    if not foreign.any():
        return batch, None
    readings, prev = columns(batch)
    r_foreign, p_foreign = foreign[readings.meter], foreign[prev.meter]
    if not r_foreign.any() and not p_foreign.any():
        return batch, None
    own = _take(batch, readings, prev, ~r_foreign, ~p_foreign)
    return own, _take(batch, readings, prev, r_foreign, p_foreign)


def _take(b: ReadingBatch, r: st.Readings, p: st.PreviousRegisters, rows: Mask, prev: Mask) -> ReadingBatch:
    """The batch of the readings ``rows`` and the previous registers ``prev`` select."""

    def col(a: npt.NDArray[Any], mask: Mask) -> memoryview:
        return memoryview(np.ascontiguousarray(a[mask]).data)

    previous = PrevRegisters(col(p.meter, prev), col(p.quantity, prev), col(p.value, prev), col(p.ts, prev))
    return ReadingBatch(
        b.gateway, b.seq, b.meters, col(r.meter, rows), col(r.ts, rows), col(r.quantity, rows),
        col(r.value, rows), col(r.flags, rows), previous, b.sent_ms,
    )  # fmt: skip


def transform(
    batch: ReadingBatch, s: Settings, carry: st.RunCarry | None = None, like: st.Intervals | None = None
) -> BatchOutput:
    """The pure per-batch pipeline (see the module contract). ``carry`` is the run state of the
    batch's channels after the batches before it (:meth:`RunStateStore.carry`), indexed by the
    batch's meter table; none: every run starts in this batch. ``like``: stored intervals of the
    batch's meters (indexed by its meter table) covering :func:`~ingest.rules.stages.like_day_window`
    of a first run's :attr:`BatchOutput.flat_gaps`; given, those gaps are shaped by their like days
    (VEE-21).

    Raises: PayloadError for what the decoder left to ingest (meter index, empty id)."""
    readings, prev = columns(batch)
    meters = s.registry.params(batch.meters)
    # The reference time of FUTURE_TIME is the batch's send time (bounded by now), not the
    # arrival time: a replay days later must flag exactly what the first delivery flagged.
    now_ms = time.time_ns() // 1_000_000
    ref_ms = min(batch.sent_ms, now_ms) if batch.sent_ms else now_ms
    params = replace(
        s.validation, interval_ms=s.interval_ms, future_tol_ms=s.future_tol_ms, min_ts_ms=s.min_ts_ms,
        max_gap_intervals=s.max_gap_intervals,
    )  # fmt: skip
    checked = st.validate_batch(readings, prev, meters, ref_ms, params, carry)
    flags = checked.flags
    checked_r = st.Readings(readings.meter, readings.ts, readings.quantity, readings.value, flags)
    dup = (flags & int(Flag.DUPLICATE)) != 0
    has_dup = bool(dup.any())
    main = _subset(checked_r, ~dup) if has_dup else checked_r
    order = None if has_dup else checked.order  # the validation's (meter, ts, quantity) sort
    iv = st.aggregate_intervals(checked_r, checked, meters, params, like=like)
    iv = _dedup_intervals(iv)
    periods = periods_of(iv, s.interval_ms, s.calendar.utc_offset_ms)
    c_meter, c_ts = _collapsed_voltage(checked_r, meters.un_dv)
    span = (int(c_ts.min()), int(c_ts.max())) if c_ts.shape[0] else (0, 0)
    cols = BatchColumns(
        batch.gateway, batch.meters, main, order, _subset(checked_r, dup) if has_dup else None, iv,
        c_meter, c_ts,
    )  # fmt: skip
    n_events = int(c_ts.shape[0])
    return BatchOutput(cols, len(readings), flags, periods, n_events, span, s.interval_ms, checked.carry)


def warm_up(s: Settings) -> Writes:
    """Run every kernel once on tiny batches, so that loading numba's cache (a third of a second)
    happens at worker start and not inside the first message's transaction. Returns what they
    became, for the sink's own warm-up (:meth:`~ingest.sinks.base.Sink.warm_up`)."""
    t0 = 1_700_000_100_000 // s.interval_ms * s.interval_ms
    cold = Settings(
        s.registry, s.calendar, s.interval_ms, s.max_gap_intervals, s.future_tol_ms, min_ts_ms=s.min_ts_ms,
    )  # fmt: skip
    sample = []
    for with_duplicate in (False, True):  # a duplicate makes subsets (copies) of the columns
        b = BatchBuilder()
        for q in (1, 30):
            b.set_prev("warm-up", q, 1000, t0)
            for k in (1, 2, 4):
                b.add("warm-up", t0 + k * s.interval_ms, q, 1000 + 10 * k)
        if with_duplicate:
            b.add("warm-up", t0 + s.interval_ms, 1, 1010)
        built = b.build("warm-up", 1, sent_ms=t0 + 4 * s.interval_ms)
        # Built in memory the columns are writable; decoded off the wire they are read-only views
        # of the payload -- a different numba type, hence a specialisation of its own.
        for batch in (built, decode(encode(built))):
            sample.append(transform(batch, cold).columns)
    return Writes(batches=sample)


def _collapsed_voltage(r: st.Readings, un_dv: npt.NDArray[np.int64]) -> tuple[I64, I64]:
    """OUT-01 from readings: the (meter, ts) where every phase voltage read is below 60 % U_n
    (meters with a known rating only), as ``voltage_collapsed`` event columns."""
    none = np.empty(0, dtype=np.int64)
    # Believable readings only: an error reply reads 0 V, an out-of-range value could overflow
    # the products below, a reading outside the time bounds is no evidence of an outage now.
    sel = (r.quantity >= _VOLTAGE[0]) & (r.quantity <= _VOLTAGE[-1]) & ((r.flags & NOT_ANCHOR) == 0)
    if not sel.any():
        return none, none
    meter, ts, value = r.meter[sel].astype(np.int64), r.ts[sel], r.value[sel]
    un = un_dv[meter]
    low = (un > 0) & (value * 10 < un * 6)
    if not low.any():
        return none, none
    labels, ng, first = st.group_labels(meter, ts)
    n_all = np.bincount(labels, minlength=ng)
    n_low = np.bincount(labels, weights=low, minlength=ng).astype(np.int64)
    hit = first[np.flatnonzero((n_all == n_low) & (n_low > 0))]
    return meter[hit], ts[hit].astype(np.int64)
