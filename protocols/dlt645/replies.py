"""DL/T 645 replies (meter -> master): typed parsing, and builders for the meter side.

Error replies (control D6 set, one ERR byte) never come back as values: the parsers raise
:class:`~protocols.errors.MeterErrorReply`, whose ``reasons`` name every ERR bit set (reference §6).
A reply that does not answer the request (wrong function, wrong DI) raises
:class:`~protocols.errors.ProtocolError`; a payload of the wrong size raises
:class:`~protocols.errors.FramingError`. Builders raise ``ValueError``. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

from protocols.dlt645.codes import _BAUD_BY_WORD, _ERROR_REASONS, ControlCode, ControlCode1997, _need
from protocols.dlt645.frame import (
    CONTROL_ERROR,
    CONTROL_FOLLOWUP,
    CONTROL_FUNCTION_MASK,
    CONTROL_RESPONSE,
    Frame,
    address_from_wire,
    address_to_wire,
    encode_frame,
)
from protocols.dlt645.requests import ChangeBaudRequest, FollowupRequest, ReadRequest
from protocols.errors import FramingError, MeterErrorReply, ProtocolError

__all__ = [
    "Ack",
    "AddressReply",
    "BaudReply",
    "ReadResponse",
    "Reply",
    "ack_response",
    "change_baud_response",
    "check_reply",
    "decode_read_response",
    "error_response",
    "parse_error_reply",
    "parse_response",
    "read_address_response",
    "read_followup_response",
    "read_response",
]


# --- replies ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadResponse:
    """A normal read reply: ``data`` is the value bytes after the DI echo (and before SEQ).

    ``more`` is D5 (fetch the rest with ``read_followup_request``); ``seq`` is the SEQ byte of a
    follow-up reply (0x92/0xB2), ``None`` for the first frame.
    """

    address: str
    di: int
    data: bytes
    more: bool = False
    seq: int | None = None
    edition: int = 2007


@dataclass(frozen=True, slots=True)
class AddressReply:
    """Reply to read address (0x93) or write address (0x95, when the meter echoes it)."""

    address: str


@dataclass(frozen=True, slots=True)
class BaudReply:
    """Reply to change baud (0x97): the new line speed, which applies after this reply."""

    baud: int


@dataclass(frozen=True, slots=True)
class Ack:
    """A normal reply that carries nothing we interpret (0x94, 0x96, 0x98..0x9C, and an empty 0x95)."""

    address: str
    function: int
    data: bytes = b""


Reply: TypeAlias = ReadResponse | AddressReply | BaudReply | Ack


def parse_error_reply(frame: Frame, di: int | None = None) -> MeterErrorReply:
    """The typed error of an abnormal reply (D6 set), naming every ERR bit set (§6).

    Returns the exception (the caller raises it, or records it as a per-DI result).

    Raises:
        ProtocolError: the frame is not an abnormal reply.
    """
    if not frame.is_error or not frame.is_response:
        raise ProtocolError(f"control {frame.control:02X} is not an abnormal reply")
    code = frame.payload[0] if frame.payload else 0
    reasons = tuple(text for bit, text in _ERROR_REASONS.items() if code & bit)
    return MeterErrorReply(code, di, reasons)


def check_reply(frame: Frame, request_control: int, *, di: int | None = None) -> Frame:
    """Check that ``frame`` is a normal reply to a request with ``request_control``; return it.

    Raises:
        MeterErrorReply: the meter answered with an error (``di`` is attached to it).
        ProtocolError: the frame is a request, or answers another function.
    """
    if not frame.is_response:
        raise ProtocolError(f"control {frame.control:02X} is a request, expected a reply")
    if frame.function != request_control & CONTROL_FUNCTION_MASK:
        raise ProtocolError(f"reply control {frame.control:02X} does not answer {request_control:02X}")
    if frame.is_error:
        raise parse_error_reply(frame, di)
    return frame


_READS_2007: Final = (ControlCode.READ, ControlCode.READ_FOLLOWUP)
_READS_1997: Final = (ControlCode1997.READ, ControlCode1997.READ_FOLLOWUP)


def decode_read_response(frame: Frame, *, di: int | None = None) -> ReadResponse:
    """Split a read reply (0x91/0xB1, follow-up 0x92/0xB2, 1997 0x81/0xA1) into DI and value bytes.

    Pass ``di`` to check the echo against the DI asked for. Decode the value with ``decode_value``.

    Raises:
        MeterErrorReply: an abnormal reply (D1, D2, C1).
        ProtocolError: not a read reply, or the echo names another DI.
        FramingError: the payload is shorter than the DI (and SEQ).
    """
    fn = frame.function
    if not frame.is_response or fn not in _READS_2007 + _READS_1997:
        raise ProtocolError(f"control {frame.control:02X} is not a read reply")
    if frame.is_error:
        raise parse_error_reply(frame, di)
    width = 4 if fn in _READS_2007 else 2
    followup = fn == ControlCode.READ_FOLLOWUP
    p = frame.payload
    if len(p) < width + followup:
        raise FramingError(f"read reply of {len(p)} data bytes has no room for the DI", p)
    echo = int.from_bytes(p[:width], "little")
    if di is not None and echo != di:
        raise ProtocolError(f"reply is for DI {echo:08X}, asked for {di:08X}")
    data, seq = (p[width:-1], p[-1]) if followup else (p[width:], None)
    more = bool(frame.control & CONTROL_FOLLOWUP)
    return ReadResponse(frame.address, echo, data, more, seq, 2007 if width == 4 else 1997)


def parse_response(frame: Frame, *, di: int | None = None) -> Reply:
    """Any normal reply of the 2007 edition (and 1997 reads) as a typed value.

    Raises:
        MeterErrorReply: an abnormal reply.
        ProtocolError: a request frame, or an unknown function.
        FramingError: a payload of the wrong size.
    """
    if not frame.is_response:
        raise ProtocolError(f"control {frame.control:02X} is a request, expected a reply")
    fn = frame.function
    if fn in _READS_2007 + _READS_1997:
        return decode_read_response(frame, di=di)
    if frame.is_error:
        raise parse_error_reply(frame, di)
    p = frame.payload
    if fn == ControlCode.READ_ADDRESS or (fn == ControlCode.WRITE_ADDRESS and p):
        _need(p, 6, "address reply")
        return AddressReply(address_from_wire(p))
    if fn == ControlCode.CHANGE_BAUD:
        _need(p, 1, "baud reply")
        if p[0] not in _BAUD_BY_WORD:
            raise FramingError(f"baud word {p[0]:02X} is not one of the single-bit words", p)
        return BaudReply(_BAUD_BY_WORD[p[0]])
    if fn in (0x14, 0x15, 0x16, 0x18, 0x19, 0x1A, 0x1B, 0x1C):
        return Ack(frame.address, fn, p)
    raise ProtocolError(f"no typed reply for control {frame.control:02X}")


# --- meter-side reply builders ---------------------------------------------------------------------


def read_response(address: str, di: int, raw: bytes, *, edition: int = 2007, more: bool = False) -> bytes:
    """A meter's read reply: DI echo + ``raw`` value bytes (use ``encode_value``). Raises ``ValueError``."""
    fn = ControlCode.READ if edition == 2007 else ControlCode1997.READ
    control = fn | CONTROL_RESPONSE | (CONTROL_FOLLOWUP if more else 0)
    return encode_frame(address, control, ReadRequest(di, edition).payload() + raw)


