"""The ingest pipeline's configuration: TOML -> frozen dataclasses, validated once at start (H6).

:func:`load_config` reads the file and raises :class:`~protocols.errors.ConfigError` naming the
dotted key for every problem (unknown keys, wrong types, bad values, an unreadable registry or
tariff calendar). :data:`SAMPLE` is the commented sample (``amigw config sample ingest``); a unit
test loads it, so it cannot rot. The commented values are the defaults.

Sections: ``[mqtt]`` (the consumer), ``[influx]`` (:class:`~ingest.sinks.influx.http.SinkConfig`),
``[victoriametrics]`` (:class:`~ingest.sinks.victoria.config.VictoriaConfig`: readings and
intervals in VictoriaMetrics when enabled),
``[dead_letter]``, ``[dedup]``, ``[pipeline]`` (schema, grid, retries, aggregates, outages,
confirmations), ``[loss]`` (:class:`~ingest.pipeline.loss.LossConfig`: loss accounting),
``[line_loss]`` (LL-02 bands of the daily report, per area type), ``[state]``
(:class:`~ingest.pipeline.statedb.StateConfig`: the shared state database), ``[validation]`` (the
thresholds of the validation rules, :class:`ValidationSection`), plus
top-level ``registry``, ``tariff_calendar`` and ``metrics_listen``.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from ingest.mqtt.consumer import ConsumerConfig
from ingest.mqtt.settings import MqttSettings
from ingest.pipeline.deadletter import DeadLetterConfig
from ingest.pipeline.dedup import DedupConfig
from ingest.pipeline.loss import LossConfig
from ingest.pipeline.statedb import StateConfig
from ingest.sinks.influx.http import SinkConfig
from ingest.sinks.victoria.config import VictoriaConfig
from protocols import topics
from protocols.config import loads_toml
from protocols.errors import ConfigError
from protocols.payload import MAX_PAYLOAD_BYTES

__all__ = [
    "DEFAULT_CALENDAR",
    "SAMPLE",
    "IngestConfig",
    "LineLossSection",
    "LossBand",
    "MqttSection",
    "PipelineSection",
    "ValidationSection",
    "load_calendar",
    "load_config",
    "load_registry",
    "load_tariff_calendars",
    "parse_config",
]

READINGS_FILTER = topics.READINGS_SHARED
EVENTS_FILTER = topics.EVENTS_SHARED

# The built-in time-of-use calendar (used when ``tariff_calendar = ""``): one season, one profile,
# the common 尖峰平谷 plan of the simulators (TOU-01/03).
DEFAULT_CALENDAR: dict[str, Any] = {
    "utc_offset_minutes": 480,
    "seasons": {"all": {"months": list(range(1, 13)), "workday": "standard"}},
    "profiles": {
        "standard": {
            "segments": [
                ["00:00", "08:00", "valley"],
                ["08:00", "10:00", "flat"],
                ["10:00", "11:30", "peak"],
                ["11:30", "13:00", "sharp"],
                ["13:00", "17:00", "flat"],
                ["17:00", "22:00", "peak"],
                ["22:00", "24:00", "valley"],
            ]
        }
    },
}


@dataclass(frozen=True, slots=True)
class MqttSection(MqttSettings):
    """``[mqtt]``: the connection (:class:`~ingest.mqtt.settings.MqttSettings`, shared with fee
    control) and what every worker subscribes to. Worker ``i`` connects as ``<client_id>-<i>``."""

    client_id: str = "amigw-ingest"
    topics: tuple[str, ...] = (READINGS_FILTER, EVENTS_FILTER)
    max_payload_bytes: int = MAX_PAYLOAD_BYTES

    def __post_init__(self) -> None:
        MqttSettings.__post_init__(self)  # explicit: zero-argument super() fails in slots classes
        self.consumer(0)  # the consumer's own checks (topics, max_payload_bytes)

    def consumer(self, worker: int) -> ConsumerConfig:
        return self.consumer_config(f"{self.client_id}-{worker}", self.topics, self.max_payload_bytes)


@dataclass(frozen=True, slots=True)
class PipelineSection:
    """``[pipeline]``: what each batch turns into, and how hard the worker retries."""

    schema: Literal["wide", "narrow"] = "wide"
    interval_s: int = 900
    max_gap_intervals: int = 8
    future_tol_s: int = 300
    min_ts: str = "2000-01-01"
    check_topic_gateway: bool = True
    confirm: bool = True
    publish_intervals: bool = True
    publish_daily: bool = True
    publish_alarms: bool = True
    aggregates_encoding: Literal["binary", "json"] = "binary"
    rollup_delay_s: float = 300.0
    rollup_check_s: float = 10.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    outage_window_s: int = 120
    outage_min_meters: int = 3
    outage_pct: int = 30
    outage_hold_s: int = 1800
    state_path: str = ""  # "": runstate.sqlite beside the dedup database (IngestConfig.run_state_path)
    state_max_age_s: float = 604_800.0

    def __post_init__(self) -> None:
        if self.state_max_age_s <= 0:
            raise ValueError("state_max_age_s: must be > 0")
        if self.interval_s <= 0 or 86_400 % self.interval_s:
            raise ValueError("interval_s: must divide a day")
        if not 0 <= self.rollup_delay_s <= 7 * 86_400:
            raise ValueError(f"rollup_delay_s: expected 0 <= seconds <= 604800, got {self.rollup_delay_s}")
        if not 0 < self.rollup_check_s <= 3600:
            raise ValueError(f"rollup_check_s: expected 0 < seconds <= 3600, got {self.rollup_check_s}")
        if self.max_gap_intervals < 0:
            raise ValueError("max_gap_intervals: must be >= 0")
        if self.future_tol_s < 0:
            raise ValueError("future_tol_s: must be >= 0")
        if self.retry_initial_s <= 0 or self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_initial_s: need 0 < retry_initial_s <= retry_max_s")
        if self.outage_window_s <= 0 or self.outage_min_meters < 1 or not 0 <= self.outage_pct <= 100:
            raise ValueError("outage_window_s: outage parameters out of range")
        _min_ts_ms(self.min_ts)

    @property
    def min_ts_ms(self) -> int:
        return _min_ts_ms(self.min_ts)


def _min_ts_ms(text: str) -> int:
    """``min_ts`` (an ISO date or date-time, UTC unless it names an offset) in epoch ms."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"min_ts: expected an ISO date such as '2000-01-01', got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    ms = int(when.timestamp() * 1000)
    if ms < 0:
        raise ValueError(f"min_ts: must not be before 1970-01-01, got {text!r}")
    return ms


