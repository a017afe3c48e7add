"""One log layout: message, then key=value fields, whether the fields came as ``extra`` or were
formatted into the message (as ingest and fee control do)."""

from __future__ import annotations

import logging

from gateway.logs import KeyValueFormatter, kv, split_pairs


def _line(msg: str, *args: object, **extra: object) -> str:
    record = logging.getLogger("amigw.test").makeRecord(
        "amigw.test", logging.WARNING, __file__, 1, msg, args, None, extra=extra or None
    )
    return KeyValueFormatter().format(record).split(" ", 1)[1]  # without the timestamp


def test_pairs_formatted_into_the_message_become_fields() -> None:
    line = _line(
        "intervals dropped topic=%s reason=%s raw=%s", "ami/v1/agg/intervals/gw-1", "bad thing: 2^62", "00ff"
    )
    assert (
        line
        == 'warning amigw.test "intervals dropped" topic=ami/v1/agg/intervals/gw-1 reason="bad thing: 2^62" raw=00ff'
    )


def test_extra_fields_render_the_same_way() -> None:
    assert (
        _line("bus down", **kv(bus="b 1", port="/dev/ttyUSB7"))
        == 'warning amigw.test "bus down" bus="b 1" port=/dev/ttyUSB7'
    )
    assert _line("meter read failing") == 'warning amigw.test "meter read failing"'


def test_split_pairs() -> None:
    assert split_pairs("x = 3 is not a pair") == ("x = 3 is not a pair", [])
    assert split_pairs("sent url=mqtt://h:1 q=a=b") == ("sent", [("url", "mqtt://h:1"), ("q", "a=b")])
    assert split_pairs("id=1") == ("", [("id", "1")])
