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

from protocols.flags import NOT_BILLABLE as FLAGS_NOT_BILLABLE
from protocols.flags import Flag
from protocols.quantities import ENERGY_FORWARD, VALUE_BOUND, by_name

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
F_SPIKE_REL = int(Flag.SPIKE_REL)
F_FAST_RUNNING = int(Flag.FAST_RUNNING)
F_STOPPED = int(Flag.STOPPED)
F_ZERO_LONG = int(Flag.ZERO_LONG)
F_STUCK = int(Flag.STUCK)
F_OUTAGE = int(Flag.OUTAGE)
F_EST_FLAT = int(Flag.EST_FLAT)
F_PROLONGED_EST = int(Flag.PROLONGED_EST)
F_EST_HIST = int(Flag.EST_HIST)

# A reading with one of these bits is not a register anchor: its value is not the register (or
# its time is not believable, or it was estimated upstream: VEE-22, estimates never anchor an
# estimate), so it closes no interval and is in no total.
NOT_ANCHOR = F_METER_ERROR | F_OUT_OF_RANGE | F_FUTURE_TIME | F_BEFORE_MIN_TIME | F_DUPLICATE | F_ESTIMATED
# An interval carrying one of these bits has no billable consumption (protocols.flags.NOT_BILLABLE).
NOT_BILLABLE = int(FLAGS_NOT_BILLABLE)
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
    | F_FAST_RUNNING
    | F_STOPPED
    | F_ZERO_LONG
    | F_OUTAGE
)

KIND_UNKNOWN, KIND_CUMULATIVE, KIND_INSTANT, KIND_STATE = 0, 1, 2, 3

Q_ENERGY_TOTAL = ENERGY_FORWARD
Q_VOLT_A = by_name("voltage_a").code  # a, b, c are consecutive codes
Q_CURR_A = by_name("current_a").code
Q_POWER_TOTAL = by_name("power_active_total").code
Q_PF_TOTAL = by_name("power_factor_total").code  # total, a, b, c are consecutive codes
Q_METER_CLOCK = by_name("meter_clock").code

# The validation kernel's tables and parameters: numpy record arrays (``np.recarray`` views, so
# that ``table[i].field`` reads the same with and without the JIT) read field by field, built
# by ``ingest.rules.stages`` (QUANTITY_TABLE from ``protocols.quantities``, METER_TABLE from the
# registry, PARAMS from ``ValidationParams``, whose fields have these names). A new rule adds its
# parameter here and on ValidationParams, its block of kernel code, and its reference twin.
QUANTITY_TABLE = np.dtype(
    [
        ("kind", np.int64),  # KIND_*
        ("lo", np.int64),  # the valid range, inclusive (Quantity.valid_range)
        ("hi", np.int64),
        ("regmax", np.int64),  # cumulative: the register maximum (VEE-02), else 0
        ("energy", np.bool_),  # an energy register: the meter's rating bounds its deltas (VEE-05)
        ("signed", np.bool_),  # a decrease is consumption, not a fault (VEE-04)
        ("stuck_check", np.bool_),  # VEE-19 applies
    ],
    align=True,
)
METER_TABLE = np.dtype(
    [
        ("un_dv", np.int64),  # rated phase voltage, 0.1 V; 0 = unknown (rating rules skipped)
        ("kmax", np.int64),  # VEE-05: U_n·I_max·phases in mW x (100 + spike_margin_pct)
        ("ib_ma", np.int64),  # basic current, mA
        ("phases", np.int64),
        ("izero_ma", np.int64),  # VEE-08: the current that carries zero_power_min_w at U_n
        ("regmax", np.int64),  # VEE-02: this meter's energy register maximum, 0 = the quantity's
    ],
    align=True,
)
PARAMS = np.dtype(
    [
        ("receive_ts_ms", np.int64),  # the batch's reference time (VEE-11)
        ("interval_ms", np.int64),  # VEE-13 grid and gap
        ("future_tol_ms", np.int64),  # VEE-11
        ("min_ts_ms", np.int64),  # readings earlier are BEFORE_MIN_TIME
        ("skew_tol_ms", np.int64),  # VEE-12
        ("meter_clock_utc_offset_ms", np.int64),  # VEE-12: meter_clock is meter-local time
        ("rollover_band_pct", np.int64),  # VEE-02: the anchor is within this % of the maximum
        ("replaced_below", np.int64),  # VEE-03, 0.01 kWh
        ("replaced_drop", np.int64),  # VEE-03, 0.01 kWh
        ("decrease_min", np.int64),  # VEE-04, 0.01 kWh
        ("zero_power_min_w", np.int64),  # VEE-08
        ("voltage_invalid_pct", np.int64),  # VEE-16, % of U_n
        ("phase_break_pct", np.int64),  # VEE-17, % of U_n
        ("voltage_loss_pct", np.int64),  # VEE-17, % of U_n
        ("voltage_loss_current_permille", np.int64),  # VEE-17, ‰ of I_b
        ("pf_floor", np.int64),  # VEE-18, 0.001
        ("fast_ratio_x10", np.int64),  # VEE-07: E above this many tenths of the power-implied energy
        ("fast_min", np.int64),  # VEE-07, 0.01 kWh
        ("stopped_intervals", np.int64),  # VEE-08: N
        ("zero_long_intervals", np.int64),  # VEE-09: Z
        ("stuck_readings", np.int64),  # VEE-19: N
    ],
    align=True,
)

