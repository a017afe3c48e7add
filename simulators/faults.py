"""Fault injection for the meter simulators: what a fault is, and what it does to a reply.

A :class:`Fault` is data; :func:`apply_fault` is a pure function from a reply's wire bytes to the
bytes that go on the line instead (or ``None``: the meter stays silent). The simulator decides
*when* a fault applies (its meter, its DIs, how many times); this module only says *what* happens.

Kinds (:class:`FaultKind`):

* ``no_reply`` -- the meter hears the request and says nothing;
* ``delay`` -- the reply comes ``delay_s`` late (the driver's timeout may expire first);
* ``bad_checksum`` -- the CS byte is off by one;
* ``garbage_before`` -- ``garbage`` bytes precede the frame (a decoder must hunt past them);
* ``garbage_inside`` -- ``garbage`` bytes are inserted in the middle of the frame (unrecoverable);
* ``wrong_address`` -- the reply carries another meter's address (checksum recomputed, so valid);
* ``error_reply`` -- an abnormal reply (C | 0xC0) with ERR byte ``error`` instead of the answer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocols.dlt645 import decode_frame, encode_frame

__all__ = ["Fault", "FaultKind", "apply_fault", "other_address"]


class FaultKind(enum.StrEnum):
    NO_REPLY = "no_reply"
    DELAY = "delay"
    BAD_CHECKSUM = "bad_checksum"
    GARBAGE_BEFORE = "garbage_before"
    GARBAGE_INSIDE = "garbage_inside"
    WRONG_ADDRESS = "wrong_address"
    ERROR_REPLY = "error_reply"


@dataclass(slots=True)
class Fault:
    """One injected fault. ``dis``: only requests for these DIs (``None``: every request).
    ``times``: the next N matching replies, then the fault clears itself (``None``: until cleared)."""

    kind: FaultKind
    dis: frozenset[int] | None = None
    times: int | None = None
    delay_s: float = 0.0
    error: int = 0x01
    garbage: bytes = b"\x00\x68\xaa\x55\x13"

    def __post_init__(self) -> None:
        self.kind = FaultKind(self.kind)
        if self.times is not None and self.times < 1:
            raise ValueError(f"Fault.times: {self.times} must be >= 1 or None")
        if self.delay_s < 0 or not 0 <= self.error <= 0xFF:
            raise ValueError("Fault.delay_s must be >= 0 and Fault.error a byte")

    def matches(self, di: int | None) -> bool:
        return self.dis is None or (di is not None and di in self.dis)


def other_address(address: str) -> str:
    """A valid address that is not ``address`` (last digit changed)."""
    last = int(address[-1]) if address[-1].isdigit() else 0
    return address[:-1] + str((last + 1) % 10)


def apply_fault(fault: Fault, reply: bytes) -> bytes | None:
    """The bytes sent instead of ``reply`` (a complete frame, optionally after ``FE`` bytes).

    ``delay`` and ``error_reply`` leave the bytes alone here (the simulator builds the error
    reply and waits); ``no_reply`` returns ``None``.
    """
    kind = fault.kind
    if kind is FaultKind.NO_REPLY:
        return None
    if kind is FaultKind.BAD_CHECKSUM:
        return reply[:-2] + bytes(((reply[-2] + 1) & 0xFF, reply[-1]))
    if kind is FaultKind.GARBAGE_BEFORE:
        return fault.garbage + reply
    if kind is FaultKind.GARBAGE_INSIDE:
        middle = len(reply) // 2
        return reply[:middle] + fault.garbage + reply[middle:]
    if kind is FaultKind.WRONG_ADDRESS:
        frame = decode_frame(reply)
        return encode_frame(other_address(frame.address), frame.control, frame.payload)
    return reply
