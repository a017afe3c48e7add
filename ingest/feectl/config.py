"""Fee-control parameters (FC-03/04/06/08/09/11/12/14) as one frozen dataclass, loaded from TOML.

Accepts the ``[feectl]`` table of the config document (a mapping, or TOML text); returns a
validated :class:`FeeControlConfig`; raises :class:`~protocols.errors.ConfigError` naming the
dotted key. Every default below is the reference's default and is marked with its rule ID.
Also holds the no-trip window test (FC-09), a pure function of local time, and the settings of
the running service (``[service]``, :func:`load_service_config`), which reads its files (keys,
token, tariffs) once at start.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from protocols.commands import MAX_VALIDITY_MS
from protocols.config import load as load_typed
from protocols.errors import ConfigError

from ._reader import Section, parse_hhmm, parse_zone
from .model import Account, EstimatePolicy, MeterRef
from .tariff import Tariff, load_tariff

__all__ = [
    "AccountSettings",
    "FeeControlConfig",
    "HttpSettings",
    "MeterSettings",
    "MqttSettings",
    "NoTripWindows",
    "ServiceConfig",
    "ServiceSettings",
    "feectl_config_from_mapping",
    "load_feectl_config",
    "load_service_config",
]

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


# -------------------------------------------------------------------------------------------------
# The running service (``amigw feectl``): the ``[service]`` table beside ``[feectl]``.
#
# ``[feectl]`` stays the core's parameters (read by :func:`feectl_config_from_mapping`, unchanged);
# everything about processes, sockets, files and enrolment lives under ``[service]`` and is read
# by :func:`load_service_config` with the project's typed loader (``protocols.config``). Relative
# file paths are resolved against the config file's folder. The command validity window is the
# core's ``feectl.command_validity_s`` (the core writes it into every command row).


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """``[service.mqtt]``: one persistent session (``client_id``) for the subscriptions, and a
    second, clean one (``client_id`` + ``"-pub"``) for publishing commands and notifications."""

    url: str = "mqtt://127.0.0.1:1883"  # mqtt:// or mqtts:// (TLS, verified against ca_file)
    client_id: str = "amigw-feectl-1"
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    keepalive_s: int = 60
    session_expiry_s: int = 7 * 86_400
    queue_max: int = 64
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("mqtt://", "mqtts://")):
            raise ValueError(f"url: expected mqtt:// or mqtts://, got {self.url!r}")
        if not self.client_id:
            raise ValueError("client_id: a persistent session needs a stable, non-empty client id")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file: needs username")
        for name in (
            "keepalive_s",
            "session_expiry_s",
            "queue_max",
            "connect_timeout_s",
            "publish_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """``[service.http]``: the payments API. Loopback by default; the bearer token is read from
    ``token_file`` (at least 16 characters)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8480  # 0: any free port (tests)
    token_file: str | None = None
    max_body_bytes: int = 65_536

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65_535:
            raise ValueError(f"port: expected 0..65535, got {self.port}")
        if self.enabled and self.token_file is None:
            raise ValueError("token_file: required when the HTTP API is enabled")
        if self.max_body_bytes < 256:
            raise ValueError("max_body_bytes: must be >= 256")


@dataclass(frozen=True, slots=True)
class MeterSettings:
    meter: str
    gateway: str
    remote: bool = True  # False: local fee-control mode (FC-01), monitored, never tripped


