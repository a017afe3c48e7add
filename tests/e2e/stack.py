"""The whole fee-control chain for end-to-end tests, on the real mosquitto and influxd.

    simulated DL/T 645 meters (pty) -> edge agent -> mosquitto -> ingest (subprocess) -> influxd
        -> ami/v1/agg/intervals/{gw} -> feectl (subprocess, or in-process with a driven clock)
        -> signed relay command -> edge agent -> the simulated meter's relay

Energy flows for real: each simulated meter's load advances its register, the edge reads
``energy_fwd_active_total`` every ``interval_s`` seconds (the ingest grid is the same), ingest
publishes the validated intervals and fee control charges them at a flat tariff.

The simulator and the edge agent run in the test's event loop (the simulator serves the pty the
agent reads); ingest and feectl run as ``python -m gateway.cli ...`` child processes, so the test
can SIGKILL feectl. A :class:`~tests.e2e.edge_helpers.MqttRecorder` sees every command, result,
interval and notification of the stack's gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.agent import EdgeAgent
from gateway.config import parse_config as parse_edge
from ingest.feectl.cli import load as load_feectl
from ingest.feectl.service import FeeControlService
from protocols.aggregates import decode_intervals
from protocols.commands import CommandResult, verify_command
from protocols.commands import decode_result as decode_signed_result
from protocols.dlt645 import Frame
from simulators.dlt645_sim import Dlt645Simulator
from tests.e2e.edge_helpers import KEY, KEY_HEX, MqttRecorder, edge_toml
from tests.services import Influxd, Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-feectl-token-0123456789"
RELAY_CONTROL = 0x1C  # DL/T 645 relay / alarm / protect command


class SlowRelaySimulator(Dlt645Simulator):
    """A DL/T 645 bus whose meters take ``relay_reply_s`` to answer a relay command (0x1C).

    The relay itself moves when the request arrives (``SimMeter.relay_open`` changes at once);
    only the acknowledgement is late, as with a real meter that settles its relay for a few
    seconds (FC-12). That holds the command's result back long enough to kill fee control
    between its decision and the result."""

    relay_reply_s = 0.0

    def handle(self, frame: Frame) -> tuple[bytes | None, float]:
        reply, delay_s = super().handle(frame)
        if frame.control == RELAY_CONTROL:
            delay_s += self.relay_reply_s
        return reply, delay_s


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    meter: str  # the DL/T 645 address, also the edge's meter id
    load_kw: float
    protected: bool = False


@dataclass(slots=True)
class Payment:
    status: int
    body: dict[str, Any]
    sent_s: float  # time.monotonic() just before the request
    answered_s: float  # ... and when the answer was in


@dataclass(slots=True)
class Stack:
    """One gateway's worth of the chain; ``await start()``, then ``await close()``.

    ``interval_s`` is both the edge plan's and the ingest grid's interval. ``price`` is the flat
    tariff in 10^-4 yuan/kWh. ``feectl_extra`` is TOML added to the ``[feectl]`` table (it
    replaces the defaults written here); ``windows`` replaces ``[feectl.windows]``.
    """

    tmp: Path
    broker: Mosquitto
    influxd: Influxd
    db: str
    accounts: list[Account]
    interval_s: int = 1
    price: int = 50_000
    overdraft_limit_fen: int = 10
    feectl_extra: str = ""
    windows: str = 'allowed_hours = ["00:00", "24:00"]\nweekend_days = []\n'
    bus_extra: str = ""
    relay_reply_s: float = 0.0
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    sim: SlowRelaySimulator | None = None
    agent: EdgeAgent | None = None
    rec: MqttRecorder | None = None
    feectl_proc: subprocess.Popen[bytes] | None = None
    feectl_service: FeeControlService | None = None
    http_port: int = 0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def gw(self) -> str:
        return f"gw-fc-{self.tag}"

    @property
    def feectl_db(self) -> Path:
        return self.tmp / "feectl" / "ledger.sqlite"

    @property
    def feectl_log(self) -> Path:
        return self.tmp / "feectl" / "service.log"

    # -- configuration ------------------------------------------------------------------------
    def feectl_config(self) -> Path:
        d = self.tmp / "feectl"
        d.mkdir(exist_ok=True)
        (d / "gw.key").write_text(KEY_HEX)
        (d / "token").write_text(TOKEN)
        (d / "flat.toml").write_text(
            'id = "flat"\nutc_offset_minutes = 480\n'
            '[seasons.all]\nmonths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]\nworkday = "flat"\n'
            '[profiles.flat]\nsegments = [["00:00", "24:00", "flat"]]\n'
            '[[versions]]\nversion = "e2e"\neffective_from = 2020-01-01T00:00:00+08:00\n'
            f"prices = {{ flat = {self.price} }}\n"
        )
        if not self.http_port:
            self.http_port = free_port()
        accounts = "".join(
            f'[[service.accounts]]\naccount_id = "{a.account_id}"\ntariff = "flat"\n'
            f"protected = {str(a.protected).lower()}\n"
            f'meters = [{{ meter = "{a.meter}", gateway = "{self.gw}" }}]\n'
            for a in self.accounts
        )
        text = f"""
