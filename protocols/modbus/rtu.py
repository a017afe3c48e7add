"""Modbus RTU framing for read requests (functions 0x03 / 0x04), sans I/O.

Why our own and not pymodbus' ``FramerRTU``: ``protocols/`` may import only the standard library;
pymodbus 3.16's RTU framer drops the *whole* buffer on a CRC failure instead of resynchronising
byte by byte, does not check that an answer comes from the unit and function asked, and its API
changes between minor releases. The framing needed here is 60 lines; the CRC is cross-checked
against pymodbus in the tests.

Frames (Modbus over Serial Line V1.02 §2.5.1): ``unit | function | data | CRC16 (low byte first)``.
Answer to 0x03/0x04: ``unit | fc | byte_count | registers... | crc``; exception answer:
``unit | fc + 0x80 | exception_code | crc`` (MB AP V1.1b3 §7).

:class:`ResponseDecoder` follows the project's decoder contract (STYLE H2): ``feed(bytes)``, then
``next()`` returns a :class:`RegistersReply`, an :class:`ExceptionReply`, a :class:`Skipped` for
bytes hunted over, or :data:`NEED_DATA`. It raises :class:`~protocols.errors.FrameTooLong` when
more than ``max_garbage`` bytes arrive without a frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.errors import FrameTooLong
from protocols.stream import NEED_DATA, NeedData, Skipped

__all__ = [
    "EXCEPTION_NAMES",
    "ExceptionReply",
    "RegistersReply",
    "ResponseDecoder",
    "crc16",
    "encode_exception_reply",
    "encode_read",
    "encode_registers_reply",
]

EXCEPTION_NAMES = {
    1: "illegal_function",
    2: "illegal_data_address",
    3: "illegal_data_value",
    4: "server_device_failure",
    5: "acknowledge",
    6: "server_device_busy",
    8: "memory_parity_error",
    10: "gateway_path_unavailable",
    11: "gateway_target_failed_to_respond",
}


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1  # reflected polynomial 0x8005
        table.append(crc)
    return tuple(table)


_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS (init 0xFFFF, reflected 0x8005); sent low byte first (Serial Line §6.2.2)."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _TABLE[(crc ^ b) & 0xFF]
    return crc


def _with_crc(body: bytes) -> bytes:
    return body + crc16(body).to_bytes(2, "little")


def encode_read(unit: int, function: int, start: int, count: int) -> bytes:
    """A read request frame. ``ValueError`` for out-of-range arguments (a programming error)."""
    if not 0 <= unit <= 247 or function not in (3, 4) or not 0 <= start <= 0xFFFF or not 1 <= count <= 125:
        raise ValueError(f"bad read request unit={unit} fc={function} start={start} count={count}")
    return _with_crc(bytes((unit, function)) + start.to_bytes(2, "big") + count.to_bytes(2, "big"))


def encode_registers_reply(unit: int, function: int, registers: tuple[int, ...] | list[int]) -> bytes:
    """The answer a meter sends (used by the simulator)."""
    data = b"".join(r.to_bytes(2, "big") for r in registers)
    return _with_crc(bytes((unit, function, len(data))) + data)


def encode_exception_reply(unit: int, function: int, code: int) -> bytes:
    return _with_crc(bytes((unit, function | 0x80, code)))


@dataclass(frozen=True, slots=True)
class RegistersReply:
    unit: int
    function: int
    registers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ExceptionReply:
    unit: int
    function: int
    code: int

    @property
    def reason(self) -> str:
        return EXCEPTION_NAMES.get(self.code, f"exception_{self.code}")


class ResponseDecoder:
    """Decode the answer to one read request, hunting past garbage and frames for other units."""

    def __init__(self, unit: int, function: int, count: int, *, max_garbage: int = 512) -> None:
        self._unit, self._function, self._count = unit, function, count
        self._max_garbage = max_garbage
        self._buf = bytearray()
        self._skipped = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> RegistersReply | ExceptionReply | Skipped | NeedData:
        buf = self._buf
        if len(buf) < 2:
            return NEED_DATA
        if buf[0] != self._unit or buf[1] not in (self._function, self._function | 0x80):
            return self._skip(1, "not our unit/function")
        size = 5 if buf[1] & 0x80 else 5 + 2 * self._count
        if len(buf) < size:
            return NEED_DATA
        frame = bytes(buf[:size])
        if crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
            return self._skip(1, "crc mismatch")  # resynchronise one byte on
        if not buf[1] & 0x80 and frame[2] != 2 * self._count:
            return self._skip(1, "byte count mismatch")
        del buf[:size]
        self._skipped = 0
        if frame[1] & 0x80:
            return ExceptionReply(frame[0], self._function, frame[2])
        regs = tuple(int.from_bytes(frame[i : i + 2], "big") for i in range(3, size - 2, 2))
        return RegistersReply(frame[0], frame[1], regs)

    def _skip(self, n: int, reason: str) -> Skipped:
        self._skipped += n
        if self._skipped > self._max_garbage:
            raise FrameTooLong(f"no Modbus frame in {self._skipped} bytes", bytes(self._buf[:64]))
        del self._buf[:n]
        return Skipped(n, reason)
