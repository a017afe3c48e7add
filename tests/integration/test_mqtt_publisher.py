"""The head-end's one MQTT publisher (``ingest.mqtt.publisher``, used by the ingest worker and by
fee control) against the real mosquitto: PUBACK-awaited delivery, waiting for the connection,
TransportError when the broker stays away, reconnection, and TLS with a password."""

from __future__ import annotations

import asyncio
import uuid

import aiomqtt
import pytest

from ingest.mqtt.publisher import MqttPublisher
from ingest.mqtt.settings import MqttSettings
from protocols.errors import TransportError
from simulators.servers import HEADEND_USER, Mosquitto

pytestmark = pytest.mark.integration


async def _collect(broker: Mosquitto, topic: str, n: int, ready: asyncio.Event) -> list[bytes]:
    tls = aiomqtt.TLSParameters(ca_certs=str(broker.ca_file)) if broker.secure else None
    user = HEADEND_USER if broker.secure else None
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"sub-{uuid.uuid4().hex[:8]}",
        username=user, password=broker.passwords.get(user or ""), tls_params=tls,
    ) as client:  # fmt: skip
        await client.subscribe(topic, qos=1)
        ready.set()
        got: list[bytes] = []
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            got.append(message.payload)
            if len(got) == n:
                return got
    raise AssertionError("unreachable")


async def _delivered(broker: Mosquitto, settings: MqttSettings, n: int) -> list[bytes]:
    topic = f"ami/v1/agg/test/{uuid.uuid4().hex[:8]}"
    ready = asyncio.Event()
    collector = asyncio.create_task(_collect(broker, topic, n, ready))
    await asyncio.wait_for(ready.wait(), 10)
    async with MqttPublisher(settings, f"pub-{uuid.uuid4().hex[:8]}") as pub:
        await pub.publish(topic, b"one")  # waits for the connection, then for the PUBACK
        await pub.publish_many([(topic, str(i).encode()) for i in range(n - 1)])
        assert pub.connected
    return await asyncio.wait_for(collector, 10)


def test_publish_resolves_on_puback_and_the_broker_delivers(mosquitto: Mosquitto) -> None:
    got = asyncio.run(_delivered(mosquitto, MqttSettings(url=mosquitto.url), 50))
    assert got == [b"one", *(str(i).encode() for i in range(49))]


def test_tls_with_password(mosquitto_secure: Mosquitto) -> None:
    broker = mosquitto_secure
    settings = MqttSettings(
        url=broker.url,
        username=HEADEND_USER,
        password=broker.passwords[HEADEND_USER],
        ca_file=str(broker.ca_file),
    )
    assert asyncio.run(_delivered(broker, settings, 3)) == [b"one", b"0", b"1"]


def test_broker_away_raises_then_reconnects(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        settings = MqttSettings(url=mosquitto.url, publish_timeout_s=1.0)
        async with MqttPublisher(settings, f"pub-{uuid.uuid4().hex[:8]}") as pub:
            await pub.publish("ami/v1/agg/test/x", b"up")
            mosquitto.stop()
            with pytest.raises(TransportError):
                await pub.publish("ami/v1/agg/test/x", b"down")
            mosquitto.start()
            assert await pub.wait_connected(40)  # paho reconnects by itself (1..30 s back-off)
            await pub.publish("ami/v1/agg/test/x", b"back")

    asyncio.run(main())
