"""Worked examples of the rules added to validation: VEE-06, 07, 08 (N intervals), 09, 19, 22
and 23 of docs/rules.md, through the public stage wrappers."""

from __future__ import annotations

import numpy as np

from ingest.rules import stages
from protocols.flags import Flag
from tests.unit.ingest.test_rules import T0, I, batch, meters

P = stages.ValidationParams()
RECEIVE = T0 + 2_000 * I


def validate(rows, prev=(), params=P, m=None):
    r, p = batch(rows, prev)
    m = m or meters()
    return r, stages.validate_batch(r, p, m, RECEIVE, params), m


def register(values, t0=T0, power=None):
    """Energy register readings at consecutive grid points from t0 + I (the first value is the
    previous register at t0), with the active power (0.0001 kW) at each point when given."""
    rows = [(0, t0 + j * I, 1, v) for j, v in enumerate(values[1:], start=1)]
    if power is not None:
        rows += [(0, t0 + j * I, 40, power) for j in range(1, len(values))]
    return rows, [(0, 1, values[0], t0)]


def energy_flags(r, c):
    return [int(f) for f, q in zip(c.flags, r.quantity, strict=True) if q == 1]


def intervals(values, t0=T0):
    """The intervals of one batch of consecutive register readings (see :func:`register`)."""
    rows, prev = register(values, t0)
    r, c, m = validate(rows, prev)
    return stages.aggregate_intervals(r, c, m)


def spikes(iv):
    return [bool(f & Flag.SPIKE_REL) for f in stages.relative_spikes(iv)]


def concat(*ivs):
    return stages.Intervals(*(np.concatenate(cols) for cols in zip(*((i.meter, i.quantity, i.end_ts, i.energy,
                                                                      i.flags) for i in ivs), strict=True)))  # fmt: skip


def test_vee06_relative_spike_flags_the_highest_interval_of_the_day() -> None:
    # max1 = 2.10, max2 = 0.50, max3 = 0.40 kWh: (2.10 − 0.40)/0.40 = 425 % > 300 %.
    iv = intervals([1000, 1040, 1090, 1300, 1340])
    assert [int(e) for e in iv.energy] == [40, 50, 210, 40]
    assert spikes(iv) == [False, False, True, False]
    # 1.00, 0.95, 0.90: 11 %, no flag; the data stay billable either way.
    assert spikes(intervals([1000, 1090, 1185, 1285])) == [False, False, False]


def test_vee06_needs_three_intervals_above_the_floor_in_one_day() -> None:
    assert not any(spikes(intervals([1000, 1005, 1010, 1100])))  # max3 = 0.05 kWh < 0.10: skipped


def test_vee06_ranks_the_whole_day_of_one_interval_batches_not_each_batch() -> None:
    # The edge's cadence: one interval per batch. A batch alone never holds three intervals, so
    # the batch path does not rank; the day built from the four batches does.
    registers = [1000, 1040, 1090, 1300, 1340]
    batches = [intervals(registers[j : j + 2], T0 + j * I) for j in range(4)]
    assert not any(int(f) & Flag.SPIKE_REL for b in batches for f in b.flags)
    day = concat(*batches)
    flags = stages.relative_spikes(day)
    assert [bool(f & Flag.SPIKE_REL) for f in flags] == [False, False, True, False]
    # a rerun over the flagged day gives the same flags (the bit is recomputed, not toggled)
    again = stages.Intervals(day.meter, day.quantity, day.end_ts, day.energy, flags)
    assert stages.relative_spikes(again).tolist() == flags.tolist()
    # a SPIKE_REL no longer earned (a late, higher interval) is cleared
    late = concat(again, intervals([1340, 1600], T0 + 4 * I))  # 2.60 kWh: now the day's max1
    assert [bool(f & Flag.SPIKE_REL) for f in stages.relative_spikes(late)] == [False] * 4 + [True]


