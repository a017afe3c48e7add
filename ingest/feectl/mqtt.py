"""Fee control's MQTT link: topics, the subscribing session, and the publishing session.

Both sessions are the head-end's shared MQTT adapter, on the connection ``[service.mqtt]``
(:class:`~ingest.mqtt.settings.MqttSettings`): receiving is
:class:`~ingest.mqtt.consumer.MqttConsumer` (paho-mqtt, ``manual_ack=True``, persistent session),
so the service acknowledges a message only after the ledger transaction for it committed (STYLE
H8); publishing (signed commands, notifications) is :class:`~ingest.mqtt.publisher.MqttPublisher`,
which resolves on the broker's PUBACK or raises :class:`~protocols.errors.TransportError`. The
service only publishes things whose repetition is harmless (commands carry a fixed id the edge
de-duplicates; notifications carry the journal's decision), and what must be (re)sent lives in
the ledger (``ISSUED`` orders), not in the broker or in paho's memory.
"""

from __future__ import annotations

from ingest.mqtt.consumer import ConsumerConfig
from ingest.mqtt.publisher import MqttPublisher
from protocols import topics
from protocols.aggregates import MAX_MESSAGE_BYTES

from .config import ServiceConfig

__all__ = [
    "INTERVALS_FILTER",
    "NOTIFICATIONS_TOPIC",
    "RESULTS_FILTER",
    "command_topic",
    "consumer_config",
    "gateway_of_intervals_topic",
    "gateway_of_result_topic",
    "publisher",
]

INTERVALS_FILTER = topics.agg_all("intervals")
RESULTS_FILTER = topics.CMD_RESULTS_ALL
NOTIFICATIONS_TOPIC = topics.NOTIFICATIONS


def command_topic(gateway: str) -> str:
    return topics.command(gateway)


def gateway_of_intervals_topic(topic: str) -> str | None:
    """``ami/v1/agg/intervals/{gateway}`` → ``gateway`` (not yet checked); anything else → None."""
    return topics.agg_gateway_of("intervals", topic)


def gateway_of_result_topic(topic: str) -> str | None:
    """``ami/v1/{gateway}/up/cmd-result`` → ``gateway``; anything else → None."""
    return topics.cmd_result_gateway_of(topic)


def consumer_config(cfg: ServiceConfig) -> ConsumerConfig:
    """The subscribing session: both filters at QoS 1, persistent, manual acknowledgement."""
    return cfg.mqtt.consumer_config(cfg.mqtt.client_id, (INTERVALS_FILTER, RESULTS_FILTER), MAX_MESSAGE_BYTES)


def publisher(cfg: ServiceConfig) -> MqttPublisher:
    """The publishing session beside it: clean, ``<client_id>-pub``."""
    return MqttPublisher(cfg.mqtt, f"{cfg.mqtt.client_id}-pub")
