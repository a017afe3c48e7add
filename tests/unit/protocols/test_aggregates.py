from __future__ import annotations

import pytest

from protocols import PayloadError
from protocols.aggregates import (
    DailyTotal,
    IntervalRecord,
    decode_daily,
    decode_intervals,
    encode_daily,
    encode_intervals,
)


def test_intervals_round_trip() -> None:
    items = [
        IntervalRecord("m 1,=", 1, 0, 900_000, 25, 0),
        IntervalRecord("m2", 1, 900_000, 1_800_000, 7, 32),
    ]
    assert decode_intervals(encode_intervals("gw-1", 9, items)) == ("gw-1", 9, items)


def test_daily_round_trip() -> None:
    items = [DailyTotal("m1", "2026-11-22", 1000, 100, 300, 400, 200, 96, 2)]
    assert decode_daily(encode_daily("gw-1", items)) == ("gw-1", items)


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
