"""RTU framing: CRC against pymodbus, request encoding, the response decoder three ways."""

from __future__ import annotations

import pytest
from pymodbus.framer import FramerRTU

from protocols.errors import FrameTooLong
from protocols.modbus.rtu import (
    ExceptionReply,
    RegistersReply,
    ResponseDecoder,
    crc16,
    encode_exception_reply,
    encode_read,
    encode_registers_reply,
)
from protocols.stream import NEED_DATA, Skipped

REPLY = encode_registers_reply(1, 3, [0x4366, 0x3333])


def _drain(dec: ResponseDecoder) -> list[object]:
    out = []
    while (r := dec.next()) is not NEED_DATA:
        out.append(r)
    return out


def test_crc_matches_pymodbus_and_spec_vector() -> None:
    # Serial Line V1.02 example: 01 03 00 00 00 0A -> CRC C5 CD (low byte first on the wire)
    assert encode_read(1, 3, 0, 10) == bytes.fromhex("01030000000AC5CD")
    for data in (b"\x01\x04\x00\x00\x00\x02", bytes(range(40)), b"\xff" * 7):
        swapped = FramerRTU.compute_CRC(data)  # pymodbus returns the wire order as an int
        assert crc16(data).to_bytes(2, "little") == swapped.to_bytes(2, "big")


def test_encode_read_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        encode_read(1, 6, 0, 1)
    with pytest.raises(ValueError):
        encode_read(1, 3, 0, 126)


def test_whole_byte_by_byte_and_trailing() -> None:
    whole = ResponseDecoder(1, 3, 2)
    whole.feed(REPLY + b"\x00\x01")
    assert whole.next() == RegistersReply(1, 3, (0x4366, 0x3333))
    bytewise = ResponseDecoder(1, 3, 2)
    results = []
    for b in REPLY:
        bytewise.feed(bytes([b]))
        results += _drain(bytewise)
    assert results == [RegistersReply(1, 3, (0x4366, 0x3333))]


def test_garbage_and_other_units_are_skipped() -> None:
    dec = ResponseDecoder(1, 3, 2)
    other = encode_registers_reply(2, 3, [1, 2])
    dec.feed(b"\x00\xff\x01" + other + REPLY)
    results = _drain(dec)
    assert results[-1] == RegistersReply(1, 3, (0x4366, 0x3333))
    assert all(isinstance(r, Skipped) for r in results[:-1])
    assert sum(r.nbytes for r in results[:-1] if isinstance(r, Skipped)) == 3 + len(other)


def test_bad_crc_resynchronises() -> None:
    dec = ResponseDecoder(1, 3, 2)
    broken = REPLY[:-1] + bytes([REPLY[-1] ^ 0xFF])
    dec.feed(broken + REPLY)
    assert _drain(dec)[-1] == RegistersReply(1, 3, (0x4366, 0x3333))


def test_exception_reply() -> None:
    dec = ResponseDecoder(7, 4, 10)
    dec.feed(encode_exception_reply(7, 4, 2))
    reply = dec.next()
    assert reply == ExceptionReply(7, 4, 2)
    assert isinstance(reply, ExceptionReply) and reply.reason == "illegal_data_address"


def test_garbage_bound() -> None:
    dec = ResponseDecoder(1, 3, 2, max_garbage=16)
    dec.feed(b"\x00" * 64)
    with pytest.raises(FrameTooLong):
        _drain(dec)
