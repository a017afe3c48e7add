"""Run rules across batches (VEE-08/09/19): an edge that sends one interval per batch still gets
its runs judged, through the run state each batch hands to the next (``Checked.carry``)."""

from __future__ import annotations

import numpy as np

from ingest.rules import kernels as k
from ingest.rules import stages
from protocols.flags import Flag
from tests.unit.ingest.test_rules import T0, I, batch, meters

P = stages.ValidationParams()
RECEIVE = T0 + 2_000 * I
POWER = 12_000  # 1.2 kW in 0.1 W: current flows, so a standing register is ZERO_WITH_CURRENT


def one_interval_batches(values, *, power=None, t0=T0, skip=()):
    """One batch per grid point j = 1.. (register ``values[j]``, the edge's previous register the
    point before; with the active power when given), except the points in ``skip``."""
    out = []
    for j in range(1, len(values)):
        if j in skip:
            continue
        prev_j = max(i for i in range(j) if i not in skip)
        rows = [(0, t0 + j * I, 1, values[j])]
        if power is not None:
            rows.append((0, t0 + j * I, 40, power))
        out.append(batch(rows, [(0, 1, values[prev_j], t0 + prev_j * I)]))
    return out


def run_batches(batches, params=P, m=None, carry=None):
    """Validate the batches in turn, each with the carry of the one before; the flags of each
    batch's readings."""
    m = m or meters()
    carry = carry if carry is not None else stages.RunCarry.empty()
    flags = []
    for r, p in batches:
        c = stages.validate_batch(r, p, m, RECEIVE, params, carry)
        carry = _merge(carry, c.carry)
        flags.append([int(f) for f in c.flags])
    return flags, carry


def _merge(old: stages.RunCarry, new: stages.RunCarry) -> stages.RunCarry:
    """What the state store does: the new rows replace the old ones of the same channel."""
    keys = {(int(m), int(q)): row for m, q, row in zip(old.meter, old.quantity, old.state, strict=True)}
    keys.update({(int(m), int(q)): row for m, q, row in zip(new.meter, new.quantity, new.state, strict=True)})
    ks = sorted(keys)
    return stages.RunCarry(
        np.array([m for m, _ in ks], np.uint32),
        np.array([q for _, q in ks], np.uint16),
        np.array([keys[key] for key in ks], np.int64).reshape(len(ks), k.NCARRY),
    )


def energy(flags):
    return [f[0] for f in flags]


def test_vee08_four_zero_with_current_intervals_one_per_batch_are_stopped_on_the_fourth() -> None:
    flags, carry = run_batches(one_interval_batches([500] * 5, power=POWER))
    e = energy(flags)
    assert all(f & Flag.ZERO_WITH_CURRENT for f in e)
    assert [bool(f & Flag.STOPPED) for f in e] == [False, False, False, True]
    row = carry.state[0]
    assert (row[k.C_STOP_LEN], row[k.C_STOP_BEGIN], row[k.C_STOP_END]) == (4, T0 + I, T0 + 4 * I)
    # The run goes on: the fifth is STOPPED too, a moving register ends the run.
    more, _ = run_batches(one_interval_batches([500] * 6 + [510], power=POWER)[4:], carry=carry)
    assert [bool(f & Flag.STOPPED) for f in energy(more)] == [True, False]


def test_vee08_without_the_carry_one_interval_batches_never_stop() -> None:
    m = meters()
    for r, p in one_interval_batches([500] * 6, power=POWER):
        c = stages.validate_batch(r, p, m, RECEIVE, P)
        assert not c.flags[0] & Flag.STOPPED


def test_a_gap_between_batches_restarts_the_run() -> None:
    # Point 3 never arrives: the batch of point 4 anchors at point 2, not where the run ended.
    flags, _ = run_batches(one_interval_batches([500] * 8, power=POWER, skip={3}))
    e = energy(flags)
    # 1, 2 | 4 (a two-interval gap: no step of the run) | 5, 6, 7 are 3 intervals: not yet 4.
    assert not any(f & Flag.STOPPED for f in e)
    flags, _ = run_batches(one_interval_batches([500] * 9, power=POWER, skip={3}))
    assert [bool(f & Flag.STOPPED) for f in energy(flags)] == [False] * 6 + [True]


def test_a_carry_that_does_not_end_where_the_batch_starts_is_ignored() -> None:
    _, carry = run_batches(one_interval_batches([500] * 4, power=POWER))  # run of 3, ends at T0 + 3I
    later = one_interval_batches([500] * 7, power=POWER)[4:]  # points 5 and 6: point 4 is missing
    flags, _ = run_batches(later, carry=carry)
    assert not any(f & Flag.STOPPED for f in energy(flags))


def test_vee09_zero_consumption_run_across_batches() -> None:
    params = stages.ValidationParams(zero_long_intervals=3)
    flags, _ = run_batches(one_interval_batches([700] * 5), params)
    assert [bool(f & Flag.ZERO_LONG) for f in energy(flags)] == [False, False, True, True]


def test_vee19_stuck_value_across_batches_while_another_channel_changes() -> None:
    # Voltage a stays 220.0 V at every read while current a changes: stuck on the 8th reading.
    m = meters()
    batches = []
    for j in range(1, 10):
        rows = [(0, T0 + j * I, 30, 2_200), (0, T0 + j * I, 33, 1_000 + j)]
        batches.append(batch(rows))
    flags, _ = run_batches(batches, m=m)
    volts = [f[0] for f in flags]
    assert [bool(f & Flag.STUCK) for f in volts] == [False] * 7 + [True, True]
    assert not any(f[1] & Flag.STUCK for f in flags)


def test_vee19_no_stuck_when_nothing_else_on_the_meter_changes() -> None:
    batches = [batch([(0, T0 + j * I, 30, 2_200), (0, T0 + j * I, 33, 1_000)]) for j in range(1, 10)]
    flags, _ = run_batches(batches)
    assert not any(f[0] & Flag.STUCK for f in flags)


def test_vee19_a_missed_read_restarts_the_stuck_run() -> None:
    batches = [
        batch([(0, T0 + j * I, 30, 2_200), (0, T0 + j * I, 33, 1_000 + j)]) for j in range(1, 11) if j != 5
    ]
    flags, _ = run_batches(batches)
    # Reads 1..4, then 6..10 (5 readings): neither run reaches 8.
    assert not any(f[0] & Flag.STUCK for f in flags)


def test_the_carry_out_holds_only_channels_whose_state_changed() -> None:
    r, p = batch([(0, T0 + I, 1, 510), (0, T0 + I, 40, POWER), (0, T0 + I, 52, 900)], [(0, 1, 500, T0)])
    c = stages.validate_batch(r, p, meters(), RECEIVE, P)
    # The register (a step: its last step time) and the power (stuck-checked); not the PF.
    assert sorted(c.carry.quantity.tolist()) == [1, 40]
