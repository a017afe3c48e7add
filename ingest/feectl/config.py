"""Fee-control parameters (FC-03/04/06/08/09/11/12/14) as one frozen dataclass, loaded from TOML.

Accepts the ``[feectl]`` table of the config document (a mapping, or TOML text); returns a
validated :class:`FeeControlConfig`; raises :class:`~protocols.errors.ConfigError` naming the
dotted key. Every default below is the reference's default and is marked with its rule ID.
Also holds the no-trip window test (FC-09), a pure function of local time.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocols.errors import ConfigError

from ._reader import Section, parse_hhmm, parse_zone
from .model import EstimatePolicy

__all__ = ["FeeControlConfig", "NoTripWindows", "feectl_config_from_mapping", "load_feectl_config"]

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_UTC8 = dt.timezone(dt.timedelta(hours=8))


@dataclass(frozen=True, slots=True)
class NoTripWindows:
    """FC-09: trips are allowed only on working days within ``[allowed_from_min, allowed_until_min)``
    local time. Weekends (except make-up working days, 调休) and holidays are no-trip days."""

    allowed_from_min: int = 8 * 60 + 30  # FC-09 default 08:30 [inferred]
    allowed_until_min: int = 16 * 60 + 30  # FC-09 default 16:30 [inferred]
    weekend_days: frozenset[int] = frozenset({5, 6})  # Saturday, Sunday (Monday = 0)
    holidays: frozenset[dt.date] = frozenset()
    makeup_workdays: frozenset[dt.date] = frozenset()

    def __post_init__(self) -> None:
        if not 0 <= self.allowed_from_min < self.allowed_until_min <= 1440:
            raise ValueError("allowed_hours: need 00:00 <= from < until <= 24:00")
        if any(not 0 <= d <= 6 for d in self.weekend_days):
            raise ValueError("weekend_days: weekdays are 0 (Monday) .. 6 (Sunday)")

    def active(self, local: dt.datetime) -> str | None:
        """The reason code of the window in force at ``local``, or None when trips are allowed."""
        day = local.date()
        if day in self.holidays:
            return "NO_TRIP_WINDOW:HOLIDAY"
        if day.weekday() in self.weekend_days and day not in self.makeup_workdays:
            return "NO_TRIP_WINDOW:WEEKEND"
        minute = local.hour * 60 + local.minute
        if not self.allowed_from_min <= minute < self.allowed_until_min:
            return "NO_TRIP_WINDOW:OUTSIDE_HOURS"
        return None

    def next_allowed(self, local: dt.datetime) -> dt.datetime | None:
        """The first local time ≥ ``local`` outside every window (None if none within 400 days)."""
        if self.active(local) is None:
            return local
        day = local.date()
        for _ in range(400):
            start = dt.datetime.combine(day, dt.time(), tzinfo=local.tzinfo) + dt.timedelta(
                minutes=self.allowed_from_min
            )
            if start >= local and self.active(start) is None:
                return start
            day += dt.timedelta(days=1)
        return None


@dataclass(frozen=True, slots=True)
class FeeControlConfig:
    """Every fee-control parameter, with the reference defaults. Money in fen, times in seconds."""

    alarm1_fen: int = 5_000  # FC-03 A1
    alarm2_fen: int = 2_000  # FC-03 A2
    overdraft_limit_fen: int = 0  # FC-03 L
    restore_threshold_fen: int = 0  # FC-08 R
    grace_s: int = 1_800  # FC-06 grace after the zero notice
    estimate_policy: EstimatePolicy = EstimatePolicy.CHARGE  # FC-04
    zone: dt.tzinfo = _UTC8  # local time for windows and audit days (Asia/Shanghai, no DST)
    windows: NoTripWindows = field(default_factory=NoTripWindows)  # FC-09
    command_validity_s: int = 600  # FC-11 validity
    result_grace_s: int = 60  # FC-11 result grace
    verify_timeout_s: int = 300  # FC-12: a "done" result not confirmed by read-back in time
    max_attempts: int = 3  # FC-12
    retry_spacing_s: int = 300  # FC-12
    sum_tol_bp: int = 200  # VEE-14 tol_rel = 2 % (basis points)
    sum_tol_abs_centi_kwh: int = 10  # VEE-14 tol_abs = 0.10 kWh
    max_estimated_share_bp: int = 2_500  # FC-14: > 25 % of a day's intervals estimated
    interval_s: int = 900  # expected interval length (VEE-13), for the FC-14 share
    rules_version: str = "v1"  # written into every decision (FC-13)

    def __post_init__(self) -> None:
        if not self.alarm1_fen > self.alarm2_fen >= 0:
            raise ValueError("alarm1_fen: need alarm1_fen > alarm2_fen >= 0 (FC-03)")
        if self.overdraft_limit_fen < 0:
            raise ValueError("overdraft_limit_fen: must be >= 0 (FC-03)")
        if self.restore_threshold_fen < -self.overdraft_limit_fen:
            raise ValueError("restore_threshold_fen: must be >= -overdraft_limit_fen")
        for name in ("grace_s", "result_grace_s", "retry_spacing_s", "sum_tol_bp", "sum_tol_abs_centi_kwh"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        for name in ("command_validity_s", "verify_timeout_s", "max_attempts", "interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if not 0 <= self.max_estimated_share_bp <= 10_000:
            raise ValueError("max_estimated_share_bp: must be 0..10000")


def load_feectl_config(text: str) -> FeeControlConfig:
    """Parse a TOML document holding a ``[feectl]`` table (missing table: all defaults).

    Raises:
        ConfigError: invalid TOML or a bad key under ``feectl``.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"invalid TOML: {exc}") from exc
    return feectl_config_from_mapping(data.get("feectl", {}), "feectl")


