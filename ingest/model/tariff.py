"""The one tariff model: the time-of-use calendar (TOU-03) and the prices charged on it (TOU-04/05).

One document schema serves both consumers. The daily TOU totals (``ingest.rules.stages.tou_split``
/ ``tou_periods``) read its calendar as :class:`TariffCalendar`, integer tables for the kernel; fee
control reads the whole document as :class:`Tariff` (the calendar plus versioned prices and
tiers) and takes every interval's period from that same kernel, so the daily totals and charging
cannot put an interval in different periods (``tests/unit/ingest/test_tou_agreement.py``).

A calendar maps local time (a fixed UTC offset; zones with daylight saving are not supported) to
a period: 1 sharp (尖, T1), 2 peak (峰, T2), 3 flat (平, T3), 4 valley (谷, T4) (TOU-01). Seasons
are month sets; each season names a day profile for workdays, and optionally for weekends
(Saturday, Sunday) and holidays; a profile is a list of half-open ``[start, end)`` segments that
must cover 00:00-24:00 with no overlap. Some days are fixed by date instead of by weekday:
``holidays`` (the season's holiday profile), ``makeup_workdays`` (调休: a Saturday or Sunday
worked by decree, the season's workday profile) and ``overrides`` (a date that uses a named
profile, e.g. a weather-triggered sharp day published the evening before, TOU-03); a date may be
in only one of them. ``[[calendar_versions]]`` replace the seasons from an effective time on
(TOU-05; profiles and dated days are shared by all versions). An end-labelled interval takes the
period of its start, in the calendar version in force at its start (TOU-03/05). ``id`` and
``[[versions]]`` are the charging part; a calendar-only document (no ``id``, no versions) is valid
for ingest::

    id = "ln-res"                      # charging only
    utc_offset_minutes = 480
    holidays = [2024-10-01]            # dates or "YYYY-MM-DD" strings
    makeup_workdays = [2024-10-12]     # Saturdays or Sundays only
    overrides = [{ date = 2024-07-20, profile = "sharp_day" }]
    [seasons.winter]
    months = [1, 7, 8, 12]
    workday = "sharp_day"              # weekend defaults to workday, holiday to weekend
    [profiles.sharp_day]
    segments = [["00:00", "05:00", "valley"], ["05:00", "07:30", "flat"], ...]
    [[calendar_versions]]              # from this time on, these seasons (all 12 months again)
    effective_from = 2025-01-01T00:00:00   # a local date-time is at utc_offset_minutes
    [calendar_versions.seasons.all]
    months = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    workday = "sharp_day"
    [[versions]]                       # charging only: prices and tiers by effective time (TOU-05)
    version = "2024a"
    effective_from = 2024-01-01T00:00:00+08:00   # a local date-time is at utc_offset_minutes
    prices = { sharp = 9375, peak = 7500, flat = 5000, valley = 2500 }
    [versions.tiers]                   # optional (TOU-04)
    cycle = "monthly"                  # or "annual" (start_month, start_day)
    thresholds_centi_kwh = [24000, 40000]
    surcharges = [0, 500, 3000]        # added to the period price, per tier

Units: energy in 0.01 kWh, prices in 10⁻⁴ yuan/kWh (the DL/T 645 ``XXXX.XXXX`` price format), so
energy x price is an exact integer in micro-yuan (TOU-06). Loading raises :class:`ConfigError`
naming the bad key; pricing (:meth:`Tariff.price_interval`) is pure and never reads the clock.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from protocols.config import load
from protocols.errors import ConfigError

__all__ = [
    "PERIODS",
    "IntervalPrice",
    "PriceVersion",
    "Tariff",
    "TariffCalendar",
    "TierPart",
    "TierTable",
    "parse_hhmm",
]

PERIODS = {"sharp": 1, "peak": 2, "flat": 3, "valley": 4}
PERIOD_NAMES = {code: name for name, code in PERIODS.items()}
_EPOCH = dt.date(1970, 1, 1)
_HHMM = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)$")
_CALENDAR_KEYS = (
    "utc_offset_minutes",
    "holidays",
    "makeup_workdays",
    "overrides",
    "seasons",
    "profiles",
    "calendar_versions",
)
INT64_MIN = -(2**63)
_WORKDAY, _HOLIDAY = 0, 2  # columns of TariffCalendar.day_profile (1 is weekend)
_TARIFF_KEYS = ("id", "versions")


def parse_hhmm(text: Any, key: str) -> int:
    """``"07:30"`` -> minutes after local midnight; ``"24:00"`` -> 1440 (an end bound).
    Raises: ConfigError naming ``key``."""
    m = _HHMM.match(text) if isinstance(text, str) else None
    if m is None or (m.group(1) == "24" and m.group(2) != "00"):
        raise ConfigError(key, f"expected HH:MM between 00:00 and 24:00, got {text!r}")
    return int(m.group(1)) * 60 + int(m.group(2))


@dataclass(frozen=True, slots=True)
class TariffCalendar:
    """The kernel's tables (``kernels.tou_periods``), one stack for every calendar version:

    - ``version_from[v]``: epoch ms from which version ``v`` is in force, for intervals that
      *start* at or after it (TOU-05); ``version_from[0]`` is the int64 minimum (the top-level
      seasons), later rows are the ``[[calendar_versions]]``;
    - ``month_season[v, 12]``: row of ``day_profile`` for each month under version ``v``;
    - ``day_profile[s, 3]``: profile for a workday, a weekend day (Saturday, Sunday), a holiday;
    - ``profiles[p, 1440]``: period code per minute of the local day;
    - ``dated_days[n]``: sorted local days (since 1970-01-01) whose profile is fixed by date
      (holidays, make-up workdays, overrides), ``dated_profile[v, n]`` that profile under
      version ``v`` (a holiday takes the holiday profile of its season in that version);
    - ``utc_offset_ms``: local time is UTC plus this fixed offset (no DST)."""

    version_from: npt.NDArray[np.int64]
    month_season: npt.NDArray[np.int64]
    day_profile: npt.NDArray[np.int64]
    profiles: npt.NDArray[np.uint8]
    dated_days: npt.NDArray[np.int64]
    dated_profile: npt.NDArray[np.int64]
    utc_offset_ms: int

    @property
    def zone(self) -> dt.timezone:
        return dt.timezone(dt.timedelta(milliseconds=self.utc_offset_ms))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], key: str = "tariff_calendar") -> TariffCalendar:
        """The calendar of a tariff document (its charging keys are :class:`Tariff`'s).
        Raises: ConfigError naming the bad key."""
        for k in doc:
            if k not in _CALENDAR_KEYS + _TARIFF_KEYS:
                raise ConfigError(f"{key}.{k}", "unknown key")
        offset = doc.get("utc_offset_minutes", 480)
        if isinstance(offset, bool) or not isinstance(offset, int) or abs(offset) > 14 * 60:
            raise ConfigError(f"{key}.utc_offset_minutes", f"expected minutes within ±840, got {offset!r}")
        zone = dt.timezone(dt.timedelta(minutes=offset))
        names, tables = cls._profiles(doc.get("profiles", {}), f"{key}.profiles")
        month_rows: list[npt.NDArray[np.int64]] = []
        day_rows: list[npt.NDArray[np.int64]] = []
        nrows = 0  # the seasons of every version are rows of one day_profile table
        version_from = [INT64_MIN]
        raw_versions = doc.get("calendar_versions", [])
        if not isinstance(raw_versions, list):
            raise ConfigError(f"{key}.calendar_versions", "expected [[calendar_versions]] tables")
        for i, item in enumerate([{"seasons": doc.get("seasons")}, *raw_versions]):
            vkey = f"{key}.calendar_versions[{i - 1}]" if i else key
            if i:
                if not isinstance(item, dict):
                    raise ConfigError(vkey, "expected a table with effective_from and seasons")
                for k in item:
                    if k not in ("effective_from", "seasons"):
                        raise ConfigError(f"{vkey}.{k}", "unknown key")
                start = _effective_ms(item.get("effective_from"), zone, f"{vkey}.effective_from")
                if start <= version_from[-1]:
                    raise ConfigError(f"{vkey}.effective_from", "must be later than the previous version's")
                version_from.append(start)
            month_season, day_profile = cls._seasons(item.get("seasons"), names, f"{vkey}.seasons")
            month_rows.append(month_season + nrows)
            day_rows.append(day_profile)
            nrows += len(day_profile)
        months = np.array(month_rows, dtype=np.int64)
        day_profile = np.concatenate(day_rows)
        days, profile_of = cls._dated(doc, names, key)
        dated = np.zeros((len(version_from), len(days)), dtype=np.int64)
        for v in range(len(version_from)):
            for n, day in enumerate(days):
                kind = profile_of[day]  # a profile index, or -1 - daytype
                if kind >= 0:
                    dated[v, n] = kind
                else:
                    month = (_EPOCH + dt.timedelta(days=day)).month
                    dated[v, n] = day_profile[months[v, month - 1], -1 - kind]
        return cls(
            np.array(version_from, dtype=np.int64),
            months,
            day_profile,
            tables,
            np.array(days, dtype=np.int64),
            dated,
            offset * 60_000,
        )

    @staticmethod
    def _seasons(
        seasons: Any, names: dict[str, int], key: str
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """``month_season[12]`` and ``day_profile[s, 3]`` of one ``seasons`` table."""
        if not isinstance(seasons, dict) or not seasons:
            raise ConfigError(key, "expected at least one season")
        month_season = np.full(12, -1, dtype=np.int64)
        day_profile = np.zeros((len(seasons), 3), dtype=np.int64)
        for s, (sname, season) in enumerate(seasons.items()):
            skey = f"{key}.{sname}"
            if not isinstance(season, dict):
                raise ConfigError(skey, "expected a table with months and workday")
            for k in season:
                if k not in ("months", "workday", "weekend", "holiday"):
                    raise ConfigError(f"{skey}.{k}", "unknown key")
            for mo in season.get("months", []):
                if isinstance(mo, bool) or not isinstance(mo, int) or not 1 <= mo <= 12:
                    raise ConfigError(f"{skey}.months", f"expected months 1..12, got {mo!r}")
                if month_season[mo - 1] >= 0:
                    raise ConfigError(f"{skey}.months", f"month {mo} is already in another season")
                month_season[mo - 1] = s
            workday = season.get("workday")
            weekend = season.get("weekend", workday)
            holiday = season.get("holiday", weekend)
            for col, (dname, pname) in enumerate(
                (("workday", workday), ("weekend", weekend), ("holiday", holiday))
            ):
                if pname not in names:
                    raise ConfigError(f"{skey}.{dname}", f"unknown profile {pname!r}")
                day_profile[s, col] = names[pname]
        missing = [m + 1 for m in range(12) if month_season[m] < 0]
        if missing:
            raise ConfigError(key, f"months {missing} are in no season")
        return month_season, day_profile

    @staticmethod
    def _dated(doc: dict[str, Any], names: dict[str, int], key: str) -> tuple[list[int], dict[int, int]]:
        """Sorted local days fixed by date and, per day, a profile index (an override) or
        ``-1 - column`` of ``day_profile`` (a holiday, a make-up workday). A date may not be two kinds."""
        profile_of: dict[int, int] = {}

        def put(day: int, kind: int, k: str) -> None:
            if profile_of.get(day, kind) != kind:
                date = _EPOCH + dt.timedelta(days=day)
                raise ConfigError(k, f"{date} is already a holiday, make-up workday or override")
            profile_of[day] = kind

        for h in _list(doc, "holidays", key):
            put(_day(h, f"{key}.holidays"), -1 - _HOLIDAY, f"{key}.holidays")
        for w in _list(doc, "makeup_workdays", key):
            day = _day(w, f"{key}.makeup_workdays")
            if (_EPOCH + dt.timedelta(days=day)).weekday() < 5:
                raise ConfigError(f"{key}.makeup_workdays", f"{w} is not a Saturday or Sunday")
            put(day, -1 - _WORKDAY, f"{key}.makeup_workdays")
        for i, item in enumerate(_list(doc, "overrides", key)):
            okey = f"{key}.overrides[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(okey, "expected { date = YYYY-MM-DD, profile = name }")
            for k in item:
                if k not in ("date", "profile"):
                    raise ConfigError(f"{okey}.{k}", "unknown key")
            day = _day(item.get("date"), f"{okey}.date")
            if item.get("profile") not in names:
                raise ConfigError(f"{okey}.profile", f"unknown profile {item.get('profile')!r}")
            put(day, names[item["profile"]], f"{okey}.date")
        return sorted(profile_of), profile_of

    @staticmethod
    def _profiles(profiles: Any, key: str) -> tuple[dict[str, int], npt.NDArray[np.uint8]]:
        if not isinstance(profiles, dict) or not profiles:
            raise ConfigError(key, "expected at least one profile")
        tables = np.zeros((len(profiles), 1440), dtype=np.uint8)
        for p, (pname, prof) in enumerate(profiles.items()):
            pkey = f"{key}.{pname}.segments"
            segments = prof.get("segments") if isinstance(prof, dict) else None
            if not isinstance(segments, list):
                raise ConfigError(pkey, "expected a list of [start, end, period]")
            for seg in segments:
                if not isinstance(seg, list) or len(seg) != 3 or seg[2] not in PERIODS:
                    raise ConfigError(pkey, f"expected [start, end, sharp|peak|flat|valley], got {seg!r}")
                a, b = parse_hhmm(seg[0], pkey), parse_hhmm(seg[1], pkey)
                if a >= b:
                    raise ConfigError(pkey, f"segment {seg!r} is empty or backwards")
                if tables[p, a:b].any():
                    raise ConfigError(pkey, f"segment {seg!r} overlaps another")
                tables[p, a:b] = PERIODS[seg[2]]
            if not tables[p].all():
                gap = int(np.flatnonzero(tables[p] == 0)[0])
                raise ConfigError(pkey, f"segments do not cover {gap // 60:02d}:{gap % 60:02d}")
        return {name: i for i, name in enumerate(profiles)}, tables


# ---------------------------------------------------------------------------------------- charging


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
    """``[versions.tiers]``, TOU-04/05 blocks: cumulative consumption in the cycle ≤ T₁ is tier 1,
    ≤ T₂ tier 2, above tier 3; ``surcharges`` (one per tier) are added to the period price."""

    cycle: Literal["monthly", "annual"]
    thresholds_centi_kwh: tuple[int, ...]
    surcharges: tuple[int, ...]
    start_month: int = 1  # annual cycles only
    start_day: int = 1

    def __post_init__(self) -> None:
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
        if not 1 <= self.start_month <= 12:
            raise ValueError(f"start_month: expected 1..12, got {self.start_month}")
        if not 1 <= self.start_day <= 28:
            raise ValueError(f"start_day: expected 1..28 (so every month has it), got {self.start_day}")

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
class PriceVersion:
    """``[[versions]]``: prices (per period name) and tiers in force for intervals that *start*
    at or after ``effective_from`` (TOU-05)."""

    version: str
    effective_from: dt.datetime
    prices: dict[str, int]
    tiers: TierTable | None = None

    def __post_init__(self) -> None:
        if not self.version:
            raise ValueError("version: must not be empty")
        for period, price in self.prices.items():
            if period not in PERIODS:
                raise ValueError(f"prices: unknown period {period!r} (expected {', '.join(PERIODS)})")
            if price < 0:
                raise ValueError(f"prices: {period} must not be negative")


@dataclass(frozen=True, slots=True)
class Tariff:
    """A tariff document: its calendar, and its price versions sorted by effective time."""

    tariff_id: str
    calendar: TariffCalendar
    versions: tuple[PriceVersion, ...]

    @classmethod
    def from_dict(cls, doc: dict[str, Any], key: str = "tariff") -> Tariff:
        """Raises: ConfigError naming the bad key (``<key>.versions[0].prices`` ...)."""
        calendar = TariffCalendar.from_dict(doc, key)
        tariff_id = doc.get("id")
        if not isinstance(tariff_id, str) or not tariff_id:
            raise ConfigError(f"{key}.id", f"expected a non-empty tariff id, got {tariff_id!r}")
        raw = doc.get("versions")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{key}.versions", "expected at least one [[versions]] table")
        versions = []
        used = sorted({PERIOD_NAMES[int(c)] for c in np.unique(calendar.profiles)}, key=PERIODS.__getitem__)
        for i, item in enumerate(raw):
            vkey = f"{key}.versions[{i}]"
            version = load(PriceVersion, item, vkey)
            unpriced = [p for p in used if p not in version.prices]
            if unpriced:
                raise ConfigError(f"{vkey}.prices", f"periods {unpriced} of the calendar have no price")
            if version.effective_from.tzinfo is None:  # a local date-time is in the calendar's zone
                version = _replace_from(version, version.effective_from.replace(tzinfo=calendar.zone))
            versions.append(version)
        starts = [v.effective_from for v in versions]
        if any(b <= a for a, b in itertools.pairwise(starts)):
            raise ConfigError(f"{key}.versions", "effective_from must be strictly increasing")
        return cls(tariff_id, calendar, tuple(versions))

    @classmethod
    def loads(cls, text: str, key: str = "tariff") -> Tariff:
        """Parse a TOML tariff document. Raises: ConfigError."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(key, f"invalid TOML: {exc}") from None
        return cls.from_dict(doc, key)

    def local(self, ts_ms: int) -> dt.datetime:
        return dt.datetime.fromtimestamp(ts_ms / 1000, tz=self.calendar.zone)

    def version_at(self, start_ms: int) -> PriceVersion:
        """The version for an interval starting at ``start_ms`` (TOU-05: start ≥ effective time).

        Raises:
            ConfigError: no version is in force yet at ``start_ms``.
        """
        starts = [_ms(v.effective_from) for v in self.versions]
        i = bisect.bisect_right(starts, start_ms) - 1
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
        self, start_ms: int, period: int, energy_centi_kwh: int, cum_before_centi_kwh: int = 0
    ) -> IntervalPrice:
        """Exact price of one interval in ``period`` (the code the TOU kernel gives its start,
        ``ingest.rules.stages.tou_periods`` over :attr:`calendar`), by the version in force at
        its start and the tier position after ``cum_before_centi_kwh`` (TOU-03/04/05).

        Raises:
            ConfigError: no tariff version in force at ``start_ms``.
        """
        if energy_centi_kwh < 0 or cum_before_centi_kwh < 0:
            raise ValueError("energy and cumulative consumption must not be negative")
        version = self.version_at(start_ms)
        name = PERIOD_NAMES[period]
        base = version.prices[name]
        parts: tuple[TierPart, ...]
        if version.tiers is None:
            parts = (TierPart(1, energy_centi_kwh, base),)
        else:
            surcharges = version.tiers.surcharges
            split = version.tiers.split(cum_before_centi_kwh, energy_centi_kwh)
            parts = tuple(TierPart(t, e, base + surcharges[t - 1]) for t, e in split)
        exact = sum(p.energy_centi_kwh * p.price for p in parts)
        return IntervalPrice(version.version, name, parts, exact)


