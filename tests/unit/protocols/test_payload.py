"""MQTT payload v1: round trips for both encodings, zero-copy columns, and typed errors."""

from __future__ import annotations

import array
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import PayloadError
from protocols.payload import (
    MAGIC,
    BatchBuilder,
    Event,
    PrevRegisters,
    ReadingBatch,
    Status,
    decode,
    decode_event,
    decode_status,
    encode,
)

I64 = st.integers(-(2**63), 2**63 - 1)
U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
meter_ids = st.text(min_size=1, max_size=40)  # unicode, spaces, commas, newlines, ...


@st.composite
def batches(draw: st.DrawFn, flags: st.SearchStrategy[int] = U16) -> ReadingBatch:
    meters = tuple(draw(st.lists(meter_ids, min_size=0, max_size=6, unique=True)))
    n = draw(st.integers(0, 40)) if meters else 0
    idx = st.integers(0, max(len(meters) - 1, 0))
    cols = (
        array.array("I", draw(st.lists(idx, min_size=n, max_size=n))),
        array.array("q", draw(st.lists(I64, min_size=n, max_size=n))),
        array.array("H", draw(st.lists(U16, min_size=n, max_size=n))),
        array.array("q", draw(st.lists(I64, min_size=n, max_size=n))),
        array.array("I", draw(st.lists(flags, min_size=n, max_size=n))),
    )
    k = draw(st.integers(0, 5)) if meters else 0
    prev = PrevRegisters(
        array.array("I", draw(st.lists(idx, min_size=k, max_size=k))),
        array.array("H", draw(st.lists(U16, min_size=k, max_size=k))),
        array.array("q", draw(st.lists(I64, min_size=k, max_size=k))),
        array.array("q", draw(st.lists(I64, min_size=k, max_size=k))),
    )
    return ReadingBatch(
        draw(st.text(min_size=1, max_size=30)),
        draw(st.integers(0, 2**63 - 1)),
        meters,
        *cols,
        prev=prev,
        sent_ms=draw(st.integers(0, 2**63 - 1)),
    )


@settings(max_examples=300, deadline=None)
@given(batches(), st.sampled_from(["binary", "json"]))
def test_round_trip(batch: ReadingBatch, encoding: str) -> None:
    assert decode(encode(batch, encoding)) == batch


@settings(max_examples=300, deadline=None)
@given(batches(flags=U32), st.sampled_from(["binary", "json"]))
def test_v2_round_trips_32_flag_bits(batch: ReadingBatch, encoding: str) -> None:
    out = decode(encode(batch, encoding, version=2))  # type: ignore[arg-type]
    assert out == batch and memoryview(out.flags).itemsize == 4


# The docs/payload.md example with a flagged second reading, as the v1 encoder wrote it before
# payload v2 existed: v1 bytes never change (edges in the field keep sending them).
GOLDEN_V1 = bytes.fromhex(
    "414d49018ba174a872656164696e6773a26777a467772d31a37365712aa473656e74cf0000018bcfe6f288a66d"
    "657465727391ac303030303132333435363738a56d65746572c4080000000000000000a27473c410a0eee6cf8b01"
    "0000a0eee6cf8b010000a171c40401001e00a176c41087d61200000000009908000000000000a166c40400000182"
    "a47072657684a56d65746572c40400000000a171c4020100a176c40844d6120000000000a27473c4080068e5cf8b"
    "010000"
)
GOLDEN_V1_JSON = (
    b'{"v":1,"type":"readings","gateway":"gw-1","seq":42,"sent_ms":1700000101000,"meters":["0000123'
    b'45678"],"readings":[{"meter":0,"ts":1700000100000,"quantity":1,"value":1234567,"flags":0},{"m'
    b'eter":0,"ts":1700000100000,"quantity":30,"value":2201,"flags":33281}],"prev":[{"meter":0,"qua'
    b'ntity":1,"value":1234500,"ts":1700000000000}]}'
)


def _golden_batch(flags2: int = 0x8201) -> ReadingBatch:
    b = BatchBuilder()
    b.add("000012345678", 1_700_000_100_000, 1, 1_234_567, 0)
    b.add("000012345678", 1_700_000_100_000, 30, 2201, flags2)
    b.set_prev("000012345678", 1, 1_234_500, 1_700_000_000_000)
    return b.build("gw-1", seq=42, sent_ms=1_700_000_101_000)


