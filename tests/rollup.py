"""Roll up days the way the ingest worker's rollup job does (read the stored intervals back,
compute the rows, write them), for tests that load a store without running a worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from ingest.config import IngestConfig
from ingest.pipeline.rollup import DAY_MS, DAY_QUANTITIES, rollups
from ingest.pipeline.transform import Settings
from ingest.sinks.base import Rollup, Sink, Writes
from ingest.sinks.influx.sink import InfluxSink


async def roll_up(sink: Sink, s: Settings, gateway: str, day_ms: int) -> list[Rollup]:
    """The day and hour rows of ``gateway``'s local day starting at ``day_ms``, written."""
    stored = await sink.day_intervals(day_ms, day_ms + DAY_MS, DAY_QUANTITIES, gateways=[gateway])
    made = rollups(stored, gateway, {day_ms}, s)
    result = await sink.write(Writes(rollups=made))
    assert result.rejected == (), result.rejected
    return made


def roll_up_days(cfg: IngestConfig, s: Settings, gateways: Iterable[str], days_ms: Iterable[int]) -> None:
    """:func:`roll_up` of every (gateway, day) on the configured InfluxDB."""

    async def run() -> None:
        async with InfluxSink(cfg.influx) as sink:
            for gw in gateways:
                for day in days_ms:
                    await roll_up(sink, s, gw, day)

    asyncio.run(run())