# VEE-07 compares E with P·interval only while that product stays below this (a larger implied
# energy exceeds any register delta, so the rule cannot fire); VEE-06 ranks intervals up to
# SPIKE_REL_BOUND (10^12 kWh: beyond, no consumption to compare).
FAST_P_BOUND = 10**18
SPIKE_REL_BOUND = 10**14
# Per-reading steps of a run rule (VEE-08/09/19), see _runs.
RUN_NEUTRAL, RUN_BREAK, RUN_CONTINUE, RUN_START = 0, 1, 2, 3
# The run state a channel carries from one batch to the next (VEE-08/09/19): one int64 row per
# channel, these columns. For each run rule the run's length so far, the time of its first and
# last steps (``*_END`` INT64_MIN: nothing carried); VEE-19 also the channel's last stuck-checked
# value and whether another channel of the meter changed within the run; ``C_LAST`` the latest
# step time of the channel (a carry is only ever replaced by a later one).
C_STOP_LEN, C_STOP_BEGIN, C_STOP_END = 0, 1, 2
C_ZERO_LEN, C_ZERO_BEGIN, C_ZERO_END = 3, 4, 5
C_STUCK_LEN, C_STUCK_BEGIN, C_STUCK_END, C_STUCK_VALUE, C_STUCK_MOVED = 6, 7, 8, 9, 10
C_LAST = 11
NCARRY = 12

INT64_MIN = np.iinfo(np.int64).min
INT64_MAX = np.iinfo(np.int64).max
_MS_PER_HOUR = 3_600_000
_MS_PER_DAY = 86_400_000

_jit = numba.njit(cache=True, nogil=True)


# --- validation ------------------------------------------------------------------------------------
# Every value a rule computes with is within its quantity's valid range, hence within VALUE_BOUND
# (10^15), so no product in these kernels (x 1000 at most) can overflow int64 whatever an edge sends.


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
def _skewed_meters(meter, ts, quantity, value, flags, nmeters, p):
    """VEE-12: a meter whose clock reading differs from the read time by more than the tolerance
    (clock readings read within the time bounds, value within VALUE_BOUND)."""
    out = np.zeros(nmeters, dtype=np.bool_)
    t_hi = p.receive_ts_ms + p.future_tol_ms
    for i in range(meter.shape[0]):
        believable = p.min_ts_ms <= ts[i] <= t_hi and -VALUE_BOUND <= value[i] <= VALUE_BOUND
        if quantity[i] == Q_METER_CLOCK and (flags[i] & F_METER_ERROR) == 0 and believable:
            skew = value[i] - p.meter_clock_utc_offset_ms - ts[i]
            if skew > p.skew_tol_ms or skew < -p.skew_tol_ms:
                out[meter[i]] = True
    return out