def test_v1_bytes_are_unchanged() -> None:
    assert encode(_golden_batch()) == encode(_golden_batch(), version=1) == GOLDEN_V1
    assert encode(_golden_batch(), "json") == GOLDEN_V1_JSON
    for data in (GOLDEN_V1, GOLDEN_V1_JSON):
        out = decode(data)
        assert out == _golden_batch() and memoryview(out.flags).itemsize == 4  # widened to u32


def test_v2_differs_from_v1_in_the_magic_and_the_flags_width_only() -> None:
    import msgpack

    batch = _golden_batch(0x8201 | 1 << 16 | 1 << 31)
    v2 = encode(batch, version=2)
    assert v2[:4] == b"AMI\x02" and decode(v2) == batch
    body1, body2 = msgpack.unpackb(GOLDEN_V1[4:]), msgpack.unpackb(v2[4:])
    assert body2.pop("f") == struct.pack("<2I", 0, 0x8201 | 1 << 16 | 1 << 31)
    assert body1.pop("f") == struct.pack("<2H", 0, 0x8201) and body1 == body2
    doc = json.loads(encode(batch, "json", version=2))
    assert doc["v"] == 2 and doc["readings"][1]["flags"] == 0x8201 | 1 << 16 | 1 << 31
    assert decode(encode(_golden_batch(), version=2)) == decode(GOLDEN_V1)


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_v1_refuses_a_flag_bit_it_cannot_carry(encoding: str) -> None:
    with pytest.raises(ValueError, match="bit above 15 is set; payload v1"):
        encode(_golden_batch(1 << 16), encoding)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown payload version 3"):
        encode(_golden_batch(), encoding, version=3)  # type: ignore[arg-type]


def test_empty_batch_round_trips_in_both_encodings() -> None:
    empty = BatchBuilder().build("gw-1", seq=0)
    for enc in ("binary", "json"):
        out = decode(encode(empty, enc))
        assert len(out) == 0 and out.gateway == "gw-1" and out.meters == ()


def _sample() -> ReadingBatch:
    b = BatchBuilder()
    b.add("000012345678", 1_700_000_000_000, 1, 12_345_678, 0)
    b.add("表 1, a=b", 1_700_000_000_000, 30, 2201, 4)
    b.add("000012345678", 1_700_000_900_000, 1, 12_345_700, 0)
    b.set_prev("000012345678", 1, 12_345_600, 1_699_999_100_000)
    return b.build("gw-1", seq=42, sent_ms=1_700_000_901_000)


def test_binary_columns_wrap_with_numpy_without_copy() -> None:
    data = encode(_sample())
    assert data.startswith(MAGIC)
    batch = decode(data)
    assert isinstance(batch.value, memoryview)
    values = np.frombuffer(batch.value, dtype="<i8")
    assert values.tolist() == [12_345_678, 2201, 12_345_700]
    assert not values.flags.owndata and not values.flags.writeable  # a view over the payload's bytes
    assert np.frombuffer(batch.meter, dtype="<u4").tolist() == [0, 1, 0]
    assert np.frombuffer(batch.prev.ts, dtype="<i8").tolist() == [1_699_999_100_000]


def test_json_is_readable_and_recognised() -> None:
    data = encode(_sample(), "json")
    doc = json.loads(data)
    assert doc["v"] == 1 and doc["type"] == "readings" and doc["meters"][1] == "表 1, a=b"
    assert doc["readings"][1] == {
        "meter": 1,
        "ts": 1_700_000_000_000,
        "quantity": 30,
        "value": 2201,
        "flags": 4,
    }
    assert decode(b"  \n" + data) == _sample()


def test_encode_accepts_numpy_columns() -> None:
    batch = ReadingBatch(
        "gw",
        1,
        ("m",),
        np.zeros(2, np.uint32),
        np.arange(2, dtype=np.int64),
        np.ones(2, np.uint16),
        np.array([-1, 2**63 - 1], np.int64),
        np.zeros(2, np.uint32),
    )
    assert list(decode(encode(batch)).value) == [-1, 2**63 - 1]


