"""The VictoriaMetrics sink against a real victoria-metrics (Debian package) and influxd.

The pipeline's write and read path (``transform`` of each batch, the sink's write, the rollup's
read of a closed day's stored intervals, the daily and hourly rows computed from them and
written, the report's day sums) is run on both stores with the same batches, and the stored
intervals, the hourly and daily rows and the day sums must agree to the unit. Then the failure
behaviour VictoriaMetrics adds: a server that is down, and a record holding two values.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from ingest.config import SAMPLE, parse_config
from ingest.pipeline.rollup import DAY_QUANTITIES, rollups
from ingest.pipeline.transform import Settings, transform
from ingest.reports.daily import day_window
from ingest.sinks.base import Rollup, StoredIntervals, Writes
from ingest.sinks.influx.http import SinkConfig
from ingest.sinks.influx.sink import InfluxSink
from ingest.sinks.victoria.config import VictoriaConfig
from ingest.sinks.victoria.sink import VictoriaSink
from protocols.errors import SinkError
from protocols.payload import BatchBuilder
from protocols.quantities import ENERGY_FORWARD, ENERGY_REVERSE, by_name

pytestmark = pytest.mark.integration

Q = 900_000
T0 = 1_710_000_000_000  # 2024-03-10 00:00 at UTC+8: years before the server's clock
DAY = dt.date(2024, 3, 10)
GATEWAY = "gw vm,1"
METERS = ("M-1", "M 2,=x", "M3")
TARIFF = [by_name(f"energy_fwd_active_t{t}").code for t in range(1, 5)]


def settings() -> Settings:
    return Settings.from_config(parse_config(SAMPLE))


def batches() -> list[Any]:
    """A day and a bit of three meters in 8 batches: forward total with its tariff registers
    (meter 0), reverse energy (meter 1), a varying load, a 3-interval gap (estimated), one
    batch delivered twice."""
    rng = np.random.default_rng(16)
    load = rng.integers(0, 60, size=(len(METERS), 100))
    reg = np.cumsum(load, axis=1) + 100_000
    out = []
    edges = [0, 12, 30, 44, 60, 75, 90, 97]
    for seq, (lo, hi) in enumerate(itertools.pairwise(edges), 1):
        b = BatchBuilder()
        for m, meter in enumerate(METERS):
            b.set_prev(meter, ENERGY_FORWARD, int(reg[m, lo]), T0 + lo * Q)
            for k in range(lo + 1, hi + 1):
                if m == 2 and 50 <= k <= 52:  # a gap: interpolated intervals
                    continue
                b.add(meter, T0 + k * Q, ENERGY_FORWARD, int(reg[m, k]))
                if m == 0:
                    b.add(meter, T0 + k * Q, TARIFF[(k // 24) % 4], int(reg[m, k]) // 4)
                if m == 1:
                    b.add(meter, T0 + k * Q, ENERGY_REVERSE, 5_000 + 3 * k)
        out.append(transform(b.build(GATEWAY, seq, sent_ms=T0 + hi * Q), settings()))
    return [*out, out[3]]  # a redelivery


def rows_of(s: StoredIntervals) -> list[tuple[str, str, int, int, int, int]]:
    return sorted(
        (s.meters[m], s.gateways[g], q, t, e, f)
        for m, g, q, t, e, f in zip(
            s.meter.tolist(), s.gateway.tolist(), s.quantity.tolist(), s.end_ts.tolist(),
            s.energy.tolist(), s.flags.tolist(), strict=True,
        )
    )  # fmt: skip


def totals_of(made: list[Rollup]) -> dict[tuple[str, str, int, bytes], int]:
    out = {}
    for r in made:
        p = r.rows
        for i in range(p.ts.shape[0]):
            for j, name in enumerate(p.fields):
                out[(r.kind, r.meter_ids[int(p.meter[i])], int(p.ts[i]), name)] = int(p.values[i, j])
    return out


async def run_pipeline(sink: Any, flush: Any) -> tuple[list[tuple[Any, ...]], dict[Any, int], list[Any]]:
    for out in batches():
        assert (await sink.write(Writes([out.columns]))).rejected == ()
    flush()
    start, end = day_window(DAY, 8 * 3_600_000)
    stored = await sink.day_intervals(start, end, DAY_QUANTITIES, gateways=[GATEWAY])
    made = rollups(stored, GATEWAY, {start}, settings())
    assert (await sink.write(Writes(rollups=made))).rejected == ()
    sums = await sink.day_sums(
        start, end, ("total", "valley", "flat", "peak", "sharp", "intervals", "rev_total")
    )
    return (
        rows_of(stored),
        totals_of(made),
        sorted((s.meter, s.gateway, sorted(s.sums.items())) for s in sums),
    )


@pytest.fixture
async def both(influx_db: Any, victoria_db: Any) -> AsyncIterator[tuple[InfluxSink, VictoriaSink, Any]]:
    influxd, db = influx_db
    vm, label = victoria_db
    records = SinkConfig(url=influxd.url, api="v1", database=f"{db}")
    influxd.create_database(f"{db}_records")
    async with (
        InfluxSink(records) as influx,
        VictoriaSink(
            VictoriaConfig(enabled=True, url=vm.url, database=label),
            InfluxSink(SinkConfig(url=influxd.url, api="v1", database=f"{db}_records")),
        ) as victoria,
    ):
        yield influx, victoria, vm
    influxd.drop_database(f"{db}_records")


async def test_the_pipeline_reads_the_same_intervals_and_totals_from_both_stores(both: Any) -> None:
    influx, victoria, vm = both
    on_influx = await run_pipeline(influx, lambda: None)
    on_vm = await run_pipeline(victoria, vm.force_flush)
    intervals, totals, sums = on_influx
    assert len(intervals) > 3 * 96 and {r[2] for r in intervals} >= {ENERGY_FORWARD, ENERGY_REVERSE, *TARIFF}
    assert any(r[5] for r in intervals)  # estimated (flagged) intervals are part of the comparison
    assert {k[0] for k in totals} == {"day", "hour"} and len(sums) == len(METERS)
    assert on_vm == on_influx
    # the readings and intervals are VictoriaMetrics' (series <measurement>_<field>, tags as labels)
    [series] = vm.export(
        f'{{__name__="intervals_energy_fwd_active_total",meter="M 2,=x",db="{victoria.config.database}"}}'
    )
    assert series["metric"]["gateway"] == GATEWAY and len(set(series["timestamps"])) == 97


async def test_a_stopped_server_is_a_retryable_error_for_writes_and_reads(both: Any) -> None:
    _, victoria, vm = both
    out = batches()[0]
    vm.stop()
    try:
        with pytest.raises(SinkError) as write_error:
            await victoria.write(Writes([out.columns]))
        assert write_error.value.retryable
        with pytest.raises(SinkError) as read_error:
            await victoria.day_intervals(T0, T0 + 86_400_000, DAY_QUANTITIES)
        assert read_error.value.retryable
    finally:
        vm.start()
    prepared = victoria.prepare(Writes([out.columns]))
    assert (await victoria.send(prepared)).rejected == ()  # back: the same write goes through


async def test_a_record_holding_two_values_is_refused_not_answered(both: Any) -> None:
    _, victoria, vm = both
    await victoria.write(Writes([batches()[0].columns]))
    line = b"intervals,meter=M-1,gateway=gw\\ vm\\,1 energy_fwd_active_total=99.99 %d\n" % (T0 + 2 * Q)
    assert (await victoria.writer.write(line)).written == 1  # another value for a stored interval
    vm.force_flush()
    with pytest.raises(SinkError) as error:
        await victoria.day_intervals(T0, T0 + 4 * Q, (ENERGY_FORWARD,), meters=["M-1"])
    assert not error.value.retryable and "two values" in str(error.value)
    clean = await victoria.day_intervals(T0, T0 + 4 * Q, (ENERGY_FORWARD,), meters=["M3"])
    assert len(clean) == 4  # other series read as before


async def test_readings_days_ahead_come_back_rejected_not_dropped(both: Any) -> None:
    """VictoriaMetrics answers 204 to samples over two days ahead and drops them: the sink
    rejects them (the worker dead-letters them) and writes the rest."""
    _, victoria, vm = both
    # Two readings in the past (a reading past the wall clock is FUTURE_TIME and makes no
    # interval, whatever the quarter hour the test runs in) and one days ahead.
    now = int(time.time() * 1000) // Q * Q - 3 * Q
    b = BatchBuilder()
    b.set_prev("M-1", ENERGY_FORWARD, 1000, now)
    for k, ts in enumerate((now + Q, now + 2 * Q, now + 3 * 86_400_000), 1):  # a clock days ahead
        b.add("M-1", ts, ENERGY_FORWARD, 1000 + 10 * k)
    out = transform(b.build(GATEWAY, 1, sent_ms=now + 2 * Q), settings())
    result = await victoria.write(Writes([out.columns]))
    assert result.rejected and {r.reason for r in result.rejected} == {"beyond victoriametrics time bound"}
    assert all(r.record.endswith(b" %d" % (now + 3 * 86_400_000)) for r in result.rejected)
    vm.force_flush()
    stored = await victoria.day_intervals(now, now + 4 * 86_400_000, (ENERGY_FORWARD,))
    iv = out.columns.intervals
    kept = sorted(iv.end_ts[(iv.quantity == ENERGY_FORWARD) & (iv.end_ts < now + 86_400_000)].tolist())
    assert len(kept) == 2 and sorted(stored.end_ts.tolist()) == kept
    assert len(result.rejected) == len(iv.end_ts) - len(kept) + 1  # those intervals and the reading
