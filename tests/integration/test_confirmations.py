"""End-to-end confirmations, loss accounting and the shipped broker sizing, against the real
mosquitto and influxd (the fixtures run the shipped broker limits, ingest.broker.limits()).

A test client plays the gateway: it publishes readings batches and listens on
``ami/v1/<gw>/down/ack`` as the edge agent does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main as amigw
from ingest.config import parse_config
from ingest.pipeline.worker import IngestWorker
from protocols import topics
from protocols.acks import decode_ack
from tests.e2e.edge_helpers import MqttRecorder
from tests.integration.test_pipeline import (
    Publisher,
    count,
    ingest_toml,
    series_batches,
    topics_for,
    wait_for,
    written,
)

pytestmark = pytest.mark.integration


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def confirmed(rec: MqttRecorder) -> set[int]:
    """Every seq the head-end confirmed so far."""
    out: set[int] = set()
    for payload in rec.snapshot("/down/ack"):
        for lo, hi in decode_ack(payload).seqs:
            out.update(range(lo, hi + 1))
    return out


def duplicates(w: IngestWorker) -> float:
    return w.metrics.batches.labels("duplicate")._value.get()


async def started(text: str) -> tuple[IngestWorker, asyncio.Task[None]]:
    w = IngestWorker(parse_config(text))
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(w.ready.wait(), 15)
    return w, task


async def stopped(w: IngestWorker, task: asyncio.Task[None]) -> None:
    w.stop()
    await asyncio.wait_for(task, 10)


async def test_gateway_gets_confirmations_a_missing_batch_is_a_gap_with_an_alarm_and_a_resend_closes_it(
    mosquitto: Any, influx_db: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    influxd, db = influx_db
    gw = f"gw-c-{_uid()}"
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [topics.ack(gw)], client_id=f"edge-{_uid()}")
    text = ingest_toml(
        tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw]), loss={"gap_alarm_s": 1.0}
    )
    (tmp_path / "ingest.toml").write_text(text)
    w, task = await started(text)
    pub = Publisher(mosquitto)
    batches = series_batches(gw, ["M1", "M2"], 10)
    try:
        for b in batches:
            if b.seq != 5:  # lost between edge and ingest
                pub.batch(b)
        await wait_for(lambda: confirmed(rec) == {1, 2, 3, 4, 6, 7, 8, 9, 10})
        for payload in rec.snapshot("/down/ack"):
            assert decode_ack(payload).gateway == gw

        # the gap: gauge, CLI, alarm (log, counter, InfluxDB point)
        await wait_for(lambda: w.metrics.missing_batches._value.get() == 1)
        q = f"SELECT * FROM \"alarms\" WHERE kind = 'seq_gap' AND gateway = '{gw}'"
        await wait_for(lambda: bool(influxd.query(q, db=db)))
        (alarm,) = influxd.query(q, db=db)
        assert (alarm["missing"], alarm["first"], alarm["last"], alarm["gaps"]) == (1, 5, 5, 1)
        assert w.metrics.seq_gap_alarms._value.get() == 1
        assert amigw(["ingest", "--config", str(tmp_path / "ingest.toml"), "--loss", "--json"]) == 0
        (acct,) = json.loads(capsys.readouterr().out)["gateways"]
        assert (acct["gateway"], acct["first"], acct["last"], acct["missing"]) == (gw, 1, 10, 1)
        assert [(g["first"], g["last"], g["alarmed"]) for g in acct["gaps"]] == [(5, 5, True)]

        # the edge re-sends 5: confirmed, the gap closes
        pub.batch(batches[4])
        await wait_for(lambda: 5 in confirmed(rec))
        await wait_for(lambda: w.metrics.missing_batches._value.get() == 0)
        assert amigw(["ingest", "--config", str(tmp_path / "ingest.toml"), "--loss"]) == 0
        assert capsys.readouterr().out.startswith("missing 0 batch(es) in 0 gap(s) across 1 gateway(s)")

        # a re-send of a batch already durable (its confirmation was lost): confirmed again, not
        # written again
        acks_before = len(rec.snapshot("/down/ack"))
        pub.batch(batches[2])
        await wait_for(lambda: len(rec.snapshot("/down/ack")) > acks_before)
        assert decode_ack(rec.snapshot("/down/ack")[-1]).seqs == ((3, 3),)
        assert (written(w), duplicates(w)) == (10, 1)
        assert (
            count(influxd, db, 'SELECT count("energy_fwd_active_total") FROM "meter_reading"') == 2 * 10 * 4
        )
        assert w.metrics.seq_gap_alarms._value.get() == 1  # one alarm for the one gap
    finally:
        pub.close()
        rec.client.loop_stop()
        rec.client.disconnect()
        await stopped(w, task)


async def test_an_ingest_outage_longer_than_mosquittos_default_queue_loses_nothing(
    mosquitto: Any, influx_db: Any, tmp_path: Path
) -> None:
    """The worker's session queues its share while it is stopped: with mosquitto's default
    max_queued_messages (1,000) everything past the first 1,000 was dropped; the shipped limits
    hold it all."""
    influxd, db = influx_db
    gw = f"gw-o-{_uid()}"
    n = 1_300
    text = ingest_toml(
        tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw]), queue_max=64,
        pipeline={"publish_intervals": False, "publish_daily": False},
    )  # fmt: skip
    await stopped(*await started(text))  # the session (and its subscription) stays on the broker
    pub = Publisher(mosquitto)
    try:
        for b in series_batches(gw, ["M1"], n, per_batch=1):
            pub.batch(b)
    finally:
        pub.close()
    w, task = await started(text)
    try:
        deadline = time.monotonic() + 240
        while written(w) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert written(w) == n, f"{written(w)} of {n} batches landed"
        assert duplicates(w) == 0
        assert count(influxd, db, 'SELECT count("energy_fwd_active_total") FROM "meter_reading"') == n
    finally:
        await stopped(w, task)
