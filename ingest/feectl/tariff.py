"""Tariffs as data: time-of-use calendars and tiered blocks, versioned by effective time.

Accepts a TOML document (or the mapping ``tomllib`` makes of it); returns a frozen
:class:`Tariff`; raises :class:`~protocols.errors.ConfigError` naming the dotted key of the first
bad value. Pricing (:meth:`Tariff.price_interval`) is a pure function of the interval's start
time, its energy and the tier-cycle consumption before it; it never reads the clock.

Units: energy in 0.01 kWh, prices in 10⁻⁴ yuan/kWh (the DL/T 645 ``XXXX.XXXX`` price format), so
energy × price is an exact integer in micro-yuan (``docs/rules.md#conventions``, TOU-06).

Document shape (see ``docs/feectl.md`` for a full sample)::

    id = "ln-res"
    zone = "+08:00"                         # fixed offset (DST-free) or an IANA name
    [[versions]]
    version = "2024a"
    effective_from = 2024-01-01T00:00:00+08:00
    prices = { sharp = 9375, peak = 7500, flat = 5000, valley = 2500 }
    holidays = [2024-10-01]                 # day type "holiday"
    makeup_workdays = [2024-10-12]          # weekend days that count as workdays (调休)
    [[versions.calendar]]
    months = [1, 7, 8, 12]                  # default: all months
    day_types = ["workday", "weekend", "holiday"]   # default: all
    segments = [["00:00", "07:30", "flat"], ["07:30", "24:00", "peak"]]
    [[versions.overrides]]                  # per-day calendar, e.g. weather-triggered sharp periods
    date = 2021-07-20
    segments = [["00:00", "24:00", "peak"]]
    [versions.tiers]
    cycle = "monthly"                       # or "annual"
    start_month = 1                         # annual cycles only
    start_day = 1
    thresholds_centi_kwh = [24000, 40000]
    surcharges = [0, 500, 3000]             # added to the period price, per tier
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocols.errors import ConfigError

from ._reader import Section, parse_hhmm, parse_zone

__all__ = [
    "DAY_TYPES",
    "CalendarRule",
    "DayPlan",
    "IntervalPrice",
    "Segment",
    "Tariff",
    "TariffVersion",
    "TierPart",
    "TierTable",
    "load_tariff",
    "tariff_from_mapping",
]

DAY_TYPES = ("workday", "weekend", "holiday")
MINUTES_PER_DAY = 1440


@dataclass(frozen=True, slots=True)
class Segment:
    """Half-open ``[start_min, end_min)`` minutes after local midnight, priced as ``period``."""

    start_min: int
    end_min: int
    period: str

    def __post_init__(self) -> None:
        if not 0 <= self.start_min < self.end_min <= MINUTES_PER_DAY:
            raise ValueError(f"segment: need 0 <= start < end <= 1440, got {self.start_min}..{self.end_min}")


@dataclass(frozen=True, slots=True)
class DayPlan:
    """The periods of one day: segments that cover 24 h with no gap and no overlap (TOU-03)."""

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        edge = 0
        for seg in self.segments:
            if seg.start_min != edge:
                raise ValueError(
                    f"segments: gap or overlap at minute {edge} (next starts at {seg.start_min})"
                )
            edge = seg.end_min
        if edge != MINUTES_PER_DAY:
            raise ValueError(f"segments: must end at 24:00, end at minute {edge}")

    def period_at(self, minute: int) -> str:
        starts = [s.start_min for s in self.segments]
        return self.segments[bisect.bisect_right(starts, minute) - 1].period


@dataclass(frozen=True, slots=True)
class CalendarRule:
    months: frozenset[int]
    day_types: frozenset[str]
    plan: DayPlan


@dataclass(frozen=True, slots=True)
class TierPart:
    tier: int  # 1-based
    energy_centi_kwh: int
    price: int  # 10⁻⁴ yuan/kWh: period price + tier surcharge ("先峰谷、后阶梯", TOU-04)


@dataclass(frozen=True, slots=True)
class IntervalPrice:
    """What one interval costs: the version and period used and the tier split (exact, micro-yuan)."""

    version: str
    period: str
    parts: tuple[TierPart, ...]
    exact_micro: int


@dataclass(frozen=True, slots=True)
class TierTable:
    """TOU-04/05 blocks: cumulative consumption in the cycle ≤ T₁ is tier 1, ≤ T₂ tier 2, above tier 3."""

    cycle: str  # "monthly" | "annual"
    thresholds_centi_kwh: tuple[int, ...]
    surcharges: tuple[int, ...]
    start_month: int = 1
    start_day: int = 1

    def __post_init__(self) -> None:
        if self.cycle not in ("monthly", "annual"):
            raise ValueError(f"cycle: expected 'monthly' or 'annual', got {self.cycle!r}")
        t = self.thresholds_centi_kwh
        if not t or t[0] <= 0 or any(b <= a for a, b in itertools.pairwise(t)):
            # TOU-05: non-increasing thresholds are invalid. We reject them at load (a config error
            # surfaces once, at start) rather than charging without the surcharge at run time.
            raise ValueError(f"thresholds_centi_kwh: must be positive and strictly increasing, got {list(t)}")
        if len(self.surcharges) != len(t) + 1:
            raise ValueError(
                f"surcharges: need {len(t) + 1} values (one per tier), got {len(self.surcharges)}"
            )
        if any(s < 0 for s in self.surcharges):
            raise ValueError("surcharges: must not be negative")
        if not 1 <= self.start_month <= 12 or not 1 <= self.start_day <= 28:
            raise ValueError("start_month/start_day: month 1..12 and day 1..28 (so every month has it)")

    def split(self, cum_before: int, energy: int) -> list[tuple[int, int]]:
        """``[(tier, energy)]``: each 0.01 kWh unit takes the tier of the cumulative *after* it
        (Wasion ``Money.c``), so an interval that crosses a threshold is split exactly there."""
        parts: list[tuple[int, int]] = []
        pos, left = cum_before, energy
        for tier, limit in enumerate(self.thresholds_centi_kwh, start=1):
            take = min(left, max(0, limit - pos))
            if take:
                parts.append((tier, take))
                pos, left = pos + take, left - take
        if left or not parts:
            parts.append((bisect.bisect_left(self.thresholds_centi_kwh, pos + 1) + 1, left))
        return parts

    def cycle_start(self, local: dt.datetime) -> dt.datetime:
        """Local start of the cycle that contains ``local`` (TOU-05: resets at 00:00 of the start day)."""
        if self.cycle == "monthly":
            start = local.replace(day=self.start_day, hour=0, minute=0, second=0, microsecond=0)
            if start > local:
                start = _add_months(start, -1)
            return start
        start = local.replace(
            month=self.start_month, day=self.start_day, hour=0, minute=0, second=0, microsecond=0
        )
        return start if start <= local else start.replace(year=start.year - 1)

    def cycle_end(self, start: dt.datetime) -> dt.datetime:
        return _add_months(start, 1) if self.cycle == "monthly" else start.replace(year=start.year + 1)


def _add_months(d: dt.datetime, n: int) -> dt.datetime:
    index = d.year * 12 + d.month - 1 + n
    return d.replace(year=index // 12, month=index % 12 + 1)


@dataclass(frozen=True, slots=True)
class TariffVersion:
    """Prices and calendar in force for intervals that *start* at or after ``effective_from_ms`` (TOU-05)."""

    version: str
    effective_from_ms: int
    prices: tuple[tuple[str, int], ...]
    calendar: tuple[CalendarRule, ...]
    holidays: frozenset[dt.date] = frozenset()
    makeup_workdays: frozenset[dt.date] = frozenset()
    overrides: tuple[tuple[dt.date, DayPlan], ...] = ()
    tiers: TierTable | None = None

    def __post_init__(self) -> None:
        names = {p for p, _ in self.prices}
        if len(names) != len(self.prices) or not names:
            raise ValueError("prices: need at least one period, each named once")
        if any(price < 0 for _, price in self.prices):
            raise ValueError("prices: must not be negative")
        plans = [r.plan for r in self.calendar] + [p for _, p in self.overrides]
        for plan in plans:
            for seg in plan.segments:
                if seg.period not in names:
                    raise ValueError(f"segments: period {seg.period!r} has no price")
        for month in range(1, 13):
            for day_type in DAY_TYPES:
                hits = [
                    i for i, r in enumerate(self.calendar) if month in r.months and day_type in r.day_types
                ]
                if len(hits) != 1:
                    what = "not covered" if not hits else f"covered by rules {hits}"
                    raise ValueError(f"calendar: month {month} {day_type} is {what}")

    def day_type(self, day: dt.date) -> str:
        if day in self.holidays:
            return "holiday"
        if day.weekday() >= 5 and day not in self.makeup_workdays:
            return "weekend"
        return "workday"

    def period_at(self, local: dt.datetime) -> str:
        """TOU-03: the period of a local time, by per-day override, else season and day type."""
        minute = local.hour * 60 + local.minute
        for day, plan in self.overrides:
            if day == local.date():
                return plan.period_at(minute)
        day_type = self.day_type(local.date())
        for rule in self.calendar:
            if local.month in rule.months and day_type in rule.day_types:
                return rule.plan.period_at(minute)
        raise AssertionError("calendar coverage is validated at construction")

    def price_of(self, period: str) -> int:
        return dict(self.prices)[period]


@dataclass(frozen=True, slots=True)
class Tariff:
    tariff_id: str
    zone: dt.tzinfo
    versions: tuple[TariffVersion, ...]

    def __post_init__(self) -> None:
        if not self.versions:
            raise ValueError("versions: need at least one")
        starts = [v.effective_from_ms for v in self.versions]
        if any(b <= a for a, b in itertools.pairwise(starts)):
            raise ValueError("versions: effective_from must be strictly increasing")

    def local(self, ts_ms: int) -> dt.datetime:
        return dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.UTC).astimezone(self.zone)

    def version_at(self, start_ms: int) -> TariffVersion:
        """The version for an interval starting at ``start_ms`` (TOU-05: start ≥ effective time).

        Raises:
            ConfigError: no version is in force yet at ``start_ms``.
        """
        i = bisect.bisect_right([v.effective_from_ms for v in self.versions], start_ms) - 1
        if i < 0:
            raise ConfigError(f"tariffs.{self.tariff_id}.versions", f"no version in force at {start_ms} ms")
        return self.versions[i]

    def cycle_bounds(self, start_ms: int) -> tuple[int, int] | None:
        """``[lo, hi)`` in epoch ms of the tier cycle containing an interval start; None without tiers."""
        tiers = self.version_at(start_ms).tiers
        if tiers is None:
            return None
        lo = tiers.cycle_start(self.local(start_ms))
        return _ms(lo), _ms(tiers.cycle_end(lo))

    def price_interval(
        self, start_ms: int, energy_centi_kwh: int, cum_before_centi_kwh: int = 0
    ) -> IntervalPrice:
        """Exact price of one interval (TOU-03/04/05).

        The period is that of the interval's *start* in local time; the version is the one in force
        at the start; the tier split uses the cycle's consumption before this interval.

        Raises:
            ConfigError: no tariff version in force at ``start_ms``.
        """
        if energy_centi_kwh < 0 or cum_before_centi_kwh < 0:
            raise ValueError("energy and cumulative consumption must not be negative")
        version = self.version_at(start_ms)
        period = version.period_at(self.local(start_ms))
        base = version.price_of(period)
        parts: tuple[TierPart, ...]
        if version.tiers is None:
            parts = (TierPart(1, energy_centi_kwh, base),)
        else:
            surcharges = version.tiers.surcharges
            split = version.tiers.split(cum_before_centi_kwh, energy_centi_kwh)
            parts = tuple(TierPart(t, e, base + surcharges[t - 1]) for t, e in split)
        exact = sum(p.energy_centi_kwh * p.price for p in parts)
        return IntervalPrice(version.version, period, parts, exact)


def _ms(d: dt.datetime) -> int:
    return int(d.timestamp()) * 1000


# ---------------------------------------------------------------------------------------- loading


def load_tariff(text: str) -> Tariff:
    """Parse a TOML tariff document.

    Raises:
        ConfigError: invalid TOML, or a key missing, unknown, mistyped or out of range.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"invalid TOML: {exc}") from exc
    return tariff_from_mapping(data)


