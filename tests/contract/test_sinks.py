"""The sink contract (:mod:`ingest.sinks.base`), run against every implementation on a real store.

Each test takes ``store``: a :class:`Store` (a fresh, empty store and a :class:`Sink` on it). A
second implementation is one more entry in ``STORES``: a function of the pytest request that
yields a ``Store``, with ``poison`` making the store refuse edge events for good (what its
line-level rejection looks like) and ``missing`` a sink on a store that does not exist.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast

import numpy as np
import pytest

from ingest.config import SAMPLE, parse_config
from ingest.pipeline.rollup import DAY_QUANTITIES, daily_totals, rollups
from ingest.pipeline.transform import BatchOutput, Settings, transform
from ingest.reports.daily import AreaLoss, DailyReport, day_window
from ingest.sinks.base import AreaAlarm, OutageEvent, Rollup, Sink, Writes
from protocols.aggregates import DailyTotal
from protocols.errors import SinkRefused
from protocols.flags import Flag
from protocols.payload import BatchBuilder, Event
from protocols.quantities import ENERGY_FORWARD, ENERGY_REVERSE

pytestmark = pytest.mark.integration

Q = 900_000
T0 = 1_710_000_000_000  # 2024-03-10 00:00 at UTC+8, the sample calendar's zone
DAY = dt.date(2024, 3, 10)
OFFSET = 8 * 3_600_000
METER = 'M 1,=x"%'  # every character a store's encoding must escape and give back
GATEWAY = "gw 1,="


@dataclasses.dataclass
class Store:
    sink: Sink
    poison: Callable[[], None]
    missing: Callable[[], AbstractAsyncContextManager[Sink]]


@asynccontextmanager
async def influxdb(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    from ingest.sinks.influx.http import SinkConfig
    from ingest.sinks.influx.sink import InfluxSink

    influxd, db = request.getfixturevalue("influx_db")

    def poison() -> None:  # ``id`` an integer field in T0's shard: a string id is a type conflict
        influxd.write(b'events,gateway=x,kind=power_down id=1i,detail="{}" %d\n' % T0, db)

    @asynccontextmanager
    async def missing() -> AsyncIterator[Sink]:
        async with InfluxSink(SinkConfig(url=influxd.url, api="v1", database=f"{db}_missing")) as s:
            yield s

    async with InfluxSink(SinkConfig(url=influxd.url, api="v1", database=db)) as sink:
        yield Store(sink, poison, missing)


class _Flushed:
    """A VictoriaSink whose every write is searchable when it returns: the test asks the server
    (``/internal/force_flush``) instead of waiting out VictoriaMetrics' ~1-10 s, which the
    pipeline waits out with ``[pipeline] rollup_delay_s`` (docs/victoriametrics.md)."""

    def __init__(self, sink: Any, flush: Callable[[], None]) -> None:
        self._sink, self._flush = sink, flush

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._sink, name)
        if name not in ("send", "write", "write_interval_flags", "write_report"):
            return attr

        async def flushed(*args: Any, **kwargs: Any) -> Any:
            try:
                return await attr(*args, **kwargs)
            finally:
                await asyncio.to_thread(self._flush)

        return flushed


@asynccontextmanager
async def victoriametrics(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Readings and intervals in VictoriaMetrics (a fresh ``db`` label), the records in a fresh
    InfluxDB database (the split of docs/victoriametrics.md)."""
    from ingest.sinks.influx.http import SinkConfig
    from ingest.sinks.influx.sink import InfluxSink
    from ingest.sinks.victoria.config import VictoriaConfig
    from ingest.sinks.victoria.sink import VictoriaSink

    vm, label = request.getfixturevalue("victoria_db")
    influxd, db = request.getfixturevalue("influx_db")
    records = SinkConfig(url=influxd.url, api="v1", database=db)

    def poison() -> None:  # edge events are the records store's: poisoned as InfluxDB's
        influxd.write(b'events,gateway=x,kind=power_down id=1i,detail="{}" %d\n' % T0, db)

    @asynccontextmanager
    async def missing() -> AsyncIterator[Sink]:  # a cluster's paths, which a single node does not serve
        cfg = VictoriaConfig(
            enabled=True, write_url=f"{vm.url}/insert/0/influx", read_url=f"{vm.url}/select/0/prometheus",
            database=label,
        )  # fmt: skip
        async with VictoriaSink(cfg, InfluxSink(records)) as s:
            yield s

    cfg = VictoriaConfig(enabled=True, url=vm.url, database=label)
    async with VictoriaSink(cfg, InfluxSink(records)) as sink:
        yield Store(cast(Sink, _Flushed(sink, vm.force_flush)), poison, missing)


