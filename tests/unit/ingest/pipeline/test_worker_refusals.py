"""IngestWorker's reactions to refused sink reads and refused writes, and which commit step a
failure retries (pure logic: fake sink and publisher).

The broker and InfluxDB paths are in tests/integration/test_pipeline.py; here only the decision
matters: a refused read must neither lose an obligation nor turn written data into dead letters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ingest.config import SAMPLE, parse_config
from ingest.pipeline.deadletter import DeadLetterStore
from ingest.pipeline.dedup import DedupStore
from ingest.pipeline.worker import IngestWorker, _drain, _Item, _Resources
from ingest.sinks.base import Rejected, WriteResult, Writes
from protocols.errors import SinkError, SinkRefused

DAY = 1_710_000_000_000


class FakeSink:
    """The reads the worker makes, raising ``error`` if given; writes recorded (prepared, then
    each send of the prepared object), answering ``result``, the first sends raising
    ``send_errors`` one by one."""

    def __init__(self, error: SinkError | None = None) -> None:
        self.error, self.asked = error, []
        self.result = WriteResult(0)
        self.written: list[Writes] = []
        self.sent: list[object] = []
        self.send_errors: list[SinkError] = []

    async def outage_events(self, t_lo_ms: int, t_hi_ms: int) -> list[Any]:
        self.asked.append((t_lo_ms, t_hi_ms))
        if self.error is not None:
            raise self.error
        return []

    def prepare(self, writes: Writes) -> object:
        self.written.append(writes)
        return SimpleNamespace(writes=writes)

    async def send(self, prepared: object) -> WriteResult:
        self.sent.append(prepared)
        if self.send_errors:
            raise self.send_errors.pop(0)
        return self.result

    async def write(self, writes: Writes) -> WriteResult:
        return await self.send(self.prepare(writes))


class Publisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish_many(self, items: list[tuple[str, bytes]]) -> None:
        self.sent += items


@pytest.fixture
def worker(tmp_path: Path) -> Any:
    cfg = parse_config(SAMPLE)
    fast = {"retry_initial_s": 0.001, "retry_max_s": 0.001}  # back-off without waiting
    w = IngestWorker(dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, **fast)))
    dead, dedup = DeadLetterStore(tmp_path / "dl.sqlite"), DedupStore(tmp_path / "dd.sqlite")
    w._res = _Resources(asyncio.Queue(), dead, dedup, Publisher())  # type: ignore[arg-type]
    w.use_sink = lambda sink: (_drain(w._res.sinks), w._res.sinks.put_nowait(sink))
    w.use_sink(FakeSink())
    yield w
    dead.close()
    dedup.close()


async def test_a_refused_outage_query_does_not_dead_letter_written_batches(worker: Any) -> None:
    item = _Item(SimpleNamespace(), "written", out=SimpleNamespace(outage_events=1, outage_ts=(DAY, DAY)))
    worker._res.publisher = None
    worker.use_sink(FakeSink(error=SinkError("influxql refused", retryable=False)))
    await worker._after_write([item])  # logged, not raised: the data is already durable
    assert item.result == "written" and worker._res.dead_letter.count_by_reason() == {}
    worker.use_sink(FakeSink(error=SinkError("influxd unreachable", retryable=True)))
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


async def test_records_the_sink_rejects_are_dead_lettered_by_the_worker_with_the_stores_reason(
    worker: Any,
) -> None:
    """The sink reports rejected records back; the worker (not the sink) dead-letters them."""
    sink = FakeSink()
    sink.result = WriteResult(3, (Rejected(b"m x=1 5\n", "field type conflict", "partial write: dropped=1"),))
    worker.use_sink(sink)
    await worker._write(Writes())
    [entry] = worker._res.dead_letter.list()
    assert (entry.kind, entry.reason, entry.payload) == ("line", "field type conflict", b"m x=1 5\n")
    assert entry.detail == "partial write: dropped=1" and len(sink.written) == 1
    assert worker.metrics.sink_lines_dead_lettered._value.get() == 1


def _group_item(outage: bool = False) -> _Item:
    out = SimpleNamespace(flat_gaps=False, columns="columns", outage_events=int(outage), outage_ts=(DAY, DAY))
    return _Item(SimpleNamespace(), "written", out=out)


async def test_a_failed_send_is_retried_with_the_same_prepared_write(worker: Any) -> None:
    """Prepared once, sent again (the sink resumes it) until written; a refusal raises the alarm
    while it lasts and the accepted write ends it."""
    sink = FakeSink()
    sink.send_errors = [
        SinkError("influxd unreachable", retryable=True),
        SinkRefused("database not found", reason="not_found", status=404),
    ]
    worker.use_sink(sink)
    await worker._durable([_group_item()])
    assert len(sink.written) == 1 and len(sink.sent) == 3
    assert sink.sent[0] is sink.sent[1] is sink.sent[2]
    assert worker.metrics.sink_retries._value.get() == 2
    assert worker.metrics.sink_refusals.labels("not_found")._value.get() == 1
    assert worker.metrics.sink_refused.labels("not_found")._value.get() == 0  # accepted: cleared


async def test_a_failed_outage_correlation_retries_only_that_step_not_the_write(worker: Any) -> None:
    class FlakyReads(FakeSink):
        async def outage_events(self, t_lo_ms: int, t_hi_ms: int) -> list[Any]:
            self.asked.append((t_lo_ms, t_hi_ms))
            if len(self.asked) == 1:
                raise SinkError("influxd unreachable", retryable=True)
            return []

    sink = FlakyReads()
    worker._res.publisher = None
    worker.use_sink(sink)
    await worker._durable([_group_item(outage=True)])
    assert len(sink.asked) == 2  # the correlation, again
    assert len(sink.written) == 1 and len(sink.sent) == 1  # the write, once
    assert worker.metrics.sink_retries._value.get() == 1


async def test_a_replay_gives_up_after_the_influx_max_attempts(worker: Any) -> None:
    """The dead-letter replay retries a failing write a bounded number of times, then raises."""
    worker.cfg = dataclasses.replace(
        worker.cfg,
        influx=dataclasses.replace(
            worker.cfg.influx, max_attempts=3, backoff_initial_s=0.001, backoff_max_s=0.001
        ),
    )
    sink = FakeSink()
    sink.send_errors = [SinkError("influxd unreachable", retryable=True)] * 5
    worker.use_sink(sink)
    worker._replaying = True
    with pytest.raises(SinkError, match="unreachable"):
        await worker._durable([_group_item()])
    assert len(sink.written) == 1 and len(sink.sent) == 3
    sink.send_errors = [SinkError("influxd unreachable", retryable=True)]  # a short hiccup
    await worker._durable([_group_item()])
    assert len(sink.sent) == 3 + 2
