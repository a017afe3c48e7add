"""Link layer: addresses, encode/decode, and the FrameDecoder contract (STYLE H2)."""

from __future__ import annotations

import pytest

from protocols.dlt645 import (
    BROADCAST_ADDRESS,
    WAKE_UP,
    WILDCARD_ADDRESS,
    Frame,
    FrameDecoder,
    address_from_wire,
    address_to_wire,
    decode_frame,
    encode_frame,
    normalize_address,
    read_request,
)
from protocols.errors import ChecksumError, FrameTooLong, FramingError
from protocols.stream import NEED_DATA, Skipped

from .helpers import drain, feed_all, frames

V11 = bytes.fromhex("68 61 01 00 00 00 00 68 11 04 33 33 34 33 14 16")
_HEADER = bytes.fromhex("68 61 01 0A 00 00 00 68 11 00")  # address byte 0A is neither BCD nor AA
NOT_BCD_ADDRESS = _HEADER + bytes((sum(_HEADER) & 0xFF, 0x16))


def test_address_low_byte_first_and_nameplate_order() -> None:
    assert address_to_wire("123456789012") == bytes.fromhex("12 90 78 56 34 12")
    assert address_from_wire(bytes.fromhex("12 90 78 56 34 12")) == "123456789012"
    assert normalize_address("0102030425") == "000102030425"
    assert normalize_address("aaaaaaaa0161") == "AAAAAAAA0161"
    assert address_to_wire(BROADCAST_ADDRESS) == b"\x99" * 6
    assert address_to_wire(WILDCARD_ADDRESS) == b"\xaa" * 6


@pytest.mark.parametrize("bad", ["1234567890123", "12345678901A", "ABCDEF012345", "12 45"])
def test_bad_addresses_are_caller_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        address_to_wire(bad)


def test_encode_matches_published_read_request() -> None:
    assert encode_frame("000000000161", 0x11, bytes.fromhex("00 00 01 00")) == V11
    assert read_request("000000000161", 0x00010000) == V11
    assert encode_frame("000000000161", 0x11, b"\x00\x00\x01\x00", preamble=4) == WAKE_UP + V11


def test_frame_properties() -> None:
    f = Frame("000000000161", 0xB2, b"")
    assert f.is_response and f.has_followup and not f.is_error and f.function == 0x12
    assert Frame("000000000161", 0xD1, b"\x02").is_error


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"address": "12"}, "address"), ({"control": 256}, "control"), ({"payload": bytes(256)}, "payload")],
)
def test_frame_validates_fields(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"address": "000000000161", "control": 0x11, "payload": b""}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        Frame(**args)  # type: ignore[arg-type]


def test_encode_rejects_what_the_frame_cannot_carry() -> None:
    with pytest.raises(ValueError):
        encode_frame("000000000161", 0x11, bytes(256))
    with pytest.raises(ValueError):
        encode_frame("000000000161", 0x11, b"", preamble=5)


def test_checksum_may_be_16_and_data_may_hold_markers() -> None:
    payload = bytes(((0x68 - 0x33) & 0xFF, (0x16 - 0x33) & 0xFF, (0xFE - 0x33) & 0xFF)) + bytes(5)
    for ctl in range(0x100):
        wire = encode_frame("161668000000", ctl, payload)
        if wire[-2] == 0x16:
            break
    assert wire[-2:] == b"\x16\x16"
    assert decode_frame(wire).payload == payload
    assert frames(feed_all(wire, 1)) == [decode_frame(wire)]


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (V11[:-1], FramingError),
        (V11 + b"\x00", FramingError),
        (V11[:-1] + b"\x17", FramingError),
        (V11[:-2] + b"\x15\x16", ChecksumError),
        (b"\x67" + V11[1:], FramingError),
        (b"", FramingError),
        (b"\xfe" * 20, FramingError),
        (NOT_BCD_ADDRESS, FramingError),
    ],
)  # fmt: skip
def test_decode_frame_typed_errors(wire: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_frame(wire)


def test_decoder_reports_noise_as_skipped_and_resets_garbage_count() -> None:
    dec = FrameDecoder()
    dec.feed(b"\x01\x02\x03" + V11)
    assert dec.next() == Skipped(3, "noise before a start byte")
    assert isinstance(dec.next(), Frame)
    assert dec.next() is NEED_DATA and dec.buffered == 0


def test_decoder_fe_runs_are_silent() -> None:
    assert feed_all(b"\xfe" * 50 + V11) == [decode_frame(V11)]


def test_decoder_checksum_error_then_resync_inside_the_bad_frame() -> None:
    # A frame cut short by a restart: its length field covers the next, valid frame.
    cut = encode_frame("000000000161", 0x91, bytes(8))[:12]
    dec = FrameDecoder()
    dec.feed(cut + V11)
    events = drain(dec)
    assert frames(events) == [decode_frame(V11)]


def test_decoder_prefers_a_complete_frame_over_an_incomplete_fake_header() -> None:
    fake = bytes.fromhex("68 00 00 00 00 00 00 68 11 FF")  # announces 255 data bytes
    events = feed_all(fake + V11, 1)
    assert frames(events) == [decode_frame(V11)]
    assert isinstance(events[0], Skipped) and "complete frame follows" in events[0].reason


def test_decoder_raises_checksum_error_and_carries_on() -> None:
    bad = V11[:-2] + b"\x00\x16"
    dec = FrameDecoder()
    dec.feed(bad + V11)
    with pytest.raises(ChecksumError) as info:
        dec.next()
    assert info.value.raw == bad
    rest = drain(dec)
    assert frames(rest) == [decode_frame(V11)]


def test_decoder_frame_too_long_for_its_bound() -> None:
    dec = FrameDecoder(max_frame=20)
    dec.feed(encode_frame("000000000161", 0x91, bytes(30)) + V11)
    with pytest.raises(FrameTooLong):
        dec.next()
    assert frames(drain(dec)) == [decode_frame(V11)]


def test_decoder_garbage_bound_raises_once() -> None:
    dec = FrameDecoder(max_garbage=100)
    dec.feed(bytes(range(1, 0x60)) * 2)
    with pytest.raises(FrameTooLong, match="without a frame"):
        drain_until_error(dec)
    dec.feed(V11)
    assert frames(drain(dec)) == [decode_frame(V11)]


def drain_until_error(dec: FrameDecoder) -> None:
    while dec.next() is not NEED_DATA:
        pass


def test_decoder_buffer_is_bounded() -> None:
    dec = FrameDecoder(max_frame=64, max_garbage=64)
    dec.feed(b"\x68" * 100)
    with pytest.raises(FrameTooLong):
        dec.feed(bytes(50))
    assert dec.buffered == 100


def test_decoder_rejects_silly_bounds() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=5)
