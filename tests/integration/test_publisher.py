"""The edge publisher against a real mosquitto (DESIGN §4-5, §8): PUBACK, replay through a broker
restart, last-will, TLS with passwords, the MQTT 5 -> 3.1.1 fallback; plus its pure helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from gateway.outbox import Outbox
from gateway.publisher import MAX_WINDOW, ConnectionLostError, Publisher, backoff_s, parse_broker_url
from protocols.errors import ConfigError, TransportError, TransportTimeout
from protocols.payload import decode_status
from simulators.servers import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
integration = pytest.mark.integration


def _gw() -> str:
    return f"gw-t{uuid.uuid4().hex[:8]}"


class Collector:
    """A persistent-session QoS 1 subscriber that reconnects by itself (the head-end's view)."""

    def __init__(self, broker: Mosquitto, topic: str, *, user: str | None = None) -> None:
        self.broker, self.topic, self.user = broker, topic, user
        self.client_id = f"sub-{uuid.uuid4().hex[:10]}"
        self.got: list[bytes] = []
        self.ready = asyncio.Event()
        self._changed = asyncio.Event()

    async def run(self) -> None:
        tls = aiomqtt.TLSParameters(ca_certs=str(self.broker.ca_file)) if self.broker.secure else None
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host, self.broker.port, identifier=self.client_id, clean_session=False,
                    username=self.user, password=self.broker.passwords.get(self.user or ""), tls_params=tls,
                ) as client:  # fmt: skip
                    await client.subscribe(self.topic, qos=1)
                    self.ready.set()
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        self.got.append(message.payload)
                        self._changed.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    async def wait_for(self, predicate: Callable[[list[bytes]], bool], timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate(self.got):
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def collecting(broker: Mosquitto, topic: str, *, user: str | None = None):  # type: ignore[no-untyped-def]
    collector = Collector(broker, topic, user=user)
    task = asyncio.create_task(collector.run(), name="collector")
    try:
        async with asyncio.timeout(10):
            await collector.ready.wait()
        yield collector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- pure helpers --------------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    class Fixed:
        def __init__(self, value: float) -> None:
            self.value = value

        def random(self) -> float:
            return self.value

    low, high = Fixed(0.0), Fixed(1.0)
    assert [backoff_s(a, 0.5, 60, high) for a in range(9)] == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    assert [backoff_s(a, 0.5, 60, low) for a in range(3)] == [0.25, 0.5, 1]
    assert backoff_s(10_000, 0.5, 60, high) == 60  # no overflow for a gateway offline for weeks
    rng = random.Random(7)
    delays = [backoff_s(5, 1, 30, rng) for _ in range(1000)]
    assert min(delays) >= 15 and max(delays) <= 30 and len({round(d, 3) for d in delays}) > 900
    with pytest.raises(ValueError):
        backoff_s(-1, 1, 2, rng)


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://10.0.0.1") == (False, "10.0.0.1", 1883)
    assert parse_broker_url("mqtts://broker.example:9000") == (True, "broker.example", 9000)
    assert parse_broker_url("mqtts://broker.example") == (True, "broker.example", 8883)
    for bad in ("http://x", "mqtt://", "mqtt://x:notaport"):
        with pytest.raises(ConfigError) as info:
            parse_broker_url(bad)
        assert info.value.key_path == "mqtt.url"


async def test_window_is_bounded_by_packet_ids() -> None:
    with pytest.raises(ValueError, match="window"):
        Publisher("mqtt://127.0.0.1:1", gateway="g", window=MAX_WINDOW + 1)
    assert MAX_WINDOW < 65_535


# -- against mosquitto ---------------------------------------------------------------------------


@integration
async def test_publish_resolves_on_puback_and_the_subscriber_gets_it(mosquitto: Mosquitto) -> None:
    gw = _gw()
    async with collecting(mosquitto, f"ami/v1/{gw}/#") as sub, Publisher(mosquitto.url, gateway=gw) as pub:
        await pub.wait_connected(10)
        assert pub.protocol_version == 5  # mosquitto offers MQTT 5
        await pub.publish(f"ami/v1/{gw}/up/readings", b"batch-1")
        await sub.wait_for(lambda got: b"batch-1" in got)
        statuses = [decode_status(p) for p in sub.got if p.startswith(b'{"v":1,"type":"status"')]
        assert statuses and statuses[0].online and statuses[0].gateway == gw


@integration
async def test_commands_arrive_through_the_iterator(mosquitto: Mosquitto) -> None:
    gw = _gw()
    async with Publisher(mosquitto.url, gateway=gw) as pub:
        await pub.wait_connected(10)
        commands = pub.commands()
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as headend:
            await headend.publish(f"ami/v1/{gw}/down/cmd", b'{"id":"c1"}', qos=1)
        async with asyncio.timeout(5):
            assert await anext(commands) == b'{"id":"c1"}'


@integration
async def test_publish_without_a_broker_raises_a_transport_error(mosquitto: Mosquitto) -> None:
    gw = _gw()
    async with Publisher(mosquitto.url, gateway=gw, backoff_base_s=0.1, backoff_cap_s=0.5) as pub:
        await pub.wait_connected(10)
        mosquitto.kill()
        with pytest.raises(ConnectionLostError) as info:
            async with asyncio.timeout(10):
                while True:  # the first publishes may still reach the dying socket's buffer
                    await pub.publish(f"ami/v1/{gw}/up/readings", b"x")
                    await asyncio.sleep(0.05)
        assert isinstance(info.value, TransportError)
        mosquitto.start()
        await pub.wait_connected(15)  # reconnects with back-off by itself
        await pub.publish(f"ami/v1/{gw}/up/readings", b"after")
        assert pub.connects == 2


@integration
async def test_every_outbox_row_arrives_across_a_broker_restart(mosquitto: Mosquitto, tmp_path: Path) -> None:
    gw, n = _gw(), 10_000
    topic = f"ami/v1/{gw}/up/readings"
    with Outbox(tmp_path / "ob.db", max_bytes=1 << 30) as outbox:
        for i in range(n):
            outbox.add(topic, b"row-%06d" % i + b"." * 90, kind="register")
        async with collecting(mosquitto, topic) as sub:
            async with Publisher(
                mosquitto.url, gateway=gw, window=200, backoff_base_s=0.1, backoff_cap_s=0.5
            ) as pub:

                async def deliver() -> None:
                    while len(outbox):
                        await pub.wait_connected()
                        with contextlib.suppress(ConnectionLostError):
                            await pub.drain(outbox)

                delivery = asyncio.create_task(deliver())
                async with asyncio.timeout(30):
                    while outbox.stats().published < 1_000:
                        await asyncio.sleep(0.005)
                mosquitto.stop()  # clean broker shutdown mid-drain: sessions are saved
                interrupted_at = outbox.stats().published
                await asyncio.sleep(0.5)
                mosquitto.start()
                async with asyncio.timeout(60):
                    await delivery
            await sub.wait_for(lambda got: len(set(got)) >= n, timeout_s=60)
        assert interrupted_at < n, "the drain finished before the broker stopped: nothing was tested"
        assert set(sub.got) == {b"row-%06d" % i + b"." * 90 for i in range(n)}  # at least once each
        s = outbox.stats()
        assert (len(outbox), s.pending, s.in_flight, s.published, s.dropped_total) == (0, 0, 0, n, 0)
        assert pub.connects == 2


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.publisher import Publisher

    async def main():
        async with Publisher(sys.argv[1], gateway=sys.argv[2]) as pub:
            await pub.wait_connected(10)
            print("ready", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


@integration
async def test_the_last_will_marks_the_gateway_offline_when_the_agent_dies(mosquitto: Mosquitto) -> None:
    gw = _gw()
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mosquitto.url, gw],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)
        assert line.strip() == b"ready"
        async with collecting(mosquitto, f"ami/v1/{gw}/status") as sub:
            await sub.wait_for(lambda got: bool(got))
            assert decode_status(sub.got[-1]).online  # retained online status
            proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must send the will
            await sub.wait_for(lambda got: not decode_status(got[-1]).online)
        # retained: a late subscriber sees the gateway offline too
        async with collecting(mosquitto, f"ami/v1/{gw}/status") as late:
            await late.wait_for(lambda got: bool(got))
            assert not decode_status(late.got[-1]).online
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


