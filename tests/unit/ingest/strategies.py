"""Hypothesis strategies for ingest batches: small, adversarial, derandomized (STYLE H7/H11).

Batches mix few meters and channels on a short 15-minute grid so that duplicates, out-of-order
arrival, gaps at the batch edge (previous register far back), rollover near the register maximum,
meter replacement (restart near zero), backwards registers and spikes all occur often."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ingest.model.registry import MeterParams
from ingest.rules import stages
from protocols.flags import Flag

EXAMPLES = int(os.environ.get("INGEST_EXAMPLES", "120"))
SETTINGS = settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
BASE = 1_700_000_000_000 // 900_000 * 900_000
I = 900_000  # noqa: E741 (the interval, as in the rules)
QUANTITIES = [1, 1, 1, 2, 3, 6, 11, 80, 30, 31, 32, 33, 34, 35, 40, 52, 53, 56, 100, 101, 999]
VALUES = st.one_of(
    st.integers(0, 3_000),
    st.integers(99_999_000, 99_999_999),
    st.integers(9_999_000, 9_999_999),  # near a 5-digit meter's rollover point (energy_regmax)
    st.integers(-3, 130_000_000),
    st.sampled_from([0, 5, 999, 1_000, 1_320, 1_716, 2_200, 3_301, 999_990, 1_001]),
)
# Values and times no meter sends, from a broken or hostile edge: never a crash, never a sum
EXTREME_VALUES = st.sampled_from([2**62, -(2**62), 2**63 - 1, -(2**63), 10**15 + 1])
EXTREME_TS = st.sampled_from([0, -1, -(2**62), stages.MIN_TS_MS - 1, stages.MIN_TS_MS, -(2**63), 2**62])


def _int64(v: int) -> int:
    return max(-(2**63), min(2**63 - 1, v))


@st.composite
def meter_params(draw, nmeters: int) -> MeterParams:
    def col(choices, dtype=np.int64):
        return np.array([draw(st.sampled_from(choices)) for _ in range(nmeters)], dtype=dtype)

    return MeterParams(
        known=np.ones(nmeters, np.bool_),
        un_dv=col([0, 2200, 2200, 577]),
        imax_ma=col([0, 60_000, 100, 1_500]),
        ib_ma=col([5_000, 1_500]),
        phases=col([1, 3, 3]),
        multiplier=col([1, 40]),
        area=col([-1, 0, 1], np.int32),
        master=col([False, False, True], np.bool_),
        energy_regmax=col([0, 0, 9_999_999]),  # some meters have 5-digit registers (VEE-02)
    )


@st.composite
def batches(draw, max_n: int = 40):
    nmeters = draw(st.integers(1, 3))
    n = draw(st.integers(0, max_n))
    rows = []
    for _ in range(n):
        m = draw(st.integers(0, nmeters - 1))
        ts = BASE + draw(st.integers(0, 12)) * I + draw(st.sampled_from([0, 0, 0, 0, 0, 1, 60_000]))
        if draw(st.integers(0, 15)) == 0:
            ts = draw(EXTREME_TS)
        q = draw(st.sampled_from(QUANTITIES))
        v = draw(EXTREME_VALUES) if draw(st.integers(0, 15)) == 0 else draw(VALUES)
        if q == 101:  # meter clock, local time: skew around the 5 min tolerance
            v = ts + 8 * 3_600_000 + draw(st.sampled_from([0, 299_999, 300_001, -300_001, 10**7]))
        f = draw(st.sampled_from([0, 0, 0, 0, int(Flag.METER_ERROR), int(Flag.CLOCK_SKEW)]))
        rows.append((m, ts, q, _int64(v), f))
    for _ in range(draw(st.integers(0, 4)) if rows else 0):  # redelivered readings, same or changed
        j = draw(st.integers(0, len(rows) - 1))
        m, ts, q, v, f = rows[j]
        rows.insert(
            draw(st.integers(0, len(rows))), (m, ts, q, _int64(draw(st.sampled_from([v, v, v + 1]))), f)
        )
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 5
    readings = stages.Readings(
        np.array(cols[0], np.uint32),
        np.array(cols[1], np.int64),
        np.array(cols[2], np.uint16),
        np.array(cols[3], np.int64),
        np.array(cols[4], np.uint32),
    )
    prev = []
    for m in range(nmeters):
        for q in (1, 2, 3, 6, 11, 80):
            if draw(st.booleans()):
                v = draw(EXTREME_VALUES) if draw(st.integers(0, 7)) == 0 else draw(VALUES)
                ts = (
                    draw(EXTREME_TS) if draw(st.integers(0, 7)) == 0 else BASE + draw(st.integers(-10, 3)) * I
                )
                prev.append((m, q, v, ts))
    pc = list(zip(*prev, strict=True)) if prev else [[]] * 4
    previous = stages.PreviousRegisters(
        np.array(pc[0], np.uint32),
        np.array(pc[1], np.uint16),
        np.array(pc[2], np.int64),
        np.array(pc[3], np.int64),
    )
    meters = draw(meter_params(nmeters))
    receive = BASE + draw(st.integers(0, 14)) * I
    return readings, previous, meters, receive


@st.composite
def carries(draw, readings: stages.Readings) -> stages.RunCarry:
    """Run state carried into ``readings``' channels (and one channel not in the batch): runs of
    VEE-08/09/19 ending at or near the batch's start (contiguous or not), stuck values that
    match the first reading or not, moved or not."""
    from ingest.rules import kernels as k

    keys = sorted({(int(m), int(q)) for m, q in zip(readings.meter, readings.quantity, strict=True)})
    keys.append((0, 7))
    chosen = [key for key in keys if draw(st.integers(0, 3))]
    state = stages.empty_carry(len(chosen))
    for row, (_, q) in enumerate(chosen):
        end = BASE + draw(st.sampled_from([-1, 0, 0, 1, 2, 5])) * I + draw(st.sampled_from([0, 0, 1]))
        length = draw(st.integers(0, 3))
        begin = end - max(length - 1, 0) * I if length else 0
        for col in (k.C_STOP_LEN, k.C_ZERO_LEN, k.C_STUCK_LEN):
            if draw(st.booleans()) and length:
                state[row, col : col + 3] = (length, begin, end)
        if draw(st.booleans()):
            state[row, k.C_STUCK_END] = end
            state[row, k.C_STUCK_VALUE] = draw(st.sampled_from([0, 1_200, 2_200, 4_000, 12_000, q]))
            state[row, k.C_STUCK_MOVED] = draw(st.integers(0, 1))
        state[row, k.C_LAST] = end if draw(st.booleans()) else k.INT64_MIN
    pc = list(zip(*chosen, strict=True)) if chosen else [[]] * 2
    return stages.RunCarry(np.array(pc[0], np.uint32), np.array(pc[1], np.uint16), state)


def readonly(*arrays):
    for a in arrays:
        a.setflags(write=False)


@st.composite
def series(draw, max_points: int = 12, clean: bool = False):
    """Batches of consecutive 15-minute points per meter (registers that stand still, creep or
    jump; power, phase voltages and currents that repeat or change; sometimes a missing or
    collapsed point, never when ``clean``), so that the run rules (VEE-07/08/09/19/23) see runs
    to judge."""
    nmeters = draw(st.integers(1, 2))
    rows = []
    prev = []
    for m in range(nmeters):
        register = draw(st.sampled_from([0, 1_000, 99_999_990]))
        phases = draw(st.sampled_from([0, 1, 3]))  # read at every point when clean
        if draw(st.booleans()):
            prev.append((m, 1, register, BASE))
        for j in range(1, draw(st.integers(1, max_points)) + 1):
            if not clean and draw(st.integers(0, 9)) == 0:
                continue  # a missing point: a gap
            t = BASE + j * I
            register = min(register + draw(st.sampled_from([0, 0, 0, 1, 25, 3_000])), 99_999_999)
            rows.append((m, t, 1, register, 0))
            if clean or draw(st.integers(0, 3)):
                rows.append((m, t, 40, draw(st.sampled_from([0, 3_999, 4_000, 12_000, 400_000])), 0))
            down = not clean and draw(st.integers(0, 7)) == 0
            for x in range(phases if clean else draw(st.sampled_from([0, 1, 3]))):
                steady = [2_200, 2_200, 2_213] if clean else [2_200, 2_200, 2_213, 0, 1_000]
                volts = draw(st.sampled_from(steady)) if not down else 50
                rows.append((m, t, 30 + x, volts, 0))
                rows.append((m, t, 33 + x, draw(st.sampled_from([0, 1_200, 1_200, 4_800])), 0))
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 5
    readings = stages.Readings(
        np.array(cols[0], np.uint32),
        np.array(cols[1], np.int64),
        np.array(cols[2], np.uint16),
        np.array(cols[3], np.int64),
        np.array(cols[4], np.uint32),
    )
    pc = list(zip(*prev, strict=True)) if prev else [[]] * 4
    previous = stages.PreviousRegisters(
        np.array(pc[0], np.uint32),
        np.array(pc[1], np.uint16),
        np.array(pc[2], np.int64),
        np.array(pc[3], np.int64),
    )
    return readings, previous, draw(meter_params(nmeters)), BASE + (max_points + 1) * I
