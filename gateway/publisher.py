"""The edge agent's MQTT link: publish with PUBACK, replay the outbox, receive commands and
the head-end's confirmations (DESIGN §4-5).

Contract
--------
``async with Publisher(url, gateway=...) as pub:`` starts one named background task that keeps
a connection to the broker: it connects (MQTT 5, or 3.1.1 when the broker refuses 5), subscribes
to ``ami/v1/{gateway}/down/cmd`` and ``ami/v1/{gateway}/down/ack`` (QoS 1), publishes the
retained online :class:`Status` and reads until the connection drops; then it waits
:func:`backoff_s` and reconnects, forever. The last-will is the retained offline ``Status``; a
clean exit publishes that status itself. Entering never waits for the broker (the agent must keep
polling meters while it is down); :meth:`Publisher.wait_connected` does.

* :meth:`Publisher.publish` returns only once the broker acknowledged (PUBACK, QoS 1) and raises
  :class:`ConnectionLostError` (a ``TransportError``) when there is no connection or it drops first.
* :meth:`Publisher.drain` replays an :class:`~gateway.outbox.Outbox` through a bounded window of
  concurrent publishes and settles (``Outbox.end``) exactly the rows that were acknowledged: the
  outbox deletes them or, for rows that wait for the head-end's confirmation, keeps them until
  then. Rows may be acknowledged out of order within the window; the others stay stored and are
  handed out again, oldest first. Re-sends of unconfirmed rows go through the same window. MQTT
  packet ids are 16-bit, so the window is capped at :data:`MAX_WINDOW`; packing readings into
  messages is the caller's job. The default window (100) is the measured sweet spot
  (tests/bench/test_bench_outbox.py): aiomqtt 2.x walks all its pending calls on every publish,
  so per-message cost grows with the window beyond a few hundred.
* :meth:`Publisher.deliver` keeps an outbox delivered, forever: it drains whenever connected,
  then sleeps until a row is added (the caller sets an event) or the next unconfirmed row is due
  for a re-send (``Outbox.next_due_s``).
* :meth:`Publisher.commands` yields raw command payloads. aiomqtt acknowledges them on receipt,
  which is harmless here: the command executor de-duplicates by command id (STYLE, decision 1).
* :meth:`Publisher.acks` yields the head-end's confirmations (:class:`~protocols.acks.Ack`,
  for ``Outbox.confirm``). A confirmation that does not decode, or that names another gateway,
  is logged (one line), counted through ``on_ack_rejected(reason)`` (``invalid``,
  ``other_gateway``) and ignored; it never ends the link. Losing one is harmless: the rows it
  would have confirmed are re-sent and confirmed again.

Sessions are persistent (MQTT 5: clean start off with a session expiry; 3.1.1: clean session
off) so commands and confirmations sent while the gateway is offline wait at the broker. A dead
connection is noticed when the socket fails or, for a silent peer, by the keep-alive
(1.5 × ``keepalive_s``). Under MQTT 5 a broker may refuse a publish in its PUBACK (e.g. not
authorized); aiomqtt 2.x does not surface that reason code, so the link watches for it (see
``_Link.watch_refusals``); 3.1.1 cannot express it, so the ACL must be right.

Everything runs on the event loop; aiomqtt runs paho's blocking connect in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, NoReturn, Protocol

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.outbox import Outbox, Transaction
from protocols import topics
from protocols.acks import Ack, decode_ack
from protocols.errors import ConfigError, PayloadError, TransportError, TransportTimeout
from protocols.payload import Status

__all__ = ["MAX_WINDOW", "ConnectionLostError", "Publisher", "backoff_s", "parse_broker_url"]

log = logging.getLogger(__name__)

MAX_WINDOW = 60_000
"""Most publishes in flight at once: MQTT packet ids are 16-bit (65,535), minus a margin for
subscriptions and the status messages that share the id space."""

_UNSUPPORTED_PROTOCOL_VERSION = 0x84  # MQTT 5 §3.2.2.2; paho maps a 3.1.1 broker's rc 1 to it


class ConnectionLostError(TransportError):
    """No connection to the broker, or it dropped before the broker acknowledged."""


class _Rng(Protocol):
    def random(self) -> float: ...


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: _Rng) -> float:
    """Delay before reconnect ``attempt`` (0-based): "equal jitter" exponential back-off.

    The ceiling doubles from ``base_s`` up to ``cap_s``; the delay is uniform in
    ``[ceiling/2, ceiling]``, so a fleet reconnecting after a broker restart spreads out (no
    thundering herd) and no gateway retries in a tight loop.
    """
    if attempt < 0 or base_s <= 0 or cap_s < base_s:
        raise ValueError("expected attempt >= 0 and 0 < base_s <= cap_s")
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt, 62))
    return ceiling / 2 + rng.random() * ceiling / 2


def parse_broker_url(url: str) -> tuple[bool, str, int]:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` -> (tls, host, port).

    Raises:
        ConfigError: another scheme, no host, or a bad port.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError("mqtt.url", f"scheme {parts.scheme!r}: expected mqtt:// or mqtts://")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError("mqtt.url", str(exc)) from None
    if not parts.hostname:
        raise ConfigError("mqtt.url", f"no host in {url!r}")
    tls = parts.scheme == "mqtts"
    return tls, parts.hostname, port or (8883 if tls else 1883)


@dataclass(eq=False)
class _Link:
    """One live connection and the publishes in flight on it."""

    client: aiomqtt.Client
    lost: bool = False
    refused: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self, topic: str, payload: bytes, qos: int, retain: bool) -> asyncio.Task[None]:
        # timeout=inf: a dropped connection cancels the task (drop()); a silent one is caught by keep-alive
        coro = self.client.publish(topic, payload, qos=qos, retain=retain, timeout=math.inf)
        task = asyncio.get_running_loop().create_task(coro, name="mqtt-publish")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def drop(self) -> None:
        self.lost = True
        for task in list(self.tasks):
            task.cancel()

    def watch_refusals(self) -> None:
        """Treat a PUBACK with a failure reason code (MQTT 5, e.g. 0x87 Not authorized) as a lost
        link instead of a delivery.

        aiomqtt 2.x resolves ``publish()`` on any PUBACK and drops the reason code, so a refused
        batch would be deleted from the outbox as if delivered. We wrap paho's ``on_publish`` on
        this one client (aiomqtt is pinned < 3, and this is its only private attribute we touch):
        on a refusal the link is dropped *before* aiomqtt sees the PUBACK, so every in-flight
        publish fails with ``ConnectionLostError`` and its row stays in the outbox. The refusal is
        logged; the next connection replays the rows (and a misconfigured ACL shows up as a
        reconnect loop with errors, never as silent loss)."""
        paho_client = self.client._client
        deliver: Callable[..., None] | None = paho_client.on_publish

        def on_publish(client, userdata, mid, reason_code, properties):  # type: ignore[no-untyped-def]
            if getattr(reason_code, "is_failure", False):
                log.error("broker refused a publish", extra={"kv": {"mid": mid, "reason": str(reason_code)}})
                self.refused += 1
                loop.call_soon_threadsafe(self.drop) if not _on_loop(loop) else self.drop()
                return
            if deliver is not None:
                deliver(client, userdata, mid, reason_code, properties)

        loop = asyncio.get_running_loop()
        paho_client.on_publish = on_publish


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


@dataclass(eq=False)
class _Chunk:
    """One outbox transaction being published: ended once every row has an outcome."""

    tx: Transaction
    remaining: int
    acked: list[int] = field(default_factory=list)


class Publisher:
    """The gateway's MQTT connection (see the module docstring).

    Raises (constructor):
        ConfigError: a bad ``url``.
        ValueError: a window outside 1..MAX_WINDOW, or an unknown ``protocol``.
    """

    def __init__(
        self,
        url: str,
        *,
        gateway: str,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        protocol: Literal["auto", "5", "3.1.1"] = "auto",
        keepalive_s: int = 30,
        connect_timeout_s: float = 10.0,
        session_expiry_s: int = 7 * 86400,
        window: int = 100,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 60.0,
        rng: _Rng | None = None,
        version: str = "",
        on_ack_rejected: Callable[[str], None] | None = None,
    ) -> None:
        self._tls, self._host, self._port = parse_broker_url(url)
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window {window}: expected 1..{MAX_WINDOW}")
        if protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"protocol {protocol!r}: expected 'auto', '5' or '3.1.1'")
        self.gateway = gateway
        self.client_id = client_id or f"amigw-{gateway}"
        self.status_topic = topics.status(gateway)
        self.command_topic = topics.command(gateway)
        self.ack_topic = topics.ack(gateway)
        self.window = window
        self._auth = (username, password)
        self._tls_params = aiomqtt.TLSParameters(ca_certs=ca_file, certfile=certfile, keyfile=keyfile)
        self._protocol = aiomqtt.ProtocolVersion.V311 if protocol == "3.1.1" else aiomqtt.ProtocolVersion.V5
        self._may_fall_back = protocol == "auto"
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._session_expiry_s = session_expiry_s
        self._backoff = (backoff_base_s, backoff_cap_s, rng or random.Random())
        self._version = version
        self._link: _Link | None = None
        self._connected = asyncio.Event()
        self._commands: asyncio.Queue[bytes] = asyncio.Queue()
        self._acks: asyncio.Queue[Ack] = asyncio.Queue()
        self._on_ack_rejected = on_ack_rejected
        self._task: asyncio.Task[None] | None = None
        self.connects = 0
        self.connect_failures = 0
        self.last_error: TransportError | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Publisher:
        self._task = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"mqtt-link-{self.gateway}"
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        link = self._link
        if link is not None and not link.lost:
            # A clean exit sends no last-will, so say it ourselves (best effort).
            with contextlib.suppress(TransportError, asyncio.TimeoutError):
                await asyncio.wait_for(self._publish_status(online=False), timeout=2.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def connected(self) -> bool:
        return self._link is not None and not self._link.lost

    @property
    def protocol_version(self) -> int:
        """5 or 4 (3.1.1): what the next or current connection speaks."""
        return 5 if self._protocol == aiomqtt.ProtocolVersion.V5 else 4

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Return once connected.

        Raises:
            TransportTimeout: not connected within ``timeout_s``.
        """
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            raise TransportTimeout(f"no connection to {self._host}:{self._port} within {timeout_s} s") from (
                self.last_error
            )

    # -- publishing ---------------------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait for the broker's acknowledgement (PUBACK for QoS 1).

        Raises:
            ConnectionLostError: not connected, or the connection dropped before the acknowledgement.
        """
        link = self._require_link()
        task = link.start(topic, payload, qos, retain)
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if link.lost and task.cancelled() and current is not None and not current.cancelling():
                raise ConnectionLostError(f"connection lost before the broker acknowledged {topic}") from None
            raise
        except aiomqtt.MqttError as exc:  # paho refused to send: the socket is already gone
            raise ConnectionLostError(f"publish to {topic} failed: {exc}") from exc

    async def drain(
        self,
        outbox: Outbox,
        *,
        window: int | None = None,
        chunk: int | None = None,
        on_published: Callable[[int], None] | None = None,
    ) -> int:
        """Publish every due row (QoS 1) with at most ``window`` unacknowledged at a time;
        return the number the broker acknowledged once no row is due.

        Rows are settled (``Outbox.end``) only once acknowledged, a ``chunk`` of rows per outbox
        transaction; ``on_published(n)`` is told as each chunk settles. Rows added meanwhile are
        sent too.

        Raises:
            ConnectionLostError: the connection dropped (or was never there); what was acknowledged
                before is settled, the rest stays stored for the next drain.
        """
        window = min(window or self.window, self.window)
        chunk = chunk or max(1, min(256, window // 4))
        link = self._require_link()
        slots = asyncio.Semaphore(window)
        state = _DrainState(outbox, slots, on_published)
        try:
            while not (link.lost or state.failed):
                tx = outbox.begin(chunk)
                if not tx.rows:
                    if not state.open:
                        return state.published
                    await state.wait_idle()  # let the window empty, then look for new rows
                    continue
                await self._send_chunk(link, state, _Chunk(tx, len(tx.rows)))
            await state.wait_idle()
        finally:
            state.abandon()  # cancelled: stop what we started, keep the unacknowledged rows
        raise ConnectionLostError(
            f"connection to {self._host}:{self._port} lost during drain"
        ) from state.error

    async def _send_chunk(self, link: _Link, state: _DrainState, ch: _Chunk) -> None:
        state.open.add(ch)
        for i, row in enumerate(ch.tx.rows):
            await state.slots.acquire()
            if link.lost or state.failed:
                state.slots.release()
                state.settle(ch, None, unsent=len(ch.tx.rows) - i)
                return
            task = link.start(row.topic, row.payload, 1, False)
            state.tasks.add(task)
            task.add_done_callback(functools.partial(state.on_done, ch, row.id))

    async def deliver(
        self, outbox: Outbox, wakeup: asyncio.Event, *, on_published: Callable[[int], None] | None = None
    ) -> NoReturn:
        """Keep ``outbox`` delivered, forever (cancel to stop): drain it whenever connected, then
        wait until ``wakeup`` is set (the caller sets it after adding rows) or the next
        unconfirmed row is due for a re-send."""
        while True:
            await self.wait_connected()
            wakeup.clear()
            try:
                await self.drain(outbox, on_published=on_published)
            except ConnectionLostError:
                await asyncio.sleep(0.2)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), outbox.next_due_s())

    # -- downlink -----------------------------------------------------------------------------

    async def commands(self) -> AsyncIterator[bytes]:
        """Command payloads from ``ami/v1/{gateway}/down/cmd``, across reconnects (cancel-safe)."""
        while True:
            yield await self._commands.get()

    async def acks(self) -> AsyncIterator[Ack]:
        """Confirmations from ``ami/v1/{gateway}/down/ack`` for this gateway, decoded and checked,
        across reconnects (cancel-safe)."""
        while True:
            yield await self._acks.get()

    def _take_ack(self, data: bytes) -> None:
        try:
            ack = decode_ack(data)
        except (PayloadError, ValueError) as exc:
            self._reject_ack("invalid", str(exc))
            return
        if ack.gateway != self.gateway:
            self._reject_ack("other_gateway", f"names gateway {ack.gateway!r}")
            return
        self._acks.put_nowait(ack)

    def _reject_ack(self, reason: str, error: str) -> None:
        log.warning("confirmation ignored", extra={"kv": {"topic": self.ack_topic, "reason": reason,
                                                          "error": error[:200]}})  # fmt: skip
        if self._on_ack_rejected is not None:
            self._on_ack_rejected(reason)

    # -- the connection -----------------------------------------------------------------------

    def _require_link(self) -> _Link:
        link = self._link
        if link is None or link.lost:
            raise ConnectionLostError(f"not connected to {self._host}:{self._port}") from self.last_error
        return link

    async def _supervise(self) -> None:
        attempt = 0
        while True:
            try:
                client = await self._connect()
            except TransportError as exc:
                if self.connect_failures == 0 or attempt == 0:
                    log.error("mqtt connect failed", extra={"kv": {"broker": self._host, "port": self._port,
                                                                   "error": exc}})  # fmt: skip
                self.connect_failures += 1
                self.last_error = exc
                await asyncio.sleep(backoff_s(attempt, *self._backoff))
                attempt += 1
                continue
            attempt = 0
            await self._serve(client)
            await asyncio.sleep(backoff_s(0, *self._backoff))

    async def _connect(self) -> aiomqtt.Client:
        while True:
            client = self._new_client()
            try:
                await client.__aenter__()
                return client
            except MqttConnectError as exc:
                if (
                    self._may_fall_back
                    and _refuses_protocol(exc)
                    and self._protocol == aiomqtt.ProtocolVersion.V5
                ):
                    log.info(
                        "broker refused MQTT 5, falling back to 3.1.1", extra={"kv": {"broker": self._host}}
                    )
                    self._protocol = aiomqtt.ProtocolVersion.V311
                    continue
                raise TransportError(
                    f"broker {self._host}:{self._port} refused the connection: {exc}"
                ) from exc
            except aiomqtt.MqttError as exc:
                raise TransportError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc

    def _new_client(self) -> aiomqtt.Client:
        v5 = self._protocol == aiomqtt.ProtocolVersion.V5
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._session_expiry_s
        will = aiomqtt.Will(
            self.status_topic, Status(self.gateway, online=False).to_json(), qos=1, retain=True
        )
        client = aiomqtt.Client(
            self._host,
            self._port,
            username=self._auth[0],
            password=self._auth[1],
            identifier=self.client_id,
            protocol=self._protocol,
            will=will,
            clean_session=None if v5 else False,
            # persistent session: commands queue at the broker while we are away (paho refuses
            # clean_start for 3.1.1, where clean_session=False says the same)
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            keepalive=self._keepalive_s,
            timeout=self._connect_timeout_s,
            # 0: no paho limit (it rescans every stored message per PUBACK); drain's window bounds it
            max_inflight_messages=0,
            tls_params=self._tls_params if self._tls else None,
            logger=logging.getLogger("gateway.publisher.mqtt"),
        )
        client.pending_calls_threshold = MAX_WINDOW + 1000  # aiomqtt would warn on every publish past 10
        return client

    async def _serve(self, client: aiomqtt.Client) -> None:
        link = _Link(client)
        link.watch_refusals()
        try:
            self._link = link
            await client.subscribe(self.command_topic, qos=1)
            await client.subscribe(self.ack_topic, qos=1)
            await self._publish_status(online=True)
            self.connects += 1
            self._connected.set()
            log.info("mqtt connected", extra={"kv": {"broker": self._host, "mqtt": self.protocol_version}})
            async for message in client.messages:
                if not isinstance(message.payload, bytes):
                    continue
                if message.topic.matches(self.ack_topic):
                    self._take_ack(message.payload)
                else:
                    self._commands.put_nowait(message.payload)
        except (aiomqtt.MqttError, TransportError) as exc:
            self.last_error = exc if isinstance(exc, TransportError) else ConnectionLostError(str(exc))
            log.error("mqtt connection lost", extra={"kv": {"broker": self._host, "error": exc}})
        finally:
            self._connected.clear()
            link.drop()
            self._link = None
            with contextlib.suppress(aiomqtt.MqttError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(client.__aexit__(None, None, None), timeout=2.0)

    async def _publish_status(self, *, online: bool) -> None:
        status = Status(self.gateway, online=online, ts_ms=int(time.time() * 1000), version=self._version)
        await self.publish(self.status_topic, status.to_json(), qos=1, retain=True)


class _DrainState:
    """Book-keeping of one drain: open chunks, acknowledged ids, the first failure."""

    def __init__(
        self, outbox: Outbox, slots: asyncio.Semaphore, on_published: Callable[[int], None] | None
    ) -> None:
        self.outbox = outbox
        self.slots = slots
        self.on_published = on_published
        self.open: set[_Chunk] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.published = 0
        self.failed = False
        self.error: BaseException | None = None
        self._idle = asyncio.Event()

    def on_done(self, ch: _Chunk, row_id: int, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()
        ok = not task.cancelled() and task.exception() is None
        if not ok:
            self.failed = True
            if not task.cancelled():
                self.error = self.error or task.exception()
        self.settle(ch, row_id if ok else None)

    def settle(self, ch: _Chunk, acked_id: int | None, unsent: int = 1) -> None:
        if acked_id is not None:
            ch.acked.append(acked_id)
        ch.remaining -= unsent
        if ch.remaining == 0 and ch in self.open:
            self.open.discard(ch)
            self._end(ch)
            if not self.open:
                self._idle.set()

    async def wait_idle(self) -> None:
        while self.open:
            self._idle.clear()
            await self._idle.wait()

    def abandon(self) -> None:
        """End every open chunk now with what was acknowledged; cancel its publishes."""
        for task in list(self.tasks):
            task.cancel()
        for ch in list(self.open):
            self.open.discard(ch)
            self._end(ch)

    def _end(self, ch: _Chunk) -> None:
        n = self.outbox.end(ch.tx, ch.acked)
        self.published += n
        if n and self.on_published is not None:
            self.on_published(n)


def _refuses_protocol(exc: MqttConnectError) -> bool:
    rc = exc.rc
    value = rc.value if isinstance(rc, ReasonCode) else rc
    return value in (_UNSUPPORTED_PROTOCOL_VERSION, paho.CONNACK_REFUSED_PROTOCOL_VERSION)
