"""The topic tree is built and parsed in one place, and the parsers invert the builders."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from protocols import topics
from protocols.errors import PayloadError


def test_builders_spell_the_documented_tree() -> None:
    assert topics.readings("gw-1") == "ami/v1/gw-1/up/readings"
    assert topics.events("gw-1") == "ami/v1/gw-1/up/events"
    assert topics.cmd_result("gw-1") == "ami/v1/gw-1/up/cmd-result"
    assert topics.status("gw-1") == "ami/v1/gw-1/status"
    assert topics.command("gw-1") == "ami/v1/gw-1/down/cmd"
    assert topics.ack("gw-1") == "ami/v1/gw-1/down/ack"
    assert topics.agg("daily", "gw-1") == "ami/v1/agg/daily/gw-1"
    assert topics.agg_all("intervals") == "ami/v1/agg/intervals/+"
    assert topics.READINGS_SHARED == "$share/ingest/ami/v1/+/up/readings"
    assert topics.CMD_RESULTS_ALL == "ami/v1/+/up/cmd-result"


@pytest.mark.parametrize("gateway", ["gw-1", "A.b_c:9", "x" * 128])
def test_parsers_invert_the_builders(gateway: str) -> None:
    assert topics.check_gateway_id(gateway) is None
    for build in (topics.readings, topics.events, topics.cmd_result, topics.status, topics.ack):
        assert topics.gateway_of(build(gateway)) == gateway
    assert topics.cmd_result_gateway_of(topics.cmd_result(gateway)) == gateway
    assert topics.agg_gateway_of("intervals", topics.agg("intervals", gateway)) == gateway


@pytest.mark.parametrize(
    "topic",
    [
        "ami/v1/agg/intervals/gw-1",
        "ami/v2/gw-1/up/readings",
        "ami/v1//up/readings",
        "ami/v1",
        "other/v1/gw-1/up/readings",
    ],
)
def test_gateway_of_refuses_what_names_no_gateway(topic: str) -> None:
    with pytest.raises(PayloadError):
        topics.gateway_of(topic)


@pytest.mark.parametrize(
    ("parse", "topic"),
    [
        (topics.cmd_result_gateway_of, "ami/v1/gw-1/up/readings"),
        (topics.cmd_result_gateway_of, "ami/v1/gw-1/up/cmd-result/x"),
        (topics.cmd_result_gateway_of, "ami/v1//up/cmd-result"),
        (lambda t: topics.agg_gateway_of("intervals", t), "ami/v1/agg/intervals/"),
        (lambda t: topics.agg_gateway_of("intervals", t), "ami/v1/agg/intervals/gw/1"),
        (lambda t: topics.agg_gateway_of("intervals", t), "ami/v1/agg/daily/gw-1"),
    ],
)
def test_the_optional_parsers_answer_none_for_other_topics(
    parse: Callable[[str], str | None], topic: str
) -> None:
    assert parse(topic) is None


@pytest.mark.parametrize("gateway", ["agg", "AGG", "+", "#", "down", "", "-lead", "a/b", "x" * 129])
def test_reserved_and_malformed_gateway_ids_are_refused(gateway: str) -> None:
    assert topics.check_gateway_id(gateway) is not None
