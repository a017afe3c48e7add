"""Run rules across batches through the real worker (real mosquitto and influxd): an edge that
sends one interval per batch gets VEE-08 STOPPED in InfluxDB, and a redelivered batch does not
advance the run twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ingest.pipeline.state import RunStateStore
from ingest.rules import kernels as k
from protocols.flags import Flag
from protocols.payload import BatchBuilder, ReadingBatch
from tests.integration.test_pipeline import (
    T0,
    Publisher,
    Q,
    _uid,
    ingest_toml,
    run_worker,  # noqa: F401 (fixture)
    topics_for,
    wait_for,
    written,
)

pytestmark = pytest.mark.integration
POWER = 12_000  # 1.2 kW: current flows while the register stands still (ZERO_WITH_CURRENT)


def one_interval(gw: str, j: int, register: int = 500) -> ReadingBatch:
    """Grid point j of meter M1 alone in batch seq j, the previous register at point j - 1."""
    b = BatchBuilder()
    b.set_prev("M1", 1, register, T0 + (j - 1) * Q)
    b.add("M1", T0 + j * Q, 1, register)
    b.add("M1", T0 + j * Q, 40, POWER)
    return b.build(gw, j, sent_ms=T0 + j * Q)


async def test_one_interval_batches_are_stopped_on_the_fourth_and_a_redelivery_counts_once(
    mosquitto: Any,
    influx_db: Any,
    tmp_path: Path,
    run_worker: Any,  # noqa: F811
) -> None:
    influxd, db = influx_db
    gw = f"gw-run-{_uid()}"
    w = await run_worker(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw])))
    pub = Publisher(mosquitto)
    try:
        # Each batch waits for the one before (the edge's normal pace): its carry is saved.
        for j in (1, 2, 3):
            pub.batch(one_interval(gw, j))
            await wait_for(lambda j=j: written(w) == j)
        pub.batch(one_interval(gw, 3))  # a redelivery: dedup'd, the run stays at 3
        await wait_for(lambda: w.metrics.batches.labels("duplicate")._value.get() == 1)
        w._res.state.flush()  # written at most every write_every_s; now, to look at the file
        with RunStateStore(tmp_path / "runstate.sqlite") as state:  # beside the dedup database
            row = state.carry(gw, ["M1"]).state[0]
        assert (row[k.C_STOP_LEN], row[k.C_STOP_END]) == (3, T0 + 3 * Q)
        pub.batch(one_interval(gw, 4))
        await wait_for(lambda: written(w) == 4)
        rows = influxd.query(f"SELECT * FROM intervals WHERE meter = 'M1' AND gateway = '{gw}'", db=db)
        flags = {r["time"]: r["energy_fwd_active_total_flags"] or 0 for r in rows}
        assert sorted(flags) == [T0 + j * Q for j in (1, 2, 3, 4)]
        assert [bool(flags[T0 + j * Q] & Flag.STOPPED) for j in (1, 2, 3, 4)] == [False, False, False, True]
        assert all(flags[T0 + j * Q] & Flag.ZERO_WITH_CURRENT for j in (1, 2, 3, 4))
        readings = influxd.query(
            f"SELECT * FROM meter_reading WHERE meter = 'M1' AND gateway = '{gw}'", db=db
        )
        last = next(r for r in readings if r["time"] == T0 + 4 * Q)
        assert last["energy_fwd_active_total_flags"] & Flag.STOPPED
    finally:
        pub.close()


async def test_the_run_state_reaches_the_file_within_a_second_without_more_batches(
    mosquitto: Any,
    influx_db: Any,
    tmp_path: Path,
    run_worker: Any,  # noqa: F811
) -> None:
    """A save only writes the file when a second has passed since the last write; the worker's
    timer writes what the last batches left in memory, so a crash after a quiet spell loses no run."""
    influxd, db = influx_db
    gw = f"gw-run-{_uid()}"
    w = await run_worker(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw])))
    pub = Publisher(mosquitto)

    def stored_run() -> int:
        with RunStateStore(tmp_path / "runstate.sqlite") as state:
            got = state.carry(gw, ["M1"])
        return int(got.state[0, k.C_STOP_LEN]) if len(got) else 0

    try:
        for j in (1, 2, 3):  # back to back: the later saves find no write due
            pub.batch(one_interval(gw, j))
            await wait_for(lambda j=j: written(w) == j)
        await wait_for(lambda: stored_run() == 3, 5)  # written by the timer, no flush asked
    finally:
        pub.close()
