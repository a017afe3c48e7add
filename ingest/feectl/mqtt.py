"""Fee control's MQTT link: topics, the subscribing session, and a publisher that awaits PUBACK.

Receiving uses the ingest team's :class:`~ingest.mqtt.consumer.MqttConsumer` (paho-mqtt,
``manual_ack=True``, persistent session): the service acknowledges a message only after the
ledger transaction for it committed (STYLE H8). :func:`consumer_config` maps ``[service.mqtt]``
onto it.

Publishing (signed commands, notifications) is :class:`MqttPublisher`, a small paho wrapper in
the same shape: paho's network thread (``loop_start``, the one thread a library forces, H9)
reconnects on its own, and :meth:`MqttPublisher.publish` resolves only when the broker's PUBACK
arrived, or raises :class:`~protocols.errors.TransportError` (not connected, refused, no PUBACK
within ``timeout_s``). A publish that timed out may still reach the broker later; the service
only ever publishes things whose repetition is harmless (commands carry a fixed id the edge
de-duplicates; notifications carry the journal's decision).

The session is clean: what must be (re)sent lives in the ledger (``ISSUED`` commands), not in
the broker or in paho's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import urllib.parse
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from ingest.mqtt.consumer import ConsumerConfig
from protocols import topics
from protocols.aggregates import MAX_MESSAGE_BYTES
from protocols.errors import TransportError

from ._log import kv
from .config import ServiceConfig

__all__ = [
    "INTERVALS_FILTER",
    "NOTIFICATIONS_TOPIC",
    "RESULTS_FILTER",
    "MqttPublisher",
    "command_topic",
    "consumer_config",
    "gateway_of_intervals_topic",
    "gateway_of_result_topic",
]

log = logging.getLogger("amigw.feectl.mqtt")

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
    m = cfg.service.mqtt
    return ConsumerConfig(
        url=m.url,
        client_id=m.client_id,
        topics=(INTERVALS_FILTER, RESULTS_FILTER),
        qos=1,
        protocol=m.protocol,
        username=m.username,
        password=cfg.mqtt_password,
        ca_file=None if cfg.ca_file is None else str(cfg.ca_file),
        keepalive_s=m.keepalive_s,
        session_expiry_s=m.session_expiry_s,
        queue_max=m.queue_max,
        connect_timeout_s=m.connect_timeout_s,
        max_payload_bytes=MAX_MESSAGE_BYTES,
    )


class MqttPublisher:
    """QoS 1 publishing that resolves on PUBACK; paho reconnects in its own thread.

    ``async with MqttPublisher(cfg) as pub: await pub.publish(topic, payload)``. Entering does
    not wait for a connection: a broker that is down makes :meth:`publish` raise until it is back.
    """

    def __init__(self, cfg: ServiceConfig) -> None:
        m = cfg.service.mqtt
        self._url = urllib.parse.urlsplit(m.url)
        self._timeout_s = m.publish_timeout_s
        self._keepalive_s = m.keepalive_s
        self._connected = threading.Event()
        self._lock = threading.Lock()  # paho's on_publish may run before publish() returns the mid
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._acked_early: set[int] = set()
        self._abandoned: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        v5 = m.protocol == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{m.client_id}-pub",
            clean_session=None if v5 else True,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=True,
        )
        if self._url.scheme == "mqtts":
            ca = None if cfg.ca_file is None else str(cfg.ca_file)
            self._client.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
        if m.username is not None:
            self._client.username_pw_set(m.username, cfg.mqtt_password)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def __aenter__(self) -> MqttPublisher:
        self._loop = asyncio.get_running_loop()
        host = self._url.hostname or "127.0.0.1"
        port = self._url.port or (8883 if self._url.scheme == "mqtts" else 1883)
        self._client.connect_async(host, port, keepalive=self._keepalive_s)
        self._client.loop_start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(TransportError("mqtt publisher closed"))

    async def wait_connected(self, timeout_s: float) -> bool:
        return await asyncio.to_thread(self._connected.wait, timeout_s)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        """Publish and wait for the PUBACK (QoS 1).

        Raises:
            TransportError: not connected, paho refused the message, or no PUBACK within
                ``publish_timeout_s`` (cancellation and timeouts forget the wait, not the message).
        """
        if self._loop is None:
            raise RuntimeError("MqttPublisher: use 'async with'")
        if not self._connected.is_set():
            raise TransportError(f"mqtt publish to {topic}: not connected")
        fut: asyncio.Future[None] = self._loop.create_future()
        # Never hold self._lock across client.publish(): paho calls on_publish while holding its
        # own message mutex, and on_publish takes self._lock (lock-order inversion otherwise).
        info = self._client.publish(topic, payload, qos=qos)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"mqtt publish to {topic}: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return
        with self._lock:
            if info.mid in self._acked_early:  # the PUBACK beat us here
                self._acked_early.discard(info.mid)
                return
            self._waiting[info.mid] = fut
        try:
            async with asyncio.timeout(self._timeout_s):
                await fut
        except TimeoutError:
            with self._lock:
                self._abandoned.add(info.mid)  # a late PUBACK for it must not count for a reused mid
            raise TransportError(f"mqtt publish to {topic}: no PUBACK within {self._timeout_s}s") from None
        finally:
            with self._lock:
                self._waiting.pop(info.mid, None)

    # paho's thread --------------------------------------------------------------------------------
    def _on_connect(self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("mqtt publisher connect refused", extra=kv(url=self._url.geturl(), reason=reason))
            return
        if not self._connected.is_set():
            log.info("mqtt publisher connected", extra=kv(url=self._url.geturl()))
        self._connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self._connected.is_set() and not self._closing:
            log.warning("mqtt publisher disconnected", extra=kv(url=self._url.geturl(), reason=reason))
        self._connected.clear()

    def _on_publish(self, _c: mqtt.Client, _ud: Any, mid: int, _reason: Any, _props: Any) -> None:
        with self._lock:
            fut = self._waiting.get(mid)
            if fut is None:
                if mid in self._abandoned:
                    self._abandoned.discard(mid)
                else:
                    self._acked_early.add(mid)  # publish() has not registered its wait yet
                return
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