STORES = {"influxdb": influxdb, "victoriametrics": victoriametrics}


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    async with STORES[request.param](request) as s:
        yield s


def settings() -> Settings:
    return Settings.from_config(parse_config(SAMPLE))


def transformed(seq: int, k_lo: int, k_hi: int, meter: str = METER) -> BatchOutput:
    """Meter ``meter``: 25 (0.01 kWh) per interval over (k_lo, k_hi]."""
    b = BatchBuilder()
    b.set_prev(meter, 1, 1000 + 25 * k_lo, T0 + k_lo * Q)
    for k in range(k_lo + 1, k_hi + 1):
        b.add(meter, T0 + k * Q, 1, 1000 + 25 * k)
    return transform(b.build(GATEWAY, seq, sent_ms=T0 + k_hi * Q), settings())


async def test_probe_accepts_and_a_missing_store_is_refused(store: Store) -> None:
    assert await store.sink.probe(create=False)
    async with store.missing() as missing:
        with pytest.raises(SinkRefused) as refused:
            await missing.probe(create=False)
        assert refused.value.reason == "not_found"
        with pytest.raises(SinkRefused):  # a refusal of us: nothing is reported rejected
            await missing.write(Writes([transformed(1, 0, 4).columns]))


async def _roll_up_day(store: Store, day_ms: int) -> list[Rollup]:
    """What the rollup job writes for ``GATEWAY``'s day: its stored intervals read back, its
    day and hour rows computed and written."""
    stored = await store.sink.day_intervals(day_ms, day_ms + 86_400_000, DAY_QUANTITIES, gateways=[GATEWAY])
    made = rollups(stored, GATEWAY, {day_ms}, settings())
    assert (await store.sink.write(Writes(rollups=made))).rejected == ()
    return made


async def test_written_intervals_roll_up_into_one_row_per_day_and_rewrites_are_idempotent(
    store: Store,
) -> None:
    first, second = transformed(1, 0, 4), transformed(2, 4, 10)
    for out in (first, second, first):  # a redelivery rewrites, never adds
        result = await store.sink.write(Writes([out.columns]))
        assert result.written > 0 and result.rejected == ()
    assert ("day", T0) in first.periods and ("day", T0) in second.periods
    made = await _roll_up_day(store, T0)
    await _roll_up_day(store, T0)  # a rollup run again rewrites its rows
    # 10 intervals of 25; the sample calendar puts 00:00-08:00 in valley
    [day] = [daily_totals(r) for r in made if r.kind == "day"]
    assert day == [DailyTotal(METER, "2024-03-10", 250, 0, 0, 0, 250, 10, 0)]
    [sums] = await store.sink.day_sums(*day_window(DAY, OFFSET), ("total", "intervals", "rev_total"))
    assert (sums.meter, sums.gateway) == (METER, GATEWAY)
    assert dict(sums.sums) == {"total": 250, "intervals": 10, "rev_total": None}
    assert len(await store.sink.day_intervals(T0, T0 + 86_400_000, DAY_QUANTITIES, gateways=["other"])) == 0
    await store.sink.write(Writes([transformed(3, 10, 12).columns]))  # late data, rolled up again
    await _roll_up_day(store, T0)
    [sums] = await store.sink.day_sums(*day_window(DAY, OFFSET), ("total", "intervals"))
    assert dict(sums.sums) == {"total": 300, "intervals": 12}  # replaced, not added


