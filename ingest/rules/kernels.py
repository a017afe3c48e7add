"""Numba kernels of the ingest pipeline: pure functions over columnar integer arrays.

Contract (STYLE H7): every function here is ``@numba.njit(cache=True, nogil=True)``, takes arrays
and scalars, returns *new* arrays, never writes to an input, never raises, uses integers only and
never sets ``fastmath``. Whatever is wrong with a reading becomes a quality-flag bit
(:mod:`protocols.flags`). Dtype/shape checks, allocation of label arrays and dispatch live in the
checking wrappers of :mod:`ingest.rules.stages`; call those, not these. Each kernel has an
obviously-correct twin in ``tests/reference.py`` and the tests assert exact equality.

Rule IDs (VEE-nn, TOU-nn, LL-nn, OUT-nn, KPI-nn) refer to ``docs/rules.md``.
"""

from __future__ import annotations

import numba
import numpy as np

from protocols.flags import Flag
from protocols.quantities import ENERGY_FORWARD, by_name

# Flag bits as plain ints: numba freezes module-level ints as compile-time constants.
F_OUT_OF_RANGE = int(Flag.OUT_OF_RANGE)
F_WENT_BACKWARDS = int(Flag.WENT_BACKWARDS)
F_ROLLOVER = int(Flag.ROLLOVER)
F_SPIKE = int(Flag.SPIKE)
F_GAP_BEFORE = int(Flag.GAP_BEFORE)
F_ESTIMATED = int(Flag.ESTIMATED)
F_CLOCK_SKEW = int(Flag.CLOCK_SKEW)
F_FUTURE_TIME = int(Flag.FUTURE_TIME)
F_DUPLICATE = int(Flag.DUPLICATE)
F_METER_ERROR = int(Flag.METER_ERROR)
F_METER_REPLACED = int(Flag.METER_REPLACED)
F_ZERO_WITH_CURRENT = int(Flag.ZERO_WITH_CURRENT)
F_PHASE_LOSS = int(Flag.PHASE_LOSS)
F_PF_OUT_OF_BOUNDS = int(Flag.PF_OUT_OF_BOUNDS)
F_OUT_OF_ORDER = int(Flag.OUT_OF_ORDER)
F_BEFORE_MIN_TIME = int(Flag.BEFORE_MIN_TIME)

# A reading with one of these bits is not a register anchor: its value is not the register (or
# its time is not believable), so it closes no interval and is in no total.
NOT_ANCHOR = F_METER_ERROR | F_OUT_OF_RANGE | F_FUTURE_TIME | F_BEFORE_MIN_TIME | F_DUPLICATE
# An interval carrying one of these bits has no billable consumption (VEE-03/04/05).
NOT_BILLABLE = F_WENT_BACKWARDS | F_METER_REPLACED | F_SPIKE
# Reading bits an interval row inherits from the reading that closes it.
INTERVAL_CARRY = (
    F_ROLLOVER
    | F_SPIKE
    | F_WENT_BACKWARDS
    | F_METER_REPLACED
    | F_GAP_BEFORE
    | F_CLOCK_SKEW
    | F_OUT_OF_ORDER
    | F_ZERO_WITH_CURRENT
)

KIND_UNKNOWN, KIND_CUMULATIVE, KIND_INSTANT, KIND_STATE = 0, 1, 2, 3

Q_ENERGY_TOTAL = ENERGY_FORWARD
Q_VOLT_A = by_name("voltage_a").code  # a, b, c are consecutive codes
Q_CURR_A = by_name("current_a").code
Q_POWER_TOTAL = by_name("power_active_total").code
Q_PF_TOTAL = by_name("power_factor_total").code  # total, a, b, c are consecutive codes
Q_METER_CLOCK = by_name("meter_clock").code

# No quantity reaches 10^15 of its units (a meter clock, epoch ms, is 1.7e12): a value beyond is
# OUT_OF_RANGE, and every rule that computes with a value takes in-range values only, so no
# product in these kernels (x 1000 at most) can overflow int64 whatever an edge sends.
VALUE_BOUND = 10**15
INT64_MIN = np.iinfo(np.int64).min
INT64_MAX = np.iinfo(np.int64).max
_MS_PER_HOUR = 3_600_000
_MS_PER_DAY = 86_400_000

