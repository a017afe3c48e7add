"""DL/T 645 requests (master -> meter), typed, for every 2007 control code and the 1997 read.

Payload layouts are the DATA field *before* the +0x33 offset (reference §5). The master side builds
wire bytes with the ``*_request(address, ...)`` functions; a meter simulator turns a received frame
back into a typed request with :func:`parse_request`.

Builders raise ``ValueError`` for arguments the protocol cannot carry (the caller's mistake).
:func:`parse_request` raises :class:`~protocols.errors.FramingError` for a frame that is not a
well-formed request. No I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from protocols.dlt645.codes import (
    _BAUD_BY_WORD,
    BAUD_WORDS,
    DEFAULT_PASSWORD,
    ControlCode,
    ControlCode1997,
    Password,
    RelayCode,
    _need,
    _operator,
    _operator_bytes,
    _parse_timestamp,
    _timestamp,
)
from protocols.dlt645.frame import (
    BROADCAST_ADDRESS,
    CONTROL_RESPONSE,
    WILDCARD_ADDRESS,
    Frame,
    address_from_wire,
    address_to_wire,
    encode_frame,
)
from protocols.errors import FramingError

__all__ = [
    "ChangeBaudRequest",
    "ChangePasswordRequest",
    "ClearEventsRequest",
    "ClearMaxDemandRequest",
    "ClearMeterRequest",
    "FollowupRequest",
    "FreezeRequest",
    "ReadAddressRequest",
    "ReadRequest",
    "RelayControlRequest",
    "Request",
    "TimeSyncRequest",
    "WriteAddressRequest",
    "WriteRequest",
    "change_baud_request",
    "change_password_request",
    "clear_events_request",
    "clear_max_demand_request",
    "clear_meter_request",
    "encode_request",
    "freeze_request",
    "parse_request",
    "read_address_request",
    "read_followup_request",
    "read_request",
    "relay_control_request",
    "time_sync_request",
    "write_address_request",
    "write_request",
]


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Read one DI (0x11; 1997: 0x01 with a 2-byte DI)."""

    di: int
    edition: int = 2007

    @property
    def control(self) -> int:
        return ControlCode.READ if self.edition == 2007 else ControlCode1997.READ

    def payload(self) -> bytes:
        return self.di.to_bytes(4 if self.edition == 2007 else 2, "little")


@dataclass(frozen=True, slots=True)
class FollowupRequest:
    """Fetch the next part of a multi-frame read (0x12): DI + SEQ (§7; SEQ numbering UNCONFIRMED)."""

    di: int
    seq: int
    control = ControlCode.READ_FOLLOWUP

    def payload(self) -> bytes:
        return self.di.to_bytes(4, "little") + bytes((self.seq,))


@dataclass(frozen=True, slots=True)
class ReadAddressRequest:
    """Ask the only meter on the bus for its address (0x13, sent to AA..AA, no data)."""

    control = ControlCode.READ_ADDRESS

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """Write a parameter (0x14): DI + PA P0P1P2 + C0..C3 + data, L = 12 + m <= 50."""

    di: int
    data: bytes
    password: Password = DEFAULT_PASSWORD
    operator: str = "00000000"
    control = ControlCode.WRITE

    def payload(self) -> bytes:
        if len(self.data) > 38:
            raise ValueError(f"write data of {len(self.data)} bytes: L = 12 + m must stay <= 50")
        return (
            self.di.to_bytes(4, "little")
            + self.password.to_bytes()
            + _operator_bytes(self.operator)
            + self.data
        )


@dataclass(frozen=True, slots=True)
class WriteAddressRequest:
    """Set the meter's address (0x15), point to point; sent to AA..AA (UNCONFIRMED, §5)."""

    new_address: str
    control = ControlCode.WRITE_ADDRESS

    def payload(self) -> bytes:
        return address_to_wire(self.new_address)


@dataclass(frozen=True, slots=True)
class FreezeRequest:
    """Freeze (0x16): mm hh DD MM; ``None`` fields go out as 99 (every): all ``None`` = freeze now."""

    minute: int | None = None
    hour: int | None = None
    day: int | None = None
    month: int | None = None
    control = ControlCode.FREEZE

    def payload(self) -> bytes:
        fields = (self.minute, self.hour, self.day, self.month)
        for f in fields:
            if f is not None and not 0 <= f <= 98:
                raise ValueError(f"freeze field {f} outside 0..98")
        return bytes.fromhex("".join("99" if f is None else f"{f:02d}" for f in fields))