def test_vee06_ranks_each_local_day_apart() -> None:
    # the same four intervals, the spike's day ending at local midnight: the days are ranked apart
    day_start = T0 - (T0 + stages.SHANGHAI_MS) % stages.DAY_MS + stages.DAY_MS
    iv = intervals([1000, 1040, 1090, 1300, 1340], day_start - 3 * I)  # three end on day D, one on D+1
    assert spikes(iv) == [False, False, True, False]
    iv = intervals([1000, 1040, 1090, 1300, 1340], day_start - 2 * I)  # two on D, two on D+1
    assert spikes(iv) == [False, False, False, False]


def test_vee07_meter_running_fast() -> None:
    # P = 1.0 kW implies 0.25 kWh per interval; 3.00 kWh is 12x > 10x.
    rows, prev = register([1000, 1300], power=10_000)
    r, c, _ = validate(rows, prev)
    assert energy_flags(r, c) == [Flag.FAST_RUNNING]
    rows, prev = register([1000, 1250], power=10_000)  # 1.0 x: fine
    r, c, _ = validate(rows, prev)
    assert energy_flags(r, c) == [0]
    rows, prev = register([1000, 1008], power=0)  # 0.08 kWh with P = 0: below the 0.10 kWh minimum
    r, c, _ = validate(rows, prev)
    assert energy_flags(r, c) == [0]


def test_vee07_fast_running_is_not_billable() -> None:
    rows, prev = register([1000, 1300], power=10_000)
    r, c, m = validate(rows, prev)
    iv = stages.aggregate_intervals(r, c, m)
    totals = stages.interval_totals(iv)
    assert int(totals.energy[0]) == 0 and int(totals.n_invalid[0]) == 1


def test_vee08_meter_stopped_over_four_intervals() -> None:
    # Register constant for 4 intervals while P = 1.2 kW: all 4 STOPPED (and not billable).
    rows, prev = register([200_000] * 5, power=12_000)
    r, c, _ = validate(rows, prev)
    assert all(f & Flag.STOPPED for f in energy_flags(r, c))
    # 3 intervals are not yet a stopped meter; each is still ZERO_WITH_CURRENT.
    rows, prev = register([200_000] * 4, power=12_000)
    r, c, _ = validate(rows, prev)
    assert energy_flags(r, c) == [Flag.ZERO_WITH_CURRENT] * 3
    # P = 0.05 kW: a valid zero.
    rows, prev = register([200_000] * 5, power=500)
    r, c, _ = validate(rows, prev)
    assert energy_flags(r, c) == [0] * 4


def test_vee08_a_moving_register_breaks_the_run() -> None:
    rows, prev = register([200_000, 200_000, 200_000, 200_001, 200_001, 200_001], power=12_000)
    r, c, _ = validate(rows, prev)
    assert not any(f & Flag.STOPPED for f in energy_flags(r, c))


def test_vee09_long_run_of_zero_intervals() -> None:
    rows, prev = register([5_000] * 289)  # 288 zero intervals, no current: ZERO_LONG, billable
    r, c, m = validate(rows, prev)
    assert all(f == Flag.ZERO_LONG for f in energy_flags(r, c))
    assert int(stages.interval_totals(stages.aggregate_intervals(r, c, m)).n_invalid.sum()) == 0
    rows, prev = register([5_000] * 288)  # 287: not yet
    r, c, _ = validate(rows, prev)
    assert not any(energy_flags(r, c))


def test_vee09_zero_during_an_outage_is_not_zero_long() -> None:
    rows, prev = register([5_000] * 5)
    rows.append((0, T0 + 3 * I, 30, 0))  # the meter is down at the third point
    r, c, _ = validate(rows, prev, params=stages.ValidationParams(zero_long_intervals=3))
    flags = energy_flags(r, c)
    assert flags[2] & Flag.OUTAGE and not any(f & Flag.ZERO_LONG for f in flags)


def _stuck_rows(ua, ia):
    rows = []
    for j, (u, a) in enumerate(zip(ua, ia, strict=True), start=1):
        rows += [(0, T0 + j * I, 30, u), (0, T0 + j * I, 33, a)]
    return rows


