"""Two head-end "machines" on one shared subscription, their state in one PostgreSQL (item: shared
head-end state; ``docs/shared-state.md``).

Two ``amigw ingest`` processes, each started in a working directory and with a config file of its
own (no file is shared between them), consume one ``$share/ingest/...`` group of one mosquitto
and write to one influxd; both name the same PostgreSQL database in ``[state] url``, so the dedup
marks, owed rollups, loss account, run state and dead letters are one for both. Real edge agents
(``amigw edge`` on simulated DL/T 645 meters, their outbox and publisher, with the head-end's
confirmations) publish every second. Mid-stream machine A is SIGKILLed: the batches it held
unacknowledged are redelivered to its session when it starts again, or re-sent by the edges (no
confirmation came) and taken by machine B. After a restart of A, PostgreSQL is stopped for 3 s
(both machines retry what they cannot record and acknowledge nothing meanwhile) and started
again; then the meters stop, and the test waits until every edge outbox is empty (every batch
confirmed to its gateway) and both machines exit cleanly (neither crashed).

Checked: every register value the meters answered is in InfluxDB exactly once (one point per
reading, none that no meter answered), both machines wrote batches, and the loss account read
from PostgreSQL (``amigw ingest --loss --json`` of either machine: the same account) shows 0
missing, 0 lost and every gateway dense from seq 1. With each machine's state in its own SQLite
file (the default) the same run fails that last check: each machine's account sees only the seqs
it processed and reports the other machine's as holes.

The second test runs the fleet bench (``amigw bench e2e --state-url``) with each ingest worker a
machine of its own on the same PostgreSQL, fee control charging what both publish, one machine
SIGKILLed and the other stopped for good mid-run: every reading, flag, interval, closed hour and
day total and charge is checked against the generator's ground truth.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from ingest.broker import limits
from simulators.servers import Mosquitto, Postgres, free_port
from tests.e2e.test_nothing_lost_end_to_end import _Gateway, _stored, _wait
from tests.integration.test_pipeline import ingest_toml

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TOPICS = ["$share/ingest/ami/v1/+/up/readings", "$share/ingest/ami/v1/+/up/events"]


class _Machine:
    """One head-end machine: an ``amigw ingest`` process in a directory of its own."""

    def __init__(
        self, tmp: Path, name: str, broker: Mosquitto, influx: tuple[Any, str], state_url: str
    ) -> None:
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir()
        self.metrics_port = free_port()
        influxd, db = influx
        text = ingest_toml(
            self.dir, broker, influxd, db, TOPICS, client_id=f"{name}-{uuid.uuid4().hex[:6]}",
            pipeline={"interval_s": 1},
        )  # fmt: skip
        text = f'metrics_listen = "127.0.0.1:{self.metrics_port}"\n' + text
        self.config = self.dir / "ingest.toml"
        self.config.write_text(text + f"[state]\nurl = {json.dumps(state_url)}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "ingest", "--config", str(self.config)],
            cwd=self.dir,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=(self.dir / "ingest.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

    def written(self) -> float:
        """Batches this process wrote since it started (its metrics endpoint), -1 while down."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return -1
        for line in text.splitlines():
            if line.startswith('amigw_ingest_batches_total{result="written"}'):
                return float(line.split()[-1])
        return 0

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return -9
        return int(self.proc.returncode)

    def log(self) -> str:
        return (self.dir / "ingest.log").read_text(errors="replace")[-3000:]

    def loss_report(self) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "ingest", "--config", str(self.config), "--loss", "--json"],
            cwd=self.dir, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=60, check=True,
        )  # fmt: skip
        return dict(json.loads(out.stdout))


