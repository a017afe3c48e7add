"""The sink seam: what the pipeline stores and reads back, in the pipeline's terms.

Contract
--------
* :class:`Sink` is the one interface the worker, the dead-letter replay, the CLI and the daily
  report use; an implementation (today :class:`~ingest.sinks.influx.sink.InfluxSink`) owns its
  store's encoding, transport and query language. Nothing outside the implementation's package
  knows that encoding (line protocol, InfluxQL).
* :meth:`Sink.write` takes :class:`Writes` (columns: numpy arrays of readings, intervals,
  collapsed-voltage events; the rolled-up rows of closed periods; edge events; alarms) and
  returns only when every record is either written or *rejected*: refused by the store for
  good, reported back in :attr:`WriteResult.rejected` with the store's reason. The sink
  dead-letters nothing; the caller does. A rewrite of the same :class:`Writes` is an idempotent
  overwrite (every record is keyed by series and time).
* A write is prepared once and sent until written: :meth:`Sink.prepare` encodes the
  :class:`Writes` into the store's request bodies (encoded, cut and compressed here, once);
  :meth:`Sink.send` posts the bodies not yet accepted, in order, and marks each one accepted in
  the :class:`PreparedWrite`, so a ``send`` of the same object after a failure resumes at the
  first body not done and never re-posts an accepted one (the rejected records found so far are
  kept with it). :meth:`Sink.write` is ``send(prepare(writes))`` for one-shot callers.
* A store that refuses *us* (credentials, privileges, a missing database) raises
  :class:`~protocols.errors.SinkRefused` (nothing rejected, the caller keeps the data and
  retries); a store that is unreachable or overloaded raises ``SinkError(retryable=True)`` at
  once (``retry_after_s`` set when it said ``Retry-After``). The sink never retries: the one
  retry layer is :func:`retry_until_done` / :func:`send_until_written` (exponential back-off
  with jitter, ``Retry-After`` honoured, a callback on each failure), forever for the worker,
  bounded (:class:`RetryPolicy` ``attempts``) for one-shot callers.
* The reads return the pipeline's values (ids unescaped, local days as epoch ms of their start):
  outage-like events, the open area-outage alarm, one meter-day's
  completeness, the daily report's per-meter day sums and past area classes, stored energy
  intervals of a window (the periods a rollup computes, a day for VEE-06, the like days of long
  gaps for VEE-21). Each raises
  ``SinkError`` (retryable when unreachable) like the writes.
* :meth:`Sink.write_interval_flags` rewrites only the flags of stored intervals (the daily job's
  VEE-06): the energies stay, and a rewrite of the same flags is an idempotent overwrite.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from ingest.rules import stages as st
from protocols.errors import SinkError
from protocols.payload import Event

if TYPE_CHECKING:
    from ingest.pipeline.loss import Alarm
    from ingest.reports.daily import DailyReport

__all__ = [
    "AreaAlarm",
    "BatchColumns",
    "DaySums",
    "OnFailure",
    "OutageEvent",
    "PeriodTotals",
    "PreparedWrite",
    "Rejected",
    "RetryPolicy",
    "Rollup",
    "Sink",
    "StoredIntervals",
    "WriteResult",
    "Writes",
    "backoff_delay_s",
    "retry_until_done",
    "send_until_written",
]

I64 = npt.NDArray[np.int64]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PeriodTotals:
    """Per (meter, local period) totals (``daily_tou``: day, ``hourly``: hour).

    Row r: meter ``meter[r]`` (index into a meter table), period ``labels[bucket[r]]``
    (``YYYY-MM-DD`` or ``YYYY-MM-DDTHH``), stored at ``ts[r]`` (the period's start, so a rollup
    run again rewrites the same record), integer fields ``fields`` with values ``values[r]``
    (rows x fields)."""

    meter: I64
    bucket: I64
    labels: tuple[bytes, ...]
    fields: tuple[bytes, ...]
    values: I64
    ts: I64


@dataclass(frozen=True, slots=True)
class Rollup:
    """The totals of closed periods of one gateway (:mod:`ingest.pipeline.rollup`): ``rows``
    index ``meter_ids``; ``kind`` ``day`` (``daily_tou``) or ``hour`` (``hourly``)."""

    gateway: str
    meter_ids: tuple[str, ...]
    kind: Literal["hour", "day"]
    rows: PeriodTotals


@dataclass(frozen=True, slots=True)
class BatchColumns:
    """What one reading batch stores, as columns indexing ``meter_ids``.

    ``readings``: checked readings without the duplicates (flags set), ``order`` their (meter, ts,
    quantity) sort when known; ``duplicates``: the readings flagged DUPLICATE (stored in a series
    of their own); ``intervals``: validated interval energy; ``collapsed_meter``/``collapsed_ts``:
    OUT-01 collapsed-voltage events. Totals are not per batch: see :class:`Rollup`."""

    gateway: str
    meter_ids: tuple[str, ...]
    readings: st.Readings
    order: I64 | None
    duplicates: st.Readings | None
    intervals: st.Intervals
    collapsed_meter: I64
    collapsed_ts: I64


@dataclass(frozen=True, slots=True)
class AreaAlarm:
    """An OUT-02 area-outage alarm: ``events`` outage events in ``area`` around ``ts_ms``."""

    area: str
    ts_ms: int
    events: int


@dataclass(frozen=True, slots=True)
class Writes:
    """One :meth:`Sink.write`: any mix of batches, edge events and alarms."""

    batches: Sequence[BatchColumns] = ()
    events: Sequence[Event] = ()
    rollups: Sequence[Rollup] = ()
    area_alarms: Sequence[AreaAlarm] = ()
    loss_alarms: Sequence[Alarm] = ()


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record the store will never accept: its encoded form, a short reason and the store's
    message (what the dead-letter store keeps, kind ``kind``)."""

    record: bytes
    reason: str
    detail: str
    kind: str = "line"


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one write did: every record is either written or in ``rejected``."""

    written: int
    rejected: tuple[Rejected, ...] = ()


@dataclass(frozen=True, slots=True)
class OutageEvent:
    """A power-down-like event (edge ``power_down`` or OUT-01 ``voltage_collapsed``) as stored."""

    meter: str
    gateway: str
    ts_ms: int


@dataclass(frozen=True, slots=True)
class DaySums:
    """One (meter, gateway)'s sums over a local day of its ``daily_tou`` rows (the report's
    input); ``sums`` maps field name to its sum, None when no row carried the field."""

    meter: str
    gateway: str
    sums: Mapping[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredIntervals:
    """Stored energy intervals as columns: row r is the interval of channel ``quantity[r]``
    (quantity code) ending at ``end_ts[r]`` (ms) of meter ``meters[meter[r]]``, stored under
    gateway ``gateways[gateway[r]]``; ``energy`` in the quantity's fixed point (0.01 kWh),
    multiplier applied; ``flags`` as stored."""

    meters: tuple[str, ...]
    gateways: tuple[str, ...]
    meter: npt.NDArray[np.uint32]
    gateway: npt.NDArray[np.uint32]
    quantity: npt.NDArray[np.uint16]
    end_ts: I64
    energy: I64
    flags: npt.NDArray[np.uint32]

    def __len__(self) -> int:
        return int(self.end_ts.shape[0])

    def intervals(self) -> st.Intervals:
        """The rows as the rule stages' :class:`~ingest.rules.stages.Intervals` (meter indexes)."""
        return st.Intervals(self.meter, self.quantity, self.end_ts, self.energy, self.flags)

    def take(self, rows: I64, flags: npt.NDArray[np.uint32] | None = None) -> StoredIntervals:
        """The rows ``rows`` (same tables), with their flags replaced by ``flags[rows]`` if given."""
        return StoredIntervals(
            self.meters, self.gateways, self.meter[rows], self.gateway[rows], self.quantity[rows],
            self.end_ts[rows], self.energy[rows], (self.flags if flags is None else flags)[rows],
        )  # fmt: skip


