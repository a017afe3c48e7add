"""``amigw demo``: the whole system on this machine, on simulated meters, telling one story.

It starts what a deployment runs, the programs each as its own process: a real mosquitto and a
real influxd (from the Debian packages, on free loopback ports, data in a working directory),
the head-end ingest pipeline (``amigw ingest``) and prepaid fee control (``amigw feectl``, with
its payments API), and only once both are subscribed, the meters and the edge agent (``amigw
edge``), so no reading is published before anything listens. The meters are simulated in this
process, on a real pseudo-terminal (DL/T 645-2007, ``--meters`` of them) and a real Modbus TCP
socket (one SDM630), so that the story can act on them:

* a prepaid account (the last DL/T 645 meter) runs low: fee control's low-balance notices are
  printed as they are published;
* it runs out: fee control trips the meter with a signed command through the edge, and the
  demo reads the simulated relay;
* the customer pays through the payments API: fee control restores the supply;
* another meter stops answering for a few polls: validation marks the gap and estimation fills
  the missing intervals, flagged ESTIMATED, which the demo reads back from InfluxDB.

It ends with a summary from InfluxDB, the account's ledger (energy charged equals the stored
intervals' energy while the meter was enrolled) and ingest's loss account. It checks first that
the head-end and edge packages are installed (an edge-only install is told which extra is
missing), watches its programs, and stops with the reason and the tail of its log when one of
them exits. With ``--keep-running`` it stays up after the summary with follow-up commands.

To make a demo of minutes out of a system built for 15-minute intervals, reads and intervals
are every ``--interval-s`` seconds (default 5) and the meters carry a factory's load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from protocols import topics
from protocols.errors import AmigwError
from protocols.flags import Flag
from simulators.servers import Influxd, Mosquitto, free_port

GATEWAY = "gw-demo"
DATABASE = "amigw"
ACCOUNT = "acc-demo"
LOAD_KW = 36.0  # every DL/T 645 meter: a small factory
PRICE = 20_000  # the flat tariff, 10^-4 yuan per kWh (2 yuan/kWh): 36 kW costs 2 fen a second
FEN_PER_S = LOAD_KW * PRICE / 10_000 * 100 / 3600
MODBUS_KW = 18.0
STEP_TIMEOUT_S = 90.0  # each step of the story is waited for at most this long


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--meters", type=int, default=4, help="simulated DL/T 645 meters (default 4, at least 2)"
    )
    parser.add_argument(
        "--duration-s",
        type=float,
        default=90.0,
        help="run at least this long; the story's steps are waited for (default 90 s)",
    )
    parser.add_argument("--interval-s", type=int, default=5, help="read and interval length (default 5 s)")
    parser.add_argument("--workdir", help="where servers and programs keep data (default: a new temp dir)")
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="after the summary, keep everything running (and print commands to explore it) until Ctrl-C",
    )


# What each side needs, by import name, and the extra that installs it.
_NEEDS = (
    ("serial", "edge"),
    ("paho", "edge"),
    ("pymodbus", "edge"),
    ("numpy", "ingest"),
    ("numba", "ingest"),
    ("influxdb_client", "ingest"),
    ("aiohttp", "ingest"),
)
_READY_LINE = b"ingest worker started"
_READY_TIMEOUT_S = 600.0
_UTC_OFFSET_S = 8 * 3600  # ingest's default calendar: local days are UTC+8
_T = TypeVar("_T")


class DemoError(AmigwError):
    """The demo cannot go on: a missing package, or one of its programs stopped."""


def missing_extras() -> list[str]:
    """``"<package> (amigw[<extra>])"`` for each package the demo needs that is not installed."""
    return [f"{name} (amigw[{extra}])" for name, extra in _NEEDS if importlib.util.find_spec(name) is None]


def _say(text: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {text}", flush=True)


def _amigw(*args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", *args], stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


# -- configuration ----------------------------------------------------------------------------
def _edge_toml(
    work: Path,
    key_hex: str,
    broker: Mosquitto,
    pty: str,
    modbus_port: int,
    meters: list[str],
    interval_s: int,
) -> str:
    meter_tables = "".join(
        f'[[meters]]\nid = "{m}"\nbus = "rs485-1"\naddress = "{m}"\nplans = ["registers", "instant"]\n'
        for m in meters
    )
    return f'''gateway_id = "{GATEWAY}"
command_key = "{key_hex}"
metrics_listen = ""
state_dir = "{work}/edge"
[mqtt]
url = "{broker.url}"
[outbox]
path = "{work}/edge/outbox.sqlite"
[[buses]]
name = "rs485-1"
port = "{pty}"
baud = 9600
[[buses]]
name = "modbus-1"
port = "modbus-tcp://127.0.0.1:{modbus_port}"
baud = 9600
{meter_tables}
[[meters]]
id = "sdm630-1"
bus = "modbus-1"
protocol = "modbus"
address = "1"
model = "sdm630"
plans = ["modbus"]
[[plans]]
name = "registers"
quantities = ["energy_fwd_active_total", "energy_fwd_active_t1", "energy_fwd_active_t2",
              "energy_fwd_active_t3", "energy_fwd_active_t4"]
interval_s = {interval_s}
[[plans]]
name = "instant"
quantities = ["voltage_a", "current_a", "power_active_total"]
interval_s = {interval_s}
kind = "instant"
[[plans]]
name = "modbus"
quantities = ["energy_fwd_active_total", "voltage_a"]
interval_s = {interval_s}
'''


def _ingest_toml(work: Path, broker: Mosquitto, influx: Influxd, interval_s: int, metrics_port: int) -> str:
    return f'''metrics_listen = "127.0.0.1:{metrics_port}"
[mqtt]
url = "{broker.url}"
client_id = "amigw-ingest-demo"
[influx]
url = "{influx.url}"
api = "v1"
database = "{DATABASE}"
[dead_letter]
path = "{work}/ingest/deadletter.sqlite"
[dedup]
path = "{work}/ingest/dedup.sqlite"
[pipeline]
interval_s = {interval_s}
'''


def _feectl_toml(broker: Mosquitto, meter: str, interval_s: int, http_port: int, opening_fen: int) -> str:
    # A new account starts at 0 fen: the overdraft allowance keeps it from being tripped before
    # its opening payment, and the story's trip comes when the allowance is used up.
    alarm1, alarm2 = max(2, opening_fen * 2 // 3), max(1, opening_fen // 3)
    return f'''[feectl]
alarm1_fen = {alarm1}
alarm2_fen = {alarm2}
overdraft_limit_fen = {opening_fen}
grace_s = 0
interval_s = {interval_s}
[feectl.windows]
allowed_hours = ["00:00", "24:00"]
weekend_days = []
[service]
db_path = "ledger.sqlite"
tick_interval_s = 0.5
resend_interval_s = 30
command_key_files = {{ {GATEWAY} = "gw.key" }}
tariff_files = {{ flat = "flat.toml" }}
[service.mqtt]
url = "{broker.url}"
client_id = "amigw-feectl-demo"
[service.http]
enabled = true
port = {http_port}
token_file = "payments.token"
tokens_file = "tokens.toml"
[service.views]
ingest_config = "../ingest.toml"
stale_after_s = 60
[[service.accounts]]
account_id = "{ACCOUNT}"
tariff = "flat"
meters = [{{ meter = "{meter}", gateway = "{GATEWAY}" }}]
'''


_TARIFF = f"""id = "flat"
utc_offset_minutes = 480
[seasons.all]
months = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
workday = "flat"
[profiles.flat]
segments = [["00:00", "24:00", "flat"]]
[[versions]]
version = "demo"
effective_from = 2020-01-01T00:00:00+08:00
prices = {{ flat = {PRICE} }}
"""


# -- the programs -----------------------------------------------------------------------------
class _Children:
    """The demo's programs, by name, with their logs: watched while the demo runs."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def add(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.procs[name] = (proc, log)
        self.stack.callback(_stop, proc)

    def check(self) -> None:
        """Raise :class:`DemoError` naming the first program that has exited, with its log's tail."""
        for name, (proc, log) in self.procs.items():
            code = proc.poll()
            if code is not None:
                tail = _tail(log)
                raise DemoError(f"{name} exited with code {code}; the end of {log}:\n{tail}")


