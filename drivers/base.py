"""The one meter-driver interface, the values it exchanges, and the driver registry.

Contract of every :class:`MeterDriver`:

* :meth:`~MeterDriver.read` returns one value per requested quantity, in the order asked. A meter
  that refuses one quantity (an error reply for that register / data identifier) yields that
  quantity with value 0 and ``Flag.METER_ERROR`` -- the other quantities are still read.
  A failed line or an unanswered meter **is** an exception (``TransportError`` /
  ``TransportTimeout``), after the driver's bounded retries.
* Writes (:meth:`control`, :meth:`set_clock`) raise ``MeterErrorReply`` when the meter refuses.
* An operation the protocol or model cannot do -- one outside :meth:`~MeterDriver.capabilities`
  -- raises ``NotImplementedError`` (a configuration mistake the caller should have caught),
  never a silent no-op.

What the rest of the edge asks a driver class instead of testing protocol names:

* :attr:`~MeterDriver.transports` -- the kinds of line it runs over (:mod:`drivers.lines`), and
  :meth:`~MeterDriver.open` -- the driver on a shared :class:`~drivers.bus.Bus`, or on its own
  connection (opened by :meth:`~MeterDriver.connect`);
* :meth:`~MeterDriver.check_meter` -- is a meter reference well formed (address syntax, model),
  :meth:`~MeterDriver.quantities` / :meth:`~MeterDriver.why_unreadable` -- what it can read;
* :meth:`~MeterDriver.capabilities` -- relay control, clock read/set, address discovery.

The field tool (``amigw read``) asks the driver class for its own raw options, titled by
:attr:`~MeterDriver.family` in ``--help``: :meth:`~MeterDriver.add_raw_options` declares them,
:meth:`~MeterDriver.raw_reads` checks them before the port is opened and returns the read,
and :meth:`~MeterDriver.discover` does ``--discover`` (by default: ask the lone meter its address).
A read or discovery yields :class:`FieldRow` values (or bare text lines) for the tool to print.

:data:`DRIVERS` is the only list of protocol names in the project: name -> (module, class),
imported on first use by :func:`load_driver`, so a Modbus-only concentrator never imports the
DL/T 645 driver. A new protocol is one driver module and one entry here.
"""

from __future__ import annotations

import abc
import argparse
import datetime as dt
import enum
import importlib
import warnings
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, Protocol, Self, TypeAlias, TypeVar

from drivers.lines import LinePort, TransportKind
from protocols.commands import Action
from protocols.errors import ConfigError, MeterErrorReply, ProtocolError
from protocols.flags import Flag
from protocols.quantities import Quantity

if TYPE_CHECKING:
    from drivers.bus import Bus

__all__ = [
    "DEFAULT_PROTOCOL",
    "DRIVERS",
    "Capability",
    "DriverSetup",
    "FieldRead",
    "FieldRow",
    "MeterDriver",
    "MeterRef",
    "MeterSpec",
    "QuantityReading",
    "ReadResult",
    "load_driver",
]

#: protocol name -> (module, class). Imported lazily by :func:`load_driver`.
DRIVERS: dict[str, tuple[str, str]] = {
    "dlt645-2007": ("drivers.dlt645", "Dlt645Driver"),
    "dlt645-1997": ("drivers.dlt645", "Dlt645Driver"),
    "modbus": ("drivers.modbus", "ModbusDriver"),
}
#: The protocol of a configured meter that names none.
DEFAULT_PROTOCOL = "dlt645-2007"


class Capability(enum.StrEnum):
    """What a driver can do beyond reading quantities."""

    RELAY = "relay"  # control() with the relay actions, read_relay_state()
    CLOCK_READ = "clock_read"  # read_clock()
    CLOCK_SET = "clock_set"  # set_clock()
    READ_ADDRESS = "read_address"  # read_address(): a lone meter on the line says who it is


