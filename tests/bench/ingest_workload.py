"""Workloads of the end-to-end ingest bench: a fleet of edges' readings and what each side writes.

A :class:`Shape` is a meter type (its quantities) and how many meters one message carries; a
:class:`Workload` is that shape over ``meters`` meters and as many 15-minute timestamps as make
about the requested number of readings: one message per (timestamp, gateway), each a single
timestamp of every quantity of the gateway's meters, timestamp-major as the edges send them,
with the batch's ``prev`` registers set as the edge sets them (the value and time of each
cumulative register's previous read). The readings lie a few days back, so every period they
cover is closed. Values are plausible and consistent (power, current and the energy deltas agree,
voltages move), so validation flags next to nothing, as on a healthy fleet.

:func:`readings_lines` is the line protocol of the readings alone (the wide ``meter_reading``
points); :func:`pipeline_lines` is what the sink's encoder writes for each batch
(:func:`~ingest.sinks.influx.lines.encode_writes` of the batch's transform): whatever the pipeline
stores per batch today, without modelling it here. :func:`bodies` cuts lines into requests the
way the sink does (at most 5,000 lines) and gzips them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.pipeline.transform import Settings
from protocols.payload import PrevRegisters, ReadingBatch
from protocols.quantities import by_name
from simulators import bench_anchors as anchors

INTERVAL_MS = 900_000
UTC_OFFSET_MS = 8 * 3_600_000  # the sample tariff calendar's zone
DAYS_BACK = 4

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    label: str
    quantities: tuple[str, ...]
    meters_per_message: int


_TEN = (
    "energy_fwd_active_total", "energy_fwd_active_t1", "energy_fwd_active_t2", "energy_fwd_active_t3",
    "energy_fwd_active_t4", "voltage_a", "voltage_b", "voltage_c", "current_a", "power_active_total",
)  # fmt: skip
_FOUR = ("energy_fwd_active_total", "voltage_a", "current_a", "power_active_total")
SHAPES = {
    s.name: s
    for s in (
        Shape("A", "single-phase household, 4 quantities", _FOUR, 2000),
        Shape("B", "10 quantities (total + T1..T4, 3 voltages, current, power)", _TEN, 800),
    )
}


@dataclass(frozen=True, slots=True)
class Workload:
    shape: Shape
    meters: int
    timestamps: int
    batches: list[ReadingBatch]  # publishing order: timestamp-major, one per gateway

    @property
    def readings(self) -> int:
        return sum(len(b.meter) for b in self.batches)

    @property
    def points(self) -> int:
        """Wide ``meter_reading`` points: one per meter and timestamp."""
        return self.meters * self.timestamps

    @property
    def gateways(self) -> int:
        return self.meters // self.shape.meters_per_message

    def describe(self) -> str:
        s = self.shape
        return (
            f"shape {s.name} ({s.label}): {self.meters:,} meters, {self.gateways} gateways x "
            f"{s.meters_per_message:,} meters, {self.timestamps} timestamps of 15 min, "
            f"{len(self.batches)} messages x {s.meters_per_message * len(s.quantities):,} readings "
            f"= {self.readings:,} readings"
        )


def build(
    shape: Shape,
    meters: int,
    readings: int,
    gw_prefix: str = "gwb",
    days_back: int = DAYS_BACK,
    first_seq: int = 2,
) -> Workload:
    """``meters`` meters (a multiple of the shape's meters per message) and enough timestamps for
    about ``readings`` readings (at least one), from local midnight ``days_back`` days ago; each
    gateway's batches numbered from ``first_seq`` (1 is left for :func:`warm_up`)."""
    per_msg = shape.meters_per_message
    assert meters % per_msg == 0, f"meters must be a multiple of {per_msg}"
    nq = len(shape.quantities)
    n_ts = max(1, round(readings / (meters * nq)))
    # from local midnight (the sample calendar's UTC+8), so a run's days and hours do not depend on
    # the time of day the bench runs at
    today = (time.time_ns() // 1_000_000 + UTC_OFFSET_MS) // 86_400_000
    start = (today - days_back) * 86_400_000 - UTC_OFFSET_MS
    codes = np.array([by_name(n).code for n in shape.quantities], dtype=np.uint16)
    cumulative = np.array([by_name(n).kind == "cumulative" for n in shape.quantities])
    values = _values(shape, meters, n_ts)  # (n_ts + 1, meters, nq); row 0 is the read before
    local = np.arange(per_msg, dtype=np.uint32)
    meter_col = np.repeat(local, nq)
    quantity_col = np.tile(codes, per_msg)
    flags_col = np.zeros(per_msg * nq, dtype=np.uint32)
    cum_codes = codes[cumulative]
    prev_meter = np.repeat(local, cum_codes.shape[0])
    prev_quantity = np.tile(cum_codes, per_msg)
    batches = []
    for k in range(n_ts):
        t = start + (k + 1) * INTERVAL_MS
        for g in range(meters // per_msg):
            lo, hi = g * per_msg, (g + 1) * per_msg
            prev = PrevRegisters(
                _col(prev_meter),
                _col(prev_quantity),
                _col(values[k, lo:hi][:, cumulative].reshape(-1)),
                _col(np.full(prev_meter.shape[0], t - INTERVAL_MS, dtype=np.int64)),
            )
            batches.append(
                ReadingBatch(
                    f"{gw_prefix}-{g:03d}",
                    first_seq + k,
                    tuple(f"{m:012d}" for m in range(lo, hi)),
                    _col(meter_col),
                    _col(np.full(per_msg * nq, t, dtype=np.int64)),
                    _col(quantity_col),
                    _col(values[k + 1, lo:hi].reshape(-1)),
                    _col(flags_col),
                    prev=prev,
                    sent_ms=t,
                )
            )
    return Workload(shape, meters, n_ts, batches)


def _col(a: npt.NDArray[Any]) -> memoryview:
    return memoryview(np.ascontiguousarray(a).data)


def _values(shape: Shape, meters: int, n_ts: int) -> npt.NDArray[np.int64]:
    """Fixed-point values per (read, meter, quantity); read 0 is the one before the first batch.
    Power 0.4-2.0 kW; the total register grows by the energy that power implies over 15 min
    (0.01 kWh = power in 0.0001 kW / 400); tariff register T(1 + (read // 8) % 4) takes the same
    delta (2-hour periods); current follows power at the voltage; voltages move by the read."""
    m = np.arange(meters, dtype=np.int64)[None, :]
    k = np.arange(n_ts + 1, dtype=np.int64)[:, None]
    power = 4000 + (m * 37 + k * 1013) % 16000
    delta = power // 400
    delta[0] = 0
    total = 1_000_000 + m * 11 + np.cumsum(delta, axis=0)
    volts = {p: 2200 + (m * 7 + k * 31 + off) % 200 for p, off in (("a", 0), ("b", 67), ("c", 133))}
    tariff = (k // 8) % 4 + 1
    cols: list[I64] = []
    for name in shape.quantities:
        if name == "energy_fwd_active_total":
            cols.append(total)
        elif name.startswith("energy_fwd_active_t"):
            own = np.where(tariff == int(name[-1]), delta, 0)
            cols.append(250_000 + m * 3 + np.cumsum(own, axis=0))
        elif name.startswith("voltage_"):
            cols.append(volts[name[-1]])
        elif name == "current_a":
            cols.append(power * 1000 // 2300)  # mA at about 230 V
        elif name == "power_active_total":
            cols.append(power)
        else:
            raise ValueError(name)
    return np.stack(cols, axis=-1).astype(np.int64)


def readings_lines(wl: Workload) -> list[bytes]:
    """Per batch, the wide ``meter_reading`` lines of its readings (what they alone cost influxd)."""
    return anchors.readings_lines(wl.batches)


def warm_up(wl: Workload) -> Workload:
    """One timestamp of the same meters and gateways a day before ``wl``: written to a run's
    database before its clock starts, so every run writes into existing series, as a head-end
    with a standing fleet does (creating a series costs influxd far more than a point in it)."""
    first = wl.batches[0]
    day = (int(first.ts[0]) - INTERVAL_MS + UTC_OFFSET_MS) // 86_400_000  # wl's first local day
    days_back = (time.time_ns() // 1_000_000 + UTC_OFFSET_MS) // 86_400_000 - (day - 1)
    return build(wl.shape, wl.meters, 1, first.gateway.rsplit("-", 1)[0], days_back, first.seq - 1)


def conventional_lines(wl: Workload) -> list[bytes]:
    """Per batch, the narrow lines the conventional pipeline writes for it."""
    return anchors.conventional_lines(wl.batches)


def pipeline_lines(wl: Workload, settings: Settings) -> list[bytes]:
    """Per batch, what the sink writes for it: ``encode_writes`` of the batch's transform."""
    return anchors.pipeline_lines(wl.batches, settings)


bodies = anchors.bodies