def _tail(log: Path, lines: int = 12) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty log)"


def _wait(
    children: _Children, what: str, check: Callable[[], _T | None], timeout_s: float, note: str = ""
) -> _T:
    """Poll ``check`` until it returns a value; progress every 5 s; the programs are watched."""
    started = time.monotonic()
    next_note = started + 5.0
    while time.monotonic() - started < timeout_s:
        children.check()
        value = check()
        if value is not None:
            return value
        if time.monotonic() >= next_note:
            _say(f"    ... waiting {time.monotonic() - started:.0f} s for {what}{note}")
            next_note += 5.0
        time.sleep(0.2)
    raise DemoError(f"{what}: not within {timeout_s:.0f} s (the programs' logs are in the working directory)")


def _log_has(log: Path, line: bytes) -> bool | None:
    with contextlib.suppress(OSError):
        if line in log.read_bytes():
            return True
    return None


class _Sims:
    """The simulated meters, served from a thread with its own event loop: DL/T 645 meters on a
    pseudo-terminal and one Modbus TCP meter whose energy register follows its load."""

    def __init__(self, meters: list[str]) -> None:
        import logging

        from simulators.dlt645_sim import Dlt645Simulator

        logging.getLogger("pymodbus").setLevel(logging.WARNING)
        from simulators.modbus_sim import ModbusSimulator

        self.dlt = Dlt645Simulator(meters, load_kw=LOAD_KW)
        self.modbus = ModbusSimulator(model="sdm630", unit=1)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="demo-meters", daemon=True)
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> tuple[str, int]:
        self._thread.start()
        pty, port = self.call(self._start())
        return str(pty), int(port)

    async def _start(self) -> tuple[str, int]:
        pty = await self.dlt.serve_pty()
        await self.modbus.start()
        self.modbus.set_value("voltage_a", 2302)
        self._ticker = asyncio.create_task(self._modbus_load())
        return pty, self.modbus.port

    async def _modbus_load(self) -> None:
        centi_kwh = 1_000_000  # 10 000.00 kWh, in the register's 0.01 kWh
        per_s = MODBUS_KW * 100 / 3600
        started = time.monotonic()
        while True:
            self.modbus.set_value(
                "energy_fwd_active_total", centi_kwh + int((time.monotonic() - started) * per_s)
            )
            await asyncio.sleep(0.5)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def do(self, fn: Callable[[], _T]) -> _T:
        async def run() -> _T:
            return fn()

        result: _T = self.call(run())
        return result

    def close(self) -> None:
        async def stop() -> None:
            if self._ticker is not None:
                self._ticker.cancel()
            await self.modbus.stop()
            await self.dlt.aclose()

        with contextlib.suppress(Exception):
            self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class _Notices:
    """Fee control's notifications, as published on ``ami/v1/agg/notifications``."""

    def __init__(self, broker: Mosquitto) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="amigw-demo-notices")
        self.client.on_message = lambda c, u, msg: self._record(bytes(msg.payload))
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.NOTIFICATIONS, qos=1)
        self.client.loop_start()

    def _record(self, payload: bytes) -> None:
        with contextlib.suppress(ValueError):
            note = json.loads(payload)
            if isinstance(note, dict):
                with self._lock:
                    self.seen.append(note)

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            out, self.seen = self.seen, []
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class _Api:
    """The payments API, as a payment provider calls it."""

    def __init__(self, port: int, token: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def healthy(self) -> bool | None:
        with contextlib.suppress(OSError, ValueError):
            status, _ = self.call("GET", "/healthz")
            if status == 200:
                return True
        return None

    def pay(self, payment_id: str, amount_fen: int) -> dict[str, Any]:
        status, body = self.call(
            "POST", "/v1/payments", {"account": ACCOUNT, "payment_id": payment_id, "amount_fen": amount_fen}
        )
        if status not in (200, 201):
            raise DemoError(f"payment {payment_id} refused: {status} {body}")
        return dict(body)

    def account(self) -> dict[str, Any]:
        status, body = self.call("GET", f"/v1/accounts/{ACCOUNT}")
        if status != 200:
            raise DemoError(f"account {ACCOUNT}: {status} {body}")
        return dict(body)

    def journal(self) -> list[dict[str, Any]]:
        status, body = self.call("GET", f"/v1/accounts/{ACCOUNT}/journal?limit=1000")
        if status != 200:
            raise DemoError(f"journal of {ACCOUNT}: {status} {body}")
        return list(body["entries"])


# -- InfluxDB ---------------------------------------------------------------------------------
def _count(influx: Influxd, query: str) -> int:
    rows = influx.query(query, db=DATABASE)
    return int(next((v for k, v in rows[0].items() if k != "time"), 0)) if rows else 0


def _energy(influx: Influxd, meter: str) -> float | None:
    rows = influx.query(
        f"SELECT last(energy_fwd_active_total) FROM meter_reading WHERE meter = '{meter}'", db=DATABASE
    )
    return float(rows[0]["last"]) if rows else None


def _estimated(influx: Influxd, meter: str) -> list[dict[str, Any]]:
    rows = influx.query(
        "SELECT energy_fwd_active_total, energy_fwd_active_total_flags FROM intervals "
        f"WHERE meter = '{meter}' AND energy_fwd_active_total_flags > 0",
        db=DATABASE,
    )
    return [r for r in rows if int(r.get("energy_fwd_active_total_flags") or 0) & int(Flag.ESTIMATED)]


def _progress(influx: Influxd, started: float) -> None:
    readings = _count(influx, "SELECT count(energy_fwd_active_total) FROM meter_reading")
    voltages = _count(influx, "SELECT count(voltage_a) FROM meter_reading")
    intervals = _count(influx, "SELECT count(energy_fwd_active_total) FROM intervals")
    _say(
        f"t+{time.monotonic() - started:4.0f}s  in InfluxDB: {readings} energy readings, {voltages} voltage "
        f"readings, {intervals} validated intervals"
    )


def _missing_batches(metrics_port: int) -> int | None:
    """ingest's loss account (``amigw_ingest_missing_batches``, summed), or None when unreadable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("amigw_ingest_missing_batches")
    ]
    return int(sum(values))


def _charged_matches(influx: Influxd, api: _Api, meter: str) -> tuple[float, float] | None:
    """(kWh in InfluxDB's intervals of ``meter``, kWh charged in the ledger) once they are equal."""
    rows = influx.query(
        f"SELECT sum(energy_fwd_active_total) FROM intervals WHERE meter = '{meter}'", db=DATABASE
    )
    stored = round(float(rows[0]["sum"]), 2) if rows else 0.0
    charged = (
        sum(int(e.get("energy_centi_kwh") or 0) for e in api.journal() if e.get("kind") == "charge") / 100
    )
    return (stored, charged) if abs(stored - charged) < 0.005 else None


def _flag_names(bits: int) -> str:
    return "+".join(f.name or "?" for f in Flag if f and bits & int(f) == int(f)) or "-"


# -- the story --------------------------------------------------------------------------------
class _Story:
    """The scenario's steps, in order; each ``step()`` moves it on when its condition holds."""

    def __init__(
        self,
        children: _Children,
        sims: _Sims,
        api: _Api,
        notices: _Notices,
        influx: Influxd,
        prepaid: str,
        faulty: str,
        interval_s: int,
        top_up_fen: int,
    ) -> None:
        self.children, self.sims, self.api, self.notices = children, sims, api, notices
        self.influx, self.prepaid, self.faulty, self.interval_s = influx, prepaid, faulty, interval_s
        self.top_up_fen = top_up_fen
        self.notes: list[dict[str, Any]] = []
        self.tripped_at = self.restored_at = self.fault_cleared_at = 0.0
        self.fault_at = 0.0
        self.paid = False
        self.estimated: list[dict[str, Any]] = []

    def relay_open(self) -> bool:
        return bool(self.sims.do(lambda: self.sims.dlt.meter(self.prepaid).relay_open))

    def watch_notices(self) -> None:
        for note in self.notices.take():
            self.notes.append(note)
            balance = note.get("balance_fen")
            shown = "" if balance is None else f" (balance {balance} fen)"
            _say(f"    notification to {note.get('account')}: {note.get('kind')}{shown}")

    def step(self, now: float) -> None:
        self.watch_notices()
        if not self.tripped_at and self.relay_open():
            self.tripped_at = now
            acc = self.api.account()
            _say(
                f"    fee control tripped meter {self.prepaid} (relay read at the meter: open); "
                f"balance {acc['balance_fen']} fen"
            )
        if self.tripped_at and not self.paid and now - self.tripped_at >= 2 * self.interval_s:
            _say(f"    the customer pays {self.top_up_fen} fen through the payments API ...")
            res = self.api.pay(f"demo-top-up-{secrets.token_hex(3)}", self.top_up_fen)
            kinds = ", ".join(d["kind"] for d in res["decisions"]) or "none"
            _say(f"    payment recorded: balance {res['balance_fen']} fen; fee control decided: {kinds}")
            self.paid = True
        if self.paid and not self.restored_at and not self.relay_open():
            self.restored_at = now
            _say(f"    supply restored: meter {self.prepaid}'s relay is closed again")
        if not self.fault_at and self.tripped_at:
            self.fault_at = now
            _say(f"    meter {self.faulty} stops answering for {3 * self.interval_s} s (no reply) ...")
            self.sims.do(lambda: self.sims.dlt.meter(self.faulty).inject("no_reply"))
        if self.fault_at and not self.fault_cleared_at and now - self.fault_at >= 3 * self.interval_s:
            self.fault_cleared_at = now
            self.sims.do(lambda: self.sims.dlt.meter(self.faulty).clear_faults())
            _say(f"    meter {self.faulty} answers again")
        if self.fault_cleared_at and not self.estimated:
            self.estimated = _estimated(self.influx, self.faulty)
            if self.estimated:
                energy = sum(float(r["energy_fwd_active_total"]) for r in self.estimated)
                flags = _flag_names(int(self.estimated[0]["energy_fwd_active_total_flags"]))
                _say(
                    f"    validation marked the gap and estimation filled it: {len(self.estimated)} "
                    f"intervals of meter {self.faulty} flagged {flags}, {energy:.2f} kWh in all"
                )

    @property
    def done(self) -> bool:
        return bool(self.restored_at and self.estimated)


def _run(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.meters < 2:
        raise DemoError("--meters: at least 2 (one prepaid, one that develops a fault)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="amigw-demo-"))
    for sub in ("edge", "ingest", "feectl", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    meters = [f"{i:012d}" for i in range(1, args.meters + 1)]
    prepaid, faulty = meters[-1], meters[0]
    key = secrets.token_bytes(32)
    token = secrets.token_hex(16)
    opening_fen = max(3 * int(FEN_PER_S * args.interval_s) + 1, int(FEN_PER_S * args.duration_s * 0.15))
    top_up_fen = int(FEN_PER_S * args.duration_s * 2) + 100

    _say(f"working directory: {work} (servers' data and every program's log are kept there)")
    _say("1/6 a real mosquitto and a real influxd on free loopback ports ...")
    broker = Mosquitto(work / "mqtt")
    broker.start()
    stack.callback(broker.stop)
    influx = Influxd(work / "influx")
    influx.start()
    stack.callback(influx.stop)
    influx.create_database(DATABASE)
    _say(f"    mosquitto at {broker.url}, influxd at {influx.url}")

    children = _Children(stack)
    metrics_port = free_port()
    (work / "ingest.toml").write_text(_ingest_toml(work, broker, influx, args.interval_s, metrics_port))
    _say(
        "2/6 head-end ingest (amigw ingest): MQTT -> numba validation, estimation, intervals -> InfluxDB ..."
    )
    ingest_log = logs / "ingest.log"
    children.add(
        "ingest", _amigw("ingest", "--config", str(work / "ingest.toml"), log=ingest_log), ingest_log
    )
    started = time.monotonic()
    _wait(
        children,
        "ingest to subscribe",
        lambda: _log_has(ingest_log, _READY_LINE),
        _READY_TIMEOUT_S,
        " (the first start compiles the numba kernels; they are cached for the next)",
    )
    _say(f"    ingest subscribed after {time.monotonic() - started:.1f} s")

    http_port = free_port()
    fc = work / "feectl"
    (fc / "gw.key").write_text(key.hex())
    (fc / "payments.token").write_text(token)
    operator = secrets.token_hex(16)
    digest = hashlib.sha256(operator.encode()).hexdigest()
    (fc / "tokens.toml").write_text(f'[tokens.operator]\nrole = "operate"\ntoken_sha256 = "{digest}"\n')
    (fc / "flat.toml").write_text(_TARIFF)
    (fc / "feectl.toml").write_text(_feectl_toml(broker, prepaid, args.interval_s, http_port, opening_fen))
    _say(f"3/6 fee control (amigw feectl): prepaid account {ACCOUNT} on meter {prepaid}, 2 yuan/kWh ...")
    feectl_log = logs / "feectl.log"
    children.add("feectl", _amigw("feectl", "--config", str(fc / "feectl.toml"), log=feectl_log), feectl_log)
    api = _Api(http_port, token)
    _wait(children, "fee control's API", api.healthy, 120.0)
    notices = _Notices(broker)
    stack.callback(notices.close)
    res = api.pay("demo-opening-balance", opening_fen)
    _say(
        f"    payments API at {api.base}: opening payment of {opening_fen} fen recorded, balance "
        f"{res['balance_fen']} fen, {opening_fen} fen of overdraft allowed (the meter draws "
        f"{LOAD_KW:.0f} kW: about {FEN_PER_S:.0f} fen a second)"
    )
    console_url = f"{api.base}/console/?meter={faulty}&account={ACCOUNT}#token={operator}"
    _say(f"    ops console (as an operator): {console_url}")
    _say("    ingest and fee control are subscribed: nothing the edge publishes from now on can be missed")

    _say(f"4/6 meters: {len(meters)} DL/T 645-2007 on a pseudo-terminal, one Modbus SDM630 on TCP ...")
    sims = _Sims(meters)
    stack.callback(sims.close)
    pty, modbus_port = sims.start()
    _say(f"    DL/T 645 on {pty}: {', '.join(meters)}; Modbus TCP on 127.0.0.1:{modbus_port}: sdm630-1")

    (work / "edge.toml").write_text(
        _edge_toml(work, key.hex(), broker, pty, modbus_port, meters, args.interval_s)
    )
    _say(f"5/6 edge agent (amigw edge): two buses, polling every {args.interval_s} s, outbox, MQTT ...")
    edge_log = logs / "edge.log"
    children.add(
        "the edge agent", _amigw("edge", "--config", str(work / "edge.toml"), log=edge_log), edge_log
    )

    _say("6/6 the story: the prepaid account runs low, runs out and is tripped; the customer pays and")
    _say("    is restored; a meter stops answering and estimation fills its gap")
    story = _Story(children, sims, api, notices, influx, prepaid, faulty, args.interval_s, top_up_fen)
    begun = time.monotonic()
    last_progress = begun
    step_deadline = begun + STEP_TIMEOUT_S
    while True:
        now = time.monotonic()
        children.check()
        story.step(now - begun)
        if now - last_progress >= 5.0:
            _progress(influx, begun)
            last_progress = now
        if story.done and now - begun >= args.duration_s:
            break
        if not story.done and now > step_deadline:
            raise DemoError(_stuck(story))
        if story.tripped_at or story.restored_at or story.estimated:
            step_deadline = max(
                step_deadline, begun + max(story.tripped_at, story.restored_at) + STEP_TIMEOUT_S
            )
        time.sleep(0.2)
    time.sleep(args.interval_s)  # the last batches land
    return _summary(args, work, influx, api, story, meters, metrics_port, children, console_url)


def _stuck(story: _Story) -> str:
    if not story.tripped_at:
        return "the prepaid account was not tripped in time (see logs/feectl.log and logs/edge.log)"
    if not story.restored_at:
        return "the payment did not restore the supply in time (see logs/feectl.log and logs/edge.log)"
    return "no estimated intervals appeared for the meter that stopped answering (see logs/ingest.log)"


def _summary(
    args: argparse.Namespace,
    work: Path,
    influx: Influxd,
    api: _Api,
    story: _Story,
    meters: list[str],
    metrics_port: int,
    children: _Children,
    console_url: str,
) -> int:
    _say("summary (from InfluxDB):")
    print(
        f"    {'meter':<14}{'energy kWh':>12}{'readings':>10}{'intervals':>11}{'estimated':>11}", flush=True
    )
    for m in [*meters, "sdm630-1"]:
        n = _count(influx, f"SELECT count(energy_fwd_active_total) FROM meter_reading WHERE meter = '{m}'")
        iv = _count(influx, f"SELECT count(energy_fwd_active_total) FROM intervals WHERE meter = '{m}'")
        est = len(_estimated(influx, m))
        last = _energy(influx, m)
        print(f"    {m:<14}{last or 0:>12.2f}{n:>10}{iv:>11}{est:>11}", flush=True)
    stored_kwh, charged_kwh = _wait(
        children,
        "the ledger to charge every stored interval",
        lambda: _charged_matches(influx, api, story.prepaid),
        3 * args.interval_s + 10,
    )
    acc = api.account()
    journal = api.journal()
    paid = sum(int(e.get("amount_fen") or 0) for e in journal if e.get("kind") == "payment")
    kinds = [str(n.get("kind")) for n in story.notes]
    _say(
        f"account {ACCOUNT} (from the ledger): {charged_kwh:.2f} kWh charged = {stored_kwh:.2f} kWh of "
        f"meter {story.prepaid}'s intervals in InfluxDB; {paid} fen paid, balance {acc['balance_fen']} fen; "
        f"notifications: {', '.join(kinds) or 'none'}"
    )
    missing = _missing_batches(metrics_port)
    if missing is None:
        _say("ingest's loss account: unreadable (metrics endpoint did not answer)")
    else:
        _say(f"ingest's loss account: {missing} batches missing (amigw_ingest_missing_batches)")
    today = (datetime.now(UTC) + timedelta(seconds=_UTC_OFFSET_S)).strftime("%Y-%m-%d")
    follow_up = [
        f"amigw ingest --config {work}/ingest.toml --completeness {meters[0]} {today}",
        f"amigw ingest --config {work}/ingest.toml --loss",
        f"curl -s -H 'Authorization: Bearer {api.token}' {api.base}/v1/accounts/{ACCOUNT}/journal?limit=20",
        f"curl -sG {influx.url}/query --data-urlencode db={DATABASE} "
        "--data-urlencode 'q=SELECT * FROM intervals ORDER BY time DESC LIMIT 5'",
    ]
    stored = _count(influx, "SELECT count(energy_fwd_active_total) FROM meter_reading")
    if args.keep_running:
        _say(f"still running (Ctrl-C stops everything); the ops console: {console_url}")
        _say("meanwhile, try:")
        for cmd in follow_up:
            print(f"    {cmd}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1.0)
                children.check()
    else:
        _say(f"everything stops now; its data stays in {work}. To explore it live, use --keep-running")
    return 0 if stored > 0 and missing == 0 else 1


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    missing = missing_extras()
    if missing:
        print(
            "amigw demo: runs the edge and the head-end, and needs "
            + ", ".join(missing)
            + "; install amigw[all]",
            file=sys.stderr,
        )
        return 2
    with ExitStack() as stack:
        try:
            code = _run(args, stack)
        except DemoError as exc:
            _say(f"stopped: {exc}")
            code = 1
        _say("stopping: edge, meters, fee control, ingest, influxd, mosquitto")
    return code
