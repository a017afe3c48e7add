"""The ingest pipeline against the real mosquitto and influxd (no fakes): points, flags, intervals,
daily/TOU totals, dead letters, idempotence under redelivery, SIGKILL and restart, back-pressure
through an InfluxDB outage, line-protocol injection, aggregates keyed once per interval, outages.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.config import parse_config
from ingest.pipeline.deadletter import DeadLetterStore
from ingest.pipeline.dedup import DedupStore
from ingest.pipeline.worker import IngestWorker
from ingest.sinks.influx.lines import stored_tag, unescape_tag
from ingest.sinks.influx.sink import InfluxSink
from protocols import topics
from protocols.aggregates import decode_daily, decode_intervals
from protocols.flags import Flag
from protocols.payload import BatchBuilder, Event, ReadingBatch, encode
from tests.e2e.edge_helpers import MqttRecorder

pytestmark = pytest.mark.integration

OUTAGE_S = 60  # the InfluxDB outage (slow run)
SHORT_OUTAGE_S = 6  # the same scenario in the normal run
RSS_BOUND_MB = 64  # growth of a worker's RSS allowed during an outage (queue_max x payload + slack)
ROOT = Path(__file__).resolve().parents[2]
Q = 900_000
T0 = 1_710_000_000_000  # 2024-03-10 00:00 at UTC+8, on the 15-min grid
DAY = dt.date(2024, 3, 10)  # local (UTC+8) day of T0


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def ingest_toml(tmp: Path, mosquitto: Any, influxd: Any, db: str, topics: list[str], **opts: Any) -> str:
    """An ingest config for one test: its own client id, dedup and dead-letter files."""
    pipeline = {
        "retry_initial_s": 0.2,
        "retry_max_s": 1.0,
        "rollup_delay_s": 0.0,
        "rollup_check_s": 0.2,
        **opts.pop("pipeline", {}),
    }
    lines = [
        f"registry = {json.dumps(opts.pop('registry', ''))}",
        "[mqtt]",
        f"url = {json.dumps(mosquitto.url)}",
        f"client_id = {json.dumps(opts.pop('client_id', 'ti-' + _uid()))}",
        f"topics = {json.dumps(topics)}",
        f"queue_max = {opts.pop('queue_max', 8)}",
        "session_expiry_s = 600",
        "[influx]",
        f"url = {json.dumps(influxd.url)}",
        'api = "v1"',
        f"database = {json.dumps(db)}",
        "max_attempts = 2\nbackoff_initial_s = 0.1\nbackoff_max_s = 0.5\ntimeout_s = 5.0",
        "[dead_letter]",
        f"path = {json.dumps(str(tmp / opts.pop('deadletter', 'dead.sqlite')))}",
        "[dedup]",
        f"path = {json.dumps(str(tmp / opts.pop('dedup', 'dedup.sqlite')))}",
        "[loss]",
        f"path = {json.dumps(str(tmp / 'loss.sqlite'))}",
        *(f"{k} = {json.dumps(v)}" for k, v in opts.pop("loss", {}).items()),
        "[pipeline]",
        *(f"{k} = {json.dumps(v)}" for k, v in pipeline.items()),
    ]
    assert not opts, opts
    return "\n".join(lines) + "\n"


def topics_for(group: str, gateways: list[str], events: bool = False) -> list[str]:
    kinds = ["readings", "events"] if events else ["readings"]
    return [f"$share/{group}/ami/v1/{gw}/up/{k}" for gw in gateways for k in kinds]


class Publisher:
    """A plain paho QoS 1 publisher (the test's edge)."""

    def __init__(self, mosquitto: Any) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tp-{_uid()}")
        self.client.max_inflight_messages_set(100)
        self.client.connect(mosquitto.host, mosquitto.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def batch(self, batch: ReadingBatch, encoding: str = "binary") -> None:
        self.send(f"ami/v1/{batch.gateway}/up/readings", encode(batch, encoding))  # type: ignore[arg-type]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def series_batches(
    gw: str, meters: list[str], n_batches: int, per_batch: int = 4, start_seq: int = 1
) -> list[ReadingBatch]:
    """Register reads on the 15-min grid, self-contained (prev = last value sent)."""
    out = []
    for b in range(n_batches):
        bb = BatchBuilder()
        for mi, m in enumerate(meters):
            k0 = b * per_batch
            bb.set_prev(m, 1, 100_000 + 25 * (mi + 1) * k0, T0 + k0 * Q)
            for k in range(k0 + 1, k0 + per_batch + 1):
                bb.add(m, T0 + k * Q, 1, 100_000 + 25 * (mi + 1) * k)
                bb.add(m, T0 + k * Q, 30, 2200 + k)
        out.append(bb.build(gw, start_seq + b, sent_ms=T0 + (b + 1) * per_batch * Q))
    return out


@pytest.fixture
async def run_worker() -> AsyncIterator[Callable[..., Any]]:
    """Start in-process workers from config text; stopped at the end of the test."""
    started: list[tuple[IngestWorker, asyncio.Task[None]]] = []

    async def start(text: str) -> IngestWorker:
        w = IngestWorker(parse_config(text))
        task = asyncio.create_task(w.run())
        await asyncio.wait_for(w.ready.wait(), 15)
        started.append((w, task))
        return w

    yield start
    for w, task in started:
        w.stop()
        await asyncio.wait_for(task, 10)


async def stop(w: IngestWorker) -> None:
    w.stop()
    await asyncio.sleep(0.3)


async def wait_for(pred: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(pred):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out")


def count(influxd: Any, db: str, q: str) -> int:
    rows = influxd.query(q, db=db)
    return int(rows[0]["count"]) if rows else 0


def written(w: IngestWorker) -> float:
    return w.metrics.batches.labels("written")._value.get()


def dump(influxd: Any, db: str) -> dict[str, list[dict[str, Any]]]:
    """Every point of every measurement, with tags (the 'full query results' of a database)."""
    out = {}
    for row in influxd.query("SHOW MEASUREMENTS", db=db):
        m = row["name"]
        out[m] = sorted(
            (json.dumps(r, sort_keys=True) for r in influxd.query(f'SELECT * FROM "{m}" GROUP BY *', db=db)),
        )
    return out


# --------------------------------------------------------------------------------------------


async def test_batches_land_with_flags_intervals_daily_and_a_bad_payload_is_dead_lettered(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    influxd, db = influx_db
    gw = f"gw-a-{_uid()}"
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [f"ami/v1/agg/+/{gw}"], client_id=f"rec-{_uid()}")
    text = ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw]))
    w = await run_worker(text)
    pub = Publisher(mosquitto)
    try:
        good = series_batches(gw, ["M1", "M2"], 2)
        pub.batch(good[0])
        pub.send(f"ami/v1/{gw}/up/readings", b"AMI\x01\xc1 not msgpack")
        bad_index = BatchBuilder()
        bad_index.add("M9", T0 + Q, 1, 5)
        raw = bytearray(encode(bad_index.build(gw, 99)))
        at = raw.index(b"\xa5meter\xc4\x04") + 8
        raw[at : at + 4] = b"\x05\x00\x00\x00"  # meter index 5 of a 1-entry table
        pub.send(f"ami/v1/{gw}/up/readings", bytes(raw))
        pub.batch(good[1], "json")
        # a gap of 2 intervals (estimated) and a register that went backwards on M1
        gap = BatchBuilder()
        gap.set_prev("M1", 1, 100_000 + 25 * 8, T0 + 8 * Q)
        gap.add("M1", T0 + 10 * Q, 1, 100_000 + 25 * 10)
        gap.add("M1", T0 + 11 * Q, 1, 100_000 + 25 * 10 - 50)
        pub.batch(gap.build(gw, 3, sent_ms=T0 + 11 * Q))
        await wait_for(lambda: written(w) == 3)
        dead = w.metrics.dead_letters
        assert dead.labels("undecodable")._value.get() == 1
        assert dead.labels("meter index out of range")._value.get() == 1
        store = DeadLetterStore(tmp_path / "dead.sqlite")
        assert store.count_by_reason("payload") == {"undecodable": 1, "meter index out of range": 1}
        store.close()
        # readings: wide points, exact values, flags as a field where set
        rows = influxd.query(f"SELECT * FROM meter_reading WHERE meter = 'M1' AND gateway = '{gw}'", db=db)
        assert len(rows) == 10
        assert rows[0]["time"] == T0 + Q and rows[0]["energy_fwd_active_total"] == 1000.25
        assert rows[0]["voltage_a"] == 220.1 and rows[0]["energy_fwd_active_total_flags"] is None
        back = next(r for r in rows if r["time"] == T0 + 11 * Q)
        assert back["energy_fwd_active_total_flags"] & Flag.WENT_BACKWARDS
        # intervals: 8 actual for M2; M1 has 8 actual + 2 estimated + 1 invalid (backwards)
        # (wide, like the readings: a field per energy channel, its flags a field where set)
        iv = influxd.query(f"SELECT * FROM intervals WHERE meter = 'M1' AND gateway = '{gw}'", db=db)
        assert len(iv) == 11
        est = [r for r in iv if (r["energy_fwd_active_total_flags"] or 0) & Flag.ESTIMATED]
        assert [(r["time"], r["energy_fwd_active_total"]) for r in est] == [
            (T0 + 9 * Q, 0.25),
            (T0 + 10 * Q, 0.25),
        ]
        assert (
            next(r for r in iv if r["time"] == T0 + 11 * Q)["energy_fwd_active_total_flags"]
            & Flag.WENT_BACKWARDS
        )
        assert [r["energy_fwd_active_total_flags"] for r in iv[:8]] == [None] * 8  # actual: no flags field
        q_m2 = f"SELECT count(energy_fwd_active_total) FROM intervals WHERE meter = 'M2' AND gateway = '{gw}'"
        assert count(influxd, db, q_m2) == 8
        # daily TOU: the day rolled up once its batches are in, one row per meter-day
        await wait_for(lambda: w._res.dedup.pending_periods() == 0)
        assert (
            len(influxd.query(f"SELECT * FROM daily_tou WHERE meter = 'M1' AND gateway = '{gw}'", db=db)) == 1
        )
        daily = influxd.query(
            'SELECT sum("total") AS total, sum("valley") AS valley, sum("intervals") AS n, sum("estimated") AS est '
            "FROM daily_tou WHERE meter = 'M1' GROUP BY meter",
            db=db,
        )
        assert (
            daily[0]["total"] == 250
            and daily[0]["valley"] == 250
            and daily[0]["n"] == 10
            and daily[0]["est"] == 2
        )
        # hourly rows: an interval counts in the hour it starts in (hour 2: 2 estimated + 1 invalid)
        hourly = influxd.query(
            'SELECT sum("total") AS total, sum("intervals") AS n, sum("estimated") AS est, sum("invalid") AS bad '
            f"FROM hourly WHERE meter = 'M1' AND gateway = '{gw}' AND time >= {T0}ms AND time < {T0 + 16 * Q}ms "
            "GROUP BY time(1h) fill(none)",
            db=db,
        )
        assert [(r["time"], r["total"], r["n"], r["est"], r["bad"]) for r in hourly] == [
            (T0, 100, 4, 0, 0),
            (T0 + 4 * Q, 100, 4, 0, 0),
            (T0 + 8 * Q, 50, 2, 2, 1),
        ]
        async with InfluxSink(w.cfg.influx) as sink:
            report = await sink.completeness("M1", DAY)
        assert str(report) == "M1 2024-03-10: 10 of 96 intervals, 0 duplicates, 2 estimated, 1 invalid"

        # aggregates published: every interval once, the day's totals at each rollup of it (a
        # rollup after more data supersedes, so the last one has it all)
        def last_daily() -> dict[str, Any]:
            return {d.meter: d for p in rec.snapshot(f"/daily/{gw}") for d in decode_daily(p)[1]}

        await asyncio.to_thread(
            rec.wait_for, lambda: getattr(last_daily().get("M1"), "intervals", 0) == 10, 10
        )
        recs = [r for p in rec.snapshot(f"/intervals/{gw}") for r in decode_intervals(p)[2]]
        assert len(recs) == 19 and len({(r.meter, r.quantity, r.start_ms) for r in recs}) == 19
        assert len(rec.snapshot(f"/daily/{gw}")) >= 1
        last = last_daily()
        assert last["M1"].total == 250 and last["M1"].intervals == 10
        assert last["M1"].estimated_intervals == 2 and last["M2"].total == 400
    finally:
        pub.close()
        rec.close()
    # the completeness CLI answers the same from InfluxDB
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "ingest", "--config", str(cfg), "--completeness", "M1", "2024-03-10"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert proc.stdout.strip() == "M1 2024-03-10: 10 of 96 intervals, 0 duplicates, 2 estimated, 1 invalid", (
        proc.stderr
    )


