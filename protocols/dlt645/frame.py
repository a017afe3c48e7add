"""DL/T 645 link frames (both editions): encode, decode one frame, and a sans-I/O stream decoder.

Wire layout (DL/T 645-2007 §7.1; the 1997 edition is identical at this layer)::

    [FE x 0..4] 68 A0 A1 A2 A3 A4 A5 68 C L DATA[L] CS 16

* The address is six packed-BCD bytes sent low byte first; as a string it is the twelve digits
  printed on the nameplate (``"000000000161"`` goes on the wire as ``61 01 00 00 00 00``). A byte
  may also be ``AA`` (wildcard / abbreviated addressing); ``999999999999`` is the broadcast address.
* Every DATA byte is sent +0x33 (mod 256) and the receiver subtracts 0x33 (mod 256). ``Frame.payload``
  always holds the *unscrambled* bytes.
* CS is the sum mod 256 of every byte from the first 0x68 to the last DATA byte.

Contract of this module:

* :func:`encode_frame` turns an address, a control code and a payload into wire bytes. Bad arguments
  are programming errors and raise ``ValueError``.
* :func:`decode_frame` accepts exactly one frame (any run of leading ``FE`` tolerated) and returns a
  :class:`Frame`, or raises :class:`~protocols.errors.FramingError` (markers, length, truncation,
  trailing bytes, an address byte that is neither BCD nor ``AA``) or
  :class:`~protocols.errors.ChecksumError`. It never returns ``None`` and never raises anything else
  for any input ``bytes``.
* :class:`FrameDecoder` is fed bytes in any chunking and hands out, one call to ``next()`` at a time,
  a :class:`Frame`, a :class:`Skipped` (garbage hunted over) or :data:`NEED_DATA`; a rejected
  candidate frame raises a typed ``FrameError`` *after* the decoder has stepped past it, so the
  next call carries on (see the class docstring).

Nothing here does I/O, logs, or imports anything outside the standard library and ``protocols``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from protocols.errors import ChecksumError, FrameError, FrameTooLong, FramingError
from protocols.stream import NEED_DATA, NeedData, Skipped

__all__ = [
    "BROADCAST_ADDRESS",
    "CONTROL_ERROR",
    "CONTROL_FOLLOWUP",
    "CONTROL_FUNCTION_MASK",
    "CONTROL_RESPONSE",
    "WAKE_UP",
    "WILDCARD_ADDRESS",
    "Frame",
    "FrameDecoder",
    "address_from_wire",
    "address_to_wire",
    "decode_frame",
    "encode_frame",
    "normalize_address",
]

START: Final = 0x68
END: Final = 0x16
PREAMBLE: Final = 0xFE
#: Four wake-up bytes the master sends before a request (§7.1 note; slaves answer with 0..4).
WAKE_UP: Final = b"\xfe\xfe\xfe\xfe"
#: Broadcast address: only time sync (0x08) and freeze (0x16); slaves do not answer.
BROADCAST_ADDRESS: Final = "999999999999"
#: All-wildcard address: "whichever meter is on the bus" (read address 0x13, probing).
WILDCARD_ADDRESS: Final = "AAAAAAAAAAAA"

# Control byte bits (§7.1.3): D7 direction, D6 abnormal reply, D5 follow-up frames, D4..D0 function.
CONTROL_RESPONSE: Final = 0x80
CONTROL_ERROR: Final = 0x40
CONTROL_FOLLOWUP: Final = 0x20
CONTROL_FUNCTION_MASK: Final = 0x1F

HEADER_LEN: Final = 10  # 68 A0..A5 68 C L
OVERHEAD: Final = 12  # header + CS + 16
MAX_PAYLOAD: Final = 255  # L is one byte

# +0x33 on transmit, -0x33 on receive, mod 256 (§7.3); bytes.translate does it at C speed.
_SCRAMBLE: Final = bytes((b + 0x33) & 0xFF for b in range(256))
_UNSCRAMBLE: Final = bytes((b - 0x33) & 0xFF for b in range(256))

_ADDRESS_RE: Final = re.compile(r"(?:[0-9]{2}|AA){6}")
_WIRE_ADDRESS_RE: Final = re.compile(r"(?:[0-9]{2}|aa){6}")


def scramble(data: bytes) -> bytes:
    """Add 0x33 (mod 256) to every byte: the DATA field as it goes on the wire (§7.3)."""
    return data.translate(_SCRAMBLE)


def unscramble(data: bytes) -> bytes:
    """Subtract 0x33 (mod 256) from every byte: the DATA field as the application sees it."""
    return data.translate(_UNSCRAMBLE)


def normalize_address(address: str) -> str:
    """The canonical 12-character form of a nameplate address.

    Upper-cases ``aa`` and pads a short address with ``0`` on the high side, as the standard pads
    short addresses with 00 bytes (``"0102030425"`` -> ``"000102030425"``).

    Raises:
        ValueError: more than 12 characters, or a byte that is neither two decimal digits nor ``AA``.
    """
    addr = address.strip().upper()
    if len(addr) < 12:
        addr = addr.rjust(12, "0")
    if not _ADDRESS_RE.fullmatch(addr):
        raise ValueError(f"address {address!r}: expected 12 digits (bytes of two digits or AA)")
    return addr


def address_to_wire(address: str) -> bytes:
    """Nameplate address -> six wire bytes, low byte first. Raises ``ValueError`` as above."""
    return bytes.fromhex(normalize_address(address))[::-1]


def address_from_wire(raw: bytes) -> str:
    """Six wire bytes -> nameplate address.

    Raises:
        FramingError: not six bytes, or a byte that is neither BCD nor ``AA``.
    """
    text = raw[::-1].hex()
    if len(raw) != 6 or not _WIRE_ADDRESS_RE.fullmatch(text):
        raise FramingError("address bytes are not BCD/AA", bytes(raw))
    return text.upper()


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded DL/T 645 frame.

    ``address`` is the 12-character nameplate form, ``control`` the control byte C, ``payload`` the
    DATA field with the 0x33 offset removed (at most 255 bytes).
    """

    address: str
    control: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        if not _ADDRESS_RE.fullmatch(self.address):
            raise ValueError(f"Frame.address: {self.address!r} is not 12 BCD digits / AA")
        if not 0 <= self.control <= 0xFF:
            raise ValueError(f"Frame.control: {self.control} outside 0..255")
        if len(self.payload) > MAX_PAYLOAD:
            raise ValueError(f"Frame.payload: {len(self.payload)} bytes, at most {MAX_PAYLOAD}")

    @property
    def is_response(self) -> bool:
        """D7: sent by a meter (slave -> master)."""
        return bool(self.control & CONTROL_RESPONSE)

    @property
    def is_error(self) -> bool:
        """D6: an abnormal (error) reply; the payload is the ERR byte."""
        return bool(self.control & CONTROL_ERROR)

    @property
    def has_followup(self) -> bool:
        """D5: more frames follow (read with 0x12 to fetch them)."""
        return bool(self.control & CONTROL_FOLLOWUP)

    @property
    def function(self) -> int:
        """D4..D0: the function code (0x11 read, 0x1C relay control ...)."""
        return self.control & CONTROL_FUNCTION_MASK

    def encode(self, *, preamble: int = 0) -> bytes:
        """This frame as wire bytes, with ``preamble`` wake-up ``FE`` bytes in front."""
        return encode_frame(self.address, self.control, self.payload, preamble=preamble)


