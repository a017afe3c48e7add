"""One TOU model: for any calendar, the period the daily TOU totals put an interval in
(``ingest.rules.stages.tou_split``) is the period fee control charges it at, and the local day the
totals cut is inside the tier cycle charging counts it in (TOU-03/04/05, issue 13).

Generated: UTC offsets (any minute within ±14 h), seasons over arbitrary month sets, day profiles
with boundaries at odd minutes, weekend and holiday profiles, holidays, make-up workdays, per-day
overrides, calendar versions with their own seasons from any minute on, price versions with
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

from .feectl.conftest import JIANGSU_TOML, QUARTER, ms

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
def season_tables(draw: st.DrawFn, nprof: int) -> dict[str, Any]:
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
    return seasons


@st.composite
def tariff_docs(draw: st.DrawFn) -> dict[str, Any]:
    nprof = draw(st.integers(1, 3))
    profs = {f"p{i}": {"segments": draw(profiles())} for i in range(nprof)}
    offset = draw(st.integers(-840, 840))
    dated = draw(st.lists(st.dates(dt.date(2023, 12, 30), dt.date(2026, 3, 15)), max_size=30, unique=True))
    kinds = [draw(st.sampled_from(["holiday", "workday", "override"])) for _ in dated]
    calendar_versions = []
    start = dt.datetime(2023, 6, 1)
    for _ in range(draw(st.integers(0, 2))):
        start += dt.timedelta(minutes=draw(st.integers(1, 400 * 1440)))
        calendar_versions.append({"effective_from": start, "seasons": draw(season_tables(nprof))})
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
        "holidays": [d for d, kind in zip(dated, kinds, strict=True) if kind == "holiday"],
        "makeup_workdays": [
            d for d, kind in zip(dated, kinds, strict=True) if kind == "workday" and d.weekday() >= 5
        ],
        "overrides": [
            {"date": d, "profile": f"p{draw(st.integers(0, nprof - 1))}"}
            for d, kind in zip(dated, kinds, strict=True)
            if kind == "override"
        ],
        "seasons": draw(season_tables(nprof)),
        "calendar_versions": calendar_versions,
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


def test_weather_triggered_sharp_day_is_charged_sharp_and_totalled_sharp() -> None:
    """TOU-03 Jiangsu: the override makes 10:00-10:15 on 2024-07-20 sharp. Fee control charges it at
    the sharp price and the daily TOU totals count it as sharp; the next day (no override) both
    say peak."""
    tariff = Tariff.loads(JIANGSU_TOML)
    starts = [ms("2024-07-20 10:00"), ms("2024-07-21 10:00")]
    ends = np.array([s + QUARTER for s in starts], dtype=np.int64)
    totals = tou_split(
        Intervals(
            meter=np.array([1, 1], dtype=np.uint32),
            quantity=np.full(2, ENERGY_FORWARD, dtype=np.uint16),
            end_ts=ends,
            energy=np.array([100, 100], dtype=np.int64),
            flags=np.zeros(2, dtype=np.uint16),
        ),
        tariff.calendar,
    )
    assert totals.calendar.tolist() == [[100, 0, 0, 0], [0, 100, 0, 0]]  # sharp, peak, flat, valley
    ctl = FeeController(SqliteLedgerStore(":memory:"), FeeControlConfig(), {"js": tariff})
    ctl.open_account(Account("A", (MeterRef("M1", "G1"),), "js"), starts[0])
    charged = []
    for start, end in zip(starts, ends, strict=True):
        ctl.charge_interval("M1", start, int(end), 100, False, int(end))
        row = ctl.store.interval("M1", start)
        assert row is not None
        charged.append((row.period, row.exact_micro))
    assert charged == [("sharp", 100 * 8000), ("peak", 100 * 7000)]  # sharp = peak + 0.1000 yuan/kWh