@dataclass(frozen=True, slots=True)
class ChangeBaudRequest:
    """Change the line speed (0x17): one characteristic word Z (§5.8)."""

    baud: int
    control = ControlCode.CHANGE_BAUD

    def payload(self) -> bytes:
        if self.baud not in BAUD_WORDS:
            raise ValueError(f"baud {self.baud} not one of {sorted(BAUD_WORDS)}")
        return bytes((BAUD_WORDS[self.baud],))


@dataclass(frozen=True, slots=True)
class ChangePasswordRequest:
    """Change a password (0x18): DI 04000C01 + new level, old PA P0P1P2, new PA P0P1P2."""

    old: Password
    new: Password
    control = ControlCode.CHANGE_PASSWORD

    def payload(self) -> bytes:
        if self.new.level > 9:
            raise ValueError(f"password level {self.new.level} outside 0..9")
        return (0x04000C01 + self.new.level).to_bytes(4, "little") + self.old.to_bytes() + self.new.to_bytes()


@dataclass(frozen=True, slots=True)
class ClearMaxDemandRequest:
    """Clear maximum demand (0x19): PA P0P1P2 + C0..C3."""

    password: Password = DEFAULT_PASSWORD
    operator: str = "00000000"
    control = ControlCode.CLEAR_MAX_DEMAND

    def payload(self) -> bytes:
        return self.password.to_bytes() + _operator_bytes(self.operator)


@dataclass(frozen=True, slots=True)
class ClearMeterRequest:
    """Clear the meter (0x1A): PA P0P1P2 + C0..C3."""

    password: Password = DEFAULT_PASSWORD
    operator: str = "00000000"
    control = ControlCode.CLEAR_METER

    def payload(self) -> bytes:
        return self.password.to_bytes() + _operator_bytes(self.operator)


@dataclass(frozen=True, slots=True)
class ClearEventsRequest:
    """Clear events (0x1B): PA P0P1P2 + C0..C3 + DI; FFFFFFFF clears all, DI0 = FF one event type."""

    password: Password = DEFAULT_PASSWORD
    operator: str = "00000000"
    di: int = 0xFFFFFFFF
    control = ControlCode.CLEAR_EVENTS

    def payload(self) -> bytes:
        return self.password.to_bytes() + _operator_bytes(self.operator) + self.di.to_bytes(4, "little")


@dataclass(frozen=True, slots=True)
class RelayControlRequest:
    """Trip / close / alarm / protect (0x1C, plaintext): PA P0P1P2 C0..C3 N1 N2 N3..N8 (§5.9).

    ``valid_until`` (meter local time) is N3..N8 as ss mm hh DD MM YY; the meter refuses the command
    after it. N2 is reserved and sent as 00.
    """

    action: RelayCode
    valid_until: dt.datetime
    password: Password = DEFAULT_PASSWORD
    operator: str = "00000000"
    control = ControlCode.RELAY_CONTROL

    def payload(self) -> bytes:
        head = self.password.to_bytes() + _operator_bytes(self.operator)
        return head + bytes((RelayCode(self.action), 0x00)) + _timestamp(self.valid_until)


@dataclass(frozen=True, slots=True)
class TimeSyncRequest:
    """Broadcast time sync (0x08, to 99..99, no reply): ss mm hh DD MM YY (V27).

    PyPI ``dlt645`` sends YY first (its bug, reference §9.1 #1).
    """

    when: dt.datetime
    control = ControlCode.BROADCAST_TIME_SYNC

    def payload(self) -> bytes:
        return _timestamp(self.when)


Request: TypeAlias = (
    ReadRequest
    | FollowupRequest
    | ReadAddressRequest
    | WriteRequest
    | WriteAddressRequest
    | FreezeRequest
    | ChangeBaudRequest
    | ChangePasswordRequest
    | ClearMaxDemandRequest
    | ClearMeterRequest
    | ClearEventsRequest
    | RelayControlRequest
    | TimeSyncRequest
)


def encode_request(address: str, request: Request) -> bytes:
    """Wire bytes (no wake-up preamble) of ``request`` to ``address``. Raises ``ValueError``."""
    return encode_frame(address, int(request.control), request.payload())


def read_request(address: str, di: int, *, edition: int = 2007) -> bytes:
    """Read ``di`` (2007: 0x11 + 4-byte DI; 1997: 0x01 + 2-byte DI). Raises ``ValueError``."""
    if edition not in (1997, 2007) or not 0 <= di < 1 << (32 if edition == 2007 else 16):
        raise ValueError(f"DI {di:X} does not fit DL/T 645-{edition}")
    return encode_request(address, ReadRequest(di, edition))


