"""The head-end's one MQTT publisher (ingest's aggregates and confirmations, fee control's
commands and notifications): QoS 1 with the broker's PUBACK awaited.

:class:`MqttPublisher` is a paho client on its own clean connection; paho's network thread
(``loop_start``, the one thread a library forces, STYLE H9) reconnects by itself.
:meth:`~MqttPublisher.publish` / :meth:`~MqttPublisher.publish_many` wait for the connection
while it is down and resolve only when every PUBACK arrived, or raise
:class:`~protocols.errors.TransportError` (refused by paho, or not connected and acknowledged
within ``publish_timeout_s``). A publish that timed out may still reach the broker later:
callers only publish what is harmless to repeat (aggregates are idempotent rows, commands carry
a fixed id the edge de-duplicates). :meth:`~MqttPublisher.send` publishes QoS 1
without waiting (confirmations: paho re-sends them after a reconnect).

What must be (re)sent lives in the caller's durable state, never in paho's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import urllib.parse
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from ingest.mqtt.settings import MqttSettings
from protocols.errors import TransportError

__all__ = ["MqttPublisher"]

log = logging.getLogger("amigw.mqtt.publisher")


class MqttPublisher:
    """``async with MqttPublisher(settings, client_id) as pub: await pub.publish(topic, payload)``
    (or :meth:`connect` / :meth:`aclose`). Entering does not wait for the connection: while the
    broker is down, publishing raises until it is back."""

    def __init__(self, settings: MqttSettings, client_id: str) -> None:
        self._url = urllib.parse.urlsplit(settings.url)
        self.timeout_s = settings.publish_timeout_s
        self._keepalive_s = settings.keepalive_s
        self._connected = threading.Event()
        self._lock = threading.Lock()  # paho's on_publish may run before publish() has the mid
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._early: set[int] = set()  # PUBACKs that beat publish() to registering its wait
        self._unawaited: set[int] = set()  # mids nobody waits for (send(), timed out)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._up = asyncio.Event()  # the loop's view of _connected, for waiting on it
        self._closing = False
        v5 = settings.protocol == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if v5 else True,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=True,
        )
        if self._url.scheme == "mqtts":
            self._client.tls_set(ca_certs=settings.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        if settings.username is not None:
            self._client.username_pw_set(settings.username, settings.password)
        self._client.reconnect_delay_set(1, 30)
        self._client.max_inflight_messages_set(1000)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def connect(self) -> None:
        """Start connecting (in paho's thread) and return at once."""
        self._loop = asyncio.get_running_loop()
        host = self._url.hostname or "127.0.0.1"
        port = self._url.port or (8883 if self._url.scheme == "mqtts" else 1883)
        self._client.connect_async(host, port, keepalive=self._keepalive_s)
        self._client.loop_start()

    async def aclose(self) -> None:
        self._closing = True
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(TransportError("mqtt publisher closed"))

    async def __aenter__(self) -> MqttPublisher:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def wait_connected(self, timeout_s: float) -> bool:
        return await asyncio.to_thread(self._connected.wait, timeout_s)

    def send(self, topic: str, payload: bytes) -> None:
        """Publish QoS 1 and return at once; paho re-sends it after a reconnect."""
        info = self._client.publish(topic, payload, qos=1)
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._unawaited.add(info.mid)

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish QoS 1 and wait for the PUBACK. Raises: TransportError."""
        await self.publish_many(((topic, payload),))

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Publish all (QoS 1), then wait for every PUBACK; while the connection is down, wait
        for it. All within ``publish_timeout_s``.

        Raises:
            TransportError: not connected or not every PUBACK in time, or paho refused a
                message (cancellation and timeouts forget the waits, not the messages).
        """
        if self._loop is None:
            raise RuntimeError("MqttPublisher: connect() first (or 'async with')")
        futs: dict[int, asyncio.Future[None]] = {}
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._until_connected()
                await self._publish_all(items, futs)
        except TimeoutError:
            why = "no PUBACK" if self._connected.is_set() else "not connected"
            raise TransportError(f"mqtt publish: {why} within {self.timeout_s}s") from None
        finally:
            with self._lock:
                for mid, fut in futs.items():
                    if self._waiting.pop(mid, None) is not None and not fut.done():
                        self._unawaited.add(mid)  # a late PUBACK must not count for a reused mid

    async def _until_connected(self) -> None:
        while not self._connected.is_set():
            self._up.clear()
            if self._connected.is_set():  # set between the test and the clear
                return
            await self._up.wait()  # set from paho's thread on (re)connect

    async def _publish_all(
        self, items: Sequence[tuple[str, bytes]], futs: dict[int, asyncio.Future[None]]
    ) -> None:
        assert self._loop is not None
        for topic, payload in items:
            fut: asyncio.Future[None] = self._loop.create_future()
            # Never hold self._lock across client.publish(): paho calls on_publish while
            # holding its own message mutex, and on_publish takes self._lock (lock order).
            info = self._client.publish(topic, payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise TransportError(f"mqtt publish to {topic}: {mqtt.error_string(info.rc)}")
            with self._lock:
                if info.mid in self._early:
                    self._early.discard(info.mid)
                    fut.set_result(None)
                else:
                    self._waiting[info.mid] = fut
            futs[info.mid] = fut
        await asyncio.gather(*futs.values())

    def _kv(self, **fields: object) -> dict[str, dict[str, object]]:
        """Fields for the key=value log layout (``gateway.logs.KeyValueFormatter``)."""
        return {"kv": {"url": self._url.geturl(), **fields}}

    # paho's thread --------------------------------------------------------------------------------
    def _on_connect(self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error(
                "mqtt publisher connect refused", extra={"kv": {"url": self._url.geturl(), "reason": reason}}
            )
            return
        if not self._connected.is_set():
            log.info("mqtt publisher connected", extra=self._kv())
        self._connected.set()
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._up.set)

    def _on_disconnect(self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self._connected.is_set() and not self._closing:
            log.warning(
                "mqtt publisher disconnected", extra={"kv": {"url": self._url.geturl(), "reason": reason}}
            )
        self._connected.clear()

    def _on_publish(self, _c: mqtt.Client, _ud: Any, mid: int, _reason: Any, _props: Any) -> None:
        with self._lock:
            fut = self._waiting.pop(mid, None)
            if fut is None:
                if mid in self._unawaited:
                    self._unawaited.discard(mid)
                else:
                    self._early.add(mid)  # publish() has not registered its wait yet
                return
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
