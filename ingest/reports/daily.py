"""Daily report job: line loss per transformer area (LL-01/02) and collection success (KPI-01).

Contract
--------
* :func:`compute_report` is pure: one local day's ``daily_tou`` rows (one
  :class:`~ingest.sinks.base.DaySums` per meter and gateway, fields ``SUMS``), the meter registry
  and the day in, a
  :class:`DailyReport` out. Data problems (a registry meter with no data, a meter the registry
  does not know, a null sum) are counts, never exceptions.
* :func:`run_daily_report` reads the day through the :class:`~ingest.sinks.base.Sink`
  (:meth:`~ingest.sinks.base.Sink.day_sums`, and the two days before's area classes for LL-02's
  persistence), computes, and has the sink write the report (area loss, collection and
  ``line_loss`` alarms stamped with the local day's start; that day's ``line_loss`` alarms of
  areas no longer anomalous are removed). It also runs VEE-06 over the whole day
  (:func:`flag_relative_spikes`). A rerun for the same day rewrites the same records:
  it overwrites, never adds. Its writes go through the sink's retry layer
  (:func:`~ingest.sinks.base.retry_until_done`, bounded by ``retry``: ``[influx] max_attempts``
  for the CLI), so a short outage does not fail the job. Raises
  :class:`~protocols.errors.SinkError` when the store stays unreachable or refuses a read or a
  report record.
* It never writes ``daily_tou`` and never runs inside the worker: it is a job for once a day,
  after the day is complete (``docs/ingest-report.md`` has the rules, the schema and a timer).

Rules (``docs/rules.md``)
-------------------------
* KPI-01 / VEE-13, per meter: received = ``intervals - estimated`` (estimated intervals do not
  count as collected; invalid ones are not in ``intervals``), expected = ``DAY_MS // interval_ms``
  (96). Per gateway: the sums over the meters seen under it or bound to it in the registry,
  expected = those meters x 96, so a bound meter that sent nothing costs its gateway 96. Per
  area: the sums over the meters the registry places in it (master included), expected = all of
  them x 96, so a meter that sent nothing costs its area 96.
* LL-01/02: :func:`ingest.rules.stages.line_loss` over each meter's billable forward ``total`` and,
  for meters that read the reverse register, its billable ``rev_total`` (multiplier applied by
  the pipeline): supply = master forward + customers' reverse (PV export inside the area), sales =
  customers' forward + master reverse (export upstream); a reverse day counts when complete, like
  a forward one. The LL-02 band (``high_pct``, ``min_complete_pct``) is the one of the area's
  type (``[line_loss]`` of the config, selected by the registry's ``[areas]``). Every day's class
  is written; the area anomaly (an ``alarms`` point) is raised when a class other than QUALIFIED
  has persisted for ``ANOMALY_DAYS`` consecutive days (this one and the days before, as earlier
  runs wrote them to ``area_loss``).
* VEE-06, per meter, energy channel and local day: :func:`ingest.rules.stages.relative_spikes`
  over every stored interval of the day (a batch holds too few of them to rank), thresholds of
  ``[validation]``. Only intervals whose SPIKE_REL bit changes are rewritten (their flags field,
  the bit set or cleared), so a rerun over unchanged data writes nothing, and one after late
  intervals moves the flag to the day's new highest. The report counts the day's SPIKE_REL
  intervals (``spike_rel``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import unicodedata
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.config import IngestConfig, LineLossSection, load_calendar, load_registry
from ingest.model.registry import MeterRegistry
from ingest.pipeline.rollup import DAY_MS
from ingest.rules import stages as st
from ingest.sinks.base import DaySums, RetryPolicy, Sink, WriteResult, retry_until_done
from protocols.errors import ConfigError, SinkError
from protocols.flags import Flag
from protocols.quantities import ENERGY_FORWARD, ENERGY_REVERSE

__all__ = [
    "ANOMALY_DAYS",
    "AreaLoss",
    "Collection",
    "DailyReport",
    "compute_report",
    "daily_report",
    "day_window",
    "flag_relative_spikes",
    "run_daily_report",
]

log = logging.getLogger("amigw.ingest")

ANOMALY_DAYS = 3  # LL-02: consecutive days not QUALIFIED that raise an area anomaly
_EPOCH = dt.date(1970, 1, 1)
SUMS = ("total", "intervals", "estimated", "invalid", "rev_total", "rev_intervals", "rev_invalid")
I64 = npt.NDArray[np.int64]


@dataclasses.dataclass(frozen=True, slots=True)
class Collection:
    """KPI-01 curve completeness of one meter, gateway or area for the day."""

    level: str  # meter | gateway | area
    id: str
    received: int
    expected: int
    estimated: int
    invalid: int

    @property
    def rate_bp(self) -> int:
        """received / expected in 0.01 % (floor); 0 when nothing was expected."""
        return self.received * 10_000 // self.expected if self.expected else 0


@dataclasses.dataclass(frozen=True, slots=True)
class AreaLoss:
    """LL-01/02 of one area for the day; energies in 0.01 kWh, the rate in 0.01 %."""

    area: str
    supply: int
    sales: int
    loss: int
    rate_bp: int
    klass: str
    customers_present: int
    customers_expected: int
    days_not_qualified: int = 0  # consecutive days up to this one with a class other than QUALIFIED
    area_type: str = ""  # the registry's [areas."<name>"] type; "" = the default band
    high_bp: int = 1_000  # the LL-02 band's HIGH threshold applied, 0.01 %

    @property
    def anomaly(self) -> bool:
        return self.days_not_qualified >= ANOMALY_DAYS


@dataclasses.dataclass(frozen=True, slots=True)
class DailyReport:
    """One local day's report; ``collection`` holds the meter, gateway and area rows, in that order."""

    day: dt.date
    start_ms: int
    utc_offset_ms: int
    areas: tuple[AreaLoss, ...]
    collection: tuple[Collection, ...]
    spike_rel: int = 0  # VEE-06: intervals of the day flagged SPIKE_REL (all meters and channels)

    @property
    def alarms(self) -> tuple[AreaLoss, ...]:
        return tuple(a for a in self.areas if a.anomaly)

    def level(self, level: str) -> tuple[Collection, ...]:
        return tuple(c for c in self.collection if c.level == level)

    def to_dict(self) -> dict[str, Any]:
        """The report as one JSON-able document (``amigw ingest --daily-report DAY --json``)."""
        return {
            "day": self.day.isoformat(),
            "day_start_ms": self.start_ms,
            "utc_offset_ms": self.utc_offset_ms,
            "areas": [_area_doc(a) for a in self.areas],
            "collection": [{**dataclasses.asdict(c), "rate_bp": c.rate_bp} for c in self.collection],
            "alarms": [
                {"area": a.area, "kind": "line_loss", "class": a.klass, "rate_bp": a.rate_bp}
                for a in self.alarms
            ],
            "spike_rel": self.spike_rel,
        }

    def summary(self) -> str:
        """A readable summary: per area loss and collection, per gateway collection, alarms."""
        start = dt.datetime.fromtimestamp(self.start_ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%MZ")
        out = [f"daily report {self.day} (local day from {start}, UTC{_offset(self.utc_offset_ms)})", ""]
        area_coll = {c.id: c for c in self.level("area")}
        w = max([len("area"), *(_width(a.area) for a in self.areas)])
        out.append(
            f"{_ljust('area', w)}  {'supply kWh':>12}  {'sales kWh':>12}  {'loss kWh':>12}  {'loss %':>8}  "
            f"{'class':<14}  customers  collection"
        )
        for a in self.areas:
            c = area_coll.get(a.area)
            rate = _hundredths(a.rate_bp) if a.klass not in ("NOT_COMPUTABLE", "OUT_OF_SERVICE") else "-"
            out.append(
                f"{_ljust(a.area, w)}  {_hundredths(a.supply):>12}  {_hundredths(a.sales):>12}  "
                f"{_hundredths(a.loss):>12}  {rate:>8}  {a.klass:<14}  "
                f"{f'{a.customers_present}/{a.customers_expected}':>9}  {_coll(c) if c else '-'}"
            )
        gws = self.level("gateway")
        w = max([len("gateway"), *(_width(c.id) for c in gws)])
        out += ["", f"{_ljust('gateway', w)}  collection"]
        out += [f"{_ljust(c.id, w)}  {_coll(c)}" for c in gws]
        meters = self.level("meter")
        silent = sum(1 for c in meters if c.received + c.estimated + c.invalid == 0)
        est, bad = sum(c.estimated for c in meters), sum(c.invalid for c in meters)
        out += ["", f"meters: {len(meters)}, {silent} without data, {est} estimated, {bad} invalid intervals"]
        out.append(f"relative spikes (VEE-06): {self.spike_rel} intervals")
        alarms = [
            f"{a.area} {a.klass} {_hundredths(a.rate_bp)} % ({a.days_not_qualified} days not QUALIFIED)"
            for a in self.alarms
        ]
        out.append(f"line-loss alarms: {'; '.join(alarms) if alarms else 'none'}")
        return "\n".join(out)


def _area_doc(a: AreaLoss) -> dict[str, Any]:
    return {
        "area": a.area,
        "supply": a.supply,
        "sales": a.sales,
        "loss": a.loss,
        "rate_bp": a.rate_bp,
        "class": a.klass,
        "customers_present": a.customers_present,
        "customers_expected": a.customers_expected,
        "days_not_qualified": a.days_not_qualified,
        "area_type": a.area_type,
        "high_bp": a.high_bp,
    }


def _width(text: str) -> int:
    """Terminal columns of ``text``: CJK area and gateway names take two per character."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _ljust(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))


def _hundredths(v: int) -> str:
    return f"{'-' if v < 0 else ''}{abs(v) // 100}.{abs(v) % 100:02d}"


def _coll(c: Collection) -> str:
    return f"{_hundredths(c.rate_bp)} % ({c.received}/{c.expected})"


def _offset(ms: int) -> str:
    sign, ms = ("+" if ms >= 0 else "-"), abs(ms)
    return f"{sign}{ms // 3_600_000:02d}:{ms % 3_600_000 // 60_000:02d}"


def day_window(day: dt.date, utc_offset_ms: int) -> tuple[int, int]:
    """``[start, end)`` of the local day in epoch ms."""
    start = (day - _EPOCH).days * DAY_MS - utc_offset_ms
    return start, start + DAY_MS


def _sums(group: I64, ngroups: int, values: I64) -> I64:
    out = np.zeros(ngroups, dtype=np.int64)
    np.add.at(out, group, values)
    return out


def compute_report(
    rows: list[DaySums],
    registry: MeterRegistry,
    day: dt.date,
    *,
    utc_offset_ms: int = st.SHANGHAI_MS,
    interval_ms: int = st.INTERVAL_MS,
    history: dict[str, list[str]] | None = None,
    bands: LineLossSection | None = None,
) -> DailyReport:
    """The report of ``day`` from the day's sums (see the module contract);
    ``history[area]`` is the area's class on the days before, newest first ("" = no report);
    ``bands`` the LL-02 thresholds per area type (default: 10 % and 98 % for every area).

    Raises: ConfigError for an area type ``bands`` does not list."""
    per_day = DAY_MS // interval_ms
    start, _ = day_window(day, utc_offset_ms)
    pairs = [(r.meter, r.gateway) for r in rows]
    # meter table: the registry's meters first (one that sent nothing still has a row), then the
    # meters it does not know, which have no area
    ids = registry.ids + tuple(sorted({m for m, _ in pairs} - set(registry.index)))
    index = {m: i for i, m in enumerate(ids)}
    params = registry.params(ids)
    # a meter bound to a gateway counts for it also on a day it sent nothing under it
    seen = set(pairs)
    silent = [
        (m, registry.gateways[g])
        for m, g in zip(registry.ids, params.gateway.tolist(), strict=False)
        if g >= 0 and (m, registry.gateways[g]) not in seen
    ]
    gateways = sorted({g for _, g in pairs} | {g for _, g in silent})
    g_index = {g: i for i, g in enumerate(gateways)}
    r_meter = np.array([index[m] for m, _ in pairs], dtype=np.int64)
    r_gw = np.array([g_index[g] for _, g in pairs + silent], dtype=np.int64)
    col = {f: np.array([r.sums.get(f) or 0 for r in rows], dtype=np.int64) for f in SUMS}
    r_received = col["intervals"] - col["estimated"]  # KPI-01: estimated is not collected
    n = len(ids)
    total, received, estimated, invalid = (
        _sums(r_meter, n, v) for v in (col["total"], r_received, col["estimated"], col["invalid"])
    )
    collection = [
        Collection("meter", m, int(r), per_day, int(e), int(b))
        for m, r, e, b in zip(ids, received.tolist(), estimated.tolist(), invalid.tolist(), strict=True)
    ]
    none = np.zeros(len(silent), dtype=np.int64)
    gw_cols = {f: np.concatenate((col[f], none)) for f in ("estimated", "invalid")}
    gw_received = np.concatenate((r_received, none))
    collection += _groups("gateway", gateways, r_gw, np.ones_like(r_gw), gw_received, gw_cols, per_day)
    known = params.area >= 0
    a_meter = params.area[known].astype(np.int64)
    area_cols = {"estimated": estimated[known], "invalid": invalid[known]}
    collection += _groups(
        "area", list(registry.areas), a_meter, np.ones_like(a_meter), received[known], area_cols, per_day
    )
    # Forward rows for every meter; reverse rows only for meters that sent reverse intervals (a
    # meter without the register has no export, rather than an incomplete one).
    rev_total, rev_intervals, rev_invalid = (
        _sums(r_meter, n, col[f]) for f in ("rev_total", "rev_intervals", "rev_invalid")
    )
    has_rev = np.flatnonzero((rev_intervals + rev_invalid) > 0)
    m = np.concatenate((np.arange(n), has_rev))
    daily = st.Totals(
        m.astype(np.uint32),
        np.concatenate((np.full(n, ENERGY_FORWARD), np.full(has_rev.shape[0], ENERGY_REVERSE))).astype(
            np.uint16
        ),
        np.full(m.shape[0], start, dtype=np.int64),
        np.concatenate((total, rev_total[has_rev])),
        np.concatenate((received, rev_intervals[has_rev])),
        np.concatenate((estimated, np.zeros(has_rev.shape[0], dtype=np.int64))),
        np.concatenate((invalid, rev_invalid[has_rev])),
    )
    sizes = registry.area_sizes()
    bands = bands or LineLossSection()
    try:
        band = np.array([bands.band(t) for t in registry.area_types], dtype=np.int64).reshape(-1, 2)
    except KeyError as exc:
        raise ConfigError(
            f"line_loss.area_types.{exc.args[0]}", "area type of the registry not listed"
        ) from None
    ll = st.line_loss(
        daily, params, sizes, intervals_per_day=per_day, min_complete_pct=band[:, 0], high_bp=band[:, 1]
    )
    history = history or {}

    def streak(area: str, klass: str) -> int:
        days = 0
        for c in [klass, *history.get(area, [])][:ANOMALY_DAYS]:
            if c in ("", "QUALIFIED"):
                break
            days += 1
        return days

    areas = tuple(
        AreaLoss(
            registry.areas[a], sup, sal, loss, rate, st.LineLoss.CLASSES[k], present, int(sizes[a]),
            streak(registry.areas[a], st.LineLoss.CLASSES[k]), registry.area_types[a] or "",
            int(band[a, 1]),
        )
        for a, sup, sal, loss, rate, k, present in zip(
            ll.area.tolist(), ll.supply.tolist(), ll.sales.tolist(), ll.loss.tolist(),
            ll.rate_bp.tolist(), ll.klass.tolist(), ll.customers_present.tolist(), strict=True,
        )
    )  # fmt: skip
    return DailyReport(day, start, utc_offset_ms, areas, tuple(collection))


def _groups(
    level: str,
    names: list[str],
    group: I64,
    members: I64,
    received: I64,
    cols: dict[str, I64],
    per_day: int,
) -> list[Collection]:
    """Per group: received and the estimated/invalid sums; expected = members x ``per_day``."""
    ng = len(names)
    rec, size = _sums(group, ng, received), _sums(group, ng, members)
    est, bad = _sums(group, ng, cols["estimated"]), _sums(group, ng, cols["invalid"])
    cols_out = zip(names, rec.tolist(), size.tolist(), est.tolist(), bad.tolist(), strict=True)
    return [Collection(level, name, r, s * per_day, e, b) for name, r, s, e, b in cols_out]


_ONE_TRY = RetryPolicy(0.0, 0.0, attempts=1)


async def flag_relative_spikes(
    sink: Sink,
    start_ms: int,
    end_ms: int,
    params: st.ValidationParams,
    *,
    utc_offset_ms: int,
    retry: RetryPolicy = _ONE_TRY,
) -> int:
    """VEE-06 over the day ``[start_ms, end_ms)`` (see the module contract): the intervals whose
    SPIKE_REL bit changes get their flags rewritten (retried per ``retry``). Returns the day's
    SPIKE_REL intervals.

    Raises: SinkError (unreachable, the read refused, or a flags record rejected)."""
    stored = await sink.day_intervals(start_ms, end_ms, st.ENERGY_CHANNELS)
    flags = st.relative_spikes(stored.intervals(), params, utc_offset_ms=utc_offset_ms)
    changed = np.flatnonzero(flags != stored.flags)
    if changed.shape[0]:
        rows = stored.take(changed, flags)
        _check("interval flags", await retry_until_done(lambda: sink.write_interval_flags(rows), retry))
    return int(np.count_nonzero(flags & np.uint32(Flag.SPIKE_REL)))


def _check(what: str, result: WriteResult) -> None:
    if result.rejected:
        raise SinkError(
            f"the store refused {len(result.rejected)} {what} record(s): {result.rejected[0].detail[:300]}",
            retryable=False,
        )


async def run_daily_report(
    sink: Sink,
    registry: MeterRegistry,
    day: dt.date,
    *,
    utc_offset_ms: int = st.SHANGHAI_MS,
    interval_ms: int = st.INTERVAL_MS,
    bands: LineLossSection | None = None,
    params: st.ValidationParams | None = None,
    retry: RetryPolicy = _ONE_TRY,
) -> DailyReport:
    """Read, compute, write (see the module contract); ``params`` the VEE-06 thresholds
    (default: the rules' defaults on the ``interval_ms`` grid); ``retry`` bounds the retries of
    each write (default: one try).

    Raises: SinkError (unreachable, a read refused, or a report or flags record rejected)."""
    start, end = day_window(day, utc_offset_ms)
    params = params or st.ValidationParams(interval_ms=interval_ms)
    spike_rel = await flag_relative_spikes(sink, start, end, params, utc_offset_ms=utc_offset_ms, retry=retry)
    rows = await sink.day_sums(start, end, SUMS)
    before = ANOMALY_DAYS - 1
    by_area = await sink.area_classes(start - before * DAY_MS, start)
    history = {
        a: [by_area.get(a, {}).get(start - d * DAY_MS, "") for d in range(1, before + 1)]
        for a in registry.areas
    }
    report = compute_report(
        rows, registry, day, utc_offset_ms=utc_offset_ms, interval_ms=interval_ms, history=history,
        bands=bands,
    )  # fmt: skip
    report = dataclasses.replace(report, spike_rel=spike_rel)
    _check("report", await retry_until_done(lambda: sink.write_report(report), retry))
    return report


async def daily_report(cfg: IngestConfig, day: dt.date) -> DailyReport:
    """:func:`run_daily_report` with the registry, calendar and sink of ``cfg``.

    Raises: ConfigError (registry, calendar), SinkError (see :func:`run_daily_report`)."""
    from ingest.sinks.configured import configured_sink

    registry = load_registry(cfg)
    offset = load_calendar(cfg).utc_offset_ms
    async with configured_sink(cfg) as sink:
        return await run_daily_report(
            sink, registry, day, utc_offset_ms=offset, interval_ms=cfg.pipeline.interval_s * 1000,
            bands=cfg.line_loss, params=cfg.validation_params(), retry=cfg.influx.one_shot_retry,
        )  # fmt: skip
