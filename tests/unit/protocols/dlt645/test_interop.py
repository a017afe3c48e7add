"""Interop with the independent PyPI ``dlt645`` 3.2.0 package (test-only dependency).

Both directions: our request -> their meter simulator -> our reply decoder, and our meter-side reply
-> their client decoder, for energy, voltage, current (negative too), power and max demand. Where the
reference (shared/reference/dlt645.md §9.1) lists a bug of that package, the test asserts *our*
behaviour, the reference's, and names the difference.
"""

from __future__ import annotations

import datetime as dt
import functools
import struct
from typing import Any

import pytest

dlt645 = pytest.importorskip("dlt645")
from dlt645 import Demand, DLT645Protocol, MeterClientService, MeterServerService  # noqa: E402

from protocols.dlt645 import (  # noqa: E402
    ChangeBaudRequest,
    MaxDemand,
    ReadRequest,
    TimeSyncRequest,
    address_to_wire,
    decode_frame,
    decode_read_response,
    decode_value,
    encode_request,
    encode_value,
    parse_request,
    read_request,
    read_response,
)
from protocols.errors import FramingError  # noqa: E402

dlt645.disable_logging()
ADDR = "000000000161"
WIRE_ADDR = bytearray(address_to_wire(ADDR))

# (di, their setter, their float, our fixed-point)
READS = [
    (0x00010000, "set_00", 123456.78, 12345678),
    (0x00000000, "set_00", -1234.56, -123456),  # combined active energy is signed
    (0x02010100, "set_02", 230.1, 2301),
    (0x02020100, "set_02", 5.123, 5123),
    (0x02020200, "set_02", -1.234, -1234),  # reverse current
    (0x02030000, "set_02", 12.3456, 123456),
    (0x02030000, "set_02", -0.2512, -2512),
    (0x02060000, "set_02", 0.987, 987),
]


@functools.cache  # building their data map takes about a second: one instance per module
def _their_server() -> Any:
    server = MeterServerService(None)
    # Their set_address() wants the address already byte-reversed (reference §9.1 bug 7), so we set
    # the wire bytes directly: a nameplate address given to their API would not match the frame.
    server.address = bytearray(WIRE_ADDR)
    return server


@functools.cache
def _their_client() -> Any:
    client = MeterClientService(None)
    client.address = bytearray(WIRE_ADDR)
    return client


@pytest.mark.parametrize(("di", "setter", "value", "fixed"), READS)
def test_our_request_their_meter_our_decoder(di: int, setter: str, value: float, fixed: int) -> None:
    server = _their_server()
    assert getattr(server, setter)(di, value)
    reply = server.handle_request(DLT645Protocol.deserialize(read_request(ADDR, di)))
    response = decode_read_response(decode_frame(bytes(reply)), di=di)
    assert decode_value(di, response.data) == fixed


@pytest.mark.parametrize(("di", "setter", "value", "fixed"), READS)
def test_our_meter_reply_their_client_decoder(di: int, setter: str, value: float, fixed: int) -> None:
    wire = read_response(ADDR, di, encode_value(di, fixed))
    item = _their_client().handle_response(DLT645Protocol.deserialize(wire))
    assert item.value == pytest.approx(value, abs=1e-9)


@pytest.mark.parametrize("di", [0x00010000, 0x02010100, 0x02020100, 0x02030000, 0x01010000])
def test_their_read_request_our_parser(di: int) -> None:
    wire = bytes(DLT645Protocol.build_frame(WIRE_ADDR, 0x11, struct.pack("<I", di), preamble_count=4))
    assert parse_request(decode_frame(wire)) == ReadRequest(di)
    assert decode_frame(wire) == decode_frame(read_request(ADDR, di))


def test_max_demand_both_directions_and_their_timestamp_bug() -> None:
    when = dt.datetime(2023, 1, 1, 12, 0)
    server = _their_server()
    assert server.set_01(0x01010000, Demand(value=12.3456, time=when))
    reply = server.handle_request(DLT645Protocol.deserialize(read_request(ADDR, 0x01010000)))
    response = decode_read_response(decode_frame(bytes(reply)), di=0x01010000)
    # Their *server* writes mm hh DD MM YY, as the reference says: we decode it right.
    assert decode_value(0x01010000, response.data) == MaxDemand(123456, when)

    ours = read_response(ADDR, 0x01010000, encode_value(0x01010000, MaxDemand(123456, when)))
    item = _their_client().handle_response(DLT645Protocol.deserialize(ours))
    assert item.value.value == pytest.approx(12.3456)
    # Difference (reference §9.1 bug 6): their *client* reads the first wire byte (minutes) as the
    # year, so the same bytes come out as 2000-12-01 01:23 instead of 2023-01-01 12:00.
    assert item.value.time == dt.datetime(2000, 12, 1, 1, 23)


def _captured_broadcast(call: str, *args: Any) -> bytes:
    client = MeterClientService(None)
    client.address = bytearray(WIRE_ADDR)
    sent: list[bytes] = []
    client._send_broadcast = lambda frame: sent.append(bytes(frame)) or True
    client.send_and_handle_request = lambda frame: sent.append(bytes(frame))
    getattr(client, call)(*args)
    return sent[0]


def test_time_sync_field_order_differs_from_theirs() -> None:
    when = dt.datetime(2017, 6, 5, 10, 22, 51)
    theirs = decode_frame(_captured_broadcast("broadcast_time_sync", when))
    ours = decode_frame(encode_request("999999999999", TimeSyncRequest(when)))
    # Same frame header; reference §9.1 bug 1: they send YY MM DD hh mm ss, the standard ss mm hh DD MM YY.
    assert (theirs.address, theirs.control) == (ours.address, ours.control) == ("999999999999", 0x08)
    assert ours.payload == bytes.fromhex("51 22 10 05 06 17")
    assert theirs.payload == ours.payload[::-1]


def test_change_baud_word_differs_from_theirs() -> None:
    theirs = decode_frame(_captured_broadcast("change_baud_rate", 9600))
    ours = decode_frame(encode_request(ADDR, ChangeBaudRequest(9600)))
    # Reference §9.1 bug 3: 9600 is Z = 0x20 (bit 5); they send 0x32, which is no valid word.
    assert ours.payload == b"\x20" and theirs.payload == b"\x32"
    with pytest.raises(FramingError, match="baud word"):
        parse_request(theirs)
