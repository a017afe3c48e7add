"""The one meter-driver interface, the values it exchanges, and the lazy driver registry.

Contract of every :class:`MeterDriver`:

* :meth:`~MeterDriver.read` returns one value per requested quantity, in the order asked. A meter
  that refuses one quantity (an error reply for that register / data identifier) yields that
  quantity with value 0 and ``Flag.METER_ERROR`` -- the other quantities are still read.
  A failed line or an unanswered meter **is** an exception (``TransportError`` /
  ``TransportTimeout``), after the driver's bounded retries.
* Writes (:meth:`control`, :meth:`set_clock`) raise ``MeterErrorReply`` when the meter refuses.
* An operation a protocol or model cannot do raises ``NotImplementedError`` (a configuration
  mistake the caller should have caught), never a silent no-op.

Drivers are registered by name in :data:`DRIVERS` and imported on first use by
:func:`load_driver`, so a Modbus-only concentrator never imports the DL/T 645 driver.
"""

from __future__ import annotations

import abc
import enum
import importlib
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, Self

from protocols.errors import ConfigError
from protocols.quantities import Quantity

if TYPE_CHECKING:
    from drivers.bus import Bus

__all__ = ["DRIVERS", "MeterDriver", "MeterRef", "ReadResult", "RelayAction", "load_driver"]

#: protocol name -> (module, class). Imported lazily by :func:`load_driver`.
DRIVERS: dict[str, tuple[str, str]] = {
    "dlt645-2007": ("drivers.dlt645", "Dlt645Driver"),
    "dlt645-1997": ("drivers.dlt645", "Dlt645Driver"),
    "modbus": ("drivers.modbus", "ModbusDriver"),
}


class RelayAction(enum.StrEnum):
    """Protocol-neutral relay/alarm commands; each driver maps them (DL/T 645: control codes 1A..3B)."""

    TRIP = "trip"
    CLOSE_ALLOWED = "close_allowed"
    DIRECT_CLOSE = "direct_close"
    ALARM = "alarm"
    ALARM_RELEASE = "alarm_release"
    PROTECT = "protect"
    PROTECT_RELEASE = "protect_release"


@dataclass(frozen=True, slots=True)
class MeterRef:
    """Which meter, and how to address it.

    ``address``: DL/T 645 -- the 12-digit meter address; Modbus -- the unit id as decimal text
    (``"1"`` .. ``"247"``). ``model`` selects a Modbus register map (``"sdm630"``).
    ``password``/``operator`` are DL/T 645 control credentials (hex text), optional."""

    id: str
    address: str
    protocol: str
    model: str | None = None
    password: str | None = None
    operator: str | None = None

    def __post_init__(self) -> None:
        where = f"meters[{self.id}]"
        if not self.id:
            raise ConfigError("meters[].id", "must not be empty")
        if self.protocol not in DRIVERS:
            raise ConfigError(f"{where}.protocol", f"{self.protocol!r} not one of {', '.join(DRIVERS)}")
        if self.protocol == "modbus":
            if not self.address.isdigit() or not 1 <= int(self.address) <= 247:
                raise ConfigError(f"{where}.address", f"Modbus unit id must be 1..247, got {self.address!r}")
            if not self.model:
                raise ConfigError(f"{where}.model", "a Modbus meter needs a register-map model")

    @property
    def unit_id(self) -> int:
        """The Modbus unit id. ``ValueError`` for a non-Modbus meter."""
        if self.protocol != "modbus":
            raise ValueError(f"meter {self.id} is {self.protocol}, it has no unit id")
        return int(self.address)


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


class MeterDriver(abc.ABC):
    """Talks to meters of one protocol family. Close with :meth:`aclose` (or ``async with``)."""

    protocol: ClassVar[str]
    _closed: bool = False
    #: The RS-485 bus this driver's transactions run on (``None``: the driver owns its own
    #: connection, e.g. Modbus TCP). The edge agent configures per-device timing on it.
    bus: Bus | None = None

    def device_key(self, meter: MeterRef) -> Hashable:
        """The key this driver's bus transactions use for ``meter`` (per-device gaps and
        adaptive timeouts in :class:`~drivers.bus.Bus` are kept under it)."""
        return (self.protocol, meter.address)

    @abc.abstractmethod
    async def read(self, meter: MeterRef, quantities: Sequence[Quantity]) -> ReadResult:
        """Read ``quantities``; per-quantity refusals are flags.

        Raises ``TransportError``/``TransportTimeout`` when the meter cannot be reached."""

    @abc.abstractmethod
    async def read_address(self, meter: MeterRef) -> str:
        """The address the meter reports for itself.

        DL/T 645: the wildcard address read; Modbus: the unit id, after a probe read."""

    @abc.abstractmethod
    async def control(self, meter: MeterRef, action: RelayAction) -> None:
        """Relay/alarm command.

        Raises ``MeterErrorReply`` when refused, ``NotImplementedError`` when unsupported."""

    @abc.abstractmethod
    async def read_relay_state(self, meter: MeterRef) -> int:
        """0 = closed (supply on), 1 = open (tripped) -- the ``relay_state`` quantity."""

    @abc.abstractmethod
    async def set_clock(self, meter: MeterRef, epoch_ms: int) -> None:
        """Set the meter clock (meter-local time as UTC-naive epoch ms)."""

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

    Raises ``ConfigError`` for an unknown name."""
    try:
        module_name, class_name = DRIVERS[name]
    except KeyError:
        raise ConfigError("protocol", f"unknown driver {name!r}; known: {', '.join(DRIVERS)}") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, MeterDriver)):
        raise TypeError(f"{module_name}.{class_name} is not a MeterDriver")
    return cls