async def test_same_batches_twice_leave_the_same_points_as_a_clean_run(
    mosquitto: Any, influxd: Any, tmp_path: Path, run_worker: Any
) -> None:
    gw = f"gw-i-{_uid()}"
    batches = series_batches(gw, ["M1", "M2", "M3"], 4)
    dbs = [f"idem_{_uid()}", f"idem_{_uid()}"]
    pub = Publisher(mosquitto)
    try:
        for run, db in enumerate(dbs):
            influxd.create_database(db)
            copies = 1 if run == 0 else 2
            for c in range(copies):  # the second copy after the dedup store forgot the first
                text = ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw]),
                                   dedup=f"dedup-{run}-{c}.sqlite")  # fmt: skip
                w = await run_worker(text)
                for b in batches:
                    pub.batch(b)
                await wait_for(lambda w=w: written(w) == len(batches))
                await stop(w)
        assert dump(influxd, dbs[0]) == dump(influxd, dbs[1])
        assert dump(influxd, dbs[0])["meter_reading"]
    finally:
        pub.close()
        for db in dbs:
            influxd.drop_database(db)


def _spawn_worker(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "ingest", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(config.with_suffix(".log"), "ab"),
    )


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _readings_in(influxd: Any, db: str, gw: str) -> int:
    return count(
        influxd, db, f"SELECT count(energy_fwd_active_total) FROM meter_reading WHERE gateway = '{gw}'"
    )


