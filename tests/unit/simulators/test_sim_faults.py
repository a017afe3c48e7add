"""simulators.faults: what each fault does to a reply's bytes (pure)."""

from __future__ import annotations

import pytest

from protocols.dlt645 import decode_frame, encode_frame
from protocols.errors import ChecksumError, FrameError
from simulators.faults import Fault, FaultKind, apply_fault, other_address

REPLY = encode_frame("000000000001", 0x91, bytes.fromhex("00000102") + b"\x00\x22")


def test_no_reply_is_silence_and_delay_keeps_the_bytes() -> None:
    assert apply_fault(Fault(FaultKind.NO_REPLY), REPLY) is None
    assert apply_fault(Fault(FaultKind.DELAY, delay_s=0.5), REPLY) == REPLY


def test_bad_checksum_breaks_only_the_checksum() -> None:
    bad = apply_fault(Fault(FaultKind.BAD_CHECKSUM), REPLY)
    assert bad is not None and bad[:-2] == REPLY[:-2] and bad[-2] != REPLY[-2]
    with pytest.raises(ChecksumError):
        decode_frame(bad)


def test_garbage_before_and_inside() -> None:
    before = apply_fault(Fault(FaultKind.GARBAGE_BEFORE, garbage=b"\x01\x02"), REPLY)
    assert before == b"\x01\x02" + REPLY
    inside = apply_fault(Fault(FaultKind.GARBAGE_INSIDE, garbage=b"\x01\x02"), REPLY)
    assert inside is not None and len(inside) == len(REPLY) + 2 and b"\x01\x02" in inside
    with pytest.raises(FrameError):
        decode_frame(inside)


def test_wrong_address_is_a_valid_frame_from_someone_else() -> None:
    wrong = apply_fault(Fault(FaultKind.WRONG_ADDRESS), REPLY)
    assert wrong is not None
    frame = decode_frame(wrong)
    assert frame.address == "000000000002" == other_address("000000000001")
    assert frame.payload == decode_frame(REPLY).payload


def test_fault_validation_and_matching() -> None:
    with pytest.raises(ValueError):
        Fault(FaultKind.DELAY, times=0)
    with pytest.raises(ValueError):
        Fault("no_such_fault")  # type: ignore[arg-type]
    only = Fault(FaultKind.ERROR_REPLY, dis=frozenset({0x02800002}))
    assert only.matches(0x02800002) and not only.matches(0x00010000) and not only.matches(None)
    assert Fault(FaultKind.NO_REPLY).matches(None)
