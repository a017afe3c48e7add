"""VEE-06 in the daily job (:func:`ingest.reports.daily.flag_relative_spikes`) against an
in-memory store of intervals: only the intervals whose SPIKE_REL bit changes are rewritten, so a
rerun writes nothing. The real store is exercised in tests/integration/test_report.py."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from ingest.reports.daily import day_window, flag_relative_spikes
from ingest.rules import stages
from ingest.sinks.base import RetryPolicy, StoredIntervals, WriteResult
from protocols.errors import SinkError
from protocols.flags import Flag
from protocols.quantities import ENERGY_FORWARD
from tests.unit.ingest.test_report_collection import DAY

I = 900_000  # noqa: E741 (the interval)
START, END = day_window(DAY, stages.SHANGHAI_MS)


class Intervals:
    """The stored intervals of meter "M" under gateway "gw" (end ts -> energy, flags)."""

    def __init__(self, energies: Sequence[int]) -> None:
        self.rows = {START + (j + 1) * I: [e, 0] for j, e in enumerate(energies)}
        self.writes: list[StoredIntervals] = []

    async def day_intervals(
        self, start_ms: int, end_ms: int, quantities: Sequence[int], meters: Sequence[str] | None = None
    ) -> StoredIntervals:
        ts = [t for t in sorted(self.rows) if start_ms < t <= end_ms]
        n = len(ts)
        return StoredIntervals(
            ("M",), ("gw",), np.zeros(n, np.uint32), np.zeros(n, np.uint32),
            np.full(n, ENERGY_FORWARD, np.uint16), np.array(ts, np.int64),
            np.array([self.rows[t][0] for t in ts], np.int64), np.array([self.rows[t][1] for t in ts], np.uint32),
        )  # fmt: skip

    async def write_interval_flags(self, rows: StoredIntervals) -> WriteResult:
        self.writes.append(rows)
        for t, f in zip(rows.end_ts.tolist(), rows.flags.tolist(), strict=True):
            self.rows[t][1] = f
        return WriteResult(len(rows))

    def spiked(self) -> list[int]:
        return [t for t, (_, f) in sorted(self.rows.items()) if f & Flag.SPIKE_REL]


async def run(store: Intervals) -> int:
    """The job on the fake (it implements the two Sink methods the function uses)."""
    return await flag_relative_spikes(
        store, START, END, stages.ValidationParams(), utc_offset_ms=stages.SHANGHAI_MS
    )


async def test_the_day_is_ranked_once_and_a_rerun_writes_nothing() -> None:
    store = Intervals([40, 50, 210, 40] + [0] * 92)
    assert await run(store) == 1
    [written] = store.writes
    assert written.end_ts.tolist() == [START + 3 * I] and written.flags.tolist() == [Flag.SPIKE_REL]
    assert await run(store) == 1
    assert len(store.writes) == 1  # nothing changed: nothing rewritten


async def test_a_late_higher_interval_moves_the_flag() -> None:
    store = Intervals([40, 50, 210, 40])
    await run(store)
    store.rows[START + 5 * I] = [300, 0]
    assert await run(store) == 1
    assert store.spiked() == [START + 5 * I]
    assert sorted(store.writes[-1].end_ts.tolist()) == [START + 3 * I, START + 5 * I]


async def test_a_day_without_a_spike_writes_nothing() -> None:
    store = Intervals([100, 95, 90])
    assert await run(store) == 0
    assert store.writes == []


async def test_a_short_outage_of_the_flags_write_is_retried_within_the_bound() -> None:
    """The daily job's writes go through the bounded retry layer: two failures then success
    land the flags with three attempts; a store still down after them fails the job."""

    class Flaky(Intervals):
        def __init__(self, energies: Sequence[int], failures: int) -> None:
            super().__init__(energies)
            self.failures = failures

        async def write_interval_flags(self, rows: StoredIntervals) -> WriteResult:
            if self.failures:
                self.failures -= 1
                raise SinkError("influxd unreachable", retryable=True)
            return await super().write_interval_flags(rows)

    retry = RetryPolicy(0.001, 0.001, attempts=3)
    params = stages.ValidationParams()
    store = Flaky([40, 50, 210, 40], failures=2)
    assert (
        await flag_relative_spikes(store, START, END, params, utc_offset_ms=stages.SHANGHAI_MS, retry=retry)
        == 1
    )
    assert store.spiked() == [START + 3 * I]
    down = Flaky([40, 50, 210, 40], failures=3)
    with pytest.raises(SinkError, match="unreachable"):
        await flag_relative_spikes(down, START, END, params, utc_offset_ms=stages.SHANGHAI_MS, retry=retry)
