"""Publish a :class:`~simulators.fleet.Fleet` to an MQTT broker the way edge agents do.

Each virtual gateway has the edge's own durable outbox (:class:`gateway.outbox.Outbox`, one SQLite
file per gateway under ``workdir``) and its own MQTT connection (:class:`gateway.publisher.Publisher`):
a batch is stored with its dense sequence number (``Outbox.add_batch``), published QoS 1 and kept
until the head-end confirms it on ``ami/v1/{gateway}/down/ack``, re-sent when unconfirmed after
``ack_timeout_s`` -- the edge agent's code path, without meters. Replays of old batches
(:meth:`Fleet.replays`) are published raw, byte for byte, beside the outbox.

Time is simulated: boundary ``k``'s uploads go out at their offset after the boundary on a clock
that runs ``speed`` simulated seconds per real second (``speed=0``: as fast as the outboxes take
them). ``run_fleet`` returns when every batch is confirmed, or raises ``TimeoutError`` after
``confirm_timeout_s`` past the last boundary (the outboxes keep what is unconfirmed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.outbox import Outbox
from gateway.publisher import Publisher
from simulators.fleet import Fleet

__all__ = ["FleetRun", "run_fleet"]


@dataclass(frozen=True, slots=True)
class FleetRun:
    """What a run published: batches added to the outboxes, replays, readings, and wall seconds."""

    batches: int
    replays: int
    readings: int
    wall_s: float
    confirmed: int


async def run_fleet(
    fleet: Fleet,
    url: str,
    workdir: str | Path,
    *,
    speed: float = 0.0,
    ack_timeout_s: float = 30.0,
    confirm_timeout_s: float = 120.0,
    window: int = 100,
    progress: Callable[[int, int, int], None] | None = None,
) -> FleetRun:
    """Publish every boundary of ``fleet`` through per-gateway outboxes and publishers (see the
    module docstring); ``progress(k, batches, confirmed)`` after each boundary."""
    spec = fleet.spec
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        boxes: dict[str, Outbox] = {}
        pubs: dict[str, Publisher] = {}
        wake: dict[str, asyncio.Event] = {}
        for gw in fleet.gateways:
            box = Outbox(
                str(work / f"{gw}.outbox.sqlite"),
                max_bytes=1 << 34,
                confirm="head-end",
                ack_timeout_s=ack_timeout_s,
            )
            stack.callback(box.close)
            boxes[gw] = box
            pubs[gw] = await stack.enter_async_context(
                Publisher(url, gateway=gw, client_id=f"fleet-{gw}", window=window)
            )
            wake[gw] = asyncio.Event()
        tasks = []
        for gw in fleet.gateways:
            tasks.append(asyncio.create_task(pubs[gw].deliver(boxes[gw], wake[gw]), name=f"deliver-{gw}"))
            tasks.append(asyncio.create_task(_confirm(pubs[gw], boxes[gw]), name=f"confirm-{gw}"))
        batches = replays = readings = 0
        try:
            for gw in fleet.gateways:
                await pubs[gw].wait_connected(30)
            t0 = time.monotonic()
            for k in range(spec.intervals):
                for up in fleet.uploads(k):
                    if speed > 0:
                        due = t0 + (k * spec.interval_s + up.offset_s) / speed
                        await asyncio.sleep(max(0.0, due - time.monotonic()))
                    boxes[up.gateway].add_batch(up.topic, up.make_payload, prev=up.prev)
                    wake[up.gateway].set()
                    batches += 1
                    readings += up.readings
                for gw, topic, data in fleet.replays(k):
                    await pubs[gw].publish(topic, data)
                    replays += 1
                if progress is not None:
                    progress(k, batches, sum(b.stats().confirmed for b in boxes.values()))
                await asyncio.sleep(0)
            deadline = time.monotonic() + confirm_timeout_s
            while any(b.stats().pending for b in boxes.values()):
                if time.monotonic() > deadline:
                    left = sum(b.stats().pending for b in boxes.values())
                    raise TimeoutError(
                        f"{left} batches not confirmed by the head-end within {confirm_timeout_s} s"
                    )
                await asyncio.sleep(0.2)
            confirmed = sum(b.stats().confirmed for b in boxes.values())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return FleetRun(batches, replays, readings, time.monotonic() - start, confirmed)


async def _confirm(pub: Publisher, box: Outbox) -> None:
    async for ack in pub.acks():
        box.confirm(ack)