async def test_completeness_of_a_meter_day(store: Store) -> None:
    await store.sink.write(Writes([transformed(1, 0, 4).columns, transformed(2, 6, 8).columns]))
    report = await store.sink.completeness(METER, DAY, utc_offset_ms=OFFSET, interval_ms=Q)
    assert (report.expected, report.actual, report.estimated, report.invalid) == (96, 6, 0, 0)
    assert report.duplicates == 0 and report.meter_id == METER and report.day == DAY


async def test_outage_events_and_area_alarms_read_back(store: Store) -> None:
    power_down = Event("e-1", GATEWAY, "power_down", T0 + 5 * Q, METER, {"phase": "A"})
    collapsed = np.array([T0 + 3 * Q], np.int64)  # OUT-01 of the batch's meter 0 (see transform)
    cols = dataclasses.replace(
        transformed(1, 0, 4).columns, collapsed_meter=np.zeros(1, np.int64), collapsed_ts=collapsed
    )
    await store.sink.write(Writes([cols], [power_down]))
    events = await store.sink.outage_events(T0, T0 + 5 * Q)
    assert sorted(events, key=lambda e: e.ts_ms) == [
        OutageEvent(METER, GATEWAY, T0 + 3 * Q),
        OutageEvent(METER, GATEWAY, T0 + 5 * Q),
    ]
    assert await store.sink.outage_events(T0 + 6 * Q, T0 + 9 * Q) == []

    area = "area 1,="
    assert await store.sink.open_area_alarm(area, T0, T0 + Q) is None
    await store.sink.write(Writes(area_alarms=[AreaAlarm(area, T0 + Q, 3)]))
    await store.sink.write(Writes(area_alarms=[AreaAlarm(area, T0 + Q, 5)]))  # updated in place
    assert await store.sink.open_area_alarm(area, T0, T0 + 2 * Q) == AreaAlarm(area, T0 + Q, 5)
    assert await store.sink.open_area_alarm("other", T0, T0 + 2 * Q) is None
    # an alarm moved back to an earlier power-down: the times it had before are dropped
    await store.sink.write(
        Writes(area_alarms=[AreaAlarm(area, T0 + 2 * Q, 5), AreaAlarm(area, T0 + 3 * Q, 2)])
    )
    await store.sink.drop_area_alarms(area, T0 + Q, T0 + 2 * Q)
    assert await store.sink.open_area_alarm(area, T0, T0 + 3 * Q) == AreaAlarm(area, T0 + Q, 5)
    assert await store.sink.open_area_alarm(area, T0 + Q + 1, T0 + 3 * Q) == AreaAlarm(area, T0 + 3 * Q, 2)


async def test_records_the_store_refuses_are_reported_back_and_the_rest_written(store: Store) -> None:
    store.poison()
    event = Event("e-1", GATEWAY, "power_down", T0 + Q, METER, {})
    result = await store.sink.write(Writes([transformed(1, 0, 4).columns], [event]))
    [rejected] = result.rejected
    assert rejected.reason and rejected.detail and rejected.record
    stored = await store.sink.day_intervals(T0, T0 + 86_400_000, DAY_QUANTITIES, gateways=[GATEWAY])
    assert len(stored) == 4  # the batch is written all the same


async def test_a_prepared_write_is_sent_once_and_a_send_of_it_when_done_posts_nothing(store: Store) -> None:
    """prepare encodes once; send marks every body done, keeping the rejected records, so sending
    the same prepared write again (what the retry layer does after a failure) adds nothing."""
    store.poison()
    event = Event("e-1", GATEWAY, "power_down", T0 + Q, METER, {})
    prepared = store.sink.prepare(Writes([transformed(1, 0, 4).columns], [event]))
    assert prepared.bodies >= 1 and prepared.done == 0 and prepared.lines > 4
    result = await store.sink.send(prepared)
    assert prepared.done == prepared.bodies and len(result.rejected) == 1
    assert result.written + len(result.rejected) == prepared.lines
    assert await store.sink.send(prepared) == result  # all done: the same result, nothing re-sent
    stored = await store.sink.day_intervals(T0, T0 + 86_400_000, DAY_QUANTITIES, gateways=[GATEWAY])
    assert len(stored) == 4  # written once