def encode_frame(address: str, control: int, payload: bytes = b"", *, preamble: int = 0) -> bytes:
    """Wire bytes of one frame. ``payload`` is given *without* the 0x33 offset.

    Raises:
        ValueError: bad address, control outside 0..255, payload over 255 bytes, preamble outside 0..4.
    """
    if not 0 <= control <= 0xFF:
        raise ValueError(f"control {control} outside 0..255")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes: L is one byte, at most {MAX_PAYLOAD}")
    if not 0 <= preamble <= 4:
        raise ValueError(f"preamble {preamble}: the wake-up run is 0..4 FE bytes")
    body = b"\x68" + address_to_wire(address) + bytes((START, control, len(payload))) + scramble(payload)
    # §7.1.7: CS is the modulo-256 sum from the first 68H to the last data byte (FE excluded).
    return WAKE_UP[:preamble] + body + bytes((sum(body) & 0xFF, END))


def _frame_at(buf: bytes | bytearray, start: int, end: int) -> Frame:
    """Check and build the frame occupying ``buf[start:end]`` (the markers at +0/+7 already match)."""
    raw = bytes(buf[start:end])
    if sum(raw[:-2]) & 0xFF != raw[-2]:
        raise ChecksumError(f"checksum {raw[-2]:02X}, expected {sum(raw[:-2]) & 0xFF:02X}", raw)
    if raw[-1] != END:
        raise FramingError(f"end byte {raw[-1]:02X}, expected 16", raw)
    return Frame(address_from_wire(raw[1:7]), raw[8], raw[HEADER_LEN:-2].translate(_UNSCRAMBLE))


def decode_frame(data: bytes) -> Frame:
    """Decode exactly one frame, preceded by any number of ``FE`` wake-up bytes.

    Raises:
        FramingError: truncated input, a start byte other than 68H at offset 0 or 7, an end byte other
            than 16H, an address byte that is neither BCD nor AA, or bytes after the end byte.
        ChecksumError: the CS byte does not match.
    """
    data = bytes(data)
    start = len(data) - len(data.lstrip(b"\xfe"))
    if len(data) - start < OVERHEAD:
        raise FramingError("truncated: shorter than the 12-byte minimum frame", data)
    if data[start] != START or data[start + 7] != START:
        raise FramingError("start bytes are not 68H at offsets 0 and 7", data)
    end = start + OVERHEAD + data[start + 9]
    if len(data) < end:
        raise FramingError(f"truncated: length field says {end - start} bytes, got {len(data) - start}", data)
    if len(data) > end:
        raise FramingError(f"{len(data) - end} bytes after the end of the frame", data)
    return _frame_at(data, start, end)