def feectl_config_from_mapping(data: Mapping[str, Any], path: str = "feectl") -> FeeControlConfig:
    """Build a :class:`FeeControlConfig`; absent keys take the dataclass defaults.

    Raises:
        ConfigError: a key unknown, mistyped or out of range, named by its dotted path.
    """
    sec = Section(data, path)
    d = FeeControlConfig()
    kwargs: dict[str, Any] = {}
    for name in FeeControlConfig.__dataclass_fields__:
        if name in ("zone", "windows", "estimate_policy"):
            continue
        kwargs[name] = sec.get(name, type(getattr(d, name)), getattr(d, name))
    policy = sec.get("estimate_policy", str, d.estimate_policy.value)
    try:
        kwargs["estimate_policy"] = EstimatePolicy(policy)
    except ValueError as exc:
        raise sec.fail("estimate_policy", f"expected one of {[p.value for p in EstimatePolicy]}") from exc
    if "zone" in sec.data:
        kwargs["zone"] = parse_zone(sec.get("zone", str), sec.key("zone"))
    windows = sec.section("windows", None)
    if windows is not None:
        kwargs["windows"] = _windows(windows)
    sec.done()
    try:
        return FeeControlConfig(**kwargs)
    except ValueError as exc:
        name, _, reason = str(exc).partition(": ")
        raise ConfigError(sec.key(name), reason) from exc


def _windows(sec: Section) -> NoTripWindows:
    hours = sec.get_list("allowed_hours", str, ["08:30", "16:30"])
    if len(hours) != 2:
        raise sec.fail("allowed_hours", f'expected ["HH:MM", "HH:MM"], got {hours}')
    days = sec.get_list("weekend_days", str, ["sat", "sun"])
    if any(x not in _WEEKDAYS for x in days):
        raise sec.fail("weekend_days", f"expected names from {list(_WEEKDAYS)}, got {days}")
    holidays = frozenset(sec.get_list("holidays", dt.date, []))
    makeup = frozenset(sec.get_list("makeup_workdays", dt.date, []))
    sec.done()
    try:
        return NoTripWindows(
            parse_hhmm(hours[0], sec.key("allowed_hours[0]")),
            parse_hhmm(hours[1], sec.key("allowed_hours[1]")),
            frozenset(_WEEKDAYS.index(x) for x in days),
            holidays,
            makeup,
        )
    except ValueError as exc:
        name, _, reason = str(exc).partition(": ")
        raise ConfigError(sec.key(name), reason) from exc
