"""Pure codecs shared by the edge and the head-end: no I/O, no asyncio, no numpy.

Sub-modules: :mod:`protocols.errors` (the one error tree), :mod:`protocols.quantities` (the
vocabulary), :mod:`protocols.payload` (MQTT payload v1), :mod:`protocols.commands` (signed
downlink commands), :mod:`protocols.dlt645` (DL/T 645 frames and values),
:mod:`protocols.modbus` (register maps of real meter models).
"""

from protocols.errors import (
    AmigwError,
    ChecksumError,
    CommandRejected,
    ConfigError,
    FrameError,
    FrameTooLong,
    FramingError,
    MeterErrorReply,
    PayloadError,
    ProtocolError,
    SinkError,
    SinkRefused,
    TransportError,
    TransportTimeout,
)
from protocols.quantities import QUANTITIES, Quantity, by_code, by_name

__all__ = [
    "QUANTITIES",
    "AmigwError",
    "ChecksumError",
    "CommandRejected",
    "ConfigError",
    "FrameError",
    "FrameTooLong",
    "FramingError",
    "MeterErrorReply",
    "PayloadError",
    "ProtocolError",
    "Quantity",
    "SinkError",
    "SinkRefused",
    "TransportError",
    "TransportTimeout",
    "by_code",
    "by_name",
]
