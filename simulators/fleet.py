"""Fleet generator: N gateways x M meters of 15-minute readings, with anomalies and their ground truth.

Sans-I/O: nothing here opens a socket or a file unless a caller asks (:meth:`GroundTruth.save`,
:meth:`GroundTruth.load`). Deterministic: the same :class:`FleetSpec` (seed included) gives the
same bytes, whatever the caller does between calls.

Contract
--------
* ``Fleet(spec)`` lays out the fleet: gateway ids ``{prefix}-{g:05d}``, meter ids of 12 digits
  (``{g+1:07d}{j:05d}``), a load profile per meter (residential, commercial, PV), transformer areas
  of ``area_size`` meters inside each gateway, and the schedule of every injected anomaly (drawn
  once, up front, from the seed).
* ``fleet.uploads(k)`` for the boundaries ``k = 0 .. spec.intervals - 1`` *in order*, each exactly
  once: every gateway's readings of the point ``t_k = start_ms + (k + 1) * interval`` as
  :class:`Upload` objects ordered by their offset after the boundary (the burst). An upload holds
  exactly what an edge agent hands to :meth:`gateway.outbox.Outbox.add_batch`: ``topic``,
  ``make_payload(seq) -> bytes`` and ``prev``; the generator keeps each gateway's "previous value
  sent" of its cumulative channels itself, the way the edge's outbox does.
* The truth (:class:`GroundTruth`) is recorded as the boundaries are generated: every reading
  sent (numpy columns), every expected interval row with its flags (estimation included), and one
  record per injected anomaly with the rule it exercises and what that rule must produce.
  Hourly and daily time-of-use totals and prepaid charges are computed from the expected interval
  rows by plain numpy here, not by the pipeline's kernels.
* Values are fixed-point integers as on the wire: energy 0.01 kWh, voltage 0.1 V, current mA,
  power 0.0001 kW, ``meter_clock`` epoch ms of meter-local time (UTC+8, as DL/T 645 meters keep it).
* Generation is vectorised per boundary (numpy over all meters at once); no Python object per
  reading is made, so a day of 100,000 meters takes minutes.

Anomalies (``AnomalyRates``; ``docs/fleet.md`` has each expectation and the rule behind it):
rollover (VEE-02), meter replacement (VEE-03), spike (VEE-05), gap (VEE-13/20), duplicate
(VEE-10), clock skew (VEE-12), phase loss (VEE-17), area outage (VEE-23, OUT-01/02), replay of old
batches ((gateway, seq) de-duplication), and the gateway clock jump (:meth:`Fleet.jump_clock`).
"""

from __future__ import annotations

import io
import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from protocols import payload, topics
from protocols.flags import Flag

__all__ = [
    "ANOMALY_KINDS",
    "NOT_BILLABLE",
    "PROFILES",
    "AnomalyRates",
    "Fleet",
    "FleetSpec",
    "GroundTruth",
    "Upload",
    "default_start_ms",
    "tou_period",
]

I64 = npt.NDArray[np.int64]
U32 = npt.NDArray[np.uint32]
F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]

UTC_OFFSET_MS = 8 * 3_600_000
"""Local time of the fleet's meters and of its tariff calendar (China: UTC+8, no DST)."""
DAY_MS = 86_400_000
OUTAGE_HOLD_S = 1800  # ingest's [pipeline] outage_hold_s default (OUT-02)
PROFILES = ("residential", "commercial", "pv")
ANOMALY_KINDS = (
    "clean",
    "rollover",
    "replacement",
    "spike",
    "gap",
    "duplicate",
    "clock_skew",
    "phase_loss",
    "area_outage",
    "replay",
    "clock_jump",
)
"""Anomaly kind codes: the index in this tuple is the ``kind`` column of the truth."""
K = {name: i for i, name in enumerate(ANOMALY_KINDS)}
RULE_OF = {
    "rollover": "VEE-02",
    "replacement": "VEE-03",
    "spike": "VEE-05",
    "gap": "VEE-20",
    "duplicate": "VEE-10",
    "clock_skew": "VEE-12",
    "phase_loss": "VEE-17",
    "area_outage": "OUT-02",
    "replay": "dedup",
    "clock_jump": "VEE-12",
}

NOT_BILLABLE = int(Flag.SPIKE | Flag.WENT_BACKWARDS | Flag.METER_REPLACED | Flag.FAST_RUNNING | Flag.STOPPED)
"""Interval flags that keep an interval's energy out of totals and charges (docs/rules.md,
Conventions) -- restated here from the docs, so the truth does not borrow ingest's constant."""

# Quantity codes (protocols/quantities.py) and the channel layout of the value matrix.
Q_FWD, Q_REV, Q_VA, Q_VB, Q_VC, Q_IA, Q_IB, Q_IC, Q_P, Q_CLOCK = 1, 6, 30, 31, 32, 33, 34, 35, 40, 101
CHANNELS = np.array([Q_FWD, Q_REV, Q_VA, Q_VB, Q_VC, Q_IA, Q_IB, Q_IC, Q_P, Q_CLOCK], dtype=np.uint16)
C_FWD, C_REV, C_VA, C_VB, C_VC, C_IA, C_IB, C_IC, C_P, C_CLOCK = range(10)
# quantities read per profile (residential / commercial 3-phase / PV)
_PRESENT = np.array(
    [
        [1, 0, 1, 0, 0, 1, 0, 0, 1, 1],
        [1, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 1],
    ],
    dtype=bool,
)
_PHASES = np.array([1, 3, 1], dtype=np.int64)
_IMAX_A = np.array([60, 100, 60], dtype=np.int64)
UN_V = 220
REGISTER_SPAN = 100_000_000  # 999999.99 kWh + 0.01: the energy registers wrap here (6 digits)
_FINE = 1000  # internal register unit: 0.00001 kWh, so fractions of 0.01 kWh accumulate exactly

# Tariff calendar of the fleet: the built-in one of ingest (every day type alike).
TOU_SEGMENTS = (
    ("00:00", "08:00", "valley"),
    ("08:00", "10:00", "flat"),
    ("10:00", "11:30", "peak"),
    ("11:30", "13:00", "sharp"),
    ("13:00", "17:00", "flat"),
    ("17:00", "22:00", "peak"),
    ("22:00", "24:00", "valley"),
)
PERIODS = ("sharp", "peak", "flat", "valley")
TARIFF_PRICES = {"sharp": 12_000, "peak": 9_000, "flat": 6_000, "valley": 3_000}
"""Prices of the fleet's prepaid tariff, 0.0001 yuan/kWh (TOU-02), no tiers."""


def default_start_ms(days_back: int = 3, now_ms: int | None = None) -> int:
    """Local (UTC+8) midnight ``days_back`` days before today: every period a run touches is closed."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    today = (now + UTC_OFFSET_MS) // DAY_MS
    return (today - days_back) * DAY_MS - UTC_OFFSET_MS


def tou_period(start_ms: I64) -> npt.NDArray[np.int8]:
    """Period index (0 sharp, 1 peak, 2 flat, 3 valley) of intervals *starting* at ``start_ms``
    (TOU-03), by the fleet's calendar :data:`TOU_SEGMENTS`."""
    minute = ((np.asarray(start_ms, dtype=np.int64) + UTC_OFFSET_MS) % DAY_MS) // 60_000
    out = np.empty(minute.shape, dtype=np.int8)
    for lo, hi, name in TOU_SEGMENTS:
        a = int(lo[:2]) * 60 + int(lo[3:])
        b = int(hi[:2]) * 60 + int(hi[3:])
        out[(minute >= a) & (minute < b)] = PERIODS.index(name)
    return out