def test_encode_rejects_wrong_column_type() -> None:
    with pytest.raises(TypeError, match="'ts'"):
        ReadingBatch(
            "gw",
            1,
            ("m",),
            array.array("I", [0]),
            array.array("i", [1]),
            array.array("H", [1]),
            array.array("q", [1]),
            array.array("I", [0]),
        )
    with pytest.raises(ValueError, match="unknown encoding"):
        encode(_sample(), "xml")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not a readings payload"),
        (b"hello", "not a readings payload"),
        (b"AMI\x03\x80", "version 3 not supported"),
        (b"AMI\x00\x80", "version 0 not supported"),
        (b"AMI", "version None not supported"),
        (MAGIC + b"\xc1", "binary payload"),
        (MAGIC + b"\x90", "expected a map"),
        (b'{"v": 3, "type": "readings"}', "version 3"),
        (b'{"v": true, "type": "readings"}', "version True"),
        (b'{"v": 1, "type": "events"}', "is not 'readings'"),
        (b'{"v": 1, "type": "readings", "gateway": "g", "seq": -1}', "seq"),
        (
            b'{"v": 1, "type": "readings", "gateway": "g", "seq": 1, "meters": ["m"], "readings": '
            b'[{"meter": 0, "ts": 1, "quantity": 70000, "value": 1, "flags": 0}], "prev": []}',
            "quantity",
        ),
        (
            b'{"v": 1, "type": "readings", "gateway": "g", "seq": 1, "meters": ["m"], "readings": '
            b'[{"meter": 0, "ts": 1, "quantity": 1, "value": 1, "flags": 65536}], "prev": []}',
            "flags: 65536 out of range",
        ),
        (
            b'{"v": 2, "type": "readings", "gateway": "g", "seq": 1, "meters": ["m"], "readings": '
            b'[{"meter": 0, "ts": 1, "quantity": 1, "value": 1, "flags": 4294967296}], "prev": []}',
            "flags: 4294967296 out of range",
        ),
        (
            b'{"v": 1, "type": "readings", "gateway": "g", "seq": 1, "meters": [], "readings": '
            b'[{"meter": 3, "ts": 1, "quantity": 1, "value": 1, "flags": 0}], "prev": []}',
            "outside the 0-entry",
        ),
        (b'{"a":' + b"[" * 100_000, "json payload"),
        (b'{"v": 1, "type": "readings", "gateway": "g", "seq": 1, "meters": ["m", 7]}', "list of strings"),
        (
            b'{"v": 1, "type": "readings", "gateway": "g", "seq": 1, "meters": ["%s"]}' % (b"m" * 257),
            "at most 256",
        ),
    ],
)
def test_malformed_payloads_raise_payload_error(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason.replace("(", r"\(")):
        decode(payload)


def test_binary_inconsistent_column_lengths() -> None:
    import msgpack

    body = msgpack.unpackb(encode(_sample())[4:])
    body["ts"] = body["ts"][:8]
    with pytest.raises(PayloadError, match="differ in length"):
        decode(MAGIC + msgpack.packb(body))
    body = msgpack.unpackb(encode(_sample())[4:])
    body["v"] = body["v"][:-3]
    with pytest.raises(PayloadError, match="not a multiple of 8"):
        decode(MAGIC + msgpack.packb(body))
    body = msgpack.unpackb(encode(_sample())[4:])
    body["f"] = body["f"][:-1]
    with pytest.raises(PayloadError, match="'flags': 5 bytes is not a multiple of 2"):
        decode(MAGIC + msgpack.packb(body))
    body = msgpack.unpackb(encode(_sample(), version=2)[4:])
    body["f"] = body["f"][:-2]
    with pytest.raises(PayloadError, match="'flags': 10 bytes is not a multiple of 4"):
        decode(b"AMI\x02" + msgpack.packb(body))


def test_event_and_status_messages_round_trip() -> None:
    ev = Event("e-1", "gw-1", "relay_changed", 1_700_000_000_000, "000012345678", {"from": 0, "to": 1})
    assert decode_event(ev.to_json()) == ev
    st_ = Status("gw-1", True, 5, "0.1.0", {"reads": 10, "read_success_rate": 0.98})
    assert decode_status(st_.to_json()) == st_
    with pytest.raises(PayloadError):
        decode_event(b'{"v":1,"type":"event","id":"x","gateway":"g","kind":"nonsense","ts_ms":1}')
    with pytest.raises(PayloadError):
        decode_status(ev.to_json())
