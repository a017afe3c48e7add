"""Worked examples of the business rules (docs/rules.md), through the public stage wrappers."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest

from ingest.model.registry import MeterParams
from ingest.model.tariff import TariffCalendar
from ingest.rules import stages
from protocols.flags import Flag

I = 900_000  # noqa: E741 (the interval, as in the rules)
T0 = 1_710_000_000_000 // I * I  # on the grid


def meters(un=2200, imax=60_000, phases=1, mult=1, n=1, area=0, master=False) -> MeterParams:
    col = lambda v, d=np.int64: np.full(n, v, dtype=d)  # noqa: E731
    return MeterParams(
        col(True, np.bool_),
        col(un),
        col(imax),
        col(5_000),
        col(phases),
        col(mult),
        col(area, np.int32),
        col(master, np.bool_),
    )


def batch(rows, prev=()):
    cols = list(zip(*rows, strict=True))
    r = stages.Readings(
        np.array(cols[0], np.uint32),
        np.array(cols[1], np.int64),
        np.array(cols[2], np.uint16),
        np.array(cols[3], np.int64),
        np.array(cols[4] if len(cols) > 4 else [0] * len(rows), np.uint32),
    )
    pc = list(zip(*prev, strict=True)) if prev else [[]] * 4
    p = stages.PreviousRegisters(
        np.array(pc[0], np.uint32),
        np.array(pc[1], np.uint16),
        np.array(pc[2], np.int64),
        np.array(pc[3], np.int64),
    )
    return r, p


def check(rows, prev=(), m=None, receive=T0 + 100 * I):
    r, p = batch(rows, prev)
    m = m or meters()
    c = stages.validate_batch(r, p, m, receive)
    return r, c, m


def test_vee02_rollover_is_not_negative_consumption() -> None:
    _, c, _ = check([(0, T0 + I, 1, 30)], prev=[(0, 1, 99_999_950, T0)])
    assert c.flags[0] == Flag.ROLLOVER and c.delta[0] == 80  # (1 000 000.00 − 999 999.50) + 0.30


def test_vee02_rollover_point_is_per_meter() -> None:
    # A 5-digit meter (XXXXX.XX) wraps at 100 000.00 kWh: 99 999.50 -> 0.30 is 0.80 kWh, not a
    # replacement; the same reading on a meter with the table's 6 digits is one.
    five = MeterParams(*dataclasses.astuple(meters())[:8], energy_regmax=np.array([9_999_999]))
    _, c, _ = check([(0, T0 + I, 1, 30)], prev=[(0, 1, 9_999_950, T0)], m=five)
    assert c.flags[0] == Flag.ROLLOVER and c.delta[0] == 80
    _, c, _ = check([(0, T0 + I, 1, 30)], prev=[(0, 1, 9_999_950, T0)])
    assert c.flags[0] == Flag.METER_REPLACED and c.delta[0] == 0


def test_vee02_counter_example_and_vee03_meter_replaced() -> None:
    _, c, _ = check([(0, T0 + I, 1, 30)], prev=[(0, 1, 500_000, T0)])
    assert c.flags[0] == Flag.METER_REPLACED and c.delta[0] == 0


def test_vee04_backwards_and_jitter() -> None:
    _, c, _ = check([(0, T0 + I, 1, 149_990), (0, T0 + 2 * I, 1, 149_989)], prev=[(0, 1, 150_000, T0)])
    assert c.flags[0] == Flag.WENT_BACKWARDS  # 1500.00 -> 1499.90
    _, c, _ = check([(0, T0 + I, 1, 149_999), (0, T0 + 2 * I, 1, 150_005)], prev=[(0, 1, 150_000, T0)])
    assert c.flags.tolist() == [0, 0] and c.delta.tolist() == [0, 5]  # jitter: E = 0, anchor stays


@pytest.mark.parametrize(("delta", "spike"), [(340, False), (363, False), (364, True), (410, True)])
def test_vee05_physical_maximum(delta, spike) -> None:
    _, c, _ = check([(0, T0 + I, 1, 10_000 + delta)], prev=[(0, 1, 10_000, T0)])
    assert bool(c.flags[0] & Flag.SPIKE) is spike  # E_max = 220 x 60 x 1 x 0.25 h x 1.1 = 3.63 kWh


def test_vee05_three_phase_maximum() -> None:
    m = meters(imax=100_000, phases=3)
    _, c, _ = check([(0, T0 + I, 1, 1_815), (0, T0 + 2 * I, 1, 3_631)], prev=[(0, 1, 0, T0)], m=m)
    assert c.flags.tolist() == [0, Flag.SPIKE]  # 18.15 kWh


def test_vee08_zero_with_current() -> None:
    rows = [
        (0, T0 + I, 1, 200_000),
        (0, T0 + I, 33, 5_500),
        (0, T0 + 2 * I, 1, 200_000),
        (0, T0 + 2 * I, 33, 10),
    ]
    _, c, _ = check(rows, prev=[(0, 1, 200_000, T0)])
    assert c.flags.tolist() == [Flag.ZERO_WITH_CURRENT, 0, 0, 0]


def test_vee10_duplicates_and_out_of_order() -> None:
    rows = [(0, T0 + 2 * I, 1, 30), (0, T0 + I, 1, 25), (0, T0 + I, 1, 25), (0, T0 + I, 1, 27)]
    _, c, _ = check(rows, prev=[(0, 1, 0, T0)])
    assert c.flags.tolist() == [
        0,
        Flag.OUT_OF_ORDER,
        Flag.OUT_OF_ORDER | Flag.DUPLICATE,
        Flag.OUT_OF_ORDER | Flag.DUPLICATE,
    ]
    assert c.delta.tolist() == [5, 25, 0, 0]


def test_vee11_future_and_vee12_clock_skew() -> None:
    receive = T0 + 20 * 60_000
    rows = [
        (0, T0 + 30 * 60_000, 30, 2200),
        (0, T0 + 22 * 60_000, 30, 2200),
        (0, T0, 101, T0 + 8 * 3_600_000 + 20 * 60_000),
    ]
    _, c, _ = check(rows, receive=receive)
    skew = Flag.CLOCK_SKEW  # the 10:22 reading arrived after 10:30: also OUT_OF_ORDER
    assert c.flags.tolist() == [Flag.FUTURE_TIME | skew, Flag.OUT_OF_ORDER | skew, skew]


def test_time_lower_bound_flags_epoch_0_and_pre_1970_readings_which_close_no_interval() -> None:
    # An edge whose clock was never set stamps 1970-01-01 (or earlier): stored, flagged, not billed.
    rows = [(0, 0, 1, 100_025), (0, -I, 1, 100_050), (0, stages.MIN_TS_MS - 1, 1, 100_075)]
    rows.append((0, T0 + I, 1, 100_100))
    r, c, m = check(rows, prev=[(0, 1, 100_000, T0)])
    before = Flag.BEFORE_MIN_TIME | Flag.OUT_OF_ORDER
    assert c.flags.tolist() == [before, before, before, 0]
    iv = stages.aggregate_intervals(r, c, m)
    assert iv.end_ts.tolist() == [T0 + I] and iv.energy.tolist() == [100]  # only the believable reading
    # The bound is a parameter ([pipeline] min_ts): at the bound itself a reading is accepted.
    params = stages.ValidationParams(min_ts_ms=0)
    c0 = stages.validate_batch(*batch([(0, -1, 30, 2200), (0, 0, 30, 2200)]), meters(), T0, params)
    assert c0.flags.tolist() == [Flag.BEFORE_MIN_TIME, 0]


def test_previous_register_outside_the_bounds_anchors_nothing() -> None:
    # A prev stamped at epoch 0, or holding a value no register can hold, would give a delta that
    # the register never made (and 10 x 2^62 overflows int64 in the rollover rule).
    for prev in ((0, 1, 100_000, 0), (0, 1, 2**62, T0), (0, 1, -5, T0), (0, 1, 100_000, T0 + 10**9)):
        r, c, m = check([(0, T0 + I, 1, 100_025)], prev=[prev])
        assert c.anchor_ts.tolist() == [np.iinfo(np.int64).min] and c.flags.tolist() == [0], prev
        assert len(stages.aggregate_intervals(r, c, m).energy) == 0


@pytest.mark.parametrize("value", [2**62, 2**63 - 1, -(2**63), -(2**62)])
def test_extreme_values_are_out_of_range_and_in_no_interval_or_sum(value) -> None:
    rows = [
        (0, T0 + I, 1, value),  # energy: beyond the register
        (0, T0 + 2 * I, 1, 100_050),
        (0, T0 + I, 33, value),  # current, power, PF, voltage, clock: beyond VALUE_BOUND
        (0, T0 + I, 40, value),
        (0, T0 + I, 52, value),
        (0, T0 + I, 30, value),
        (0, T0 + I, 101, value),
    ]
    r, c, m = check(rows, prev=[(0, 1, 100_000, T0)], m=meters(phases=3))
    assert [bool(f & Flag.OUT_OF_RANGE) for f in c.flags.tolist()] == [
        True,
        False,
        True,
        True,
        True,
        True,
        True,
    ]
    assert all(not f & (Flag.PHASE_LOSS | Flag.CLOCK_SKEW | Flag.ZERO_WITH_CURRENT) for f in c.flags.tolist())
    iv = stages.aggregate_intervals(r, c, m)
    # the 2^62 register is skipped: the next reading closes two intervals from the prev (VEE-20)
    assert (
        iv.energy.tolist() == [25, 25] and stages.interval_totals(iv, bucket_ms=86_400_000).energy.sum() == 50
    )


def test_vee13_gap_before_and_vee16_voltage_range() -> None:
    rows = [(0, T0, 30, 2201), (0, T0 + I, 30, 4000), (0, T0 + 4 * I, 30, 2205)]
    _, c, _ = check(rows)
    assert c.flags.tolist() == [0, Flag.OUT_OF_RANGE, Flag.GAP_BEFORE]  # 400 V > 1.5 U_n is no anchor


def test_vee17_phase_break_and_power_down() -> None:
    m = meters(phases=3)
    rows = [
        (0, T0, 30, 2290),
        (0, T0, 31, 120),
        (0, T0, 32, 2310),
        (0, T0, 34, 0),
        (0, T0 + I, 30, 0),
        (0, T0 + I, 31, 0),
        (0, T0 + I, 32, 0),
    ]
    _, c, _ = check(rows, m=m)
    # All phases down: a power-down (VEE-23 OUTAGE), not phase loss.
    assert c.flags.tolist() == [0, Flag.PHASE_LOSS, 0, 0, Flag.OUTAGE, Flag.OUTAGE, Flag.OUTAGE]


def test_vee18_power_factor() -> None:
    rows = [(0, T0, 52, 1070), (0, T0 + I, 52, 250), (0, T0 + I, 40, 5_000), (0, T0 + 2 * I, 52, 250)]
    _, c, _ = check(rows)
    assert c.flags.tolist() == [Flag.PF_OUT_OF_BOUNDS, Flag.PF_OUT_OF_BOUNDS, 0, 0]  # no load: no low-PF


def test_vee20_linear_interpolation_with_remainder_and_vee21_long_gap() -> None:
    r, c, m = check([(0, T0 + 4 * I, 1, 100_121)], prev=[(0, 1, 100_000, T0)])
    iv = stages.aggregate_intervals(r, c, m)
    assert iv.energy.tolist() == [30, 30, 30, 31] and iv.end_ts.tolist() == [T0 + j * I for j in (1, 2, 3, 4)]
    assert all(f & Flag.ESTIMATED for f in iv.flags.tolist())
    r, c, m = check([(0, T0 + 17 * I, 1, 100_121)], prev=[(0, 1, 100_000, T0)])
    iv = stages.aggregate_intervals(r, c, m)  # 16 missing > 8: VEE-21, spread flat (no like days)
    assert iv.energy.tolist() == [7] * 16 + [9] and all(f & Flag.EST_FLAT for f in iv.flags.tolist())


def test_vee01_multiplier_and_daily_totals() -> None:
    rows = [(0, T0 + j * I, 1, 123_456 + 25 * j) for j in range(1, 5)]
    r, c, m = check(rows, prev=[(0, 1, 123_456, T0)], m=meters(mult=40))
    iv = stages.aggregate_intervals(r, c, m)
    assert iv.energy.tolist() == [1_000] * 4  # 0.25 kWh x 40 = 10.00 kWh
    hourly = stages.interval_totals(iv, bucket_ms=3_600_000)
    assert hourly.energy.sum() == 4_000 and hourly.n_actual.sum() == 4
    # Hourly buckets hold the intervals that *start* in the hour: from 00:30, two and two.
    rows = [(0, T0 + j * I, 1, 100 + 25 * j) for j in range(3, 7)]
    r, c, m = check(rows, prev=[(0, 1, 150, T0 + 2 * I)])
    hourly = stages.interval_totals(stages.aggregate_intervals(r, c, m), bucket_ms=3_600_000)
    assert hourly.start_ts.tolist() == [T0, T0 + 3_600_000] and hourly.energy.tolist() == [50, 50]


def test_completeness_report_for_billing() -> None:
    day0 = (T0 + 8 * 3_600_000) // 86_400_000 * 86_400_000 - 8 * 3_600_000  # local midnight
    rows = [(0, day0 + j * I, 1, 1_000 + j) for j in range(1, 97) if j not in (10, 11)]
    rows.append((0, day0 + 5 * I, 1, 1_005))
    r, c, m = check(rows, prev=[(0, 1, 1_000, day0)], receive=day0 + 100 * I)
    report = stages.completeness(stages.aggregate_intervals(r, c, m), r, c, ["M1"])
    local_day = dt.date(1970, 1, 1) + dt.timedelta(days=(day0 + 8 * 3_600_000) // 86_400_000)
    assert (
        str(report.query("M1", local_day))
        == f"M1 {local_day}: 96 of 96 intervals, 1 duplicates, 3 estimated, 0 invalid"
    )
    _, _, received, expected = report.rates(np.array([0]), np.array([2]))
    assert received.tolist() == [93] and expected.tolist() == [192]  # KPI-01: estimates not collected


LIAONING = {
    "utc_offset_minutes": 480,
    "seasons": {
        "sharp": {"months": [1, 7, 8, 12], "workday": "sharp"},
        "plain": {"months": [2, 3, 4, 5, 6, 9, 10, 11], "workday": "plain"},
    },
    "profiles": {
        name: {
            "segments": [
                ["00:00", "05:00", "valley"],
                ["05:00", "07:30", "flat"],
                ["07:30", "10:30", "peak"],
                ["10:30", "11:30", "flat"],
                ["11:30", "12:30", "valley"],
                ["12:30", "16:00", "flat"],
                *extra,
                ["21:00", "22:00", "flat"],
                ["22:00", "24:00", "valley"],
            ]
        }
        for name, extra in (
            ("sharp", [["16:00", "17:00", "peak"], ["17:00", "19:00", "sharp"], ["19:00", "21:00", "peak"]]),
            ("plain", [["16:00", "21:00", "peak"]]),
        )
    },
}


def _local_ms(y, mo, d, h, mi):
    return (
        int((dt.datetime(y, mo, d, h, mi) - dt.datetime(1970, 1, 1)).total_seconds() * 1000) - 8 * 3_600_000
    )


@pytest.mark.parametrize(
    ("end", "period"),
    [
        ((2024, 7, 15, 17, 30), 1),
        ((2024, 5, 15, 17, 30), 2),
        ((2024, 5, 15, 12, 0), 4),
        ((2024, 5, 15, 5, 15), 3),
    ],
)
def test_tou03_liaoning_examples(end, period) -> None:
    cal = TariffCalendar.from_dict(LIAONING)
    iv = stages.Intervals(
        np.zeros(1, np.uint32),
        np.ones(1, np.uint16),
        np.array([_local_ms(*end)], np.int64),
        np.array([10], np.int64),
        np.zeros(1, np.uint32),
    )
    assert stages.tou_split(iv, cal).calendar[0].tolist() == [10 if p == period else 0 for p in (1, 2, 3, 4)]


def test_vee15_tou_calendar_mismatch() -> None:
    cal = TariffCalendar.from_dict(LIAONING)
    ends = [_local_ms(2024, 5, 15, 9, 0), _local_ms(2024, 5, 15, 9, 15)]
    iv = stages.Intervals(
        np.zeros(4, np.uint32),
        np.array([1, 1, 3, 3], np.uint16),
        np.array(ends * 2, np.int64),
        np.array([40, 40, 200, 270], np.int64),
        np.zeros(4, np.uint32),
    )
    tou = stages.tou_split(iv, cal)  # calendar: peak 0.80 kWh; meter T2 says 4.70, largest interval 0.40
    assert tou.calendar[0].tolist() == [0, 80, 0, 0] and tou.mismatch[0].tolist() == [
        False,
        True,
        False,
        False,
    ]


def test_ll01_ll02_line_loss_examples() -> None:
    m = MeterParams(
        np.ones(3, np.bool_),
        np.full(3, 2200),
        np.full(3, 60_000),
        np.full(3, 5_000),
        np.ones(3, np.int64),
        np.array([40, 1, 1]),
        np.zeros(3, np.int32),
        np.array([True, False, False]),
    )
    day = T0
    daily = stages.Totals(
        np.array([0, 1, 1, 2], np.uint32),
        np.array([1, 1, 6, 1], np.uint16),
        np.full(4, day),
        np.array([102_000, 49_500, 3_000, 49_500]),
        np.full(4, 96),
        np.zeros(4, np.int64),
        np.zeros(4, np.int64),
    )
    ll = stages.line_loss(daily, m, np.array([2]))
    assert (ll.supply[0], ll.sales[0], ll.loss[0], ll.rate_bp[0]) == (105_000, 99_000, 6_000, 571)
    assert stages.LineLoss.CLASSES[ll.klass[0]] == "QUALIFIED"
    assert stages.LineLoss.CLASSES[stages.line_loss(daily, m, np.array([3])).klass[0]] == "NOT_COMPUTABLE"


def test_out02_one_alarm_not_hundreds() -> None:
    n = 200
    m = meters(n=n)
    t = T0 + np.arange(130, dtype=np.int64) * 400  # 130 meters within 52 s
    out = stages.area_outages(np.arange(130, dtype=np.uint32), t, m, np.array([n]))
    assert len(out.alarm_ts) == 1 and out.alarm_ts[0] == t[59]  # max(3, 30 % of 200) = 60th event
    assert (out.alarm_of_event == 0).all() and out.alarm_events[0] == 130
    two = stages.area_outages(np.arange(2, dtype=np.uint32), t[:2], m, np.array([n]))
    assert len(two.alarm_ts) == 0 and (two.alarm_of_event == -1).all()  # OUT-03 singles


def test_vee13_an_off_grid_reading_does_not_cost_the_next_interval() -> None:
    """An ad-hoc (read-now) or late reading between two grid readings is validated and stored,
    but it must not become the interval anchor: the next grid reading still closes [T0+I, T0+2I]."""
    rows = [(0, T0 + I, 1, 110), (0, T0 + I + 100_000, 1, 113), (0, T0 + 2 * I, 1, 120)]
    r, c, m = check(rows, prev=[(0, 1, 100, T0)])
    iv = stages.aggregate_intervals(r, c, m)
    assert iv.end_ts.tolist() == [T0 + I, T0 + 2 * I]
    assert iv.energy.tolist() == [10, 10]
    assert c.flags.tolist() == [0, 0, 0]
