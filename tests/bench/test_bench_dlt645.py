"""Benchmark: DL/T 645 encode+decode frames/s, ours against the PyPI ``dlt645`` 3.2.0 package, one run.

One exchange = encode a read request (forward active energy, 00010000), decode it, encode the
meter's energy reply, decode it down to the value. Both sides do the same work with their own API:
ours ends with a fixed-point int, theirs with a float from ``MeterClientService.handle_response``.
Best of 5 repeats (``timeit``), so background load on a shared machine hurts both sides alike.

Run: .venv/bin/python -m pytest tests/bench/test_bench_dlt645.py -s -o addopts=""
"""

from __future__ import annotations

import struct
import timeit
from collections.abc import Callable

import dlt645
from dlt645 import DLT645Protocol, MeterClientService
from dlt645.common.transform import float_to_bcd

from protocols.dlt645 import (
    address_to_wire,
    decode_frame,
    decode_read_response,
    decode_value,
    encode_value,
    read_request,
    read_response,
)

ADDR = "000000000161"
DI = 0x00010000
VALUE = 12345678  # 123456.78 kWh
N = 20_000


def ours() -> int:
    request = decode_frame(read_request(ADDR, DI))
    reply = decode_read_response(decode_frame(read_response(ADDR, DI, encode_value(DI, VALUE))), di=DI)
    assert request.control == 0x11
    value = decode_value(reply.di, reply.data)
    assert isinstance(value, int)
    return value


dlt645.disable_logging()
_WIRE_ADDR = bytearray(address_to_wire(ADDR))
_CLIENT = MeterClientService(None)
_CLIENT.address = bytearray(_WIRE_ADDR)


def theirs() -> float:
    di = struct.pack("<I", DI)
    request = DLT645Protocol.deserialize(DLT645Protocol.build_frame(_WIRE_ADDR, 0x11, di, preamble_count=0))
    raw = DLT645Protocol.build_frame(_WIRE_ADDR, 0x91, di + float_to_bcd(123456.78, "XXXXXX.XX", "little"), 0)
    assert request.ctrl_code == 0x11
    value: float = _CLIENT.handle_response(DLT645Protocol.deserialize(raw)).value
    return value


def _rate(fn: Callable[[], object]) -> float:
    best = min(timeit.repeat(fn, number=N, repeat=5))
    return N / best


def test_bench_encode_decode_against_pypi_dlt645() -> None:
    # Same bytes on the wire, same value out: the comparison is like for like.
    assert read_request(ADDR, DI) == bytes(
        DLT645Protocol.build_frame(_WIRE_ADDR, 0x11, struct.pack("<I", DI), 0)
    )
    assert ours() == round(theirs() * 100)
    r_ours, r_theirs = _rate(ours), _rate(theirs)
    print(
        f"\nDL/T 645 read exchange (request + energy reply, encode+decode): ours {r_ours:,.0f} exchanges/s "
        f"({2 * r_ours:,.0f} frames/s), PyPI dlt645 3.2.0 {r_theirs:,.0f} exchanges/s "
        f"({2 * r_theirs:,.0f} frames/s); ratio ours/theirs = {r_ours / r_theirs:.2f}x"
    )
    assert r_ours > 0 and r_theirs > 0
