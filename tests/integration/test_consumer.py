"""MqttConsumer against the real mosquitto: delivery, manual ack, redelivery, shared subs, back-pressure.

Every test uses its own client ids and topics (the broker is shared by the session) and ends the
MQTT 5 sessions it made, so no persistent session outlives its test.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.mqtt.consumer import ConsumerConfig, Message, MqttConsumer
from protocols.errors import TransportError
from simulators.servers import Mosquitto

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 10.0


def _uid() -> str:
    return uuid.uuid4().hex[:10]


class Publisher:
    """A plain paho QoS 1 publisher (the edge side is not under test here)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"pub-{_uid()}", protocol=mqtt.MQTTv5
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payloads: list[bytes]) -> None:
        infos = [self.client.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(TIMEOUT_S)
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[Publisher]:
    pub = Publisher(mosquitto)
    yield pub
    pub.close()


def _config(broker: Mosquitto, topics: tuple[str, ...], **kw: object) -> ConsumerConfig:
    kw.setdefault("client_id", f"ingest-{_uid()}")
    kw.setdefault("reconnect_min_s", 1)
    kw.setdefault("reconnect_max_s", 2)
    return ConsumerConfig(url=broker.url, topics=topics, **kw)  # type: ignore[arg-type]


async def _take(consumer: MqttConsumer, n: int, *, ack: bool = True, delay_s: float = 0.0) -> list[Message]:
    got = []
    for _ in range(n):
        msg = await consumer.get(TIMEOUT_S)
        got.append(msg)
        if delay_s:
            await asyncio.sleep(delay_s)
        if ack:
            await consumer.ack(msg)
    return got


async def _nothing_more(consumer: MqttConsumer, wait_s: float = 0.5) -> bool:
    try:
        await consumer.get(wait_s)
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_qos1_messages_arrive_and_are_acked(mosquitto, publisher, protocol: str) -> None:
    topic = f"ami/v1/gw-{_uid()}/up/readings"
    payloads = [f"batch-{i}".encode() for i in range(20)]
    async with MqttConsumer(_config(mosquitto, (topic,), protocol=protocol)) as consumer:
        publisher.publish(topic, payloads)
        got = await _take(consumer, 20)
        assert [m.payload for m in got] == payloads
        assert {(m.topic, m.qos) for m in got} == {(topic, 1)}
        assert consumer.stats.acked == 20 and consumer.stats.unacked == 0
        await consumer.aclose(end_session=True)


_CHILD = """
import asyncio, sys
sys.path.insert(0, {root!r})
from ingest.mqtt.consumer import ConsumerConfig, MqttConsumer

async def main():
    cfg = ConsumerConfig(url=sys.argv[1], client_id=sys.argv[2], topics=(sys.argv[3],))
    async with MqttConsumer(cfg) as consumer:
        print("ready", flush=True)
        async for msg in consumer:
            if msg.payload == b"m0":
                await consumer.ack(msg)  # only m0 is acknowledged; m1, m2 stay in flight
            print(msg.payload.decode(), flush=True)

asyncio.run(main())
"""


def _line_reader(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in stdout], daemon=True).start()
    return lines