def tariff_from_mapping(data: Mapping[str, Any], path: str = "") -> Tariff:
    """Build a :class:`Tariff` from a parsed mapping; ``path`` prefixes key paths in errors.

    Raises:
        ConfigError: as :func:`load_tariff`.
    """
    sec = Section(data, path)
    tariff_id = sec.get("id", str)
    zone = parse_zone(sec.get("zone", str, "+08:00"), sec.key("zone"))
    versions = tuple(_version(v, zone) for v in sec.sections("versions"))
    sec.done()
    try:
        return Tariff(tariff_id, zone, versions)
    except ValueError as exc:
        raise ConfigError(sec.key("versions"), str(exc)) from exc


def _version(sec: Section, zone: dt.tzinfo) -> TariffVersion:
    name = sec.get("version", str)
    effective = _datetime(sec, "effective_from", zone)
    prices_sec = sec.section("prices")
    assert prices_sec is not None
    prices = tuple((k, prices_sec.get(k, int)) for k in prices_sec.data)
    prices_sec.done()
    calendar = tuple(_rule(r) for r in sec.sections("calendar"))
    overrides = tuple(_override(o) for o in sec.sections("overrides", []))
    holidays = frozenset(sec.get_list("holidays", dt.date, []))
    makeup = frozenset(sec.get_list("makeup_workdays", dt.date, []))
    tiers_sec = sec.section("tiers", None)
    tiers = None if tiers_sec is None else _tiers(tiers_sec)
    sec.done()
    try:
        return TariffVersion(name, effective, prices, calendar, holidays, makeup, overrides, tiers)
    except ValueError as exc:
        field_name, _, reason = str(exc).partition(": ")
        raise ConfigError(sec.key(field_name), reason) from exc


