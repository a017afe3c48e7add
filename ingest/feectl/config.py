"""Fee-control parameters (FC-03/04/06/08/09/11/12/14) as one frozen dataclass, loaded from TOML.

Accepts the ``[feectl]`` table of the config document (a mapping, or TOML text); returns a
validated :class:`FeeControlConfig`; raises :class:`~protocols.errors.ConfigError` naming the
dotted key. Every default below is the reference's default and is marked with its rule ID.
Also holds the no-trip window test (FC-09), a pure function of local time, and the settings of
the running service (``[service]``, :func:`load_service_config`), which reads its files (keys,
token, tariffs) once at start, including the bounds on values entering it (``[service.limits]``,
:meth:`LimitSettings.interval_refusal`). :data:`SAMPLE` is the commented sample
(``amigw config sample feectl``); :func:`load_config` reads a file (``amigw config check``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import typing
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ingest.config import IngestConfig
from ingest.config import load_config as load_ingest_config
from ingest.model.tariff import Tariff, parse_hhmm
from ingest.mqtt.settings import MqttSettings
from ingest.ops.auth import ApiToken, TokenTable, load_tokens_file, token_from_secret
from protocols.commands import MAX_VALIDITY_MS
from protocols.config import loads_toml
from protocols.errors import ConfigError
from protocols.topics import check_gateway_id

from .model import Account, EstimatePolicy, MeterRef, check_area

__all__ = [
    "SAMPLE",
    "AccountSettings",
    "FeeControlConfig",
    "FeectlFile",
    "HttpSettings",
    "LimitSettings",
    "MeterSettings",
    "MqttLink",
    "NoTripWindows",
    "NotifySettings",
    "ServiceConfig",
    "ServiceSettings",
    "WebhookSettings",
    "load_config",
    "load_feectl_config",
    "load_service_config",
]

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_WEEKDAYS = typing.get_args(Weekday)
_OFFSET = re.compile(r"^([+-])(\d\d):(\d\d)$")


def parse_zone(text: str) -> dt.tzinfo:
    """A fixed offset ``"+08:00"`` (DST-free, preferred) or an IANA name via :mod:`zoneinfo`.
    Raises: ValueError."""
    m = _OFFSET.match(text)
    if m is not None:
        minutes = int(m.group(2)) * 60 + int(m.group(3))
        if minutes >= 24 * 60:
            raise ValueError(f"offset out of range: {text!r}")
        return dt.timezone(dt.timedelta(minutes=-minutes if m.group(1) == "-" else minutes))
    try:
        return zoneinfo.ZoneInfo(text)
    except (ValueError, LookupError):  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(f"unknown time zone {text!r}") from None


@dataclass(frozen=True, slots=True)
class NoTripWindows:
    """``[feectl.windows]``, FC-09: trips are allowed only on working days within
    ``allowed_hours`` (``[from, until)`` local time). Weekends (except make-up working days, 调休)
    and holidays are no-trip days."""

    allowed_hours: tuple[str, ...] = ("08:30", "16:30")  # FC-09 default [inferred]
    weekend_days: tuple[Weekday, ...] = ("sat", "sun")
    holidays: tuple[dt.date, ...] = ()
    makeup_workdays: tuple[dt.date, ...] = ()
    allowed_from_min: int = field(init=False)
    allowed_until_min: int = field(init=False)

    def __post_init__(self) -> None:
        if len(self.allowed_hours) != 2:
            raise ValueError(f'allowed_hours: expected ["HH:MM", "HH:MM"], got {list(self.allowed_hours)}')
        try:
            lo, hi = (parse_hhmm(h, "allowed_hours") for h in self.allowed_hours)
        except ConfigError as exc:
            raise ValueError(f"allowed_hours: {exc.reason}") from None
        if not lo < hi:
            raise ValueError("allowed_hours: need 00:00 <= from < until <= 24:00")
        for name in ("holidays", "makeup_workdays"):
            if any(isinstance(d, dt.datetime) for d in getattr(self, name)):
                raise ValueError(f"{name}: expected dates without a time")
        object.__setattr__(self, "allowed_from_min", lo)
        object.__setattr__(self, "allowed_until_min", hi)

    def active(self, local: dt.datetime) -> str | None:
        """The reason code of the window in force at ``local``, or None when trips are allowed."""
        day = local.date()
        if day in self.holidays:
            return "NO_TRIP_WINDOW:HOLIDAY"
        if _WEEKDAYS[day.weekday()] in self.weekend_days and day not in self.makeup_workdays:
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
    """``[feectl]``: every fee-control parameter, with the reference defaults. Money in fen, times
    in seconds. ``zone`` (local time for windows and audit days) is a fixed offset or an IANA
    name; :attr:`tz` is it resolved."""

    alarm1_fen: int = 5_000  # FC-03 A1
    alarm2_fen: int = 2_000  # FC-03 A2
    overdraft_limit_fen: int = 0  # FC-03 L
    restore_threshold_fen: int = 0  # FC-08 R
    grace_s: int = 1_800  # FC-06 grace after the zero notice
    estimate_policy: EstimatePolicy = EstimatePolicy.CHARGE  # FC-04
    zone: str = "+08:00"  # Asia/Shanghai, no DST
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
    tz: dt.tzinfo = field(init=False, compare=False)

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
        if self.command_validity_s * 1000 > MAX_VALIDITY_MS:
            raise ValueError(f"command_validity_s: must be <= {MAX_VALIDITY_MS // 1000} (protocols)")
        if not 0 <= self.max_estimated_share_bp <= 10_000:
            raise ValueError("max_estimated_share_bp: must be 0..10000")
        try:
            object.__setattr__(self, "tz", parse_zone(self.zone))
        except ValueError as exc:
            raise ValueError(f"zone: {exc}") from None


# -------------------------------------------------------------------------------------------------
# The running service (``amigw feectl``): the ``[service]`` table beside ``[feectl]``.
#
# ``[feectl]`` stays the core's parameters; everything about processes, sockets, files and
# enrolment lives under ``[service]``. Both are read by :func:`load_service_config` with the
# project's typed loader (``protocols.config``). Relative
# file paths are resolved against the config file's folder. The command validity window is the
# core's ``feectl.command_validity_s`` (the core writes it into every command row).


@dataclass(frozen=True, slots=True)
class MqttLink(MqttSettings):
    """``[service.mqtt]``: the connection (:class:`~ingest.mqtt.settings.MqttSettings`, shared
    with ingest) with fee control's defaults: one persistent session (``client_id``) for the
    subscriptions, kept a week, and a second, clean one (``client_id`` + ``"-pub"``) for
    publishing commands and notifications. The password may come from ``password_file``."""

    client_id: str = "amigw-feectl-1"
    session_expiry_s: int = 7 * 86_400
    queue_max: int = 64
    publish_timeout_s: float = 10.0
    password_file: str | None = None

    def __post_init__(self) -> None:
        MqttSettings.__post_init__(self)  # explicit: zero-argument super() fails in slots classes
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file: needs username")
        if self.password_file is not None and self.password is not None:
            raise ValueError("password_file: give password or password_file, not both")


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """``[service.http]``: the ops API (:mod:`ingest.ops`, ``docs/ops-api.md``). Loopback by
    default. Its bearer tokens come from ``tokens_file`` (named tokens with roles, stored as
    SHA-256 digests) and/or ``token_file`` (one token in clear, at least 16 characters, named
    ``token_file`` with role ``payments``); at least one is required when enabled."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8480  # 0: any free port (tests)
    tokens_file: str | None = None
    token_file: str | None = None
    max_body_bytes: int = 65_536

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65_535:
            raise ValueError(f"port: expected 0..65535, got {self.port}")
        if self.enabled and self.tokens_file is None and self.token_file is None:
            raise ValueError("tokens_file: required when the HTTP API is enabled (or token_file)")
        if self.max_body_bytes < 256:
            raise ValueError("max_body_bytes: must be >= 256")