def test_vee19_stuck_voltage_while_the_current_varies() -> None:
    ia = [1_200, 4_800, 2_000, 3_100, 1_500, 4_000, 2_500, 3_700, 1_900, 4_400]
    r, c, _ = validate(_stuck_rows([2_213] * 10, ia))
    volts = [int(f) for f, q in zip(c.flags, r.quantity, strict=True) if q == 30]
    amps = [int(f) for f, q in zip(c.flags, r.quantity, strict=True) if q == 33]
    assert volts == [Flag.STUCK] * 10 and amps == [0] * 10


def test_vee19_not_stuck_when_short_zero_or_nothing_else_changes() -> None:
    ia = [1_200, 4_800, 2_000, 3_100, 1_500, 4_000, 2_500, 3_700, 1_900, 4_400]
    for ua, amps in (
        ([2_213] * 7 + [2_200, 2_213, 2_213], ia),  # runs of 7 and 2 readings
        ([2_213] * 10, [1_200] * 10),  # the whole meter is frozen: a communication matter
    ):
        _, c, _ = validate(_stuck_rows(ua, amps))
        assert not any(c.flags & Flag.STUCK)
    _, c, _ = validate(
        _stuck_rows([2_213] * 4 + [0] * 6, ia), params=stages.ValidationParams(stuck_readings=5)
    )
    assert not any(c.flags & Flag.STUCK)  # zero is no stuck value


def test_vee21_a_long_gap_is_spread_flat_up_to_three_weeks() -> None:
    # 09:00-17:00 (32 intervals) with ΔR = 6.00 kWh and no like days: 0.18 x 31 + 0.42, EST_FLAT.
    prev = [(0, 1, 1000, T0)]
    r, c, m = validate([(0, T0 + 32 * I, 1, 1600)], prev)
    iv = stages.aggregate_intervals(r, c, m)
    assert iv.energy.tolist() == [18] * 31 + [42] and int(iv.energy.sum()) == 600
    assert all(f & Flag.ESTIMATED and f & Flag.EST_FLAT for f in iv.flags.tolist())
    # Within max_gap it is VEE-20's interpolation (no EST_FLAT); beyond 3 weeks it stays a gap.
    r, c, m = validate([(0, T0 + 3 * I, 1, 1600)], prev)
    assert not any(stages.aggregate_intervals(r, c, m).flags & Flag.EST_FLAT)
    r, c, m = validate([(0, T0 + 2_018 * I, 1, 1600)], prev)
    assert len(stages.aggregate_intervals(r, c, m).energy) == 0


WEEK = 7 * 86_400_000


def _like_days(slots, weeks_back, energies, flags=0):
    """Stored intervals of meter 0's total register: ``energies`` on ``slots`` (interval ends)
    shifted back each of ``weeks_back`` weeks."""
    rows = [(t - w * WEEK, e) for w in weeks_back for t, e in zip(slots, energies, strict=True)]
    n = len(rows)
    return stages.Intervals(
        np.zeros(n, np.uint32), np.ones(n, np.uint16), np.array([t for t, _ in rows], np.int64),
        np.array([e for _, e in rows], np.int64), np.full(n, flags, np.uint32),
    )  # fmt: skip


def test_vee21_a_long_gap_takes_the_shape_of_its_like_days() -> None:
    # The rule's example: 09:00-17:00 (32 intervals), ΔR = 6.00 kWh; the like days' average over
    # those intervals sums to 4.80 kWh (16 of 0.20, 16 of 0.10), so the scale is 1.25: 0.20 ->
    # 0.25, 0.10 -> 0.125 -> 0.12, and the rounding remainder lands on the last interval.
    prev = [(0, 1, 1000, T0)]
    r, c, m = validate([(0, T0 + 32 * I, 1, 1600)], prev)
    slots = [T0 + (j + 1) * I for j in range(32)]
    shape = [20] * 16 + [10] * 16
    like = _like_days(slots, (1, 2, 3), shape)
    iv = stages.aggregate_intervals(r, c, m, like=like)
    assert iv.energy.tolist() == [25] * 16 + [12] * 15 + [20] and int(iv.energy.sum()) == 600
    assert all(f & Flag.ESTIMATED and f & Flag.EST_HIST and not f & Flag.EST_FLAT for f in iv.flags.tolist())
    # The 3 nearest like days only: a 4th, older week with another shape changes nothing.
    more = _like_days(slots, (4,), [10] * 16 + [20] * 16)
    both = stages.Intervals(*(np.concatenate((a, b)) for a, b in zip(
        (like.meter, like.quantity, like.end_ts, like.energy, like.flags),
        (more.meter, more.quantity, more.end_ts, more.energy, more.flags), strict=True)))  # fmt: skip
    assert stages.aggregate_intervals(r, c, m, like=both).energy.tolist() == iv.energy.tolist()


