from __future__ import annotations

import struct

import msgpack
import pytest

from protocols import PayloadError
from protocols.aggregates import (
    INTERVALS_MAGIC,
    DailyTotal,
    IntervalRecord,
    decode_daily,
    decode_intervals,
    encode_daily,
    encode_interval_columns,
    encode_intervals,
)

ITEMS = [
    IntervalRecord("m 1,=", 1, 0, 900_000, 25, 0),
    IntervalRecord("m2", 1, 900_000, 1_800_000, 7, 32),
    IntervalRecord("表计", 5, -900_000, 0, -(2**63), 2**16 - 1),
    IntervalRecord("m 1,=", 2, 0, 900_000, 2**63 - 1, 0),
    IntervalRecord("m2", 2, 0, 900_000, 3, 2**32 - 1),  # every flag bit, 16..31 too
]


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_intervals_round_trip(encoding: str) -> None:
    data = encode_intervals("gw-1", 9, ITEMS, encoding)  # type: ignore[arg-type]
    assert data.startswith(INTERVALS_MAGIC if encoding == "binary" else b"{")
    assert decode_intervals(data) == ("gw-1", 9, ITEMS)
    assert decode_intervals(encode_intervals("gw-1", 9, [], encoding)) == ("gw-1", 9, [])  # type: ignore[arg-type]


def test_json_intervals_are_the_documented_items_and_columns_encode_the_same() -> None:
    """The one JSON encoder: the documented keys in record order, compact, UTF-8 unescaped; the
    column form (what ingest publishes from numpy columns) gives the same bytes."""
    import array
    import json
    from dataclasses import asdict

    want = json.dumps(
        {"v": 1, "type": "intervals", "gateway": 'g"w', "batch_seq": 3, "intervals": [asdict(i) for i in ITEMS]},
        ensure_ascii=False, separators=(",", ":"),
    ).encode()  # fmt: skip
    assert encode_intervals('g"w', 3, ITEMS) == want
    meters = ["m 1,=", "m2", "表计"]
    cols = (
        array.array("I", [0, 1, 2, 0, 1]), array.array("H", [i.quantity for i in ITEMS]),
        array.array("q", [i.start_ms for i in ITEMS]), array.array("q", [i.end_ms for i in ITEMS]),
        array.array("q", [i.energy for i in ITEMS]), array.array("I", [i.flags for i in ITEMS]),
    )  # fmt: skip
    assert encode_interval_columns('g"w', 3, meters, cols, "json") == want
    with pytest.raises(ValueError, match="meter"):
        encode_interval_columns('g"w', 3, meters[:2], cols, "json")


def test_binary_intervals_are_smaller_and_unknown_encodings_refused() -> None:
    many = ITEMS * 100
    assert len(encode_intervals("g", 1, many, "binary")) * 2 < len(encode_intervals("g", 1, many))
    with pytest.raises(ValueError, match="encoding"):
        encode_intervals("g", 1, ITEMS, "xml")  # type: ignore[arg-type]


def _binary(**body: object) -> bytes:
    doc: dict[str, object] = {"t": "intervals", "gw": "g", "seq": 1, "meters": ["m"]}
    doc.update({k: b"" for k in ("meter", "q", "start", "end", "e", "f")})
    doc.update(body)
    return INTERVALS_MAGIC + msgpack.packb({k: v for k, v in doc.items() if v is not None}, use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (INTERVALS_MAGIC[:3] + b"\x03" + _binary()[4:], "version"),
        (INTERVALS_MAGIC + b"\xc1", "binary"),  # msgpack's never-used byte
        (_binary(t="readings"), "type"),
        (_binary(seq=-1), "seq"),
        (_binary(gw=None), "gw"),
        (_binary(meters=[1]), "meters"),
        (_binary(q=None), "q"),
        (_binary(e=b"\x00" * 7), "multiple of 8"),
        (_binary(meter=struct.pack("<I", 0), q=b""), "differ in length"),
        (
            _binary(
                **dict(
                    zip(
                        ("meter", "q", "start", "end", "e", "f"),
                        (struct.pack("<I", 1), b"\x01\x00", bytes(8), bytes(8), bytes(8), bytes(4)),
                        strict=True,
                    )
                )
            ),
            "outside the 1-entry meter table",
        ),
    ],
)
def test_malformed_binary_is_payload_error(data: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        decode_intervals(data)


def test_binary_intervals_v2_carry_32_flag_bits_and_v1_is_still_read() -> None:
    """Ingest writes binary version 2 (u32 flags); a version-1 message (u16 flags) from an older
    ingest decodes to the same records, its flags widened."""
    v2 = encode_intervals("gw-1", 9, ITEMS, "binary")
    assert v2[:4] == b"AMA\x02" and decode_intervals(v2)[2][-1].flags == 2**32 - 1
    body = msgpack.unpackb(v2[4:], raw=False)
    body["f"] = struct.pack("<5H", *(i.flags for i in ITEMS[:4]), 7)
    got = decode_intervals(b"AMA\x01" + msgpack.packb(body, use_bin_type=True))[2]
    assert [i.flags for i in got] == [i.flags for i in ITEMS[:4]] + [7]
    assert got[:4] == ITEMS[:4]


def test_daily_round_trip() -> None:
    items = [
        DailyTotal("m1", "2026-11-22", 1000, 100, 300, 400, 200, 96, 2),
        DailyTotal('m "2",\\电表', "2026-11-23", 2**40, 0, 0, 0, 0, 0, 0),
    ]
    assert decode_daily(encode_daily('gw "1"', items)) == ('gw "1"', items)
    assert decode_daily(encode_daily("gw-1", [])) == ("gw-1", [])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{}",
        b'{"v":1,"type":"intervals","gateway":"g","batch_seq":1,"intervals":[{"meter":"m"}]}',
        b'{"v":1,"type":"intervals","gateway":"g","batch_seq":1,"intervals":[{"meter":"m","quantity":1,'
        b'"start_ms":"0","end_ms":1,"energy":1,"flags":0}]}',
        b'{"v":1,"type":"intervals","gateway":"g","intervals":[]}',
    ],
)
def test_malformed_is_payload_error(data: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_intervals(data)