async def test_worker_sigkilled_mid_stream_and_restarted_leaves_the_clean_run_points(
    mosquitto: Any, influxd: Any, tmp_path: Path, run_worker: Any
) -> None:
    gw = f"gw-k-{_uid()}"
    meters = [f"K{i}" for i in range(20)]
    batches = series_batches(gw, meters, 40)
    clean_db, crash_db = f"clean_{_uid()}", f"crash_{_uid()}"
    group = f"g{_uid()}"
    pub = Publisher(mosquitto)
    try:
        influxd.create_database(clean_db)
        influxd.create_database(crash_db)
        w = await run_worker(ingest_toml(tmp_path, mosquitto, influxd, clean_db, topics_for(group + "c", [gw]),
                                         dedup="clean.sqlite"))  # fmt: skip
        for b in batches:
            pub.batch(b)
        await wait_for(lambda: written(w) == len(batches))
        await wait_for(lambda: w._res.dedup.pending_periods() == 0)  # every period rolled up
        await stop(w)
        cfg = tmp_path / "crash.toml"
        cfg.write_text(ingest_toml(tmp_path, mosquitto, influxd, crash_db, topics_for(group, [gw]),
                                   client_id=f"crash-{_uid()}", queue_max=4))  # fmt: skip
        proc = _spawn_worker(cfg)
        await wait_for(lambda: "ingest worker started" in cfg.with_suffix(".log").read_text(), 30)
        for b in batches[:20]:
            pub.batch(b)
        await wait_for(lambda: _readings_in(influxd, crash_db, gw) > 0, 30)
        proc.send_signal(signal.SIGKILL)  # mid-stream: messages in its queue are unacknowledged
        proc.wait(10)
        for b in batches[20:]:  # queued by the broker for the dead worker's session
            pub.batch(b)
        proc = _spawn_worker(cfg)
        try:
            expected = len(batches) * len(meters) * 4
            await wait_for(lambda: _readings_in(influxd, crash_db, gw) == expected, 60)
            with DedupStore(tmp_path / "dedup.sqlite") as owed:  # every period rolled up
                await wait_for(lambda: owed.pending_periods() == 0, 30)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        assert dump(influxd, clean_db) == dump(influxd, crash_db)
    finally:
        pub.close()
        for db in (clean_db, crash_db):
            influxd.drop_database(db)


