"""Async MQTT consumer with manual acknowledgement, a persistent session and back-pressure.

Why not aiomqtt: aiomqtt 2.x sends PUBACK as soon as a QoS 1 message arrives, before ingest has
written it; a crash would lose the batch (STYLE §"Three decisions", H8). This is a small adapter
over paho-mqtt 2.x with ``manual_ack=True``: nothing is acknowledged until the caller awaits
:meth:`MqttConsumer.ack` after the data is durable.

Contract
--------
* ``async with MqttConsumer(config) as consumer:`` returns once the consumer is subscribed to
  every filter in ``config.topics`` (plain or ``$share/<group>/<filter>``), else raises
  :class:`~protocols.errors.TransportError`. "Subscribed" means: the SUBACKs came back (a new
  session), or the CONNACK said ``session_present`` (a resumed session, see "Resumed sessions"
  below). ``async for msg in consumer`` yields
  :class:`Message` objects; ``await consumer.ack(msg)`` acknowledges one.
* The session is persistent (MQTT 5: ``clean_start=False`` with ``session_expiry_s``; 3.1.1:
  ``clean_session=False``), so QoS 1 messages delivered but not acknowledged when the process dies
  are redelivered (DUP) to the next connection with the same ``client_id``.
* Reconnection after a drop is automatic (paho's loop, back-off ``reconnect_min_s``..
  ``reconnect_max_s``), and the subscriptions are renewed on **every** connect, resumed session
  or not: a changed topic list or an expired session heals (field lesson 17), and so does a
  broker restart, after which the Debian mosquitto 2.0.11 resumes the session (``session_present``)
  but has not restored its shared subscriptions (``$share/...``). Messages published between the
  broker's restart and the renewal reach no subscriber; the edges re-send them, because the
  head-end never confirmed them (:mod:`protocols.acks`). ``stats.subacks`` counts the granted
  SUBACKs.
* A message over ``max_payload_bytes`` is never buffered whole: the paho thread keeps its first
  :data:`OVERSIZE_PREFIX_BYTES` bytes and its full length (:attr:`Message.oversize`), drops the
  rest before the message enters the queue, and yields it in arrival order like any other; the
  caller refuses it (ingest dead-letters it, reason ``payload too large``) and acks it, so memory
  per queued message is bounded by ``max_payload_bytes`` (the broker's own limit,
  ``message_size_limit``, is what keeps paho from reading it at all).
* An ack for a message from an earlier connection is **not** sent: after a reconnect the broker
  redelivers that message anyway, and its packet id may by then name a different message, whose
  early PUBACK would lose it on a crash. The redelivered copy is skipped by
  :class:`~ingest.pipeline.dedup.DedupStore` (stale acks are counted in :attr:`ConsumerStats.stale_acks`).

Resumed sessions
----------------
A resumed session's backlog (its in-flight and queued messages) is delivered right after the
CONNACK, *before* the SUBACK of the renewed subscriptions. Were ``connect()`` to wait for that
SUBACK, a backlog larger than ``queue_max`` would deadlock: paho's thread waits in ``on_message``
for a queue slot (step 2 below), nobody consumes because ``connect()`` has not returned, and the
SUBACK behind the backlog is never read. So with ``session_present`` the consumer is ready at the
CONNACK (the backlog is the session's, whatever became of its subscriptions); the renewals are
sent at once, their SUBACKs are read as the caller drains the queue, and a refused renewal ends
the iteration with ``TransportError``.
Back-pressure is unchanged: the paho thread still never queues more than ``queue_max``.

Back-pressure, end to end
-------------------------
paho's network loop runs in its own thread (``loop_start``, the one thread a library forces, H9)
and hands each message to the event loop with ``loop.call_soon_threadsafe`` into a bounded
``asyncio.Queue(queue_max)``. Nothing is ever discarded:

1. *Broker → us, MQTT 5:* the CONNECT carries ``Receive Maximum = receive_maximum`` (default
   ``queue_max``). The broker keeps at most that many QoS 1 messages unacknowledged at this client
   and holds the rest in the session queue. Messages in our queue are unacknowledged, so the queue
   cannot overflow; when the pipeline is slow, acks slow down and the broker stops sending.
   (mosquitto 2.0.11 honours it for the first window but was seen to send a further
   ``receive_maximum`` messages after one PUBACK; step 2 holds those back, so the bound on our
   side does not depend on the broker getting this right.)
2. *Broker → us, MQTT 3.1.1 (no Receive Maximum):* the broker's own in-flight cap applies
   (mosquitto ``max_inflight_messages``, default 20). Should more arrive than the queue holds, the
   paho thread blocks in ``on_message`` on a slot semaphore until the pipeline takes a message:
   paho stops reading the socket, TCP flow control fills the window, and the broker queues. (A
   block longer than 1.5 x keepalive makes the broker drop the connection; unacked messages come
   back on reconnect, and dedup absorbs the repeats.)
3. *Us → InfluxDB:* the pipeline awaits the sink before acking (``InfluxWriter.write`` retries with
   back-off and raises after a bound), so a slow or absent InfluxDB stops acks, which stops the
   broker (1, 2), which queues for the persistent session, and upstream the edge outbox holds data
   while its publishes go unacknowledged (DESIGN §5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocols.errors import ConfigError, TransportError
from protocols.payload import MAX_PAYLOAD_BYTES
from protocols.topics import READINGS_SHARED

__all__ = ["OVERSIZE_PREFIX_BYTES", "ConsumerConfig", "ConsumerStats", "Message", "MqttConsumer"]

log = logging.getLogger(__name__)

_SLOT_POLL_S = 0.1
OVERSIZE_PREFIX_BYTES = 4096  # what is kept of an oversized payload, to find it by (dead letter)


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """The ``[ingest.mqtt]`` section. ``receive_maximum`` defaults to ``queue_max``."""

    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = "amigw-ingest-1"
    topics: tuple[str, ...] = (READINGS_SHARED,)
    qos: int = 1
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    keepalive_s: int = 60
    session_expiry_s: int = 7 * 86_400
    queue_max: int = 64
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    receive_maximum: int | None = None
    connect_timeout_s: float = 10.0
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"url: expected mqtt:// or mqtts://, got {self.url!r}")
        if not self.client_id:
            raise ValueError("client_id: a persistent session needs a stable, non-empty client id")
        if not self.topics:
            raise ValueError("topics: at least one topic filter")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos: expected 0, 1 or 2, got {self.qos}")
        if self.queue_max < 1:
            raise ValueError(f"queue_max: expected >= 1, got {self.queue_max}")
        if self.max_payload_bytes < 1:
            raise ValueError(f"max_payload_bytes: expected >= 1, got {self.max_payload_bytes}")
        if self.receive_maximum is not None and not 1 <= self.receive_maximum <= 65_535:
            raise ValueError(f"receive_maximum: expected 1..65535, got {self.receive_maximum}")


@dataclass(frozen=True, slots=True)
class Message:
    """One received message. ``generation`` numbers the connection it arrived on (for acks).
    ``oversize`` is the full length of a payload over ``max_payload_bytes``, of which ``payload``
    holds only the first :data:`OVERSIZE_PREFIX_BYTES` bytes (0: ``payload`` is whole)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool = False
    dup: bool = False
    generation: int = 0
    oversize: int = 0


