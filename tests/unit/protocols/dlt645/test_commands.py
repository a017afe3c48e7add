"""Requests and replies for every 2007 control code, the 1997 read, and typed error replies."""

from __future__ import annotations

import datetime as dt

import pytest

from protocols.dlt645 import (
    Ack,
    AddressReply,
    BaudReply,
    ChangeBaudRequest,
    ChangePasswordRequest,
    ClearEventsRequest,
    ClearMaxDemandRequest,
    ClearMeterRequest,
    ControlCode,
    ErrorBits,
    FollowupRequest,
    FreezeRequest,
    Password,
    ReadAddressRequest,
    ReadRequest,
    ReadResponse,
    RelayCode,
    RelayControlRequest,
    Request,
    TimeSyncRequest,
    WriteAddressRequest,
    WriteRequest,
    ack_response,
    change_baud_response,
    check_reply,
    decode_frame,
    decode_read_response,
    decode_value,
    encode_frame,
    encode_request,
    encode_value,
    error_response,
    freeze_request,
    parse_error_reply,
    parse_request,
    parse_response,
    read_address_request,
    read_address_response,
    read_followup_request,
    read_followup_response,
    read_request,
    read_response,
    relay_control_request,
    time_sync_request,
)
from protocols.errors import FramingError, MeterErrorReply, ProtocolError

ADDR = "000000000161"
PW = Password(2, "123456")
WHEN = dt.datetime(2018, 5, 12, 15, 41, 24)

