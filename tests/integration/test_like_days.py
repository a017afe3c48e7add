"""VEE-21 through the real worker (real mosquitto and influxd): three like days stored, then a
batch closing a long gap lands with the like days' shape and EST_HIST, the hourly totals
rolled up from it following that shape; a meter of the same batch without stored like days stays EST_FLAT."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

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
WEEK = 7 * 86_400_000
GAP = 12  # intervals T0 .. T0 + 12 Q: 11 missing readings, beyond max_gap_intervals (8)
SHAPE = [20] * 6 + [10] * 6  # a like day's intervals over the gap's slots: 1.80 kWh


def like_day(gw: str, weeks_back: int) -> ReadingBatch:
    """M1's actual readings over the gap's slots ``weeks_back`` weeks earlier, shaped SHAPE."""
    t0, register = T0 - weeks_back * WEEK, 1000
    b = BatchBuilder()
    b.set_prev("M1", 1, register, t0)
    for j, e in enumerate(SHAPE, 1):
        register += e
        b.add("M1", t0 + j * Q, 1, register)
    return b.build(gw, weeks_back, sent_ms=t0 + GAP * Q)


def closing_gap(gw: str) -> ReadingBatch:
    """M1 and M2 silent from T0 to T0 + 12 Q, each with a register delta of 3.60 kWh."""
    b = BatchBuilder()
    for meter in ("M1", "M2"):
        b.set_prev(meter, 1, 5000, T0)
        b.add(meter, T0 + GAP * Q, 1, 5360)
    return b.build(gw, 10, sent_ms=T0 + GAP * Q)


async def test_a_long_gap_takes_its_like_days_shape_and_without_like_days_stays_flat(
    mosquitto: Any,
    influx_db: Any,
    tmp_path: Path,
    run_worker: Any,  # noqa: F811
) -> None:
    influxd, db = influx_db
    gw = f"gw-like-{_uid()}"
    w = await run_worker(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw])))
    pub = Publisher(mosquitto)
    try:
        for weeks_back in (1, 2, 3):
            pub.batch(like_day(gw, weeks_back))
        await wait_for(lambda: written(w) == 3)
        pub.batch(closing_gap(gw))
        await wait_for(lambda: written(w) == 4)

        def gap_rows(meter: str) -> list[tuple[int, int]]:
            rows = influxd.query(
                f"SELECT * FROM intervals WHERE meter = '{meter}' AND gateway = '{gw}' AND time > {T0}ms",
                db=db,
            )
            return [
                (round(r["energy_fwd_active_total"] * 100), r["energy_fwd_active_total_flags"]) for r in rows
            ]

        m1, m2 = gap_rows("M1"), gap_rows("M2")
        # 3.60 kWh over the like days' 1.80 kWh: twice the shape, exactly.
        assert [e for e, _ in m1] == [40] * 6 + [20] * 6
        assert all(f & Flag.ESTIMATED and f & Flag.EST_HIST and not f & Flag.EST_FLAT for _, f in m1)
        assert [e for e, _ in m2] == [30] * 12
        assert all(f & Flag.EST_FLAT and not f & Flag.EST_HIST for _, f in m2)

        await wait_for(lambda: w._res.dedup.pending_periods() == 0)  # rolled up
        hourly: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for r in influxd.query(f"SELECT * FROM hourly WHERE gateway = '{gw}' AND time >= {T0}ms", db=db):
            hourly[r["meter"]][r["hour"]] += r["total"]
        assert sorted(hourly["M1"].values(), reverse=True) == [160, 120, 80]  # the hours follow
        assert list(hourly["M2"].values()) == [120, 120, 120]
    finally:
        pub.close()