class PreparedWrite(Protocol):
    """A write encoded for its store, once (:meth:`Sink.prepare`); what a caller may know of it.
    The sink's :meth:`Sink.send` advances it; only the sink that prepared it may send it."""

    @property
    def bodies(self) -> int:
        """Requests the write takes."""
        ...

    @property
    def done(self) -> int:
        """Requests the store has answered for (accepted, their rejected records found), in
        order: ``send`` resumes at body ``done``."""
        ...

    @property
    def lines(self) -> int:
        """Records in the write."""
        ...


class Sink(Protocol):
    """The store of the ingest pipeline (see the module contract)."""

    async def aclose(self) -> None: ...

    async def probe(self, *, create: bool = True) -> str:
        """Would a write be accepted (nothing written)? A one-line summary, else raise
        SinkRefused / SinkError. ``create=False``: create nothing that is missing."""
        ...

    def warm_up(self, sample: Writes) -> None:
        """Prepare the encoding of ``sample`` (JIT compilation) without writing anything."""
        ...

    def prepare(self, writes: Writes) -> PreparedWrite:
        """Encode ``writes`` into request bodies (cut and compressed): once per write."""
        ...

    async def send(self, prepared: PreparedWrite) -> WriteResult:
        """Post the bodies of ``prepared`` not yet done, in order; the result of the whole write
        once every body is done. Raises SinkError / SinkRefused at the first failing request
        (the bodies done so far stay done)."""
        ...

    async def write(self, writes: Writes) -> WriteResult:
        """``send(prepare(writes))``: one attempt, for one-shot callers."""
        ...

    async def outage_events(self, t_lo_ms: int, t_hi_ms: int) -> list[OutageEvent]:
        """Every power-down-like event stored in ``[t_lo_ms, t_hi_ms]`` (all workers')."""
        ...

    async def open_area_alarm(self, area: str, t_lo_ms: int, t_hi_ms: int) -> AreaAlarm | None:
        """The earliest area-outage alarm of ``area`` stored in ``[t_lo_ms, t_hi_ms]``."""
        ...

    async def drop_area_alarms(self, area: str, after_ms: int, until_ms: int) -> None:
        """Delete the area-outage alarms of ``area`` stored in ``(after_ms, until_ms]``: the
        times an alarm had before it moved back to an earlier power-down."""
        ...

    async def completeness(
        self,
        meter_id: str,
        day: dt.date,
        *,
        utc_offset_ms: int = ...,
        interval_ms: int = ...,
        quantity: str = ...,
    ) -> st.DayCompleteness:
        """KPI-01 / VEE-13 of one meter-day from the stored intervals and duplicates."""
        ...

    async def day_sums(self, start_ms: int, end_ms: int, fields: Sequence[str]) -> list[DaySums]:
        """Per (meter, gateway) the sums of the ``daily_tou`` rows' ``fields`` stored in
        ``[start_ms, end_ms)``."""
        ...

    async def area_classes(self, start_ms: int, end_ms: int) -> dict[str, dict[int, str]]:
        """``{area: {day start ms: LL-02 class}}`` of the daily reports stored in the window."""
        ...

    async def day_intervals(
        self,
        start_ms: int,
        end_ms: int,
        quantities: Sequence[int],
        meters: Sequence[str] | None = None,
        gateways: Sequence[str] | None = None,
    ) -> StoredIntervals:
        """Every stored interval of the channels ``quantities`` (codes) ending in
        ``(start_ms, end_ms]`` (intervals are end-labelled: a period's ``[start, end)`` of
        interval starts), of every meter or only of ``meters`` (the worker's VEE-21 like-day
        read), under every gateway or only ``gateways`` (a rollup's read)."""
        ...

    async def write_interval_flags(self, rows: StoredIntervals) -> WriteResult:
        """Set the stored flags of each row's interval to ``rows.flags`` (energy untouched)."""
        ...

    async def write_report(self, report: DailyReport) -> WriteResult:
        """The daily report's records (area loss, collection, line-loss alarms), then the removal
        of that day's line-loss alarms of areas no longer anomalous (a rerun leaves what a first
        run would have)."""
        ...