def _replace_from(version: PriceVersion, when: dt.datetime) -> PriceVersion:
    return PriceVersion(version.version, when, version.prices, version.tiers)


def _ms(d: dt.datetime) -> int:
    return int(d.timestamp()) * 1000


def _list(doc: dict[str, Any], name: str, key: str) -> list[Any]:
    value = doc.get(name, [])
    if not isinstance(value, list):
        raise ConfigError(f"{key}.{name}", f"expected a list, got {value!r}")
    return value


def _day(value: Any, key: str) -> int:
    """A TOML date or ``"YYYY-MM-DD"`` -> local days since 1970-01-01. Raises: ConfigError."""
    if isinstance(value, dt.datetime):
        raise ConfigError(key, f"expected a date, got {value!r}")
    try:
        return (dt.date.fromisoformat(str(value)) - _EPOCH).days
    except ValueError:
        raise ConfigError(key, f"expected YYYY-MM-DD, got {value!r}") from None


def _effective_ms(value: Any, zone: dt.timezone, key: str) -> int:
    """A TOML date-time (a local one is in ``zone``) -> epoch ms. Raises: ConfigError."""
    if not isinstance(value, dt.datetime):
        raise ConfigError(key, f"expected a date-time such as 2025-01-01T00:00:00, got {value!r}")
    return _ms(value if value.tzinfo is not None else value.replace(tzinfo=zone))
