"""I/O to meters: transports, the shared RS-485 bus, and the meter-driver interface.

* :mod:`drivers.transport` -- :class:`Transport` (write/read/discard_input/aclose) and the one
  request/response loop :func:`exchange`.
* :mod:`drivers.serial_transport`, :mod:`drivers.tcp_transport` -- pyserial and serial-over-TCP.
* :mod:`drivers.bus` -- one lock per line, guard times, adaptive response timeouts.
* :mod:`drivers.base` -- :class:`MeterDriver` (what a driver class declares: transports, capabilities,
  meter checks), :class:`MeterRef`, :class:`ReadResult`, and the registry :data:`DRIVERS` /
  :func:`load_driver` -- the only list of protocol names.
* :mod:`drivers.lines` -- the kinds of line (serial, serial server, Modbus TCP) and their ports.
* :mod:`drivers.modbus` (+ :mod:`drivers.modbus_transport`, the only pymodbus importer).

Importing this package imports neither pyserial nor pymodbus; the modules that need them do.
"""

from drivers.base import DRIVERS, Capability, DriverSetup, MeterDriver, MeterRef, ReadResult, load_driver
from drivers.bus import Bus, BusTransaction, ResponseTimeout, frame_gap_s
from drivers.transport import StreamDecoder, Transport, exchange, read_frame

__all__ = [
    "DRIVERS",
    "Bus",
    "BusTransaction",
    "Capability",
    "DriverSetup",
    "MeterDriver",
    "MeterRef",
    "ReadResult",
    "ResponseTimeout",
    "StreamDecoder",
    "Transport",
    "exchange",
    "frame_gap_s",
    "load_driver",
    "read_frame",
]