REQUESTS: list[Request] = [
    ReadRequest(0x00010000),
    ReadRequest(0xB611, 1997),
    FollowupRequest(0x0001FF00, 1),
    ReadAddressRequest(),
    WriteRequest(0x04000102, encode_value(0x04000102, dt.time(12, 30, 5)), PW, "1234ABCD"),
    WriteAddressRequest("123456789012"),
    FreezeRequest(),
    FreezeRequest(minute=0, hour=0),
    ChangeBaudRequest(9600),
    ChangePasswordRequest(Password(2, "000000"), Password(2, "654321")),
    ClearMaxDemandRequest(PW, "00000001"),
    ClearMeterRequest(PW, "00000002"),
    ClearEventsRequest(PW, "00000003", 0x03300DFF),
    *(RelayControlRequest(a, WHEN, PW, "000000AA") for a in RelayCode),
    TimeSyncRequest(WHEN),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_round_trips_through_the_wire(request_: Request) -> None:
    assert parse_request(decode_frame(encode_request(ADDR, request_))) == request_


def test_relay_trip_matches_published_frame_v29() -> None:
    wire = relay_control_request("111111111111", RelayCode.TRIP, Password(0), "00000000", WHEN)
    assert wire == bytes.fromhex(
        "68 11 11 11 11 11 11 68 1C 10 33 33 33 33 33 33 33 33 4D 33 57 74 48 45 38 4B 55 16"
    )


def test_relay_control_requires_a_deadline() -> None:
    with pytest.raises(ValueError, match="valid_until"):
        relay_control_request(ADDR, RelayCode.TRIP)


def test_time_sync_matches_published_frame_v27_seconds_first() -> None:
    wire = time_sync_request(dt.datetime(2012, 5, 16, 12, 31, 47))
    assert wire == bytes.fromhex("68 99 99 99 99 99 99 68 08 06 7A 64 45 49 38 45 5D 16")


def test_wire_layouts_of_the_write_side_commands() -> None:
    # Password low-order digits first (P0 = 56); operator code low byte first.
    assert decode_frame(encode_request(ADDR, ClearMeterRequest(PW, "12345678"))).payload == bytes.fromhex(
        "02 56 34 12 78 56 34 12"
    )
    assert decode_frame(freeze_request(minute=30, hour=23)).payload == bytes.fromhex("30 23 99 99")
    assert decode_frame(encode_request(ADDR, ChangeBaudRequest(4800))).payload == b"\x10"
    pw = decode_frame(encode_request(ADDR, ChangePasswordRequest(Password(0), Password(4, "000001")))).payload
    assert pw[:4] == bytes.fromhex("05 0C 00 04")  # DI 04000C05 = level 4
    assert read_address_request() == bytes.fromhex("68 AA AA AA AA AA AA 68 13 00 DF 16")
    assert decode_frame(read_followup_request(ADDR, 0x0001FF00, 2)).payload == bytes.fromhex("00 FF 01 00 02")


@pytest.mark.parametrize(
    "bad",
    [
        lambda: ChangeBaudRequest(1234).payload(),
        lambda: FreezeRequest(minute=99).payload(),
        lambda: WriteRequest(0x04000102, bytes(39)).payload(),
        lambda: Password(10**3, "000000"),
        lambda: Password(0, "12345"),
        lambda: ChangePasswordRequest(Password(), Password(10)).payload(),
        lambda: read_request(ADDR, 0x10000, edition=1997),
        lambda: read_followup_request(ADDR, 0x00010000, 256),
        lambda: time_sync_request(dt.datetime(1999, 12, 31)),
    ],
)
def test_builders_reject_what_the_protocol_cannot_carry(bad: object) -> None:
    with pytest.raises(ValueError):
        bad()  # type: ignore[operator]


@pytest.mark.parametrize(
    "payload_control",
    [
        (b"\x00\x00", 0x11),
        (bytes(15), 0x1C),
        (bytes(8) + b"\x99" + bytes(7), 0x1C),
        (b"\x03", 0x17),
        (b"", 0x0B),
    ],
)
def test_parse_request_rejects_malformed_requests(payload_control: tuple[bytes, int]) -> None:
    payload, control = payload_control
    with pytest.raises(FramingError):
        parse_request(decode_frame(encode_frame(ADDR, control, payload)))


def test_read_reply_round_trip_and_di_check() -> None:
    raw = encode_value(0x00010000, 12345678)
    reply = parse_response(decode_frame(read_response(ADDR, 0x00010000, raw)))
    assert reply == ReadResponse(ADDR, 0x00010000, raw)
    assert isinstance(reply, ReadResponse) and decode_value(reply.di, reply.data) == 12345678
    with pytest.raises(ProtocolError, match="asked for"):
        decode_read_response(decode_frame(read_response(ADDR, 0x00010000, raw)), di=0x00020000)
    reply97 = decode_read_response(decode_frame(read_response(ADDR, 0x9010, raw, edition=1997)))
    assert (reply97.di, reply97.edition, reply97.data) == (0x9010, 1997, raw)


def test_multi_frame_read_is_reassembled() -> None:
    """§7: B1 first, then 0x12 follow-ups answered with B2 ... 92, SEQ last. Synthesised (no capture)."""
    values = tuple(range(100, 100 + 5))
    raw = encode_value(0x0001FF00, values)
    parts = [raw[:8], raw[8:16], raw[16:]]
    wire = [
        read_response(ADDR, 0x0001FF00, parts[0], more=True),
        read_followup_response(ADDR, 0x0001FF00, parts[1], 1, more=True),
        read_followup_response(ADDR, 0x0001FF00, parts[2], 2),
    ]
    replies = [decode_read_response(decode_frame(w), di=0x0001FF00) for w in wire]
    assert [r.more for r in replies] == [True, True, False]
    assert [r.seq for r in replies] == [None, 1, 2]
    assert [decode_frame(w).control for w in wire] == [0xB1, 0xB2, 0x92]
    assert decode_value(0x0001FF00, b"".join(r.data for r in replies)) == values


def test_error_replies_name_each_bit() -> None:
    frame = decode_frame(error_response(ADDR, ControlCode.READ, ErrorBits.NO_DATA | ErrorBits.UNAUTHORIZED))
    assert frame.control == 0xD1
    err = parse_error_reply(frame, 0x00010000)
    assert err.error_code == 0x06 and err.di == 0x00010000
    assert err.reasons == ("no requested data", "password wrong / unauthorised")
    with pytest.raises(MeterErrorReply) as info:
        decode_read_response(frame, di=0x00010000)
    assert info.value.di == 0x00010000
    every = parse_error_reply(decode_frame(error_response(ADDR, 0x17, 0xFF)))
    assert len(every.reasons) == 8 and "communication rate cannot change" in every.reasons
    for bit, word in ((0x10, "annual time zones"), (0x20, "daily"), (0x40, "tariffs"), (0x01, "other")):
        assert word in parse_error_reply(decode_frame(error_response(ADDR, 0x14, bit))).reasons[0]


def test_relay_reply_ok_and_refused() -> None:
    assert check_reply(decode_frame(ack_response(ADDR, 0x1C)), ControlCode.RELAY_CONTROL).control == 0x9C
    with pytest.raises(MeterErrorReply, match="unauthorised"):
        check_reply(decode_frame(error_response(ADDR, 0x1C, 0x04)), ControlCode.RELAY_CONTROL)
    with pytest.raises(ProtocolError, match="does not answer"):
        check_reply(decode_frame(ack_response(ADDR, 0x14)), ControlCode.RELAY_CONTROL)
    with pytest.raises(ProtocolError, match="request"):
        check_reply(decode_frame(read_request(ADDR, 0)), ControlCode.READ)


def test_typed_replies_of_the_other_codes() -> None:
    assert parse_response(decode_frame(read_address_response("123456789012"))) == AddressReply("123456789012")
    assert parse_response(decode_frame(change_baud_response(ADDR, 19200))) == BaudReply(19200)
    for code in (0x14, 0x15, 0x16, 0x18, 0x19, 0x1A, 0x1B, 0x1C):
        assert parse_response(decode_frame(ack_response(ADDR, code))) == Ack(ADDR, code)
    with pytest.raises(FramingError):
        parse_response(decode_frame(ack_response(ADDR, 0x13, b"\x01")))
    with pytest.raises(ProtocolError):
        parse_response(decode_frame(ack_response(ADDR, 0x1E)))
