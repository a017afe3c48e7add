"""Every public vector (shared/reference/dlt645_vectors.json), three ways and more (STYLE H11).

Each vector is decoded whole with ``decode_frame``, and through ``FrameDecoder`` whole, one byte at a
time, with trailing bytes, and behind garbage plus an FE preamble. Well-formed vectors must decode to
the value their entry states; malformed ones must raise the matching typed error.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from protocols.dlt645 import (
    AddressReply,
    Frame,
    FrameDecoder,
    ReadAddressRequest,
    ReadRequest,
    ReadResponse,
    RelayCode,
    RelayControlRequest,
    TimeSyncRequest,
    decode_frame,
    decode_value,
    di_info,
    normalize_address,
    parse_request,
    parse_response,
)
from protocols.errors import ChecksumError, FramingError, MeterErrorReply
from protocols.stream import NEED_DATA, Skipped

from .helpers import feed_all, frames, load_vectors

VECTORS = load_vectors()
GOOD = [v for v in VECTORS if v["kind"] != "malformed"]
BAD = [v for v in VECTORS if v["kind"] == "malformed"]


def _wire(v: dict[str, object]) -> bytes:
    return bytes.fromhex(str(v["hex"]))


def _address(v: dict[str, object]) -> str:
    return normalize_address(str(v["address"]).split()[0])


def _flatten(value: object) -> list[int]:
    return list(value) if isinstance(value, tuple) else [value]  # type: ignore[list-item]


def _check_semantics(v: dict[str, object], frame: Frame) -> None:
    """The decoded frame means what the vector's entry says."""
    decoded = v["decoded"]
    assert isinstance(decoded, dict)
    assert frame.address == _address(v)
    assert frame.control == int(str(v["control"]), 16)
    if frame.is_error:
        with pytest.raises(MeterErrorReply) as info:
            parse_response(frame)
        assert info.value.error_code == int(decoded["error_byte"], 16)
        assert info.value.reasons  # each set bit is named
        return
    if not frame.is_response:
        request = parse_request(frame)
        if v.get("di"):
            assert isinstance(request, ReadRequest)
            assert request.di == int(str(v["di"]), 16)
        elif frame.control == 0x13:
            assert request == ReadAddressRequest()
        elif frame.control == 0x08:
            assert isinstance(request, TimeSyncRequest)
            assert request.when == dt.datetime.fromisoformat(decoded["datetime"])
        elif frame.control == 0x1C:
            assert isinstance(request, RelayControlRequest)
            assert request.action is RelayCode.TRIP
            assert request.password.level == 0 and request.password.code == "000000"
            assert request.operator == "00000000"
            assert request.valid_until == dt.datetime(2018, 5, 12, 15, 41, 24)
        else:  # pragma: no cover - every request vector is covered above
            raise AssertionError(f"unchecked request vector {v['id']}")
        return
    reply = parse_response(frame)
    if isinstance(reply, AddressReply):
        assert reply.address == decoded["address"]
        return
    assert isinstance(reply, ReadResponse)
    assert reply.di == int(str(v["di"]), 16)
    values = _flatten(decode_value(reply.di, reply.data))
    expected = [Decimal(str(x)) for k, x in decoded.items() if k != "meaning"]
    scale = 10 ** di_info(reply.di).decimals
    assert [Decimal(x) / scale for x in values] == expected


@pytest.mark.parametrize("v", GOOD, ids=[str(v["id"]) for v in GOOD])
def test_decode_frame_whole(v: dict[str, object]) -> None:
    _check_semantics(v, decode_frame(_wire(v)))


@pytest.mark.parametrize("v", GOOD, ids=[str(v["id"]) for v in GOOD])
@pytest.mark.parametrize("chunk", [None, 1, 3], ids=["whole", "bytewise", "by3"])
def test_stream_decoder_chunkings(v: dict[str, object], chunk: int | None) -> None:
    events = feed_all(_wire(v), chunk)
    assert events == [decode_frame(_wire(v))]


@pytest.mark.parametrize("v", GOOD, ids=[str(v["id"]) for v in GOOD])
def test_stream_decoder_trailing_bytes(v: dict[str, object]) -> None:
    dec = FrameDecoder()
    dec.feed(_wire(v) + b"\x68\x01\x02")  # the start of another frame
    assert dec.next() == decode_frame(_wire(v))
    assert dec.next() is NEED_DATA
    assert dec.buffered == 3


@pytest.mark.parametrize("v", GOOD, ids=[str(v["id"]) for v in GOOD])
@pytest.mark.parametrize("chunk", [None, 1])
def test_stream_decoder_garbage_and_preamble(v: dict[str, object], chunk: int | None) -> None:
    noise = bytes.fromhex("00 16 68 68 A5 FF 68 11 22 16")
    events = feed_all(noise + b"\xfe" * 4 + _wire(v) + noise, chunk)
    assert frames(events) == [decode_frame(_wire(v))]
    assert all(isinstance(e, Skipped) for e in events if not isinstance(e, Frame))


def test_decode_frame_accepts_wire_preamble_and_encode_round_trips() -> None:
    for v in GOOD:
        frame = decode_frame(_wire(v))
        preamble = int(v["verify"]["preamble_bytes"])  # type: ignore[index]
        assert frame.encode(preamble=preamble) == _wire(v)


def _bad_kind(v: dict[str, object]) -> type[Exception]:
    expect = str(v["decoded"]["expect"])  # type: ignore[index]
    return ChecksumError if "checksum" in expect else FramingError


@pytest.mark.parametrize("v", BAD, ids=[str(v["id"]) for v in BAD])
def test_malformed_vectors_raise_typed_errors(v: dict[str, object]) -> None:
    with pytest.raises(_bad_kind(v)) as info:
        decode_frame(_wire(v))
    assert info.value.raw == _wire(v)


@pytest.mark.parametrize("v", BAD, ids=[str(v["id"]) for v in BAD])
@pytest.mark.parametrize("chunk", [None, 1])
def test_malformed_vectors_in_a_stream_do_not_hide_the_next_frame(
    v: dict[str, object], chunk: int | None
) -> None:
    good = _wire(GOOD[0])
    events = feed_all(_wire(v) + good, chunk)
    assert frames(events)[-1] == decode_frame(good)
    if _bad_kind(v) is ChecksumError:
        assert any(isinstance(e, ChecksumError) for e in events)


def test_truncated_vector_waits_for_more_data() -> None:
    (truncated,) = [v for v in BAD if "incomplete" in str(v["decoded"])]
    dec = FrameDecoder()
    dec.feed(_wire(truncated))
    assert dec.next() is NEED_DATA
    dec.feed(b"\x16")
    frame = dec.next()
    assert isinstance(frame, Frame) and frame.payload[4:] == bytes.fromhex("26 00 00 00")


def test_vendored_vectors_match_the_shared_reference() -> None:
    from tests.unit.protocols.dlt645.helpers import SHARED_VECTORS_FILE, VECTORS_FILE

    if not SHARED_VECTORS_FILE.exists():
        pytest.skip("no shared/ beside this checkout: nothing to compare the vendored copy with")
    assert VECTORS_FILE.read_bytes() == SHARED_VECTORS_FILE.read_bytes()