async def _outage(mosquitto: Any, influx_db: Any, tmp_path: Path, outage_s: float) -> None:
    influxd, db = influx_db
    gw = f"gw-o-{_uid()}"
    meters = [f"O{i}" for i in range(50)]
    n_batches = 60
    batches = series_batches(gw, meters, n_batches)
    cfg = tmp_path / "outage.toml"
    cfg.write_text(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw]),
                               client_id=f"out-{_uid()}", queue_max=8))  # fmt: skip
    proc = _spawn_worker(cfg)
    pub = Publisher(mosquitto)
    try:
        await wait_for(lambda: "ingest worker started" in cfg.with_suffix(".log").read_text(), 30)
        for b in batches[:5]:
            pub.batch(b)
        await wait_for(lambda: _readings_in(influxd, db, gw) == 5 * len(meters) * 4, 30)
        rss_before = _rss_kb(proc.pid)
        influxd.stop()
        t_end = time.monotonic() + outage_s
        for b in batches[5:]:  # published during the outage: the worker takes queue_max and stops
            pub.batch(b)
        rss_max = rss_before
        while time.monotonic() < t_end:
            rss_max = max(rss_max, _rss_kb(proc.pid))
            assert proc.poll() is None, "the worker died during the outage"
            await asyncio.sleep(0.5)
        influxd.start()
        await wait_for(lambda: _readings_in(influxd, db, gw) == n_batches * len(meters) * 4, 90)
        assert (rss_max - rss_before) / 1024 < RSS_BOUND_MB, (rss_before, rss_max)
        assert (
            count(influxd, db, f"SELECT count(energy_fwd_active_total) FROM intervals WHERE gateway = '{gw}'")
            == n_batches * 50 * 4
        )
    finally:
        pub.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


