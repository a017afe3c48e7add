"""DL/T 645 code tables shared by requests and replies: control codes, relay codes (and
:data:`RELAY_CODES`, the map from the contract's relay actions), ERR bits,
baud words, passwords, and the ss mm hh DD MM YY timestamp of time sync and relay control.

Values that the protocol cannot carry raise ``ValueError`` (the caller's mistake); bytes from the
wire that do not fit raise :class:`~protocols.errors.FramingError`. No I/O.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from protocols.commands import Action
from protocols.dlt645.values import decode_item, encode_item
from protocols.errors import FrameError, FramingError

__all__ = [
    "BAUD_WORDS",
    "DEFAULT_PASSWORD",
    "RELAY_CODES",
    "ControlCode",
    "ControlCode1997",
    "ErrorBits",
    "Password",
    "RelayCode",
]


class ControlCode(enum.IntEnum):
    """DL/T 645-2007 request function codes (§5); a reply sets D7 (and D6 on error, D5 if more)."""

    BROADCAST_TIME_SYNC = 0x08
    READ = 0x11
    READ_FOLLOWUP = 0x12
    READ_ADDRESS = 0x13
    WRITE = 0x14
    WRITE_ADDRESS = 0x15
    FREEZE = 0x16
    CHANGE_BAUD = 0x17
    CHANGE_PASSWORD = 0x18
    CLEAR_MAX_DEMAND = 0x19
    CLEAR_METER = 0x1A
    CLEAR_EVENTS = 0x1B
    RELAY_CONTROL = 0x1C


class ControlCode1997(enum.IntEnum):
    """DL/T 645-1997 function codes (reference §8). Only READ has typed support here."""

    READ = 0x01
    READ_FOLLOWUP = 0x02
    REREAD = 0x03
    WRITE = 0x04
    BROADCAST_TIME_SYNC = 0x08
    WRITE_ADDRESS = 0x0A
    CHANGE_BAUD = 0x0C
    CHANGE_PASSWORD = 0x0F
    CLEAR_MAX_DEMAND = 0x10


class RelayCode(enum.IntEnum):
    """N1 of control code 0x1C (reference §5.9)."""

    TRIP = 0x1A
    CLOSE_ALLOWED = 0x1B
    DIRECT_CLOSE = 0x1C
    ALARM = 0x2A
    ALARM_RELEASE = 0x2B
    PROTECT = 0x3A
    PROTECT_RELEASE = 0x3B


#: The contract's relay actions -> N1 of 0x1C: the one place a DL/T 645 relay code is chosen.
RELAY_CODES: Final[Mapping[Action, RelayCode]] = {
    Action.TRIP: RelayCode.TRIP,
    Action.CLOSE_ALLOWED: RelayCode.CLOSE_ALLOWED,
    Action.DIRECT_CLOSE: RelayCode.DIRECT_CLOSE,
    Action.ALARM: RelayCode.ALARM,
    Action.ALARM_RELEASE: RelayCode.ALARM_RELEASE,
    Action.PROTECT: RelayCode.PROTECT,
    Action.PROTECT_RELEASE: RelayCode.PROTECT_RELEASE,
}


class ErrorBits(enum.IntFlag):
    """The ERR byte of an abnormal reply (reference §6); several bits may be set at once."""

    OTHER = 0x01
    NO_DATA = 0x02
    UNAUTHORIZED = 0x04
    BAUD_UNCHANGEABLE = 0x08
    YEAR_ZONES_EXCEEDED = 0x10
    DAILY_PERIODS_EXCEEDED = 0x20
    TARIFFS_EXCEEDED = 0x40
    RESERVED = 0x80


_ERROR_REASONS: Final = {
    ErrorBits.OTHER: "other error",
    ErrorBits.NO_DATA: "no requested data",
    ErrorBits.UNAUTHORIZED: "password wrong / unauthorised",
    ErrorBits.BAUD_UNCHANGEABLE: "communication rate cannot change",
    ErrorBits.YEAR_ZONES_EXCEEDED: "annual time zones exceeded",
    ErrorBits.DAILY_PERIODS_EXCEEDED: "daily time periods exceeded",
    ErrorBits.TARIFFS_EXCEEDED: "tariffs exceeded",
    ErrorBits.RESERVED: "reserved bit 7",
}

#: Baud-rate characteristic word Z (§5.8): exactly one bit set.
BAUD_WORDS: Final = {600: 0x02, 1200: 0x04, 2400: 0x08, 4800: 0x10, 9600: 0x20, 19200: 0x40}
_BAUD_BY_WORD: Final = {z: b for b, z in BAUD_WORDS.items()}

_HEX6: Final = re.compile(r"[0-9A-F]{6}")
_HEX8: Final = re.compile(r"[0-9A-F]{8}")


@dataclass(frozen=True, slots=True)
class Password:
    """PA (level byte) + the 6-digit password P0P1P2.

    The digits go low-order first (``"123456"`` -> ``56 34 12``), as I-holley and G-esp do; PyPI
    ``dlt645`` sends them the other way round. Which is right is UNCONFIRMED (reference §5.9); both agree
    for the default ``000000``. Plaintext 0x1C typically uses level 02 or 03, ESAM mode 0x96.
    """

    level: int = 0
    code: str = "000000"

    def __post_init__(self) -> None:
        if not 0 <= self.level <= 0xFF:
            raise ValueError(f"Password.level: {self.level} outside 0..255")
        if not _HEX6.fullmatch(self.code):
            raise ValueError(f"Password.code: {self.code!r} is not 6 digits")

    def to_bytes(self) -> bytes:
        return bytes((self.level,)) + bytes.fromhex(self.code)[::-1]

    @classmethod
    def from_bytes(cls, raw: bytes) -> Password:
        return cls(raw[0], raw[3:0:-1].hex().upper())


#: Level 0, password 000000: the factory default, and immutable, so safe as a default argument.
DEFAULT_PASSWORD: Final = Password()


def _operator_bytes(operator: str) -> bytes:
    if not _HEX8.fullmatch(operator):
        raise ValueError(f"operator code {operator!r} is not 8 hex digits")
    return bytes.fromhex(operator)[::-1]


def _timestamp(when: dt.datetime) -> bytes:
    """ss mm hh DD MM YY (time sync §5 0x08, relay validity §5.9)."""
    return encode_item("second", when, 6)


def _parse_timestamp(raw: bytes) -> dt.datetime:
    try:
        when = decode_item("second", raw)
    except FrameError as exc:
        raise FramingError(f"timestamp: {exc}", raw) from None
    if not isinstance(when, dt.datetime):
        raise FramingError("timestamp is all zero", raw)
    return when


# --- typed requests ------------------------------------------------------------------------------


def _need(payload: bytes, n: int, what: str) -> None:
    if len(payload) != n:
        raise FramingError(f"{what}: {len(payload)} data bytes, expected {n}", payload)


def _operator(raw: bytes) -> str:
    return raw[::-1].hex().upper()
