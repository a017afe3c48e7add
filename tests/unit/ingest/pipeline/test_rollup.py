"""Rollups: the totals of a period computed once from its intervals (pure rows; the job's
decisions with a fake sink and publisher; the real InfluxDB path is in
tests/integration/test_rollups.py)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from ingest.config import SAMPLE, parse_config
from ingest.metrics import IngestMetrics
from ingest.pipeline.dedup import DedupStore
from ingest.pipeline.rollup import RollupJob, daily_totals, day_rows, hour_rows, periods_of
from ingest.pipeline.transform import Settings
from ingest.rules import stages as st
from ingest.sinks.base import PeriodTotals, StoredIntervals, WriteResult, Writes
from protocols.aggregates import decode_daily
from protocols.errors import SinkError
from protocols.flags import Flag

Q = 900_000
T0 = 1_710_000_000_000  # 2024-03-10 00:00 at UTC+8 (local midnight)
S = Settings.from_config(parse_config(SAMPLE))
METERS = ("M 1", "M,2", "M3")
FLAGS = (0, 0, 0, int(Flag.ESTIMATED), int(Flag.SPIKE), int(Flag.WENT_BACKWARDS))


def _iv(rows: Sequence[tuple[int, int, int, int, int]]) -> st.Intervals:
    """(meter, quantity, end, energy, flags) rows, one per (meter, quantity, end)."""
    cols = list(zip(*rows, strict=True)) if rows else [()] * 5
    return st.Intervals(
        np.array(cols[0], np.uint32), np.array(cols[1], np.uint16), np.array(cols[2], np.int64),
        np.array(cols[3], np.int64), np.array(cols[4], np.uint32),
    )  # fmt: skip


def _by_key(
    p: PeriodTotals | None, skip: tuple[bytes, ...] = ()
) -> dict[tuple[int, bytes], dict[bytes, int]]:
    if p is None:
        return {}
    return {
        (m, p.labels[b]): {f: int(v) for f, v in zip(p.fields, vals, strict=True) if f not in skip}
        for m, b, vals in zip(p.meter.tolist(), p.bucket.tolist(), p.values.tolist(), strict=True)
    }


def _summed(
    parts: list[PeriodTotals | None], skip: tuple[bytes, ...]
) -> dict[tuple[int, bytes], dict[bytes, int]]:
    out: dict[tuple[int, bytes], dict[bytes, int]] = {}
    for p in parts:
        for key, fields in _by_key(p, skip).items():
            acc = out.setdefault(key, {})
            for f, v in fields.items():
                acc[f] = acc.get(f, 0) + v
    return out


reads = hs.lists(  # (meter, k): the total register's interval and some of T1..T4 and reverse
    hs.tuples(
        hs.integers(0, 2),
        hs.integers(-8, 100),
        hs.integers(0, 5_000),
        hs.sampled_from(FLAGS),
        hs.lists(
            hs.tuples(hs.integers(2, 6), hs.integers(0, 3_000), hs.sampled_from(FLAGS)),
            max_size=5,
            unique_by=lambda c: c[0],
        ),
    ),
    min_size=1,
    max_size=60,
    unique_by=lambda r: (r[0], r[1]),
)


@settings(max_examples=150, deadline=None)
@given(reads=reads, cuts=hs.lists(hs.integers(-8, 100), max_size=4))
def test_a_period_rolled_up_at_once_equals_the_sum_of_any_split_of_its_intervals(
    reads: list[tuple[int, int, int, int, list[tuple[int, int, int]]]], cuts: list[int]
) -> None:
    """The totals a rollup writes for a period are the sums of the per-batch partials the
    pipeline wrote before (the same stage kernels over each batch's share of the intervals),
    field for field, whatever times the batches were cut at; only ``tou_mismatch`` judges the
    day as a whole."""
    rows = [
        row
        for m, k, e, f, tariffs in reads
        for row in [(m, 1, T0 + k * Q, e, f), *((m, q, T0 + k * Q, te, tf) for q, te, tf in tariffs)]
    ]
    bounds = [-9, *sorted(set(cuts)), 101]
    parts = [[r for r in rows if T0 + lo * Q < r[2] <= T0 + hi * Q] for lo, hi in itertools.pairwise(bounds)]
    meters = S.registry.params(METERS)
    whole = _by_key(day_rows(_iv(rows), meters, S), skip=(b"tou_mismatch",))
    split = _summed([day_rows(_iv(p), meters, S) for p in parts if p], skip=(b"tou_mismatch",))
    # export fields are written where the rows' intervals include reverse energy: absent is 0
    assert whole.keys() == split.keys()
    for key, fields in whole.items():
        names = fields.keys() | split[key].keys()
        assert {f: fields.get(f, 0) for f in names} == {f: split[key].get(f, 0) for f in names}, key
    assert _by_key(hour_rows(_iv(rows), S)) == _summed([hour_rows(_iv(p), S) for p in parts if p], skip=())


def test_rows_are_stamped_with_the_start_of_their_local_period() -> None:
    # ends at 00:15 .. 01:30 local: starts 00:00 .. 01:15, one day, hours 00 and 01
    iv = _iv([(0, 1, T0 + k * Q, 25, 0) for k in range(1, 7)])
    day = day_rows(iv, S.registry.params(METERS), S)
    hour = hour_rows(iv, S)
    assert day is not None and hour is not None
    assert day.ts.tolist() == [T0] and day.labels == (b"2024-03-10",)
    assert hour.ts.tolist() == [T0, T0 + 3_600_000] and hour.labels == (b"2024-03-10T00", b"2024-03-10T01")
    assert periods_of(iv, Q, S.calendar.utc_offset_ms) == (("day", T0),)  # hours go with their day
    late = _iv([(0, 1, T0 + 86_400_000 + Q, 25, 0)])  # 00:00-00:15 of the next day
    assert periods_of(late, Q, S.calendar.utc_offset_ms) == (("day", T0 + 86_400_000),)


class FakeSink:
    """Stored intervals of gateway ``gw`` answered from memory (by window and channel);
    writes recorded; ``error`` raised by reads if set."""

    def __init__(self, gw: str, rows: list[tuple[int, int, int, int, int]]) -> None:
        self.gw, self.rows, self.error = gw, rows, None
        self.written: list[Writes] = []
        self.reads: list[tuple[int, int]] = []

    async def day_intervals(
        self, start_ms: int, end_ms: int, quantities: Sequence[int], meters: Any = None, gateways: Any = None
    ) -> StoredIntervals:
        self.reads.append((start_ms, end_ms))
        if self.error is not None:
            raise self.error
        take = [r for r in self.rows if start_ms < r[2] <= end_ms and r[1] in quantities]
        if gateways is not None and self.gw not in gateways:
            take = []
        iv = _iv(take)
        return StoredIntervals(METERS, (self.gw,), iv.meter, np.zeros(len(take), np.uint32), iv.quantity,
                               iv.end_ts, iv.energy, iv.flags)  # fmt: skip

    async def write(self, writes: Writes) -> WriteResult:
        self.written.append(writes)
        return WriteResult(sum(len(r.rows.ts) for r in writes.rollups))


class Clock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def store(tmp_path: Path) -> Any:
    clock = Clock(T0 / 1000 + 2 * 86_400)
    with DedupStore(tmp_path / "dd.sqlite", clock=clock) as s:
        s.clock = clock  # type: ignore[attr-defined]
        yield s


def _job(store: DedupStore, sink: FakeSink, sent: list[tuple[str, bytes]]) -> RollupJob:
    async def get() -> Any:
        return sink

    async def publish(items: Sequence[tuple[str, bytes]]) -> None:
        sent.extend(items)

    return RollupJob(store, S, get, lambda _s: None, publish, IngestMetrics(), delay_s=60)


async def test_the_job_writes_each_period_once_publishes_the_day_and_drops_the_keys(store: Any) -> None:
    rows = [(0, 1, T0 + k * Q, 25, 0) for k in range(1, 97)] + [(1, 1, T0 + 4 * Q, 40, int(Flag.ESTIMATED))]
    sink, sent = FakeSink("gw-1", rows), []
    store.mark("gw-1", 1, periods=[("day", T0)])
    store.mark(
        "gw-1", 2, periods=[("hour", T0 + 3_600_000)]
    )  # an hour key (none is made now) stands for its day
    store.clock.now_s += 60  # nothing touched them for the delay
    job = _job(store, sink, sent)
    assert await job.run_once() == 2
    assert sink.reads == [(T0, T0 + 86_400_000)]  # one read: the day's gives its hours too
    [writes] = sink.written
    day = next(r for r in writes.rollups if r.kind == "day").rows
    hours = next(r for r in writes.rollups if r.kind == "hour").rows
    assert day.ts.tolist() == [T0, T0] and day.values[:, 0].tolist() == [2400, 40]  # M 1, M,2
    assert sorted(set(hours.ts.tolist())) == [T0 + h * 3_600_000 for h in range(24)]  # every hour of the day
    assert hours.values[:, 0].sum() == 2440 and len(hours.ts) == 25  # M 1: 24 hours, M,2: one
    assert job.metrics.rollups.labels("day")._value.get() == 1
    assert job.metrics.rollups.labels("hour")._value.get() == 24
    [(topic, payload)] = sent
    doc = json.loads(payload)
    assert topic == "ami/v1/agg/daily/gw-1"
    assert [(d["meter"], d["total"], d["intervals"], d["estimated_intervals"]) for d in doc["days"]] == [
        ("M 1", 2400, 96, 0), ("M,2", 40, 1, 1),
    ]  # fmt: skip
    assert decode_daily(payload) == ("gw-1", daily_totals(next(r for r in writes.rollups if r.kind == "day")))
    assert store.pending_periods() == 0
    assert await _job(store, sink, sent).run_once() == 0 and len(sink.written) == 1  # nothing owed


async def test_a_failed_read_keeps_the_periods_owed_and_counts_the_failure(store: Any) -> None:
    sink, sent = FakeSink("gw-1", [(0, 1, T0 + Q, 25, 0)]), []
    sink.error = SinkError("influxd unreachable", retryable=True)
    store.mark("gw-1", 1, periods=[("day", T0)])
    store.clock.now_s += 60
    job = _job(store, sink, sent)
    assert await job.run_once() == 0
    assert store.pending_periods() == 1 and sink.written == [] and sent == []
    assert job.metrics.rollup_failures._value.get() == 1
    sink.error = None
    assert await job.run_once() == 1 and store.pending_periods() == 0  # released, tried again


async def test_late_data_after_the_rollup_rolls_the_period_up_again(store: Any) -> None:
    sink, sent = FakeSink("gw-1", [(0, 1, T0 + Q, 25, 0)]), []
    store.mark("gw-1", 1, periods=[("day", T0)])
    store.clock.now_s += 60
    job = _job(store, sink, sent)
    assert await job.run_once() == 1
    sink.rows.append((0, 1, T0 + 2 * Q, 30, 0))  # a late batch lands and touches the day
    store.mark("gw-1", 2, periods=[("day", T0)])
    assert await job.run_once() == 0  # touched just now: waits for the delay
    store.clock.now_s += 60
    assert await job.run_once() == 1
    first, second = (w.rollups[0].rows for w in sink.written)
    assert first.ts.tolist() == second.ts.tolist() == [T0]  # the same record, rewritten
    assert (first.values[0, 0], second.values[0, 0]) == (25, 55)
    assert [json.loads(p)["days"][0]["intervals"] for _, p in sent] == [1, 2]
