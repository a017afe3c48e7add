"""The fleet's edges for ``amigw bench e2e``: each virtual gateway publishes through the edge's
own code path.

Per virtual gateway, :class:`EdgeFleet` holds what an edge agent holds (gateway/agent.py): a
durable :class:`~gateway.outbox.Outbox` (SQLite in the run directory) with head-end
confirmations, and a :class:`~gateway.publisher.Publisher` (one MQTT connection, persistent
session, ``ami/v1/{gw}/down/ack`` subscribed) that keeps it delivered
(:meth:`~gateway.publisher.Publisher.deliver`) and applies every confirmation
(:meth:`~gateway.outbox.Outbox.confirm`). A batch leaves an outbox only when the head-end
confirmed it durable; an unconfirmed one is re-sent after ``ack_timeout_s`` (doubling up to
``resend_cap_s``), exactly as on a concentrator.

What it adds for the bench, beside the edge's code:

* :meth:`EdgeFleet.add` hands an upload to its gateway's outbox (``Outbox.add_batch``: the seq
  allocated and the payload built in one transaction) and notes when; a confirmation naming the
  seq closes it, and the time between is the batch's *publish-to-durable* latency (the head-end
  confirms only once InfluxDB answered 2xx for the batch, so its readings are queryable then).
* :class:`RawClient`: one extra MQTT connection for what no edge sends (replays outside the
  outbox, garbage).

All of it runs on one asyncio event loop. One connection per gateway is the realistic shape; it
costs a socket and an aiomqtt client each (a few hundred kB), which is fine up to a few thousand
gateways on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gateway.outbox import Outbox
from gateway.publisher import ConnectionLostError, Publisher
from protocols.acks import Ack

__all__ = ["EdgeFleet", "FleetStats", "RawClient", "UploadLike"]


class UploadLike(Protocol):
    """What an edge hands to ``Outbox.add_batch`` for one upload (the generator's ``Upload``)."""

    @property
    def gateway(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def prev(self) -> Mapping[tuple[str, int], tuple[int, int]] | None: ...
    @property
    def readings(self) -> int: ...
    @property
    def offset_s(self) -> float: ...
    def make_payload(self, seq: int) -> bytes: ...


@dataclass(slots=True)
class _Gateway:
    gateway: str
    outbox: Outbox
    publisher: Publisher
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    added_at: dict[int, float] = field(default_factory=dict)  # seq -> monotonic time added
    readings: dict[int, int] = field(default_factory=dict)  # unconfirmed: seq -> readings


@dataclass(frozen=True, slots=True)
class FleetStats:
    added: int  # batches handed to the outboxes
    confirmed: int  # ... confirmed by the head-end
    backlog: int  # stored, not confirmed (unsent or awaiting confirmation)
    resent: int  # re-sends of unconfirmed batches (Outbox stats)
    readings_confirmed: int
    connected: int  # gateways connected now
    dropped: int  # outbox drop policy (must be 0: the bench sizes the outboxes generously)


class EdgeFleet:
    """The virtual gateways' outboxes and MQTT connections (see the module docstring)."""

    def __init__(
        self,
        broker_url: str,
        gateways: tuple[str, ...],
        outbox_dir: Path,
        *,
        ack_timeout_s: float = 10.0,
        resend_cap_s: float = 30.0,
        window: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker_url = broker_url
        self.names = gateways
        self.dir = outbox_dir
        self.ack_timeout_s = ack_timeout_s
        self.resend_cap_s = resend_cap_s
        self.window = window
        self.clock = clock
        self.latencies_s: list[float] = []
        self.readings_confirmed = 0
        self._gws: dict[str, _Gateway] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._added = 0
        self._confirmed = 0

    async def start(self, connect_timeout_s: float = 60.0) -> None:
        """Open every outbox, connect every gateway; return once all are connected.

        Raises:
            TransportTimeout: a gateway did not connect in time.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            outbox = Outbox(
                self.dir / f"{name}.sqlite", max_bytes=1 << 34, confirm="head-end",
                ack_timeout_s=self.ack_timeout_s, resend_cap_s=self.resend_cap_s,
            )  # fmt: skip
            pub = Publisher(
                self.broker_url, gateway=name, client_id=f"bench-edge-{name}", window=self.window,
                backoff_base_s=0.2, backoff_cap_s=2.0,
            )  # fmt: skip
            gw = _Gateway(name, outbox, pub)
            self._gws[name] = gw
            await pub.__aenter__()
            self._tasks.append(asyncio.create_task(self._deliver(gw), name=f"deliver-{name}"))
            self._tasks.append(asyncio.create_task(self._confirm(gw), name=f"confirm-{name}"))
        await asyncio.gather(*(gw.publisher.wait_connected(connect_timeout_s) for gw in self._gws.values()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for gw in self._gws.values():
            with contextlib.suppress(Exception):  # teardown: the broker may be gone already
                await asyncio.wait_for(gw.publisher.__aexit__(None, None, None), 5)
            gw.outbox.close()

    # -- publishing --------------------------------------------------------------------------
    def add(self, upload: UploadLike) -> int:
        """Store ``upload`` in its gateway's outbox (seq allocated there, as on an edge) and wake
        its publisher; the seq."""
        gw = self._gws[upload.gateway]
        added = gw.outbox.add_batch(upload.topic, upload.make_payload, prev=upload.prev)
        if added.dropped:
            raise RuntimeError(f"{upload.gateway}: outbox dropped {added.dropped} batch(es)")
        gw.added_at[added.seq] = self.clock()
        gw.readings[added.seq] = upload.readings
        gw.wakeup.set()
        self._added += 1
        return added.seq

    def stats(self) -> FleetStats:
        resent = dropped = backlog = 0
        for gw in self._gws.values():
            s = gw.outbox.stats()
            resent += s.resent
            dropped += s.dropped_total
            backlog += s.pending
        connected = sum(1 for gw in self._gws.values() if gw.publisher.connected)
        return FleetStats(
            self._added, self._confirmed, backlog, resent, self.readings_confirmed, connected, dropped
        )

    def confirmed(self, gateway: str, seq: int) -> bool:
        """Whether ``gateway``'s batch ``seq`` was added and the head-end has confirmed it."""
        gw = self._gws[gateway]
        return seq < gw.outbox.next_seq and seq not in gw.added_at

    def publisher(self, gateway: str) -> Publisher:
        return self._gws[gateway].publisher

    # -- the edge's loops --------------------------------------------------------------------
    async def _deliver(self, gw: _Gateway) -> None:
        await gw.publisher.deliver(gw.outbox, gw.wakeup)

    async def _confirm(self, gw: _Gateway) -> None:
        async for ack in gw.publisher.acks():
            gw.outbox.confirm(ack)
            self._settle(gw, ack)

    def _settle(self, gw: _Gateway, ack: Ack) -> None:
        now = self.clock()
        for lo, hi in ack.seqs:
            for seq in range(lo, hi + 1):
                added = gw.added_at.pop(seq, None)
                if added is None:
                    continue  # confirmed before (a re-send confirmed again), or a replay
                self.latencies_s.append(now - added)
                self._confirmed += 1
                self.readings_confirmed += gw.readings.pop(seq, 0)


class RawClient:
    """One MQTT connection for what no edge's outbox sends: byte-identical replays of batches
    already confirmed, and garbage. ``publish_all`` awaits every PUBACK."""

    def __init__(self, broker_url: str, client_id: str) -> None:
        self._pub = Publisher(broker_url, gateway=client_id, client_id=client_id, backoff_cap_s=2.0)

    async def __aenter__(self) -> RawClient:
        await self._pub.__aenter__()
        await self._pub.wait_connected(30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pub.__aexit__(None, None, None)

    async def publish_all(self, items: list[tuple[str, bytes]], window: int = 100) -> int:
        """Publish every ``(topic, payload)`` QoS 1 (retrying through reconnects); the count.

        Raises:
            TransportTimeout: no connection for 30 s.
        """
        slots = asyncio.Semaphore(window)

        async def one(topic: str, payload: bytes) -> None:
            async with slots:
                while True:
                    await self._pub.wait_connected(30)
                    try:
                        await self._pub.publish(topic, payload)
                        return
                    except ConnectionLostError:  # publish again on the next connection
                        await asyncio.sleep(0.2)

        await asyncio.gather(*(one(t, p) for t, p in items))
        return len(items)
