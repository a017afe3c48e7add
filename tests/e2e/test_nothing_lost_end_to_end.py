"""Nothing lost between the meters and InfluxDB, whatever the broker does (DESIGN §5, §6).

Real edge agents (``amigw edge`` child processes) read simulated DL/T 645 meters over ptys every
second and publish through a mosquitto of the test's own (the shipped limits); two ingest workers
share one subscription (``$share``) and write to influxd. Mid-stream the broker is SIGTERMed and
restarted, then SIGKILLed and restarted (the Debian mosquitto does not restore shared
subscriptions, so batches published around a restart reach no worker: only the head-end's
confirmations and the edge's re-sends bring them in). In the second test one worker of two is
stopped for good (scale-down): what the broker queued for it is re-sent by the edges to the other.

Then the meters stop answering and the test waits until every edge outbox is empty (every batch
and event confirmed by the head-end: nothing waits forever), and checks that every register value
the simulators answered is in InfluxDB, none that was not, and that the head-end's loss account
(``amigw ingest --loss --json``) reads 0 missing and 0 lost with every gateway's seqs dense from 1.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from ingest.broker import limits
from ingest.config import parse_config
from ingest.pipeline.worker import IngestWorker
from simulators.dlt645_sim import Dlt645Simulator
from simulators.servers import Mosquitto
from tests.e2e.edge_helpers import edge_toml
from tests.integration.test_pipeline import ingest_toml

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ENERGY_DI = 0x00010000
METERS_PER_GATEWAY = 2


async def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def _outbox_rows(path: Path) -> int:
    if not path.exists():
        return -1
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


class _Gateway:
    """One concentrator: a simulated bus of meters on a pty and an ``amigw edge`` process."""

    def __init__(self, tmp: Path, gw: str) -> None:
        self.gw = gw
        self.dir = tmp / gw
        self.dir.mkdir()
        base = int(uuid.uuid4().int % 10**9)
        self.meters = [f"{base + i:012d}" for i in range(METERS_PER_GATEWAY)]
        self.sim = Dlt645Simulator(self.meters, load_kw=90.0)
        self.proc: subprocess.Popen[bytes] | None = None
        self.closed_at = 0.0

    async def start(self, broker_url: str) -> None:
        path = await self.sim.serve_pty()
        meters = "".join(
            f'[[meters]]\nid = "{m}"\nbus = "b"\naddress = "{m}"\nplans = ["fast"]\n' for m in self.meters
        )
        text = edge_toml(
            str(self.dir),
            self.gw,
            broker_url,
            f'[[buses]]\nname = "b"\nport = "{path}"\nbaud = 9600\n',
            meters,
            '[[plans]]\nname = "fast"\nquantities = ["energy_fwd_active_total"]\ninterval_s = 1\n',
        ).replace("max_inflight = 64", "max_inflight = 64\nack_timeout_s = 2\nresend_max_s = 4")
        config = self.dir / "edge.toml"
        config.write_text(text)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "edge", "--config", str(config)],
            cwd=ROOT,
            stdout=(self.dir / "agent.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

    async def stop_meters(self) -> None:
        self.closed_at = time.time()
        await self.sim.aclose()

    def outbox_rows(self) -> int:
        return _outbox_rows(self.dir / "outbox.sqlite")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9

    def answered(self) -> set[tuple[str, int]]:
        """(meter, register value) of every energy read the meters answered before they stopped
        (a read answered in the last moment before the close may not have reached the agent)."""
        return {
            (r.meter, r.value)
            for r in self.sim.reads
            if r.di == ENERGY_DI and r.fault is None and r.ts < self.closed_at - 1.5
        }

    def log(self) -> str:
        return (self.dir / "agent.log").read_text(errors="replace")[-3000:]


def _stored(influxd: Any, db: str, gateway: _Gateway) -> set[tuple[str, int]]:
    meters = " OR ".join(f"meter = '{m}'" for m in gateway.meters)
    rows = influxd.query(f"SELECT energy_fwd_active_total, meter FROM meter_reading WHERE {meters}", db=db)
    return {
        (r["meter"], round(r["energy_fwd_active_total"] * 100))
        for r in rows
        if r["energy_fwd_active_total"] is not None
    }


def _loss_report(config: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "ingest", "--config", str(config), "--loss", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


async def _run(tmp: Path, influx_db: Any, fault: str) -> None:
    influxd, db = influx_db
    broker = Mosquitto(tmp / "broker", settings=limits(), autosave_interval_s=1)
    broker.start()
    gateways = [_Gateway(tmp, f"gw-nl{i}-{uuid.uuid4().hex[:4]}") for i in range(2)]
    config = tmp / "ingest.toml"
    config.write_text(
        ingest_toml(
            tmp, broker, influxd, db, ["$share/ingest/ami/v1/+/up/readings", "$share/ingest/ami/v1/+/up/events"],
            client_id=f"nl-{uuid.uuid4().hex[:6]}", pipeline={"interval_s": 1},
        )
    )  # fmt: skip
    cfg = parse_config(config.read_text())
    workers = [IngestWorker(cfg, i) for i in range(2)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        for w in workers:
            await asyncio.wait_for(w.ready.wait(), 30)
        for g in gateways:
            await g.start(broker.url)

        def written() -> float:
            return sum(w.metrics.batches.labels("written")._value.get() for w in workers)

        await _wait(lambda: written() >= 6, 60, "the first batches in InfluxDB")
        if fault == "broker":
            broker.stop()  # SIGTERM: mosquitto saves its state, shared subscriptions are not restored
            await asyncio.sleep(3)
            broker.start()
            mark = written()
            await _wait(lambda: written() >= mark + 6, 60, "batches after the SIGTERM restart")
            broker.kill()  # SIGKILL mid-stream: what was not autosaved is gone from the broker too
            await asyncio.sleep(3)
            broker.start()
            mark = written()
            await _wait(lambda: written() >= mark + 6, 60, "batches after the SIGKILL restart")
        else:  # scale-down: worker 1 goes for good; its share queued at the broker is re-sent by the edges
            workers[1].stop()
            await asyncio.wait_for(tasks[1], 15)
            mark = workers[0].metrics.batches.labels("written")._value.get()
            await _wait(
                lambda: workers[0].metrics.batches.labels("written")._value.get() >= mark + 12,
                60,
                "batches on the remaining worker",
            )
        await asyncio.sleep(3)
        for g in gateways:
            await g.stop_meters()
        for g in gateways:
            await _wait(
                lambda g=g: g.outbox_rows() == 0, 90, f"{g.gw}'s outbox to be confirmed empty:\n{g.log()}"
            )
        for g in gateways:
            assert g.stop() == 0, g.log()
    finally:
        for g in gateways:
            if g.proc is not None and g.proc.poll() is None:
                g.proc.kill()
            await g.sim.aclose()
        for w, t in zip(workers, tasks, strict=True):
            w.stop()
            await asyncio.wait_for(asyncio.gather(t, return_exceptions=True), 15)
        broker.stop()

    for g in gateways:
        expected = g.answered()
        assert len(expected) >= 10, f"{g.gw}: only {len(expected)} reads, the run meant nothing"
        stored = await asyncio.to_thread(_stored, influxd, db, g)
        every_answer = {(r.meter, r.value) for r in g.sim.reads if r.di == ENERGY_DI and r.fault is None}
        missing = expected - stored
        assert not missing, (
            f"{g.gw}: {len(missing)} of {len(expected)} readings not in InfluxDB: {sorted(missing)[:5]}"
        )
        assert stored <= every_answer, (
            f"{g.gw}: InfluxDB holds readings no meter answered: {sorted(stored - every_answer)[:5]}"
        )
    report = _loss_report(config)
    assert report["missing"] == 0 and report["lost"] == 0, report
    accounts = {a["gateway"]: a for a in report["gateways"]}
    for g in gateways:
        assert accounts[g.gw]["first"] == 1 and not accounts[g.gw]["gaps"], accounts[g.gw]


async def test_broker_sigterm_and_sigkill_restarts_lose_nothing(tmp_path: Path, influx_db: Any) -> None:
    await _run(tmp_path, influx_db, "broker")


async def test_a_worker_stopped_for_good_loses_nothing(tmp_path: Path, influx_db: Any) -> None:
    await _run(tmp_path, influx_db, "scale-down")