def _datetime(sec: Section, name: str, zone: dt.tzinfo) -> int:
    value = sec.get(name, (dt.datetime, str))
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError as exc:
            raise sec.fail(name, f"expected an ISO 8601 date-time, got {value!r}") from exc
    if value.tzinfo is None:  # a local date-time is in the tariff's zone
        value = value.replace(tzinfo=zone)
    return int(value.timestamp() * 1000)


def _plan(sec: Section, name: str) -> DayPlan:
    raw = sec.get_list(name, list)
    segments = []
    for i, item in enumerate(raw):
        key = f"{sec.key(name)}[{i}]"
        if len(item) != 3 or not all(isinstance(x, str) for x in item):
            raise ConfigError(key, f'expected ["HH:MM", "HH:MM", "period"], got {item!r}')
        start, end = parse_hhmm(item[0], key), parse_hhmm(item[1], key)
        try:
            segments.append(Segment(start, end, item[2]))
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from exc
    try:
        return DayPlan(tuple(sorted(segments, key=lambda s: s.start_min)))
    except ValueError as exc:
        raise ConfigError(sec.key(name), str(exc).partition(": ")[2]) from exc


def _rule(sec: Section) -> CalendarRule:
    months = sec.get_list("months", int, list(range(1, 13)))
    if not months or any(not 1 <= m <= 12 for m in months):
        raise sec.fail("months", f"expected months 1..12, got {months}")
    day_types = sec.get_list("day_types", str, list(DAY_TYPES))
    if not day_types or any(d not in DAY_TYPES for d in day_types):
        raise sec.fail("day_types", f"expected a subset of {list(DAY_TYPES)}, got {day_types}")
    plan = _plan(sec, "segments")
    sec.done()
    return CalendarRule(frozenset(months), frozenset(day_types), plan)


def _override(sec: Section) -> tuple[dt.date, DayPlan]:
    day = sec.get("date", dt.date)
    if isinstance(day, dt.datetime):
        raise sec.fail("date", "expected a date without time")
    plan = _plan(sec, "segments")
    sec.done()
    return day, plan


def _tiers(sec: Section) -> TierTable:
    cycle = sec.get("cycle", str)
    thresholds = tuple(sec.get_list("thresholds_centi_kwh", int))
    surcharges = tuple(sec.get_list("surcharges", int))
    start_month = sec.get("start_month", int, 1)
    start_day = sec.get("start_day", int, 1)
    sec.done()
    try:
        return TierTable(cycle, thresholds, surcharges, start_month, start_day)
    except ValueError as exc:
        field_name, _, reason = str(exc).partition(": ")
        raise ConfigError(sec.key(field_name.split("/")[0]), reason) from exc
