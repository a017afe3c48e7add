"""The kinds of line a meter hangs on, told from the port text, and the opening of a shared one.

============================  =========================  =============================================
kind                          port                       who opens it
============================  =========================  =============================================
``TransportKind.SERIAL``        ``/dev/ttyS1``             a :class:`~drivers.bus.Bus` over pyserial
``TransportKind.SERIAL_SERVER`` ``tcp://host:port``        a Bus over TCP (a transparent serial server)
``TransportKind.MODBUS_TCP``    ``modbus-tcp://host:port`` the driver itself (its own connection)
============================  =========================  =============================================

A *shared* kind carries any driver whose ``transports`` name it, several protocols on one line
(one :class:`~drivers.bus.Bus`, opened here by :func:`open_transport`); a kind that is not shared
is opened by the driver (:meth:`~drivers.base.MeterDriver.connect`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from drivers.transport import Transport

__all__ = ["LinePort", "TransportKind", "open_transport", "parse_port"]


class TransportKind(enum.StrEnum):
    SERIAL = "serial"
    SERIAL_SERVER = "tcp"
    MODBUS_TCP = "modbus-tcp"

    @property
    def shared(self) -> bool:
        """Opened as a :class:`~drivers.bus.Bus` that every driver on the line shares."""
        return self is not TransportKind.MODBUS_TCP

    @property
    def described(self) -> str:
        return _TITLES[self]


_TITLES = {
    TransportKind.SERIAL: "a serial line",
    TransportKind.SERIAL_SERVER: "a serial server (tcp://)",
    TransportKind.MODBUS_TCP: "Modbus TCP (modbus-tcp://)",
}
_NETWORK = re.compile(r"^(?P<scheme>[a-z-]+)://(?P<host>[^:/]+):(?P<port>\d+)$")


@dataclass(frozen=True, slots=True)
class LinePort:
    """A parsed port: ``host``/``tcp_port`` for network kinds, ``text`` as configured."""

    kind: TransportKind
    text: str
    host: str = ""
    tcp_port: int = 0


def parse_port(text: str) -> LinePort:
    """``/dev/ttyS1``, ``tcp://host:port`` or ``modbus-tcp://host:port`` -> :class:`LinePort`.

    Raises ``ValueError`` for a network port without host and port."""
    scheme, sep, _ = text.partition("://")
    if not sep:
        return LinePort(TransportKind.SERIAL, text)
    match = _NETWORK.match(text)
    if scheme not in (TransportKind.SERIAL_SERVER, TransportKind.MODBUS_TCP) or match is None:
        raise ValueError(f"expected tcp://host:port or modbus-tcp://host:port, got {text!r}")
    return LinePort(TransportKind(scheme), text, match["host"], int(match["port"]))


async def open_transport(
    port: LinePort, *, baud: int, parity: str = "N", stop_bits: int = 1, echo: bool = False
) -> Transport:
    """Open a shared line's byte transport. Raises ``TransportError``; ``ValueError`` for a kind
    that is not shared (its driver opens it)."""
    if port.kind is TransportKind.SERIAL_SERVER:
        from drivers.tcp_transport import TcpTransport

        return await TcpTransport.connect(port.host, port.tcp_port)
    if port.kind is TransportKind.SERIAL:
        from drivers.serial_transport import SerialTransport

        return SerialTransport(port.text, baud=baud, parity=parity, stop_bits=stop_bits, echo=echo)
    raise ValueError(f"{port.text}: {port.kind.title} is opened by its driver, not as a shared line")
