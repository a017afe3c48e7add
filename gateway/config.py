"""The edge agent's configuration: TOML -> frozen dataclasses, validated once at start.

:func:`load_config` reads the file and raises :class:`~protocols.errors.ConfigError` naming the
dotted key for every problem: unknown keys, wrong types, bad values, and cross-references
(a meter on a bus that does not exist or of a protocol that does not run over that kind of line,
a plan that names an unknown quantity or one the meter cannot give -- as its protocol's driver
says: :meth:`~drivers.base.MeterDriver.why_unreadable` --,
two meters with the same id, a gateway id that is not a valid topic level or is reserved, such as
``agg``). :data:`SAMPLE` is the commented sample (``amigw config sample``); a unit test loads
it, so it cannot rot. The commented values are the defaults.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from drivers.base import DEFAULT_PROTOCOL, load_driver
from drivers.lines import TransportKind, parse_port
from protocols.config import loads_toml
from protocols.errors import ConfigError
from protocols.quantities import by_name
from protocols.topics import check_gateway_id

__all__ = [
    "SAMPLE",
    "BusConfig",
    "EdgeConfig",
    "MeterConfig",
    "PlanConfig",
    "load_config",
    "unreadable_quantity",
]

_STANDARD_BAUDS = (300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True, slots=True)
class MqttConfig:
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = ""  # default: amigw-edge-<gateway_id>
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 30
    encoding: Literal["binary", "json"] = "binary"
    payload_version: Literal[1, 2] = 1  # 2 once every ingest reads it (docs/payload.md)

    def __post_init__(self) -> None:
        if not re.match(r"^mqtts?://[^:/]+(:\d+)?/?$", self.url):
            raise ValueError(f"url: expected mqtt://host[:port] or mqtts://host[:port], got {self.url!r}")


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    path: str = "/var/lib/amigw/outbox.sqlite"
    max_bytes: int = 64 * 1024 * 1024
    policy: Literal["shed_by_kind", "reject_new"] = "shed_by_kind"
    max_inflight: int = 256
    max_readings_per_batch: int = 5000
    confirm: Literal["head-end", "broker"] = "head-end"
    ack_timeout_s: float = 60.0
    resend_max_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_bytes < 64 * 1024:
            raise ValueError("max_bytes: must be at least 65536")
        if not 0.1 <= self.ack_timeout_s <= 86_400:
            raise ValueError("ack_timeout_s: must be within 0.1..86400 seconds")
        if not 0.1 <= self.resend_max_s <= 86_400:
            raise ValueError("resend_max_s: must be within 0.1..86400 seconds")
        if not 1 <= self.max_inflight <= 65535:
            raise ValueError("max_inflight: must be 1..65535 (MQTT packet ids are 16-bit)")
        if self.max_readings_per_batch < 1:
            raise ValueError("max_readings_per_batch: must be positive")


@dataclass(frozen=True, slots=True)
class ClockConfig:
    tolerance_s: int = 60
    max_adjust_s: int = 300  # largest skew corrected by broadcast (0x08); larger ones by a password write
    check_interval_s: int = 86_400
    utc_offset_min: int | None = None  # meters keep local time; None: this machine's local zone

    def __post_init__(self) -> None:
        if self.tolerance_s < 1 or self.max_adjust_s < 1 or self.check_interval_s < 1:
            raise ValueError("tolerance_s: tolerance_s, max_adjust_s and check_interval_s must be positive")
        if self.utc_offset_min is not None and not -840 <= self.utc_offset_min <= 840:
            raise ValueError("utc_offset_min: must be within -840..840")


@dataclass(frozen=True, slots=True)
class BusConfig:
    name: str
    port: str  # /dev/ttyS1, tcp://host:port (transparent serial server) or modbus-tcp://host:port
    baud: int = 2400
    parity: Literal["N", "E", "O"] = "E"
    stop_bits: int = 1
    timeout_s: float = 1.0
    min_timeout_s: float = 0.2
    max_timeout_s: float = 3.0
    min_gap_ms: int = 0
    retries: int = 2
    echo: bool = False

    def __post_init__(self) -> None:
        if not _ID.match(self.name):
            raise ValueError(f"name: {self.name!r} must be 1-64 letters, digits or _.:-")
        if self.baud not in _STANDARD_BAUDS:
            raise ValueError(
                f"baud: {self.baud} is not a standard rate ({', '.join(map(str, _STANDARD_BAUDS))})"
            )
        if self.stop_bits not in (1, 2):
            raise ValueError("stop_bits: must be 1 or 2")
        if not 0 < self.min_timeout_s <= self.timeout_s <= self.max_timeout_s:
            raise ValueError("timeout_s: need 0 < min_timeout_s <= timeout_s <= max_timeout_s")
        if not 0 <= self.retries <= 10:
            raise ValueError("retries: must be 0..10")
        try:
            parse_port(self.port)
        except ValueError as exc:
            raise ValueError(f"port: {exc}") from None

    @property
    def kind(self) -> TransportKind:
        return parse_port(self.port).kind


@dataclass(frozen=True, slots=True)
class PlanConfig:
    name: str
    quantities: tuple[str, ...]
    interval_s: int = 900
    kind: Literal["register", "daily", "instant"] = "register"

    def __post_init__(self) -> None:
        if self.interval_s < 1 or 86_400 % self.interval_s:
            raise ValueError(f"interval_s: {self.interval_s} must divide a day (60, 300, 900, 3600 ...)")
        if not self.quantities:
            raise ValueError("quantities: must not be empty")
        for i, name in enumerate(self.quantities):
            try:
                by_name(name)
            except KeyError:
                raise ValueError(f"quantities: [{i}] unknown quantity {name!r}") from None


@dataclass(frozen=True, slots=True)
class MeterConfig:
    id: str
    bus: str
    protocol: str = DEFAULT_PROTOCOL  # a name in drivers.base.DRIVERS
    address: str = ""  # in the protocol's syntax, checked by its driver
    model: str | None = None  # the meter type, when the protocol needs it (a register map)
    password: str | None = None  # control password, 8 hex digits
    operator: str | None = None  # operator code, 8 hex digits
    plans: tuple[str, ...] = ("registers", "instant")
    rated_current_a: float = 60.0
    rated_voltage_v: float = 220.0
    phases: int = 1
    meter_constant: int = 0  # imp/kWh, informative

    def __post_init__(self) -> None:
        if not _ID.match(self.id):
            raise ValueError(f"id: {self.id!r} must be 1-64 letters, digits or _.:-")
        try:
            load_driver(self.protocol).check_meter(self)
        except ConfigError as exc:
            raise ValueError(f"{exc.key_path}: {exc.reason}") from None
        for name in ("password", "operator"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"[0-9A-Fa-f]{8}", value):
                raise ValueError(f"{name}: expected 8 hex digits")
        if self.phases not in (1, 3):
            raise ValueError("phases: must be 1 or 3")


def _default_plans() -> tuple[PlanConfig, ...]:
    return (
        PlanConfig(
            "registers",
            (
                "energy_fwd_active_total",
                "energy_fwd_active_t1",
                "energy_fwd_active_t2",
                "energy_fwd_active_t3",
                "energy_fwd_active_t4",
            ),
            900,
            "register",
        ),
        PlanConfig("instant", ("voltage_a", "current_a", "power_active_total"), 60, "instant"),
    )


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    gateway_id: str
    command_key_file: str | None = None
    command_key: str | None = None  # hex; prefer command_key_file
    metrics_listen: str = "127.0.0.1:9108"  # "" disables the Prometheus endpoint
    state_dir: str = "/var/lib/amigw"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    buses: tuple[BusConfig, ...] = ()
    meters: tuple[MeterConfig, ...] = ()
    plans: tuple[PlanConfig, ...] = field(default_factory=_default_plans)

    def __post_init__(self) -> None:
        if not _ID.match(self.gateway_id):
            raise ValueError(
                f"gateway_id: {self.gateway_id!r} must be 1-64 letters, digits or _.:- (it is a topic level)"
            )
        reason = check_gateway_id(self.gateway_id)
        if reason is not None:
            raise ValueError(f"gateway_id: {reason}")
        if self.command_key is not None and not re.fullmatch(r"([0-9A-Fa-f]{2}){16,}", self.command_key):
            raise ValueError("command_key: expected at least 32 hex digits (16 bytes)")

    def key_bytes(self) -> bytes:
        """The command key (from ``command_key`` or the file). Raises :class:`ConfigError`."""
        if self.command_key:
            return bytes.fromhex(self.command_key)
        if self.command_key_file:
            try:
                text = Path(self.command_key_file).read_text().strip()
                key = bytes.fromhex(text)
            except (OSError, ValueError) as exc:
                raise ConfigError("command_key_file", f"cannot read a hex key: {exc}") from None
            if len(key) < 16:
                raise ConfigError("command_key_file", "key must be at least 16 bytes")
            return key
        raise ConfigError("command_key", "no command key configured (command_key_file or command_key)")


def unreadable_quantity(meter: MeterConfig, names: Iterable[str]) -> str | None:
    """Why ``meter`` cannot read one of ``names`` (its protocol's driver says), or None when it
    can read them all.

    Raises :class:`ConfigError` (key ``model``) for a model the driver does not know."""
    return load_driver(meter.protocol).why_unreadable(meter, names)


def _check_readable(where: str, meter: MeterConfig, plans: dict[str, PlanConfig]) -> None:
    try:
        for j, name in enumerate(meter.plans):
            reason = unreadable_quantity(meter, plans[name].quantities)
            if reason is not None:
                raise ConfigError(f"{where}.plans[{j}]", f"plan {name!r}: {reason}")
    except ConfigError as exc:
        if exc.key_path != "model":
            raise
        raise ConfigError(f"{where}.model", exc.reason) from None


def _check_references(cfg: EdgeConfig) -> None:
    buses = {b.name: b for b in cfg.buses}
    plans = {p.name: p for p in cfg.plans}
    if len(buses) != len(cfg.buses):
        raise ConfigError("buses", "bus names must be unique")
    if len(plans) != len(cfg.plans):
        raise ConfigError("plans", "plan names must be unique")
    seen: set[str] = set()
    for i, m in enumerate(cfg.meters):
        where = f"meters[{i}]"
        if m.id in seen:
            raise ConfigError(f"{where}.id", f"duplicate meter id {m.id!r}")
        seen.add(m.id)
        bus = buses.get(m.bus)
        if bus is None:
            raise ConfigError(f"{where}.bus", f"no bus named {m.bus!r} (buses: {', '.join(buses) or 'none'})")
        transports = load_driver(m.protocol).transports
        if bus.kind not in transports:
            runs_over = " or ".join(k.described for k in transports)
            raise ConfigError(
                f"{where}.protocol",
                f"bus {m.bus!r} is {bus.kind.described}; a {m.protocol} meter runs over {runs_over}",
            )
        for j, p in enumerate(m.plans):
            if p not in plans:
                raise ConfigError(f"{where}.plans[{j}]", f"no plan named {p!r}")
        _check_readable(where, m, plans)
    if cfg.command_key is None and cfg.command_key_file is None:
        raise ConfigError("command_key_file", "required: the per-gateway key that signs commands")


def parse_config(text: str, source: str = "edge.toml") -> EdgeConfig:
    cfg = loads_toml(EdgeConfig, text, source)
    _check_references(cfg)
    return cfg


def load_config(path: str | Path) -> EdgeConfig:
    """Read and validate ``path``. Raises :class:`ConfigError`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    return parse_config(text, str(path))


SAMPLE = """\
# amigw edge agent configuration. Values shown are the defaults unless marked "example".

# This gateway's id: it is a level in every MQTT topic (ami/v1/<gateway_id>/...), so letters,
# digits and . _ : - only, and not a level the topic tree reserves (agg, up, down, status, ack,
# cmd). Example value.
gateway_id = "gw-1"

# The per-gateway key that signs downlink commands (hex, at least 16 bytes), in a file readable
# only by the agent. Example value.
command_key_file = "/etc/amigw/gw-1.key"

# Where the Prometheus metrics are served; an empty string disables them.
metrics_listen = "127.0.0.1:9108"

# Where the agent keeps its state (replay-protection ids).
state_dir = "/var/lib/amigw"

[mqtt]
# The broker: mqtt://host:port, or mqtts://host:port for TLS.
url = "mqtt://127.0.0.1:1883"
# The MQTT client id; empty means amigw-edge-<gateway_id>.
client_id = ""
# Username and password, when the broker asks for them.
# username = "gw-1"
# password = "secret"
# The CA that signed the broker's certificate, and an optional client certificate and key.
# ca_file = "/etc/amigw/ca.pem"
# cert_file = "/etc/amigw/gw-1.pem"
# key_file = "/etc/amigw/gw-1.key.pem"
keepalive_s = 30
# Reading batches as "binary" (compact, the default) or "json" (for debugging).
encoding = "binary"
# Readings payload version: 1 carries quality-flag bits 0..15, 2 all 32. Set 2 only once every
# ingest worker reads v2 (docs/payload.md, "Rolling a fleet over to v2"); until then a reading
# with a flag bit above 15 cannot be sent.
payload_version = 1

[outbox]
# Every batch is written here before it is published. It is deleted once the head-end confirmed
# it durable (see confirm below); command results are deleted after the broker's PUBACK.
path = "/var/lib/amigw/outbox.sqlite"
# The bound on the outbox's size. When it is reached, "shed_by_kind" drops instantaneous values
# first and keeps register and daily readings longest; "reject_new" refuses new batches.
# Whatever is dropped is counted and reported in the status message.
max_bytes = 67108864
policy = "shed_by_kind"
# How many publishes may wait for their PUBACK at once (MQTT packet ids are 16-bit).
max_inflight = 256
# A bus cycle's readings are split into batches of at most this many readings.
max_readings_per_batch = 5000
# When a readings batch or an event may leave the outbox: "head-end" once the head-end confirmed
# it durable on ami/v1/<gateway_id>/down/ack; "broker" on the broker's PUBACK alone, for a
# head-end that sends no confirmations (a broker can acknowledge and still lose a message).
confirm = "head-end"
# A batch or event not confirmed this many seconds after its PUBACK is sent again; each further
# re-send waits twice as long, up to resend_max_s (or ack_timeout_s if longer). A restart re-sends
# every unconfirmed one at once.
ack_timeout_s = 60.0
resend_max_s = 600.0

[clock]
# Meters whose clock is off by more than this are corrected with the protocol's time sync.
tolerance_s = 60
# Skews up to this are corrected by DL/T 645 broadcast time sync (no password; meters accept
# about +-5 minutes that way; it also sets the bus's other meters). Larger skews are corrected by
# writing date and time to that meter with its password.
max_adjust_s = 300
# How often meter clocks are checked (DL/T 645 meters; the first check is at start).
check_interval_s = 86400
# Meters keep local time: their offset from UTC in minutes (480 for China). Unset: this
# machine's local time zone.
# utc_offset_min = 480

# One [[buses]] table per RS-485 line or serial server. Example values.
[[buses]]
name = "rs485-1"
# A serial device, tcp://host:port for a transparent serial server, or modbus-tcp://host:port.
port = "/dev/ttyS1"
baud = 2400
parity = "E"
stop_bits = 1
# The response timeout starts here and adapts to each meter between the two bounds.
timeout_s = 1.0
min_timeout_s = 0.2
max_timeout_s = 3.0
# Extra quiet time between frames, on top of 3.5 character times.
min_gap_ms = 0
# Retries of a failed read before a meter is counted as failed for this cycle.
retries = 2
# Set true for RS-485 adapters that echo what they send.
echo = false

# One [[meters]] table per meter. Example values.
[[meters]]
id = "000012345678"
bus = "rs485-1"
# The meter's protocol: dlt645-2007, dlt645-1997 or modbus (the names in drivers.base.DRIVERS).
protocol = "dlt645-2007"
# DL/T 645: the 12-digit address printed on the nameplate. Modbus: the unit id.
address = "000012345678"
# Modbus only: the register map (sdm630, sdm120, dtsu666, ddsu666).
# model = "sdm630"
# DL/T 645 relay-control password and operator code, 8 hex digits each.
# password = "02000000"
# operator = "00000000"
# Which read plans this meter follows.
plans = ["registers", "instant"]
# The meter's rating: ingest uses it to flag physically impossible consumption.
rated_current_a = 60.0
rated_voltage_v = 220.0
phases = 1
meter_constant = 0

# Read plans: which quantities, how often. Reads are aligned to multiples of interval_s.
# kind decides what the outbox sheds first when full: instant first, register and daily last.
[[plans]]
name = "registers"
quantities = [
    "energy_fwd_active_total",
    "energy_fwd_active_t1", "energy_fwd_active_t2", "energy_fwd_active_t3", "energy_fwd_active_t4",
]
interval_s = 900
kind = "register"

[[plans]]
name = "instant"
quantities = ["voltage_a", "current_a", "power_active_total"]
interval_s = 60
kind = "instant"
"""