async def test_periods_owed_at_a_crash_are_rolled_up_by_the_next_start(
    mosquitto: Any, influx_db: Any, tmp_path: Path
) -> None:
    """The (gateway, day) keys are durable before the ack: a worker SIGKILLed across a day's close
    (its rollup not yet done) leaves them in the dedup store, and the next start writes the day's
    and its hours' rows and publishes the day's totals."""
    influxd, db = influx_db
    gw = f"gw-d-{_uid()}"
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [f"ami/v1/agg/daily/{gw}"], client_id=f"rec-{_uid()}")
    topics = topics_for(f"g{_uid()}", [gw])
    client_id = f"daily-{_uid()}"
    pub = Publisher(mosquitto)
    try:
        never = tmp_path / "never.toml"  # periods due an hour after their close: none before the kill
        never.write_text(ingest_toml(tmp_path, mosquitto, influxd, db, topics, client_id=client_id,
                                     pipeline={"rollup_delay_s": 3600}))  # fmt: skip
        proc = _spawn_worker(never)
        await wait_for(lambda: "ingest worker started" in never.with_suffix(".log").read_text(), 30)
        for b in series_batches(gw, ["D1", "D2"], 3):
            pub.batch(b)
        await wait_for(lambda: _readings_in(influxd, db, gw) == 24, 30)
        store = DedupStore(tmp_path / "dedup.sqlite")
        await wait_for(lambda: store.pending_periods() == 1, 10)  # the day (its hours go with it)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert store.pending_periods() == 1 and rec.snapshot(f"/daily/{gw}") == []
        assert influxd.query(f"SELECT * FROM daily_tou WHERE gateway = '{gw}'", db=db) == []

        soon = tmp_path / "soon.toml"
        soon.write_text(ingest_toml(tmp_path, mosquitto, influxd, db, topics, client_id=client_id))
        proc = _spawn_worker(soon)
        try:
            await asyncio.to_thread(rec.wait_for, lambda: len(rec.snapshot(f"/daily/{gw}")) >= 1, 30)
            totals = {d.meter: d for p in rec.snapshot(f"/daily/{gw}") for d in decode_daily(p)[1]}
            assert (totals["D1"].total, totals["D1"].intervals) == (300, 12)
            assert (totals["D2"].total, totals["D2"].intervals) == (600, 12)
            await wait_for(lambda: store.pending_periods() == 0, 10)
            days = influxd.query(
                f"SELECT total, intervals FROM daily_tou WHERE gateway = '{gw}' GROUP BY meter", db=db
            )
            assert sorted((r["meter"], r["time"], r["total"], r["intervals"]) for r in days) == [
                ("D1", T0, 300, 12), ("D2", T0, 600, 12),
            ]  # fmt: skip
            hours = influxd.query(f"SELECT total FROM hourly WHERE gateway = '{gw}' AND meter = 'D1'", db=db)
            assert [(r["time"], r["total"]) for r in hours] == [
                (T0, 100),
                (T0 + 4 * Q, 100),
                (T0 + 8 * Q, 100),
            ]
        finally:
            proc.terminate()
            proc.wait(10)
        store.close()
    finally:
        pub.close()
        rec.close()


async def test_sighup_reloads_the_registry_of_a_running_worker(
    mosquitto: Any, influx_db: Any, tmp_path: Path
) -> None:
    """R2 is not in the registry: its 10 kWh in 15 minutes cannot be judged (no rating). After the
    file gains R2 (220 V, 60 A: at most ~3.6 kWh per interval) and a SIGHUP, the same jump is a
    SPIKE. A broken file on the next SIGHUP keeps the registry in force."""
    influxd, db = influx_db
    gw = f"gw-h-{_uid()}"
    reg = tmp_path / "meters.toml"
    row = "voltage_v = 220\nimax_a = 60\nphases = 1\n"
    reg.write_text(f'[meters."R1"]\n{row}')
    cfg = tmp_path / "reload.toml"
    cfg.write_text(
        ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw]), registry=str(reg))
    )
    log = cfg.with_suffix(".log")
    proc = _spawn_worker(cfg)
    pub = Publisher(mosquitto)

    def jump(seq: int) -> ReadingBatch:
        b = BatchBuilder()
        b.set_prev("R2", 1, 100_000 + 1_000 * (seq - 1), T0 + (seq - 1) * Q)
        b.add("R2", T0 + seq * Q, 1, 100_000 + 1_000 * seq)
        return b.build(gw, seq, sent_ms=T0 + seq * Q)

    def flags_at(k: int) -> int | None:
        rows = influxd.query(
            f"SELECT * FROM meter_reading WHERE meter = 'R2' AND time = {T0 + k * Q}ms", db=db
        )
        return rows[0].get("energy_fwd_active_total_flags") if rows else -1

    try:
        await wait_for(lambda: "ingest worker started" in log.read_text(), 30)
        pub.batch(jump(1))
        await wait_for(lambda: flags_at(1) != -1)
        assert flags_at(1) is None  # written, no flag: an unknown meter's rating is not judged
        reg.write_text(f'[meters."R1"]\n{row}[meters."R2"]\n{row}')
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: '"registry reloaded" meters=2' in log.read_text(), 10)
        pub.batch(jump(2))
        await wait_for(lambda: flags_at(2) != -1)
        assert flags_at(2) & Flag.SPIKE
        reg.write_text('[meters."R1"]\nvoltage_v = "high"\n')
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "registry reload failed" in log.read_text(), 10)
        pub.batch(jump(3))
        await wait_for(lambda: flags_at(3) != -1)
        assert flags_at(3) & Flag.SPIKE and proc.poll() is None  # the old registry still in force
    finally:
        pub.close()
        proc.terminate()
        proc.wait(10)