_jit = numba.njit(cache=True, nogil=True)


# --- validation ------------------------------------------------------------------------------------


@_jit
def _emax(k_mw_pct, dt_ms):
    """VEE-05 physical maximum in 0.01 kWh register units over ``dt_ms``, floored.

    ``k_mw_pct`` = U_n·I_max·phases in mW times (100 + margin %). E = K·dt / 3.6e12, computed
    in two parts so no product overflows int64 for any dt up to ~10^6 hours."""
    hours = dt_ms // _MS_PER_HOUR
    rem = dt_ms - hours * _MS_PER_HOUR
    a = k_mw_pct * hours  # units of 1e-6 register units
    return a // 1_000_000 + ((a % 1_000_000) * 3_600_000 + k_mw_pct * rem) // 3_600_000_000_000


@_jit
def _skewed_meters(meter, ts, quantity, value, flags, nmeters, clock_offset_ms, skew_tol_ms, t_lo, t_hi):
    """VEE-12: a meter whose clock reading differs from the read time by more than the tolerance
    (clock readings read within the time bounds ``[t_lo, t_hi]``, value within VALUE_BOUND)."""
    out = np.zeros(nmeters, dtype=np.bool_)
    for i in range(meter.shape[0]):
        believable = t_lo <= ts[i] <= t_hi and -VALUE_BOUND <= value[i] <= VALUE_BOUND
        if quantity[i] == Q_METER_CLOCK and (flags[i] & F_METER_ERROR) == 0 and believable:
            skew = value[i] - clock_offset_ms - ts[i]
            if skew > skew_tol_ms or skew < -skew_tol_ms:
                out[meter[i]] = True
    return out


