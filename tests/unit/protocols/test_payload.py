"""MQTT payload v1: round trips for both encodings, zero-copy columns, and typed errors."""

from __future__ import annotations

import array
import json

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
meter_ids = st.text(min_size=1, max_size=40)  # unicode, spaces, commas, newlines, ...


@st.composite
def batches(draw: st.DrawFn) -> ReadingBatch:
    meters = tuple(draw(st.lists(meter_ids, min_size=0, max_size=6, unique=True)))
    n = draw(st.integers(0, 40)) if meters else 0
    idx = st.integers(0, max(len(meters) - 1, 0))
    cols = (
        array.array("I", draw(st.lists(idx, min_size=n, max_size=n))),
        array.array("q", draw(st.lists(I64, min_size=n, max_size=n))),
        array.array("H", draw(st.lists(U16, min_size=n, max_size=n))),
        array.array("q", draw(st.lists(I64, min_size=n, max_size=n))),
        array.array("I", draw(st.lists(U16, min_size=n, max_size=n))),
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
        (b"", "not a v1 payload"),
        (b"hello", "not a v1 payload"),
        (b"AMI\x02\x80", "version 2 not supported"),
        (b"AMI", "version None not supported"),
        (MAGIC + b"\xc1", "binary payload"),
        (MAGIC + b"\x90", "expected a map"),
        (b'{"v": 2, "type": "readings"}', "version 2"),
        (b'{"v": 1, "type": "events"}', "is not 'readings'"),
        (b'{"v": 1, "type": "readings", "gateway": "g", "seq": -1}', "seq"),
        (
            b'{"v": 1, "type": "readings", "gateway": "g", "seq": 1, "meters": ["m"], "readings": '
            b'[{"meter": 0, "ts": 1, "quantity": 70000, "value": 1, "flags": 0}], "prev": []}',
            "quantity",
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


def test_event_and_status_messages_round_trip() -> None:
    ev = Event("e-1", "gw-1", "relay_changed", 1_700_000_000_000, "000012345678", {"from": 0, "to": 1})
    assert decode_event(ev.to_json()) == ev
    st_ = Status("gw-1", True, 5, "0.1.0", {"reads": 10, "read_success_rate": 0.98})
    assert decode_status(st_.to_json()) == st_
    with pytest.raises(PayloadError):
        decode_event(b'{"v":1,"type":"event","id":"x","gateway":"g","kind":"nonsense","ts_ms":1}')
    with pytest.raises(PayloadError):
        decode_status(ev.to_json())