async def test_influx_outage_applies_back_pressure_and_loses_nothing(
    mosquitto: Any, influx_db: Any, tmp_path: Path
) -> None:
    await _outage(mosquitto, influx_db, tmp_path, SHORT_OUTAGE_S)


@pytest.mark.slow
async def test_influx_outage_of_a_minute(mosquitto: Any, influx_db: Any, tmp_path: Path) -> None:
    await _outage(mosquitto, influx_db, tmp_path, OUTAGE_S)


CRAFTED = [
    'm 1,x=2 y="q"',
    "m\\2\\",
    "m\n3\rtab\t",
    "m=4,,==",
    "表计-5 ü é",
    "m'6'%20",
]


async def test_crafted_ids_are_stored_verbatim_and_add_no_fields_or_points(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    influxd, db = influx_db
    gws = ['gw x,y=z "q" \\ ü-' + _uid(), "gw=2,a b'" + _uid()]
    w = await run_worker(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", gws)))
    pub = Publisher(mosquitto)
    try:
        for seq, gw in enumerate(gws, 1):
            pub.batch(series_batches(gw, CRAFTED, 1, per_batch=2, start_seq=seq)[0])
        await wait_for(lambda: written(w) == 2)
    finally:
        pub.close()
    rows = influxd.query("SELECT * FROM meter_reading GROUP BY *", db=db)
    assert len(rows) == len(gws) * len(CRAFTED) * 2
    assert {(unescape_tag(r["gateway"]), unescape_tag(r["meter"])) for r in rows} == {
        (g, m) for g in gws for m in CRAFTED
    }
    for r in rows:  # what needs no percent-encoding is stored byte for byte
        if not any(c in r["meter"] for c in "%\\\n\r\t"):
            assert r["meter"] in CRAFTED
    fields = {r["fieldKey"] for r in influxd.query("SHOW FIELD KEYS FROM meter_reading", db=db)}
    assert fields == {"energy_fwd_active_total", "voltage_a"}
    tags = {r["tagKey"] for r in influxd.query("SHOW TAG KEYS FROM meter_reading", db=db)}
    assert tags == {"meter", "gateway"}
    assert len(influxd.query("SHOW SERIES FROM meter_reading", db=db)) == len(gws) * len(CRAFTED)
    assert {
        r["value"] for r in influxd.query("SHOW TAG VALUES FROM meter_reading WITH KEY = meter", db=db)
    } == {stored_tag(m) for m in CRAFTED}
    assert (
        count(influxd, db, "SELECT count(energy_fwd_active_total) FROM intervals")
        == len(gws) * len(CRAFTED) * 2
    )
    assert {r["tagKey"] for r in influxd.query("SHOW TAG KEYS FROM intervals", db=db)} == {"meter", "gateway"}


async def test_intervals_topic_gets_each_interval_once_under_redelivery(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    influxd, db = influx_db
    gw = f"gw-g-{_uid()}"
    rec = MqttRecorder(
        mosquitto.host, mosquitto.port, [f"ami/v1/agg/intervals/{gw}"], client_id=f"rec-{_uid()}"
    )
    w = await run_worker(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw])))
    pub = Publisher(mosquitto)
    batches = series_batches(gw, ["A1", "A2"], 3)
    try:
        for b in batches + batches[1:]:  # two batches redelivered
            pub.batch(b)
        await wait_for(lambda: written(w) == 3 and w.metrics.batches.labels("duplicate")._value.get() == 2)
        await asyncio.to_thread(rec.wait_for, lambda: len(rec.snapshot()) >= 3, 10)
        await asyncio.sleep(0.5)
        recs = [r for p in rec.snapshot() for r in decode_intervals(p)[2]]
        keys = [(r.meter, r.quantity, r.start_ms) for r in recs]
        assert len(keys) == len(set(keys)) == 2 * 3 * 4
        assert all(r.energy in (25, 50) and r.flags == 0 for r in recs)
    finally:
        pub.close()
        rec.close()