@dataclass(slots=True)
class ConsumerStats:
    """Counters for the metrics endpoint (STYLE H12)."""

    received: int = 0
    acked: int = 0
    stale_acks: int = 0
    connects: int = 0
    disconnects: int = 0
    blocked_waits: int = 0
    queue_high_water: int = 0
    unacked: int = 0
    unacked_high_water: int = 0
    oversized: int = 0
    subacks: int = 0


class MqttConsumer:
    """See the module contract. One instance is one MQTT session (one ``client_id``)."""

    def __init__(self, config: ConsumerConfig) -> None:
        """Builds the paho client; connects nothing.

        Raises:
            ConfigError: ``ca_file`` cannot be loaded for an ``mqtts://`` URL.
        """
        self.config = config
        self.stats = ConsumerStats()
        self._queue: asyncio.Queue[Message | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = threading.BoundedSemaphore(config.queue_max)
        self._lock = threading.Lock()  # generation + unacked, shared with paho's thread
        self._generation = 0
        self._unacked: set[tuple[int, int]] = set()
        self._closing = threading.Event()
        self._ready: asyncio.Future[None] | None = None
        self._pending_subs: dict[int, str] = {}
        self._error: TransportError | None = None  # a renewed subscription refused after ready
        self._client = self._make_client()

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> MqttConsumer:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Connect and subscribe (waits for CONNACK, then for the SUBACKs of a new session; a
        resumed session is ready at the CONNACK, see "Resumed sessions").

        Raises:
            TransportError: refused, unreachable, or a subscription refused, within
                ``connect_timeout_s``.
        """
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self.config.queue_max + 1)  # +1: room for the end sentinel
        self._ready = self._loop.create_future()
        host, port = self._host_port()
        kwargs: dict[str, Any] = {}
        if self.config.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.config.session_expiry_s
            props.ReceiveMaximum = self.config.receive_maximum or self.config.queue_max
            kwargs = {"clean_start": False, "properties": props}
        self._client.connect_async(host, port, keepalive=self.config.keepalive_s, **kwargs)
        self._client.loop_start()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                await self._ready
        except TimeoutError:
            await self.aclose()
            raise TransportError(
                f"mqtt {self.config.url}: not connected within {self.config.connect_timeout_s}s"
            ) from None
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self, *, end_session: bool = False) -> None:
        """Disconnect and stop paho's thread. Messages still queued are not acknowledged, so the
        broker redelivers them to this session later. ``end_session`` (MQTT 5) asks the broker to
        discard the session (decommissioning a worker)."""
        if self._closing.is_set():
            return
        self._closing.set()
        props = None
        if end_session and self.config.protocol == "5":
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
        self._client.disconnect(properties=props)
        await asyncio.to_thread(self._client.loop_stop)
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(None)

    # -- consuming ---------------------------------------------------------------------------

    def __aiter__(self) -> MqttConsumer:
        return self

    async def __anext__(self) -> Message:
        """The next message; cancel-safe (a cancelled wait takes nothing off the queue)."""
        if self._queue is None:
            raise RuntimeError("MqttConsumer: connect() first")
        msg = await self._queue.get()
        if msg is None:
            self._queue.put_nowait(None)  # every later __anext__ also ends
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        self._slots.release()
        return msg

    async def get(self, timeout_s: float | None = None) -> Message:
        """One message, waiting at most ``timeout_s``. Raises ``TimeoutError``/``StopAsyncIteration``."""
        async with asyncio.timeout(timeout_s):
            return await self.__anext__()

    async def ack(self, msg: Message) -> None:
        """Acknowledge ``msg`` (QoS 1: PUBACK; QoS 2: PUBCOMP). Call only once its data is durable.

        A message from an earlier connection is not acknowledged (see the module contract).
        """
        if msg.qos == 0:
            return
        with self._lock:  # no reconnect can slip between the check and the queued PUBACK
            if msg.generation != self._generation:
                self.stats.stale_acks += 1
                return
            rc = self._client.ack(msg.mid, msg.qos)
            self._unacked.discard((msg.generation, msg.mid))
            self.stats.unacked = len(self._unacked)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.stats.acked += 1
        else:
            self.stats.stale_acks += 1

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # -- paho side (runs in paho's network thread) ---------------------------------------------

    def _make_client(self) -> mqtt.Client:
        cfg = self.config
        v5 = cfg.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=None if v5 else False,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            manual_ack=True,
            reconnect_on_failure=True,
        )
        if urllib.parse.urlsplit(cfg.url).scheme == "mqtts":
            try:
                client.tls_set(ca_certs=cfg.ca_file, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("ca_file", f"cannot load CA certificates {cfg.ca_file!r}: {exc}") from None
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _host_port(self) -> tuple[str, int]:
        parts = urllib.parse.urlsplit(self.config.url)
        return parts.hostname or "127.0.0.1", parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    def _to_loop(self, fn: Any, *args: Any) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: we are shutting down
                self._loop.call_soon_threadsafe(fn, *args)

    def _resolve_ready(self, error: BaseException | None) -> None:
        if self._ready is not None and not self._ready.done():
            if error is None:
                self._ready.set_result(None)
            else:
                self._ready.set_exception(error)

    def _on_connect(self, client: mqtt.Client, _ud: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error(
                "mqtt connect refused url=%s client_id=%s reason=%s",
                self.config.url,
                self.config.client_id,
                reason,
            )
            self._to_loop(
                self._resolve_ready, TransportError(f"mqtt {self.config.url}: connect refused: {reason}")
            )
            return
        self.stats.connects += 1
        if self.stats.connects > 1 and not flags.session_present:
            log.warning(  # the broker lost or expired the session: its queued messages are gone
                "mqtt session not resumed client_id=%s session_expiry_s=%d",
                self.config.client_id, self.config.session_expiry_s,
            )  # fmt: skip
        log.info(
            "mqtt connected url=%s client_id=%s session_present=%s",
            self.config.url,
            self.config.client_id,
            flags.session_present,
        )
        if flags.session_present:  # the backlog may precede the SUBACK: see "Resumed sessions"
            self._to_loop(self._resolve_ready, None)
        # Renewed even when the session was resumed: mosquitto does not restore shared
        # subscriptions after a restart (see the module contract).
        for topic in self.config.topics:
            if self.config.protocol == "5":
                _rc, mid = client.subscribe(topic, options=SubscribeOptions(qos=self.config.qos))
            else:
                _rc, mid = client.subscribe(topic, qos=self.config.qos)
            if mid is not None:
                self._pending_subs[mid] = topic

    def _on_connect_fail(self, _client: mqtt.Client, _ud: Any) -> None:
        log.debug("mqtt connect failed url=%s client_id=%s", self.config.url, self.config.client_id)

    def _on_subscribe(
        self, _client: mqtt.Client, _ud: Any, mid: int, reasons: list[Any], _props: Any
    ) -> None:
        topic = self._pending_subs.pop(mid, "?")
        failed = [r for r in reasons if r.is_failure]
        self.stats.subacks += len(reasons) - len(failed)
        if failed:
            log.error("mqtt subscribe refused topic=%s reason=%s", topic, failed[0])
            self._to_loop(self._refused, TransportError(f"mqtt subscribe to {topic!r} refused: {failed[0]}"))
        elif not self._pending_subs:
            self._to_loop(self._resolve_ready, None)

    def _refused(self, error: TransportError) -> None:  # on the event loop
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            return
        # Already consuming (a resumed session): end the iteration with the error. The queue
        # always has room for one sentinel (queue_max slots, queue_max + 1 places).
        self._error = error
        if self._queue is not None and not self._queue.full():
            self._queue.put_nowait(None)

    def _on_disconnect(self, _client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        with self._lock:
            self._generation += 1  # acks for messages of the lost connection are now stale
            self._unacked.clear()
        self.stats.disconnects += 1
        if not self._closing.is_set():
            log.error(
                "mqtt connection lost url=%s client_id=%s reason=%s",
                self.config.url,
                self.config.client_id,
                reason,
            )

    def _on_message(self, _client: mqtt.Client, _ud: Any, m: mqtt.MQTTMessage) -> None:
        size = len(m.payload)
        oversize = size if size > self.config.max_payload_bytes else 0
        payload = bytes(m.payload[:OVERSIZE_PREFIX_BYTES] if oversize else m.payload)
        if oversize:
            self.stats.oversized += 1
        with self._lock:  # counted from arrival: in flight from the broker's point of view
            msg = Message(
                m.topic, payload, m.mid, m.qos, bool(m.retain), bool(m.dup), self._generation, oversize
            )
            if m.qos:
                self._unacked.add((msg.generation, m.mid))
                self.stats.unacked = len(self._unacked)
                self.stats.unacked_high_water = max(self.stats.unacked_high_water, self.stats.unacked)
        self.stats.received += 1
        # Back-pressure step 2: wait for a queue slot (never discard); re-check for shutdown.
        if not self._slots.acquire(blocking=False):
            self.stats.blocked_waits += 1
            while not self._slots.acquire(timeout=_SLOT_POLL_S):
                if self._closing.is_set():
                    return  # not acked: the broker redelivers it to this session
        self._to_loop(self._enqueue, msg)

    def _enqueue(self, msg: Message) -> None:  # on the event loop
        assert self._queue is not None
        self._queue.put_nowait(msg)  # cannot be full: a slot was taken for it
        self.stats.queue_high_water = max(self.stats.queue_high_water, self._queue.qsize())
