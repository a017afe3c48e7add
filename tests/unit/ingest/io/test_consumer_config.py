"""ConsumerConfig: the [ingest.mqtt] section loads from TOML data and rejects bad values by key."""

from __future__ import annotations

import pytest

from ingest.mqtt.consumer import ConsumerConfig, Message, MqttConsumer
from protocols.config import load
from protocols.errors import ConfigError


def test_defaults_are_a_persistent_shared_qos1_subscription() -> None:
    cfg = load(ConsumerConfig, {})
    assert cfg.topics == ("$share/ingest/ami/v1/+/up/readings",)
    assert (cfg.qos, cfg.protocol, cfg.session_expiry_s > 0, cfg.queue_max) == (1, "5", True, 64)


def test_loads_tls_and_credentials() -> None:
    cfg = load(
        ConsumerConfig,
        {"url": "mqtts://broker:8883", "username": "headend", "password": "pw", "ca_file": "/etc/ca.pem",
         "topics": ["$share/ingest/ami/v1/+/up/readings", "ami/v1/+/up/events"], "protocol": "3.1.1"},
    )  # fmt: skip
    assert cfg.topics[1] == "ami/v1/+/up/events" and cfg.protocol == "3.1.1"
    with pytest.raises(ConfigError, match="ca_file"):  # surfaces at start, not at first connect
        MqttConsumer(cfg)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"url": "http://x"}, "url"),
        ({"client_id": ""}, "client_id"),
        ({"topics": []}, "topics"),
        ({"qos": 3}, "qos"),
        ({"queue_max": 0}, "queue_max"),
        ({"receive_maximum": 70000}, "receive_maximum"),
        ({"protocol": "4"}, "protocol"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_rejects_bad_values(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(ConsumerConfig, data)


async def test_qos0_ack_is_a_no_op() -> None:
    consumer = MqttConsumer(ConsumerConfig())
    await consumer.ack(Message("t", b"", 0, 0))
    assert (consumer.stats.acked, consumer.stats.stale_acks) == (0, 0)
