"""Fee control's MQTT link: the subscribing session and the publishing session (topics come
from :mod:`protocols.topics`).

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

__all__ = ["consumer_config", "publisher"]


def consumer_config(cfg: ServiceConfig) -> ConsumerConfig:
    """The subscribing session: the intervals of every gateway, every gateway's command results
    and ingest's alarms, QoS 1, persistent, manual acknowledgement."""
    filters = (topics.agg_all("intervals"), topics.CMD_RESULTS_ALL, topics.ALARMS)
    return cfg.mqtt.consumer_config(cfg.mqtt.client_id, filters, MAX_MESSAGE_BYTES)


def publisher(cfg: ServiceConfig) -> MqttPublisher:
    """The publishing session beside it: clean, ``<client_id>-pub``."""
    return MqttPublisher(cfg.mqtt, f"{cfg.mqtt.client_id}-pub")