def read_followup_request(address: str, di: int, seq: int) -> bytes:
    """Fetch follow-up frame ``seq`` (0..255) of a multi-frame read of ``di``. Raises ``ValueError``."""
    if not 0 <= seq <= 0xFF:
        raise ValueError(f"SEQ {seq} outside 0..255")
    return encode_request(address, FollowupRequest(di, seq))


def read_address_request() -> bytes:
    """Read the communication address of the only meter on the bus (to AA..AA)."""
    return encode_request(WILDCARD_ADDRESS, ReadAddressRequest())


def write_request(
    address: str, di: int, data: bytes, password: Password = DEFAULT_PASSWORD, operator: str = "00000000"
) -> bytes:
    """Write ``data`` (value bytes, see ``encode_value``) to ``di``. Raises ``ValueError``."""
    return encode_request(address, WriteRequest(di, data, password, operator))


def write_address_request(new_address: str, address: str = WILDCARD_ADDRESS) -> bytes:
    """Set a meter's address; only one meter may be on the bus. Raises ``ValueError``."""
    return encode_request(address, WriteAddressRequest(new_address))


def freeze_request(
    address: str = BROADCAST_ADDRESS,
    *,
    minute: int | None = None,
    hour: int | None = None,
    day: int | None = None,
    month: int | None = None,
) -> bytes:
    """Freeze command; ``None`` fields are 99 wildcards (all ``None``: freeze now). Raises ``ValueError``."""
    return encode_request(address, FreezeRequest(minute, hour, day, month))


def change_baud_request(address: str, baud: int) -> bytes:
    """Change the meter's line speed; the reply still comes at the old rate. Raises ``ValueError``."""
    return encode_request(address, ChangeBaudRequest(baud))


def change_password_request(address: str, old: Password, new: Password) -> bytes:
    """Replace the password of level ``new.level`` (0..9). Raises ``ValueError``."""
    return encode_request(address, ChangePasswordRequest(old, new))


def clear_max_demand_request(
    address: str, password: Password = DEFAULT_PASSWORD, operator: str = "00000000"
) -> bytes:
    """Clear maximum demand. Raises ``ValueError``."""
    return encode_request(address, ClearMaxDemandRequest(password, operator))


def clear_meter_request(
    address: str, password: Password = DEFAULT_PASSWORD, operator: str = "00000000"
) -> bytes:
    """Clear every register of the meter. Raises ``ValueError``."""
    return encode_request(address, ClearMeterRequest(password, operator))


def clear_events_request(
    address: str, password: Password = DEFAULT_PASSWORD, operator: str = "00000000", di: int = 0xFFFFFFFF
) -> bytes:
    """Clear event records (all of them by default). Raises ``ValueError``."""
    return encode_request(address, ClearEventsRequest(password, operator, di))


def relay_control_request(
    address: str,
    action: RelayCode,
    password: Password = DEFAULT_PASSWORD,
    operator: str = "00000000",
    valid_until: dt.datetime | None = None,
) -> bytes:
    """Relay / alarm / protect command (0x1C).

    ``valid_until`` is required: a command without a deadline could be executed long after it was
    meant. (It defaults to ``None`` only so the argument order matches the issue's signature.)

    Raises:
        ValueError: no ``valid_until``, or a field the frame cannot carry.
    """
    if valid_until is None:
        raise ValueError("relay_control_request needs valid_until (the meter rejects commands past it)")
    return encode_request(address, RelayControlRequest(RelayCode(action), valid_until, password, operator))


def time_sync_request(when: dt.datetime, address: str = BROADCAST_ADDRESS) -> bytes:
    """Broadcast time sync (meters do not answer). Raises ``ValueError`` outside 2000..2099."""
    return encode_request(address, TimeSyncRequest(when))


def _parse_request_1997(frame: Frame) -> Request:
    if frame.control != ControlCode1997.READ:
        raise FramingError(f"no typed request for control {frame.control:02X}", frame.payload)
    _need(frame.payload, 2, "1997 read")
    return ReadRequest(int.from_bytes(frame.payload, "little"), 1997)


