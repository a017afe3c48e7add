"""One TOU model: for any calendar, the period the daily TOU totals put an interval in
(``ingest.rules.stages.tou_split``) is the period fee control charges it at, and the local day the
totals cut is inside the tier cycle charging counts it in (TOU-03/04/05, issue 13).

Generated: UTC offsets (any minute within ±14 h), seasons over arbitrary month sets, day profiles
with boundaries at odd minutes, weekend and holiday profiles, holidays, price versions with
monthly or annual tier cycles, and end-labelled intervals of several lengths at any millisecond.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.feectl.config import FeeControlConfig
from ingest.feectl.engine import FeeController
from ingest.feectl.model import Account, MeterRef
from ingest.feectl.sqlite_store import SqliteLedgerStore
from ingest.model.tariff import PERIODS, Tariff
from ingest.rules.stages import Intervals, tou_split
from protocols.quantities import ENERGY_FORWARD

T0 = int(dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp() * 1000)
SPAN = 800 * 86_400_000  # intervals over two years and a bit: cycles, leap day, every month
NAMES = list(PERIODS)


@st.composite
def profiles(draw: st.DrawFn) -> list[list[str]]:
    edges = sorted(draw(st.sets(st.integers(1, 1439), max_size=6)))
    bounds = [0, *edges, 1440]
    return [
        [f"{a // 60:02d}:{a % 60:02d}", f"{b // 60:02d}:{b % 60:02d}", draw(st.sampled_from(NAMES))]
        for a, b in itertools.pairwise(bounds)
    ]


@st.composite
def tariff_docs(draw: st.DrawFn) -> dict[str, Any]:
    nprof = draw(st.integers(1, 3))
    profs = {f"p{i}": {"segments": draw(profiles())} for i in range(nprof)}
    season_of = draw(st.lists(st.integers(0, 2), min_size=12, max_size=12))
    seasons: dict[str, Any] = {}
    for month, s in enumerate(season_of, start=1):
        season = seasons.setdefault(
            f"s{s}",
            {
                "months": [],
                **{k: f"p{draw(st.integers(0, nprof - 1))}" for k in ("workday", "weekend", "holiday")},
            },
        )
        season["months"].append(month)
    offset = draw(st.integers(-840, 840))
    holidays = draw(st.lists(st.dates(dt.date(2023, 12, 30), dt.date(2026, 3, 15)), max_size=20))
    versions = []
    start = dt.datetime(2023, 1, 1)
    for i in range(draw(st.integers(1, 3))):
        start += dt.timedelta(minutes=draw(st.integers(1, 400 * 1440)) if i else 0)
        version: dict[str, Any] = {
            "version": f"v{i}",
            "effective_from": start,
            "prices": {n: draw(st.integers(0, 20_000)) for n in NAMES},
        }
        if draw(st.booleans()):
            t1 = draw(st.integers(1, 5_000))
            version["tiers"] = {
                "cycle": draw(st.sampled_from(["monthly", "annual"])),
                "thresholds_centi_kwh": [t1, t1 + draw(st.integers(1, 5_000))],
                "surcharges": [0, 500, 3000],
                "start_month": draw(st.integers(1, 12)),
                "start_day": draw(st.integers(1, 28)),
            }
        versions.append(version)
    return {
        "id": "gen",
        "utc_offset_minutes": offset,
        "holidays": holidays,
        "seasons": seasons,
        "profiles": profs,
        "versions": versions,
    }


@settings(max_examples=150, deadline=None)
@given(
    doc=tariff_docs(),
    interval_ms=st.sampled_from([60_000, 300_000, 900_000, 1_800_000, 3_600_000]),
    ends=st.lists(st.integers(T0, T0 + SPAN), min_size=1, max_size=40, unique=True),
)
def test_daily_totals_and_charging_agree_on_period_and_local_time(
    doc: dict[str, Any], interval_ms: int, ends: list[int]
) -> None:
    tariff = Tariff.from_dict(doc)
    n = len(ends)
    end_ts = np.array(ends, dtype=np.int64)
    totals = tou_split(
        Intervals(
            meter=np.arange(n, dtype=np.uint32),
            quantity=np.full(n, ENERGY_FORWARD, dtype=np.uint16),
            end_ts=end_ts,
            energy=np.full(n, 7, dtype=np.int64),
            flags=np.zeros(n, dtype=np.uint16),
        ),
        tariff.calendar,
        interval_ms=interval_ms,
    )
    meters = tuple(f"M{i}" for i in range(n))
    ctl = FeeController(SqliteLedgerStore(":memory:"), FeeControlConfig(), {"gen": tariff})
    ctl.open_account(Account("A", tuple(MeterRef(m, "G1") for m in meters), "gen"), T0)
    for g in range(len(totals.meter)):
        i = int(totals.meter[g])
        start = ends[i] - interval_ms
        (column,) = np.flatnonzero(totals.calendar[g])  # the totals' one period of this interval
        ctl.charge_interval(meters[i], start, ends[i], 7, False, ends[i])
        row = ctl.store.interval(meters[i], start)
        assert row is not None
        assert row.period == NAMES[column], (meters[i], start)
        bounds = tariff.cycle_bounds(start)
        if bounds is not None:  # the totals' local day of the interval lies in charging's tier cycle
            assert bounds[0] <= int(totals.day_start_ts[g]) < bounds[1]
