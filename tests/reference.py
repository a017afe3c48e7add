"""Obviously-correct pure-Python versions of every ingest kernel (STYLE H7), and a strict parser.

No cleverness: dicts, sorted(), Python's unbounded ints, ``datetime`` for calendar arithmetic,
quadratic scans where the kernel slides a window. Tests assert ``kernel(batch) == reference(batch)``
exactly, and the benchmark uses these as the baseline. Rule IDs: docs/rules.md.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

import numpy as np

from ingest.rules import kernels as k
from protocols.quantities import VALUE_BOUND

EPOCH = dt.datetime(1970, 1, 1)
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _l(a: Any) -> list[int]:
    return [int(x) for x in a]


# --- validation (VEE-02..05, 07..13, 16..19, 22, 23) -----------------------------------------------------


def emax(k_mw_pct: int, dt_ms: int) -> int:
    """VEE-05 in 0.01 kWh: mW·% x ms / (100 % x 1000 mW/W x 3.6e6 ms/h x 10 Wh/unit)."""
    return k_mw_pct * dt_ms // 3_600_000_000_000


def validate(
    order, chan, meter, ts, quantity, value, flags, prev_value, prev_ts, has_prev, carry, qt, mt, params
):
    p = {name: int(params[0][name]) for name in params.dtype.names}
    receive, future_tol, min_ts, interval = (
        p["receive_ts_ms"],
        p["future_tol_ms"],
        p["min_ts_ms"],
        p["interval_ms"],
    )
    q_lo, q_hi, q_kind, q_signed, q_energy, q_regmax, q_stuck = (
        qt[name] for name in ("lo", "hi", "kind", "signed", "energy", "regmax", "stuck_check")
    )
    m_un, m_kmax, m_ib, m_phases, m_izero, m_regmax = (
        mt[name] for name in ("un_dv", "kmax", "ib_ma", "phases", "izero_ma", "regmax")
    )
    n = len(meter)
    meter, ts, quantity, value, flags, chan = map(_l, (meter, ts, quantity, value, flags, chan))
    out = list(flags)
    delta = [0] * n
    anchor_ts = [INT64_MIN] * n
    prev = {c: (int(prev_value[c]), int(prev_ts[c])) for c in range(len(prev_value)) if has_prev[c]}

    skewed = set()
    for i in range(n):
        believable = min_ts <= ts[i] <= receive + future_tol and abs(value[i]) <= VALUE_BOUND
        is_clock = quantity[i] == k.Q_METER_CLOCK and not flags[i] & k.F_METER_ERROR and believable
        if is_clock and abs(value[i] - p["meter_clock_utc_offset_ms"] - ts[i]) > p["skew_tol_ms"]:
            skewed.add(meter[i])

    newest = {c: t for c, (_, t) in prev.items()}
    for i in range(n):  # arrival order
        c = chan[i]
        if c in newest and ts[i] < newest[c]:
            out[i] |= k.F_OUT_OF_ORDER
        newest[c] = max(newest.get(c, ts[i]), ts[i])

    in_order = sorted(range(n), key=lambda i: (meter[i], ts[i], quantity[i], i))
    assert in_order == _l(order)
    point: dict[tuple[int, int], dict[int, int]] = defaultdict(dict)
    in_table = [int(q_lo[quantity[i]]) <= value[i] <= int(q_hi[quantity[i]]) for i in range(n)]
    for i in in_order:
        if not flags[i] & k.F_METER_ERROR and in_table[i]:
            point[(meter[i], ts[i])][quantity[i]] = value[i]

    # chan -> (value, ts, the meter was down there); value unused for non-cumulative non-stuck-checked
    anchor = {c: (v, t, False) for c, (v, t) in prev.items()}
    last_seen = {c: t for c, (_, t) in prev.items()}
    stopped, zeros, stuck = defaultdict(list), defaultdict(list), defaultdict(list)  # chan -> [(i, step)]
    changes = []  # (meter, ts) where a stuck-checked value changed (VEE-19)
    cin = [[int(x) for x in row] for row in carry]
    linked = {"stop": {}, "zero": {}, "stuck": {}}  # chan -> the carried run continues (first step)
    last_stuck = {}  # chan -> (value, ts, meter) of its last stuck-checked reading
    last_step = {}  # chan -> latest step time
    for i in in_order:
        c, m, t, q, v, f = chan[i], meter[i], ts[i], quantity[i], value[i], out[i]
        pt = point[(m, t)]
        volts = [pt.get(k.Q_VOLT_A + x) for x in range(3)]
        amps = [abs(pt[k.Q_CURR_A + x]) if k.Q_CURR_A + x in pt else None for x in range(3)]
        power = abs(pt[k.Q_POWER_TOTAL]) if k.Q_POWER_TOTAL in pt else None
        un = int(m_un[m])
        reported = [u for u in volts if u is not None]
        down = un > 0 and bool(reported) and all(100 * u < p["phase_break_pct"] * un for u in reported)
        if down:
            f |= k.F_OUTAGE
        if m in skewed:
            f |= k.F_CLOCK_SKEW
        if t > receive + future_tol:
            f |= k.F_FUTURE_TIME
        if t < min_ts:
            f |= k.F_BEFORE_MIN_TIME
        hi = int(q_hi[q])
        if q in (30, 31, 32) and m_un[m] > 0:
            hi = min(hi, int(m_un[m]) * p["voltage_invalid_pct"] // 100)
        if q_kind[q] == k.KIND_UNKNOWN or not int(q_lo[q]) <= v <= hi:
            f |= k.F_OUT_OF_RANGE
        if last_seen.get(c) == t:
            f |= k.F_DUPLICATE
        last_seen[c] = t
        if not f & k.F_DUPLICATE and c in anchor and t - anchor[c][1] > interval:
            f |= k.F_GAP_BEFORE
        bad_pf = abs(v) > 1000 or (abs(v) < p["pf_floor"] and power is not None and power > 0)
        if q in (52, 53, 54, 55) and not f & k.F_METER_ERROR and in_table[i] and bad_pf:
            f |= k.F_PF_OUT_OF_BOUNDS
        if q in (30, 31, 32) and m_phases[m] == 3 and m_un[m] > 0 and not f & k.F_METER_ERROR and in_table[i]:
            x, un = q - 30, int(m_un[m])
            cur = amps[x]
            brk, loss = p["phase_break_pct"], p["voltage_loss_pct"]
            collapsed = 100 * v < brk * un or (
                100 * v < loss * un
                and cur is not None
                and 1000 * cur > p["voltage_loss_current_permille"] * int(m_ib[m])
            )
            others = any(volts[y] is not None and 100 * volts[y] >= brk * un for y in range(3) if y != x)
            if collapsed and others:
                f |= k.F_PHASE_LOSS
        if not f & k.NOT_ANCHOR and (c not in anchor or t > anchor[c][1]):
            if q_kind[q] == k.KIND_CUMULATIVE and c in anchor:
                a_v, a_t, a_down = anchor[c]
                d, gap = v - a_v, t - a_t
                anchor_ts[i] = a_t
                moves = True
                kmax = int(m_kmax[m])
                if d < 0 and not q_signed[q]:
                    per_meter = int(m_regmax[m]) if q_energy[q] else 0  # VEE-02: digits per meter
                    span = (per_meter or int(q_regmax[q])) + 1
                    wrapped = span - a_v + v
                    near_max = 100 * a_v >= p["rollover_band_pct"] * span
                    if near_max and (not q_energy[q] or kmax <= 0 or wrapped <= emax(kmax, gap)):
                        d, f = wrapped, f | k.F_ROLLOVER
                    elif v < p["replaced_below"] and a_v - v >= p["replaced_drop"]:
                        d, f = 0, f | k.F_METER_REPLACED
                    elif a_v - v >= p["decrease_min"]:
                        d, f = 0, f | k.F_WENT_BACKWARDS
                    else:
                        d, moves = 0, False
                elif q_energy[q] and kmax > 0 and d > emax(kmax, gap):
                    f |= k.F_SPIKE
                if q == 1 and d == 0 and not f & (k.F_WENT_BACKWARDS | k.F_METER_REPLACED):
                    biggest = max([a for a in amps if a is not None], default=-1)
                    p_min = 10 * p["zero_power_min_w"]
                    if (power is not None and power >= p_min) or (m_izero[m] > 0 and biggest >= m_izero[m]):
                        f |= k.F_ZERO_WITH_CURRENT
                if a_down:
                    f |= k.F_OUTAGE
                if q == 1 and t % interval == 0:
                    one = gap == interval and a_t % interval == 0
                    fault = f & (k.F_WENT_BACKWARDS | k.F_METER_REPLACED)
                    stop = one and bool(f & k.F_ZERO_WITH_CURRENT)
                    stopped[c].append((i, "continue" if stop else "break"))
                    zero = one and d == 0 and not fault and not f & k.F_OUTAGE
                    zeros[c].append((i, "continue" if zero else "break"))
                    # The carried run continues when the first step's interval starts at its end.
                    linked["stop"].setdefault(c, stop and cin[c][k.C_STOP_END] == a_t)
                    linked["zero"].setdefault(c, zero and cin[c][k.C_ZERO_END] == a_t)
                    last_step[c] = max(last_step.get(c, t), t)
                    if one and power is not None and power * interval <= 10**18 and d >= p["fast_min"]:
                        implied = power * interval // 360_000_000  # 0.1 W x ms in 0.01 kWh
                        if 10 * d > p["fast_ratio_x10"] * implied:
                            f |= k.F_FAST_RUNNING
                delta[i] = d
                if t % interval == 0 or a_t % interval != 0:  # off-grid readings keep an on-grid anchor
                    anchor[c] = (v if moves else a_v, t, down)
            else:
                if q_kind[q] != k.KIND_CUMULATIVE and q_stuck[q]:
                    before = anchor.get(c)
                    if c not in linked["stuck"]:
                        c_end = cin[c][k.C_STUCK_END]
                        if before is not None:
                            linked["stuck"][c] = c_end != INT64_MIN and before[1] == c_end
                        else:
                            linked["stuck"][c] = c_end != INT64_MIN and 0 < t - c_end <= interval
                            if linked["stuck"][c]:
                                before = (cin[c][k.C_STUCK_VALUE], c_end, False)
                    same = before is not None and before[0] == v
                    stuck[c].append((i, "break" if v == 0 else ("continue" if same else "start")))
                    if before is not None and not same:
                        changes.append((m, t))
                    last_stuck[c] = (v, t, m)
                    last_step[c] = max(last_step.get(c, t), t)
                anchor[c] = (v, t, down)
        out[i] = f
    cout = [list(row) for row in cin]
    for c, t in last_step.items():
        cout[c][k.C_LAST] = max(cout[c][k.C_LAST], t)
    for runs, n_min, flag, rule, col in (
        (stopped, p["stopped_intervals"], k.F_STOPPED, "stop", k.C_STOP_LEN),
        (zeros, p["zero_long_intervals"], k.F_ZERO_LONG, "zero", k.C_ZERO_LEN),
    ):
        for c, events in runs.items():
            carried = cin[c][col] if linked[rule][c] else 0
            all_runs = _runs(events, carried)
            for run, extra in all_runs:
                if len(run) + extra >= n_min:
                    for i in run:
                        out[i] |= flag
            cout[c][col : col + 3] = _run_state(all_runs, cin[c][col + 1], ts)
    for c, events in stuck.items():
        carried = cin[c][k.C_STUCK_LEN] if linked["stuck"][c] else 0
        c_moved = bool(cin[c][k.C_STUCK_MOVED])
        all_runs = _runs(events, carried)
        for run, extra in all_runs:
            if run and len(run) + extra >= p["stuck_readings"]:
                m, last = meter[run[0]], ts[run[-1]]
                first = cin[c][k.C_STUCK_BEGIN] if extra else ts[run[0]]
                if any(cm == m and first < ct <= last for cm, ct in changes) or (extra and c_moved):
                    for i in run:
                        out[i] |= k.F_STUCK
        length, begin, _ = _run_state(all_runs, cin[c][k.C_STUCK_BEGIN], ts)
        value, end, m = last_stuck[c]
        moved = 0
        if length:
            extra = all_runs[-1][1]
            moved = int(any(cm == m and ct > begin for cm, ct in changes) or (bool(extra) and c_moved))
        cout[c][k.C_STUCK_LEN : k.C_STUCK_MOVED + 1] = [length, begin, end, value, moved]
    carry_out = np.array(cout, np.int64).reshape(len(cin), k.NCARRY)
    return np.array(out, np.uint32), np.array(delta, np.int64), np.array(anchor_ts, np.int64), carry_out


def _runs(events, carried):
    """A channel's ``(reading, step)`` events cut into runs: a "break" ends a run, a "start"
    begins a new one, a "continue" joins the current one. Returns ``[(readings, extra)]`` in
    order, ``extra`` the carried run's length for the first run when its first step continues it
    (``carried``), else 0; the last entry is the run the channel ends in (empty: none)."""
    runs, current, extra = [], [], carried
    for i, step in events:
        if step in ("break", "start"):
            runs.append((current, extra))
            current, extra = [], 0
        if step != "break":
            current.append(i)
    runs.append((current, extra))
    return runs


def _run_state(runs, carried_begin, ts):
    """``[length, first time, last time]`` of the run the channel ends in; [0, 0, INT64_MIN] if none."""
    run, extra = runs[-1]
    if not run:  # ended by a break (a channel in ``runs`` has a step, so extra alone is never last)
        return [0, 0, INT64_MIN]
    return [len(run) + extra, carried_begin if extra else ts[run[0]], ts[run[-1]]]


# --- intervals and estimation (VEE-01, VEE-20, VEE-21) -----------------------------------------------


def intervals(
    meter, ts, quantity, flags, delta, anchor_ts, selected, mult, interval, max_gap, flat_max, prolonged
):
    rows = []
    for i in range(len(ts)):
        q, f, d, t, a, m = (
            int(quantity[i]),
            int(flags[i]),
            int(delta[i]),
            int(ts[i]),
            int(anchor_ts[i]),
            int(meter[i]),
        )
        if not selected[q] or a == INT64_MIN or f & k.NOT_ANCHOR or t % interval or a % interval:
            continue
        steps = (t - a) // interval
        carry = f & k.INTERVAL_CARRY
        if f & (k.F_WENT_BACKWARDS | k.F_METER_REPLACED):
            rows.append((m, q, t, 0, carry))
        elif steps == 1 or f & k.NOT_BILLABLE:
            rows.append((m, q, t, d * int(mult[m]), carry))
        elif steps - 1 <= max(max_gap, flat_max) and f & k.F_OUTAGE:  # VEE-23: zeros, the delta last
            for j in range(1, steps):
                rows.append((m, q, a + j * interval, 0, carry & (k.F_GAP_BEFORE | k.F_OUTAGE)))
            rows.append((m, q, t, d * int(mult[m]), carry))
        elif steps - 1 <= max(max_gap, flat_max):
            each = d // steps  # floor; the remainder goes to the last interval (VEE-20)
            energies = [each] * (steps - 1) + [d - each * (steps - 1)]
            assert sum(energies) == d
            flat = k.F_EST_FLAT if steps - 1 > max_gap else 0  # VEE-21 without like days
            for j, e in enumerate(energies):
                last = j == steps - 1
                end = a + (j + 1) * interval
                fl = k.F_ESTIMATED | flat | (carry if last else carry & k.F_GAP_BEFORE)
                if end - a > prolonged:
                    fl |= k.F_PROLONGED_EST  # VEE-22
                rows.append((m, q, end, e * int(mult[m]), fl))
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 5
    dts = (np.uint32, np.uint16, np.int64, np.int64, np.uint32)
    return tuple(np.array(c, dtype=d) for c, d in zip(cols, dts, strict=True))


def like_day_spread(
    meter, ts, quantity, flags, delta, anchor_ts, selected, interval, longest, energy, row_flags,
    ref_meter, ref_q, ref_end, ref_e, ref_f, week, weeks, like_days,
):  # fmt: skip
    """VEE-21: each flat gap's rows reshaped by the sum of its nearest eligible like weeks."""
    ref = {
        (m, q, t): (e, f)
        for m, q, t, e, f in zip(_l(ref_meter), _l(ref_q), _l(ref_end), _l(ref_e), _l(ref_f), strict=True)
    }
    out_e, out_f = _l(energy), _l(row_flags)
    r = 0
    for i in range(len(ts)):
        q, f, t, a = int(quantity[i]), int(flags[i]), int(ts[i]), int(anchor_ts[i])
        if not selected[q]:
            continue
        if a == INT64_MIN or f & k.NOT_ANCHOR or t % interval or a % interval:
            continue
        steps = (t - a) // interval
        n = 1 if steps == 1 or f & k.NOT_BILLABLE else steps if steps - 1 <= longest else 0
        rows = list(range(r, r + n))
        r += n
        if n < 2 or not out_f[rows[0]] & k.F_EST_FLAT:
            continue
        slots = [(int(meter[i]), q, a + (j + 1) * interval) for j in range(n)]
        days = []
        for w in range(1, weeks + 1):
            got = [ref.get((m, qq, end - w * week)) for m, qq, end in slots]
            if all(g is not None and g[0] >= 0 and not g[1] & k.NOT_LIKE_DAY for g in got):
                days.append([g[0] for g in got if g is not None])
            if len(days) == like_days:
                break
        total = sum(out_e[x] for x in rows)
        shape = [sum(col) for col in zip(*days, strict=True)] if days else []
        if not days or sum(shape) <= 0 or total < 0 or total * sum(shape) > INT64_MAX:
            continue
        spread = [total * s // sum(shape) for s in shape[:-1]]
        spread.append(total - sum(spread))
        for x, e in zip(rows, spread, strict=True):
            out_e[x] = e
            out_f[x] = (out_f[x] & ~k.F_EST_FLAT) | k.F_EST_HIST
    return np.array(out_e, dtype=np.int64), np.array(out_f, dtype=np.uint32)


def relative_spikes(labels, ngroups, energy, flags, floor, tol_pct):
    """VEE-06: per group, the highest against the third-highest eligible interval."""
    groups = defaultdict(list)
    for i, (g, e, f) in enumerate(zip(_l(labels), _l(energy), _l(flags), strict=True)):
        if not f & (k.NOT_BILLABLE | k.F_ESTIMATED | k.F_OUTAGE) and 0 <= e <= k.SPIKE_REL_BOUND:
            groups[g].append((-e, i))  # highest first, then the first row
    out = _l(flags)
    for rows in groups.values():
        rows.sort()
        if len(rows) >= 3:
            max1, max3 = -rows[0][0], -rows[2][0]
            if max3 >= floor and (max1 - max3) * 100 > tol_pct * max3:
                out[rows[0][1]] |= k.F_SPIKE_REL
    return np.array(out, np.uint32)


def group_totals(labels, ngroups, energy, flags):
    tot, act, est, bad = ([0] * ngroups for _ in range(4))
    for g, e, f in zip(_l(labels), _l(energy), _l(flags), strict=True):
        if f & k.NOT_BILLABLE:
            bad[g] += 1
        else:
            tot[g] += e
            (est if f & k.F_ESTIMATED else act)[g] += 1
    return tuple(np.array(x, np.int64) for x in (tot, act, est, bad))


def group_min(labels, ngroups, values):
    out = [2**63 - 1] * ngroups
    for g, v in zip(_l(labels), _l(values), strict=True):
        out[g] = min(out[g], v)
    return np.array(out, np.int64)


def group_labels(*keys):
    """Dense labels numbering the distinct key tuples in sorted order, and each group's first row
    (in row order among the rows whose keys sort equal: lexsort is stable)."""
    tuples = list(zip(*(_l(key) for key in keys), strict=True))
    number = {t: g for g, t in enumerate(sorted(set(tuples)))}
    first: dict[int, int] = {}
    for row, t in enumerate(tuples):
        first.setdefault(number[t], row)
    labels = [number[t] for t in tuples]
    return np.array(labels, np.int64), len(number), np.array([first[g] for g in range(len(number))], np.int64)


def group_count(labels, ngroups, mask):
    out = [0] * ngroups
    for g, b in zip(_l(labels), mask, strict=True):
        out[g] += bool(b)
    return np.array(out, np.int64)


# --- time of use (TOU-03, VEE-15) ----------------------------------------------------------------------


def tou_periods(
    end_ts, interval, offset, version_from, month_season, day_profile, profiles, dated_days, dated_profile
):
    dated = {d: n for n, d in enumerate(_l(dated_days))}
    out = []
    for e in _l(end_ts):
        v = max(j for j, t in enumerate(_l(version_from)) if j == 0 or t <= e - interval)
        start = EPOCH + dt.timedelta(milliseconds=e - interval + offset)
        day = (start.date() - EPOCH.date()).days
        if day in dated:
            prof = dated_profile[v, dated[day]]
        else:
            prof = day_profile[month_season[v, start.month - 1], 1 if start.weekday() >= 5 else 0]
        out.append(int(profiles[prof, start.hour * 60 + start.minute]))
    return np.array(out, np.uint8)


def tou_split(labels, ngroups, quantity, energy, flags, period):
    cal = [[0] * 4 for _ in range(ngroups)]
    reg = [[0] * 4 for _ in range(ngroups)]
    seen_reg = [[False] * 4 for _ in range(ngroups)]
    seen_cal = [False] * ngroups
    big = [0] * ngroups
    for g, q, e, f, p in zip(_l(labels), _l(quantity), _l(energy), _l(flags), _l(period), strict=True):
        if f & k.NOT_BILLABLE:
            continue
        if q == 1:
            if 1 <= p <= 4:
                cal[g][p - 1] += e
            seen_cal[g] = True
            big[g] = max(big[g], e)
        elif q in (2, 3, 4, 5):
            reg[g][q - 2] += e
            seen_reg[g][q - 2] = True
    bad = [
        [seen_cal[g] and seen_reg[g][b] and abs(cal[g][b] - reg[g][b]) > big[g] for b in range(4)]
        for g in range(ngroups)
    ]
    shape = (ngroups, 4)
    return (
        np.array(cal, np.int64).reshape(shape),
        np.array(reg, np.int64).reshape(shape),
        np.array(big, np.int64),
        np.array(bad, np.bool_).reshape(shape),
    )


# --- line loss (LL-01/02) ----------------------------------------------------------------------------


def line_loss(labels, ngroups, is_master, fwd, fwd_ok, rev, rev_ok, expected, min_pct, high_bp):
    supply, sales, present = [0] * ngroups, [0] * ngroups, [0] * ngroups
    master_ok = [False] * ngroups
    for g, mst, fw, fo, rv, ro in zip(_l(labels), is_master, _l(fwd), fwd_ok, _l(rev), rev_ok, strict=True):
        if mst:
            master_ok[g] |= bool(fo)
            supply[g] += fw if fo else 0
            sales[g] += rv if ro else 0
        else:
            present[g] += bool(fo)
            sales[g] += fw if fo else 0
            supply[g] += rv if ro else 0
    loss = [s - b for s, b in zip(supply, sales, strict=True)]
    rate, klass = [0] * ngroups, [0] * ngroups
    for g in range(ngroups):
        if master_ok[g] and supply[g] == 0 and sales[g] == 0:
            klass[g] = k.LOSS_OUT_OF_SERVICE
        elif not master_ok[g] or supply[g] <= 0 or present[g] * 100 < int(min_pct[g]) * int(expected[g]):
            klass[g] = k.LOSS_NOT_COMPUTABLE
        else:
            rate[g] = loss[g] * 10_000 // supply[g]
            if present[g] < expected[g]:
                klass[g] = k.LOSS_INCOMPLETE
            elif rate[g] < 0:
                klass[g] = k.LOSS_NEGATIVE
            else:
                klass[g] = k.LOSS_HIGH if rate[g] > int(high_bp[g]) else k.LOSS_QUALIFIED
    return (
        *(np.array(x, np.int64) for x in (supply, sales, loss, rate)),
        np.array(klass, np.uint8),
        np.array(present, np.int64),
    )


# --- outage correlation (OUT-02) -----------------------------------------------------------------------


def area_outages(order, meter, ts, m_area, m_master, area_size, window, k_min, pct):
    meter, ts, order = _l(meter), _l(ts), _l(order)
    alarm_of = [-1] * len(meter)
    alarms: list[list[int]] = []  # [area, ts, count]
    by_area: dict[int, list[int]] = defaultdict(list)
    for i in order:
        by_area[int(m_area[meter[i]])].append(i)
    for area in sorted(by_area):  # order sorts by area first, so alarms come in area order
        if area < 0:
            continue
        events = by_area[area]
        need = max(k_min, -(-pct * int(area_size[area]) // 100))
        opened = None
        for j, i in enumerate(events):
            if opened is not None:
                alarm_of[i] = opened
                alarms[opened][2] += 1
                continue
            window_events = [e for e in events[: j + 1] if ts[e] >= ts[i] - window]
            if m_master[meter[i]] or len({meter[e] for e in window_events}) >= need:
                opened = len(alarms)
                alarms.append([area, ts[i], len(window_events)])
                for e in window_events:
                    alarm_of[e] = opened
    cols = list(zip(*alarms, strict=True)) if alarms else [[], [], []]
    return (np.array(alarm_of, np.int64), *(np.array(c, np.int64) for c in cols))


# --- line protocol -------------------------------------------------------------------------------------


def fixed(v: int, decimals: int) -> str:
    if decimals == 0:
        return f"{v}i"
    sign, a = ("-" if v < 0 else ""), abs(v)
    return f"{sign}{a // 10**decimals}.{a % 10**decimals:0{decimals}d}"


def encode_lines(order, meter, ts, quantity, value, flags, head, head_off, fname, fname_off, q_dec, wide):
    head_b, fname_b = bytes(head), bytes(fname)

    def h(m: int) -> str:
        return head_b[head_off[m] : head_off[m + 1]].decode()

    def fn(q: int) -> str:
        return fname_b[fname_off[q] : fname_off[q + 1]].decode()

    first: dict[tuple[int, int, int], tuple[int, int, int, int, int]] = {}
    for i in order:  # order keeps arrival order among equal keys: the first arrival wins (VEE-10)
        first.setdefault(
            (int(meter[i]), int(ts[i]), int(quantity[i])),
            (int(meter[i]), int(ts[i]), int(quantity[i]), int(value[i]), int(flags[i])),
        )
    rows = list(first.values())
    lines = []
    if not wide:
        for m, t, q, v, f in rows:
            lines.append(f"{h(m)},quantity={fn(q)} value={fixed(v, int(q_dec[q]))},flags={f}i {t}\n")
    else:
        groups: dict[tuple[int, int], list[str]] = {}
        for m, t, q, v, f in rows:
            fields = groups.setdefault((m, t), [])
            fields.append(f"{fn(q)}={fixed(v, int(q_dec[q]))}")
            if f:
                fields.append(f"{fn(q)}_flags={f}i")
        for (m, t), fields in groups.items():
            lines.append(f"{h(m)} {','.join(fields)} {t}\n")
    return "".join(lines).encode()


class LineProtocolError(ValueError):
    pass


def _split_unescaped(text: str, sep: str, escapable: str) -> list[str]:
    """Split at unescaped ``sep``; a backslash escapes only the characters in ``escapable``."""
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in escapable:
            cur.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str, escapable: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in escapable:
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, object], int]:
    """Strict InfluxDB line-protocol parser for one line (no trailing newline).

    Rejects raw control characters, empty keys or tag values, unescaped separators inside tags,
    backslashes that escape nothing in tags, unknown field value syntax, duplicate keys and a
    missing or non-integer timestamp. String field values are not used by our schema and are
    rejected too, which makes injected quotes fail loudly."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in line):
        raise LineProtocolError("control character in line")
    sections = _split_unescaped(line, " ", ", =")
    if len(sections) != 3:
        raise LineProtocolError(f"expected 3 space-separated sections, got {len(sections)}")
    key_part, field_part, ts_part = sections
    series = _split_unescaped(key_part, ",", ", =")
    measurement = _unescape(series[0], ", ")
    if not measurement:
        raise LineProtocolError("empty measurement")
    tags: dict[str, str] = {}
    for raw in series[1:]:
        kv = _split_unescaped(raw, "=", ", =")
        if len(kv) != 2 or not kv[0] or not kv[1]:
            raise LineProtocolError(f"bad tag {raw!r}")
        if kv[1].endswith("\\") or kv[0].endswith("\\"):
            raise LineProtocolError(f"dangling backslash in tag {raw!r}")
        key, val = _unescape(kv[0], ", ="), _unescape(kv[1], ", =")
        if "\\" in val or "\\" in key:
            raise LineProtocolError(f"backslash that escapes nothing in tag {raw!r}")
        if key in tags:
            raise LineProtocolError(f"duplicate tag {key!r}")
        tags[key] = val
    fields: dict[str, object] = {}
    for raw in _split_unescaped(field_part, ",", ", ="):
        kv = _split_unescaped(raw, "=", ", =")
        if len(kv) != 2 or not kv[0] or not kv[1]:
            raise LineProtocolError(f"bad field {raw!r}")
        key, val = _unescape(kv[0], ", ="), kv[1]
        if key in fields:
            raise LineProtocolError(f"duplicate field {key!r}")
        if val.endswith("i") and val[:-1].lstrip("-").isdigit():
            fields[key] = int(val[:-1])
        elif val.lstrip("-").replace(".", "", 1).isdigit():
            fields[key] = val  # keep the exact decimal text
        else:
            raise LineProtocolError(f"unsupported field value {val!r}")
    if not ts_part.lstrip("-").isdigit():
        raise LineProtocolError(f"bad timestamp {ts_part!r}")
    return measurement, tags, fields, int(ts_part)


def parse_lines(data: bytes) -> list[tuple[str, dict[str, str], dict[str, object], int]]:
    text = data.decode("utf-8")
    if text and not text.endswith("\n"):
        raise LineProtocolError("missing final newline")
    return [parse_line(line) for line in text.split("\n")[:-1]]