@dataclass(frozen=True, slots=True)
class ViewsSettings:
    """``[service.views]``: the ops API's read views over the head-end's data (fleet health,
    collection success, a meter's readings and load curve, alarms; ``docs/ops-views.md``).
    ``ingest_config`` names ingest's own configuration file, read for its InfluxDB, meter
    registry, loss account and interval grid; empty (the default) leaves the views off."""

    ingest_config: str = ""
    acks_path: str = "alarm-acks.sqlite"  # alarm acknowledgements (SQLite)
    stale_after_s: float = 180.0  # a gateway with no status for this long is "stale"

    def __post_init__(self) -> None:
        if not 1.0 <= self.stale_after_s <= 86_400.0:
            raise ValueError(f"stale_after_s: expected 1..86400, got {self.stale_after_s}")
        if not self.acks_path:
            raise ValueError("acks_path: must not be empty")


CENTI_KWH_WMS = 36_000_000  # W x ms in 0.01 kWh


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """``[service.limits]``: bounds on values where they enter the service (intervals from MQTT,
    payments over HTTP). A value outside them is rejected with its reason before the ledger sees it.

    An interval's energy may not exceed what the meter can draw in it at its rated maximum power
    (VEE-05's E_max, here in integers): ``ceil(max_power_w x (end_ms - start_ms) / 36 000 000)``
    in 0.01 kWh, the ceiling because a register delta can exceed the true energy by one step.
    ``max_power_w`` is the rating of meters whose enrolment names none (``meters[].max_power_w``).
    """

    max_power_w: int = 100_000  # 3 x 220 V x 100 A x 1.1 (VEE-05's largest direct meter) rounded up
    max_interval_s: int = 86_400  # the longest interval accepted (a daily interval)
    earliest_interval: dt.date = dt.date(2000, 1, 1)  # UTC midnight: intervals may not start before
    future_tolerance_s: int = 300  # intervals may not end later than now + this
    max_payment_fen: int = 10_000_000  # one payment: 100 000 yuan

    def __post_init__(self) -> None:
        for name in ("max_power_w", "max_interval_s", "max_payment_fen"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.future_tolerance_s < 0:
            raise ValueError("future_tolerance_s: must be >= 0")
        if isinstance(self.earliest_interval, dt.datetime):
            raise ValueError("earliest_interval: expected a date (YYYY-MM-DD), not a date-time")

    @property
    def earliest_ms(self) -> int:
        d = self.earliest_interval
        return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp()) * 1000

    def interval_refusal(
        self, start_ms: int, end_ms: int, energy_centi_kwh: int, max_power_w: int, now_ms: int
    ) -> tuple[str, str] | None:
        """``(reason, detail)`` when the interval is outside the bounds, else None. Reasons:
        ``time_out_of_range``, ``interval_length_out_of_range``, ``energy_out_of_range``."""
        if start_ms < self.earliest_ms:
            return "time_out_of_range", f"start_ms {start_ms} before {self.earliest_interval} UTC"
        if end_ms > now_ms + self.future_tolerance_s * 1000:
            return "time_out_of_range", f"end_ms {end_ms} after now {now_ms} + {self.future_tolerance_s} s"
        length = end_ms - start_ms
        if not 0 < length <= self.max_interval_s * 1000:
            return "interval_length_out_of_range", f"{length} ms, expected 1..{self.max_interval_s * 1000}"
        most = -(-max_power_w * length // CENTI_KWH_WMS)
        if not 0 <= energy_centi_kwh <= most:
            return (
                "energy_out_of_range",
                f"{energy_centi_kwh} x 0.01 kWh, expected 0..{most} ({max_power_w} W)",
            )
        return None


@dataclass(frozen=True, slots=True)
class MeterSettings:
    """One meter of an enrolled account. ``gateway`` (required) is the only gateway whose intervals
    are charged to it; ``max_power_w`` its rating (default ``service.limits.max_power_w``); ``area``
    its transformer area, if known."""

    meter: str
    gateway: str
    remote: bool = True  # False: local fee-control mode (FC-01), monitored, never tripped
    max_power_w: int | None = None
    area: str | None = None  # the transformer area supplying it (planned-outage notices)

    def __post_init__(self) -> None:
        if not self.meter:
            raise ValueError("meter: must not be empty")
        if self.area is not None and (why := check_area(self.area)) is not None:
            raise ValueError(f"area: {why}")
        why = check_gateway_id(self.gateway)
        if why is not None:
            raise ValueError(f"gateway: {why}")
        if self.max_power_w is not None and self.max_power_w <= 0:
            raise ValueError("max_power_w: must be > 0")


@dataclass(frozen=True, slots=True)
class AccountSettings:
    """One ``[[service.accounts]]`` entry, applied at start when new or edited since it was last
    applied (:meth:`~.service.FeeControlService.enroll`)."""

    account_id: str
    tariff: str
    meters: list[MeterSettings]
    protected: bool = False  # FC-07 保电
    customer_class: str = "residential"


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """One ``[[service.notify.webhook]]``: notifications are POSTed to ``url`` (http or https).
    With ``secret_file`` each request carries ``X-Amigw-Signature: sha256=<hex HMAC-SHA256 of the
    body>``. ``name`` labels its outbox rows and metrics; keep it when the URL changes."""

    url: str
    name: str = "webhook"
    secret_file: str | None = None
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        scheme, sep, rest = self.url.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or rest.startswith("/"):
            raise ValueError(f"url: expected http://host[:port]/path or https://..., got {self.url!r}")
        if self.name == "mqtt" or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", self.name):
            raise ValueError(f"name: expected 1-64 of a-z 0-9 _ - (not 'mqtt'), got {self.name!r}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s: must be > 0")


@dataclass(frozen=True, slots=True)
class NotifySettings:
    """``[service.notify]``: where notifications go, and how failed deliveries are retried."""

    mqtt: bool = True  # publish on ami/v1/agg/notifications
    webhook: list[WebhookSettings] = field(default_factory=list)
    retry_initial_s: float = 1.0  # the first wait after a failed delivery; doubled each time
    retry_max_s: float = 300.0  # the longest wait between tries (tries never stop)
    keep_days: float = 30.0  # delivered (or dead) notifications are pruned after this

    def __post_init__(self) -> None:
        if self.retry_initial_s <= 0:
            raise ValueError("retry_initial_s: must be > 0")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s: must be >= retry_initial_s")
        if self.keep_days <= 0:
            raise ValueError("keep_days: must be > 0")


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """``[service]``: the fee-control process around the core."""

    db_path: str = "feectl.sqlite"
    tick_interval_s: float = 5.0
    resend_interval_s: float = 60.0  # an ISSUED command without a result is resent (same id)
    metrics_listen: str = ""  # "host:port" of the Prometheus endpoint; "" disables it
    rejects_keep: int = 100_000  # rows kept in the ledger's rejects table (oldest pruned)
    mqtt: MqttLink = field(default_factory=MqttLink)
    http: HttpSettings = field(default_factory=lambda: HttpSettings(enabled=False))
    views: ViewsSettings = field(default_factory=ViewsSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
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
        if self.rejects_keep <= 0:
            raise ValueError("rejects_keep: must be > 0")
        if self.metrics_listen:
            _host, sep, port = self.metrics_listen.rpartition(":")
            if not sep or not port.isdigit() or not 0 <= int(port) <= 65_535:
                raise ValueError(f"metrics_listen: expected host:port, got {self.metrics_listen!r}")
        for gateway in self.command_key_files:
            why = check_gateway_id(gateway)
            if why is not None:
                raise ValueError(f"command_key_files: {gateway!r}: {why}")


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
    api_tokens: TokenTable  # [service.http]'s tokens (empty when the API is disabled)
    mqtt: MqttSettings  # [service.mqtt] with its files read: the password, the CA file's full path
    meter_max_power_w: Mapping[str, int] = field(default_factory=dict)  # enrolled ratings
    views_ingest: IngestConfig | None = None  # [service.views] ingest_config, read and validated
    acks_path: Path | None = None  # [service.views] acks_path, resolved
    webhook_secrets: Mapping[str, bytes] = field(default_factory=dict)  # webhook name -> secret

    def max_power_w(self, meter: str) -> int:
        """The rating that bounds ``meter``'s intervals (``service.limits``)."""
        return self.meter_max_power_w.get(meter, self.service.limits.max_power_w)


@dataclass(frozen=True, slots=True)
class FeectlFile:
    """The whole document: ``[feectl]`` (the core) and ``[service]`` (the process around it)."""

    feectl: FeeControlConfig = field(default_factory=FeeControlConfig)
    service: ServiceSettings = field(default_factory=ServiceSettings)


def load_feectl_config(text: str) -> FeeControlConfig:
    """The ``[feectl]`` table of a TOML document (missing: all defaults). Raises: ConfigError."""
    return loads_toml(FeectlFile, text, "feectl config").feectl


def load_service_config(text: str, base_dir: str | Path = ".") -> ServiceConfig:
    """Parse the service's TOML document (``[feectl]`` and ``[service]``, read by the project's
    one typed loader, :mod:`protocols.config`) and read its files.

    Raises:
        ConfigError: invalid TOML, an unknown top-level table, a bad key (dotted path), an
            unreadable or invalid key/token/tariff file, or an account naming an unknown tariff.
    """
    doc = loads_toml(FeectlFile, text, "feectl config")
    core, svc = doc.feectl, doc.service
    base = Path(base_dir)
    tariffs = {tid: _tariff_file(base, tid, p) for tid, p in svc.tariff_files.items()}
    keys = {
        gw: _key_file(base / p, f"service.command_key_files.{gw}") for gw, p in svc.command_key_files.items()
    }
    accounts = tuple(_account(a, i, tariffs, keys) for i, a in enumerate(svc.accounts))
    tokens = _api_tokens(svc.http, base) if svc.http.enabled else TokenTable()
    password = svc.mqtt.password
    if svc.mqtt.password_file is not None:
        password = _secret_file(base / svc.mqtt.password_file, "service.mqtt.password_file")
    ca = None if svc.mqtt.ca_file is None else base / svc.mqtt.ca_file
    if ca is not None and not ca.is_file():
        raise ConfigError("service.mqtt.ca_file", f"no such file: {ca}")
    mqtt = MqttSettings(**{f.name: getattr(svc.mqtt, f.name) for f in dataclasses.fields(MqttSettings)})
    mqtt = dataclasses.replace(mqtt, password=password, ca_file=None if ca is None else str(ca))
    ratings = {m.meter: m.max_power_w for a in svc.accounts for m in a.meters if m.max_power_w is not None}
    views_ingest = None
    if svc.views.ingest_config:
        ingest_path = base / svc.views.ingest_config
        try:
            views_ingest = load_ingest_config(ingest_path)
        except ConfigError as exc:
            raise ConfigError("service.views.ingest_config", f"{ingest_path}: {exc}") from None
    secrets = _webhook_secrets(base, svc.notify)
    return ServiceConfig(
        core, svc, base / svc.db_path, keys, tariffs, accounts, tokens, mqtt, ratings,
        views_ingest, base / svc.views.acks_path, secrets,
    )  # fmt: skip


def _webhook_secrets(base: Path, notify: NotifySettings) -> dict[str, bytes]:
    """Each webhook's secret (read once, here), and the check that webhook names are distinct."""
    secrets: dict[str, bytes] = {}
    seen: set[str] = set()
    for i, w in enumerate(notify.webhook):
        if w.name in seen:
            raise ConfigError(
                f"service.notify.webhook[{i}].name", f"{w.name!r} is taken: give each webhook its own name"
            )
        seen.add(w.name)
        if w.secret_file is not None:
            key_path = f"service.notify.webhook[{i}].secret_file"
            secret = _secret_file(base / w.secret_file, key_path)
            if len(secret) < 16:
                raise ConfigError(key_path, "the secret must be at least 16 characters")
            secrets[w.name] = secret.encode()
    return secrets


def load_config(path: str | Path) -> ServiceConfig:
    """Read and validate the service's file (relative paths from its folder).

    Raises: ConfigError, including an unreadable file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {p}: {exc.strerror}") from None
    return load_service_config(text, p.resolve().parent)


def _api_tokens(http: HttpSettings, base: Path) -> TokenTable:
    """``tokens_file``'s entries and the ``token_file`` token (role ``payments``)."""
    tokens: list[ApiToken] = []
    if http.tokens_file is not None:
        tokens += load_tokens_file(base / http.tokens_file, "service.http.tokens_file")
    if http.token_file is not None:
        secret = _secret_file(base / http.token_file, "service.http.token_file")
        try:
            tokens.append(token_from_secret("token_file", "payments", secret))
        except ValueError as exc:
            raise ConfigError("service.http.token_file", str(exc)) from None
    try:
        return TokenTable(tuple(tokens))
    except ValueError as exc:  # tokens_file repeats token_file's name or token
        raise ConfigError("service.http.tokens_file", str(exc)) from None


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
    tariff = Tariff.loads(_secret_file(base / rel, key_path), key_path)
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
        meters = tuple(
            MeterRef(m.meter, m.gateway, m.remote, max_power_w=m.max_power_w, area=m.area) for m in a.meters
        )
        return Account(a.account_id, meters, a.tariff, a.customer_class, a.protected)
    except ValueError as exc:
        name, _, reason = str(exc).partition(": ")
        raise ConfigError(f"{path}.{name}", reason) from None


SAMPLE = """\
# amigw feectl configuration. Values shown are the defaults unless marked "example".
# Relative paths are taken from this file's folder. Money in fen, energy in 0.01 kWh.

[feectl]
# FC-03 balance levels and the overdraft limit L; FC-08 restore threshold R.
alarm1_fen = 5000
alarm2_fen = 2000
overdraft_limit_fen = 0
restore_threshold_fen = 0
# FC-06 grace after the zero notice, before a trip.
grace_s = 1800
# FC-04: "charge" (charge estimates, marked, trued up later) or "defer" (hold them).
estimate_policy = "charge"
# Local time for no-trip windows and audit days: a fixed offset or an IANA name.
zone = "+08:00"
# FC-11/12: command validity (<= 86400), result grace, read-back timeout, retries.
command_validity_s = 600
result_grace_s = 60
verify_timeout_s = 300
max_attempts = 3
retry_spacing_s = 300
# VEE-14 sum check tolerances and the FC-14 estimated share that holds trips.
sum_tol_bp = 200
sum_tol_abs_centi_kwh = 10
max_estimated_share_bp = 2500
interval_s = 900
rules_version = "v1"

[feectl.windows]
# FC-09: trips only on working days within these local hours.
allowed_hours = ["08:30", "16:30"]
weekend_days = ["sat", "sun"]
holidays = []
makeup_workdays = []

[service]
# The SQLite ledger (WAL, synchronous=FULL).
db_path = "feectl.sqlite"
# How often commands are expired and every account re-evaluated.
tick_interval_s = 5.0
# An ISSUED command without a result is resent, with the same id, this often.
resend_interval_s = 60.0
# Prometheus metrics on "host:port" (example "127.0.0.1:9482"); "" disables the endpoint.
metrics_listen = ""
# Rejected messages and intervals kept in the ledger's rejects table (oldest pruned first).
rejects_keep = 100000
# Gateway -> file holding its command key (hex, >= 16 bytes); every enrolled gateway needs one.
command_key_files = {}
# gw-1 = "/etc/amigw/keys/gw-1.key"   (example)
# Tariff id -> tariff document (see docs/feectl.md).
tariff_files = {}
# ln-res = "tariffs/ln-res.toml"   (example)

[service.mqtt]
# The connection (the same keys as ingest's [mqtt], with fee control's defaults).
# The broker: mqtt://host:port, or mqtts://host:port for TLS (verified against ca_file).
url = "mqtt://127.0.0.1:1883"
# The persistent subscribing session; publishing uses "<client_id>-pub".
client_id = "amigw-feectl-1"
# "5" (MQTT 5) or "3.1.1".
protocol = "5"
# username = "feectl"
# The password: in a file (preferred), or inline; not both.
# password_file = "/etc/amigw/feectl.mqtt-password"
# password = "secret"
# ca_file = "/etc/amigw/ca.pem"
keepalive_s = 60
session_expiry_s = 604800
# Messages in flight to the service (the MQTT 5 Receive Maximum).
queue_max = 64
connect_timeout_s = 10.0
# No PUBACK within this: the publish is retried later.
publish_timeout_s = 10.0

[service.http]
# The ops API (docs/ops-api.md): payments, accounts, audit. When enabled it needs tokens_file,
# token_file, or both.
enabled = false
host = "127.0.0.1"
port = 8480
# Named tokens with roles: [tokens.<name>] role = "read" | "operate" | "payments" | "enrol" |
# "admin" and token_sha256 = "<hex sha256 of the token>" ("python -m ingest.ops.auth NAME ROLE"
# prints a new token and its entry).
# tokens_file = "/etc/amigw/feectl.tokens.toml"
# One token in clear (>= 16 characters), named "token_file", with the role "payments".
# token_file = "/etc/amigw/feectl.token"
# Request bodies larger than this are refused (413).
max_body_bytes = 65536

[service.views]
# The ops API's read views and console (docs/ops-views.md): fleet health, collection success,
# a meter's readings and load curve, alarms. They read ingest's own configuration file for
# InfluxDB, the meter registry, the loss account and the interval grid; "" leaves them off.
ingest_config = ""
# ingest_config = "/etc/amigw/ingest.toml"   (example)
# Alarm acknowledgements (SQLite).
acks_path = "alarm-acks.sqlite"
# A gateway with no status message for this long shows as "stale".
stale_after_s = 180.0

[service.limits]
# Bounds on values entering the service; anything outside is rejected with its reason.
# An interval's energy is at most ceil(max_power_w x its length) (the meter's rating, VEE-05);
# meters[].max_power_w overrides this default per meter.
max_power_w = 100000
# The longest interval accepted, in seconds.
max_interval_s = 86400
# Intervals may not start before this date (UTC) nor end later than now + future_tolerance_s.
earliest_interval = 2000-01-01
future_tolerance_s = 300
# The largest single payment accepted by POST /v1/payments (400 amount_out_of_range above it).
max_payment_fen = 10000000

[service.notify]
# Customer notifications (docs/feectl.md, Notifications). Each one is kept in the ledger's
# outbox until every notifier below has delivered it (or refused it for good).
# Publish them on ami/v1/agg/notifications (QoS 1).
mqtt = true
# After a failed delivery, wait retry_initial_s, then twice as long each time, at most
# retry_max_s; a notifier retries until it delivers (later notifications wait behind it).
retry_initial_s = 1.0
retry_max_s = 300.0
# Delivered (or refused) notifications are pruned after this many days.
keep_days = 30.0

# Webhooks, each delivering every notification on its own (none by default). 2xx delivers;
# 408, 429, 5xx, a timeout or no connection are retried; another 4xx is refused for good.
# [[service.notify.webhook]]                     (example)
# name = "webhook"             # labels its outbox rows and metrics; distinct per webhook
# url = "https://notify.example.net/amigw"
# secret_file = "/etc/amigw/webhook.secret"   # >= 16 characters: signs each body (HMAC-SHA256)
# timeout_s = 10.0

# Accounts enrolled at start: an entry is applied when it is new or was edited since it was last
# applied, so changes made through the operations (enrol_account) survive a restart. Each meter
# names the one gateway whose intervals are charged to it (required; intervals from any other
# gateway are rejected).
# [[service.accounts]]                           (example)
# account_id = "acc-1"
# tariff = "ln-res"
# protected = false            # FC-07
# customer_class = "residential"
# meters = [{ meter = "000012345678", gateway = "gw-1", remote = true, max_power_w = 13200,
#             area = "TA-0042" }]     # area: the transformer area, for planned-outage notices
"""
