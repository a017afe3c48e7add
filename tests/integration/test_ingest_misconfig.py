"""Ingest against a misconfigured or absent InfluxDB (real mosquitto and influxd, no fakes).

A missing database and refused credentials are the head-end's own fault: nothing may be
dead-lettered or acknowledged, an alarm must be raised, and once fixed every batch lands exactly
once. ``--check-config`` probes the server; ``--replay-dead-letters`` brings dead-lettered
payloads back once their cause is fixed; the queue gauges move while InfluxDB is down.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ingest.pipeline.deadletter import DeadLetterStore
from ingest.pipeline.dedup import DedupStore
from ingest.pipeline.worker import IngestWorker
from protocols.payload import Event, encode
from simulators.servers import free_port
from tests.conftest import INFLUX_ADMIN
from tests.integration import test_pipeline
from tests.integration.test_pipeline import (
    ROOT,
    Publisher,
    _readings_in,
    _uid,
    count,
    ingest_toml,
    series_batches,
    topics_for,
    wait_for,
    written,
)

pytestmark = pytest.mark.integration

run_worker = test_pipeline.run_worker  # the fixture: in-process workers, stopped after the test

METERS = ["M1", "M2"]
PER_BATCH = len(METERS) * 4  # readings per batch of series_batches(..., per_batch=4)


def _with(text: str, section: str, *lines: str) -> str:
    """``text`` with ``lines`` added at the top of ``[section]``."""
    return text.replace(f"[{section}]\n", f"[{section}]\n" + "".join(f"{line}\n" for line in lines), 1)


def _gauge(w: IngestWorker, name: str, *labels: str) -> float:
    metric = getattr(w.metrics, name)
    return float((metric.labels(*labels) if labels else metric)._value.get())


def _dead_letters(tmp_path: Path) -> dict[str, int]:
    with DeadLetterStore(tmp_path / "dead.sqlite") as store:
        return store.count_by_reason()


async def _refused_then_fixed(
    run_worker: Any, mosquitto: Any, tmp_path: Path, gw: str, configs: tuple[str, str], reason: str,
    readings: Callable[[], int],
) -> None:  # fmt: skip
    """Publish while the broken config is in force: the alarm is up (from the start probe
    already), nothing is dead-lettered or acknowledged. Then a worker on the same session with the
    fixed config writes every batch exactly once (``readings()``: what InfluxDB holds of ``gw``)."""
    broken, fixed = configs
    w = await run_worker(broken)
    await wait_for(lambda: _gauge(w, "sink_refused", reason) == 1, 20)  # the probe, before any message
    batches = series_batches(gw, METERS, 5)
    pub = Publisher(mosquitto)
    try:
        for b in batches:
            pub.batch(b)
        consumer = w._res.consumer
        await wait_for(lambda: consumer.stats.received >= 5, 20)
        await wait_for(lambda: _gauge(w, "sink_refusals", reason) >= 3, 20)  # retried, not given up
        assert consumer.stats.acked == 0 and written(w) == 0
        assert _dead_letters(tmp_path) == {}
        assert _gauge(w, "sink_refused", reason) == 1 and _gauge(w, "unacked") >= 1
        w.stop()
        await asyncio.sleep(0.5)  # nothing was acknowledged: the session keeps all five

        again = await run_worker(fixed)
        await wait_for(lambda: written(again) == 5, 30)
        assert readings() == 5 * PER_BATCH
        assert _gauge(again, "sink_refused", reason) == 0 and _dead_letters(tmp_path) == {}
        with DedupStore(tmp_path / "dedup.sqlite") as dedup:
            assert all(dedup.seen(b.gateway, b.seq) for b in batches)
        await asyncio.sleep(1.0)
        assert written(again) == 5  # exactly once: no batch came back a second time
    finally:
        pub.close()


async def test_a_missing_database_keeps_every_batch_then_create_database_lands_each_once(
    mosquitto: Any, influxd: Any, tmp_path: Path, run_worker: Any
) -> None:
    db = f"t_missing_{uuid.uuid4().hex[:8]}"
    gw = f"gw-m-{_uid()}"
    client_id = f"miss-{_uid()}"
    broken = ingest_toml(
        tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw]), client_id=client_id
    )
    fixed = _with(broken, "influx", "create_database = true")
    try:
        await _refused_then_fixed(
            run_worker,
            mosquitto,
            tmp_path,
            gw,
            (broken, fixed),
            "not_found",
            lambda: _readings_in(influxd, db, gw),
        )
    finally:
        if db in influxd.databases():
            influxd.drop_database(db)


async def test_a_missing_database_created_by_hand_while_the_worker_waits(
    mosquitto: Any, influxd: Any, tmp_path: Path, run_worker: Any
) -> None:
    db = f"t_late_{uuid.uuid4().hex[:8]}"
    gw = f"gw-l-{_uid()}"
    w = await run_worker(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw])))
    pub = Publisher(mosquitto)
    try:
        for b in series_batches(gw, METERS, 3):
            pub.batch(b)
        await wait_for(lambda: _gauge(w, "sink_refusals", "not_found") >= 2, 20)
        assert written(w) == 0 and _dead_letters(tmp_path) == {}
        influxd.create_database(db)
        await wait_for(lambda: written(w) == 3, 30)
        assert _readings_in(influxd, db, gw) == 3 * PER_BATCH and _gauge(w, "sink_refused", "not_found") == 0
        assert _gauge(w, "unacked") == 0 and _dead_letters(tmp_path) == {}
    finally:
        pub.close()
        influxd.drop_database(db)


@pytest.mark.parametrize("refusal", ["unauthorized", "forbidden"])
async def test_refused_credentials_keep_every_batch_then_the_right_ones_land_each_once(
    mosquitto: Any, influxd_auth: Any, tmp_path: Path, run_worker: Any, refusal: str
) -> None:
    """401: a wrong password; 403: a user with READ only. Fixed: the admin's credentials."""
    server = influxd_auth
    db = f"t_auth_{uuid.uuid4().hex[:8]}"
    server.create_database(db)
    gw = f"gw-c-{_uid()}"
    text = ingest_toml(
        tmp_path, mosquitto, server, db, topics_for(f"g{_uid()}", [gw]), client_id=f"auth-{_uid()}"
    )
    if refusal == "unauthorized":
        broken = _with(text, "influx", f'username = "{INFLUX_ADMIN[0]}"', 'password = "wrong"')
    else:
        reader = f"reader_{_uid()}"
        server.create_user(reader, "r", {db: "READ"})
        broken = _with(text, "influx", f'username = "{reader}"', 'password = "r"')
    fixed = _with(text, "influx", f'username = "{INFLUX_ADMIN[0]}"', f'password = "{INFLUX_ADMIN[1]}"')
    try:
        await _refused_then_fixed(
            run_worker,
            mosquitto,
            tmp_path,
            gw,
            (broken, fixed),
            refusal,
            lambda: _readings_in(server, db, gw),
        )
    finally:
        server.drop_database(db)