@dataclass(frozen=True, slots=True)
class AnomalyRates:
    """How often each anomaly is injected. Units:

    * ``rollover``: share of meters whose energy register starts a little below 999999.99 kWh and
      wraps during the run (VEE-02).
    * ``replacement``, ``spike``, ``gap``, ``duplicate``, ``clock_skew``: per meter and boundary
      (a meter-interval): probability that the point starts such an event.
    * ``phase_loss``: per three-phase (commercial) meter and boundary.
    * ``area_outage``: per transformer area and boundary (areas of at least 3 meters).
    * ``replay``: per gateway and boundary: the gateway re-publishes its batches of the last
      ``replay_intervals`` boundaries, byte for byte, with their original seqs.

    ``min_each`` forces at least that many events of every kind (when the fleet has room for
    them), so a small fleet exercises every rule.
    """

    rollover: float = 0.001
    replacement: float = 2e-5
    spike: float = 5e-5
    gap: float = 1e-4
    duplicate: float = 1e-4
    clock_skew: float = 5e-5
    phase_loss: float = 5e-5
    area_outage: float = 2e-5
    replay: float = 0.0
    min_each: int = 0
    max_gap_intervals: int = 4
    replay_intervals: int = 4

    def __post_init__(self) -> None:
        for name in ("rollover", "replacement", "spike", "gap", "duplicate", "clock_skew", "phase_loss",
                     "area_outage", "replay"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"rates.{name}: expected a probability in [0, 1], got {value!r}")
        if not 1 <= self.max_gap_intervals <= 8:
            raise ValueError("rates.max_gap_intervals: expected 1..8 (VEE-20 interpolates up to 8)")
        if self.min_each < 0 or self.replay_intervals < 1:
            raise ValueError("rates.min_each must be >= 0 and rates.replay_intervals >= 1")

    @classmethod
    def none(cls) -> AnomalyRates:
        """Clean data: no anomaly at all."""
        return cls(0, 0, 0, 0, 0, 0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """What fleet to generate. Every field is checked here (``ValueError`` naming the field).

    ``start_ms`` (UTC epoch ms) must lie on the interval grid; the first point is read at
    ``start_ms + interval`` and its ``prev`` registers are the values at ``start_ms``.
    ``profile_mix`` are the shares of residential, commercial (three-phase) and PV meters.
    ``burst_s``: each gateway uploads at an offset in ``[0, burst_s)`` after the boundary,
    ``burst_shape`` ``"uniform"`` or ``"front"`` (exponential, most uploads early).
    ``prepaid_share``: share of meters with a prepaid account in fee control.
    """

    gateways: int = 4
    meters_per_gateway: int = 20
    intervals: int = 32
    interval_s: int = 900
    start_ms: int = field(default_factory=default_start_ms)
    seed: int = 0
    profile_mix: tuple[float, float, float] = (0.7, 0.2, 0.1)
    rates: AnomalyRates = field(default_factory=AnomalyRates)
    burst_s: float = 60.0
    burst_shape: Literal["uniform", "front"] = "uniform"
    area_size: int = 0
    """Meters per transformer area (areas never span gateways); 0: one area per gateway."""
    gateway_prefix: str = "fgw"
    max_readings_per_batch: int = 5000
    payload_version: int = 1
    encoding: Literal["binary", "json"] = "binary"
    prepaid_share: float = 0.25
    history_intervals: int = 8
    """Boundaries of payloads kept per gateway for :meth:`Fleet.replay_payloads`."""

    def __post_init__(self) -> None:
        if not 1 <= self.gateways <= 1_000_000:
            raise ValueError("gateways: expected 1..1000000")
        if not 1 <= self.meters_per_gateway <= 1024:
            raise ValueError("meters_per_gateway: expected 1..1024 (a concentrator's maximum)")
        if self.intervals < 1:
            raise ValueError("intervals: expected at least 1")
        if self.interval_s <= 0 or DAY_MS % (self.interval_s * 1000):
            raise ValueError("interval_s: must divide a day")
        if self.start_ms % (self.interval_s * 1000):
            raise ValueError("start_ms: must lie on the interval grid")
        mix = tuple(float(x) for x in self.profile_mix)
        if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
            raise ValueError("profile_mix: expected three non-negative shares, not all 0")
        if not 0 <= self.burst_s <= self.interval_s:
            raise ValueError("burst_s: expected 0..interval_s")
        if self.burst_shape not in ("uniform", "front"):
            raise ValueError("burst_shape: expected 'uniform' or 'front'")
        if self.area_size < 0:
            raise ValueError("area_size: expected >= 0")
        topics.check_gateway_id(f"{self.gateway_prefix}-00000")
        if self.max_readings_per_batch < 100:
            raise ValueError("max_readings_per_batch: expected at least 100")
        if self.payload_version not in payload.READINGS_VERSIONS:
            raise ValueError(f"payload_version: expected one of {payload.READINGS_VERSIONS}")
        if self.encoding not in ("binary", "json"):
            raise ValueError("encoding: expected 'binary' or 'json'")
        if not 0 <= self.prepaid_share <= 1:
            raise ValueError("prepaid_share: expected 0..1")
        if self.history_intervals < 0:
            raise ValueError("history_intervals: expected >= 0")

    @property
    def interval_ms(self) -> int:
        return self.interval_s * 1000

    @property
    def meters(self) -> int:
        return self.gateways * self.meters_per_gateway

    @property
    def end_ms(self) -> int:
        """Time of the last point (the end of the last interval)."""
        return self.start_ms + self.intervals * self.interval_ms

    def point_ms(self, k: int) -> int:
        """Time of boundary ``k``'s point (the end of interval ``k``)."""
        return self.start_ms + (k + 1) * self.interval_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> FleetSpec:
        d = dict(doc)
        d["rates"] = AnomalyRates(**d.get("rates", {}))
        d["profile_mix"] = tuple(d.get("profile_mix", (0.7, 0.2, 0.1)))
        return cls(**d)


@dataclass(frozen=True, slots=True, eq=False)
class Upload:
    """One batch a gateway hands to its outbox after boundary ``k``.

    Publish it the edge's way: ``outbox.add_batch(upload.topic, upload.make_payload,
    prev=upload.prev)``. ``make_payload(seq)`` encodes the batch with that sequence number (and
    records the bytes for :meth:`Fleet.replay_payloads`); it may be called again with the same
    seq and returns the same bytes. ``offset_s`` is the simulated time after the boundary at which
    the gateway sends it; ``sent_ms`` is the batch's ``sent_ms`` (the gateway's clock).
    """

    gateway: str
    k: int
    offset_s: float
    topic: str
    sent_ms: int
    readings: int
    make_payload: Callable[[int], bytes]
    _prev: Callable[[], dict[tuple[str, int], tuple[int, int]]]

    @property
    def prev(self) -> dict[tuple[str, int], tuple[int, int]]:
        """``{(meter, quantity): (value, ts_ms)}`` of the cumulative readings this batch carries:
        what the edge records as the next batch's previous registers (built on each access)."""
        return self._prev()


# -------------------------------------------------------------------------------------------------
# ground truth


_READ_COLS = {
    "meter": np.uint32,  # global meter index
    "ts": np.int64,
    "quantity": np.uint16,
    "value": np.int64,
    "expect": np.uint32,  # flag bits the pipeline must set on it (a subset of what it sets)
    "kind": np.uint8,  # ANOMALY_KINDS index of the anomaly that touched it (0 clean)
    "copy": np.uint8,  # 1: a repeat (VEE-10), stored in reading_duplicate, not meter_reading
}
_INTERVAL_COLS = {
    "meter": np.uint32,
    "quantity": np.uint16,
    "end": np.int64,
    "energy": np.int64,  # 0.01 kWh, as ingest stores it (multiplier 1)
    "expect": np.uint32,
    "billable": np.bool_,
    "kind": np.uint8,
}
_ANOMALY_COLS = {
    "kind": np.uint8,
    "meter": np.int64,  # global meter index; -1 for an area or gateway event
    "gateway": np.int64,
    "area": np.int64,
    "ts": np.int64,  # the point the anomaly shows at
    "param": np.int64,  # kind-specific: gap length, skew ms, replay count, outage length ...
    "expect": np.uint32,  # flag bits required on the anomaly's reading/interval
}


class _Columns:
    """Append-only numpy columns (chunks, concatenated on read)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self._spec = dict(spec)
        self._chunks: dict[str, list[npt.NDArray[Any]]] = {k: [] for k in spec}
        self._cache: dict[str, npt.NDArray[Any]] | None = None

    def add(self, **cols: Any) -> None:
        arrays = {name: np.asarray(cols[name], dtype=dtype) for name, dtype in self._spec.items()}
        n = max((a.shape[0] for a in arrays.values() if a.ndim), default=1)
        for name, dtype in self._spec.items():
            a = arrays[name]
            if a.ndim == 0:
                a = np.full(n, a, dtype=dtype)
            self._chunks[name].append(a)
        self._cache = None

    def columns(self) -> dict[str, npt.NDArray[Any]]:
        if self._cache is None:
            self._cache = {
                k: (np.concatenate(v) if v else np.empty(0, dtype=self._spec[k]))
                for k, v in self._chunks.items()
            }
            self._chunks = {k: [a] for k, a in self._cache.items()}
        return self._cache


@dataclass(slots=True, eq=False)
class GroundTruth:
    """What was sent and what the pipeline must make of it.

    Columns (numpy, one entry per item, see ``docs/fleet.md``):

    * ``readings``: ``meter`` (global index), ``ts``, ``quantity``, ``value``, ``expect`` (flag
      bits the pipeline must set), ``kind`` (the anomaly that touched it, 0 clean), ``copy``
      (1: a repeat that belongs in ``reading_duplicate``).
    * ``intervals``: the interval rows ingest must store for the energy channels: ``meter``,
      ``quantity``, ``end``, ``energy``, ``expect``, ``billable``, ``kind``.
    * ``anomalies``: one row per injected anomaly: ``kind``, ``meter``, ``gateway``, ``area``,
      ``ts``, ``param``, ``expect``; its rule id is :data:`RULE_OF` of the kind.
    * ``alarms``: the area-outage alarms ingest must raise: ``area`` index and opening ``ts``.

    ``meter_ids()``, ``gateway_ids()``, ``area_ids()`` turn indices into ids; ``profile``,
    ``area_of``, ``prepaid`` are per-meter columns.
    """

    spec: FleetSpec
    profile: npt.NDArray[np.int8]
    area_of: npt.NDArray[np.int32]
    prepaid: B
    readings_cols: _Columns = field(default_factory=lambda: _Columns(_READ_COLS))
    intervals_cols: _Columns = field(default_factory=lambda: _Columns(_INTERVAL_COLS))
    anomalies_cols: _Columns = field(default_factory=lambda: _Columns(_ANOMALY_COLS))
    alarm_area: list[int] = field(default_factory=list)
    alarm_ts: list[int] = field(default_factory=list)
    batches: dict[str, int] = field(default_factory=dict)
    """Per gateway id, how many batches :meth:`Upload.make_payload` encoded (first encodings)."""
    replayed: int = 0
    """Batches re-published byte for byte (each must be absorbed by de-duplication)."""
    boundaries_done: int = 0

    # --- ids --------------------------------------------------------------------------------------

    def meter_ids(self) -> list[str]:
        s = self.spec
        return [f"{g + 1:07d}{j:05d}" for g in range(s.gateways) for j in range(s.meters_per_gateway)]

    def gateway_ids(self) -> list[str]:
        return [f"{self.spec.gateway_prefix}-{g:05d}" for g in range(self.spec.gateways)]

    def area_ids(self) -> list[str]:
        n = int(self.area_of.max()) + 1 if self.area_of.size else 0
        return [f"TA-{a:06d}" for a in range(n)]

    def gateway_of(self, meter: npt.NDArray[Any]) -> I64:
        return np.asarray(meter, dtype=np.int64) // self.spec.meters_per_gateway

    # --- columns ---------------------------------------------------------------------------------

    @property
    def readings(self) -> dict[str, npt.NDArray[Any]]:
        return self.readings_cols.columns()

    @property
    def intervals(self) -> dict[str, npt.NDArray[Any]]:
        return self.intervals_cols.columns()

    @property
    def anomalies(self) -> dict[str, npt.NDArray[Any]]:
        return self.anomalies_cols.columns()

    @property
    def alarms(self) -> dict[str, I64]:
        return {
            "area": np.array(self.alarm_area, dtype=np.int64),
            "ts": np.array(self.alarm_ts, dtype=np.int64),
        }

    def anomaly_counts(self) -> dict[str, int]:
        kinds = self.anomalies["kind"]
        out = {name: int(np.count_nonzero(kinds == i)) for i, name in enumerate(ANOMALY_KINDS) if i}
        return out

    # --- totals (independent of the pipeline's kernels) --------------------------------------------

    def totals(self, bucket: Literal["hour", "day"], quantity: int = Q_FWD) -> dict[str, npt.NDArray[Any]]:
        """Billable energy per (meter, local hour or day of the interval's *start*): ``meter``,
        ``start`` (bucket start, UTC ms), ``total`` and, for ``"day"``, ``sharp``, ``peak``,
        ``flat``, ``valley`` (TOU-03 split by the fleet calendar), plus the counts ``intervals``
        (rows), ``estimated`` and ``invalid`` (not billable)."""
        iv = self.intervals
        sel = iv["quantity"] == quantity
        meter = iv["meter"][sel].astype(np.int64)
        start = iv["end"][sel] - self.spec.interval_ms
        energy = np.where(iv["billable"][sel], iv["energy"][sel], 0)
        size = 3_600_000 if bucket == "hour" else DAY_MS
        bstart = (start + UTC_OFFSET_MS) // size * size - UTC_OFFSET_MS
        keys, inv = np.unique(np.stack([meter, bstart]), axis=1, return_inverse=True)
        inv = inv.reshape(-1)
        n = keys.shape[1]
        out: dict[str, npt.NDArray[Any]] = {
            "meter": keys[0],
            "start": keys[1],
            "total": np.bincount(inv, weights=energy, minlength=n).astype(np.int64),
            "intervals": np.bincount(inv, minlength=n).astype(np.int64),
            "estimated": np.bincount(
                inv, weights=(iv["expect"][sel] & Flag.ESTIMATED) != 0, minlength=n
            ).astype(np.int64),
            "invalid": np.bincount(inv, weights=~iv["billable"][sel], minlength=n).astype(np.int64),
        }
        if bucket == "day":
            period = tou_period(start)
            for p, name in enumerate(PERIODS):
                out[name] = np.bincount(inv, weights=np.where(period == p, energy, 0), minlength=n).astype(
                    np.int64
                )
        return out

    def expected_charges(self, prices: Mapping[str, int] = TARIFF_PRICES) -> dict[str, npt.NDArray[Any]]:
        """Fee-control charges per prepaid meter, from the billable forward-active intervals
        (estimated ones included: the default estimate policy ``charge``, FC-04): per meter
        ``micro_yuan`` = sum of energy (0.01 kWh) x period price (0.0001 yuan/kWh), an exact
        integer in micro-yuan, and ``fen`` = round-half-up(micro_yuan / 10,000) (TOU-06, one
        meter per account), plus ``intervals`` charged."""
        iv = self.intervals
        sel = (iv["quantity"] == Q_FWD) & self.prepaid[iv["meter"]]
        meter = iv["meter"][sel].astype(np.int64)
        energy = np.where(iv["billable"][sel], iv["energy"][sel], 0)
        price = np.array([prices[p] for p in PERIODS], dtype=np.int64)[
            tou_period(iv["end"][sel] - self.spec.interval_ms)
        ]
        meters = np.flatnonzero(self.prepaid)
        idx = np.searchsorted(meters, meter)
        micro = np.zeros(meters.shape[0], dtype=np.int64)
        np.add.at(micro, idx, energy * price)
        count = np.bincount(idx, minlength=meters.shape[0]).astype(np.int64)
        return {"meter": meters, "micro_yuan": micro, "fen": (micro + 5_000) // 10_000, "intervals": count}

    # --- files -----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the truth to one ``.npz`` file (numpy columns plus a JSON header)."""
        arrays: dict[str, npt.NDArray[Any]] = {}
        for prefix, cols in (("r_", self.readings), ("i_", self.intervals), ("a_", self.anomalies)):
            arrays.update({prefix + k: v for k, v in cols.items()})
        arrays.update(profile=self.profile, area_of=self.area_of, prepaid=self.prepaid)
        arrays.update({"alarm_" + k: v for k, v in self.alarms.items()})
        header = {
            "spec": self.spec.to_dict(),
            "batches": self.batches,
            "replayed": self.replayed,
            "boundaries_done": self.boundaries_done,
        }
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        with np.load(Path(path)) as z:
            header = json.loads(bytes(z["header"]).decode())
            truth = cls(FleetSpec.from_dict(header["spec"]), z["profile"], z["area_of"], z["prepaid"])
            truth.readings_cols.add(**{k: z["r_" + k] for k in _READ_COLS})
            truth.intervals_cols.add(**{k: z["i_" + k] for k in _INTERVAL_COLS})
            truth.anomalies_cols.add(**{k: z["a_" + k] for k in _ANOMALY_COLS})
            truth.alarm_area = [int(x) for x in z["alarm_area"]]
            truth.alarm_ts = [int(x) for x in z["alarm_ts"]]
        truth.batches = {str(k): int(v) for k, v in header["batches"].items()}
        truth.replayed = int(header["replayed"])
        truth.boundaries_done = int(header["boundaries_done"])
        return truth

    def summary(self) -> str:
        r = self.readings
        counts = ", ".join(f"{k} {v}" for k, v in self.anomaly_counts().items() if v)
        return (
            f"{self.spec.gateways} gateways x {self.spec.meters_per_gateway} meters, "
            f"{self.boundaries_done} of {self.spec.intervals} boundaries: {r['meter'].shape[0]:,} readings "
            f"sent, {sum(self.batches.values()):,} batches, {self.intervals['meter'].shape[0]:,} intervals "
            f"expected; anomalies: {counts or 'none'}"
        )


# -------------------------------------------------------------------------------------------------
# the fleet


@dataclass(slots=True)
class _Event:
    """An anomaly scheduled at (meter, k) with a kind-specific parameter."""

    kind: int
    meter: int
    k: int
    param: int


class Fleet:
    """The generator. See the module docstring for the contract."""

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        s = spec
        n = s.meters
        rng = np.random.default_rng([s.seed, 1])
        mix = np.array(s.profile_mix, dtype=np.float64)
        self.profile = rng.choice(3, size=n, p=mix / mix.sum()).astype(np.int8)
        self._phases = _PHASES[self.profile]
        self._imax = _IMAX_A[self.profile]
        self._present = _PRESENT[self.profile]  # (n, channels)
        self._scale = rng.uniform(0.5, 1.6, size=n)
        self._pv_cap = rng.uniform(2.0, 6.0, size=n)
        self._volt_base = rng.integers(2150, 2250, size=n)
        area_size = s.area_size or s.meters_per_gateway
        per_gw = -(-s.meters_per_gateway // area_size)
        local = np.arange(n) % s.meters_per_gateway
        self.area_of = ((np.arange(n) // s.meters_per_gateway) * per_gw + local // area_size).astype(np.int32)
        self.prepaid = rng.random(n) < s.prepaid_share
        # registers in 0.00001 kWh: forward 100..60000 kWh, reverse (PV) 100..5000 kWh
        self._fwd = rng.integers(10_000_000, 6_000_000_000, size=n, dtype=np.int64)
        self._rev = np.where(
            self.profile == 2, rng.integers(10_000_000, 500_000_000, size=n, dtype=np.int64), 0
        )
        self._gw_ids = [f"{s.gateway_prefix}-{g:05d}" for g in range(s.gateways)]
        self._meter_ids = [
            f"{g + 1:07d}{j:05d}" for g in range(s.gateways) for j in range(s.meters_per_gateway)
        ]
        self.truth = GroundTruth(s, self.profile, self.area_of, self.prepaid)
        self._events: dict[int, list[_Event]] = {}
        self._busy = np.zeros((n, s.intervals + 2), dtype=bool)
        self._schedule(np.random.default_rng([s.seed, 2]))
        # what each gateway sent last per cumulative channel (the edge's "previous value sent")
        self._sent_fwd = self._fwd // _FINE
        self._sent_rev = self._rev // _FINE
        self._sent_ts = np.full(n, s.start_ms, dtype=np.int64)
        self._clock_jump_ms = np.zeros(s.gateways, dtype=np.int64)
        self._history: list[deque[tuple[int, int, str, bytes]]] = [
            deque() for _ in range(s.gateways)
        ]  # (k, seq, topic, payload)
        self._next_k = 0
        self._down_until = np.full(n, -1, dtype=np.int64)  # outage: last k the meter is down
        self._gap: dict[int, tuple[int, int]] = {}  # meter -> (first, last) boundary not sent
        self._pending: dict[int, tuple[int, int]] = {}  # meter -> true (fwd, rev) energy while not sent
        self.jumped_from: dict[int, int] = {}  # gateway index -> first boundary after a clock jump

    # --- ids ---------------------------------------------------------------------------------------

    @property
    def gateways(self) -> tuple[str, ...]:
        return tuple(self._gw_ids)

    def meters(self, gateway: str) -> tuple[str, ...]:
        g = self._gw_ids.index(gateway)
        m = self.spec.meters_per_gateway
        return tuple(self._meter_ids[g * m : (g + 1) * m])

    # --- schedule ----------------------------------------------------------------------------------

    def _take(self, meter: int, k0: int, k1: int) -> bool:
        """Reserve boundaries k0..k1 (inclusive) of ``meter`` for one anomaly, if free."""
        if k0 < 0 or k1 >= self.spec.intervals or self._busy[meter, k0 : k1 + 1].any():
            return False
        self._busy[meter, k0 : k1 + 1] = True
        return True

    def _count(self, rng: np.random.Generator, slots: int, rate: float) -> int:
        n = int(rng.binomial(slots, rate)) if slots and rate else 0
        return max(n, self.spec.rates.min_each) if slots else 0

    def _schedule(self, rng: np.random.Generator) -> None:
        s, r = self.spec, self.spec.rates
        n, ki = s.meters, s.intervals
        # rollover: meters starting just below the top of the register, excluded from the rest
        nroll = min(n, self._count(rng, n, r.rollover))
        if nroll:
            roll = rng.choice(n, size=nroll, replace=False)
            below = rng.integers(5, 40, size=nroll) * _FINE  # 0.05..0.40 kWh below the wrap
            self._fwd[roll] = REGISTER_SPAN * _FINE - below
            self._busy[roll, :] = True
        meters = np.arange(n)
        three = meters[self.profile == 1]
        plan: list[tuple[str, np.ndarray, int, int]] = [  # kind, candidates, span before, span after
            ("replacement", meters, 0, 1),
            ("spike", meters, 0, 1),
            ("gap", meters, 0, r.max_gap_intervals),
            ("duplicate", meters, 1, 0),
            ("clock_skew", meters, 0, 0),
            ("phase_loss", three, 0, 0),
        ]
        for kind, cand, before, after in plan:
            if not cand.size:
                continue
            count = self._count(rng, cand.size * ki, getattr(r, kind))
            for _ in range(count * 4):  # collisions are skipped; a few more tries for min_each
                if count <= 0:
                    break
                m = int(cand[rng.integers(cand.size)])
                k = int(rng.integers(ki))
                if kind == "gap":
                    param = int(rng.integers(1, r.max_gap_intervals + 1))
                    ok = self._take(m, k, k + param)  # missing k..k+param-1, closing k+param
                elif kind == "clock_skew":
                    param = int(rng.integers(6, 60)) * 60_000 * (1 if rng.random() < 0.5 else -1)
                    ok = self._take(m, k, k)
                elif kind == "phase_loss":
                    param = int(rng.integers(3))
                    ok = self._take(m, k, k)
                elif kind == "duplicate":
                    param = int(rng.integers(2))  # 0: repeated in the same batch; 1: prev repeated
                    ok = self._take(m, k - before, k)
                else:
                    param = 0
                    ok = self._take(m, k - before, k + after)
                if ok:
                    self._events.setdefault(k, []).append(_Event(K[kind], m, k, param))
                    count -= 1
        # area outages: every meter of an area down for 1 or 2 boundaries, areas of >= 3 meters;
        # two outages of an area start more than ingest's default outage_hold_s apart (closer,
        # the second joins the first's alarm: one alarm, where the truth would count two)
        areas, sizes = np.unique(self.area_of, return_counts=True)
        big = areas[sizes >= 3]
        count = self._count(rng, big.size * ki, r.area_outage) if big.size else 0
        apart = OUTAGE_HOLD_S // s.interval_s + 1
        starts: dict[int, list[int]] = {}
        for _ in range(count * 4):
            if count <= 0:
                break
            a = int(big[rng.integers(big.size)])
            d = int(rng.integers(1, 3))
            k = int(rng.integers(ki))
            members = np.flatnonzero(self.area_of == a)
            if k + d >= ki or self._busy[members, k : k + d + 1].any():
                continue
            if any(abs(k - k0) < apart for k0 in starts.get(a, ())):
                continue
            starts.setdefault(a, []).append(k)
            self._busy[members, k : k + d + 1] = True
            self._events.setdefault(k, []).append(_Event(K["area_outage"], a, k, d))
            count -= 1
        # replays: per (gateway, boundary); at least min_each when the history allows
        count = self._count(rng, s.gateways * ki, r.replay) if s.history_intervals else 0
        tries = 0
        while count > 0 and tries < count * 4 + 8 and ki > 1:
            tries += 1
            g = int(rng.integers(s.gateways))
            k = int(rng.integers(1, ki))
            if any(e.kind == K["replay"] and e.meter == g for e in self._events.get(k, [])):
                continue
            self._events.setdefault(k, []).append(_Event(K["replay"], g, k, min(r.replay_intervals, k)))
            count -= 1

    # --- generation ----------------------------------------------------------------------------------

    def _load_kw(self, t_mid: int, rng: np.random.Generator) -> tuple[F64, F64]:
        """Mean power of each meter over the interval around ``t_mid`` (kW, import positive) and
        the PV export (kW, >= 0)."""
        local = (t_mid + UTC_OFFSET_MS) % DAY_MS / 3_600_000
        weekday = ((t_mid + UTC_OFFSET_MS) // DAY_MS + 3) % 7 < 5  # 1970-01-01 was a Thursday
        n = self.spec.meters
        noise = 1 + 0.15 * rng.standard_normal(n)
        morning = np.exp(-(((local - 7.5) / 1.2) ** 2))
        evening = np.exp(-(((local - 19.5) / 2.0) ** 2))
        home = self._scale * (0.15 + 0.45 * morning + 1.3 * evening) * np.clip(noise, 0.5, 1.6)
        business = (
            1 / (1 + np.exp(-(local - 8) * 3)) / (1 + np.exp((local - 18) * 3)) * (1.0 if weekday else 0.3)
        )
        shop = self._scale * (2.0 + 16.0 * business) * np.clip(noise, 0.7, 1.3)
        sun = max(0.0, float(np.sin(np.pi * (local - 6) / 12))) if 6 < local < 18 else 0.0
        gen = self._pv_cap * sun * np.clip(1 + 0.1 * rng.standard_normal(n), 0.5, 1.2)
        kw = np.where(self.profile == 1, shop, home)
        export = np.where(self.profile == 2, np.maximum(gen - kw, 0.0), 0.0)
        kw = np.where(self.profile == 2, np.maximum(kw - gen, 0.0), kw)
        return kw, export

    def uploads(self, k: int) -> list[Upload]:
        """The uploads of boundary ``k`` (call for k = 0, 1, ... in order, each once), ordered by
        ``offset_s``; the truth of the boundary is recorded before this returns."""
        s = self.spec
        if k != self._next_k:
            raise ValueError(f"uploads({k}): boundaries go in order, the next is {self._next_k}")
        if k >= s.intervals:
            raise ValueError(f"uploads({k}): the fleet has {s.intervals} boundaries")
        self._next_k += 1
        n = s.meters
        t = s.point_ms(k)
        rng = np.random.default_rng([s.seed, 3, k])
        kw, export = self._load_kw(t - s.interval_ms // 2, rng)
        events = self._events.get(k, [])
        kinds: dict[int, list[_Event]] = {}
        for e in events:
            kinds.setdefault(e.kind, []).append(e)

        # outages (VEE-23 / OUT-01): the meters of the area draw nothing while down
        for e in kinds.get(K["area_outage"], []):
            members = np.flatnonzero(self.area_of == e.meter)
            self._down_until[members] = k + e.param - 1
        down = self._down_until >= k
        kw = np.where(down, 0.0, kw)
        export = np.where(down, 0.0, export)

        # registers advance by the interval's energy
        step_fwd = np.rint(kw * s.interval_s / 3600 * 100 * _FINE).astype(np.int64)
        step_rev = np.rint(export * s.interval_s / 3600 * 100 * _FINE).astype(np.int64)
        old_fwd = self._fwd // _FINE
        old_rev = self._rev // _FINE
        self._fwd = self._fwd + step_fwd
        self._rev = self._rev + step_rev
        wrapped = self._fwd >= REGISTER_SPAN * _FINE
        self._fwd = np.where(wrapped, self._fwd - REGISTER_SPAN * _FINE, self._fwd)
        kind_col = np.zeros(n, dtype=np.uint8)
        expect = np.zeros((n, CHANNELS.shape[0]), dtype=np.uint32)
        # true energy of the interval per meter (0.01 kWh), and whether it is billable
        e_fwd = self._fwd // _FINE - old_fwd
        e_fwd = np.where(wrapped, e_fwd + REGISTER_SPAN, e_fwd)
        e_rev = self._rev // _FINE - old_rev
        billable = np.ones(n, dtype=bool)
        iv_expect = np.zeros(n, dtype=np.uint32)
        # the export register's interval: a rollover or spike of the forward register is not its
        billable_rev = np.ones(n, dtype=bool)
        iv_expect_rev = np.zeros(n, dtype=np.uint32)
        anomaly_rows: list[tuple[int, int, int, int, int, int, int]] = []

        def note(kind: str, meter: int, ts: int, param: int, flags: int) -> None:
            g = meter // s.meters_per_gateway if meter >= 0 else -1
            a = int(self.area_of[meter]) if meter >= 0 else -1
            anomaly_rows.append((K[kind], meter, g, a, ts, param, flags))

        for m in np.flatnonzero(wrapped):  # VEE-02
            expect[m, C_FWD] |= np.uint32(Flag.ROLLOVER)
            iv_expect[m] |= np.uint32(Flag.ROLLOVER)
            kind_col[m] = K["rollover"]
            note("rollover", int(m), t, int(e_fwd[m]), int(Flag.ROLLOVER))
        for e in kinds.get(K["replacement"], []):  # VEE-03: a new meter, registers near zero
            m = e.meter
            self._fwd[m] = int(rng.integers(0, 500)) * _FINE
            e_fwd[m] = 0
            if self.profile[m] == 2:
                self._rev[m] = int(rng.integers(0, 500)) * _FINE
                e_rev[m] = 0
                expect[m, C_REV] |= np.uint32(Flag.METER_REPLACED)
            expect[m, C_FWD] |= np.uint32(Flag.METER_REPLACED)
            iv_expect[m] |= np.uint32(Flag.METER_REPLACED)
            iv_expect_rev[m] |= np.uint32(Flag.METER_REPLACED)
            billable[m] = billable_rev[m] = False
            kind_col[m] = K["replacement"]
            note("replacement", m, t, int(self._fwd[m] // _FINE), int(Flag.METER_REPLACED))
        for e in kinds.get(K["spike"], []):  # VEE-05: a jump beyond E_max, which stays
            m = e.meter
            # E_max = U_n * I_max * phases * interval * 1.1, in 0.01 kWh (W s * 1.1 / 36,000)
            emax = UN_V * int(self._imax[m]) * int(self._phases[m]) * s.interval_s * 11 // 360_000
            jump = 3 * emax + int(rng.integers(1, 100))
            self._fwd[m] += jump * _FINE
            if self._fwd[m] >= REGISTER_SPAN * _FINE:
                self._fwd[m] -= REGISTER_SPAN * _FINE
            e_fwd[m] += jump
            expect[m, C_FWD] |= np.uint32(Flag.SPIKE)
            iv_expect[m] |= np.uint32(Flag.SPIKE)
            billable[m] = False
            kind_col[m] = K["spike"]
            note("spike", m, t, jump, int(Flag.SPIKE))
        # --- the point's values ---------------------------------------------------------------------
        vals = np.zeros((n, CHANNELS.shape[0]), dtype=np.int64)
        vals[:, C_FWD] = self._fwd // _FINE
        vals[:, C_REV] = self._rev // _FINE
        p_close = kw * np.clip(1 + 0.05 * rng.standard_normal(n), 0.85, 1.15)
        volts = self._volt_base[:, None] + rng.integers(-40, 41, size=(n, 3))
        share = np.array([0.36, 0.33, 0.31])
        phase_kw = np.where(self._phases[:, None] == 3, p_close[:, None] * share, 0.0)
        phase_kw[:, 0] = np.where(self._phases == 3, phase_kw[:, 0], p_close)
        for e in kinds.get(K["phase_loss"], []):  # VEE-17: one phase collapsed under no load
            m, x = e.meter, e.param
            volts[m, x] = int(rng.integers(0, 100))
            phase_kw[m, x] = 0.0
            p_close[m] = float(phase_kw[m].sum())
            expect[m, C_VA + x] |= np.uint32(Flag.PHASE_LOSS)
            kind_col[m] = K["phase_loss"]
            note("phase_loss", m, t, x, int(Flag.PHASE_LOSS))
        volts = np.where(down[:, None], 0, volts)
        vals[:, C_VA : C_VC + 1] = volts
        amps = np.rint(phase_kw * 1e6 / np.maximum(volts / 10, 1.0)).astype(np.int64)
        vals[:, C_IA : C_IC + 1] = np.where(down[:, None], 0, amps)
        vals[:, C_P] = np.where(down, 0, np.rint(p_close * 10_000)).astype(np.int64)
        jump = self._clock_jump_ms[np.arange(n) // s.meters_per_gateway]
        vals[:, C_CLOCK] = t + UTC_OFFSET_MS + rng.integers(-3_000, 3_000, size=n)
        for e in kinds.get(K["clock_skew"], []):  # VEE-12: the meter's clock is off
            m = e.meter
            vals[m, C_CLOCK] += e.param
            expect[m] |= np.uint32(Flag.CLOCK_SKEW)
            kind_col[m] = K["clock_skew"]
            note("clock_skew", m, t, e.param, int(Flag.CLOCK_SKEW))
        skewed = np.abs(jump) > 300_000  # VEE-12: a gateway clock jump puts every meter clock off
        if skewed.any():
            expect[skewed] |= np.uint32(Flag.CLOCK_SKEW)
            kind_col[skewed] = K["clock_jump"]
        if down.any():  # VEE-23: every reading of a power-down point
            expect[down] |= np.uint32(Flag.OUTAGE)
            kind_col[down] = K["area_outage"]
        # The closing reading after an outage starts its interval at a power-down point, but
        # that point was in an earlier batch: a batch sees only its own readings, so it is not
        # flagged OUTAGE (docs/rules.md, VEE-23 and "What a batch sees"). Left out of the
        # false-flag count either way.
        after = (self._down_until == k - 1) & (k > 0) & ~down
        iv_expect[down] |= np.uint32(Flag.OUTAGE)
        iv_expect_rev[down] |= np.uint32(Flag.OUTAGE)
        kind_col[after] = K["area_outage"]
        for e in kinds.get(K["area_outage"], []):
            members = np.flatnonzero(self.area_of == e.meter)
            self.truth.alarm_area.append(e.meter)
            self.truth.alarm_ts.append(t)
            anomaly_rows.append(
                (
                    K["area_outage"],
                    -1,
                    int(members[0]) // s.meters_per_gateway,
                    e.meter,
                    t,
                    e.param,
                    int(Flag.OUTAGE),
                )
            )

        # --- which meters send, and what ---------------------------------------------------------
        sending = np.ones(n, dtype=bool)
        gap_close: dict[int, int] = {}  # meter -> first boundary of the gap it closes
        for e in kinds.get(K["gap"], []):  # VEE-13/20: readings k..k+param-1 never sent
            self._gap[e.meter] = (k, k + e.param - 1)
            note("gap", e.meter, t, e.param, int(Flag.GAP_BEFORE | Flag.ESTIMATED))
        for m, (first, last) in list(self._gap.items()):
            if k <= last:
                sending[m] = False
            else:
                gap_close[m] = first
                del self._gap[m]
        # record the expected interval rows (estimation across gaps, VEE-20)
        self._record_intervals(
            k, t, (e_fwd, e_rev), (billable, billable_rev), (iv_expect, iv_expect_rev), kind_col, sending,
            gap_close,
        )  # fmt: skip
        for m in gap_close:
            expect[m, C_FWD] |= np.uint32(Flag.GAP_BEFORE)
            expect[m, C_REV] |= np.uint32(Flag.GAP_BEFORE)
            kind_col[m] = K["gap"]

        # rows of the point: meter-major, channel order as CHANNELS
        mask = self._present & sending[:, None]
        rm, rc = np.nonzero(mask)
        r_val = vals[rm, rc]
        r_q = CHANNELS[rc]
        r_exp = expect[rm, rc]
        r_kind = kind_col[rm]
        gw_of_row = rm // s.meters_per_gateway
        r_ts = t + self._clock_jump_ms[gw_of_row]
        # duplicates (VEE-10): repeats appended to the batch
        dups: dict[int, list[tuple[I64, I64, npt.NDArray[np.uint16], I64]]] = {}
        for e in kinds.get(K["duplicate"], []):
            m = e.meter
            g = m // s.meters_per_gateway
            if not sending[m]:
                continue
            if e.param == 0:  # the whole point again, in the same batch (not the clock: see docs)
                cs = np.flatnonzero(self._present[m] & (CHANNELS != Q_CLOCK))
                rep_val, rep_ts = (
                    vals[m, cs],
                    np.full(cs.shape[0], t + self._clock_jump_ms[g], dtype=np.int64),
                )
            else:  # the previous point's energy registers again (equal to the batch's prev)
                cs = np.flatnonzero(self._present[m] & np.isin(CHANNELS, (Q_FWD, Q_REV)))
                prev_vals = np.where(CHANNELS[cs] == Q_FWD, self._sent_fwd[m], self._sent_rev[m])
                rep_val, rep_ts = (
                    prev_vals.astype(np.int64),
                    np.full(cs.shape[0], self._sent_ts[m], dtype=np.int64),
                )
            dups.setdefault(g, []).append(
                (np.full(cs.shape[0], m, dtype=np.int64), rep_ts, CHANNELS[cs], rep_val)
            )
            kind_col[m] = K["duplicate"]
            r_kind = np.where(rm == m, K["duplicate"], r_kind)
            note("duplicate", m, t, e.param, int(Flag.DUPLICATE))
        self.truth.readings_cols.add(
            meter=rm, ts=r_ts, quantity=r_q, value=r_val, expect=r_exp, kind=r_kind, copy=0
        )
        for reps in dups.values():
            for dm, dts, dq, dv in reps:
                self.truth.readings_cols.add(
                    meter=dm,
                    ts=dts,
                    quantity=dq,
                    value=dv,
                    expect=int(Flag.DUPLICATE),
                    kind=K["duplicate"],
                    copy=1,
                )

        # --- uploads, per gateway ----------------------------------------------------------------
        offsets = self._offsets(rng)
        bounds = np.searchsorted(gw_of_row, np.arange(s.gateways + 1))
        out: list[Upload] = []
        for g in range(s.gateways):
            lo, hi = int(bounds[g]), int(bounds[g + 1])
            cols = [rm[lo:hi], r_ts[lo:hi], r_q[lo:hi], r_val[lo:hi]]
            if g in dups:
                for dm, dts, dq, dv in dups[g]:
                    cols = [np.concatenate([c, x]) for c, x in zip(cols, (dm, dts, dq, dv), strict=True)]
            out.extend(self._gateway_uploads(g, k, t, float(offsets[g]), *cols))
        # the edge records what it sent as the next previous registers
        sent = sending.copy()
        self._sent_fwd = np.where(sent, vals[:, C_FWD], self._sent_fwd)
        self._sent_rev = np.where(sent, vals[:, C_REV], self._sent_rev)
        self._sent_ts = np.where(sent, t + jump, self._sent_ts)
        # replays (dedup): old batches of a gateway again, byte for byte
        for e in kinds.get(K["replay"], []):
            anomaly_rows.append((K["replay"], -1, e.meter, -1, t, e.param, 0))
        if anomaly_rows:
            cols_a = list(zip(*anomaly_rows, strict=True))
            self.truth.anomalies_cols.add(**dict(zip(_ANOMALY_COLS, cols_a, strict=True)))
        self.truth.boundaries_done = k + 1
        out.sort(key=lambda u: u.offset_s)
        return out

    def _record_intervals(
        self,
        k: int,
        t: int,
        energy: tuple[I64, I64],
        billable: tuple[B, B],
        iv_expect: tuple[U32, U32],
        kind_col: npt.NDArray[np.uint8],
        sending: B,
        gap_close: Mapping[int, int],
    ) -> None:
        """Expected interval rows of boundary ``k``: one per sending meter and energy channel;
        a meter closing a gap gets the gap's rows spread evenly (VEE-20: floor of delta / steps,
        the remainder on the last), ESTIMATED and GAP_BEFORE."""
        s = self.spec
        pend = self._pending
        e_fwd, e_rev = energy
        for m in np.flatnonzero(~sending):
            f, r = pend.get(int(m), (0, 0))
            pend[int(m)] = (f + int(e_fwd[m]), r + int(e_rev[m]))
        plain = sending.copy()
        for m in gap_close:
            plain[m] = False
        for c, q, has in ((0, Q_FWD, np.ones(s.meters, dtype=bool)), (1, Q_REV, self.profile == 2)):
            sel = np.flatnonzero(plain & has)
            self.truth.intervals_cols.add(
                meter=sel,
                quantity=q,
                end=t,
                energy=energy[c][sel],
                expect=iv_expect[c][sel],
                billable=billable[c][sel],
                kind=kind_col[sel],
            )
        for m, first_k in gap_close.items():
            f, r = pend.pop(m)
            steps = k - first_k + 1
            for q, total, has in (
                (Q_FWD, f + int(e_fwd[m]), True),
                (Q_REV, r + int(e_rev[m]), self.profile[m] == 2),
            ):
                if not has:
                    continue
                each = total // steps
                energy = np.full(steps, each, dtype=np.int64)
                energy[-1] = total - each * (steps - 1)
                ends = s.point_ms(first_k) + np.arange(steps, dtype=np.int64) * s.interval_ms
                estimated = int(Flag.ESTIMATED | Flag.GAP_BEFORE)
                self.truth.intervals_cols.add(
                    meter=m,
                    quantity=q,
                    end=ends,
                    energy=energy,
                    expect=estimated,
                    billable=True,
                    kind=K["gap"],
                )

    def _offsets(self, rng: np.random.Generator) -> F64:
        s = self.spec
        if s.burst_s == 0:
            return np.zeros(s.gateways)
        if s.burst_shape == "front":
            return np.minimum(rng.exponential(s.burst_s / 5, size=s.gateways), s.burst_s * 0.999)
        return rng.uniform(0, s.burst_s, size=s.gateways)

    def _gateway_uploads(
        self,
        g: int,
        k: int,
        t: int,
        offset_s: float,
        meter: I64,
        ts: I64,
        quantity: npt.NDArray[np.uint16],
        value: I64,
    ) -> Iterator[Upload]:
        s = self.spec
        gw = self._gw_ids[g]
        topic = topics.readings(gw)
        base = g * s.meters_per_gateway
        sent_ms = t + int(offset_s * 1000) + int(self._clock_jump_ms[g])
        # A meter's rows (its repeats with them) stay in one batch, as an edge reads a meter into
        # one batch: a repeat is a duplicate within its batch (VEE-10), which a split would hide.
        order = np.argsort(meter, kind="stable")
        meter, ts, quantity, value = meter[order], ts[order], quantity[order], value[order]
        starts = np.flatnonzero(np.r_[True, meter[1:] != meter[:-1]])
        lo, end = 0, meter.shape[0]
        while lo < end:
            hi = lo + s.max_readings_per_batch
            if hi < end:  # cut at the last meter start within the limit (past lo)
                hi = int(starts[np.searchsorted(starts, hi, side="right") - 1])
                if hi <= lo:  # one meter over the limit: a batch of its own
                    nxt = int(np.searchsorted(starts, lo, side="right"))
                    hi = int(starts[nxt]) if nxt < starts.shape[0] else end
            hi = min(hi, end)
            part = slice(lo, hi)
            yield self._upload(
                gw, g, k, offset_s, topic, sent_ms, base, meter[part], ts[part], quantity[part], value[part]
            )
            lo = hi

    def _upload(
        self, gw: str, g: int, k: int, offset_s: float, topic: str, sent_ms: int, base: int,
        meter: I64, ts: I64, quantity: npt.NDArray[np.uint16], value: I64,
    ) -> Upload:  # fmt: skip
        s = self.spec
        local_ids, local = np.unique(meter, return_inverse=True)
        meters = tuple(self._meter_ids[int(i)] for i in local_ids)
        # prev: the last value sent of each cumulative channel of the batch's meters
        pm = np.repeat(np.arange(local_ids.shape[0]), 2)
        pq = np.tile(np.array([Q_FWD, Q_REV], dtype=np.uint16), local_ids.shape[0])
        pv = np.stack([self._sent_fwd[local_ids], self._sent_rev[local_ids]], axis=1).reshape(-1)
        pt = np.repeat(self._sent_ts[local_ids], 2)
        keep = (pq == Q_FWD) | (self.profile[local_ids].repeat(2) == 2)
        prev = payload.PrevRegisters(
            _col(pm[keep].astype(np.uint32)), _col(pq[keep]), _col(pv[keep]), _col(pt[keep])
        )
        cols = (
            _col(local.astype(np.uint32)), _col(ts.astype(np.int64)), _col(quantity.astype(np.uint16)),
            _col(value.astype(np.int64)), _col(np.zeros(meter.shape[0], dtype=np.uint32)),
        )  # fmt: skip
        encoded: dict[int, bytes] = {}
        history = self._history[g]
        truth = self.truth

        def make_payload(seq: int) -> bytes:
            if seq in encoded:
                return encoded[seq]
            batch = payload.ReadingBatch(gw, seq, meters, *cols, prev=prev, sent_ms=sent_ms)
            data = payload.encode(batch, s.encoding, s.payload_version)
            if not encoded:
                truth.batches[gw] = truth.batches.get(gw, 0) + 1
            encoded[seq] = data
            if s.history_intervals:
                history.append((k, seq, topic, data))
                while history and history[0][0] <= k - s.history_intervals:
                    history.popleft()
            return data

        cum = np.isin(quantity, (Q_FWD, Q_REV))

        def prev_map() -> dict[tuple[str, int], tuple[int, int]]:
            ids = [self._meter_ids[int(i)] for i in meter[cum]]
            return {
                (m, int(q)): (int(v), int(t_))
                for m, q, v, t_ in zip(ids, quantity[cum], value[cum], ts[cum], strict=True)
            }

        return Upload(gw, k, offset_s, topic, sent_ms, int(meter.shape[0]), make_payload, prev_map)

    # --- faults the harness drives -----------------------------------------------------------------

    def replays(self, k: int) -> list[tuple[str, str, bytes]]:
        """The replay anomalies scheduled at boundary ``k`` (after :meth:`uploads` of ``k``):
        ``(gateway, topic, payload)`` of old batches to publish again as they are (raw, not
        through the outbox: they keep their original seqs). Counted in ``truth.replayed``."""
        out: list[tuple[str, str, bytes]] = []
        for e in self._events.get(k, []):
            if e.kind == K["replay"]:
                gw = self._gw_ids[e.meter]
                t = self.spec.point_ms(k)
                since = t - (e.param + 1) * self.spec.interval_ms
                out.extend((gw, topic, data) for topic, data in self.replay_payloads(gw, since, t - 1))
        return out

    def replay_payloads(self, gateway: str, since_ms: int, until_ms: int) -> list[tuple[str, bytes]]:
        """``(topic, payload)`` of the gateway's batches of the points in ``[since_ms, until_ms]``
        still in its history (``spec.history_intervals`` boundaries), byte for byte as first
        encoded, oldest first. Each one returned counts in ``truth.replayed``."""
        g = self._gw_ids.index(gateway)
        out = [
            (topic, data)
            for k, _seq, topic, data in self._history[g]
            if since_ms <= self.spec.point_ms(k) <= until_ms
        ]
        self.truth.replayed += len(out)
        return out

    def jump_clock(self, gateway: str, seconds: int) -> None:
        """The gateway's clock jumps by ``seconds`` (a multiple of the interval): from the next
        upload on, its readings and ``sent_ms`` are stamped that much off. The meters' own clocks
        (``meter_clock``) stay right, so ingest must flag every reading of the gateway
        CLOCK_SKEW when the jump exceeds 5 minutes (VEE-12); the truth records the readings as
        sent and expects no interval rows of the gateway's meters from the jump on (intervals
        of a jumped gateway are not checked)."""
        s = self.spec
        if seconds * 1000 % s.interval_ms:
            raise ValueError("jump_clock: seconds must be a multiple of the interval")
        g = self._gw_ids.index(gateway)
        self._clock_jump_ms[g] += seconds * 1000
        self.jumped_from.setdefault(g, self._next_k)
        t = s.point_ms(self._next_k)
        self.truth.anomalies_cols.add(
            kind=K["clock_jump"],
            meter=-1,
            gateway=g,
            area=-1,
            ts=t,
            param=seconds * 1000,
            expect=int(Flag.CLOCK_SKEW),
        )

    # --- configuration text for ingest and fee control ---------------------------------------------

    def registry_toml(self) -> str:
        """The meter registry for ingest (``registry = ...``): rating, area and gateway of every
        meter, and its account when prepaid."""
        s = self.spec
        lines = []
        areas = self.truth.area_ids()
        for i, mid in enumerate(self._meter_ids):
            p = int(self.profile[i])
            lines.append(f'[meters."{mid}"]')
            lines.append(f"voltage_v = {UN_V}\nimax_a = {int(_IMAX_A[p])}\nphases = {int(_PHASES[p])}")
            lines.append(f'tariff = "fleet-tou"\narea = "{areas[int(self.area_of[i])]}"')
            lines.append(f'gateway = "{self._gw_ids[i // s.meters_per_gateway]}"')
            if self.prepaid[i]:
                lines.append(f'account = "AC-{mid}"')
            lines.append("")
        return "\n".join(lines)

    def tariff_toml(self) -> str:
        """The fleet's tariff: the calendar of :data:`TOU_SEGMENTS` for every day type and the
        prices :data:`TARIFF_PRICES` (ingest's ``tariff_calendar`` and fee control's tariff)."""
        segs = ",\n  ".join(f'["{a}", "{b}", "{p}"]' for a, b, p in TOU_SEGMENTS)
        prices = ", ".join(f"{p} = {v}" for p, v in TARIFF_PRICES.items())
        return (
            'id = "fleet-tou"\nutc_offset_minutes = 480\n\n'
            "[seasons.all]\nmonths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]\n"
            'workday = "standard"\n\n'
            f"[profiles.standard]\nsegments = [\n  {segs},\n]\n\n"
            '[[versions]]\nversion = "fleet-1"\neffective_from = 2000-01-01T00:00:00+08:00\n'
            f"prices = {{ {prices} }}\n"
        )


def _col(a: npt.NDArray[Any]) -> memoryview:
    return memoryview(np.ascontiguousarray(a).data)
