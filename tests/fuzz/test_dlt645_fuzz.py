"""Fuzz the DL/T 645 codec: random and mutated bytes never raise anything but the codec's own errors,
and a valid frame placed after arbitrary garbage is always recovered by the stream decoder.

Inputs come from a seeded ``random.Random`` (reproducible, and fast enough for 200,000+ inputs in a
few seconds); hypothesis is used for the round-trip properties in ``tests/unit/protocols/dlt645``.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator

from protocols.dlt645 import (
    REGISTRY,
    Frame,
    FrameDecoder,
    MaxDemand,
    Password,
    ReadResponse,
    RelayCode,
    decode_frame,
    decode_value,
    encode_frame,
    encode_value,
    error_response,
    parse_request,
    parse_response,
    read_request,
    read_response,
    relay_control_request,
    time_sync_request,
)
from protocols.errors import ProtocolError
from protocols.stream import NEED_DATA

SEED = 645
N_INPUTS = 200_000
N_RECOVERY = 20_000


def _corpus() -> list[bytes]:
    """Valid frames of every shape the codec knows, as mutation seeds."""
    when = dt.datetime(2024, 2, 29, 23, 59, 58)
    when_min = when.replace(second=0)
    out = [
        read_request("000000000161", 0x00010000),
        read_request("000000000003", 0xB611, edition=1997),
        read_response("000000000161", 0x0201FF00, encode_value(0x0201FF00, (2301, 2302, 2303))),
        read_response("AAAAAAAA0161", 0x02020100, encode_value(0x02020100, -1234), more=True),
        read_response("000000000161", 0x01010000, encode_value(0x01010000, MaxDemand(123456, when_min))),
        read_response("123456789012", 0x9010, encode_value(0x9010, 1), edition=1997),
        error_response("000000000161", 0x11, 0x02),
        relay_control_request("111111111111", RelayCode.TRIP, Password(2, "123456"), "00000001", when),
        time_sync_request(when),
    ]  # fmt: skip
    return out


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[pos % len(buf)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf.insert(pos, rng.choice((0x68, 0x16, 0xFE, rng.randrange(256))))
        elif op == 2 and buf:
            del buf[pos % len(buf)]
        elif op == 3:
            del buf[pos:]
        elif op == 4 and len(buf) > 9:
            buf[9] = rng.randrange(256)  # the length byte
        else:
            buf[pos:pos] = buf[: rng.randrange(len(buf) + 1)]
    return bytes(buf)


def _inputs(rng: random.Random, n: int) -> Iterator[bytes]:
    corpus = _corpus()
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 4:  # a well-framed frame with a mutated payload and control: fuzzes the layers above
            frame = decode_frame(rng.choice(corpus))
            control = rng.choice(
                (frame.control, frame.control ^ 0x80, frame.control | 0x20, rng.randrange(256))
            )
            yield encode_frame(frame.address, control, _mutate(rng, frame.payload)[:255])
        elif kind == 0:
            yield rng.randbytes(rng.randrange(40))
        elif kind == 1:  # random bytes that at least look like a frame's start
            yield b"\x68" + rng.randbytes(6) + b"\x68" + rng.randbytes(rng.randrange(30))
        else:
            yield _mutate(rng, rng.choice(corpus))


def _interpret(frame: Frame) -> None:
    """Go past the frame layer: replies, requests and values may raise only ProtocolError."""
    try:
        if frame.is_response:
            reply = parse_response(frame)
            if isinstance(reply, ReadResponse) and reply.di in REGISTRY:
                decode_value(reply.di, reply.data)
        else:
            parse_request(frame)
    except ProtocolError:
        pass


def _stream(data: bytes, rng: random.Random) -> list[Frame]:
    dec = FrameDecoder()
    found: list[Frame] = []
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 2, 7, 64, len(data)))
        dec.feed(data[pos : pos + step])
        pos += step
        while True:
            try:
                ev = dec.next()
            except ProtocolError:
                continue
            if ev is NEED_DATA:
                break
            if isinstance(ev, Frame):
                found.append(ev)
    return found


def test_random_and_mutated_inputs_raise_only_codec_errors() -> None:
    rng = random.Random(SEED)
    decoded = 0
    for data in _inputs(rng, N_INPUTS):
        try:
            frame = decode_frame(data)
        except ProtocolError:
            pass
        else:
            decoded += 1
            _interpret(frame)
        for frame in _stream(data, rng):
            _interpret(frame)
    assert decoded > 30_000  # the mutations keep enough inputs valid to exercise the upper layers


def test_valid_frame_after_garbage_is_always_recovered() -> None:
    rng = random.Random(SEED + 1)
    corpus = _corpus()
    garbage = _inputs(rng, N_RECOVERY)
    for _ in range(N_RECOVERY):
        good = rng.choice(corpus)
        noise = next(garbage)
        found = _stream(noise + b"\xfe" * rng.randrange(5) + good, rng)
        assert found and found[-1] == decode_frame(good), (noise.hex(" "), good.hex(" "))
