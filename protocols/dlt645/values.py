"""DL/T 645 value formats: packed BCD (unsigned and signed), dates and times, blocks, records.

Everything here works on the *unscrambled* value bytes (the 0x33 offset already removed, the DI
echo already split off) in wire order, i.e. **low byte first** (DL/T 645-2007 §7.3 / Appendix A).

* ``bcd``: fixed-point integer, exactly the digits the meter sent (``XXXXXX.XX`` 123456.78 kWh is
  ``12345678``). Signed items carry the sign in bit 7 of the most significant byte, which is the *last*
  byte on the wire; the magnitude is the remaining BCD (§4.1 of the reference, Appendix A notes), so
  a signed item holds at most ``8 * 10**(digits - 1) - 1``.
* ``date`` ``YYMMDDWW`` -> :class:`MeterDate`; ``time`` ``hhmmss`` -> ``datetime.time``;
  ``minute`` ``YYMMDDhhmm`` and ``second`` ``YYMMDDhhmmss`` -> naive ``datetime.datetime`` (meter
  local time, years 2000..2099), or ``None`` for the all-zero "never happened" pattern;
  ``demand`` ``XX.XXXX`` + ``YYMMDDhhmm`` -> :class:`MaxDemand`; ``ddhh`` -> ``(day, hour)``;
  ``digits`` (addresses, meter numbers) -> 12-digit string; ``bits`` -> unsigned int (status words
  are binary, not BCD); ``ascii`` -> str.

Decoders raise :class:`~protocols.errors.FrameError` (with ``.raw``) when the meter's bytes are not
what the format allows (a non-BCD nibble, month 13, wrong length). Encoders raise ``ValueError`` for
values the format cannot carry: that is the caller's mistake. Nothing here does I/O.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final, TypeAlias

from protocols.errors import FrameError

__all__ = [
    "FORMATS",
    "MaxDemand",
    "MeterDate",
    "Value",
    "bcd_decode",
    "bcd_encode",
    "decode_item",
    "encode_item",
]

FORMATS: Final = ("bcd", "date", "time", "minute", "second", "demand", "ddhh", "digits", "bits", "ascii")


@dataclass(frozen=True, slots=True)
class MeterDate:
    """A ``YYMMDDWW`` date: ``weekday`` 0 = Sunday .. 6 = Saturday, as the meter sends it."""

    year: int
    month: int
    day: int
    weekday: int

    def __post_init__(self) -> None:
        dt.date(self.year, self.month, self.day)  # raises ValueError naming the bad field
        if not 2000 <= self.year <= 2099:
            raise ValueError(f"MeterDate.year: {self.year} outside 2000..2099")
        if not 0 <= self.weekday <= 6:
            raise ValueError(f"MeterDate.weekday: {self.weekday} outside 0..6 (0 = Sunday)")

    @classmethod
    def from_date(cls, day: dt.date) -> MeterDate:
        """The meter's form of a calendar date (weekday computed, Sunday = 0)."""
        return cls(day.year, day.month, day.day, day.isoweekday() % 7)

    def to_date(self) -> dt.date:
        return dt.date(self.year, self.month, self.day)


@dataclass(frozen=True, slots=True)
class MaxDemand:
    """A maximum-demand register: ``value`` fixed-point (0.0001 kW) and when it happened."""

    value: int
    at: dt.datetime | None


Value: TypeAlias = (
    int | str | dt.datetime | dt.time | MeterDate | MaxDemand | tuple[int, int] | tuple["Value", ...] | None
)


def bcd_decode(raw: bytes, *, signed: bool = False) -> int:
    """Low-byte-first packed BCD -> int.

    Raises:
        FrameError: empty input or a nibble above 9.
    """
    if signed and raw and raw[-1] & 0x80:
        text = bytes((raw[-1] & 0x7F,)).hex() + raw[-2::-1].hex()
        if text.isdigit():
            return -int(text)
    else:
        text = raw[::-1].hex()
        if text.isdigit():
            return int(text)
    raise FrameError("not packed BCD", bytes(raw))


def bcd_encode(value: int, nbytes: int, *, signed: bool = False) -> bytes:
    """int -> ``nbytes`` of low-byte-first packed BCD (sign in bit 7 of the last byte if ``signed``).

    Raises:
        ValueError: the value does not fit (negative unsigned, or too many digits).
    """
    digits = 2 * nbytes
    limit = 8 * 10 ** (digits - 1) if signed else 10**digits
    if abs(value) >= limit or (value < 0 and not signed):
        raise ValueError(f"{value} does not fit {'signed' if signed else 'unsigned'} BCD of {nbytes} bytes")
    out = bytearray.fromhex(f"{abs(value):0{digits}d}")
    if value < 0:
        out[0] |= 0x80
    out.reverse()
    return bytes(out)


def _fields(raw: bytes, what: str) -> list[int]:
    """Low-byte-first BCD bytes -> list of two-digit field values, most significant first."""
    text = raw[::-1].hex()
    if not text.isdigit():
        raise FrameError(f"{what}: not packed BCD", bytes(raw))
    return [int(text[i : i + 2]) for i in range(0, len(text), 2)]


def _pack(*fields: int) -> bytes:
    """Two-digit fields, most significant first -> low-byte-first BCD bytes."""
    return bytes.fromhex("".join(f"{f:02d}" for f in fields))[::-1]


