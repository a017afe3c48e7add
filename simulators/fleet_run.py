"""Publish a :class:`~simulators.fleet.Fleet` to an MQTT broker the way edge agents do.

Each virtual gateway (:class:`simulators.fleet_publish.EdgeFleet`) has the edge's own durable outbox
(:class:`gateway.outbox.Outbox`, one SQLite file per gateway under ``workdir``) and its own MQTT
connection (:class:`gateway.publisher.Publisher`): a batch is stored with its dense sequence number
(``Outbox.add_batch``), published QoS 1 and kept until the head-end confirms it on
``ami/v1/{gateway}/down/ack``, re-sent when unconfirmed after ``ack_timeout_s`` -- the edge agent's
code path, without meters. Replays of old batches (:meth:`Fleet.replays`) are published raw, byte
for byte, beside the outbox.

Time is simulated: boundary ``k``'s uploads go out at their offset after the boundary on a clock
that runs ``speed`` simulated seconds per real second (``speed=0``: as fast as the outboxes take
them). ``run_fleet`` returns when every batch is confirmed, or raises ``TimeoutError`` after
``confirm_timeout_s`` past the last boundary (the outboxes keep what is unconfirmed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from simulators.fleet import Fleet
from simulators.fleet_publish import EdgeFleet

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
    """Publish every boundary of ``fleet`` through per-gateway outboxes and publishers (the
    bench's :class:`~simulators.fleet_publish.EdgeFleet`; see the module docstring);
    ``progress(k, batches, confirmed)`` after each boundary."""
    spec = fleet.spec
    start = time.monotonic()
    edges = EdgeFleet(url, fleet.gateways, Path(workdir), ack_timeout_s=ack_timeout_s, window=window)
    batches = replays = readings = 0
    try:
        await edges.start(30)
        t0 = time.monotonic()
        for k in range(spec.intervals):
            for up in fleet.uploads(k):
                if speed > 0:
                    due = t0 + (k * spec.interval_s + up.offset_s) / speed
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                edges.add(up)
                batches += 1
                readings += up.readings
            for gw, topic, data in fleet.replays(k):
                await edges.publisher(gw).publish(topic, data)
                replays += 1
            if progress is not None:
                progress(k, batches, edges.stats().confirmed)
            await asyncio.sleep(0)
        deadline = time.monotonic() + confirm_timeout_s
        while (left := edges.stats().backlog) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{left} batches not confirmed by the head-end within {confirm_timeout_s} s"
                )
            await asyncio.sleep(0.2)
        confirmed = edges.stats().confirmed
    finally:
        await edges.close()
    return FleetRun(batches, replays, readings, time.monotonic() - start, confirmed)