def parse_request(frame: Frame) -> Request:
    """The typed request a master sent (meter side).

    Raises:
        FramingError: a response frame, an unknown control code, or a payload of the wrong size.
    """
    p, c = frame.payload, frame.control
    if c & CONTROL_RESPONSE:
        raise FramingError(f"control {c:02X} is a reply, not a request", p)
    if c < ControlCode.BROADCAST_TIME_SYNC or c in (0x0A, 0x0C, 0x0F, 0x10):
        return _parse_request_1997(frame)
    try:
        code = ControlCode(c)
    except ValueError:
        raise FramingError(f"no typed request for control {c:02X}", p) from None
    sizes = {ControlCode.READ: 4, ControlCode.READ_FOLLOWUP: 5, ControlCode.READ_ADDRESS: 0,
             ControlCode.WRITE_ADDRESS: 6, ControlCode.FREEZE: 4, ControlCode.CHANGE_BAUD: 1,
             ControlCode.CHANGE_PASSWORD: 12, ControlCode.CLEAR_MAX_DEMAND: 8, ControlCode.CLEAR_METER: 8,
             ControlCode.CLEAR_EVENTS: 12, ControlCode.RELAY_CONTROL: 16,
             ControlCode.BROADCAST_TIME_SYNC: 6}  # fmt: skip
    if code == ControlCode.WRITE:
        if not 12 <= len(p) <= 50:
            raise FramingError(f"write: {len(p)} data bytes, expected 12..50", p)
    else:
        _need(p, sizes[code], code.name.lower())
    return _parse_2007(code, p)


def _parse_freeze(p: bytes) -> FreezeRequest:
    fields: list[int | None] = []
    for b in p:
        text = f"{b:02x}"
        if not text.isdigit():
            raise FramingError("freeze fields are not BCD", p)
        fields.append(None if b == 0x99 else int(text))
    return FreezeRequest(*fields)


def _parse_baud(p: bytes) -> ChangeBaudRequest:
    if p[0] not in _BAUD_BY_WORD:
        raise FramingError(f"baud word {p[0]:02X} is not one of the single-bit words", p)
    return ChangeBaudRequest(_BAUD_BY_WORD[p[0]])


def _parse_relay(p: bytes) -> RelayControlRequest:
    try:
        action = RelayCode(p[8])
    except ValueError:
        raise FramingError(f"relay command N1 = {p[8]:02X} is not a known action", p) from None
    return RelayControlRequest(
        action, _parse_timestamp(p[10:16]), Password.from_bytes(p[:4]), _operator(p[4:8])
    )


def _parse_address(p: bytes) -> WriteAddressRequest:
    return WriteAddressRequest(address_from_wire(p))


def _parse_password_change(p: bytes) -> ChangePasswordRequest:
    return ChangePasswordRequest(Password.from_bytes(p[4:8]), Password.from_bytes(p[8:12]))


def _parse_write(p: bytes) -> WriteRequest:
    return WriteRequest(
        int.from_bytes(p[:4], "little"), p[12:], Password.from_bytes(p[4:8]), _operator(p[8:12])
    )


def _parse_clear(p: bytes, code: ControlCode) -> Request:
    password, operator = Password.from_bytes(p[:4]), _operator(p[4:8])
    if code == ControlCode.CLEAR_MAX_DEMAND:
        return ClearMaxDemandRequest(password, operator)
    if code == ControlCode.CLEAR_METER:
        return ClearMeterRequest(password, operator)
    return ClearEventsRequest(password, operator, int.from_bytes(p[8:12], "little"))


_PARSERS: Final[dict[ControlCode, Callable[[bytes], Request]]] = {
    ControlCode.WRITE: _parse_write,
    ControlCode.WRITE_ADDRESS: _parse_address,
    ControlCode.FREEZE: _parse_freeze,
    ControlCode.CHANGE_BAUD: _parse_baud,
    ControlCode.CHANGE_PASSWORD: _parse_password_change,
    ControlCode.RELAY_CONTROL: _parse_relay,
}


def _parse_2007(code: ControlCode, p: bytes) -> Request:
    if code == ControlCode.READ:
        return ReadRequest(int.from_bytes(p, "little"))
    if code == ControlCode.READ_FOLLOWUP:
        return FollowupRequest(int.from_bytes(p[:4], "little"), p[4])
    if code == ControlCode.READ_ADDRESS:
        return ReadAddressRequest()
    if code == ControlCode.BROADCAST_TIME_SYNC:
        return TimeSyncRequest(_parse_timestamp(p))
    parser = _PARSERS.get(code)
    return parser(p) if parser else _parse_clear(p, code)
