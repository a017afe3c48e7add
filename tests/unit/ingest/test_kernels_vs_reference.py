"""Every kernel against its plain reference (tests/reference.py), exact equality (STYLE H7).

This file is also run with NUMBA_DISABLE_JIT=1 (test_nojit.py) so coverage sees the kernel bodies."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_array_equal

from ingest.rules import kernels as k
from ingest.rules import stages
from ingest.sinks.influx import lines as lp
from tests import reference as ref
from tests.unit.ingest.strategies import BASE, SETTINGS, I, batches, carries, meter_params, readonly, series

P = stages.ValidationParams()
# Thresholds low enough that the run rules (VEE-08/09/19) and VEE-07 fire in small batches.
P_RUNS = stages.ValidationParams(
    stopped_intervals=2, zero_long_intervals=2, stuck_readings=2, fast_ratio_x10=10, fast_min=0
)


def _validate_args(readings, previous, meters, receive, params=P, carry=None):
    args = stages.validate_args(readings, previous, meters, receive, params, carry)
    readonly(*(a for a in args if isinstance(a, np.ndarray)))
    return args


def _assert_all_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        assert_array_equal(g, w)


@SETTINGS
@given(batches())
def test_validate_matches_reference(batch) -> None:
    readings, previous, meters, receive = batch
    args = _validate_args(*batch)
    got = k.validate(*args)
    _assert_all_equal(got, ref.validate(*args))
    checked = stages.validate_batch(readings, previous, meters, receive, P)
    _assert_all_equal((checked.flags, checked.delta, checked.anchor_ts), got[:3])


@SETTINGS
@given(st.data(), st.sampled_from([P, P_RUNS]))
def test_validate_with_a_carried_run_state_matches_reference(data, params) -> None:
    """VEE-08/09/19 runs carried in from earlier batches, contiguous or not, and the carry out."""
    batch = data.draw(st.one_of(batches(), series()))
    carry = data.draw(carries(batch[0]))
    readonly(carry.meter, carry.quantity, carry.state)
    args = _validate_args(*batch, params=params, carry=carry)
    _assert_all_equal(k.validate(*args), ref.validate(*args))


RUN_BITS = k.F_STOPPED | k.F_ZERO_LONG | k.F_STUCK


@SETTINGS
@given(series(clean=True), st.integers(1, 12), st.sampled_from([P_RUNS, stages.ValidationParams(
    stopped_intervals=3, zero_long_intervals=4, stuck_readings=3)]))  # fmt: skip
def test_a_series_cut_in_two_batches_flags_the_second_like_the_whole(batch, cut, params) -> None:
    """A series without gaps or outages, cut at a point: the second batch, given the first's carry
    and last register (what the edge sends as previous), flags its readings with the run rules
    exactly as the whole series does."""
    readings, previous, meters, receive = batch
    whole = stages.validate_batch(readings, previous, meters, receive, params)
    at = readings.ts <= BASE + cut * I
    first = stages.Readings(*(col[at] for col in _reading_cols(readings)))
    second = stages.Readings(*(col[~at] for col in _reading_cols(readings)))
    a = stages.validate_batch(first, previous, meters, receive, params)
    reg = first.quantity == 1
    last = {}
    for m, t, v in zip(
        first.meter[reg].tolist(), first.ts[reg].tolist(), first.value[reg].tolist(), strict=True
    ):
        last[m] = (v, t)
    for m, v, t in zip(previous.meter.tolist(), previous.value.tolist(), previous.ts.tolist(), strict=True):
        last.setdefault(m, (v, t))
    ms = sorted(last)
    prev_b = stages.PreviousRegisters(
        np.array(ms, np.uint32), np.ones(len(ms), np.uint16),
        np.array([last[m][0] for m in ms], np.int64), np.array([last[m][1] for m in ms], np.int64),
    )  # fmt: skip
    b = stages.validate_batch(second, prev_b, meters, receive, params, a.carry)
    assert_array_equal(b.flags & RUN_BITS, whole.flags[~at] & RUN_BITS)


def _reading_cols(r: stages.Readings) -> tuple[np.ndarray, ...]:
    return (r.meter, r.ts, r.quantity, r.value, r.flags)


@SETTINGS
@given(st.one_of(batches(), series()), st.sampled_from([P, P_RUNS]))
def test_validate_run_rules_match_reference(batch, params) -> None:
    """VEE-07/08/09/19/23 over consecutive points (series) as well as adversarial batches."""
    args = _validate_args(*batch, params=params)
    _assert_all_equal(k.validate(*args), ref.validate(*args))


@SETTINGS
@given(series(), st.integers(0, 3), st.sampled_from([0, 4]), st.sampled_from([0, 2 * I]))
def test_intervals_of_series_match_reference(batch, max_gap, flat_max, prolonged) -> None:
    """VEE-23: gaps that start or end where the meter was down are not estimated."""
    readings, previous, meters, receive = batch
    c = stages.validate_batch(readings, previous, meters, receive, P)
    selected = np.zeros(1 << 16, np.bool_)
    selected[1] = True
    args = (readings.meter, readings.ts, readings.quantity, c.flags, c.delta, c.anchor_ts, selected,
            meters.multiplier, I, max_gap, flat_max, prolonged)  # fmt: skip
    _assert_all_equal(k.intervals(*args), ref.intervals(*args))


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),
            st.sampled_from([0, 5, 10, 11, 40, 41, 300, 10**14 + 1, -7]),
            st.sampled_from([0, 0, 0, k.F_ESTIMATED, k.F_OUTAGE, k.F_SPIKE, k.F_GAP_BEFORE, k.F_STOPPED]),
        ),
        max_size=40,
    ),
    st.sampled_from([0, 10, 11]),
    st.sampled_from([0, 100, 300]),
)
def test_relative_spikes_match_reference(rows, floor, tol) -> None:
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 3
    labels, energy, flags = (
        np.array(c, d) for c, d in zip(cols, (np.int64, np.int64, np.uint32), strict=True)
    )
    readonly(labels, energy, flags)
    got = k.relative_spikes(labels, 3, energy, flags, floor, tol)
    _assert_all_equal((got,), (ref.relative_spikes(labels, 3, energy, flags, floor, tol),))


@SETTINGS
@given(
    batches(), st.integers(0, 10), st.sampled_from([0, 5, 12]), st.sampled_from([0, 2 * I, 3 * 86_400_000])
)
def test_intervals_match_reference(batch, max_gap, flat_max, prolonged) -> None:
    readings, previous, meters, receive = batch
    c = stages.validate_batch(readings, previous, meters, receive, P)
    selected = np.zeros(1 << 16, np.bool_)
    selected[[1, 2, 3, 6, 11, 80]] = True
    args = (
        readings.meter,
        readings.ts,
        readings.quantity,
        c.flags,
        c.delta,
        c.anchor_ts,
        selected,
        meters.multiplier,
        I,
        max_gap,
        flat_max,
        prolonged,
    )
    got = k.intervals(*args)
    _assert_all_equal(got, ref.intervals(*args))
    # VEE-20, independently of the reference: the estimated rows a reading spreads over its gap
    # (ends a+I .. ts) are all flagged ESTIMATED and sum exactly to its delta x multiplier.
    rows: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for m, q, end, e, f in zip(*(col.tolist() for col in got), strict=True):
        rows.setdefault((m, q, end), []).append((e, f))
    for i in range(readings.ts.shape[0]):
        m, q, t, a, f = (int(readings.meter[i]), int(readings.quantity[i]), int(readings.ts[i]),
                         int(c.anchor_ts[i]), int(c.flags[i]))  # fmt: skip
        if not selected[q] or a == np.iinfo(np.int64).min or t % I or a % I or f & k.NOT_ANCHOR:
            continue
        steps = (t - a) // I
        if steps < 2 or steps - 1 > max(max_gap, flat_max) or f & (k.NOT_BILLABLE | k.F_OUTAGE):
            continue
        mine = [rows.get((m, q, a + j * I), []) for j in range(1, steps + 1)]
        if any(len(r) != 1 for r in mine):
            continue  # another reading of the channel wrote the same end: ambiguous, skip
        assert all(r[0][1] & k.F_ESTIMATED for r in mine)
        assert sum(r[0][0] for r in mine) == int(c.delta[i]) * int(meters.multiplier[m])


groups = st.integers(1, 6).flatmap(
    lambda ng: st.tuples(
        st.just(ng),
        st.lists(
            st.tuples(
                st.integers(0, ng - 1),
                st.integers(-5, 10**9),
                st.sampled_from(
                    [0, 0, k.F_ESTIMATED, k.F_SPIKE, k.F_METER_REPLACED | k.F_GAP_BEFORE, k.F_WENT_BACKWARDS]
                ),
                st.sampled_from([1, 2, 3, 4, 5, 6]),
                st.integers(0, 5),
            ),
            max_size=60,
        ),
    )
)


def _cols(rows):
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 5
    return (
        np.array(cols[0], np.int64),
        np.array(cols[1], np.int64),
        np.array(cols[2], np.uint32),
        np.array(cols[3], np.uint16),
        np.array(cols[4], np.uint8),
    )


@SETTINGS
@given(groups)
def test_group_kernels_match_reference(case) -> None:
    ng, rows = case
    labels, energy, flags, quantity, period = _cols(rows)
    readonly(labels, energy, flags, quantity, period)
    _assert_all_equal(k.group_totals(labels, ng, energy, flags), ref.group_totals(labels, ng, energy, flags))
    mask = (flags & k.F_ESTIMATED) != 0
    _assert_all_equal((k.group_count(labels, ng, mask),), (ref.group_count(labels, ng, mask),))
    got = k.tou_split(labels, ng, quantity, energy // 1000, flags, period)
    _assert_all_equal(got, ref.tou_split(labels, ng, quantity, energy // 1000, flags, period))


@SETTINGS
@given(groups)
def test_group_min_matches_reference(case) -> None:
    ng, rows = case
    labels, energy, _, _, _ = _cols(rows)
    readonly(labels, energy)
    _assert_all_equal((k.group_min(labels, ng, energy),), (ref.group_min(labels, ng, energy),))


@SETTINGS
@given(
    st.integers(1, 3).flatmap(lambda nkeys: st.lists(st.tuples(*[st.integers(-3, 3)] * nkeys), max_size=40))
)
def test_group_labels_match_reference(rows) -> None:
    keys = [np.array(col, np.int64) for col in zip(*rows, strict=True)] if rows else [np.empty(0, np.int64)]
    labels, ng, first = stages.group_labels(*keys)
    want_labels, want_ng, want_first = ref.group_labels(*keys)
    assert ng == want_ng
    _assert_all_equal((labels, first), (want_labels, want_first))


# quarter-hours anywhere, or around the days the calendars below fix by date
TOU_QUARTERS = st.one_of(st.integers(-(10**6), 4 * 10**7), st.integers(18_999 * 96, 19_031 * 96))


@st.composite
def calendars(draw):
    nprof = draw(st.integers(1, 3))
    profiles = np.zeros((nprof, 1440), np.uint8)
    for p in range(nprof):
        cuts = sorted(set(draw(st.lists(st.integers(1, 47), max_size=5))))
        edges = [0, *[c * 30 for c in cuts], 1440]
        for a, b in itertools.pairwise(edges):
            profiles[p, a:b] = draw(st.integers(1, 4))
    # calendar versions (TOU-05): effective times on, or a millisecond off, a quarter-hour
    cuts = sorted(draw(st.sets(TOU_QUARTERS, max_size=2)))
    version_from = np.array(
        [k.INT64_MIN, *(c * I + draw(st.sampled_from([0, -1, 1])) for c in cuts)], np.int64
    )
    nversion = len(version_from)
    nseason = draw(st.integers(1, 3 * nversion))
    month_season = np.array(
        [[draw(st.integers(0, nseason - 1)) for _ in range(12)] for _ in range(nversion)], np.int64
    )
    day_profile = np.array(
        [[draw(st.integers(0, nprof - 1)) for _ in range(3)] for _ in range(nseason)], np.int64
    )
    # days fixed by date (holidays, make-up workdays, overrides): any profile, per version
    dated_days = np.array(sorted(set(draw(st.lists(st.integers(19_000, 19_030), max_size=8)))), np.int64)
    dated_profile = np.array(
        [[draw(st.integers(0, nprof - 1)) for _ in dated_days] for _ in range(nversion)], np.int64
    ).reshape(nversion, len(dated_days))
    return version_from, month_season, day_profile, profiles, dated_days, dated_profile


@SETTINGS
@given(calendars(), st.lists(TOU_QUARTERS, max_size=40), st.sampled_from([0, 480, -300, 345]))
def test_tou_periods_match_reference(cal, quarter_hours, offset_min) -> None:
    at_cuts = [int(t) + I + d for t in cal[0][1:] for d in (-1, 0)]  # intervals starting at a version's time
    end_ts = np.array([q * I for q in quarter_hours] + at_cuts, np.int64)
    args = (end_ts, I, offset_min * 60_000, *cal)
    assert_array_equal(k.tou_periods(*args), ref.tou_periods(*args))


@SETTINGS
@given(
    st.integers(1, 4).flatmap(
        lambda ng: st.tuples(
            st.just(ng),
            st.lists(
                st.tuples(
                    st.integers(0, ng - 1),
                    st.booleans(),
                    st.integers(0, 10**6),
                    st.booleans(),
                    st.integers(0, 10**5),
                    st.booleans(),
                ),
                max_size=30,
            ),
        )
    ),
    st.lists(st.integers(0, 12), min_size=4, max_size=4),
    st.lists(
        st.tuples(st.sampled_from([0, 50, 98, 100]), st.sampled_from([0, 500, 1000, 1200])),
        min_size=4,
        max_size=4,
    ),
)
def test_line_loss_matches_reference(case, expected, bands) -> None:
    ng, rows = case
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 6
    labels = np.array(cols[0], np.int64)
    master, fwd_ok, rev_ok = (np.array(cols[i], np.bool_) for i in (1, 3, 5))
    fwd, rev = np.array(cols[2], np.int64), np.array(cols[4], np.int64)
    min_pct, high_bp = (np.array([b[i] for b in bands[:ng]], np.int64) for i in (0, 1))
    args = (labels, ng, master, fwd, fwd_ok, rev, rev_ok, np.array(expected[:ng], np.int64), min_pct, high_bp)
    _assert_all_equal(k.line_loss(*args), ref.line_loss(*args))


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 600_000)), max_size=50), st.data())
def test_area_outages_match_reference(events, data) -> None:
    nmeters = 10
    meters = data.draw(meter_params(nmeters))
    area_size = np.array([data.draw(st.integers(0, 12)) for _ in range(2)], np.int64)
    meter = np.array([e[0] for e in events], np.uint32)
    ts = np.array([e[1] for e in events], np.int64)
    order = np.lexsort((ts, meters.area.astype(np.int64)[meter])).astype(np.int64)
    args = (order, meter, ts, meters.area, meters.master, area_size, 120_000, 3, 30)
    _assert_all_equal(k.area_outages(*args), ref.area_outages(*args))


ID_TEXT = st.text(alphabet=st.sampled_from(list("ab ,=\n\r\t\"'\\%é中😀x1_-")), min_size=1, max_size=8)


@SETTINGS
@given(batches(max_n=25), st.lists(ID_TEXT, min_size=3, max_size=3), ID_TEXT, st.booleans())
def test_encode_lines_matches_reference_and_parses_back(batch, ids, gateway, wide) -> None:
    readings = batch[0]
    tables = lp.LineTables.build(ids, gateway)
    data = lp.encode_lines(readings, tables, wide=wide)
    order = stages.sort_order(readings)
    want = ref.encode_lines(
        order,
        readings.meter,
        readings.ts,
        readings.quantity,
        readings.value,
        readings.flags,
        tables.head,
        tables.head_off,
        lp.FNAME,
        lp.FNAME_OFF,
        stages.Q_DECIMALS,
        wide,
    )
    assert data == want
    # the validation's sort, handed over, gives the same bytes (transform passes Checked.order)
    assert lp.encode_lines(readings, tables, wide=wide, order=stages.validate_batch(*batch).order) == data
    points = ref.parse_lines(data)
    keys = set(zip(readings.meter.tolist(), readings.ts.tolist(), readings.quantity.tolist(), strict=True))
    assert len(points) == (len({(m, t) for m, t, _ in keys}) if wide else len(keys))
    for meas, tags, fields, ts in points:
        assert meas == "meter_reading"
        assert set(tags) <= {"meter", "gateway", "quantity"}
        assert lp.unescape_tag(tags["meter"]) in ids
        assert lp.unescape_tag(tags["gateway"]) == gateway
        assert ts in {t for _, t, _ in keys}
        assert fields


@SETTINGS
@given(series(), st.integers(0, 2), st.sampled_from([4, 12]), st.integers(1, 4), st.integers(1, 3), st.data())
def test_like_day_spread_matches_reference(batch, max_gap, flat_max, weeks, like_days, data) -> None:
    """VEE-21 over the flat gaps of a series, against references drawn on the gaps' own slots
    shifted back 1..weeks+1 'weeks' (a short week keeps the cases small): some missing, some
    estimated, outage or negative, so every eligibility branch is taken."""
    readings, previous, meters, receive = batch
    c = stages.validate_batch(readings, previous, meters, receive, P)
    selected = np.zeros(1 << 16, np.bool_)
    selected[1] = True
    iv = k.intervals(readings.meter, readings.ts, readings.quantity, c.flags, c.delta, c.anchor_ts,
                     selected, meters.multiplier, I, max_gap, flat_max, 2 * I)  # fmt: skip
    week = 3 * I
    ref_rows: dict[tuple[int, int, int], tuple[int, int]] = {}
    for m, q, end in zip(iv[0].tolist(), iv[1].tolist(), iv[2].tolist(), strict=True):
        for w in range(1, weeks + 2):
            if data.draw(st.booleans()):
                e = data.draw(st.sampled_from([0, 1, 7, 20, 55, -3]))
                f = data.draw(st.sampled_from([0, 0, 0, k.F_ESTIMATED, k.F_OUTAGE, k.F_GAP_BEFORE]))
                ref_rows[(m, q, end - w * week)] = (e, f)
    keys = sorted(ref_rows)
    cols = list(zip(*[(*key, *ref_rows[key]) for key in keys], strict=True)) if keys else [[]] * 5
    dts = (np.uint32, np.uint16, np.int64, np.int64, np.uint32)
    rm, rq, rt, re_, rf = (np.array(col, d) for col, d in zip(cols, dts, strict=True))
    args = (readings.meter, readings.ts, readings.quantity, c.flags, c.delta, c.anchor_ts, selected,
            I, max(max_gap, flat_max), iv[3], iv[4], rm, rq, rt, re_, rf, week, weeks, like_days)  # fmt: skip
    got = k.like_day_spread(*args)
    _assert_all_equal(got, ref.like_day_spread(*args))
    # The rows of each reading still sum to what the flat spread gave them (exact sum).
    assert int(got[0].sum()) == int(iv[3].sum())