@_jit
def validate(
    order,
    chan,
    meter,
    ts,
    quantity,
    value,
    flags,
    prev_value,
    prev_ts,
    has_prev,
    q_kind,
    q_regmax,
    q_lo,
    q_hi,
    q_energy,
    q_signed,
    m_un_dv,
    m_kmax,
    m_ib_ma,
    m_phases,
    m_izero_ma,
    m_regmax,
    receive_ts_ms,
    future_tol_ms,
    min_ts_ms,
    clock_offset_ms,
    skew_tol_ms,
    interval_ms,
    decrease_min,
    replaced_below,
    replaced_drop,
    pf_floor,
    p_min,
):
    """One pass over the batch in ``order`` (sorted by meter, ts, quantity, arrival).

    Returns ``(flags, delta, anchor_ts)`` per reading (input positions): the new flags (input
    flags OR'ed with every rule that fired), the register delta since the channel's previous
    anchor (cumulative channels, rollover unwrapped; 0 when there is none or it is invalid) and
    that anchor's time (``INT64_MIN`` when there is none)."""
    n = order.shape[0]
    nchan = prev_value.shape[0]
    out = flags.astype(np.int64)
    delta = np.zeros(n, dtype=np.int64)
    anchor_ts = np.full(n, INT64_MIN, dtype=np.int64)
    skewed = _skewed_meters(
        meter, ts, quantity, value, flags, m_un_dv.shape[0], clock_offset_ms, skew_tol_ms,
        min_ts_ms, receive_ts_ms + future_tol_ms,
    )  # fmt: skip

    # Arrival order: OUT_OF_ORDER when earlier than something already seen on the channel.
    seen_max = np.full(nchan, INT64_MIN, dtype=np.int64)
    for c in range(nchan):
        if has_prev[c]:
            seen_max[c] = prev_ts[c]
    for i in range(n):
        c = chan[i]
        if ts[i] < seen_max[c]:
            out[i] |= F_OUT_OF_ORDER
        elif ts[i] > seen_max[c]:
            seen_max[c] = ts[i]

    a_val = prev_value.copy()
    a_ts = prev_ts.copy()
    a_ok = has_prev.copy()
    last_ts = np.full(nchan, INT64_MIN, dtype=np.int64)  # for duplicates, any reading
    has_last = has_prev.copy()  # not a sentinel time: a reading may be stamped INT64_MIN
    for c in range(nchan):
        if has_prev[c]:
            last_ts[c] = prev_ts[c]
    start = 0
    while start < n:
        # One point: a run of the same (meter, ts).
        m = meter[order[start]]
        t = ts[order[start]]
        end = start
        while end < n and meter[order[end]] == m and ts[order[end]] == t:
            end += 1
        ua = np.full(3, -1, dtype=np.int64)
        ia = np.full(3, -1, dtype=np.int64)
        p_abs = np.int64(-1)
        for j in range(start, end):
            i = order[j]
            q = np.int64(quantity[i])
            v = value[i]
            if (flags[i] & F_METER_ERROR) != 0 or v < q_lo[q] or v > q_hi[q]:
                continue
            if Q_VOLT_A <= q < Q_VOLT_A + 3:
                ua[q - Q_VOLT_A] = v
            elif Q_CURR_A <= q < Q_CURR_A + 3:
                ia[q - Q_CURR_A] = v if v >= 0 else -v
            elif q == Q_POWER_TOTAL:
                p_abs = v if v >= 0 else -v
        i_max_abs = max(ia[0], max(ia[1], ia[2]))
        for j in range(start, end):
            i = order[j]
            c = chan[i]
            q = np.int64(quantity[i])
            v = value[i]
            f = out[i]
            if skewed[m]:
                f |= F_CLOCK_SKEW
            if t > receive_ts_ms + future_tol_ms:  # VEE-11
                f |= F_FUTURE_TIME
            if t < min_ts_ms:  # the lower time bound (epoch 0, an unset clock)
                f |= F_BEFORE_MIN_TIME
            kind = q_kind[q]
            in_table = q_lo[q] <= v <= q_hi[q]  # the rules below compute with in-range values only
            hi = q_hi[q]
            if Q_VOLT_A <= q < Q_VOLT_A + 3 and m_un_dv[m] > 0:
                hi = min(hi, m_un_dv[m] * 3 // 2)  # VEE-16: invalid above 1.5 U_n
            if kind == KIND_UNKNOWN or v < q_lo[q] or v > hi:
                f |= F_OUT_OF_RANGE
            if has_last[c] and t == last_ts[c]:  # VEE-10: same (meter, quantity, ts) seen before
                f |= F_DUPLICATE
            last_ts[c] = t
            has_last[c] = True
            # VEE-13. Not t - a_ts > interval: t may be any int64 (anchors are bounded, see NOT_ANCHOR).
            if (f & F_DUPLICATE) == 0 and a_ok[c] and t > a_ts[c] + interval_ms:
                f |= F_GAP_BEFORE
            if Q_PF_TOTAL <= q < Q_PF_TOTAL + 4 and (f & F_METER_ERROR) == 0 and in_table:  # VEE-18
                pf = v if v >= 0 else -v
                if pf > 1000 or (pf < pf_floor and p_abs > 0):
                    f |= F_PF_OUT_OF_BOUNDS
            if (
                Q_VOLT_A <= q < Q_VOLT_A + 3
                and m_phases[m] == 3
                and m_un_dv[m] > 0
                and (f & F_METER_ERROR) == 0
                and in_table
            ):
                x = q - Q_VOLT_A
                un = m_un_dv[m]
                collapsed = v * 100 < 60 * un or (v * 100 < 78 * un and ia[x] * 1000 > 5 * m_ib_ma[m])
                other_ok = False
                for y in range(3):
                    if y != x and ua[y] >= 0 and ua[y] * 100 >= 60 * un:
                        other_ok = True
                if collapsed and other_ok:  # VEE-17 断相 / 失压
                    f |= F_PHASE_LOSS
            if (f & NOT_ANCHOR) == 0 and (not a_ok[c] or t > a_ts[c]):
                if kind == KIND_CUMULATIVE and a_ok[c]:
                    dt = t - a_ts[c]
                    d = v - a_val[c]
                    anchor_ts[i] = a_ts[c]
                    move = True
                    if d < 0 and not q_signed[q]:
                        d, f, move = _backwards(
                            v,
                            a_val[c],
                            dt,
                            m_regmax[m] if q_energy[q] and m_regmax[m] > 0 else q_regmax[q],
                            q_energy[q],
                            m_kmax[m],
                            f,
                            decrease_min,
                            replaced_below,
                            replaced_drop,
                        )
                    elif q_energy[q] and m_kmax[m] > 0 and d > _emax(m_kmax[m], dt):
                        f |= F_SPIKE  # VEE-05
                    current = p_abs >= p_min or (m_izero_ma[m] > 0 and i_max_abs >= m_izero_ma[m])
                    if (
                        q == Q_ENERGY_TOTAL
                        and d == 0
                        and current
                        and (f & (F_WENT_BACKWARDS | F_METER_REPLACED)) == 0
                    ):
                        f |= F_ZERO_WITH_CURRENT  # VEE-08, one interval
                    delta[i] = d
                    # VEE-13: an off-grid reading (an ad-hoc read, a late one) is validated, but an
                    # on-grid anchor stays: the next on-grid reading still closes a whole interval.
                    if t % interval_ms == 0 or a_ts[c] % interval_ms != 0:
                        if move:
                            a_val[c] = v
                        a_ts[c] = t
                else:
                    if kind == KIND_CUMULATIVE:
                        a_val[c] = v
                    a_ts[c] = t
                    a_ok[c] = True
            out[i] = f
        start = end
    return out.astype(np.uint32), delta, anchor_ts


@_jit
def _backwards(v, prev, dt, regmax, is_energy, kmax, f, decrease_min, replaced_below, replaced_drop):
    """VEE-02/03/04 for a register lower than its anchor: (delta, flags, anchor value moves)."""
    span = regmax + 1
    wrapped = span - prev + v
    if prev * 10 >= span * 9 and (not is_energy or kmax <= 0 or wrapped <= _emax(kmax, dt)):
        return wrapped, f | F_ROLLOVER, True  # VEE-02
    if v < replaced_below and prev - v >= replaced_drop:
        return np.int64(0), f | F_METER_REPLACED, True  # VEE-03 (suspect: no consumption)
    if prev - v >= decrease_min:
        return np.int64(0), f | F_WENT_BACKWARDS, True  # VEE-04
    return np.int64(0), f, False  # VEE-04 jitter: E = 0; the anchor keeps the higher value, takes the time


# --- intervals and estimation ---------------------------------------------------------------------


@_jit
def _interval_rows(f, d, t, a, interval_ms, max_gap):
    """How many interval rows reading (flags f, delta d, ts t, anchor a) produces."""
    if a == INT64_MIN or (f & NOT_ANCHOR) != 0 or t % interval_ms != 0 or a % interval_ms != 0:
        return 0
    k = (t - a) // interval_ms
    if k == 1 or (f & NOT_BILLABLE) != 0:
        return 1
    if k - 1 <= max_gap:
        return k
    return 0  # VEE-21: longer gaps stay gaps


@_jit
def intervals(meter, ts, quantity, flags, delta, anchor_ts, selected, mult, interval_ms, max_gap):
    """VEE-01 interval consumption + VEE-20 linear interpolation of short gaps.

    For each cumulative reading on the grid whose anchor is on the grid ``k`` intervals earlier:
    k == 1 gives one row ``E = delta × multiplier``; 2 ≤ k ≤ max_gap + 1 gives k rows flagged
    ESTIMATED with ``E = (delta // k) × multiplier`` and the remainder ``delta − (k−1)·(delta // k)``
    on the last one, so the rows sum exactly to the register delta; a longer gap gives no rows.
    A reading whose delta is not billable (VEE-03/04/05) gives one row at its own time carrying
    the flag (E = 0, or the spiked delta for review). Rows come in reading order."""
    n = ts.shape[0]
    total = 0
    for i in range(n):
        if selected[quantity[i]]:
            total += _interval_rows(np.int64(flags[i]), delta[i], ts[i], anchor_ts[i], interval_ms, max_gap)
    o_meter = np.empty(total, dtype=np.uint32)
    o_q = np.empty(total, dtype=np.uint16)
    o_end = np.empty(total, dtype=np.int64)
    o_e = np.empty(total, dtype=np.int64)
    o_f = np.empty(total, dtype=np.uint32)
    r = 0
    for i in range(n):
        if not selected[quantity[i]]:
            continue
        f = np.int64(flags[i])
        k = _interval_rows(f, delta[i], ts[i], anchor_ts[i], interval_ms, max_gap)
        if k == 0:
            continue
        mu = mult[meter[i]]
        carry = f & INTERVAL_CARRY
        if k == 1:
            rows_end0 = ts[i] - interval_ms
            part = delta[i]
            est = 0
        else:
            rows_end0 = anchor_ts[i]
            part = delta[i] // k
            est = F_ESTIMATED
        for j in range(k):
            o_meter[r] = meter[i]
            o_q[r] = quantity[i]
            o_end[r] = rows_end0 + (j + 1) * interval_ms
            e = part if j < k - 1 else delta[i] - (k - 1) * part
            if (f & (F_WENT_BACKWARDS | F_METER_REPLACED)) != 0:
                e = 0
            o_e[r] = e * mu
            o_f[r] = est | (carry if j == k - 1 else (carry & F_GAP_BEFORE))
            r += 1
    return o_meter, o_q, o_end, o_e, o_f


@_jit
def group_totals(labels, ngroups, energy, flags):
    """Grouped sums over interval rows: (billable energy, n actual, n estimated, n not billable)."""
    tot = np.zeros(ngroups, dtype=np.int64)
    n_act = np.zeros(ngroups, dtype=np.int64)
    n_est = np.zeros(ngroups, dtype=np.int64)
    n_bad = np.zeros(ngroups, dtype=np.int64)
    for i in range(labels.shape[0]):
        g = labels[i]
        f = np.int64(flags[i])
        if (f & NOT_BILLABLE) != 0:
            n_bad[g] += 1
        else:
            tot[g] += energy[i]
            if (f & F_ESTIMATED) != 0:
                n_est[g] += 1
            else:
                n_act[g] += 1
    return tot, n_act, n_est, n_bad


@_jit
def group_min(labels, ngroups, values):
    """Smallest value of each group (the largest int64 for a group without rows)."""
    out = np.full(ngroups, INT64_MAX, dtype=np.int64)
    for i in range(labels.shape[0]):
        g = labels[i]
        if values[i] < out[g]:
            out[g] = values[i]
    return out


@_jit
def labels_from_order(order, keys):
    """Dense group labels of the rows of ``keys[key, row]``, given ``order``, the rows sorted
    lexicographically by key 0, then 1, ...: ``(labels, first)``, groups numbered in that order,
    ``first[g]`` the row of group g that comes first in ``order``."""
    n = order.shape[0]
    labels = np.empty(n, dtype=np.int64)
    first = np.empty(n, dtype=np.int64)
    g = -1
    for j in range(n):
        i = order[j]
        new = j == 0
        if not new:
            prev = order[j - 1]
            for key in range(keys.shape[0]):
                if keys[key, i] != keys[key, prev]:
                    new = True
                    break
        if new:
            g += 1
            first[g] = i
        labels[i] = g
    return labels, first[: g + 1].copy()


@_jit
def group_count(labels, ngroups, mask):
    """How many rows of each group have ``mask`` set."""
    out = np.zeros(ngroups, dtype=np.int64)
    for i in range(labels.shape[0]):
        if mask[i]:
            out[labels[i]] += 1
    return out


# --- time of use --------------------------------------------------------------------------------------


@_jit
def _civil_month(days):
    """Month 1..12 of a day count since 1970-01-01 (Howard Hinnant's civil_from_days)."""
    z = days + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    return mp + 3 if mp < 10 else mp - 9


@_jit
def tou_periods(
    end_ts,
    interval_ms,
    utc_offset_ms,
    version_from,
    month_season,
    day_profile,
    profiles,
    dated_days,
    dated_profile,
):
    """TOU-03: period code (1 sharp .. 4 valley) of each end-labelled interval, by its start time.

    The calendar version is the last ``version_from[v]`` at or before the start (TOU-05);
    ``month_season[v, 12]`` row of ``day_profile`` per month; ``day_profile[row, daytype]``
    profile index for daytype 0 workday, 1 weekend, 2 holiday; ``profiles[p, minute_of_day]``
    period code; ``dated_days`` sorted local day numbers whose profile is ``dated_profile[v, n]``
    (holidays, make-up workdays, per-day overrides) instead of the weekday's."""
    n = end_ts.shape[0]
    out = np.empty(n, dtype=np.uint8)
    for i in range(n):
        start = end_ts[i] - interval_ms
        v = 0
        while v + 1 < version_from.shape[0] and version_from[v + 1] <= start:
            v += 1
        local = start + utc_offset_ms
        day = local // _MS_PER_DAY
        minute = (local - day * _MS_PER_DAY) // 60_000
        h = np.searchsorted(dated_days, day)
        if h < dated_days.shape[0] and dated_days[h] == day:
            profile = dated_profile[v, h]
        else:
            weekend = 1 if (day + 3) % 7 >= 5 else 0  # 1970-01-01 was a Thursday; Monday = 0
            profile = day_profile[month_season[v, _civil_month(day) - 1], weekend]
        out[i] = profiles[profile, minute]
    return out


@_jit
def tou_split(labels, ngroups, quantity, energy, flags, period):
    """TOU-03 / VEE-15 per (meter, day) group: calendar split of the total register's intervals
    against the tariff registers' own deltas (T1..T4), and the largest total interval.

    Returns ``(calendar[ngroups, 4], registers[ngroups, 4], largest[ngroups], mismatch[ngroups, 4])``;
    a bucket mismatches when both sides have data and differ by more than the largest interval."""
    cal = np.zeros((ngroups, 4), dtype=np.int64)
    reg = np.zeros((ngroups, 4), dtype=np.int64)
    has_reg = np.zeros((ngroups, 4), dtype=np.bool_)
    has_cal = np.zeros(ngroups, dtype=np.bool_)
    big = np.zeros(ngroups, dtype=np.int64)
    for i in range(labels.shape[0]):
        if (np.int64(flags[i]) & NOT_BILLABLE) != 0:
            continue
        g = labels[i]
        q = np.int64(quantity[i])
        if q == Q_ENERGY_TOTAL:
            p = np.int64(period[i])
            if 1 <= p <= 4:
                cal[g, p - 1] += energy[i]
            has_cal[g] = True
            big[g] = max(big[g], energy[i])
        elif Q_ENERGY_TOTAL < q <= Q_ENERGY_TOTAL + 4:
            reg[g, q - Q_ENERGY_TOTAL - 1] += energy[i]
            has_reg[g, q - Q_ENERGY_TOTAL - 1] = True
    bad = np.zeros((ngroups, 4), dtype=np.bool_)
    for g in range(ngroups):
        for b in range(4):
            diff = cal[g, b] - reg[g, b]
            if has_cal[g] and has_reg[g, b] and (diff > big[g] or -diff > big[g]):
                bad[g, b] = True
    return cal, reg, big, bad


# --- line loss ----------------------------------------------------------------------------------------

LOSS_QUALIFIED, LOSS_HIGH, LOSS_NEGATIVE, LOSS_NOT_COMPUTABLE, LOSS_INCOMPLETE, LOSS_OUT_OF_SERVICE = range(6)


@_jit
def line_loss(
    labels,
    ngroups,
    is_master,
    fwd,
    fwd_ok,
    rev,
    rev_ok,
    expected_customers,
    min_complete_pct,
    high_bp,
):
    """LL-01/02 per (area, day) group over (meter, day) rows of daily energy (multiplier applied).

    supply = master fwd + Σ customer rev; sales = Σ customer fwd + master rev; loss = supply − sales;
    rate in basis points (0.01 %) = loss·10000 // supply (floor). ``min_complete_pct`` and
    ``high_bp`` are per group (the LL-02 band of the group's area type). Returns
    ``(supply, sales, loss, rate_bp, klass, customers_present)``."""
    supply = np.zeros(ngroups, dtype=np.int64)
    sales = np.zeros(ngroups, dtype=np.int64)
    master_ok = np.zeros(ngroups, dtype=np.bool_)
    present = np.zeros(ngroups, dtype=np.int64)
    for i in range(labels.shape[0]):
        g = labels[i]
        if is_master[i]:
            if fwd_ok[i]:
                master_ok[g] = True
                supply[g] += fwd[i]
            if rev_ok[i]:
                sales[g] += rev[i]
        else:
            if fwd_ok[i]:
                present[g] += 1
                sales[g] += fwd[i]
            if rev_ok[i]:
                supply[g] += rev[i]
    loss = supply - sales
    rate = np.zeros(ngroups, dtype=np.int64)
    klass = np.zeros(ngroups, dtype=np.uint8)
    for g in range(ngroups):
        exp = expected_customers[g]
        if master_ok[g] and supply[g] == 0 and sales[g] == 0:
            klass[g] = LOSS_OUT_OF_SERVICE
            continue
        if not master_ok[g] or supply[g] <= 0 or present[g] * 100 < min_complete_pct[g] * exp:
            klass[g] = LOSS_NOT_COMPUTABLE
            continue
        rate[g] = loss[g] * 10_000 // supply[g]
        if present[g] < exp:
            klass[g] = LOSS_INCOMPLETE
        elif rate[g] < 0:
            klass[g] = LOSS_NEGATIVE
        elif rate[g] > high_bp[g]:
            klass[g] = LOSS_HIGH
        else:
            klass[g] = LOSS_QUALIFIED
    return supply, sales, loss, rate, klass, present


# --- outage correlation -------------------------------------------------------------------------------


@_jit
def area_outages(order, meter, ts, m_area, m_master, area_size, window_ms, k_min, pct):
    """OUT-02: one alarm per area outage, not one per meter.

    ``order`` sorts the power-down events by (area, ts, arrival). In each area an alarm opens at
    the event where the master meter is down, or where the distinct meters down within the
    window ``[t - window_ms, t]`` reach max(k_min, ceil(pct·N_area/100)); the events of that
    window and every later event of the area attach to it (it stays open for the batch; OUT-04
    closes it). Returns ``(alarm_of_event, alarm_area, alarm_ts, alarm_events)``; events of
    meters without an area, and isolated ones (OUT-03), get -1."""
    n = order.shape[0]
    alarm_of = np.full(n, -1, dtype=np.int64)
    a_area = np.empty(n, dtype=np.int64)
    a_ts = np.empty(n, dtype=np.int64)
    a_n = np.zeros(n, dtype=np.int64)
    in_window = np.zeros(m_area.shape[0], dtype=np.int64)
    na = 0
    lo = 0
    distinct = 0
    open_alarm = -1
    cur_area = np.int64(-2)
    for j in range(n):
        i = order[j]
        area = np.int64(m_area[meter[i]])
        if area != cur_area:
            for jj in range(lo, j):  # empty the previous area's window
                in_window[meter[order[jj]]] = 0
            cur_area = area
            lo = j
            distinct = 0
            open_alarm = -1
        if area < 0:
            continue
        t = ts[i]
        while ts[order[lo]] < t - window_ms:
            old = meter[order[lo]]
            in_window[old] -= 1
            if in_window[old] == 0:
                distinct -= 1
            lo += 1
        m = meter[i]
        in_window[m] += 1
        if in_window[m] == 1:
            distinct += 1
        if open_alarm >= 0:
            alarm_of[i] = open_alarm
            a_n[open_alarm] += 1
            continue
        need = max(k_min, (pct * area_size[area] + 99) // 100)
        if m_master[m] or distinct >= need:
            open_alarm = na
            a_area[na] = area
            a_ts[na] = t
            na += 1
            for jj in range(lo, j + 1):
                alarm_of[order[jj]] = open_alarm
                a_n[open_alarm] += 1
    return alarm_of, a_area[:na].copy(), a_ts[:na].copy(), a_n[:na].copy()
