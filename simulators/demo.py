"""``amigw demo``: the whole system on this machine, on simulated meters.

It starts, each as its own process, exactly what a deployment runs: a real mosquitto and a
real influxd (from the Debian packages, on free loopback ports, data in a working directory),
the head-end ingest pipeline (``amigw ingest``), and only once ingest has subscribed, simulated
DL/T 645 meters on a pseudo-terminal (``amigw sim``) and the edge agent (``amigw edge``), so
no reading is published before anything listens. It prints what arrives in InfluxDB as it
happens, sends a signed relay trip and then a close-allowed to one meter through the same path
a fee-control decision takes, and ends with a per-meter summary and ingest's loss account.

It checks first that the head-end and edge packages are installed (an edge-only install is
told which extra is missing), watches its child processes, and stops with the reason and the
tail of its log when one of them exits.

To make a demo of minutes out of a system built for 15-minute intervals, reads and intervals
are every ``--interval-s`` seconds (default 5) and the meters carry a factory's load.

This orchestrator imports only ``protocols`` and the local-stack launcher: the edge and the
head-end run as the programs they are, and meet only on MQTT.
"""

from __future__ import annotations

import argparse
import contextlib
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
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

from protocols import topics
from protocols.commands import Action, Command, decode_result
from protocols.errors import AmigwError
from simulators.servers import Influxd, Mosquitto, free_port

GATEWAY = "gw-demo"
DATABASE = "amigw"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meters", type=int, default=6, help="simulated DL/T 645 meters (default 6)")
    parser.add_argument("--duration-s", type=float, default=60.0, help="how long to run (default 60 s)")
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


def _edge_toml(
    work: Path, key_hex: str, broker: Mosquitto, pty: str, meters: list[str], interval_s: int
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
{meter_tables}
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


class _Commander:
    """Sends signed commands the way the head-end does and waits for their signed results."""

    def __init__(self, broker: Mosquitto, key: bytes) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.key = key
        self.results: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="amigw-demo-headend")
        self.client.on_message = lambda c, u, msg: self._record(bytes(msg.payload))
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.cmd_result(GATEWAY), qos=1)
        self.client.loop_start()

    def _record(self, payload: bytes) -> None:
        with self._lock:
            self.results[json.loads(payload).get("id", "?")] = payload

    def run(self, meter: str, action: Action, timeout_s: float = 30.0) -> tuple[str, float]:
        now = int(time.time() * 1000)
        cmd = Command(f"demo-{action}-{secrets.token_hex(4)}", GATEWAY, meter, action, now, now + 120_000)
        started = time.monotonic()
        self.client.publish(topics.command(GATEWAY), cmd.signed(self.key), qos=1).wait_for_publish(10)
        while time.monotonic() - started < timeout_s:
            with self._lock:
                raw = self.results.get(cmd.id)
            if raw is not None:
                res = decode_result(raw, self.key)
                state = {0: "closed", 1: "open", None: "unknown"}[res.relay_state]
                return (
                    f"{res.status} (relay read back: {state}) {res.detail}".strip(),
                    time.monotonic() - started,
                )
            time.sleep(0.05)
        return "no result (timed out)", timeout_s

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _count(influx: Influxd, query: str) -> int:
    rows = influx.query(query, db=DATABASE)
    return int(next((v for k, v in rows[0].items() if k != "time"), 0)) if rows else 0


def _energy(influx: Influxd, meter: str, since_ms: int = 0) -> tuple[float, float] | None:
    """First and last energy reading of ``meter`` at or after ``since_ms``."""
    rows = influx.query(
        f"SELECT first(energy_fwd_active_total), last(energy_fwd_active_total) FROM meter_reading "
        f"WHERE meter = '{meter}' AND time >= {since_ms}ms",
        db=DATABASE,
    )
    return (float(rows[0]["first"]), float(rows[0]["last"])) if rows else None


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


def _wait_ingest_ready(children: _Children, log: Path) -> float:
    """Wait until ingest logs that its worker has subscribed; progress every 5 s. Returns seconds."""
    started = time.monotonic()
    next_note = started + 5.0
    while time.monotonic() - started < _READY_TIMEOUT_S:
        children.check()
        with contextlib.suppress(OSError):
            if _READY_LINE in log.read_bytes():
                return time.monotonic() - started
        if time.monotonic() >= next_note:
            _say(
                f"    ... ingest starting for {time.monotonic() - started:.0f} s (the first start compiles "
                "the numba kernels; they are cached for the next)"
            )
            next_note += 5.0
        time.sleep(0.2)
    raise DemoError(f"ingest did not subscribe within {_READY_TIMEOUT_S:.0f} s; see {log}")


def _missing_batches(metrics_port: int) -> int | None:
    """ingest's loss account (``amigw_ingest_missing_batches``, summed), or None when unreadable."""
    import urllib.request

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


def _progress(influx: Influxd, started: float) -> None:
    readings = _count(influx, "SELECT count(energy_fwd_active_total) FROM meter_reading")
    voltages = _count(influx, "SELECT count(voltage_a) FROM meter_reading")
    intervals = _count(influx, "SELECT count(energy_fwd_active_total) FROM intervals")
    _say(
        f"t+{time.monotonic() - started:4.0f}s  in InfluxDB: {readings} energy readings, {voltages} voltage "
        f"readings, {intervals} validated intervals"
    )