class MeterSpec(Protocol):
    """The fields a driver checks in a meter reference (:class:`MeterRef`, a meter's config)."""

    @property
    def id(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def protocol(self) -> str: ...
    @property
    def model(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class DriverSetup:
    """What a driver is opened with: the line's port, the shared bus on it (``None`` for a kind
    the driver connects to itself), bounded retries, the response timeout of a driver-owned
    connection, and the meters' local wall time (command deadlines)."""

    port: LinePort
    bus: Bus | None = None
    retries: int = 1
    timeout_s: float = 1.0
    local_now: Callable[[], dt.datetime] = dt.datetime.now


@dataclass(frozen=True, slots=True)
class MeterRef:
    """Which meter, and how to address it.

    ``address`` is the meter's address in its protocol's syntax, ``model`` what the protocol needs
    to know of the meter type (a register map), ``password``/``operator`` control credentials
    (hex text), optional. The protocol's driver checks them (:meth:`MeterDriver.check_meter`):
    ``ConfigError`` naming ``meters[<id>].<field>``."""

    id: str
    address: str
    protocol: str
    model: str | None = None
    password: str | None = None
    operator: str | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ConfigError("meters[].id", "must not be empty")
        try:
            load_driver(self.protocol).check_meter(self)
        except ConfigError as exc:
            raise ConfigError(f"meters[{self.id}].{exc.key_path}", exc.reason) from None


@dataclass(frozen=True, slots=True)
class ReadResult:
    """One meter's answer to one :meth:`MeterDriver.read`.

    ``values`` is a tuple of ``(quantity_code, value, flags)``: fixed-point integers and quality
    bits, ready to be appended to the batch columns. ``meter_ts_ms`` is the meter's own clock at
    the read when the meter reports one (DL/T 645), else ``None`` (use the read time)."""

    meter_id: str
    read_ts_ms: int
    values: tuple[tuple[int, int, int], ...]
    meter_ts_ms: int | None = None

    def value(self, quantity: Quantity | int) -> int:
        """The value read for ``quantity``. ``KeyError`` when it was not asked for."""
        return self._row(quantity)[1]

    def flags(self, quantity: Quantity | int) -> int:
        return self._row(quantity)[2]

    def _row(self, quantity: Quantity | int) -> tuple[int, int, int]:
        code = quantity if isinstance(quantity, int) else quantity.code
        for row in self.values:
            if row[0] == code:
                return row
        raise KeyError(f"quantity {code} not in the result of meter {self.meter_id}")


@dataclass(frozen=True, slots=True)
class QuantityReading:
    """One quantity as read: ``error`` is the meter's refusal (value 0, ``Flag.METER_ERROR``)."""

    quantity: Quantity
    value: int
    error: ProtocolError | None = None

    @property
    def flags(self) -> int:
        return int(Flag.METER_ERROR) if self.error is not None else 0


@dataclass(frozen=True, slots=True)
class FieldRow:
    """One value ``amigw read`` prints for a driver's raw read or discovery.

    With ``--json`` the line ``{"meter": meter, key: name, "value": value, "unit": unit, **extra}``
    (``key`` says what ``name`` is: ``"di"``, ``"register"``, ``"quantity"``); as text
    ``label = value unit`` then ``note`` (``label`` defaults to ``name``). With ``error`` set the
    meter refused this value: the tool prints the error and exits 1."""

    meter: str
    key: str
    name: str
    value: str = ""
    unit: str = ""
    label: str | None = None
    note: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)
    error: ProtocolError | None = None


_D = TypeVar("_D", bound="MeterDriver")
#: A checked field-tool read, run on the opened driver: the values to print in order, a bare
#: ``str`` a text-only line (left out of ``--json``). Raises as the driver's reads.
FieldRead: TypeAlias = Callable[[_D], AsyncIterator[FieldRow | str]]


class MeterDriver(abc.ABC):
    """Talks to meters of one protocol family. Close with :meth:`aclose` (or ``async with``)."""

    protocol: ClassVar[str]
    #: The kinds of line this driver runs over, the preferred first (``amigw read`` takes the
    #: first network kind listed for a bare ``tcp://`` port).
    transports: ClassVar[tuple[TransportKind, ...]]
    _closed: bool = False

    # -- what the driver class says about itself ------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def open(cls, setup: DriverSetup) -> MeterDriver:
        """The driver on ``setup.bus`` (a shared kind) or on its own connection to
        ``setup.port`` (opened later by :meth:`connect`). Raises ``ConfigError`` (key ``port``)
        for a kind not in :attr:`transports`."""

    @classmethod
    def serial_defaults(cls, protocol: str) -> tuple[int, str]:
        """Baud and parity of a serial line when nothing else says (the field tool's defaults)."""
        return 9600, "N"

    @classmethod
    @abc.abstractmethod
    def capabilities(cls, protocol: str) -> frozenset[Capability]:
        """What meters of ``protocol`` (one of the names this class is registered under) can do."""

    @classmethod
    @abc.abstractmethod
    def check_meter(cls, meter: MeterSpec) -> None:
        """Raise ``ConfigError`` whose key is the field (``address``, ``model``) when ``meter``
        cannot be a meter of this protocol (address syntax, a model it needs)."""

    @classmethod
    @abc.abstractmethod
    def quantities(cls, meter: MeterSpec) -> tuple[Quantity, ...]:
        """Every quantity ``meter`` can give. Raises ``ConfigError`` (key ``model``) for a model
        the driver does not know."""

    @classmethod
    def why_unreadable(cls, meter: MeterSpec, names: Iterable[str]) -> str | None:
        """Why ``meter`` cannot read one of ``names``, or ``None`` when it can read them all.
        Raises as :meth:`quantities`."""
        have = {q.name for q in cls.quantities(meter)}
        for name in names:
            if name not in have:
                return f"a {meter.protocol} meter has no quantity {name!r}"
        return None

    @classmethod
    def require(cls, meter: MeterRef, capability: Capability) -> None:
        """Raise ``NotImplementedError`` unless meters of ``meter.protocol`` have ``capability``."""
        if capability not in cls.capabilities(meter.protocol):
            raise NotImplementedError(f"a {meter.protocol} meter has no {capability} capability")

    # -- the field tool (``amigw read``) -------------------------------------------------------

    #: The protocol family as people write it ("DL/T 645"): the title of the driver's raw
    #: options in ``amigw read --help`` and in the message refusing them for another protocol.
    family: ClassVar[str] = ""

    @classmethod
    def add_raw_options(cls, group: argparse._ArgumentGroup) -> Sequence[argparse.Action]:
        """Add this driver's raw ``amigw read`` options to ``group`` and return them (what
        ``add_argument`` returned): the tool refuses each, given, for another protocol. Their
        defaults mean "not given". None by default."""
        return ()

    @classmethod
    def raw_reads(cls, protocol: str, options: argparse.Namespace) -> FieldRead[Self] | None:
        """The raw read ``options`` (the tool's parsed command line) ask of a ``protocol`` meter,
        checked before the port is opened; None when they ask none. Raises ``ConfigError`` whose
        key is the option (``--di '0001'``) for a bad value or combination."""
        return None

    @classmethod
    def discover(cls, protocol: str, options: argparse.Namespace) -> FieldRead[Self]:
        """``amigw read --discover``, checked before the port is opened: by default the lone
        meter on the line says its address (:attr:`Capability.READ_ADDRESS`). Raises
        ``ConfigError`` (key ``--discover``) when a ``protocol`` meter cannot be discovered."""
        if Capability.READ_ADDRESS not in cls.capabilities(protocol):
            raise ConfigError("--discover", f"a {protocol} meter cannot be asked for its address")

        async def read_address(driver: Self) -> AsyncIterator[FieldRow | str]:
            address = await driver.read_address()
            yield FieldRow(address, "quantity", "address", address)

        return read_address

    # -- one driver -----------------------------------------------------------------------------

    @property
    def bus(self) -> Bus | None:
        """The shared bus this driver's transactions run on; ``None`` when the driver owns its
        own connection. The edge agent configures per-device timing on it."""
        return None

    async def connect(self) -> None:  # noqa: B027 - a driver on a shared bus has nothing to open
        """Open the driver's own connection now (reads reconnect by themselves); nothing for a
        driver on a shared bus, whose owner opens it. Raises ``TransportError``."""

    def device_key(self, meter: MeterRef) -> Hashable:
        """The key this driver's bus transactions use for ``meter`` (per-device gaps and
        adaptive timeouts in :class:`~drivers.bus.Bus` are kept under it)."""
        return (self.protocol, meter.address)

    @abc.abstractmethod
    async def read(self, meter: MeterRef, quantities: Sequence[Quantity]) -> ReadResult:
        """Read ``quantities``; per-quantity refusals are flags.

        Raises ``TransportError``/``TransportTimeout`` when the meter cannot be reached."""

    async def read_detailed(self, meter: MeterRef, quantities: Sequence[Quantity]) -> list[QuantityReading]:
        """Like :meth:`read`, each refusal with its error (for ``amigw read``). Raises as :meth:`read`."""
        result = await self.read(meter, quantities)
        return [
            QuantityReading(q, value, MeterErrorReply(0, None, ("refused",)) if flags else None)
            for q, (_, value, flags) in zip(quantities, result.values, strict=True)
        ]

    async def read_address(self, meter: MeterRef | None = None) -> str:
        """The address the lone meter on the line reports for itself (:attr:`Capability.READ_ADDRESS`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot ask a meter for its address")

    async def control(self, meter: MeterRef, action: Action) -> None:
        """Relay/alarm command (:attr:`Capability.RELAY`).

        Raises ``MeterErrorReply`` when refused, ``NotImplementedError`` when unsupported."""
        raise NotImplementedError(f"a {meter.protocol} meter has no relay control")

    async def read_relay_state(self, meter: MeterRef) -> int:
        """0 = closed (supply on), 1 = open (tripped) -- the ``relay_state`` quantity."""
        raise NotImplementedError(f"a {meter.protocol} meter has no relay state")

    async def read_clock(self, meter: MeterRef) -> int:
        """The meter clock as meter-local time in UTC-naive epoch ms (:attr:`Capability.CLOCK_READ`)."""
        raise NotImplementedError(f"a {meter.protocol} meter has no clock to read")

    async def set_clock(self, meter: MeterRef, epoch_ms: int, *, broadcast: bool | None = None) -> None:
        """Set the meter clock (meter-local time as UTC-naive epoch ms; :attr:`Capability.CLOCK_SET`).

        ``broadcast``: True for a small correction the protocol may send to every meter on the
        line unauthenticated, False for an authorised write to this meter; None the driver's default."""
        raise NotImplementedError(f"a {meter.protocol} meter has no clock to set")

    async def aclose(self) -> None:
        self._closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not self._closed and getattr(self, "_opened", False):
            warnings.warn(f"{type(self).__name__} was never closed", ResourceWarning, stacklevel=2)


def load_driver(name: str) -> type[MeterDriver]:
    """The driver class registered under ``name``, imported on first use.

    Raises ``ConfigError`` (key ``protocol``) for an unknown name."""
    try:
        module_name, class_name = DRIVERS[name]
    except KeyError:
        raise ConfigError("protocol", f"{name!r} not one of {', '.join(DRIVERS)}") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, MeterDriver)):
        raise TypeError(f"{module_name}.{class_name} is not a MeterDriver")
    return cls