async def test_power_down_events_of_one_area_raise_one_alarm(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    influxd, db = influx_db
    gw = f"gw-e-{_uid()}"
    reg = tmp_path / "meters.toml"
    reg.write_text(
        "".join(
            f'[meters."E{i}"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\narea = "TA-1"\n' for i in range(6)
        )
        + '[meters."X1"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\narea = "TA-2"\n'
    )
    w = await run_worker(
        ingest_toml(
            tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw], events=True), registry=str(reg)
        )
    )
    pub = Publisher(mosquitto)
    try:
        for i in range(5):  # 5 of the 6 customers of TA-1 within 40 s; one meter of TA-2
            ev = Event(f"{gw}-ev-{i}", gw, "power_down", T0 + i * 10_000, f"E{i}")
            pub.send(f"ami/v1/{gw}/up/events", ev.to_json())
        pub.send(f"ami/v1/{gw}/up/events", Event(f"{gw}-x", gw, "power_down", T0, "X1").to_json())
        pub.send(f"ami/v1/{gw}/up/events", b'{"v":1,"type":"event"}')
        await wait_for(lambda: count(influxd, db, "SELECT count(id) FROM events") == 6)
        await wait_for(lambda: w.metrics.dead_letters.labels("undecodable event")._value.get() == 1)
        # the alarm is written after the events it is derived from: wait for it, then let any
        # (wrong) second alarm have time to appear before counting
        await wait_for(lambda: len(influxd.query("SELECT * FROM alarms", db=db)) >= 1)
        await asyncio.sleep(1.0)
    finally:
        pub.close()
    alarms = influxd.query("SELECT * FROM alarms", db=db)
    assert len(alarms) == 1 and alarms[0]["area"] == "TA-1" and alarms[0]["time"] == T0 + 20_000
    assert alarms[0]["events"] == 5


async def test_an_outage_handled_out_of_order_is_one_alarm_at_its_first_power_down(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    """The later power-downs of an outage are correlated first (their batches came first: another
    worker, a re-sent batch): the alarm opens on them, is published once, and moves back to the
    time the outage has in order when the earlier ones arrive -- one alarm, not one per order."""
    influxd, db = influx_db
    gw = f"gw-o-{_uid()}"
    reg = tmp_path / "meters.toml"
    reg.write_text(
        "".join(
            f'[meters."E{i}"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\narea = "TA-1"\n' for i in range(6)
        )
    )
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [topics.ALARMS], client_id=f"rec-{_uid()}")
    await run_worker(
        ingest_toml(
            tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw], events=True), registry=str(reg)
        )
    )
    pub = Publisher(mosquitto)

    def down(*meters: int) -> None:
        for i in meters:
            ev = Event(f"{gw}-ev-{i}", gw, "power_down", T0 + i * 10_000, f"E{i}")
            pub.send(f"ami/v1/{gw}/up/events", ev.to_json())

    def alarms() -> list[tuple[int, int]]:
        return [(r["time"], r["events"]) for r in influxd.query("SELECT * FROM alarms", db=db)]

    try:
        down(4, 3, 2)  # the outage's later three meters, 20-40 s in: enough for an alarm
        await wait_for(lambda: alarms() == [(T0 + 40_000, 3)])
        down(1)
        await wait_for(lambda: alarms() == [(T0 + 30_000, 4)])
        down(0)
        await wait_for(lambda: alarms() == [(T0 + 20_000, 5)])  # where the in-order run puts it
        await asyncio.sleep(1.0)  # room for a (wrong) second alarm or publish
    finally:
        pub.close()
        rec.close()
    assert alarms() == [(T0 + 20_000, 5)]
    published = [json.loads(p) for p in rec.snapshot()]
    assert [(a["area"], a["ts_ms"]) for a in published] == [("TA-1", T0 + 40_000)]  # once, as opened


