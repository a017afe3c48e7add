"""The shipped broker configuration: printed by ``amigw config sample``, limits in step with the
payload bound (the integration tests start mosquitto from it)."""

from __future__ import annotations

import pytest

from gateway.cli import main
from ingest.broker import ACL, SAMPLE, limits
from protocols.payload import MAX_PAYLOAD_BYTES


def test_config_sample_prints_the_broker_configuration_and_acl(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "sample", "mosquitto"]) == 0
    assert capsys.readouterr().out == SAMPLE
    assert main(["config", "sample", "mosquitto-acl"]) == 0
    assert capsys.readouterr().out == ACL


def test_the_limits_are_the_files_and_match_the_payload_bound() -> None:
    lim = limits()
    assert set(lim) == {
        "max_queued_messages", "max_queued_bytes", "queue_qos0_messages", "message_size_limit",
        "max_packet_size", "persistent_client_expiration",
    }  # fmt: skip
    assert int(lim["message_size_limit"]) == MAX_PAYLOAD_BYTES < int(lim["max_packet_size"])
    assert int(lim["max_queued_messages"]) > 1000  # mosquitto's default


def test_the_acl_grants_gateways_only_their_uplink_status_and_downlink() -> None:
    rules = [line for line in ACL.splitlines() if line.startswith("pattern")]
    assert rules == [
        "pattern write ami/v1/%u/up/#",
        "pattern write ami/v1/%u/status",
        "pattern read ami/v1/%u/down/#",
    ]