@dataclass(frozen=True, slots=True)
class AccountSettings:
    """One ``[[service.accounts]]`` entry, enrolled (or updated) at every start."""

    account_id: str
    tariff: str
    meters: list[MeterSettings]
    protected: bool = False  # FC-07 保电
    customer_class: str = "residential"


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """``[service]``: the fee-control process around the core."""

    db_path: str = "feectl.sqlite"
    tick_interval_s: float = 5.0
    resend_interval_s: float = 60.0  # an ISSUED command without a result is resent (same id)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    http: HttpSettings = field(default_factory=lambda: HttpSettings(enabled=False))
    command_key_files: dict[str, str] = field(default_factory=dict)  # gateway -> hex key file
    tariff_files: dict[str, str] = field(default_factory=dict)  # tariff id -> tariff TOML file
    accounts: list[AccountSettings] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.tick_interval_s <= 0:
            raise ValueError("tick_interval_s: must be > 0")
        if self.resend_interval_s <= 0:
            raise ValueError("resend_interval_s: must be > 0")
        if not self.db_path:
            raise ValueError("db_path: must not be empty")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Everything ``amigw feectl`` needs, validated and with its files read (keys, token,
    tariffs, password): nothing is read later, so ``--check-config`` checks it all."""

    feectl: FeeControlConfig
    service: ServiceSettings
    db_path: Path
    command_keys: Mapping[str, bytes]
    tariffs: Mapping[str, Tariff]
    accounts: tuple[Account, ...]
    api_token: str | None
    mqtt_password: str | None
    ca_file: Path | None


def load_service_config(text: str, base_dir: str | Path = ".") -> ServiceConfig:
    """Parse the service's TOML document (``[feectl]`` and ``[service]``) and read its files.

    Raises:
        ConfigError: invalid TOML, an unknown top-level table, a bad key (dotted path), an
            unreadable or invalid key/token/tariff file, or an account naming an unknown tariff.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"invalid TOML: {exc}") from exc
    unknown = sorted(set(data) - {"feectl", "service"})
    if unknown:
        raise ConfigError(unknown[0], "unknown table (expected feectl, service)")
    core = feectl_config_from_mapping(data.get("feectl", {}), "feectl")
    svc = load_typed(ServiceSettings, data.get("service", {}), "service")
    if core.command_validity_s * 1000 > MAX_VALIDITY_MS:
        raise ConfigError("feectl.command_validity_s", f"must be <= {MAX_VALIDITY_MS // 1000} (protocols)")
    base = Path(base_dir)
    tariffs = {tid: _tariff_file(base, tid, p) for tid, p in svc.tariff_files.items()}
    keys = {
        gw: _key_file(base / p, f"service.command_key_files.{gw}") for gw, p in svc.command_key_files.items()
    }
    accounts = tuple(_account(a, i, tariffs, keys) for i, a in enumerate(svc.accounts))
    token = None
    if svc.http.enabled and svc.http.token_file is not None:
        token = _secret_file(base / svc.http.token_file, "service.http.token_file")
        if len(token) < 16:
            raise ConfigError("service.http.token_file", "the API token must be at least 16 characters")
    password = None
    if svc.mqtt.password_file is not None:
        password = _secret_file(base / svc.mqtt.password_file, "service.mqtt.password_file")
    ca = None if svc.mqtt.ca_file is None else base / svc.mqtt.ca_file
    if ca is not None and not ca.is_file():
        raise ConfigError("service.mqtt.ca_file", f"no such file: {ca}")
    return ServiceConfig(core, svc, base / svc.db_path, keys, tariffs, accounts, token, password, ca)


def _secret_file(path: Path, key_path: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(key_path, f"cannot read {path}: {exc.strerror}") from None
    if not text:
        raise ConfigError(key_path, f"{path} is empty")
    return text


def _key_file(path: Path, key_path: str) -> bytes:
    """A gateway's command key: hex, at least 16 bytes (the format the edge agent reads)."""
    text = _secret_file(path, key_path)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(key_path, f"{path}: expected a hex key") from None
    if len(key) < 16:
        raise ConfigError(key_path, f"{path}: key must be at least 16 bytes")
    return key


def _tariff_file(base: Path, tariff_id: str, rel: str) -> Tariff:
    key_path = f"service.tariff_files.{tariff_id}"
    tariff = load_tariff(_secret_file(base / rel, key_path))
    if tariff.tariff_id != tariff_id:
        raise ConfigError(key_path, f"the file holds tariff {tariff.tariff_id!r}, not {tariff_id!r}")
    return tariff


def _account(a: AccountSettings, i: int, tariffs: Mapping[str, Tariff], keys: Mapping[str, bytes]) -> Account:
    path = f"service.accounts[{i}]"
    if a.tariff not in tariffs:
        raise ConfigError(f"{path}.tariff", f"unknown tariff {a.tariff!r} (see service.tariff_files)")
    for j, m in enumerate(a.meters):
        if m.gateway not in keys:
            raise ConfigError(f"{path}.meters[{j}].gateway", f"no command key for gateway {m.gateway!r}")
    try:
        meters = tuple(MeterRef(m.meter, m.gateway, m.remote) for m in a.meters)
        return Account(a.account_id, meters, a.tariff, a.customer_class, a.protected)
    except ValueError as exc:
        name, _, reason = str(exc).partition(": ")
        raise ConfigError(f"{path}.{name}", reason) from None