def _pct_bp(value: float, key: str) -> int:
    """A percentage with at most two decimals, in 0.01 % (basis points)."""
    bp = round(value * 100)
    if not 0 <= value <= 100 or abs(bp - value * 100) > 1e-6:
        raise ValueError(f"{key}: expected a percentage 0..100 with at most two decimals, got {value}")
    return bp


@dataclass(frozen=True, slots=True)
class LossBand:
    """``[line_loss.area_types.<type>]``: the LL-02 band of one area type; unset keys inherit
    ``[line_loss]``'s."""

    high_pct: float | None = None
    min_complete_pct: int | None = None

    def __post_init__(self) -> None:
        if self.high_pct is not None:
            _pct_bp(self.high_pct, "high_pct")
        if self.min_complete_pct is not None and not 0 <= self.min_complete_pct <= 100:
            raise ValueError(f"min_complete_pct: expected 0..100, got {self.min_complete_pct}")


@dataclass(frozen=True, slots=True)
class LineLossSection:
    """``[line_loss]``: LL-02 classification for the daily report; a rate above ``high_pct`` is
    HIGH, fewer than ``min_complete_pct`` % of the customers present is NOT_COMPUTABLE. The
    registry's ``[areas."<name>"] type`` selects a band of ``area_types`` (urban, rural, ...)."""

    high_pct: float = 10.0
    min_complete_pct: int = 98
    area_types: dict[str, LossBand] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _pct_bp(self.high_pct, "high_pct")
        if not 0 <= self.min_complete_pct <= 100:
            raise ValueError(f"min_complete_pct: expected 0..100, got {self.min_complete_pct}")

    def band(self, area_type: str | None) -> tuple[int, int]:
        """``(min_complete_pct, high_bp)`` of an area type (``None``: the default band).
        Raises: KeyError for a type ``area_types`` does not list."""
        b = self.area_types[area_type] if area_type is not None else LossBand()
        high = self.high_pct if b.high_pct is None else b.high_pct
        complete = self.min_complete_pct if b.min_complete_pct is None else b.min_complete_pct
        return complete, _pct_bp(high, "high_pct")


