"""Time-of-use tariff calendar (TOU-03) as integer tables for the ``tou_periods`` kernel.

A calendar maps local time (a fixed UTC offset, no DST) to a period code: 1 sharp (尖, T1),
2 peak (峰, T2), 3 flat (平, T3), 4 valley (谷, T4) (TOU-01). Seasons are month sets; each season
names a day profile for workdays, and optionally for weekends and holidays; a profile is a list of
half-open ``[start, end)`` segments that must cover 00:00-24:00 with no overlap (checked at load).
``from_dict`` takes the parsed TOML table and raises :class:`ConfigError` naming the bad key::

    utc_offset_minutes = 480
    holidays = ["2024-10-01"]
    [seasons.winter]
    months = [1, 7, 8, 12]
    workday = "sharp_day"        # weekend defaults to workday, holiday to weekend
    [profiles.sharp_day]
    segments = [["00:00", "05:00", "valley"], ["05:00", "07:30", "flat"], ...]
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.errors import ConfigError

__all__ = ["PERIODS", "TariffCalendar"]

PERIODS = {"sharp": 1, "peak": 2, "flat": 3, "valley": 4}
_EPOCH = dt.date(1970, 1, 1)


def _minute(text: Any, key: str) -> int:
    try:
        hh, mm = str(text).split(":")
        value = int(hh) * 60 + int(mm)
    except ValueError:
        raise ConfigError(key, f"expected HH:MM, got {text!r}") from None
    if not 0 <= value <= 1440 or not 0 <= int(mm) < 60:
        raise ConfigError(key, f"time {text!r} outside 00:00..24:00")
    return value


@dataclass(frozen=True, slots=True)
class TariffCalendar:
    """The kernel's tables: ``month_season[12]``, ``day_profile[season, 3]`` (workday, weekend,
    holiday), ``profiles[p, 1440]`` period per minute of day, ``holidays`` sorted local days since
    1970-01-01, and ``utc_offset_ms``."""

    month_season: npt.NDArray[np.int64]
    day_profile: npt.NDArray[np.int64]
    profiles: npt.NDArray[np.uint8]
    holidays: npt.NDArray[np.int64]
    utc_offset_ms: int

    @classmethod
    def from_dict(cls, doc: dict[str, Any], key: str = "tariff_calendar") -> TariffCalendar:
        """Raises: ConfigError naming the bad key."""
        for k in doc:
            if k not in ("utc_offset_minutes", "holidays", "seasons", "profiles"):
                raise ConfigError(f"{key}.{k}", "unknown key")
        offset = doc.get("utc_offset_minutes", 480)
        if isinstance(offset, bool) or not isinstance(offset, int) or abs(offset) > 14 * 60:
            raise ConfigError(f"{key}.utc_offset_minutes", f"expected minutes within ±840, got {offset!r}")
        names, tables = cls._profiles(doc.get("profiles", {}), f"{key}.profiles")
        seasons = doc.get("seasons", {})
        if not isinstance(seasons, dict) or not seasons:
            raise ConfigError(f"{key}.seasons", "expected at least one season")
        month_season = np.full(12, -1, dtype=np.int64)
        day_profile = np.zeros((len(seasons), 3), dtype=np.int64)
        for s, (sname, season) in enumerate(seasons.items()):
            skey = f"{key}.seasons.{sname}"
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
            raise ConfigError(f"{key}.seasons", f"months {missing} are in no season")
        holidays = []
        for h in doc.get("holidays", []):
            try:
                holidays.append((dt.date.fromisoformat(str(h)) - _EPOCH).days)
            except ValueError:
                raise ConfigError(f"{key}.holidays", f"expected YYYY-MM-DD, got {h!r}") from None
        return cls(
            month_season, day_profile, tables, np.array(sorted(holidays), dtype=np.int64), offset * 60_000
        )

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
                a, b = _minute(seg[0], pkey), _minute(seg[1], pkey)
                if a >= b:
                    raise ConfigError(pkey, f"segment {seg!r} is empty or backwards")
                if tables[p, a:b].any():
                    raise ConfigError(pkey, f"segment {seg!r} overlaps another")
                tables[p, a:b] = PERIODS[seg[2]]
            if not tables[p].all():
                gap = int(np.flatnonzero(tables[p] == 0)[0])
                raise ConfigError(pkey, f"segments do not cover {gap // 60:02d}:{gap % 60:02d}")
        return {name: i for i, name in enumerate(profiles)}, tables
