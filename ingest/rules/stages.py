"""Checking wrappers around :mod:`ingest.rules.kernels`: one per pipeline stage.

Each wrapper checks dtypes and shapes (a ``TypeError``/``ValueError`` naming the column: these are
programming errors of the caller, not bad data), builds integer group labels and per-meter
parameter columns, allocates, and calls a kernel. Bad *data* never raises: it comes back as
quality-flag bits (:mod:`protocols.flags`). Inputs are never written (``numpy.frombuffer`` arrays
are read-only and work as they are). Stages, in pipeline order::

    validate_batch(readings, previous, meters, receive_ts_ms, carry) -> Checked    (+ run carry out)
    aggregate_intervals(readings, checked, meters, params)           -> Intervals  (VEE-01, 20..23)
    relative_spikes(day_intervals, params)                           -> flags      (VEE-06, daily job)
    interval_totals(intervals, bucket_ms)                            -> Totals     (hourly / daily)
    tou_split(intervals, calendar)                                   -> TouDays    (TOU-03, VEE-15)
    line_loss(daily_totals, meters, area_sizes)                      -> LineLoss   (LL-01/02)
    completeness(intervals, readings, checked, meter_ids)            -> CompletenessReport (KPI-01)
    area_outages(event_meter, event_ts, meters, area_sizes)          -> Outages    (OUT-02)

Rule IDs refer to ``docs/rules.md``; ``docs/ingest-kernels.md`` has the flag rules and
parameters. Line protocol is the InfluxDB sink's (:mod:`ingest.sinks.influx.lines`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.model.registry import MeterParams
from ingest.model.tariff import TariffCalendar
from ingest.rules import kernels as k
from protocols.quantities import ENERGY_FORWARD, ENERGY_REVERSE, QUANTITIES, by_name

__all__ = [
    "Checked",
    "CompletenessReport",
    "DayCompleteness",
    "Intervals",
    "LineLoss",
    "Outages",
    "PreviousRegisters",
    "Readings",
    "RunCarry",
    "Totals",
    "TouDays",
    "ValidationParams",
    "aggregate_intervals",
    "area_outages",
    "bucket_partials",
    "completeness",
    "has_flat_gaps",
    "interval_totals",
    "like_day_window",
    "line_loss",
    "relative_spikes",
    "tou_periods",
    "tou_split",
    "validate_args",
    "validate_batch",
]

I64 = npt.NDArray[np.int64]
DAY_MS = 86_400_000
INTERVAL_MS = 900_000
SHANGHAI_MS = 8 * 3_600_000
LIKE_DAYS = 3  # VEE-21: like days averaged into a long gap's shape ...
LIKE_DAY_WEEKS = 8  # ... the nearest eligible within this many weeks back (same weekday)
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z: no meter of this system read before it


def _col(name: str, arr: Any, dtype: Any, n: int | None = None) -> Any:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"column {name!r}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != np.dtype(dtype):
        raise TypeError(f"column {name!r}: expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"column {name!r}: expected 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"column {name!r}: expected length {n}, got {arr.shape[0]}")
    return arr


@dataclass(frozen=True, slots=True)
class Readings:
    """A batch's reading columns. ``meter`` indexes the batch's meter-id table."""

    meter: npt.NDArray[np.uint32]
    ts: I64  # epoch ms
    quantity: npt.NDArray[np.uint16]
    value: I64  # fixed point, scaled by the quantity's decimals
    flags: npt.NDArray[np.uint32]

    def __post_init__(self) -> None:
        n = _col("meter", self.meter, np.uint32).shape[0]
        _col("ts", self.ts, np.int64, n)
        _col("quantity", self.quantity, np.uint16, n)
        _col("value", self.value, np.int64, n)
        _col("flags", self.flags, np.uint32, n)

    def __len__(self) -> int:
        return int(self.meter.shape[0])


@dataclass(frozen=True, slots=True)
class PreviousRegisters:
    """Per (meter, quantity): the register value and time the edge sent before this batch."""

    meter: npt.NDArray[np.uint32]
    quantity: npt.NDArray[np.uint16]
    value: I64
    ts: I64

    def __post_init__(self) -> None:
        n = _col("previous.meter", self.meter, np.uint32).shape[0]
        _col("previous.quantity", self.quantity, np.uint16, n)
        _col("previous.value", self.value, np.int64, n)
        _col("previous.ts", self.ts, np.int64, n)

    @classmethod
    def empty(cls) -> PreviousRegisters:
        e = np.empty(0, dtype=np.int64)
        return cls(np.empty(0, np.uint32), np.empty(0, np.uint16), e, e)


@dataclass(frozen=True, slots=True)
class RunCarry:
    """Per (meter, quantity): the run state of VEE-08/09/19 carried across batches, one row of
    ``kernels.NCARRY`` int64 columns (``kernels.C_*``) per channel."""

    meter: npt.NDArray[np.uint32]
    quantity: npt.NDArray[np.uint16]
    state: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        n = _col("carry.meter", self.meter, np.uint32).shape[0]
        _col("carry.quantity", self.quantity, np.uint16, n)
        if self.state.dtype != np.int64 or self.state.shape != (n, k.NCARRY):
            got = f"{self.state.dtype} {self.state.shape}"
            raise TypeError(f"carry.state: expected int64 ({n}, {k.NCARRY}), got {got}")

    def __len__(self) -> int:
        return int(self.meter.shape[0])

    @classmethod
    def empty(cls) -> RunCarry:
        return cls(np.empty(0, np.uint32), np.empty(0, np.uint16), np.empty((0, k.NCARRY), np.int64))


def empty_carry(nchan: int) -> npt.NDArray[np.int64]:
    """``nchan`` carry rows that carry nothing."""
    state = np.zeros((nchan, k.NCARRY), dtype=np.int64)
    state[:, [k.C_STOP_END, k.C_ZERO_END, k.C_STUCK_END, k.C_LAST]] = k.INT64_MIN
    return state


@dataclass(frozen=True, slots=True)
class ValidationParams:
    """Thresholds of the validation and estimation rules; integer units in the names, defaults
    from the rules (``docs/rules.md``). Every field but ``spike_margin_pct``
    (in the meter table) and those of the interval stage (``max_gap_intervals``,
    ``flat_gap_max_intervals``, ``prolonged_est_ms``, ``spike_rel_*``)
    is a field of ``kernels.PARAMS`` of the same name. Configured by ingest's ``[pipeline]`` and
    ``[validation]`` sections. Raises: ValueError naming the field for a value outside its range."""

    interval_ms: int = INTERVAL_MS  # VEE-13 grid and gap
    future_tol_ms: int = 300_000  # VEE-11
    min_ts_ms: int = MIN_TS_MS  # readings earlier are BEFORE_MIN_TIME
    skew_tol_ms: int = 300_000  # VEE-12
    meter_clock_utc_offset_ms: int = SHANGHAI_MS  # meter_clock is meter-local time as UTC-naive
    rollover_band_pct: int = 90  # VEE-02, anchor >= 90 % of the rollover point
    replaced_below: int = 1_000  # VEE-03, R(t) < 10.00 kWh
    replaced_drop: int = 1_000  # VEE-03, drop >= 10.00 kWh
    decrease_min: int = 5  # VEE-04, 0.05 kWh
    spike_margin_pct: int = 10  # VEE-05
    zero_power_min_w: int = 400  # VEE-08, 0.4 kW
    voltage_invalid_pct: int = 150  # VEE-16, invalid above 150 % U_n
    phase_break_pct: int = 60  # VEE-17 断相 below 60 % U_n
    voltage_loss_pct: int = 78  # VEE-17 失压 below 78 % U_n ...
    voltage_loss_current_permille: int = 5  # ... with I above 0.5 % I_b
    pf_floor: int = 300  # VEE-18, 0.300
    fast_ratio_x10: int = 100  # VEE-07: E > 10.0 x the power-implied energy ...
    fast_min: int = 10  # ... and E >= 0.10 kWh
    stopped_intervals: int = 4  # VEE-08: N intervals (1 h)
    zero_long_intervals: int = 288  # VEE-09: Z intervals (3 days)
    stuck_readings: int = 8  # VEE-19: N readings (2 h)
    max_gap_intervals: int = 8  # VEE-20: longest gap interpolated (intervals missing)
    flat_gap_max_intervals: int = 2_016  # VEE-21: longest gap spread flat (3 weeks)
    prolonged_est_ms: int = 3 * DAY_MS  # VEE-22: estimates this long after the last actual reading
    spike_rel_pct: int = 300  # VEE-06: max1 above max3 by more than 300 % ...
    spike_rel_floor: int = 10  # ... when max3 >= 0.10 kWh (interval energy, multiplier applied)

    def __post_init__(self) -> None:
        for name, (lo, hi) in _PARAM_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name}: expected an integer {lo}..{hi}, got {value!r}")
        if DAY_MS % self.interval_ms:
            raise ValueError(f"interval_ms: must divide a day, got {self.interval_ms}")

    def record(self, receive_ts_ms: int) -> npt.NDArray[np.void]:
        """The ``kernels.PARAMS`` record (an array of one) for a batch received at ``receive_ts_ms``."""
        rec = np.zeros(1, dtype=k.PARAMS).view(np.recarray)
        for name in k.PARAMS.fields or ():
            rec[name] = receive_ts_ms if name == "receive_ts_ms" else getattr(self, name)
        rec.setflags(write=False)
        return rec


_BIG = 10**12  # no threshold is larger (12 days in ms, 10^10 kWh): products stay far from int64
_PARAM_RANGES = {
    "interval_ms": (1, DAY_MS),
    "future_tol_ms": (0, _BIG),
    "min_ts_ms": (0, 4_102_444_800_000),  # 1970 .. 2100
    "skew_tol_ms": (0, _BIG),
    "meter_clock_utc_offset_ms": (-14 * 3_600_000, 14 * 3_600_000),
    "rollover_band_pct": (1, 100),
    "replaced_below": (0, _BIG),
    "replaced_drop": (1, _BIG),
    "decrease_min": (1, _BIG),
    "spike_margin_pct": (0, 1_000),
    "zero_power_min_w": (0, 10**9),
    "voltage_invalid_pct": (100, 1_000),
    "phase_break_pct": (0, 100),
    "voltage_loss_pct": (0, 100),
    "voltage_loss_current_permille": (0, 1_000),
    "pf_floor": (0, 1_000),
    "fast_ratio_x10": (10, 1_000_000),
    "fast_min": (0, _BIG),
    "stopped_intervals": (1, 1_000_000),
    "zero_long_intervals": (1, 1_000_000),
    "stuck_readings": (2, 1_000_000),
    "spike_rel_pct": (0, 10_000),
    "spike_rel_floor": (0, _BIG),
    "max_gap_intervals": (0, 10_000),
    "flat_gap_max_intervals": (0, 100_000),
    "prolonged_est_ms": (0, _BIG),
}


def _quantity_table() -> npt.NDArray[np.void]:
    """``kernels.QUANTITY_TABLE`` indexed by code (the uint16 range, so any code is an index):
    every row from the quantity's own attributes; unknown codes are KIND_UNKNOWN."""
    kinds = {"cumulative": k.KIND_CUMULATIVE, "instantaneous": k.KIND_INSTANT, "state": k.KIND_STATE}
    table = np.zeros(_NQ, dtype=k.QUANTITY_TABLE).view(np.recarray)
    for q in QUANTITIES:
        lo, hi = q.valid_range
        regmax = q.register_max if q.register_max is not None else 0
        table[q.code] = (kinds[q.kind], lo, hi, regmax, q.is_energy, q.signed, q.stuck_check)
    table.setflags(write=False)
    return table