def read_followup_response(address: str, di: int, raw: bytes, seq: int, *, more: bool = False) -> bytes:
    """A follow-up reply (0x92, 0xB2 when ``more``): DI + ``raw`` + SEQ. Raises ``ValueError``."""
    control = ControlCode.READ_FOLLOWUP | CONTROL_RESPONSE | (CONTROL_FOLLOWUP if more else 0)
    return encode_frame(address, control, FollowupRequest(di, seq).payload()[:4] + raw + bytes((seq,)))


def error_response(address: str, control: int, code: int) -> bytes:
    """An abnormal reply to a request with ``control``: C | 0xC0, one ERR byte. Raises ``ValueError``."""
    if not 0 <= code <= 0xFF:
        raise ValueError(f"ERR byte {code} outside 0..255")
    return encode_frame(
        address, control & CONTROL_FUNCTION_MASK | CONTROL_RESPONSE | CONTROL_ERROR, bytes((code,))
    )


def ack_response(address: str, control: int, data: bytes = b"") -> bytes:
    """A normal reply with no (or opaque) data, e.g. 0x9C for relay control. Raises ``ValueError``."""
    return encode_frame(address, control & CONTROL_FUNCTION_MASK | CONTROL_RESPONSE, data)


def read_address_response(address: str) -> bytes:
    """Reply 0x93 to read address: the meter's real address, in the header and the data."""
    return encode_frame(address, ControlCode.READ_ADDRESS | CONTROL_RESPONSE, address_to_wire(address))


def change_baud_response(address: str, baud: int) -> bytes:
    """Reply 0x97 echoing the characteristic word of ``baud``. Raises ``ValueError``."""
    return ack_response(address, ControlCode.CHANGE_BAUD, ChangeBaudRequest(baud).payload())