def _amigw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "ingest", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_config_probes_influxdb(
    mosquitto: Any, influxd: Any, influxd_auth: Any, tmp_path: Path
) -> None:
    """Before, --check-config said ok without asking InfluxDB anything."""
    missing = f"t_nope_{uuid.uuid4().hex[:8]}"
    ok_db = f"t_ok_{uuid.uuid4().hex[:8]}"
    influxd.create_database(ok_db)
    influxd_auth.create_database(ok_db)
    topics = topics_for("g", ["gw-1"])

    def check(
        name: str, server: Any, db: str, *influx: str, url: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        text = _with(ingest_toml(tmp_path, mosquitto, server, db, topics), "influx", *influx)
        if url is not None:
            text = text.replace(json.dumps(server.url), json.dumps(url))
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        return _amigw("--config", str(path), "--check-config")

    try:
        ok = check("ok", influxd, ok_db)
        assert ok.returncode == 0 and f"database '{ok_db}' accepts writes" in ok.stdout, ok
        gone = check("missing", influxd, missing)
        assert gone.returncode == 2, gone
        assert "influx.database" in gone.stderr and f'database not found: "{missing}"' in gone.stderr
        assert "create_database = true" in gone.stderr
        will = check("create", influxd, missing, "create_database = true")
        assert will.returncode == 0 and "missing, the worker creates it" in will.stdout, will
        assert missing not in influxd.databases()  # a check creates nothing
        bad = check("password", influxd_auth, ok_db, 'username = "admin"', 'password = "wrong"')
        assert (
            bad.returncode == 2 and "influx.password" in bad.stderr and "authorization failed" in bad.stderr
        )
        anon = check("anonymous", influxd_auth, ok_db)
        assert anon.returncode == 2 and "influx.username" in anon.stderr and "401" in anon.stderr
        down = check("down", influxd, ok_db, url=f"http://127.0.0.1:{free_port()}")
        assert down.returncode == 1 and "unreachable" in down.stderr, down
    finally:
        influxd.drop_database(ok_db)
        influxd_auth.drop_database(ok_db)


async def test_replay_lands_dead_lettered_payloads_once_and_keeps_what_still_fails(
    mosquitto: Any, influx_db: Any, tmp_path: Path
) -> None:
    """Entries as an older release left them (a whole group dead-lettered for a refusal of ours),
    plus an undecodable payload, an oversized (truncated) one and a later batch of another
    reason: filters select, landed entries leave the store, a second replay writes nothing."""
    influxd, db = influx_db
    gw = f"gw-r-{_uid()}"
    cfg = tmp_path / "replay.toml"
    text = ingest_toml(tmp_path, mosquitto, influxd, db, topics_for("g", [gw]))
    cfg.write_text(_with(text, "dead_letter", "max_entry_bytes = 100000"))
    topic = f"ami/v1/{gw}/up/readings"
    b1, b2, b3, b4 = series_batches(gw, METERS, 4)
    power_down = Event("E1", gw, "power_down", T_EVENT, meter="M1")
    day = 86_400_000
    t0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
    with DeadLetterStore(tmp_path / "dead.sqlite", max_entry_bytes=100_000) as store:
        for i, b in enumerate((b1, b2, b3)):
            store.put("payload", "influx refused", encode(b), topic, t0 + i)
        store.put("payload", "influx refused", power_down.to_json(), f"ami/v1/{gw}/up/events", t0 + 3)
        store.put("payload", "undecodable", b"AMI\x01\xc1 not msgpack", topic, t0 + 4)
        store.put("payload", "too large", b"x" * 200_000, topic, t0 + 5)
        store.put("payload", "rejected by pipeline", encode(b4), topic, t0 + day)
        store.put("line", "unable to parse", b"m v= 1", None, t0 + 6)  # lines are not payloads

    def replay(*filters: str) -> subprocess.CompletedProcess[str]:
        return _amigw("--config", str(cfg), "--replay-dead-letters", *filters)

    until = dt.datetime.fromtimestamp((t0 + day) / 1000, dt.UTC).isoformat()
    first = replay("--reason", "influx refused", "--until", until)
    assert first.returncode == 0, first
    assert first.stdout.count("replayed id=") == 4
    assert "replay: 4 replayed, 0 already landed, 0 still failing, 0 skipped of 4" in first.stdout
    assert _readings_in(influxd, db, gw) == 3 * PER_BATCH
    assert count(influxd, db, f"SELECT count(id) FROM events WHERE gateway = '{gw}'") == 1
    with DedupStore(tmp_path / "dedup.sqlite") as dedup:
        assert [dedup.seen(gw, b.seq) for b in (b1, b2, b3, b4)] == [True, True, True, False]

    second = replay("--reason", "influx refused")
    assert second.returncode == 0 and "replay: 0 replayed" in second.stdout and "of 0 " in second.stdout

    since = dt.datetime.fromtimestamp((t0 + day) / 1000, dt.UTC).isoformat()
    later = replay("--since", since)
    assert later.returncode == 0 and "replay: 1 replayed" in later.stdout and "of 1 " in later.stdout
    assert _readings_in(influxd, db, gw) == 4 * PER_BATCH

    with DeadLetterStore(tmp_path / "dead.sqlite") as store:  # a copy of a landed batch
        store.put("payload", "influx refused", encode(b1), topic, t0 + 7)
    rest = replay()
    assert rest.returncode == 1, rest  # one still fails
    assert "replay: 0 replayed, 1 already landed, 1 still failing, 1 skipped of 3" in rest.stdout
    assert "skipped id=" in rest.stdout and "truncated: 100000 of 200000 bytes kept" in rest.stdout
    assert "still failing id=" in rest.stdout and "undecodable" in rest.stdout
    assert _readings_in(influxd, db, gw) == 4 * PER_BATCH  # nothing written twice
    with DeadLetterStore(tmp_path / "dead.sqlite") as store:
        assert store.count_by_reason() == {"undecodable": 1, "too large": 1, "unable to parse": 1}


T_EVENT = 1_710_000_900_000


async def test_replay_stops_while_influxdb_is_down_and_keeps_the_entries(
    mosquitto: Any, influx_db: Any, tmp_path: Path
) -> None:
    influxd, db = influx_db
    gw = f"gw-s-{_uid()}"
    cfg = tmp_path / "stop.toml"
    cfg.write_text(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for("g", [gw])))
    with DeadLetterStore(tmp_path / "dead.sqlite") as store:
        for b in series_batches(gw, METERS, 2):
            store.put("payload", "influx refused", encode(b), f"ami/v1/{gw}/up/readings")
    influxd.stop()
    down = _amigw("--config", str(cfg), "--replay-dead-letters")
    assert down.returncode == 1 and "stopped: at id=1" in down.stdout, down
    influxd.start()
    with DeadLetterStore(tmp_path / "dead.sqlite") as store:
        assert store.count_by_reason() == {"influx refused": 2}
    up = _amigw("--config", str(cfg), "--replay-dead-letters")
    assert up.returncode == 0 and "replay: 2 replayed" in up.stdout, up
    assert _readings_in(influxd, db, gw) == 2 * PER_BATCH