_NQ = 1 << 16
QUANTITY_TABLE = _quantity_table()
Q_DECIMALS = np.zeros(_NQ, dtype=np.int64)
for _q in QUANTITIES:
    Q_DECIMALS[_q.code] = _q.decimals
Q_DECIMALS.setflags(write=False)


def meter_table(meters: MeterParams, nmeters: int, p: ValidationParams) -> npt.NDArray[np.void]:
    """``kernels.METER_TABLE`` of a batch's meters: registry columns and what the rules derive
    from them. Raises: TypeError/ValueError naming the column."""
    for name in ("un_dv", "imax_ma", "ib_ma", "phases", "multiplier"):
        _col(f"meters.{name}", getattr(meters, name), np.int64, nmeters)
    table = np.zeros(nmeters, dtype=k.METER_TABLE).view(np.recarray)
    table["un_dv"] = meters.un_dv
    table["ib_ma"] = meters.ib_ma
    table["phases"] = meters.phases
    pmax_mw = meters.un_dv * meters.imax_ma * meters.phases // 10  # 0.1 V x mA = 0.1 mW
    table["kmax"] = pmax_mw * (100 + p.spike_margin_pct)
    ok = meters.un_dv > 0
    # VEE-08: the current that carries zero_power_min_w at U_n, in mA, rounded up.
    table["izero_ma"][ok] = -(-p.zero_power_min_w * 10_000 // meters.un_dv[ok])
    # VEE-02: a meter whose energy registers have fewer integer digits wraps earlier (0 = the
    # quantity's own register maximum).
    regmax = meters.energy_regmax if meters.energy_regmax.shape[0] else np.zeros(nmeters, np.int64)
    table["regmax"] = _col("meters.energy_regmax", regmax, np.int64, nmeters)
    table.setflags(write=False)
    return table


@dataclass(frozen=True, slots=True)
class Checked:
    """``validate_batch`` output, per reading (input positions): ``flags``; ``delta`` the register
    delta since the previous anchor (rollover unwrapped, 0 when invalid or none); ``anchor_ts``
    that anchor's time (``INT64_MIN`` if none); ``order`` the positions sorted by (meter, ts,
    quantity, arrival). ``carry`` is the run state after the batch of the channels whose state
    changed (to hand to the batch that follows)."""

    flags: npt.NDArray[np.uint32]
    delta: I64
    anchor_ts: I64
    order: I64
    carry: RunCarry = field(default_factory=RunCarry.empty)


def sort_order(readings: Readings) -> I64:
    """Positions sorted by (meter, ts, quantity), arrival order kept for ties."""
    return np.lexsort((readings.quantity, readings.ts, readings.meter)).astype(np.int64)


def _usable_previous(previous: PreviousRegisters, lo_ts_ms: int, hi_ts_ms: int) -> npt.NDArray[np.bool_]:
    """The previous registers that may anchor a channel: value within the quantity's range and
    time within ``[lo_ts_ms, hi_ts_ms]``. Others are ignored (as if the edge had sent none), so
    no register delta, interval or sum can start from a value or time no reading could carry."""
    q = previous.quantity
    row = QUANTITY_TABLE[q]
    ok_value = (previous.value >= row["lo"]) & (previous.value <= row["hi"]) & (row["kind"] != k.KIND_UNKNOWN)
    usable: npt.NDArray[np.bool_] = ok_value & (previous.ts >= lo_ts_ms) & (previous.ts <= hi_ts_ms)
    return usable


def _channel_key(meter: npt.NDArray[np.uint32], quantity: npt.NDArray[np.uint16]) -> I64:
    key: I64 = (meter.astype(np.int64) << 16) | quantity
    return key


def _carry_rows(uniq: I64, carry: RunCarry) -> npt.NDArray[np.int64]:
    """The carry row of each channel ``uniq`` (sorted channel keys); none where not carried."""
    state = empty_carry(uniq.shape[0])
    if len(carry) and uniq.shape[0]:
        ckey = _channel_key(carry.meter, carry.quantity)
        pos = np.minimum(np.searchsorted(uniq, ckey), uniq.shape[0] - 1)
        hit = uniq[pos] == ckey
        state[pos[hit]] = carry.state[hit]
    return state


def channel_labels(
    readings: Readings, previous: PreviousRegisters, usable: npt.NDArray[np.bool_] | None = None
) -> tuple[I64, I64, I64, npt.NDArray[np.bool_]]:
    """Dense (meter, quantity) labels and the previous register per label (of the previous
    registers ``usable`` selects, default all)."""
    key = _channel_key(readings.meter, readings.quantity)
    uniq, chan = np.unique(key, return_inverse=True)
    pkey = (previous.meter.astype(np.int64) << 16) | previous.quantity
    pos = np.searchsorted(uniq, pkey)
    hit = pos < uniq.shape[0]
    if usable is not None:
        hit &= usable
    hit[hit] = uniq[pos[hit]] == pkey[hit]
    prev_value = np.zeros(uniq.shape[0], dtype=np.int64)
    prev_ts = np.full(uniq.shape[0], k.INT64_MIN, dtype=np.int64)
    has_prev = np.zeros(uniq.shape[0], dtype=np.bool_)
    prev_value[pos[hit]] = previous.value[hit]
    prev_ts[pos[hit]] = previous.ts[hit]
    has_prev[pos[hit]] = True
    return chan.astype(np.int64).ravel(), prev_value, prev_ts, has_prev


def validate_args(
    readings: Readings,
    previous: PreviousRegisters,
    meters: MeterParams,
    receive_ts_ms: int,
    params: ValidationParams = ValidationParams(),
    carry: RunCarry | None = None,
) -> tuple[Any, ...]:
    """The arguments of ``kernels.validate`` (and of its reference implementation) for a batch:
    the reading columns, each channel's previous register and carried run state, and the
    quantity table, meter table and parameter record. Raises: TypeError/ValueError naming the
    column for a wrong dtype, shape or meter index."""
    nmeters = int(meters.un_dv.shape[0])
    if len(readings) and int(readings.meter.max()) >= nmeters:
        raise ValueError(f"column 'meter': index {int(readings.meter.max())} beyond {nmeters} meters")
    mt = meter_table(meters, nmeters, params)
    usable = _usable_previous(previous, params.min_ts_ms, receive_ts_ms + params.future_tol_ms)
    chan, prev_value, prev_ts, has_prev = channel_labels(readings, previous, usable)
    uniq = np.unique(_channel_key(readings.meter, readings.quantity))
    return (
        sort_order(readings), chan,
        readings.meter, readings.ts, readings.quantity, readings.value, readings.flags,
        prev_value, prev_ts, has_prev, _carry_rows(uniq, carry or RunCarry.empty()),
        QUANTITY_TABLE, mt, params.record(receive_ts_ms),
    )  # fmt: skip


def validate_batch(
    readings: Readings,
    previous: PreviousRegisters,
    meters: MeterParams,
    receive_ts_ms: int,
    params: ValidationParams = ValidationParams(),
    carry: RunCarry | None = None,
) -> Checked:
    """Every per-reading rule (VEE-02..05, 07..13, 16..19, 22, 23): see docs/ingest-kernels.md.

    ``meters`` holds one row per entry of the batch's meter-id table (``registry.params(ids)``);
    ``carry`` the run state of the batch's channels after earlier batches (VEE-08/09/19).
    Raises: TypeError/ValueError naming the column for a wrong dtype, shape or meter index."""
    args = validate_args(readings, previous, meters, receive_ts_ms, params, carry)
    carry_in = args[10]
    flags, delta, anchor_ts, carry_out = k.validate(*args)
    uniq = np.unique(_channel_key(readings.meter, readings.quantity))
    moved = np.flatnonzero((carry_out != carry_in).any(axis=1))
    out = RunCarry(
        (uniq[moved] >> 16).astype(np.uint32), (uniq[moved] & 0xFFFF).astype(np.uint16), carry_out[moved]
    )
    return Checked(flags, delta, anchor_ts, args[0], out)


@dataclass(frozen=True, slots=True)
class Intervals:
    """End-labelled interval energies, multiplier applied (0.01 kWh units x CT·PT)."""

    meter: npt.NDArray[np.uint32]
    quantity: npt.NDArray[np.uint16]
    end_ts: I64
    energy: I64
    flags: npt.NDArray[np.uint32]


ENERGY_CHANNELS = (  # forward total, T1..T4, reverse total
    ENERGY_FORWARD,
    *(by_name(f"energy_fwd_active_t{t}").code for t in range(1, 5)),
    ENERGY_REVERSE,
)


def aggregate_intervals(
    readings: Readings,
    checked: Checked,
    meters: MeterParams,
    params: ValidationParams = ValidationParams(),
    *,
    quantities: tuple[int, ...] = ENERGY_CHANNELS,
    like: Intervals | None = None,
) -> Intervals:
    """VEE-01 interval energy from register deltas on the ``params.interval_ms`` grid, VEE-20
    estimation of gaps of at most ``params.max_gap_intervals`` missing intervals (2 h by
    default), VEE-21 flat estimation up to ``params.flat_gap_max_intervals`` (3 weeks; longer
    gaps stay gaps), VEE-22 PROLONGED_EST and VEE-23 no estimation across an OUTAGE. VEE-06
    needs the whole day: :func:`relative_spikes`, in the daily job.

    ``like``: stored intervals of the same meters (meter indexes of ``readings``), read for the
    like days of this batch's flat gaps (:func:`like_day_window`); given, every flat gap with
    :data:`LIKE_DAYS` like days (or fewer, at least one) within :data:`LIKE_DAY_WEEKS` weeks is
    re-spread by their shape and flagged EST_HIST instead of EST_FLAT (VEE-21).
    Raises: TypeError/ValueError naming the column."""
    n = len(readings)
    _col("checked.delta", checked.delta, np.int64, n)
    _col("checked.anchor_ts", checked.anchor_ts, np.int64, n)
    _col("checked.flags", checked.flags, np.uint32, n)
    _col("meters.multiplier", meters.multiplier, np.int64)
    selected = np.zeros(_NQ, dtype=np.bool_)
    selected[list(quantities)] = True
    out = k.intervals(
        readings.meter,
        readings.ts,
        readings.quantity,
        checked.flags,
        checked.delta,
        checked.anchor_ts,
        selected,
        meters.multiplier,
        params.interval_ms,
        params.max_gap_intervals,
        params.flat_gap_max_intervals,
        params.prolonged_est_ms,
    )
    iv = Intervals(*out)
    if like is None or not has_flat_gaps(iv):
        return iv
    n_ref = like.end_ts.shape[0]
    like_dtypes = (("meter", np.uint32), ("quantity", np.uint16), ("energy", np.int64), ("flags", np.uint32))
    for name, dtype in like_dtypes:
        _col(f"like.{name}", getattr(like, name), dtype, n_ref)
    _col("like.end_ts", like.end_ts, np.int64)
    order = np.lexsort((like.end_ts, like.quantity, like.meter))
    energy, flags = k.like_day_spread(
        readings.meter, readings.ts, readings.quantity, checked.flags, checked.delta, checked.anchor_ts,
        selected, params.interval_ms, max(params.max_gap_intervals, params.flat_gap_max_intervals),
        iv.energy, iv.flags, like.meter[order], like.quantity[order], like.end_ts[order],
        like.energy[order], like.flags[order], 7 * DAY_MS, LIKE_DAY_WEEKS, LIKE_DAYS,
    )  # fmt: skip
    return Intervals(iv.meter, iv.quantity, iv.end_ts, energy, flags)


def has_flat_gaps(iv: Intervals) -> bool:
    """Does ``iv`` hold rows spread flat over a long gap (EST_FLAT), i.e. would like days help?"""
    return bool((iv.flags & np.uint32(k.F_EST_FLAT)).any())


def like_day_window(iv: Intervals, interval_ms: int = INTERVAL_MS) -> tuple[int, int]:
    """``(start_ms, end_ms]`` of the interval ends :func:`aggregate_intervals` may look up as like
    days of the flat gaps in ``iv``: their slots 1 .. :data:`LIKE_DAY_WEEKS` weeks earlier.
    Raises ValueError when ``iv`` has no flat gap."""
    ends = iv.end_ts[(iv.flags & np.uint32(k.F_EST_FLAT)) != 0]
    if not ends.shape[0]:
        raise ValueError("no flat gap in the intervals")
    return int(ends.min()) - LIKE_DAY_WEEKS * 7 * DAY_MS - interval_ms, int(ends.max()) - 7 * DAY_MS


def relative_spikes(
    iv: Intervals, params: ValidationParams = ValidationParams(), *, utc_offset_ms: int = SHANGHAI_MS
) -> npt.NDArray[np.uint32]:
    """VEE-06 over whole local days: the flags of ``iv`` with SPIKE_REL recomputed per (meter,
    quantity, local day at ``utc_offset_ms``) from every row given (a SPIKE_REL already set is
    cleared first, so the result depends only on the energies and the other flags: a rerun over
    the same rows gives the same flags). Give it a whole day of a channel's intervals: a part of
    the day ranks only that part. Raises: TypeError/ValueError naming the column."""
    n = iv.end_ts.shape[0]
    _col("iv.meter", iv.meter, np.uint32, n)
    _col("iv.quantity", iv.quantity, np.uint16, n)
    _col("iv.energy", iv.energy, np.int64, n)
    _col("iv.flags", iv.flags, np.uint32, n)
    _col("iv.end_ts", iv.end_ts, np.int64)
    day = (iv.end_ts - params.interval_ms + utc_offset_ms) // DAY_MS
    labels, ngroups, _ = group_labels(iv.meter.astype(np.int64), iv.quantity.astype(np.int64), day)
    flags = iv.flags & np.uint32(~k.F_SPIKE_REL & 0xFFFF_FFFF)
    out: npt.NDArray[np.uint32] = k.relative_spikes(
        labels, ngroups, iv.energy, flags, params.spike_rel_floor, params.spike_rel_pct
    )
    return out


def group_labels(*keys: I64) -> tuple[I64, int, I64]:
    """Dense labels of the distinct key tuples: (labels, ngroups, first row of each group)."""
    if keys[0].shape[0] == 0:
        e = np.empty(0, dtype=np.int64)
        return e, 0, e
    order = np.lexsort(keys[::-1])
    labels, first = k.labels_from_order(order, np.stack([np.asarray(key, dtype=np.int64) for key in keys]))
    return labels, int(first.shape[0]), first


@dataclass(frozen=True, slots=True)
class Totals:
    """Per (meter, quantity, bucket): billable energy and interval counts."""

    meter: npt.NDArray[np.uint32]
    quantity: npt.NDArray[np.uint16]
    start_ts: I64
    energy: I64
    n_actual: I64
    n_estimated: I64
    n_invalid: I64


def _bucket_start(end_ts: I64, interval_ms: int, bucket_ms: int, utc_offset_ms: int) -> I64:
    # An end-labelled interval belongs to the bucket holding its start (the 24:00 interval is day D).
    return (end_ts - interval_ms + utc_offset_ms) // bucket_ms * bucket_ms - utc_offset_ms


def interval_totals(
    iv: Intervals,
    *,
    bucket_ms: int = DAY_MS,
    interval_ms: int = INTERVAL_MS,
    utc_offset_ms: int = SHANGHAI_MS,
) -> Totals:
    """Hourly (``bucket_ms=3_600_000``) or local-day totals. Not-billable intervals (SPIKE,
    WENT_BACKWARDS, METER_REPLACED) are counted in ``n_invalid`` and left out of ``energy``."""
    return bucket_partials(iv, bucket_ms=bucket_ms, interval_ms=interval_ms, utc_offset_ms=utc_offset_ms)[0]


def bucket_partials(
    iv: Intervals, *, bucket_ms: int, interval_ms: int = INTERVAL_MS, utc_offset_ms: int = SHANGHAI_MS
) -> tuple[Totals, I64]:
    """:func:`interval_totals` and, per total, the start of its earliest interval."""
    start = _bucket_start(iv.end_ts, interval_ms, bucket_ms, utc_offset_ms)
    labels, ng, first = group_labels(iv.meter.astype(np.int64), iv.quantity.astype(np.int64), start)
    tot, n_act, n_est, n_bad = k.group_totals(labels, ng, iv.energy, iv.flags)
    first_start = k.group_min(labels, ng, iv.end_ts) - interval_ms
    return Totals(iv.meter[first], iv.quantity[first], start[first], tot, n_act, n_est, n_bad), first_start


@dataclass(frozen=True, slots=True)
class TouDays:
    """Per (meter, local day): calendar split of the total register against the tariff registers
    (columns sharp, peak, flat, valley), the largest interval, and VEE-15 bucket mismatches
    (``mismatch`` would be ``TOU_CAL_MISMATCH``, a bit protocols/flags.py does not have)."""

    meter: npt.NDArray[np.uint32]
    day_start_ts: I64
    calendar: npt.NDArray[np.int64]
    registers: npt.NDArray[np.int64]
    largest: I64
    mismatch: npt.NDArray[np.bool_]


def tou_periods(
    end_ts: I64, calendar: TariffCalendar, *, interval_ms: int = INTERVAL_MS
) -> npt.NDArray[np.uint8]:
    """TOU-03: the period (1 sharp .. 4 valley) of each end-labelled interval, by its start: the
    calendar version in force then (TOU-05), the day's override, holiday or make-up workday if it
    has one, else its season's workday or weekend profile."""
    periods: npt.NDArray[np.uint8] = k.tou_periods(
        end_ts,
        interval_ms,
        calendar.utc_offset_ms,
        calendar.version_from,
        calendar.month_season,
        calendar.day_profile,
        calendar.profiles,
        calendar.dated_days,
        calendar.dated_profile,
    )
    return periods


def tou_split(
    iv: Intervals,
    calendar: TariffCalendar,
    *,
    interval_ms: int = INTERVAL_MS,
    period: npt.NDArray[np.uint8] | None = None,
) -> TouDays:
    """TOU-03 classification by interval start, VEE-15 cross-check against T1..T4 deltas.
    ``period`` (one per interval) overrides ``calendar``'s, e.g. for meters on other tariffs;
    the local day still comes from ``calendar``'s UTC offset."""
    if period is None:
        period = tou_periods(iv.end_ts, calendar, interval_ms=interval_ms)
    day = _bucket_start(iv.end_ts, interval_ms, DAY_MS, calendar.utc_offset_ms)
    labels, ng, first = group_labels(iv.meter.astype(np.int64), day)
    cal, reg, big, bad = k.tou_split(labels, ng, iv.quantity, iv.energy, iv.flags, period)
    return TouDays(iv.meter[first], day[first], cal, reg, big, bad)


@dataclass(frozen=True, slots=True)
class LineLoss:
    """Per (area, local day): LL-01 supply, sales, loss (0.01 kWh), rate in 0.01 %, LL-02 class."""

    area: I64
    day_start_ts: I64
    supply: I64
    sales: I64
    loss: I64
    rate_bp: I64
    klass: npt.NDArray[np.uint8]
    customers_present: I64

    CLASSES = ("QUALIFIED", "HIGH", "NEGATIVE", "NOT_COMPUTABLE", "INCOMPLETE", "OUT_OF_SERVICE")


def line_loss(
    daily: Totals,
    meters: MeterParams,
    area_sizes: I64,
    *,
    intervals_per_day: int = 96,
    min_complete_pct: int | I64 = 98,
    high_bp: int | I64 = 1_000,
) -> LineLoss:
    """LL-01/02 from daily totals of forward (1) and reverse (6) active energy, multiplier applied.

    A meter-day counts when all its intervals are there, actual or estimated, and none is invalid.
    ``area_sizes`` is customers per area (``registry.area_sizes()``); meters without an area are
    ignored. ``min_complete_pct`` and ``high_bp`` are one band for all, or one per area (indexed
    like ``area_sizes``: LL-02 bands per area type). The 3-day persistence alarm of LL-02 is the
    caller's (it spans batches)."""
    area_of_row = meters.area[daily.meter].astype(np.int64)
    keep = (area_of_row >= 0) & np.isin(daily.quantity, (1, 6))
    meter = daily.meter[keep].astype(np.int64)
    day, q, area = daily.start_ts[keep], daily.quantity[keep], area_of_row[keep]
    ok = (daily.n_actual + daily.n_estimated == intervals_per_day)[keep] & (daily.n_invalid[keep] == 0)
    rows, nrows, first = group_labels(meter, day)
    fwd = np.zeros(nrows, np.int64)
    rev = np.zeros(nrows, np.int64)
    fwd_ok = np.zeros(nrows, np.bool_)
    rev_ok = np.zeros(nrows, np.bool_)
    is_fwd = q == 1
    fwd[rows[is_fwd]], fwd_ok[rows[is_fwd]] = daily.energy[keep][is_fwd], ok[is_fwd]
    rev[rows[~is_fwd]], rev_ok[rows[~is_fwd]] = daily.energy[keep][~is_fwd], ok[~is_fwd]
    r_area, r_day = area[first], day[first]
    labels, ng, gfirst = group_labels(r_area, r_day)
    g_area = r_area[gfirst]
    expected = area_sizes[g_area] if ng else np.empty(0, np.int64)

    def per_group(band: int | I64) -> I64:
        per_area = np.broadcast_to(np.asarray(band, dtype=np.int64), area_sizes.shape)
        return np.ascontiguousarray(per_area[g_area])

    out = k.line_loss(
        labels,
        ng,
        meters.master[meter[first]],
        fwd,
        fwd_ok,
        rev,
        rev_ok,
        expected.astype(np.int64),
        per_group(min_complete_pct),
        per_group(high_bp),
    )
    return LineLoss(g_area, r_day[gfirst], *out)


@dataclass(frozen=True, slots=True)
class DayCompleteness:
    """What a billing user asks: for meter M, day D, how complete is the interval data."""

    meter_id: str
    day: dt.date
    expected: int
    actual: int
    estimated: int
    invalid: int
    duplicates: int

    @property
    def intervals(self) -> int:
        return self.actual + self.estimated

    def __str__(self) -> str:
        return (
            f"{self.meter_id} {self.day}: {self.intervals} of {self.expected} intervals, "
            f"{self.duplicates} duplicates, {self.estimated} estimated, {self.invalid} invalid"
        )


@dataclass(frozen=True, slots=True)
class CompletenessReport:
    """Per (meter, local day) counts for one register channel; counts add up across batches.
    KPI-01: estimated intervals do not count as collected (``actual / expected``)."""

    meter_ids: tuple[str, ...]
    meter: npt.NDArray[np.uint32]
    day_start_ts: I64
    actual: I64
    estimated: I64
    invalid: I64
    duplicates: I64
    expected_per_day: int
    utc_offset_ms: int
    _index: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for r, (m, d) in enumerate(zip(self.meter.tolist(), self.day_start_ts.tolist(), strict=True)):
            self._index[(m, d)] = r

    def query(self, meter_id: str, day: dt.date) -> DayCompleteness:
        """Raises: KeyError when the meter is not in this report's meter-id table."""
        m = self.meter_ids.index(meter_id) if meter_id in self.meter_ids else None
        if m is None:
            raise KeyError(f"meter {meter_id!r} not in this report")
        start = (day - dt.date(1970, 1, 1)).days * DAY_MS - self.utc_offset_ms
        r = self._index.get((m, start))
        vals = (
            (0, 0, 0, 0)
            if r is None
            else (int(self.actual[r]), int(self.estimated[r]), int(self.invalid[r]), int(self.duplicates[r]))
        )
        return DayCompleteness(meter_id, day, self.expected_per_day, *vals)

    def rates(self, group_of_meter: I64, group_size: I64) -> tuple[I64, I64, I64, I64]:
        """KPI-01 curve completeness per (group, day) for gateway or area groups:
        ``(group, day_start_ts, received, expected)`` with expected = meters in service x 96."""
        g = group_of_meter[self.meter].astype(np.int64)
        labels, ng, first = group_labels(g, self.day_start_ts)
        received = k.group_count(
            np.repeat(labels, self.actual), ng, np.ones(int(self.actual.sum()), np.bool_)
        )
        grp = g[first]
        return grp, self.day_start_ts[first], received, group_size[grp] * self.expected_per_day


def completeness(
    iv: Intervals,
    readings: Readings,
    checked: Checked,
    meter_ids: tuple[str, ...] | list[str],
    *,
    quantity: int = 1,
    interval_ms: int = INTERVAL_MS,
    utc_offset_ms: int = SHANGHAI_MS,
) -> CompletenessReport:
    """VEE-13 / KPI-01 counts per (meter, day) of one channel; duplicates come from the readings."""
    sel = iv.quantity == quantity
    d_sel = (readings.quantity == quantity) & ((checked.flags & k.F_DUPLICATE) != 0)
    meter = np.concatenate([iv.meter[sel], readings.meter[d_sel]]).astype(np.int64)
    day = np.concatenate(
        [
            _bucket_start(iv.end_ts[sel], interval_ms, DAY_MS, utc_offset_ms),
            _bucket_start(readings.ts[d_sel], interval_ms, DAY_MS, utc_offset_ms),
        ]
    )
    flags = np.concatenate([iv.flags[sel], np.zeros(int(d_sel.sum()), np.uint32)])
    is_dup = np.concatenate([np.zeros(int(sel.sum()), np.bool_), np.ones(int(d_sel.sum()), np.bool_)])
    labels, ng, first = group_labels(meter, day)
    _, n_act, n_est, n_bad = k.group_totals(labels[~is_dup], ng, iv.energy[sel], flags[~is_dup])
    dups = k.group_count(labels, ng, is_dup)
    return CompletenessReport(
        tuple(meter_ids),
        meter[first].astype(np.uint32),
        day[first],
        n_act,
        n_est,
        n_bad,
        dups,
        DAY_MS // interval_ms,
        utc_offset_ms,
    )


@dataclass(frozen=True, slots=True)
class Outages:
    """OUT-02: ``alarm_of_event[i]`` is the alarm event i attached to (-1: none); per alarm its
    area, opening time and number of attached events."""

    alarm_of_event: I64
    alarm_area: I64
    alarm_ts: I64
    alarm_events: I64


def area_outages(
    event_meter: npt.NDArray[np.uint32],
    event_ts: I64,
    meters: MeterParams,
    area_sizes: I64,
    *,
    window_ms: int = 120_000,
    k_min: int = 3,
    pct: int = 30,
) -> Outages:
    """Correlate power-down events (OUT-01: meter events, or points whose phase voltages all
    collapsed) into one alarm per area. Raises: TypeError/ValueError naming the column."""
    n = _col("event_meter", event_meter, np.uint32).shape[0]
    _col("event_ts", event_ts, np.int64, n)
    area = meters.area.astype(np.int64)
    order = np.lexsort((event_ts, area[event_meter])).astype(np.int64)
    return Outages(
        *k.area_outages(
            order,
            event_meter,
            event_ts,
            meters.area,
            meters.master,
            area_sizes.astype(np.int64),
            window_ms,
            k_min,
            pct,
        )
    )