def _run(args: argparse.Namespace, stack: ExitStack) -> int:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="amigw-demo-"))
    for sub in ("edge", "ingest", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    meters = [f"{i:012d}" for i in range(1, args.meters + 1)]
    key = secrets.token_bytes(32)

    _say(f"working directory: {work} (servers' data and every program's log are kept there)")
    _say("1/5 starting a real mosquitto and a real influxd on free loopback ports ...")
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
    _say("2/5 head-end ingest (amigw ingest): MQTT -> numba validation and intervals -> InfluxDB ...")
    ingest_log = logs / "ingest.log"
    ingest = _amigw("ingest", "--config", str(work / "ingest.toml"), log=ingest_log)
    children.add("ingest", ingest, ingest_log)
    took = _wait_ingest_ready(children, ingest_log)
    _say(f"    ingest subscribed after {took:.1f} s: nothing the edge publishes from now on can be missed")

    _say(f"3/5 {len(meters)} simulated DL/T 645-2007 meters on one pseudo-terminal (amigw sim dlt645) ...")
    sim_log = logs / "sim.log"
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "sim",
            "dlt645",
            "--meters",
            ",".join(meters),
            "--pty",
            "--load-kw",
            "36",
        ],
        stdout=subprocess.PIPE,
        stderr=sim_log.open("ab"),
    )
    children.add("the meter simulator", sim, sim_log)
    assert sim.stdout is not None
    first = sim.stdout.readline().decode().strip()
    pty = first.split()[-1] if first else ""
    if not pty.startswith("/dev/"):
        children.check()
        raise DemoError(f"the simulator did not report a pty: {first!r}")
    _say(f"    meters on {pty}: {', '.join(meters)}")

    (work / "edge.toml").write_text(_edge_toml(work, key.hex(), broker, pty, meters, args.interval_s))
    _say(f"4/5 edge agent (amigw edge): polling every {args.interval_s} s, outbox, MQTT ...")
    edge_log = logs / "edge.log"
    edge = _amigw("edge", "--config", str(work / "edge.toml"), log=edge_log)
    children.add("the edge agent", edge, edge_log)

    commander = _Commander(broker, key)
    stack.callback(commander.close)
    target = meters[min(2, len(meters) - 1)]
    started = time.monotonic()
    trip_at, close_at = args.duration_s * 0.4, args.duration_s * 0.7
    tripped = closed = False
    trip_ms = 0
    while (elapsed := time.monotonic() - started) < args.duration_s:
        time.sleep(min(5.0, args.duration_s - elapsed))
        children.check()
        _progress(influx, started)
        if not tripped and time.monotonic() - started >= trip_at:
            _say(f"5/5 head-end sends a signed TRIP to meter {target} on {topics.command(GATEWAY)} ...")
            outcome, took = commander.run(target, Action.TRIP)
            trip_ms = int(time.time() * 1000)
            _say(f"    trip: {outcome} after {took * 1000:.0f} ms")
            tripped = True
        elif tripped and not closed and time.monotonic() - started >= close_at:
            span = _energy(influx, target, trip_ms)
            if span:
                _say(
                    f"    meter {target} while tripped: energy {span[0]:.2f} -> {span[1]:.2f} kWh "
                    "(no supply, no consumption)"
                )
            outcome, took = commander.run(target, Action.CLOSE_ALLOWED)
            _say(f"    close-allowed: {outcome} after {took * 1000:.0f} ms")
            closed = True

    _say("summary (from InfluxDB):")
    print(f"    {'meter':<14}{'energy kWh':>12}{'readings':>10}{'intervals':>11}", flush=True)
    for m in meters:
        n = _count(influx, f"SELECT count(energy_fwd_active_total) FROM meter_reading WHERE meter = '{m}'")
        iv = _count(influx, f"SELECT count(energy_fwd_active_total) FROM intervals WHERE meter = '{m}'")
        span = _energy(influx, m)
        print(f"    {m:<14}{span[1] if span else 0:>12.2f}{n:>10}{iv:>11}", flush=True)
    missing = _missing_batches(metrics_port)
    if missing is None:
        _say("ingest's loss account: unreadable (metrics endpoint did not answer)")
    else:
        _say(f"ingest's loss account: {missing} batches missing (amigw_ingest_missing_batches)")
    today = (datetime.now(UTC) + timedelta(seconds=_UTC_OFFSET_S)).strftime("%Y-%m-%d")
    follow_up = [
        f"amigw ingest --config {work}/ingest.toml --completeness {meters[0]} {today}",
        f"amigw ingest --config {work}/ingest.toml --loss",
        f"curl -sG {influx.url}/query --data-urlencode db={DATABASE} "
        "--data-urlencode 'q=SELECT * FROM intervals ORDER BY time DESC LIMIT 5'",
    ]
    stored = _count(influx, "SELECT count(energy_fwd_active_total) FROM meter_reading")
    if args.keep_running:
        _say("still running (Ctrl-C stops everything); meanwhile, try:")
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
        _say("stopping: edge, ingest, simulator, influxd, mosquitto")
    return code