[feectl]
alarm1_fen = 50
alarm2_fen = 20
overdraft_limit_fen = {self.overdraft_limit_fen}
grace_s = 0
interval_s = {self.interval_s}
{self.feectl_extra}
[feectl.windows]
{self.windows}
[service]
db_path = "ledger.sqlite"
tick_interval_s = 0.2
resend_interval_s = 60
command_key_files = {{ {self.gw} = "gw.key" }}
tariff_files = {{ flat = "flat.toml" }}
[service.mqtt]
url = "{self.broker.url}"
client_id = "feectl-{self.tag}"
session_expiry_s = 300
[service.http]
enabled = true
port = {self.http_port}
token_file = "token"
{accounts}"""
        path = d / "feectl.toml"
        path.write_text(text)
        return path

    def ingest_config(self) -> Path:
        d = self.tmp / "ingest"
        d.mkdir(exist_ok=True)
        topic = f"$share/e2e-{self.tag}/ami/v1/{self.gw}/up/readings"
        text = (
            f"[mqtt]\nurl = {json.dumps(self.broker.url)}\nclient_id = 'ingest-{self.tag}'\n"
            f"topics = [{json.dumps(topic)}]\nsession_expiry_s = 300\n"
            f"[influx]\nurl = {json.dumps(self.influxd.url)}\napi = 'v1'\ndatabase = {json.dumps(self.db)}\n"
            "[dead_letter]\npath = 'dl.sqlite'\n[dedup]\npath = 'dd.sqlite'\n"
            f"[pipeline]\ninterval_s = {self.interval_s}\npublish_daily = false\n"
        )
        path = d / "ingest.toml"
        path.write_text(text)
        return path

    def edge_config(self, pty: str) -> str:
        bus = f'[[buses]]\nname = "b1"\nport = "{pty}"\nbaud = 9600\n{self.bus_extra}'
        meters = "".join(
            f'[[meters]]\nid = "{a.meter}"\nbus = "b1"\naddress = "{a.meter}"\nplans = ["energy"]\n'
            for a in self.accounts
        )
        plan = (
            '[[plans]]\nname = "energy"\nquantities = ["energy_fwd_active_total"]\n'
            f"interval_s = {self.interval_s}\n"
        )
        return edge_toml(str(self.tmp / "edge"), self.gw, self.broker.url, bus, meters, plan)

    # -- processes ----------------------------------------------------------------------------
    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._procs.append(proc)
        return proc

    async def start_feectl(self, *, clock: Callable[[], int] | None = None) -> None:
        """Start fee control: a child process, or in-process when ``clock`` is given (the
        service's clock is injectable; the CLI's is the wall clock). Returns once its HTTP
        API answers and its subscriptions are in place."""
        config = self.feectl_config()
        if clock is None:
            self.feectl_proc = self._spawn(["feectl", "--config", str(config)], self.feectl_log)
        else:
            self.feectl_service = FeeControlService(load_feectl(config), clock=clock)
            self._tasks.append(asyncio.create_task(self.feectl_service.run()))
        deadline = time.monotonic() + 30
        while True:
            self.check_feectl_alive()
            try:
                status, health = await self.http("GET", "/healthz")
                if status == 200 and health["mqtt_publisher"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"feectl did not come up\n{self.feectl_log_text()}"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the consumer's SUBACK comes after the publisher's CONNACK

    def kill_feectl(self) -> None:
        assert self.feectl_proc is not None
        self.feectl_proc.send_signal(signal.SIGKILL)
        self.feectl_proc.wait(10)
        self.feectl_proc = None  # dead on purpose: until() stops checking it

    def check_feectl_alive(self) -> None:
        if self.feectl_proc is not None and self.feectl_proc.poll() is not None:
            raise AssertionError(f"feectl exited rc={self.feectl_proc.returncode}\n{self.feectl_log_text()}")

    def feectl_log_text(self) -> str:
        return self.feectl_log.read_text(errors="replace")[-6000:] if self.feectl_log.exists() else ""

    async def start(self, *, feectl_clock: Callable[[], int] | None = None) -> None:
        """Recorder, feectl, ingest, then the simulator and the edge agent. Returns when the first
        interval of every meter has been published by ingest."""
        g = self.gw
        self.rec = MqttRecorder(
            self.broker.host,
            self.broker.port,
            [f"ami/v1/{g}/down/cmd", f"ami/v1/{g}/up/cmd-result", f"ami/v1/agg/intervals/{g}"],
            client_id=f"rec-{self.tag}",
        )
        await self.start_feectl(clock=feectl_clock)
        self._spawn(["ingest", "--config", str(self.ingest_config())], self.tmp / "ingest" / "ingest.log")
        self.sim = SlowRelaySimulator([a.meter for a in self.accounts])
        self.sim.relay_reply_s = self.relay_reply_s
        for a in self.accounts:
            self.sim.meter(a.meter).set_load(a.load_kw)
        pty = await self.sim.serve_pty()
        self.agent = EdgeAgent(parse_edge(self.edge_config(pty)), status_interval_s=30)
        self._tasks.append(asyncio.create_task(self.agent.run()))

    async def wait_intervals(self, timeout_s: float = 45) -> None:
        """Until ingest has published an interval of every meter (numba's first compile is in
        the ingest child's start)."""
        want = {a.meter for a in self.accounts}
        await self.until(lambda: want <= {r.meter for r in self.intervals()}, timeout_s, "intervals")

    async def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        if self.feectl_service is not None:
            self.feectl_service.stop()
        for t in self._tasks:
            try:
                await asyncio.wait_for(t, 15)
            except Exception:  # teardown: report nothing over the test's own failure
                t.cancel()
        if self.sim is not None:
            await self.sim.aclose()
        for p in self._procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self._procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if self.rec is not None:
            self.rec.close()

    # -- observation --------------------------------------------------------------------------
    async def until(self, check: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.02) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = check()
            if value:
                return value
            self.check_feectl_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}\n--- feectl log ---\n{self.feectl_log_text()}"
                )
            await asyncio.sleep(poll_s)

    def intervals(self) -> list[Any]:
        assert self.rec is not None
        return [r for p in self.rec.snapshot(f"/agg/intervals/{self.gw}") for r in decode_intervals(p)[2]]

    def commands(self) -> list[Any]:
        """Every command published to this gateway (resends included), verified with its key."""
        assert self.rec is not None
        now = int(time.time() * 1000)
        snap = self.rec.snapshot("/down/cmd")
        return [verify_command(p, KEY, now, gateway=self.gw, max_skew_ms=600_000) for p in snap]

    def results(self) -> list[CommandResult]:
        """Every signed result the edge published."""
        assert self.rec is not None
        return [decode_signed_result(p, KEY) for p in self.rec.snapshot("/up/cmd-result")]

    def relay_open(self, meter: str) -> bool:
        assert self.sim is not None
        return self.sim.meter(meter).relay_open

    def relay_counters(self, meter: str) -> tuple[int, int]:
        """(trips, closes) the simulated meter's relay actually performed."""
        assert self.sim is not None
        c = self.sim.meter(meter).counters
        return c["relay_trip_count"], c["relay_close_count"]

    def ledger(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Read-only query on feectl's SQLite ledger (WAL: readable while the service runs)."""
        with sqlite3.connect(f"file:{self.feectl_db}?mode=ro", uri=True) as conn:
            return conn.execute(sql, args).fetchall()

    # -- the payments API ---------------------------------------------------------------------
    async def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.http_port)
        data = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: feectl\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        writer.write(head.encode() + data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status = int(raw.split(b" ", 2)[1])
        return status, json.loads(raw.partition(b"\r\n\r\n")[2])

    async def pay(self, account: str, amount_fen: int) -> Payment:
        t0 = time.monotonic()
        status, body = await self.http(
            "POST",
            "/v1/payments",
            {"account": account, "payment_id": f"pay-{uuid.uuid4().hex[:12]}", "amount_fen": amount_fen},
        )
        return Payment(status, body, t0, time.monotonic())

    async def account(self, account: str) -> dict[str, Any]:
        status, view = await self.http("GET", f"/v1/accounts/{account}")
        assert status == 200, view
        return view  # type: ignore[no-any-return]

    async def journal(self, account: str, limit: int = 1000) -> list[dict[str, Any]]:
        status, body = await self.http("GET", f"/v1/accounts/{account}/journal?limit={limit}")
        assert status == 200, body
        return body["entries"]  # type: ignore[no-any-return]
