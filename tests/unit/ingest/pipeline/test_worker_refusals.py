"""IngestWorker's reactions to refused InfluxQL reads and refused writes (pure logic: fake query
and publisher).

The broker and InfluxDB paths are in tests/integration/test_pipeline.py; here only the decision
matters: a refused read must neither lose an obligation nor turn written data into dead letters.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ingest.config import SAMPLE, parse_config
from ingest.pipeline.deadletter import DeadLetterStore
from ingest.pipeline.dedup import DedupStore
from ingest.pipeline.worker import IngestWorker, _Item, _Resources
from protocols.errors import SinkError, SinkRefused

DAY = 1_710_000_000_000


class Query:
    def __init__(self, rows: list[dict[str, Any]] | None = None, error: SinkError | None = None) -> None:
        self.rows_out, self.error, self.asked = rows or [], error, []

    async def rows(self, q: str) -> list[dict[str, Any]]:
        self.asked.append(q)
        if self.error is not None:
            raise self.error
        return self.rows_out


class Publisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish_many(self, items: list[tuple[str, bytes]]) -> None:
        self.sent += items


@pytest.fixture
def worker(tmp_path: Path) -> Any:
    w = IngestWorker(parse_config(SAMPLE))
    dead, dedup = DeadLetterStore(tmp_path / "dl.sqlite"), DedupStore(tmp_path / "dd.sqlite")
    w._res = _Resources(asyncio.Queue(), Query(), dead, dedup, Publisher())  # type: ignore[arg-type]
    yield w
    dead.close()
    dedup.close()


async def test_a_refused_daily_read_back_keeps_the_days_pending(worker: Any) -> None:
    worker._res.dedup.mark("gw-1", 1, daily_days=[DAY])
    worker._res.query = Query(error=SinkError("influxql refused: database not found", retryable=False))
    with pytest.raises(SinkError):
        await worker.publish_daily()
    assert worker._res.dedup.pending_days() == [("gw-1", DAY, 1)] and worker._res.publisher.sent == []


async def test_a_daily_read_back_publishes_the_running_totals_then_drops_the_days(worker: Any) -> None:
    worker._res.dedup.mark("gw-1", 1, daily_days=[DAY])
    row = {"time": DAY, "meter": "M 1", "gateway": "gw-1", "total": 250, "sharp": 0, "peak": 0,
           "flat": 0, "valley": 250, "intervals": 10, "estimated": 2}  # fmt: skip
    worker._res.query = Query(rows=[row, {**row, "time": DAY - 86_400_000}])  # the day before: not owed
    assert await worker.publish_daily() == 1
    [(topic, payload)] = worker._res.publisher.sent
    assert topic == "ami/v1/agg/daily/gw-1" and b'"meter":"M 1","day":"2024-03-10","total":250' in payload
    assert b"2024-03-09" not in payload and worker._res.dedup.pending_days() == []


async def test_a_refused_outage_query_does_not_dead_letter_written_batches(worker: Any) -> None:
    item = _Item(
        SimpleNamespace(), "written", b"x 1\n", out=SimpleNamespace(outage_events=1, outage_ts=(DAY, DAY))
    )
    worker._res.publisher = None
    worker._res.query = Query(error=SinkError("influxql refused", retryable=False))
    await worker._after_write([item])  # logged, not raised: the data is already durable
    assert item.result == "written" and worker._res.dead_letter.count_by_reason() == {}
    worker._res.query = Query(error=SinkError("influxd unreachable", retryable=True))
    with pytest.raises(SinkError):  # retryable: the group is retried as a whole
        await worker._after_write([item])


def test_a_refusal_of_ours_raises_the_alarm_once_per_episode(
    worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    m = worker.metrics
    with caplog.at_level(logging.INFO, logger="amigw.ingest"):
        for _ in range(3):
            worker._sink_failed(SinkRefused("database not found", reason="not_found", status=404))
        worker._sink_failed(SinkError("unreachable", retryable=True))  # an outage: no refusal alarm
        assert m.sink_refused.labels("not_found")._value.get() == 1
        worker._sink_failed(SinkRefused("authorization failed", reason="unauthorized", status=401))
        assert m.sink_refused.labels("not_found")._value.get() == 0
        assert m.sink_refused.labels("unauthorized")._value.get() == 1
        worker._sink_accepted()
        worker._sink_accepted()
    assert m.sink_refused.labels("unauthorized")._value.get() == 0
    assert m.sink_refusals.labels("not_found")._value.get() == 3
    assert m.sink_refusals.labels("unauthorized")._value.get() == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.kv["reason"] for r in errors] == ["not_found", "unauthorized"]  # once per episode
    assert sum("accepts the worker again" in r.getMessage() for r in caplog.records) == 1