def _decode_datetime(raw: bytes, what: str) -> dt.datetime | None:
    if not any(raw):
        return None
    f = _fields(raw, what)
    try:
        return dt.datetime(2000 + f[0], f[1], f[2], f[3], f[4], f[5] if len(f) > 5 else 0)
    except ValueError as exc:
        raise FrameError(f"{what}: {exc}", bytes(raw)) from None


def _encode_datetime(value: Value, seconds: bool) -> bytes:
    if value is None:
        return bytes(6 if seconds else 5)
    if not isinstance(value, dt.datetime) or not 2000 <= value.year <= 2099:
        raise ValueError(f"expected a datetime in 2000..2099 or None, got {value!r}")
    if not seconds and value.second:
        raise ValueError(f"{value}: YYMMDDhhmm has no seconds")
    f = (value.year - 2000, value.month, value.day, value.hour, value.minute)
    return _pack(*f, value.second) if seconds else _pack(*f)


def _decode_date(raw: bytes) -> MeterDate:
    yy, mm, dd, ww = _fields(raw, "YYMMDDWW")
    try:
        return MeterDate(2000 + yy, mm, dd, ww)
    except ValueError as exc:
        raise FrameError(f"YYMMDDWW: {exc}", bytes(raw)) from None


def _decode_time(raw: bytes) -> dt.time:
    try:
        hh, mm, ss = _fields(raw, "hhmmss")
        return dt.time(hh, mm, ss)
    except ValueError as exc:
        raise FrameError(f"hhmmss: {exc}", bytes(raw)) from None


def _decode_ascii(raw: bytes) -> str:
    try:
        return raw[::-1].decode("ascii").rstrip("\x00")
    except UnicodeDecodeError:
        raise FrameError("ASCII item holds non-ASCII bytes", bytes(raw)) from None


def decode_item(fmt: str, raw: bytes, *, signed: bool = False) -> Value:
    """Decode one item of format ``fmt`` (see the module docstring). Length is the caller's check.

    Raises:
        FrameError: the bytes are not valid for the format.
    """
    if fmt == "bcd":
        return bcd_decode(raw, signed=signed)
    if fmt == "minute" or fmt == "second":
        return _decode_datetime(raw, "YYMMDDhhmm" if fmt == "minute" else "YYMMDDhhmmss")
    if fmt == "demand":
        return MaxDemand(bcd_decode(raw[:3], signed=signed), _decode_datetime(raw[3:], "YYMMDDhhmm"))
    if fmt == "date":
        return _decode_date(raw)
    if fmt == "time":
        return _decode_time(raw)
    if fmt == "ddhh":
        day, hour = _fields(raw, "DDhh")
        return (day, hour)
    if fmt == "digits":
        return "".join(f"{f:02d}" for f in _fields(raw, "digits"))
    if fmt == "bits":
        return int.from_bytes(raw, "little")
    if fmt == "ascii":
        return _decode_ascii(raw)
    raise ValueError(f"unknown value format {fmt!r}")


def encode_item(fmt: str, value: Value, nbytes: int, *, signed: bool = False) -> bytes:
    """Encode one item of format ``fmt`` into ``nbytes`` wire-order bytes.

    Raises:
        ValueError: ``value`` has the wrong type or does not fit the format.
    """
    if fmt == "bcd" or fmt == "bits":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an int, got {value!r}")
        if fmt == "bcd":
            return bcd_encode(value, nbytes, signed=signed)
        if not 0 <= value < 1 << (8 * nbytes):
            raise ValueError(f"{value} does not fit {nbytes} bytes")
        return value.to_bytes(nbytes, "little")
    if fmt == "minute" or fmt == "second":
        return _encode_datetime(value, seconds=fmt == "second")
    if fmt == "demand":
        if not isinstance(value, MaxDemand):
            raise ValueError(f"expected MaxDemand, got {value!r}")
        return bcd_encode(value.value, 3, signed=signed) + _encode_datetime(value.at, seconds=False)
    if fmt == "date":
        if not isinstance(value, MeterDate):
            raise ValueError(f"expected MeterDate, got {value!r}")
        return _pack(value.year - 2000, value.month, value.day, value.weekday)
    if fmt == "time":
        if not isinstance(value, dt.time):
            raise ValueError(f"expected datetime.time, got {value!r}")
        return _pack(value.hour, value.minute, value.second)
    return _encode_text(fmt, value, nbytes)


def _encode_text(fmt: str, value: Value, nbytes: int) -> bytes:
    if fmt == "ddhh":
        if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)):
            raise ValueError(f"expected (day, hour), got {value!r}")
        day, hour = value
        if not (isinstance(day, int) and isinstance(hour, int) and 0 <= day <= 99 and 0 <= hour <= 99):
            raise ValueError(f"DDhh fields out of range: {value!r}")
        return _pack(day, hour)
    if fmt == "digits":
        if not isinstance(value, str) or len(value) != 2 * nbytes or not value.isdigit():
            raise ValueError(f"expected {2 * nbytes} decimal digits, got {value!r}")
        return bytes.fromhex(value)[::-1]
    if fmt == "ascii":
        if not isinstance(value, str) or not value.isascii() or len(value) > nbytes:
            raise ValueError(f"expected ASCII text of at most {nbytes} characters, got {value!r}")
        return value.encode("ascii").ljust(nbytes, b"\x00")[::-1]
    raise ValueError(f"unknown value format {fmt!r}")