def test_vee21_without_an_eligible_like_day_the_gap_stays_flat() -> None:
    prev = [(0, 1, 1000, T0)]
    r, c, m = validate([(0, T0 + 32 * I, 1, 1600)], prev)
    slots = [T0 + (j + 1) * I for j in range(32)]
    flat = [18] * 31 + [42]
    for like in (
        _like_days(slots, (1, 2), [20] * 32, flags=int(Flag.ESTIMATED)),  # estimates never shape
        _like_days(slots, (1,), [20] * 32, flags=int(Flag.OUTAGE)),  # nor outage days
        _like_days(slots[1:], (1, 2, 3), [20] * 31),  # a slot missing: not a like day
        _like_days(slots, (1,), [0] * 32),  # a shape summing to 0
        _like_days(slots, (9,), [20] * 32),  # beyond the 8-week look-back
    ):
        iv = stages.aggregate_intervals(r, c, m, like=like)
        assert iv.energy.tolist() == flat and all(f & Flag.EST_FLAT for f in iv.flags.tolist())


def test_vee22_prolonged_estimation_is_escalated() -> None:
    # Last actual reading at T0; the estimates ending more than 3 days (288 intervals) later are
    # PROLONGED_EST, the earlier ones are not.
    r, c, m = validate([(0, T0 + 300 * I, 1, 1300)], [(0, 1, 1000, T0)])
    iv = stages.aggregate_intervals(r, c, m)
    prolonged = [bool(f & Flag.PROLONGED_EST) for f in iv.flags.tolist()]
    assert prolonged == [False] * 288 + [True] * 12


def test_vee22_an_estimated_reading_never_anchors_an_estimate() -> None:
    # The edge sent 10:30 as an estimate: 10:15 -> 11:00 is interpolated from actual readings only.
    rows = [
        (0, T0 + I, 1, 1000, 0),
        (0, T0 + 2 * I, 1, 1090, int(Flag.ESTIMATED)),
        (0, T0 + 4 * I, 1, 1120, 0),
    ]
    r, c, m = validate(rows)
    iv = stages.aggregate_intervals(r, c, m)
    assert [int(e) for e in iv.energy] == [40, 40, 40]
    assert all(f & Flag.ESTIMATED for f in iv.flags)


def test_vee23_outage_intervals_are_not_estimated() -> None:
    # Down at 10:15 (all phase voltages collapsed), back at 11:00: the intervals between are
    # E = 0 with OUTAGE, the register delta stays on the closing interval; nothing is ESTIMATED.
    prev = [(0, 1, 1000, T0)]
    rows = [(0, T0 + I, 1, 1010), (0, T0 + I, 30, 120), (0, T0 + 4 * I, 1, 1070), (0, T0 + 4 * I, 30, 2_200)]
    r, c, m = validate(rows, prev)
    iv = stages.aggregate_intervals(r, c, m)
    assert [int(e) for e in iv.energy] == [10, 0, 0, 60]
    assert all(f & Flag.OUTAGE and not f & Flag.ESTIMATED for f in iv.flags)
    # Without the outage the same gap is interpolated (VEE-20).
    rows[1] = (0, T0 + I, 30, 2_200)
    r, c, m = validate(rows, prev)
    iv = stages.aggregate_intervals(r, c, m)
    assert [int(e) for e in iv.energy] == [10, 20, 20, 20]
    assert not any(iv.flags & Flag.OUTAGE)


def test_new_bits_survive_the_uint32_flags_column() -> None:
    rows, prev = register([1000, 1300], power=10_000)
    _, c, _ = validate(rows, prev)
    assert c.flags.dtype == np.uint32 and int(c.flags[0]) == int(Flag.FAST_RUNNING) > 0xFFFF