async def test_daily_report_is_written_read_back_and_rewritten(store: Store) -> None:
    start, end = day_window(DAY, OFFSET)

    def report(klass: str, days: int) -> DailyReport:
        area = AreaLoss("area 1,=", 1000, 800, 200, 2000, klass, 3, 3, days_not_qualified=days)
        return DailyReport(DAY, start, OFFSET, (area,), ())

    assert (await store.sink.write_report(report("HIGH", 3))).rejected == ()
    assert await store.sink.area_classes(start, end) == {"area 1,=": {start: "HIGH"}}
    await store.sink.write_report(report("QUALIFIED", 0))  # a rerun overwrites
    assert await store.sink.area_classes(start - 86_400_000, end) == {"area 1,=": {start: "QUALIFIED"}}


async def test_stored_intervals_of_some_meters_only(store: Store) -> None:
    """VEE-21's like-day read: the window's intervals of the meters named, no other meter's."""
    for seq, meter in enumerate((METER, "other meter", 'M 1,=x"'), 1):
        await store.sink.write(Writes([transformed(seq, 0, 3, meter).columns]))
    got = await store.sink.day_intervals(T0, T0 + 2 * Q, (ENERGY_FORWARD,), meters=[METER, "absent"])
    assert got.meters == (METER,)
    rows = sorted(zip(got.end_ts.tolist(), got.energy.tolist(), got.flags.tolist(), strict=True))
    assert rows == [(T0 + Q, 25, 0), (T0 + 2 * Q, 25, 0)]
    assert len(await store.sink.day_intervals(T0, T0 + 3 * Q, (ENERGY_FORWARD,), meters=[])) == 0
    everyone = await store.sink.day_intervals(T0, T0 + 3 * Q, (ENERGY_FORWARD,))
    assert sorted(everyone.meters) == sorted((METER, "other meter", 'M 1,=x"'))


async def test_day_intervals_read_back_and_their_flags_are_rewritten_in_place(store: Store) -> None:
    start, end = day_window(DAY, OFFSET)
    # intervals ending T0+Q .. T0+4Q, and the one ending at the day's end (T0+96Q, day D) and after it
    for out in (transformed(1, 0, 4), transformed(2, 95, 97)):
        await store.sink.write(Writes([out.columns]))
    got = await store.sink.day_intervals(start, end, (ENERGY_FORWARD, ENERGY_REVERSE))
    assert (got.meters, got.gateways) == ((METER,), (GATEWAY,))
    rows = sorted(zip(got.end_ts.tolist(), got.energy.tolist(), got.flags.tolist(), strict=True))
    assert rows == [(T0 + k * Q, 25, 0) for k in (1, 2, 3, 4, 96)]
    assert set(got.quantity.tolist()) == {ENERGY_FORWARD}
    assert set(got.meter.tolist()) == set(got.gateway.tolist()) == {0}

    third = np.flatnonzero(got.end_ts == T0 + 3 * Q)
    marked = got.take(third, got.flags | np.uint32(Flag.SPIKE_REL))
    for _ in range(2):  # a rewrite of the same flags is an idempotent overwrite
        assert (await store.sink.write_interval_flags(marked)).rejected == ()
    again = await store.sink.day_intervals(start, end, (ENERGY_FORWARD,))
    assert sorted(zip(again.end_ts.tolist(), again.energy.tolist(), again.flags.tolist(), strict=True)) == [
        (T0 + k * Q, 25, Flag.SPIKE_REL if k == 3 else 0) for k in (1, 2, 3, 4, 96)
    ]
    cleared = again.take(np.flatnonzero(again.end_ts == T0 + 3 * Q), np.zeros(len(again), np.uint32))
    await store.sink.write_interval_flags(cleared)
    assert not (await store.sink.day_intervals(start, end, (ENERGY_FORWARD,))).flags.any()
    report = await store.sink.completeness(METER, DAY, utc_offset_ms=OFFSET, interval_ms=Q)
    assert report.actual == 5  # the energies are untouched