def backoff_delay_s(attempt: int, initial_s: float, max_s: float, jitter: float = 0.0) -> float:
    """Delay before retry number ``attempt`` (1-based): ``initial * 2**(attempt-1)``, capped.

    ``jitter`` in [0, 1) is a caller-supplied random fraction added on top (pure: time and
    randomness are injected, STYLE H9)."""
    base = min(max_s, initial_s * 2.0 ** max(0, attempt - 1))
    return float(base * (1.0 + jitter))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How :func:`retry_until_done` waits: ``backoff_delay_s(attempt, initial_s, max_s)`` plus up
    to 20 % jitter, at least the server's ``Retry-After`` (capped at ``retry_after_max_s``);
    ``attempts``: tries in all before the error is raised, ``None`` for until it succeeds."""

    initial_s: float
    max_s: float
    attempts: int | None = None
    retry_after_max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts: expected >= 1 or None, got {self.attempts}")

    def delay_s(self, attempt: int, exc: BaseException, jitter: float) -> float:
        """The wait after failure number ``attempt`` (1-based) that raised ``exc``."""
        delay = backoff_delay_s(attempt, self.initial_s, self.max_s, jitter * 0.2)
        retry_after = exc.retry_after_s if isinstance(exc, SinkError) else None
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_max_s))
        return delay


OnFailure = Callable[[Exception, int, float | None], None]


def final_sink_error(exc: Exception) -> bool:
    """The default ``give_up`` of :func:`retry_until_done`: a ``SinkError`` that is not
    ``retryable`` (the store will never accept it) is raised at once."""
    return isinstance(exc, SinkError) and not exc.retryable


async def retry_until_done(
    step: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    retry_on: tuple[type[Exception], ...] = (SinkError,),
    give_up: Callable[[Exception], bool] = final_sink_error,
    on_failure: OnFailure | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> T:
    """The one retry loop: await ``step()`` until it returns, waiting per ``policy`` after each
    failure of ``retry_on``; one that ``give_up`` says is final is raised at once (by default a
    ``SinkError`` that is not ``retryable``).

    ``on_failure(exc, attempt, delay_s)`` is called on every failure, before the wait
    (``delay_s`` None: the policy's attempts are spent and ``exc`` is raised next); it may raise
    to stop. ``sleep`` and ``rng`` are injectable (STYLE H9)."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        try:
            return await step()
        except retry_on as exc:
            if give_up(exc):
                raise
            attempt += 1
            last = policy.attempts is not None and attempt >= policy.attempts
            delay = None if last else policy.delay_s(attempt, exc, rng.random())
            if on_failure is not None:
                on_failure(exc, attempt, delay)
            if delay is None:
                raise
            await sleep(delay)


async def send_until_written(
    sink: Sink,
    prepared: PreparedWrite,
    policy: RetryPolicy,
    *,
    on_failure: OnFailure | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> WriteResult:
    """``sink.send(prepared)`` through :func:`retry_until_done`: each retry posts only the
    bodies not yet done, the bodies compressed once."""
    return await retry_until_done(
        lambda: sink.send(prepared), policy, on_failure=on_failure, sleep=sleep, rng=rng
    )