async def test_queue_gauges_move_while_influxdb_is_down(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    """Before, amigw_ingest_unacked was set only on an ack and amigw_ingest_queue_depth only when
    intake took a message: both froze through the outage they are meant to show."""
    influxd, db = influx_db
    gw = f"gw-g-{_uid()}"
    text = ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw]), queue_max=4)
    w = await run_worker(_with(text, "mqtt", 'protocol = "3.1.1"'))  # no Receive Maximum: the queue fills
    consumer = w._res.consumer
    batches = series_batches(gw, METERS, 8)
    pub = Publisher(mosquitto)
    try:
        influxd.stop()
        for b in batches[:4]:
            pub.batch(b)
        await wait_for(lambda: consumer.stats.received == 4 and consumer.queued == 0, 20)  # all taken
        for b in batches[4:]:
            pub.batch(b)
        await wait_for(lambda: consumer.queued == 4, 20)
        await wait_for(
            lambda: _gauge(w, "queue_depth") == 4 and _gauge(w, "unacked") == consumer.stats.unacked, 20
        )
        assert consumer.stats.unacked == 8 and written(w) == 0
        influxd.start()
        await wait_for(lambda: written(w) == 8, 60)
        assert _gauge(w, "queue_depth") == 0 and _gauge(w, "unacked") == 0
        assert _readings_in(influxd, db, gw) == 8 * PER_BATCH
    finally:
        pub.close()