@integration
async def test_a_clean_exit_publishes_offline_status(mosquitto: Mosquitto) -> None:
    gw = _gw()
    async with collecting(mosquitto, f"ami/v1/{gw}/status") as sub:
        async with Publisher(mosquitto.url, gateway=gw) as pub:
            await pub.wait_connected(10)
            await sub.wait_for(lambda got: bool(got) and decode_status(got[-1]).online)
        await sub.wait_for(lambda got: not decode_status(got[-1]).online)


@integration
async def test_tls_and_password_against_the_secure_broker(mosquitto_secure: Mosquitto) -> None:
    broker = mosquitto_secure
    publisher = Publisher(
        broker.url,
        gateway="gw-1",
        username="gw-1",
        password=broker.passwords["gw-1"],
        ca_file=str(broker.ca_file),
    )
    headend = aiomqtt.Client(
        broker.host,
        broker.port,
        username="headend",
        password=broker.passwords["headend"],
        tls_params=aiomqtt.TLSParameters(ca_certs=str(broker.ca_file)),
    )
    async with collecting(broker, "ami/v1/gw-1/#", user="headend") as sub, publisher as pub:
        await pub.wait_connected(10)
        commands = pub.commands()
        await pub.publish("ami/v1/gw-1/up/readings", b"secure-batch")
        await sub.wait_for(lambda got: b"secure-batch" in got)
        async with headend:
            await headend.publish("ami/v1/gw-1/down/cmd", b"cmd", qos=1)
        async with asyncio.timeout(5):
            assert await anext(commands) == b"cmd"


