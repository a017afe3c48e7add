"""Line-protocol encoding: exact decimals and tag escaping that no id can break out of."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.rules import stages
from tests import reference as ref
from tests.unit.ingest.strategies import SETTINGS

NASTY = [
    "plain",
    "with space",
    "a,b",
    "k=v",
    "line\nbreak",
    "cr\rlf",
    'quote"d',
    "back\\slash",
    "trail\\",
    "中文表号",
    "é😀",
    "50%",
    "x meter=evil,quantity=y value=1 0\nmeter_reading,meter=z",
    "\\,\\=",
    "\t\x00\x7f",
]


def _encode(ids, values, quantities, wide=False, gateway="gw 1"):
    n = len(values)
    r = stages.Readings(
        np.arange(n, dtype=np.uint32) % len(ids),
        np.full(n, 1_700_000_000_000, np.int64),
        np.array(quantities, np.uint16),
        np.array(values, np.int64),
        np.zeros(n, np.uint32),
    )
    return stages.encode_lines(r, stages.LineTables.build(ids, gateway), wide=wide)


@pytest.mark.parametrize("meter_id", NASTY)
@pytest.mark.parametrize("wide", [False, True])
def test_injection_reads_back_exactly_one_point(meter_id, wide) -> None:
    points = ref.parse_lines(_encode([meter_id], [12345], [1], wide=wide, gateway=meter_id))
    assert len(points) == 1
    _, tags, fields, ts = points[0]
    assert stages.unescape_tag(tags["meter"]) == meter_id
    assert stages.unescape_tag(tags["gateway"]) == meter_id
    assert fields == ({"energy_fwd_active_total": "123.45"} if wide else {"value": "123.45", "flags": 0})
    assert ts == 1_700_000_000_000


@SETTINGS
@given(st.text(min_size=1, max_size=20))
def test_any_id_round_trips(meter_id) -> None:
    (point,) = ref.parse_lines(_encode([meter_id], [1], [30]))
    assert stages.unescape_tag(point[1]["meter"]) == meter_id


@pytest.mark.parametrize(
    ("value", "q", "text"),
    [
        (12345, 1, "123.45"),
        (-5, 1, "-0.05"),
        (0, 30, "0.0"),
        (2201, 30, "220.1"),
        (-(2**63), 40, "-922337203685477.5808"),
        (2**63 - 1, 80, "9223372036854775807i"),
        (7, 101, "7i"),
        (-1000, 52, "-1.000"),
    ],
)
def test_exact_decimals_without_floats(value, q, text) -> None:
    (point,) = ref.parse_lines(_encode(["m"], [value], [q]))
    assert point[2]["value"] == (int(text[:-1]) if text.endswith("i") else text)


def test_empty_id_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        stages.LineTables.build([""], "gw")


def test_strict_parser_rejects_injection_when_not_escaped() -> None:
    with pytest.raises(ref.LineProtocolError):
        ref.parse_lines(b"m,meter=a b value=1 1\n")
    with pytest.raises(ref.LineProtocolError):
        ref.parse_lines(b"m,meter=a\\ value=1 1\n")