@_jit
def validate(
    order, chan, meter, ts, quantity, value, flags, prev_value, prev_ts, has_prev, carry, qt, mt, params
):
    """One pass over the batch in ``order`` (sorted by meter, ts, quantity, arrival).

    ``qt`` is the QUANTITY_TABLE indexed by code, ``mt`` the METER_TABLE indexed by batch meter,
    ``params`` a PARAMS array of one record; ``chan`` labels (meter, quantity) channels,
    ``prev_*`` / ``has_prev`` give each channel's register before the batch and ``carry[chan,
    NCARRY]`` its run state carried from earlier batches (C_* columns). Returns
    ``(flags, delta, anchor_ts, carry_out)``: per reading (input positions) the new flags (input
    flags OR'ed with every rule that fired), the register delta since the channel's previous
    anchor (cumulative channels, rollover unwrapped; 0 when there is none or it is invalid) and
    that anchor's time (``INT64_MIN`` when there is none); per channel the run state after the
    batch (a channel without a step of a rule keeps that rule's carry).

    A carried run continues only where it is contiguous with the batch: VEE-08/09 when the
    channel's first step closes the interval starting at the carried run's end; VEE-19 when the
    channel's first stuck-checked reading follows its carried last reading within one interval
    (or its previous register is that reading). Otherwise the run restarts in this batch."""
    p = params[0]
    n = order.shape[0]
    nchan = prev_value.shape[0]
    out = flags.astype(np.int64)
    delta = np.zeros(n, dtype=np.int64)
    anchor_ts = np.full(n, INT64_MIN, dtype=np.int64)
    skewed = _skewed_meters(meter, ts, quantity, value, flags, mt.shape[0], p)
    interval_ms = p.interval_ms
    stop_step = np.zeros(n, dtype=np.int64)  # VEE-08
    zero_step = np.zeros(n, dtype=np.int64)  # VEE-09
    stuck_step = np.zeros(n, dtype=np.int64)  # VEE-19
    changed = np.zeros(n, dtype=np.bool_)  # VEE-19: a stuck-checked value differs from the last
    # Whether the channel had a step of each run rule yet, and whether its first one continued
    # the carried run.
    stop_seen = np.zeros(nchan, dtype=np.bool_)
    zero_seen = np.zeros(nchan, dtype=np.bool_)
    stuck_seen = np.zeros(nchan, dtype=np.bool_)
    stop_len0 = np.zeros(nchan, dtype=np.int64)
    zero_len0 = np.zeros(nchan, dtype=np.int64)
    stuck_len0 = np.zeros(nchan, dtype=np.int64)
    stuck_linked = np.zeros(nchan, dtype=np.bool_)
    stuck_val = np.zeros(nchan, dtype=np.int64)  # the channel's last stuck-checked value and time
    stuck_end = np.full(nchan, INT64_MIN, dtype=np.int64)
    chan_meter = np.zeros(nchan, dtype=np.int64)
    last_step = carry[:, C_LAST].copy()

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
    a_down = np.zeros(nchan, dtype=np.bool_)  # VEE-23: the meter was down at the anchor's point
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
            if (flags[i] & F_METER_ERROR) != 0 or v < qt[q].lo or v > qt[q].hi:
                continue
            if Q_VOLT_A <= q < Q_VOLT_A + 3:
                ua[q - Q_VOLT_A] = v
            elif Q_CURR_A <= q < Q_CURR_A + 3:
                ia[q - Q_CURR_A] = v if v >= 0 else -v
            elif q == Q_POWER_TOTAL:
                p_abs = v if v >= 0 else -v
        i_max_abs = max(ia[0], max(ia[1], ia[2]))
        mr = mt[m]
        un = mr.un_dv
        # VEE-23 (OUT-01): every phase voltage the point reports is below phase_break_pct of U_n.
        down = un > 0 and max(ua[0], max(ua[1], ua[2])) >= 0
        for y in range(3):
            if ua[y] * 100 >= p.phase_break_pct * un:
                down = False
        for j in range(start, end):
            i = order[j]
            c = chan[i]
            q = np.int64(quantity[i])
            qr = qt[q]
            v = value[i]
            f = out[i]
            if skewed[m]:
                f |= F_CLOCK_SKEW
            if t > p.receive_ts_ms + p.future_tol_ms:  # VEE-11
                f |= F_FUTURE_TIME
            if t < p.min_ts_ms:  # the lower time bound (epoch 0, an unset clock)
                f |= F_BEFORE_MIN_TIME
            if down:
                f |= F_OUTAGE  # VEE-23
            kind = qr.kind
            in_table = qr.lo <= v <= qr.hi  # the rules below compute with in-range values only
            hi = qr.hi
            if Q_VOLT_A <= q < Q_VOLT_A + 3 and un > 0:
                hi = min(hi, un * p.voltage_invalid_pct // 100)  # VEE-16: invalid above 1.5 U_n
            if kind == KIND_UNKNOWN or v < qr.lo or v > hi:
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
                if pf > 1000 or (pf < p.pf_floor and p_abs > 0):
                    f |= F_PF_OUT_OF_BOUNDS
            if (
                Q_VOLT_A <= q < Q_VOLT_A + 3
                and mr.phases == 3
                and un > 0
                and (f & F_METER_ERROR) == 0
                and in_table
            ):
                x = q - Q_VOLT_A
                collapsed = v * 100 < p.phase_break_pct * un or (
                    v * 100 < p.voltage_loss_pct * un
                    and ia[x] * 1000 > p.voltage_loss_current_permille * mr.ib_ma
                )
                other_ok = False
                for y in range(3):
                    if y != x and ua[y] >= 0 and ua[y] * 100 >= p.phase_break_pct * un:
                        other_ok = True
                if collapsed and other_ok:  # VEE-17 断相 / 失压
                    f |= F_PHASE_LOSS
            if (f & NOT_ANCHOR) == 0 and (not a_ok[c] or t > a_ts[c]):
                if kind == KIND_CUMULATIVE and a_ok[c]:
                    dt = t - a_ts[c]
                    d = v - a_val[c]
                    anchor_ts[i] = a_ts[c]
                    move = True
                    if d < 0 and not qr.signed:
                        regmax = mr.regmax if qr.energy and mr.regmax > 0 else qr.regmax
                        d, f, move = _backwards(v, a_val[c], dt, regmax, qr.energy, mr.kmax, f, p)
                    elif qr.energy and mr.kmax > 0 and d > _emax(mr.kmax, dt):
                        f |= F_SPIKE  # VEE-05
                    current = p_abs >= p.zero_power_min_w * 10 or (
                        mr.izero_ma > 0 and i_max_abs >= mr.izero_ma
                    )
                    if (
                        q == Q_ENERGY_TOTAL
                        and d == 0
                        and current
                        and (f & (F_WENT_BACKWARDS | F_METER_REPLACED)) == 0
                    ):
                        f |= F_ZERO_WITH_CURRENT  # VEE-08, one interval
                    if a_down[c]:
                        f |= F_OUTAGE  # VEE-23: the interval starts where the meter was down
                    if q == Q_ENERGY_TOTAL and t % interval_ms == 0:
                        one = dt == interval_ms and a_ts[c] % interval_ms == 0
                        fault = (f & (F_WENT_BACKWARDS | F_METER_REPLACED)) != 0
                        stopped = one and (f & F_ZERO_WITH_CURRENT) != 0
                        stop_step[i] = RUN_CONTINUE if stopped else RUN_BREAK
                        zero = one and d == 0 and not fault and (f & F_OUTAGE) == 0
                        zero_step[i] = RUN_CONTINUE if zero else RUN_BREAK
                        # A carried run continues when this first step closes the interval
                        # that starts where the carried run ended.
                        if not stop_seen[c]:
                            stop_seen[c] = True
                            if stopped and carry[c, C_STOP_END] == a_ts[c]:
                                stop_len0[c] = carry[c, C_STOP_LEN]
                        if not zero_seen[c]:
                            zero_seen[c] = True
                            if zero and carry[c, C_ZERO_END] == a_ts[c]:
                                zero_len0[c] = carry[c, C_ZERO_LEN]
                        last_step[c] = max(last_step[c], t)
                        if one and 0 <= p_abs <= FAST_P_BOUND // interval_ms and d >= p.fast_min:
                            implied = p_abs * interval_ms // 360_000_000  # 0.1 W x ms -> 0.01 kWh
                            if d * 10 > p.fast_ratio_x10 * implied:
                                f |= F_FAST_RUNNING  # VEE-07
                    delta[i] = d
                    # VEE-13: an off-grid reading (an ad-hoc read, a late one) is validated, but an
                    # on-grid anchor stays: the next on-grid reading still closes a whole interval.
                    if t % interval_ms == 0 or a_ts[c] % interval_ms != 0:
                        if move:
                            a_val[c] = v
                        a_ts[c] = t
                        a_down[c] = down
                else:
                    if kind == KIND_CUMULATIVE:
                        a_val[c] = v
                    elif qr.stuck_check:  # VEE-19: runs of one exact non-zero value
                        known = a_ok[c]
                        last_v = a_val[c]
                        if not stuck_seen[c]:
                            stuck_seen[c] = True
                            c_end = carry[c, C_STUCK_END]
                            if c_end != INT64_MIN and (
                                a_ts[c] == c_end if known else 0 < t - c_end <= interval_ms
                            ):
                                stuck_linked[c] = True
                                stuck_len0[c] = carry[c, C_STUCK_LEN]
                                if not known:  # the carried reading is the one before this
                                    known = True
                                    last_v = carry[c, C_STUCK_VALUE]
                        same = known and v == last_v
                        stuck_step[i] = RUN_BREAK if v == 0 else (RUN_CONTINUE if same else RUN_START)
                        changed[i] = known and not same
                        stuck_val[c] = v
                        stuck_end[c] = t
                        chan_meter[c] = meter[i]
                        last_step[c] = max(last_step[c], t)
                        a_val[c] = v
                    a_ts[c] = t
                    a_ok[c] = True
                    a_down[c] = down
            out[i] = f
        start = end

    carry_out = carry.copy()
    carry_out[:, C_LAST] = last_step
    stopped_run, _, _, s_len, s_begin, s_end = _runs(
        order, chan, nchan, ts, stop_step, p.stopped_intervals, stop_len0, carry[:, C_STOP_BEGIN]
    )
    zero_run, _, _, z_len, z_begin, z_end = _runs(
        order, chan, nchan, ts, zero_step, p.zero_long_intervals, zero_len0, carry[:, C_ZERO_BEGIN]
    )
    stuck_run, run_first, run_last, u_len, u_begin, _ = _runs(
        order, chan, nchan, ts, stuck_step, p.stuck_readings, stuck_len0, carry[:, C_STUCK_BEGIN]
    )
    for c in range(nchan):
        if stop_seen[c]:
            carry_out[c, C_STOP_LEN], carry_out[c, C_STOP_BEGIN], carry_out[c, C_STOP_END] = (
                s_len[c],
                s_begin[c],
                s_end[c],
            )
        if zero_seen[c]:
            carry_out[c, C_ZERO_LEN], carry_out[c, C_ZERO_BEGIN], carry_out[c, C_ZERO_END] = (
                z_len[c],
                z_begin[c],
                z_end[c],
            )
        if stuck_seen[c]:
            carry_out[c, C_STUCK_LEN], carry_out[c, C_STUCK_BEGIN] = u_len[c], u_begin[c]
    nchg = 0
    for i in range(n):
        nchg += changed[i]
    chg_meter = np.empty(nchg, dtype=np.int64)  # the changes in (meter, ts) order
    chg_ts = np.empty(nchg, dtype=np.int64)
    r = 0
    for j in range(n):
        i = order[j]
        if changed[i]:
            chg_meter[r] = meter[i]
            chg_ts[r] = ts[i]
            r += 1
    for i in range(n):
        if stopped_run[i]:
            out[i] |= F_STOPPED  # VEE-08, N intervals
        if zero_run[i]:
            out[i] |= F_ZERO_LONG  # VEE-09
        if stuck_run[i]:
            mi = np.int64(meter[i])
            c = chan[i]
            # VEE-19: only while another channel of the meter changes within the run (in this
            # batch, or in the earlier batches of a carried run).
            later = _changes_upto(chg_meter, chg_ts, mi, run_last[i])
            carried = stuck_len0[c] > 0 and run_first[i] == carry[c, C_STUCK_BEGIN]
            if later > _changes_upto(chg_meter, chg_ts, mi, run_first[i]) or (
                carried and carry[c, C_STUCK_MOVED] != 0
            ):
                out[i] |= F_STUCK
    for c in range(nchan):
        if stuck_seen[c]:
            carry_out[c, C_STUCK_END] = stuck_end[c]  # the last reading, for the next link
            carry_out[c, C_STUCK_VALUE] = stuck_val[c]
            moved = 0
            if carry_out[c, C_STUCK_LEN] > 0:
                mc = chan_meter[c]
                begin = carry_out[c, C_STUCK_BEGIN]
                carried = stuck_len0[c] > 0 and begin == carry[c, C_STUCK_BEGIN]
                after = _changes_upto(chg_meter, chg_ts, mc, INT64_MAX)
                if after > _changes_upto(chg_meter, chg_ts, mc, begin):
                    moved = 1
                elif carried:
                    moved = carry[c, C_STUCK_MOVED]
            carry_out[c, C_STUCK_MOVED] = moved
    return out.astype(np.uint32), delta, anchor_ts, carry_out


@_jit
def _runs(order, chan, nchan, ts, step, min_len, len0, begin0):
    """Per-channel runs in ``order``: ``step`` per reading is RUN_BREAK (ends a run, not in one),
    RUN_START (begins a new run), RUN_CONTINUE (joins the current run, or begins one) or
    RUN_NEUTRAL (neither). A channel's first run continues a carried one of ``len0`` readings
    begun at ``begin0`` (``len0`` 0: none). Returns ``(in_run, first_ts, last_ts, length, begin,
    end)``: readings of runs of at least ``min_len`` readings and the times of their run's first
    and last readings; per channel its last run's length, first and last step times (0, 0,
    INT64_MIN when the channel ended outside a run)."""
    n = order.shape[0]
    length = len0.copy()
    begin = begin0.copy()
    end = np.full(nchan, INT64_MIN, dtype=np.int64)
    at = np.zeros(n, dtype=np.int64)
    first = np.zeros(n, dtype=np.int64)
    for j in range(n):
        i = order[j]
        c = chan[i]
        s = step[i]
        if s == RUN_BREAK:
            length[c] = 0
        elif s == RUN_START or (s == RUN_CONTINUE and length[c] == 0):
            length[c] = 1
            begin[c] = ts[i]
        elif s == RUN_CONTINUE:
            length[c] += 1
        if s != RUN_NEUTRAL:
            end[c] = ts[i] if length[c] > 0 else INT64_MIN
        at[i] = length[c]
        first[i] = begin[c]
    for c in range(nchan):
        if length[c] == 0:
            begin[c] = 0
    total = np.zeros(nchan, dtype=np.int64)
    end_ts = np.zeros(nchan, dtype=np.int64)
    last = np.zeros(n, dtype=np.int64)
    in_run = np.zeros(n, dtype=np.bool_)
    for j in range(n - 1, -1, -1):
        i = order[j]
        c = chan[i]
        s = step[i]
        if s == RUN_BREAK:
            total[c] = 0
        elif s != RUN_NEUTRAL:
            if total[c] == 0:
                total[c] = at[i]
                end_ts[c] = ts[i]
            in_run[i] = total[c] >= min_len
            last[i] = end_ts[c]
            if at[i] == 1:
                total[c] = 0  # the run's first reading: an earlier one belongs to another run
    return in_run, first, last, length, begin, end


@_jit
def _changes_upto(chg_meter, chg_ts, m, t):
    """How many changes sort at or before (meter m, time t); the changes are in (meter, ts) order."""
    lo = 0
    hi = chg_meter.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if chg_meter[mid] < m or (chg_meter[mid] == m and chg_ts[mid] <= t):
            lo = mid + 1
        else:
            hi = mid
    return lo


@_jit
def _backwards(v, prev, dt, regmax, is_energy, kmax, f, p):
    """VEE-02/03/04 for a register lower than its anchor: (delta, flags, anchor value moves)."""
    span = regmax + 1
    wrapped = span - prev + v
    near_max = prev * 100 >= span * p.rollover_band_pct
    if near_max and (not is_energy or kmax <= 0 or wrapped <= _emax(kmax, dt)):
        return wrapped, f | F_ROLLOVER, True  # VEE-02
    if v < p.replaced_below and prev - v >= p.replaced_drop:
        return np.int64(0), f | F_METER_REPLACED, True  # VEE-03 (suspect: no consumption)
    if prev - v >= p.decrease_min:
        return np.int64(0), f | F_WENT_BACKWARDS, True  # VEE-04
    return np.int64(0), f, False  # VEE-04 jitter: E = 0; the anchor keeps the higher value, takes the time


# --- intervals and estimation ---------------------------------------------------------------------


@_jit
def _interval_rows(f, d, t, a, interval_ms, max_gap):
    """How many interval rows reading (flags f, delta d, ts t, anchor a) produces; ``max_gap``
    is the longest gap (intervals missing) that gets rows."""
    if a == INT64_MIN or (f & NOT_ANCHOR) != 0 or t % interval_ms != 0 or a % interval_ms != 0:
        return 0
    k = (t - a) // interval_ms
    if k == 1 or (f & NOT_BILLABLE) != 0:
        return 1
    if k - 1 <= max_gap:
        return k
    return 0  # longer gaps stay gaps


@_jit
def intervals(
    meter, ts, quantity, flags, delta, anchor_ts, selected, mult, interval_ms, max_gap, flat_max, prolonged_ms
):
    """VEE-01 interval consumption, VEE-20 linear interpolation of short gaps, VEE-21 flat
    estimation of longer ones, VEE-22 prolonged estimation, VEE-23 outages.

    For each cumulative reading on the grid whose anchor is on the grid ``k`` intervals earlier:
    k == 1 gives one row ``E = delta × multiplier``; 2 ≤ k ≤ max_gap + 1 gives k rows flagged
    ESTIMATED with ``E = (delta // k) × multiplier`` and the remainder ``delta − (k−1)·(delta // k)``
    on the last one, so the rows sum exactly to the register delta; max_gap + 1 < k ≤ flat_max + 1
    gives the same rows flagged ESTIMATED | EST_FLAT (VEE-21 without like days); a longer gap
    gives no rows. An estimated row ending more than ``prolonged_ms`` after the anchor (the last
    actual reading) is also PROLONGED_EST. A gap whose reading carries OUTAGE is not estimated:
    E = 0 rows flagged OUTAGE and the whole delta on the closing row. A reading whose delta is not
    billable (VEE-03/04/05/07/08) gives one row at its own time carrying the flag (E = 0, or the
    delta for review). Rows come in reading order."""
    n = ts.shape[0]
    longest = max(max_gap, flat_max)
    total = 0
    for i in range(n):
        if selected[quantity[i]]:
            total += _interval_rows(np.int64(flags[i]), delta[i], ts[i], anchor_ts[i], interval_ms, longest)
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
        k = _interval_rows(f, delta[i], ts[i], anchor_ts[i], interval_ms, longest)
        if k == 0:
            continue
        mu = mult[meter[i]]
        carry = f & INTERVAL_CARRY
        if k == 1:
            rows_end0 = ts[i] - interval_ms
            part = delta[i]
            est = 0
        elif (f & F_OUTAGE) != 0:  # VEE-23: not estimated; the delta stays on the closing row
            rows_end0 = anchor_ts[i]
            part = 0
            est = 0
        else:
            rows_end0 = anchor_ts[i]
            part = delta[i] // k
            est = F_ESTIMATED | (F_EST_FLAT if k - 1 > max_gap else 0)
        for j in range(k):
            o_meter[r] = meter[i]
            o_q[r] = quantity[i]
            o_end[r] = rows_end0 + (j + 1) * interval_ms
            e = part if j < k - 1 else delta[i] - (k - 1) * part
            if (f & (F_WENT_BACKWARDS | F_METER_REPLACED)) != 0:
                e = 0
            o_e[r] = e * mu
            o_f[r] = est | (carry if j == k - 1 else (carry & (F_GAP_BEFORE | F_OUTAGE)))
            if est != 0 and o_end[r] - anchor_ts[i] > prolonged_ms:
                o_f[r] |= F_PROLONGED_EST  # VEE-22
            r += 1
    return o_meter, o_q, o_end, o_e, o_f


# A like-day interval with one of these bits is no reference (VEE-21/22: estimates, outages and
# unbillable intervals never shape an estimate).
NOT_LIKE_DAY = F_ESTIMATED | F_OUTAGE | NOT_BILLABLE


@_jit
def _find_row(ref_meter, ref_q, ref_end, m, q, end):
    """Row of (m, q, end) in the reference rows sorted by (meter, quantity, end); -1 if absent."""
    lo = 0
    hi = ref_end.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        rm = np.int64(ref_meter[mid])
        rq = np.int64(ref_q[mid])
        if rm < m or (rm == m and (rq < q or (rq == q and ref_end[mid] < end))):
            lo = mid + 1
        else:
            hi = mid
    if lo < ref_end.shape[0] and ref_meter[lo] == m and ref_q[lo] == q and ref_end[lo] == end:
        return lo
    return -1


@_jit
def like_day_spread(
    meter, ts, quantity, flags, delta, anchor_ts, selected, interval_ms, longest, energy, row_flags,
    ref_meter, ref_q, ref_end, ref_e, ref_f, week_ms, weeks, like_days,
):  # fmt: skip
    """VEE-21 like-day estimation over the rows :func:`intervals` made from the same readings
    (``energy``/``row_flags``, ``longest`` = max(max_gap, flat_max)): returns their new energies
    and flags.

    Each flat gap (rows flagged EST_FLAT; one reading's rows) of total T is re-spread by the
    shape of its like days: the same slots ``w`` weeks earlier, w = 1..``weeks``, nearest first,
    the first ``like_days`` whose every slot is among the reference rows (sorted by meter,
    quantity, end) with energy >= 0 and none of NOT_LIKE_DAY. With s_j the sum of those days'
    slot j and S = Σ s_j: E_j = T·s_j // S, the last row T − Σ the others (exact sum), and
    EST_FLAT becomes EST_HIST. A gap without a like day, with S = 0 or with T·S beyond int64
    stays flat."""
    out_e = energy.copy()
    out_f = row_flags.copy()
    r = 0
    for i in range(ts.shape[0]):
        if not selected[quantity[i]]:
            continue
        k = _interval_rows(np.int64(flags[i]), delta[i], ts[i], anchor_ts[i], interval_ms, longest)
        r0 = r
        r += k
        if k < 2 or (np.int64(row_flags[r0]) & F_EST_FLAT) == 0:
            continue
        m = np.int64(meter[i])
        q = np.int64(quantity[i])
        total = np.int64(0)
        for j in range(k):
            total += energy[r0 + j]
        shape = np.zeros(k, dtype=np.int64)
        found = 0
        for w in range(1, weeks + 1):
            if found == like_days:
                break
            ok = True
            start = anchor_ts[i] - w * week_ms
            for j in range(k):
                x = _find_row(ref_meter, ref_q, ref_end, m, q, start + (j + 1) * interval_ms)
                if x < 0 or ref_e[x] < 0 or (np.int64(ref_f[x]) & NOT_LIKE_DAY) != 0:
                    ok = False
                    break
            if not ok:
                continue
            found += 1
            for j in range(k):
                x = _find_row(ref_meter, ref_q, ref_end, m, q, start + (j + 1) * interval_ms)
                shape[j] += ref_e[x]
        s = np.int64(0)
        for j in range(k):
            s += shape[j]
        if found == 0 or s <= 0 or total < 0 or (total > 0 and s > INT64_MAX // total):
            continue
        done = np.int64(0)
        for j in range(k - 1):
            e = total * shape[j] // s
            out_e[r0 + j] = e
            done += e
        out_e[r0 + k - 1] = total - done
        for j in range(k):
            out_f[r0 + j] = (np.int64(row_flags[r0 + j]) & ~F_EST_FLAT) | F_EST_HIST
    return out_e, out_f


@_jit
def relative_spikes(labels, ngroups, energy, flags, floor, tol_pct):
    """VEE-06 per group of interval rows (a meter's channel over one 24-hour block): with max1 the
    highest and max3 the third-highest energy of the group's actual, billable rows (not
    ESTIMATED, OUTAGE or NOT_BILLABLE; 0 .. SPIKE_REL_BOUND), flag SPIKE_REL on the first max1
    row when max3 >= ``floor`` and (max1 − max3)·100 > ``tol_pct``·max3. Returns new flags."""
    t1 = np.full(ngroups, INT64_MIN, dtype=np.int64)
    t2 = np.full(ngroups, INT64_MIN, dtype=np.int64)
    t3 = np.full(ngroups, INT64_MIN, dtype=np.int64)
    top = np.full(ngroups, -1, dtype=np.int64)
    count = np.zeros(ngroups, dtype=np.int64)
    for i in range(labels.shape[0]):
        e = energy[i]
        if (
            (np.int64(flags[i]) & (NOT_BILLABLE | F_ESTIMATED | F_OUTAGE)) != 0
            or e < 0
            or e > SPIKE_REL_BOUND
        ):
            continue
        g = labels[i]
        count[g] += 1
        if e > t1[g]:
            t3[g] = t2[g]
            t2[g] = t1[g]
            t1[g] = e
            top[g] = i
        elif e > t2[g]:
            t3[g] = t2[g]
            t2[g] = e
        elif e > t3[g]:
            t3[g] = e
    out = flags.astype(np.uint32)
    for g in range(ngroups):
        if count[g] >= 3 and t3[g] >= floor and (t1[g] - t3[g]) * 100 > tol_pct * t3[g]:
            out[top[g]] = out[top[g]] | np.uint32(F_SPIKE_REL)
    return out


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