@integration
async def test_a_wrong_password_never_connects_and_says_why(mosquitto_secure: Mosquitto) -> None:
    broker = mosquitto_secure
    creds = {"username": "gw-1", "password": "wrong", "ca_file": str(broker.ca_file)}
    async with Publisher(broker.url, gateway="gw-1", backoff_base_s=0.05, backoff_cap_s=0.2, **creds) as pub:
        with pytest.raises(TransportTimeout):
            await pub.wait_connected(1.5)
        assert not pub.connected and pub.connect_failures >= 2
        assert isinstance(pub.last_error, TransportError) and "refused" in str(pub.last_error)
        with pytest.raises(ConnectionLostError):
            await pub.publish("ami/v1/gw-1/up/readings", b"x")


class RefuseV5Proxy:
    """A TCP relay to the real broker that answers MQTT 5 CONNECTs the way a 3.1.1-only broker
    does (CONNACK, return code 1: unacceptable protocol version) and relays everything else."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.refused = 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"mqtt://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.read(64)  # fixed header, length, "MQTT", level: all in the first segment
        name_at = next(i for i in range(1, 5) if head[i] < 0x80) + 1  # after the length varint
        if head[name_at : name_at + 6] == b"\x00\x04MQTT" and head[name_at + 6] == 5:
            self.refused += 1
            writer.write(b"\x20\x02\x00\x01")
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(self.broker.host, self.broker.port)
        up_writer.write(head)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@integration
async def test_falls_back_to_mqtt_311_when_the_broker_refuses_5(mosquitto: Mosquitto) -> None:
    gw = _gw()
    proxy = RefuseV5Proxy(mosquitto)
    async with (
        proxy as url,
        collecting(mosquitto, f"ami/v1/{gw}/up/#") as sub,
        Publisher(url, gateway=gw) as pub,
    ):
        await pub.wait_connected(10)
        assert pub.protocol_version == 4 and proxy.refused == 1
        await pub.publish(f"ami/v1/{gw}/up/readings", b"via-311")
        await sub.wait_for(lambda got: b"via-311" in got)


@pytest.mark.integration
async def test_a_refused_publish_stays_in_the_outbox(mosquitto_secure: Mosquitto, tmp_path: Path) -> None:
    """The ACL refuses gw-1 a topic of gw-2 (MQTT 5 PUBACK 0x87): the row must not be deleted as if
    it had been delivered, and the gateway can never publish outside its own tree."""
    broker = mosquitto_secure
    outbox = Outbox(tmp_path / "o.sqlite", max_bytes=1 << 20)
    outbox.add("ami/v1/gw-2/up/readings", b"forged", kind="register")
    creds = {"username": "gw-1", "password": broker.passwords["gw-1"], "ca_file": str(broker.ca_file)}
    async with (
        collecting(broker, "ami/v1/#", user="headend") as sub,
        Publisher(
            broker.url, gateway="gw-1", protocol="5", backoff_base_s=0.05, backoff_cap_s=0.2, **creds
        ) as pub,
    ):
        await pub.wait_connected(10)
        with pytest.raises(ConnectionLostError):
            async with asyncio.timeout(20):  # without refusal detection the drain "succeeds" or hangs
                await pub.drain(outbox)
        await asyncio.sleep(0.5)
        assert b"forged" not in sub.got
    assert len(outbox) == 1 and outbox.stats().published == 0
    outbox.close()
