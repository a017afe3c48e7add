"""Quality flags: one bit per rule, carried in every reading's ``flags`` (uint32).

A reading is never silently dropped: whatever is wrong with it is recorded here and it is
stored with its flags. The edge sets ``METER_ERROR`` and ``CLOCK_SKEW``-at-read; ingest's
validation kernels set the rest. Bits are stable: never renumber, only add.

==== ==================  ============================================================
bit  name                meaning
==== ==================  ============================================================
0    OUT_OF_RANGE        value outside the quantity's physical range
1    WENT_BACKWARDS      cumulative register lower than the previous reading (not a rollover)
2    ROLLOVER            cumulative register wrapped at its maximum; the delta is computed across the wrap
3    SPIKE               consumption above the physical maximum from the meter's rating
4    GAP_BEFORE          one or more expected readings are missing before this one
5    ESTIMATED           value produced by estimation, not read from the meter
6    CLOCK_SKEW          meter clock differs from the head-end's beyond tolerance
7    FUTURE_TIME         timestamp later than receive time + tolerance
8    DUPLICATE           same (meter, quantity, ts) seen before
9    METER_ERROR         the meter answered this read with an error reply (value is 0)
10   METER_REPLACED      register restarted near zero: a new meter, not consumption
11   ZERO_WITH_CURRENT   no energy consumed while current flowed
12   PHASE_LOSS          one phase voltage collapsed while the others were normal
13   PF_OUT_OF_BOUNDS    power factor outside [-1, 1] or below the configured floor
14   OUT_OF_ORDER        timestamp earlier than a reading already seen for this channel
15   BEFORE_MIN_TIME     timestamp earlier than the head-end's lower bound (ingest ``min_ts``)
16   SPIKE_REL           interval far above the day's third-highest (VEE-06; a warning, billable)
17   FAST_RUNNING        interval energy far above what the measured power implies (VEE-07)
18   STOPPED             register unchanged over several intervals while current flowed (VEE-08)
19   ZERO_LONG           a long run of zero-consumption intervals (VEE-09; billable, for review)
20   STUCK               an instantaneous value repeated exactly while the meter's others change (VEE-19)
21   OUTAGE              the meter was down at this point, or the interval touches such a point (VEE-23)
22   EST_FLAT            a gap beyond interpolation's limit spread evenly: it has no like day (VEE-21)
23   PROLONGED_EST       estimated more than the allowed days after the meter's last actual reading (VEE-22)
24   EST_HIST            a gap beyond interpolation's limit shaped by its like days (VEE-21)
==== ==================  ============================================================

Bits 25..31 are free for new rules. Inside the head-end every flags column is ``uint32``. On
the wire, payload v1 carries 16 bits (decoding widens them; encoding a higher bit as v1 is an
error) and payload v2 all 32 (``docs/payload.md``).
"""

from __future__ import annotations

import enum

__all__ = ["NOT_BILLABLE", "Flag", "describe"]


class Flag(enum.IntFlag):
    OUT_OF_RANGE = 1 << 0
    WENT_BACKWARDS = 1 << 1
    ROLLOVER = 1 << 2
    SPIKE = 1 << 3
    GAP_BEFORE = 1 << 4
    ESTIMATED = 1 << 5
    CLOCK_SKEW = 1 << 6
    FUTURE_TIME = 1 << 7
    DUPLICATE = 1 << 8
    METER_ERROR = 1 << 9
    METER_REPLACED = 1 << 10
    ZERO_WITH_CURRENT = 1 << 11
    PHASE_LOSS = 1 << 12
    PF_OUT_OF_BOUNDS = 1 << 13
    OUT_OF_ORDER = 1 << 14
    BEFORE_MIN_TIME = 1 << 15
    SPIKE_REL = 1 << 16
    FAST_RUNNING = 1 << 17
    STOPPED = 1 << 18
    ZERO_LONG = 1 << 19
    STUCK = 1 << 20
    OUTAGE = 1 << 21
    EST_FLAT = 1 << 22
    PROLONGED_EST = 1 << 23
    EST_HIST = 1 << 24


# An interval carrying one of these bits has no billable consumption (VEE-03/04/05/07/08): it is
# in no billable total and fee control charges nothing for it.
NOT_BILLABLE = Flag.WENT_BACKWARDS | Flag.METER_REPLACED | Flag.SPIKE | Flag.FAST_RUNNING | Flag.STOPPED


def describe(flags: int) -> tuple[str, ...]:
    """Names of the bits set in ``flags``, lowest bit first; unknown bits as ``bit31``."""
    names = [f.name or "" for f in Flag if flags & f]
    known = sum(int(f) for f in Flag)
    names.extend(f"bit{b}" for b in range(flags.bit_length()) if flags & ~known & (1 << b))
    return tuple(names)