async def test_unacked_messages_are_redelivered_after_sigkill(mosquitto, publisher, tmp_path) -> None:
    gw, client_id = f"gw-{_uid()}", f"ingest-{_uid()}"
    topic_filter = f"ami/v1/{gw}/up/+"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=str(ROOT)))
    proc = subprocess.Popen(
        [sys.executable, str(script), mosquitto.url, client_id, topic_filter],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines = _line_reader(proc)
        assert lines.get(timeout=TIMEOUT_S) == "ready"
        publisher.publish(f"ami/v1/{gw}/up/readings", [b"m0", b"m1", b"m2"])
        assert [lines.get(timeout=TIMEOUT_S) for _ in range(3)] == ["m0", "m1", "m2"]
        await asyncio.sleep(1.0)  # let the child's paho thread put m0's PUBACK on the wire
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL

    async with MqttConsumer(_config(mosquitto, (topic_filter,), client_id=client_id)) as consumer:
        again = await _take(consumer, 2)
        assert [m.payload for m in again] == [b"m1", b"m2"]
        assert all(m.dup for m in again)  # the broker's redelivery, not a new publish
        assert await _nothing_more(consumer)  # m0 was acknowledged: not redelivered
        await consumer.aclose(end_session=True)


async def test_unacked_message_survives_broker_restart_and_stale_ack_is_not_sent(
    mosquitto, publisher
) -> None:
    topic = f"ami/v1/gw-{_uid()}/up/readings"
    async with MqttConsumer(_config(mosquitto, (topic,))) as consumer:
        publisher.publish(topic, [b"a"])
        (first,) = await _take(consumer, 1, ack=False)
        publisher.close()
        mosquitto.stop()  # clean stop: mosquitto saves the session with "a" in flight
        mosquitto.start()
        again = await consumer.get(TIMEOUT_S)  # paho reconnected on its own
        assert (again.payload, again.dup) == (b"a", True)
        assert consumer.stats.connects >= 2 and again.generation > first.generation
        await consumer.ack(first)  # from the lost connection: must not be sent
        assert consumer.stats.stale_acks == 1
        await consumer.ack(again)
        fresh = Publisher(mosquitto)
        try:
            fresh.publish(topic, [b"b"])
            (b,) = await _take(consumer, 1)
        finally:
            fresh.close()
        assert b.payload == b"b"
        assert consumer.stats.acked == 2
        await consumer.aclose(end_session=True)


async def test_a_shared_subscription_is_renewed_after_a_broker_restart(mosquitto, publisher) -> None:
    # mosquitto 2.0.11 resumes a session after a restart (session_present) but does not restore its
    # shared subscriptions: unless the consumer subscribes again on every connect, nothing
    # published after the restart reaches it.
    shared = f"$share/ingest-{_uid()}/ami/v1/+/up/readings"
    topic = f"ami/v1/gw-{_uid()}/up/readings"
    async with MqttConsumer(_config(mosquitto, (shared,))) as consumer:
        assert consumer.stats.subacks == 1
        publisher.close()
        mosquitto.stop()  # SIGTERM: the session is saved with its subscriptions
        mosquitto.start()  # a new process on the same port and persistence file
        deadline = time.monotonic() + TIMEOUT_S
        while consumer.stats.subacks < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (consumer.stats.connects, consumer.stats.subacks) == (2, 2)
        fresh = Publisher(mosquitto)
        try:
            fresh.publish(topic, [b"after the restart 1", b"after the restart 2"])
            got = await _take(consumer, 2)
        finally:
            fresh.close()
        assert [m.payload for m in got] == [b"after the restart 1", b"after the restart 2"]
        await consumer.aclose(end_session=True)


async def test_shared_subscription_splits_the_stream(mosquitto, publisher) -> None:
    # The production filter shape; the group name is unique so that no other test's session
    # can be a member of this group on the session-wide broker.
    shared = f"$share/ingest-{_uid()}/ami/v1/+/up/readings"
    prefix = f"gw-{_uid()}"
    n = 60
    async with (
        MqttConsumer(_config(mosquitto, (shared,))) as a,
        MqttConsumer(_config(mosquitto, (shared,))) as b,
    ):
        received: dict[str, list[bytes]] = {"a": [], "b": []}

        async def drain(name: str, consumer: MqttConsumer) -> None:
            while sum(map(len, received.values())) < n:
                try:
                    msg = await consumer.get(0.2)
                except TimeoutError:
                    continue
                received[name].append(msg.payload)
                await consumer.ack(msg)

        for i in range(n):
            publisher.publish(f"ami/v1/{prefix}-{i % 4}/up/readings", [f"{i}".encode()])
        async with asyncio.timeout(TIMEOUT_S), asyncio.TaskGroup() as tg:
            tg.create_task(drain("a", a), name="drain-a")
            tg.create_task(drain("b", b), name="drain-b")
        assert received["a"] and received["b"]  # each worker got some
        assert sorted(received["a"] + received["b"]) == sorted(f"{i}".encode() for i in range(n))  # all, once
        assert await _nothing_more(a, 0.3) and await _nothing_more(b, 0.3)
        await a.aclose(end_session=True)
        await b.aclose(end_session=True)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_bounded_queue_stops_intake_without_loss(mosquitto, publisher, protocol: str) -> None:
    topic = f"ami/v1/gw-{_uid()}/up/readings"
    n, bound = 80, 4
    payloads = [f"{i:03d}".encode() for i in range(n)]
    cfg = _config(mosquitto, (topic,), protocol=protocol, queue_max=bound)
    async with MqttConsumer(cfg) as consumer:
        publisher.publish(topic, payloads)  # all accepted by the broker before we consume
        await asyncio.sleep(0.5)
        # Intake stopped at the bound, and nothing was discarded to get there:
        assert consumer.queued == bound
        if protocol == "5":
            # Receive Maximum: the broker sent exactly `bound` and waits for acks.
            assert (consumer.stats.received, consumer.stats.blocked_waits) == (bound, 0)
        else:
            # No Receive Maximum in 3.1.1: mosquitto sends up to its own in-flight cap (20);
            # paho's thread holds the next message, waiting for a slot, and reads no further.
            assert (consumer.stats.received, consumer.stats.blocked_waits) == (bound + 1, 1)
        got = await _take(consumer, n, delay_s=0.005)  # a slow pipeline
        assert [m.payload for m in got] == payloads  # nothing lost, nothing reordered
        assert await _nothing_more(consumer)
        assert consumer.stats.queue_high_water == bound
        assert consumer.stats.acked == n
        await consumer.aclose(end_session=True)


async def test_mqtts_with_ca_and_password(mosquitto_secure) -> None:
    broker = mosquitto_secure
    topic = f"ami/v1/gw-1/up/readings/{_uid()}"
    cfg = _config(broker, (topic,), username="headend", password=broker.passwords["headend"],
                  ca_file=str(broker.ca_file))  # fmt: skip
    assert cfg.url.startswith("mqtts://")
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{_uid()}", protocol=mqtt.MQTTv5)
    pub.tls_set(ca_certs=str(broker.ca_file))
    pub.username_pw_set("gw-1", broker.passwords["gw-1"])
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        async with MqttConsumer(cfg) as consumer:
            pub.publish(topic, b"over tls", qos=1).wait_for_publish(TIMEOUT_S)
            (msg,) = await _take(consumer, 1)
            assert msg.payload == b"over tls"
            await consumer.aclose(end_session=True)
    finally:
        pub.disconnect()
        pub.loop_stop()
    wrong = _config(broker, (topic,), username="headend", password="wrong", ca_file=str(broker.ca_file),
                    connect_timeout_s=3.0)  # fmt: skip
    with pytest.raises(TransportError, match="refused"):
        async with MqttConsumer(wrong):
            pass


async def test_connect_failure_is_a_transport_error(tmp_path) -> None:
    from simulators.servers import free_port

    cfg = ConsumerConfig(
        url=f"mqtt://127.0.0.1:{free_port()}", client_id=f"x-{_uid()}", connect_timeout_s=1.0
    )
    started = time.monotonic()
    with pytest.raises(TransportError):
        async with MqttConsumer(cfg):
            pass
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_resumed_session_with_a_backlog_bigger_than_the_queue_connects(
    mosquitto, publisher, protocol: str
) -> None:
    # Regression: a resumed session's backlog is delivered before the SUBACK of the renewed
    # subscription. With more than queue_max of it, paho's thread waited for a queue slot inside
    # on_message and never read the SUBACK, so connect() timed out (3.1.1: mosquitto's in-flight
    # window of 20 is above the bound; 5: the in-flight messages of the old connection).
    topic = f"ami/v1/gw-{_uid()}/up/readings"
    n, bound = 60, 4
    cfg = _config(mosquitto, (topic,), protocol=protocol, queue_max=bound, connect_timeout_s=5.0)
    async with MqttConsumer(cfg) as consumer:
        pass  # the session (and its subscription) stays on the broker
    payloads = [f"{i:03d}".encode() for i in range(n)]
    publisher.publish(topic, payloads)  # queued for the offline session
    consumer = MqttConsumer(cfg)
    started = time.monotonic()
    await consumer.connect()
    assert time.monotonic() - started < 3.0
    try:
        await asyncio.sleep(0.5)
        assert consumer.queued <= bound  # back-pressure holds while nobody consumes
        got = await _take(consumer, n, delay_s=0.002)
        assert [m.payload for m in got] == payloads  # nothing lost, nothing reordered
        assert await _nothing_more(consumer)
        assert consumer.stats.queue_high_water <= bound
    finally:
        await consumer.aclose(end_session=True)
