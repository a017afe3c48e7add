"""The head-end's MQTT connection settings: one dataclass, the shape shared by ingest's ``[mqtt]``
(:class:`ingest.config.MqttSection`) and fee control's ``[service.mqtt]``
(:class:`ingest.feectl.config.MqttLink`), which add only their own keys and defaults.

:meth:`MqttSettings.consumer_config` maps it onto the manual-ack consumer
(:class:`~ingest.mqtt.consumer.ConsumerConfig`); :class:`~ingest.mqtt.publisher.MqttPublisher`
takes it as it is. Pure data; raises ``ValueError("field: reason")`` (the config loader names the
key).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Literal

from ingest.mqtt.consumer import ConsumerConfig

__all__ = ["MqttSettings"]


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """A broker connection. ``client_id`` names the persistent subscribing session; publishers
    connect beside it with a derived id (``<client_id>-...-pub``) and a clean session."""

    url: str = "mqtt://127.0.0.1:1883"  # mqtt:// or mqtts:// (TLS, verified against ca_file)
    client_id: str = "amigw"
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    keepalive_s: int = 60
    session_expiry_s: int = 3600  # how long the broker keeps a stopped subscriber's session
    queue_max: int = 16  # messages in flight to the subscriber (the MQTT 5 Receive Maximum)
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 30.0  # no PUBACK within this: the publish failed

    def __post_init__(self) -> None:
        if urllib.parse.urlsplit(self.url).scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"url: expected mqtt:// or mqtts://, got {self.url!r}")
        if not self.client_id:
            raise ValueError("client_id: a persistent session needs a stable, non-empty client id")
        if self.password is not None and self.username is None:
            raise ValueError("password: needs username")
        for name in (
            "keepalive_s",
            "session_expiry_s",
            "queue_max",
            "connect_timeout_s",
            "publish_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")

    def consumer_config(
        self, client_id: str, topics: tuple[str, ...], max_payload_bytes: int, qos: int = 1
    ) -> ConsumerConfig:
        """The manual-ack, persistent-session consumer on this connection."""
        return ConsumerConfig(
            url=self.url,
            client_id=client_id,
            topics=topics,
            qos=qos,
            protocol=self.protocol,
            username=self.username,
            password=self.password,
            ca_file=self.ca_file,
            keepalive_s=self.keepalive_s,
            session_expiry_s=self.session_expiry_s,
            queue_max=self.queue_max,
            max_payload_bytes=max_payload_bytes,
            connect_timeout_s=self.connect_timeout_s,
        )
