"""The alarms codec (``ami/v1/agg/alarms``): round trip, and every malformed message refused with
PayloadError, never accepted half-read."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import topics
from protocols.alarms import MAX_ALARM_BYTES, AreaOutage, check_area, decode_alarm
from protocols.errors import PayloadError


def test_topic() -> None:
    assert topics.ALARMS == "ami/v1/agg/alarms"
    assert topics.agg_gateway_of("intervals", topics.ALARMS) is None


def test_encoding_is_the_documented_json() -> None:
    raw = AreaOutage("TA-0042", 1_717_200_000_000, 60).to_json()
    assert raw == b'{"v":1,"type":"area_outage","area":"TA-0042","ts_ms":1717200000000,"events":60}'


@given(
    st.text(
        st.characters(blacklist_categories=("Zs", "Cc", "Zl", "Zp", "Cs")), min_size=1, max_size=40
    ).filter(lambda a: check_area(a) is None),
    st.integers(0, 2**63 - 1),
    st.integers(1, 2**63 - 1),
)
def test_round_trip(area: str, ts_ms: int, events: int) -> None:
    alarm = AreaOutage(area, ts_ms, events)
    assert decode_alarm(alarm.to_json()) == alarm


@pytest.mark.parametrize(
    "doc",
    [
        {"v": 2, "type": "area_outage", "area": "A", "ts_ms": 1, "events": 1},
        {"v": 1, "type": "ack", "area": "A", "ts_ms": 1, "events": 1},
        {"v": 1, "type": "area_outage", "ts_ms": 1, "events": 1},
        {"v": 1, "type": "area_outage", "area": "", "ts_ms": 1, "events": 1},
        {"v": 1, "type": "area_outage", "area": "T A", "ts_ms": 1, "events": 1},
        {"v": 1, "type": "area_outage", "area": 7, "ts_ms": 1, "events": 1},
        {"v": 1, "type": "area_outage", "area": "A", "ts_ms": -1, "events": 1},
        {"v": 1, "type": "area_outage", "area": "A", "ts_ms": 1.5, "events": 1},
        {"v": 1, "type": "area_outage", "area": "A", "ts_ms": True, "events": 1},
        {"v": 1, "type": "area_outage", "area": "A", "ts_ms": 1, "events": 0},
        {"v": 1, "type": "area_outage", "area": "A", "ts_ms": 1, "events": 2**63},
        {"v": 1, "type": "area_outage", "area": "A", "ts_ms": 1, "events": 1, "extra": 1},
    ],
)
def test_malformed_alarms_are_refused(doc: dict[str, object]) -> None:
    with pytest.raises(PayloadError):
        decode_alarm(json.dumps(doc).encode())


@pytest.mark.parametrize("raw", [b"", b"\xff", b"[]", b"{", b"null", b"x" * (MAX_ALARM_BYTES + 1)])
def test_garbage_is_refused(raw: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_alarm(raw)