async def test_two_machines_share_one_state_and_lose_or_duplicate_nothing(
    tmp_path: Path, influx_db: Any, postgres: Postgres
) -> None:
    state_url = postgres.create_database(f"state_{uuid.uuid4().hex[:8]}")
    broker = Mosquitto(tmp_path / "broker", settings=limits(), autosave_interval_s=1)
    broker.start()
    a, b = (_Machine(tmp_path, name, broker, influx_db, state_url) for name in ("machine-a", "machine-b"))
    gateways = [_Gateway(tmp_path, f"gw-tm{i}-{uuid.uuid4().hex[:4]}") for i in range(2)]
    written_by_a = written_by_b = 0.0
    try:
        for m in (a, b):
            m.start()
        await _wait(lambda: a.written() >= 0 and b.written() >= 0, 60, "both machines up")
        for g in gateways:
            await g.start(broker.url)
        await _wait(lambda: a.written() >= 3 and b.written() >= 3, 60, "batches on both machines")
        written_by_a = a.written()
        a.kill()  # SIGKILL mid-stream: what it held unacknowledged comes back through B or its session
        mark = b.written()
        await _wait(lambda: b.written() >= mark + 4, 60, "machine B carrying on alone")
        a.start()
        await _wait(lambda: a.written() >= 2, 60, f"machine A back at work:\n{a.log()}")
        postgres.stop()  # the shared state away for a while: nothing is acknowledged, nothing crashes
        await asyncio.sleep(3)
        postgres.start()
        mark_a, mark_b = a.written(), b.written()
        await _wait(lambda: a.written() + b.written() >= mark_a + mark_b + 4, 60, "batches after the outage")
        await asyncio.sleep(2)
        for g in gateways:
            await g.stop_meters()
        for g in gateways:
            await _wait(
                lambda g=g: g.outbox_rows() == 0, 90, f"{g.gw}'s outbox to be confirmed empty:\n{g.log()}"
            )
        written_by_a += a.written()
        written_by_b = b.written()
        for g in gateways:
            assert g.stop() == 0, g.log()
        for m in (a, b):
            assert m.stop() == 0, m.log()
    finally:
        for g in gateways:
            if g.proc is not None and g.proc.poll() is None:
                g.proc.kill()
            await g.sim.aclose()
        for m in (a, b):
            if m.proc is not None and m.proc.poll() is None:
                m.proc.kill()
        broker.stop()

    assert written_by_a > 0 and written_by_b > 0, (written_by_a, written_by_b)
    influxd, db = influx_db
    for g in gateways:
        expected = g.answered()
        assert len(expected) >= 10, f"{g.gw}: only {len(expected)} reads, the run meant nothing"
        stored = await asyncio.to_thread(_stored, influxd, db, g)
        every_answer = {(r.meter, r.value) for r in g.sim.reads if r.di == 0x00010000 and r.fault is None}
        assert not expected - stored, f"{g.gw}: {len(expected - stored)} readings not in InfluxDB"
        assert stored <= every_answer, (
            f"{g.gw}: readings no meter answered: {sorted(stored - every_answer)[:5]}"
        )
        meters = " OR ".join(f"meter = '{m}'" for m in g.meters)
        (row,) = influxd.query(
            f"SELECT COUNT(energy_fwd_active_total) FROM meter_reading WHERE {meters}", db=db
        )
        assert row["count"] == len(stored), f"{g.gw}: {row['count']} points for {len(stored)} readings"
    report_a, report_b = a.loss_report(), b.loss_report()
    assert report_a == report_b  # one account, whichever machine asks
    assert report_a["missing"] == 0 and report_a["lost"] == 0, report_a
    assert report_a["path"].startswith("postgresql://") and "***" in report_a["path"]
    accounts = {acct["gateway"]: acct for acct in report_a["gateways"]}
    for g in gateways:
        assert accounts[g.gw]["first"] == 1 and not accounts[g.gw]["gaps"], accounts[g.gw]
    assert not list(a.dir.glob("*.sqlite")) and not list(b.dir.glob("*.sqlite"))  # no machine's own file


def test_two_machines_on_a_generated_fleet_every_reading_total_and_charge_once(
    tmp_path: Path, postgres: Postgres
) -> None:
    """The fleet bench with each worker a machine of its own (``--state-url``): machine 0 is
    SIGKILLed and restarted, then machine 1 is stopped for good, while a generated fleet publishes
    4 simulated hours with every anomaly kind; fee control charges the intervals both machines
    published. Every reading once, every anomaly flagged, intervals and the closed periods' hourly
    and daily TOU totals equal to the truth's sums, every charge once (fee control's journal per
    meter equal to the truth's), the shared loss account at 0."""
    from simulators.bench_e2e import BenchOptions, parse_faults, run_bench

    run_dir = tmp_path / "run"
    opts = BenchOptions(
        gateways=4, meters=24, hours=4, seed=11, min_each=1, workers=2,
        faults=parse_faults(["worker-kill", "worker-stop"]), ack_timeout_s=3.0, resend_cap_s=5.0,
        progress_s=1.0, settle_timeout_s=90.0, run_dir=run_dir,
        state_url=postgres.create_database(f"state_{uuid.uuid4().hex[:8]}"),
    )  # fmt: skip
    report = asyncio.run(run_bench(opts, say=print))
    print(report.summary())
    assert report.ok, report.summary()
    check = report.store_check
    assert check["lost"] == check["duplicated"] == check["unexpected"] == 0, report.store_summary
    assert check["totals_checked"] > 0 and check["total_mismatches"] == 0, report.store_summary
    assert check["charges_checked"] > 0 and check["charge_mismatches"] == 0, report.store_summary
    assert report.counts["missing_batches"] == report.counts["lost_batches"] == 0
    written = report.counts["batches_written_by_worker"]
    assert len(written) == 2 and all(n > 0 for n in written), written  # both machines took batches
    faults = {f.name: f for f in report.faults}
    assert faults["worker-kill"].evidence["pid_before"] != faults["worker-kill"].evidence["pid_after"]
    assert faults["worker-stop"].evidence["live_workers"] == [0]
    for i in (0, 1):  # separate working directories, no state file of a machine's own
        machine = run_dir / f"ingest-{i}"
        assert (machine / "ingest.toml").is_file()
        assert not list(machine.glob("*.sqlite")), list(machine.iterdir())
    assert not (run_dir / "ingest").exists()