def _fixed(value: float, decimals: int, key: str) -> int:
    """A decimal number with at most ``decimals`` decimals, as an integer of 10^-decimals units."""
    scaled = Decimal(str(value)) * 10**decimals
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{key}: expected at most {decimals} decimals, got {value}")
    return int(scaled)


@dataclass(frozen=True, slots=True)
class ValidationSection:
    """``[validation]``: thresholds of the validation rules (VEE-nn of
    ``docs/rules.md``) in the rules' units; defaults from the rules. The
    grid, future tolerance, lower time bound and longest interpolated gap are ``[pipeline]``'s.
    :meth:`params` gives them as ``ingest.rules.stages.ValidationParams``."""

    clock_skew_tol_s: int = 300  # VEE-12
    meter_clock_utc_offset_min: int = 480  # VEE-12: the meters' local time (meter_clock) is UTC+8
    rollover_band_pct: int = 90  # VEE-02
    replaced_below_kwh: float = 10.0  # VEE-03
    replaced_drop_kwh: float = 10.0  # VEE-03
    register_decrease_min_kwh: float = 0.05  # VEE-04
    spike_margin_pct: int = 10  # VEE-05
    zero_power_min_kw: float = 0.4  # VEE-08
    voltage_invalid_pct: int = 150  # VEE-16
    phase_break_pct: int = 60  # VEE-17
    voltage_loss_pct: int = 78  # VEE-17
    voltage_loss_current_pct_ib: float = 0.5  # VEE-17
    pf_floor: float = 0.3  # VEE-18
    spike_rel_pct: int = 300  # VEE-06
    spike_rel_floor_kwh: float = 0.1  # VEE-06
    fast_running_ratio: float = 10.0  # VEE-07
    fast_running_min_kwh: float = 0.1  # VEE-07
    stopped_intervals: int = 4  # VEE-08
    zero_long_intervals: int = 288  # VEE-09
    stuck_readings: int = 8  # VEE-19
    flat_gap_max_intervals: int = 2016  # VEE-21
    prolonged_est_days: int = 3  # VEE-22

    def __post_init__(self) -> None:
        self.params()

    def params(self) -> Any:
        """The ``ValidationParams`` of this section (``[pipeline]``'s fields at their defaults).
        Raises: ValueError naming the key."""
        from ingest.rules.stages import ValidationParams

        names = {
            "skew_tol_ms": "clock_skew_tol_s",
            "meter_clock_utc_offset_ms": "meter_clock_utc_offset_min",
            "replaced_below": "replaced_below_kwh",
            "replaced_drop": "replaced_drop_kwh",
            "decrease_min": "register_decrease_min_kwh",
            "zero_power_min_w": "zero_power_min_kw",
            "voltage_loss_current_permille": "voltage_loss_current_pct_ib",
            "spike_rel_floor": "spike_rel_floor_kwh",
            "fast_ratio_x10": "fast_running_ratio",
            "fast_min": "fast_running_min_kwh",
            "prolonged_est_ms": "prolonged_est_days",
        }
        values = {
            "skew_tol_ms": self.clock_skew_tol_s * 1000,
            "meter_clock_utc_offset_ms": self.meter_clock_utc_offset_min * 60_000,
            "rollover_band_pct": self.rollover_band_pct,
            "replaced_below": _fixed(self.replaced_below_kwh, 2, "replaced_below_kwh"),
            "replaced_drop": _fixed(self.replaced_drop_kwh, 2, "replaced_drop_kwh"),
            "decrease_min": _fixed(self.register_decrease_min_kwh, 2, "register_decrease_min_kwh"),
            "spike_margin_pct": self.spike_margin_pct,
            "zero_power_min_w": _fixed(self.zero_power_min_kw, 3, "zero_power_min_kw"),
            "voltage_invalid_pct": self.voltage_invalid_pct,
            "phase_break_pct": self.phase_break_pct,
            "voltage_loss_pct": self.voltage_loss_pct,
            "voltage_loss_current_permille": _fixed(
                self.voltage_loss_current_pct_ib, 1, "voltage_loss_current_pct_ib"
            ),
            "pf_floor": _fixed(self.pf_floor, 3, "pf_floor"),
            "spike_rel_pct": self.spike_rel_pct,
            "spike_rel_floor": _fixed(self.spike_rel_floor_kwh, 2, "spike_rel_floor_kwh"),
            "fast_ratio_x10": _fixed(self.fast_running_ratio, 1, "fast_running_ratio"),
            "fast_min": _fixed(self.fast_running_min_kwh, 2, "fast_running_min_kwh"),
            "stopped_intervals": self.stopped_intervals,
            "zero_long_intervals": self.zero_long_intervals,
            "stuck_readings": self.stuck_readings,
            "flat_gap_max_intervals": self.flat_gap_max_intervals,
            "prolonged_est_ms": self.prolonged_est_days * 86_400_000,
        }
        try:
            return ValidationParams(**values)
        except ValueError as exc:  # "<param>: reason" -> "<key>: reason"
            param, _, reason = str(exc).partition(": ")
            raise ValueError(f"{names.get(param, param)}: {reason}") from None