async def test_collapsed_voltages_of_one_area_raise_one_alarm(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    """OUT-01 from readings (no power-down events): every phase voltage of 4 of TA-1's 6 meters
    collapses within 30 s; the pipeline writes 4 voltage_collapsed events and one area alarm."""
    influxd, db = influx_db
    gw = f"gw-v-{_uid()}"
    reg = tmp_path / "meters.toml"
    reg.write_text(
        "".join(
            f'[meters."V{i}"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\narea = "TA-1"\n' for i in range(6)
        )
    )
    w = await run_worker(
        ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw]), registry=str(reg))
    )
    pub = Publisher(mosquitto)
    try:
        b = BatchBuilder()
        for i in range(6):  # V0..V3 collapse (0.0 V and 95.0 V < 60 % of 220 V); V4, V5 stay normal
            b.add(f"V{i}", T0 + i * 10_000, 30, (0, 950, 0, 950, 2200, 2180)[i])
        pub.batch(b.build(gw, 1, sent_ms=T0 + 60_000))
        await wait_for(lambda: written(w) == 1)
        await wait_for(lambda: len(influxd.query("SELECT * FROM alarms", db=db)) >= 1)
        await asyncio.sleep(1.0)  # room for a (wrong) second alarm
    finally:
        pub.close()
    events = influxd.query("SELECT * FROM events WHERE kind = 'voltage_collapsed'", db=db)
    assert sorted(r["meter"] for r in events) == ["V0", "V1", "V2", "V3"]
    alarms = influxd.query("SELECT * FROM alarms", db=db)
    assert len(alarms) == 1 and alarms[0]["area"] == "TA-1" and alarms[0]["time"] == T0 + 20_000
    assert alarms[0]["events"] == 4


async def test_tou_split_is_cross_checked_against_the_tariff_registers_in_influxdb(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    """VEE-15 through InfluxDB: 00:00-01:00 local is valley in the built-in calendar. Meter OK's
    T4 (valley) register agrees; meter BAD's energy lands on T2 (peak): the day shows it."""
    influxd, db = influx_db
    gw = f"gw-t-{_uid()}"
    w = await run_worker(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw])))
    pub = Publisher(mosquitto)
    try:
        b = BatchBuilder()
        for m, tariff in (("OK", 5), ("BAD", 3)):
            for q in (1, tariff):
                b.set_prev(m, q, 1000, T0)
                for k in range(1, 5):
                    b.add(m, T0 + k * Q, q, 1000 + 25 * k)
        pub.batch(b.build(gw, 1, sent_ms=T0 + 4 * Q))
        await wait_for(lambda: written(w) == 1)
        await wait_for(lambda: w._res.dedup.pending_periods() == 0)
    finally:
        pub.close()
    rows = influxd.query(
        'SELECT sum("valley") AS valley, sum("peak") AS peak, sum("reg_valley") AS reg_valley, '
        'sum("reg_peak") AS reg_peak, sum("tou_mismatch") AS mismatch '
        f"FROM daily_tou WHERE gateway = '{gw}' GROUP BY meter",
        db=db,
    )
    got = {r["meter"]: (r["valley"], r["peak"], r["reg_valley"], r["reg_peak"], r["mismatch"]) for r in rows}
    assert got == {"OK": (100, 0, 100, 0, 0), "BAD": (100, 0, 0, 100, 1)}


def _children(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


async def test_workers_option_runs_n_workers_restarts_a_dead_one_and_loses_nothing(
    mosquitto: Any, influx_db: Any, tmp_path: Path
) -> None:
    """`amigw ingest --workers 2`: two worker processes on the shared subscription; one is
    SIGKILLed mid-stream, the supervisor restarts it, and every reading still lands once."""
    influxd, db = influx_db
    gw = f"gw-w-{_uid()}"
    meters = [f"W{i}" for i in range(10)]
    batches = series_batches(gw, meters, 30)
    cfg = tmp_path / "workers.toml"
    cfg.write_text(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw])))
    with cfg.with_suffix(".log").open("ab") as log:  # the children inherit the descriptor
        argv = [sys.executable, "-m", "gateway.cli", "ingest", "--config", str(cfg), "--workers", "2"]
        sup = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    pub = Publisher(mosquitto)
    try:
        await wait_for(lambda: cfg.with_suffix(".log").read_text().count("ingest worker started") >= 2, 60)
        first = _children(sup.pid)
        assert len(first) == 2
        for b in batches[:15]:
            pub.batch(b)
        await wait_for(lambda: _readings_in(influxd, db, gw) > 0, 30)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        for b in batches[15:]:
            pub.batch(b)
        await wait_for(lambda: len(_children(sup.pid)) == 2 and victim not in _children(sup.pid), 30)
        expected = len(batches) * len(meters) * 4
        await wait_for(lambda: _readings_in(influxd, db, gw) == expected, 60)
        await asyncio.sleep(1.0)
        assert _readings_in(influxd, db, gw) == expected  # exactly once, not more
    finally:
        pub.close()
        sup.send_signal(signal.SIGTERM)
        sup.wait(40)
    assert sup.returncode == 0