class FrameDecoder:
    """Sans-I/O stream decoder: ``feed()`` bytes as they arrive, pull results with ``next()``.

    ``next()`` returns one of:

    * a :class:`Frame`, whose bytes (and any ``FE`` run before it) are consumed;
    * :class:`Skipped` for garbage hunted over: bytes before a 68H, or a 68H that does not start a
      plausible header (second 68H at +7, BCD/AA address);
    * :data:`NEED_DATA` when no decision is possible without more bytes.

    A candidate frame whose header is plausible but which fails a later check raises a typed error:
    :class:`~protocols.errors.ChecksumError`, :class:`~protocols.errors.FramingError` (end byte) or
    :class:`~protocols.errors.FrameTooLong` (its length field exceeds ``max_frame``). Before raising,
    the decoder drops only the candidate's first byte, so a valid frame that starts inside the rejected
    one is still found by the next calls. More than ``max_garbage`` bytes hunted over without a frame
    also raise ``FrameTooLong`` (once; the count restarts): a line that only carries noise usually runs
    at the wrong baud rate. Leading ``FE`` runs are consumed silently.

    Resynchronisation: while the candidate at the head is still incomplete, a *complete*, valid frame
    that starts later in the buffer wins, and the head candidate is reported as :class:`Skipped`. On a
    half-duplex bus frames do not overlap, so this only discards a fake header in noise whose length
    byte would otherwise swallow the real reply.

    The buffer is bounded: ``feed()`` raises ``FrameTooLong`` (and keeps nothing of that chunk) when
    the bytes held would exceed ``max_frame + max_garbage``; drain with ``next()`` until
    :data:`NEED_DATA` between feeds and this never happens for chunks below ``max_garbage``.
    """

    def __init__(self, *, max_frame: int = 512, max_garbage: int = 4096) -> None:
        if max_frame < OVERHEAD or max_garbage < 1:
            raise ValueError(f"max_frame must be >= {OVERHEAD} and max_garbage >= 1")
        self.max_frame = max_frame
        self.max_garbage = max_garbage
        self._buf = bytearray()
        self._garbage = 0  # bytes hunted over since the last frame

    @property
    def buffered(self) -> int:
        """Number of bytes held and not yet decided on."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Append received bytes.

        Raises:
            FrameTooLong: the buffer would exceed ``max_frame + max_garbage`` bytes.
        """
        if len(self._buf) + len(data) > self.max_frame + self.max_garbage:
            raise FrameTooLong(
                f"decoder buffer would hold {len(self._buf) + len(data)} bytes, "
                f"bound {self.max_frame + self.max_garbage}: drain with next() first"
            )
        self._buf += data

    def next(self) -> Frame | Skipped | NeedData:
        """The next result; see the class docstring for the contract.

        Raises:
            ChecksumError, FramingError, FrameTooLong: a rejected candidate frame, or too much garbage.
        """
        buf = self._buf
        fe = len(buf) - len(buf.lstrip(b"\xfe"))
        if fe:
            del buf[:fe]
        if not buf:
            return NEED_DATA
        if buf[0] != START:
            nxt = buf.find(b"\x68")
            return self._skip(nxt if nxt > 0 else len(buf), "noise before a start byte")
        if len(buf) < HEADER_LEN:
            return NEED_DATA
        if buf[7] != START or not _WIRE_ADDRESS_RE.fullmatch(buf[1:7].hex()):
            nxt = buf.find(b"\x68", 1)
            return self._skip(nxt if nxt > 0 else len(buf), "68H without a frame header")
        total = OVERHEAD + buf[9]
        if total > self.max_frame:
            raw = bytes(buf[:HEADER_LEN])
            del buf[:1]
            raise FrameTooLong(f"length field announces {total} bytes, bound {self.max_frame}", raw)
        if len(buf) < total:
            later = self._complete_frame_after(1)
            if later:
                return self._skip(later, "incomplete frame header abandoned: a complete frame follows")
            return NEED_DATA
        try:
            frame = _frame_at(buf, 0, total)
        except FrameError:
            del buf[:1]
            raise
        del buf[:total]
        self._garbage = 0
        return frame

    def _skip(self, nbytes: int, reason: str) -> Skipped:
        del self._buf[:nbytes]
        self._garbage += nbytes
        if self._garbage > self.max_garbage:
            hunted, self._garbage = self._garbage, 0
            raise FrameTooLong(f"{hunted} bytes without a frame (wrong baud rate?)")
        return Skipped(nbytes, reason)

    def _complete_frame_after(self, pos: int) -> int:
        """Offset of the first complete, valid frame starting at or after ``pos``; 0 if none."""
        buf = self._buf
        n = len(buf)
        while True:
            i = buf.find(b"\x68", pos)
            if i < 0 or i + OVERHEAD > n:
                return 0
            pos = i + 1
            if buf[i + 7] != START:
                continue
            end = i + OVERHEAD + buf[i + 9]
            if end > n or end - i > self.max_frame:
                continue
            try:
                _frame_at(buf, i, end)
            except FrameError:
                continue
            return i