@dataclass(frozen=True, slots=True)
class IngestConfig:
    registry: str = ""
    tariff_calendar: str = ""
    tariff_calendars: dict[str, str] = field(default_factory=dict)
    metrics_listen: str = ""
    mqtt: MqttSection = field(default_factory=MqttSection)
    influx: SinkConfig = field(default_factory=SinkConfig)
    victoriametrics: VictoriaConfig = field(default_factory=VictoriaConfig)
    dead_letter: DeadLetterConfig = field(default_factory=DeadLetterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    loss: LossConfig = field(default_factory=LossConfig)
    line_loss: LineLossSection = field(default_factory=LineLossSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    state: StateConfig = field(default_factory=StateConfig)

    def __post_init__(self) -> None:
        if self.metrics_listen:
            _, sep, port = self.metrics_listen.rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError(f"metrics_listen: expected host:port or '', got {self.metrics_listen!r}")
        self.validation_params()

    @property
    def run_state_path(self) -> str:
        """``[pipeline] state_path``, else ``runstate.sqlite`` beside the dedup database."""
        return self.pipeline.state_path or str(Path(self.dedup.path).with_name("runstate.sqlite"))

    def validation_params(self) -> Any:
        """``ValidationParams`` of ``[validation]`` with ``[pipeline]``'s grid, time bounds and
        longest interpolated gap. Raises: ValueError naming the ``[pipeline]`` key."""
        p = self.pipeline
        keys = {
            "interval_ms": "pipeline.interval_s",
            "future_tol_ms": "pipeline.future_tol_s",
            "min_ts_ms": "pipeline.min_ts",
            "max_gap_intervals": "pipeline.max_gap_intervals",
        }
        try:
            return replace(
                self.validation.params(),
                interval_ms=p.interval_s * 1000,
                future_tol_ms=p.future_tol_s * 1000,
                min_ts_ms=p.min_ts_ms,
                max_gap_intervals=p.max_gap_intervals,
            )
        except ValueError as exc:
            param, _, reason = str(exc).partition(": ")
            raise ValueError(f"{keys.get(param, param)}: {reason}") from None


def _resolve(base: Path, value: str) -> str:
    return value if not value or Path(value).is_absolute() else str(base / value)


def parse_config(text: str, source: str = "ingest.toml", base_dir: Path | None = None) -> IngestConfig:
    """Parse and check; relative file paths are taken from ``base_dir`` (the file's folder).

    Raises: ConfigError naming the key (including an unreadable registry or calendar)."""
    cfg = loads_toml(IngestConfig, text, source)
    base = base_dir or Path.cwd()
    cfg = replace(
        cfg,
        registry=_resolve(base, cfg.registry),
        tariff_calendar=_resolve(base, cfg.tariff_calendar),
        tariff_calendars={name: _resolve(base, path) for name, path in cfg.tariff_calendars.items()},
        dead_letter=replace(cfg.dead_letter, path=_resolve(base, cfg.dead_letter.path)),
        dedup=replace(cfg.dedup, path=_resolve(base, cfg.dedup.path)),
        loss=replace(cfg.loss, path=_resolve(base, cfg.loss.path)),
        pipeline=replace(cfg.pipeline, state_path=_resolve(base, cfg.pipeline.state_path))
        if cfg.pipeline.state_path
        else cfg.pipeline,
    )
    registry = load_registry(cfg)
    for area, area_type in zip(registry.areas, registry.area_types, strict=True):
        if area_type is not None and area_type not in cfg.line_loss.area_types:
            listed = ", ".join(sorted(cfg.line_loss.area_types)) or "none"
            raise ConfigError(
                f'registry: areas."{area}".type',
                f"area type {area_type!r} has no [line_loss.area_types.{area_type}] band (listed: {listed})",
            )
    load_tariff_calendars(cfg, load_calendar(cfg))
    return cfg


def load_config(path: str | Path) -> IngestConfig:
    """Read and validate ``path``. Raises :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    return parse_config(text, str(p), p.resolve().parent)


def load_registry(cfg: IngestConfig) -> Any:
    """The meter registry (an empty one when ``registry = ""``). Raises: ConfigError."""
    from ingest.model.registry import MeterRegistry

    try:
        return MeterRegistry.load(cfg.registry or "/dev/null")
    except ConfigError as exc:
        raise ConfigError("registry", f"{cfg.registry}: {exc}") from None


def load_calendar(cfg: IngestConfig) -> Any:
    """The tariff calendar (:data:`DEFAULT_CALENDAR` when ``tariff_calendar = ""``). Raises: ConfigError."""
    from ingest.model.tariff import TariffCalendar

    if not cfg.tariff_calendar:
        return TariffCalendar.from_dict(DEFAULT_CALENDAR)
    return _calendar_file(cfg.tariff_calendar, "tariff_calendar")


def load_tariff_calendars(cfg: IngestConfig, default: Any) -> dict[str, Any]:
    """``[tariff_calendars]``: registry tariff name -> its calendar. Every calendar must share the
    default's UTC offset (local days are cut once per batch). Raises: ConfigError."""
    out = {}
    for name, path in cfg.tariff_calendars.items():
        key = f"tariff_calendars.{name}"
        cal = _calendar_file(path, key)
        if cal.utc_offset_ms != default.utc_offset_ms:
            minutes = default.utc_offset_ms // 60_000
            raise ConfigError(key, f"utc_offset_minutes must equal the default calendar's ({minutes})")
        out[name] = cal
    return out


def _calendar_file(path: str, key: str) -> Any:
    from ingest.model.tariff import TariffCalendar

    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(key, f"cannot read {path}: {exc}") from None
    return TariffCalendar.from_dict(doc, key)


SAMPLE = """\
# amigw ingest configuration. Values shown are the defaults unless marked "example".

# The meter registry (ratings, multipliers, areas; see ingest/model/registry.py). An empty string
# means no registry: every meter is unknown, rating checks are skipped, multipliers are 1.
# Relative paths are taken from this file's folder.
registry = ""
# The time-of-use calendar: the calendar part of a tariff document (seasons, profiles, holidays,
# make-up workdays, per-day overrides, calendar versions; docs/feectl.md#configuration and
# ingest/model/tariff.py), so fee control's file of the same tariff serves. An empty string
# selects the built-in calendar: valley 22:00-08:00, flat 08:00-10:00 and 13:00-17:00, peak
# 10:00-11:30 and 17:00-22:00, sharp 11:30-13:00, UTC+8.
tariff_calendar = ""
# Where the Prometheus metrics are served (worker i listens on port + i); "" disables them.
metrics_listen = ""

# Calendars of meters on other tariffs: registry tariff name = calendar file, with the same UTC
# offset as tariff_calendar. Meters whose tariff is not listed use tariff_calendar.
[tariff_calendars]
# commercial = "calendar-commercial.toml"   (example)

[mqtt]
# The broker: mqtt://host:port, or mqtts://host:port for TLS.
url = "mqtt://127.0.0.1:1883"
# Worker i connects as "<client_id>-<i>" with a persistent session, so a restarted worker gets
# back what it had not acknowledged.
client_id = "amigw-ingest"
# Shared subscriptions: N workers split the stream.
topics = ["$share/ingest/ami/v1/+/up/readings", "$share/ingest/ami/v1/+/up/events"]
# "5" (MQTT 5) or "3.1.1".
protocol = "5"
# username = "headend"
# password = "secret"
# ca_file = "/etc/amigw/ca.pem"
keepalive_s = 60
# How long the broker keeps a stopped worker's session (MQTT 5). Until then the broker queues
# the worker's share of the shared subscription for it (delivered when it comes back); after
# that the session and its queue are dropped. Nothing is lost either way: the edges re-send
# every batch the head-end has not confirmed, and the re-sends reach the live workers
# (docs/broker.md).
session_expiry_s = 3600
# At most this many messages wait in a worker unacknowledged (the MQTT 5 Receive Maximum too):
# with payloads of at most max_payload_bytes this bounds a worker's buffered memory.
queue_max = 16
# A message over this many bytes is not buffered: its first 4096 bytes are dead-lettered with the
# reason "payload too large" and it is acknowledged. Default: the payload format's bound (16 MiB).
max_payload_bytes = 16777216
connect_timeout_s = 10.0
# Publishing aggregates waits at most this long for the broker's PUBACK, then retries the batch.
publish_timeout_s = 30.0

[influx]
url = "http://127.0.0.1:8086"
# "v1" (/write, InfluxQL), "v2" (/api/v2/write) or "auto" (asks /ping).
api = "auto"
# v1 database (and v2 bucket when bucket is not set).
database = "amigw"
# retention_policy = "autogen"
# username = "amigw"
# password = "secret"
# v2: organisation, bucket and token.
org = ""
# bucket = "amigw"
# token = "..."
# Request bodies gzip-compressed; levels 1 and 2 go through Intel ISA-L (the isal package, part
# of the ingest extra), the others through zlib.
gzip = true
gzip_level = 1
max_batch_lines = 5000
max_batch_bytes = 4194304
timeout_s = 10.0
# One-shot commands (--daily-report, --replay-dead-letters) try a write this many times with
# this back-off; the worker retries forever ([pipeline] retry_initial_s, retry_max_s) without
# acknowledging (back-pressure, never loss). Retry-After is honoured up to retry_after_max_s.
max_attempts = 5
backoff_initial_s = 0.2
backoff_max_s = 10.0
retry_after_max_s = 60.0
# A refusal of ours (401/403 credentials or privileges, 404 database or bucket) is never blamed on
# the data: the worker keeps the batch unacknowledged, raises amigw_ingest_sink_refused and retries
# until it is fixed. --check-config probes the server. With create_database = true a missing v1
# database is created (CREATE DATABASE; the user must be an admin) instead of waiting for it.
create_database = false

[victoriametrics]
# true: readings and intervals go to VictoriaMetrics (a single node at url, or a cluster's vminsert
# at write_url and vmselect at read_url); the records it cannot hold (events, alarms, rollups, the
# daily report, rewritten flags) still go to [influx]. See docs/victoriametrics.md.
enabled = false
url = "http://127.0.0.1:8428"
# Cluster: write_url = "http://vminsert:8480/insert/0/influx" (example) and
# read_url = "http://vmselect:8481/select/0/prometheus" (example); "" means url.
write_url = ""
read_url = ""
# The value of the db label every sample carries, so several pipelines can share a server.
database = "amigw"
# ca_file = "/etc/amigw/ca.pem"
gzip = true
gzip_level = 1
max_batch_lines = 5000
max_batch_bytes = 4194304
timeout_s = 30.0

[dead_letter]
# Undecodable payloads and lines InfluxDB refused, with the reason (SQLite, or [state] url); replay them with
# amigw ingest --replay-dead-letters once the cause is fixed.
path = "deadletter.sqlite"
# Bounds: over either one, the oldest entry of the reason holding the most goes first.
max_entries = 100000
max_bytes = 268435456
# An entry keeps at most this much of its payload (larger ones: a prefix, the full size and a
# SHA-256, marked truncated, and cannot be replayed). The default is the largest payload the
# decoder accepts.
max_entry_bytes = 16777216

[dedup]
# Processed (gateway, seq) batches, so redeliveries are skipped (SQLite, shared by the workers of
# this machine, or the [state] url database, shared by every machine).
path = "dedup.sqlite"
keep_per_gateway = 10000
max_age_s = 604800.0
prune_every = 1000

[pipeline]
# "wide": one point per (meter, ts) with a field per quantity (recommended); "narrow": one
# point per reading with a quantity tag.
schema = "wide"
# The interval grid of register reads, and the longest gap (in intervals) that is estimated.
interval_s = 900
max_gap_intervals = 8
# Readings later than the batch's send time plus this are flagged FUTURE_TIME, readings earlier
# than min_ts (an ISO date or date-time, UTC unless an offset is given) BEFORE_MIN_TIME: both are
# stored with the flag and left out of intervals, hourly and daily totals and billing. Events
# outside the same bounds are dead-lettered.
future_tol_s = 300
min_ts = "2000-01-01"
# Dead-letter a batch whose gateway differs from its topic's gateway level.
check_topic_gateway = true
# Confirm to each gateway, on ami/v1/<gateway>/down/ack, the batches (seq ranges) and events
# (ids) that are durable: written, dead-lettered with a reason, or already durable. The edge
# keeps a batch until it is confirmed and re-sends it otherwise.
confirm = true
# Publish validated intervals to ami/v1/agg/intervals/<gateway> (QoS 1, before the batch is
# acknowledged) and each day's time-of-use totals to ami/v1/agg/daily/<gateway> when the day is
# rolled up (again after late data).
publish_intervals = true
publish_daily = true
# Publish each new area-outage alarm (OUT-02, below) to ami/v1/agg/alarms (QoS 1), where fee
# control notifies the area's customers.
publish_alarms = true
# Encoding of the intervals messages: "binary" (columnar, like the readings payload; a third of
# the bytes) or "json" (for consumers that cannot read msgpack). protocols.aggregates reads both.
aggregates_encoding = "binary"
# Daily and hourly totals are written once per closed day, computed from the stored intervals:
# a day (with its hours) is rolled up when it has ended and no batch touched it for
# rollup_delay_s seconds (data arriving later rolls it up again, rewriting its rows). Each worker
# looks for due days every rollup_check_s. The days still owed survive a crash in the dedup
# database (with [state] url: shared, so a day owed by one machine is rolled up by any).
rollup_delay_s = 300.0
rollup_check_s = 10.0
# While InfluxDB is down: wait this long before retrying a batch, doubling up to the maximum.
retry_initial_s = 0.5
retry_max_s = 30.0
# Area outage (OUT-02): power-down or collapsed-voltage events of max(outage_min_meters,
# outage_pct % of the area's customers) meters within outage_window_s raise one alarm; events
# within outage_hold_s of an open alarm join it (an earlier one moves the alarm back to it).
outage_window_s = 120
outage_min_meters = 3
outage_pct = 30
outage_hold_s = 1800
# Run state of the run rules (VEE-08 stopped meter, VEE-09 long zero consumption, VEE-19 stuck
# value) carried from one batch to the next, per channel (SQLite, shared by the workers of this
# machine, or the [state] url database; "" = runstate.sqlite beside the dedup database). Channels not seen for
# state_max_age_s are forgotten (their runs restart). The open area-outage alarms are kept
# there too, for state_max_age_s.
state_path = ""
state_max_age_s = 604800.0

[loss]
# Loss accounting (SQLite, shared by the workers of this machine, or the [state] url database,
# shared by every machine): per gateway, the durable seq
# ranges and the holes between them (amigw ingest --loss; gauge amigw_ingest_missing_batches).
path = "loss.sqlite"
# A hole open longer than this raises a seq_gap alarm (log line, counter, InfluxDB "alarms").
gap_alarm_s = 600.0

[state]
# Where the head-end's state lives: the dedup marks and the periods owed a rollup ([dedup]), the
# loss account ([loss]), the run state ([pipeline] state_path) and the dead letters
# ([dead_letter]). "" keeps each in its SQLite file, shared by the workers of this machine. With
# ingest on several machines every worker must see the same state: set a PostgreSQL database
# (example: url = "postgresql://amigw:secret@db.example:5432/amigw"), the same for every machine;
# the path keys are then unused. See docs/shared-state.md.
url = ""
# How long a connection attempt to that database may take before it counts as unreachable.
connect_timeout_s = 5.0

[line_loss]
# LL-02 classes of the daily report (amigw ingest --daily-report): a loss rate above high_pct is
# HIGH; fewer than min_complete_pct % of an area's customers with a complete day is
# NOT_COMPUTABLE (between that and 100 %: INCOMPLETE).
high_pct = 10.0
min_complete_pct = 98
# Bands per area type: the registry's [areas."<name>"] type = "<type>" selects one; keys left out
# inherit the ones above. A type the registry names must be listed here.
# [line_loss.area_types.rural]   (example)
# high_pct = 12.0

[validation]
# Thresholds of the validation rules (docs/rules.md; docs/ingest-kernels.md).
# VEE-12: a meter whose clock (meter_clock, kept in the meters' local time, UTC+offset) differs
# from the read time by more than clock_skew_tol_s has every reading flagged CLOCK_SKEW.
clock_skew_tol_s = 300
meter_clock_utc_offset_min = 480
# VEE-02: a register lower than before is a rollover when the earlier value was at least this
# percentage of the rollover point (and the wrapped delta is physically possible).
rollover_band_pct = 90
# VEE-03: a drop to below replaced_below_kwh by at least replaced_drop_kwh is METER_REPLACED.
replaced_below_kwh = 10.0
replaced_drop_kwh = 10.0
# VEE-04: a smaller drop than this is jitter (E = 0, no flag); a larger one WENT_BACKWARDS.
register_decrease_min_kwh = 0.05
# VEE-05: SPIKE above U_n x I_max x phases x time x (100 + spike_margin_pct) %.
spike_margin_pct = 10
# VEE-08: zero consumption while |P| >= zero_power_min_kw (or the current carrying it at U_n).
zero_power_min_kw = 0.4
# VEE-16: a phase voltage above voltage_invalid_pct % of U_n is OUT_OF_RANGE.
voltage_invalid_pct = 150
# VEE-17: PHASE_LOSS below phase_break_pct % of U_n, or below voltage_loss_pct % with a current
# above voltage_loss_current_pct_ib % of I_b, while another phase is at least phase_break_pct %.
phase_break_pct = 60
voltage_loss_pct = 78
voltage_loss_current_pct_ib = 0.5
# VEE-18: |PF| below pf_floor with active power flowing is PF_OUT_OF_BOUNDS.
pf_floor = 0.3
# VEE-06: per meter, energy channel and local day, the highest interval is SPIKE_REL (a warning,
# still billable) when it exceeds the third-highest by more than spike_rel_pct %, provided the
# third-highest is at least spike_rel_floor_kwh (interval energy, multiplier applied).
spike_rel_pct = 300
spike_rel_floor_kwh = 0.1
# VEE-07: an interval of at least fast_running_min_kwh above fast_running_ratio times the energy
# the active power read with it implies is FAST_RUNNING (not billable).
fast_running_ratio = 10.0
fast_running_min_kwh = 0.1
# VEE-08: the register unchanged over stopped_intervals consecutive intervals while current flows
# is STOPPED (not billable). VEE-09: zero_long_intervals consecutive zero intervals (no outage)
# are ZERO_LONG (billable, for review). Runs are judged within one batch (docs/ingest-kernels.md).
stopped_intervals = 4
zero_long_intervals = 288
# VEE-19: a phase voltage, current or power repeating one exact non-zero value for stuck_readings
# readings while another of the meter's values changes is STUCK.
stuck_readings = 8
# VEE-21: a gap longer than [pipeline] max_gap_intervals, up to flat_gap_max_intervals (3 weeks),
# is estimated by spreading the register delta evenly (ESTIMATED|EST_FLAT: like-day shapes need
# history the pipeline does not keep); longer gaps stay gaps. VEE-22: estimated intervals ending
# more than prolonged_est_days after the meter's last actual reading are PROLONGED_EST.
flat_gap_max_intervals = 2016
prolonged_est_days = 3
"""
