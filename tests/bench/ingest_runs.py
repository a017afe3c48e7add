"""The measured runs of the end-to-end ingest bench, each into a fresh influxd database.

* :func:`ceiling_run`: pre-encoded, pre-gzipped requests posted straight to influxd by
  ``clients`` concurrent threads, each on its own kept-alive ``http.client`` connection; the clock
  starts after every body is compressed.
* :func:`ingest_run`: ``amigw ingest --workers N`` as a subprocess, the messages published QoS 1
  by a concurrent publisher; done when the workers' ``amigw_ingest_readings_total`` (read from
  each worker's metrics endpoint, port + i) counts every reading and, where the pipeline has a
  rollup stage (a metric ``amigw_ingest_rollup_pending``, else a ``rollup_pending`` table in the
  dedup database), when nothing is pending any more.
* :func:`conventional_run`: the pipeline a user would write: a paho subscriber (QoS 1) decoding
  JSON payloads into influxdb-client ``Point`` objects, one per reading, ``to_line_protocol()``,
  POSTs of 5,000 lines on one kept-alive ``http.client`` connection, uncompressed
  (influxdb-client's default); done when it reports every reading written.

Every run returns a :class:`Run`: readings/s, CPU seconds per million readings of the pipeline's
processes (user + sys from ``/proc/<pid>/stat`` over the measured window) and of influxd (the
same, until influxd has gone idle after the window: its cache snapshots and compactions of the
run's writes count with the run, whichever run they would otherwise fall into), and checks
afterwards that influxd holds every point.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocols import topics
from protocols.payload import encode
from tests.bench.ingest_workload import Workload

ROOT = Path(__file__).resolve().parents[2]
CLK = os.sysconf("SC_CLK_TCK")
PROGRESS_S = 10.0
TIMEOUT_S = float(os.environ.get("AMIGW_BENCH_TIMEOUT_S", "1800"))

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Run:
    readings_per_s: float
    cpu_us: float  # the pipeline's processes, CPU µs per reading (0 for the ceiling: no pipeline)
    influxd_cpu_us: float  # influxd, CPU µs per reading
    note: str = ""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def settled_cpu_s(
    pid: int, idle_share: float = 0.05, quiet_s: float = 2.0, step_s: float = 0.5, max_s: float = 60.0
) -> float:
    """The process's CPU seconds once it has been idle (under ``idle_share`` of a core) for
    ``quiet_s`` in a row, at most ``max_s`` of waiting: influxd's work that a run's writes cause
    after the run (the cache snapshot the bench's influxd takes 1 s after the last write, the
    compactions that follow) is counted with the run."""
    deadline = time.monotonic() + max_s
    before = cpu_s(pid)
    quiet = 0.0
    while time.monotonic() < deadline and quiet < quiet_s:
        time.sleep(step_s)
        now = cpu_s(pid)
        quiet = quiet + step_s if now - before < idle_share * step_s else 0.0
        before = now
    return before


def _per_reading_us(cpu: float, readings: int) -> float:
    return cpu / readings * 1e6


@dataclass(frozen=True, slots=True)
class Warm:
    """What a run is given before its clock starts (see
    :func:`~tests.bench.ingest_workload.warm_up`): ``lines`` written to its database, or
    ``payloads`` (of ``readings`` readings) through the pipeline itself, rollups and all; and how
    many points of the field the run counts afterwards they add."""

    lines: list[bytes]
    points: int
    payloads: list[tuple[str, bytes]] = field(default_factory=list)
    readings: int = 0


def _database(influxd: Any, prefix: str, warm: Warm) -> str:
    """A fresh database holding the warm-up lines, influxd idle again afterwards."""
    db = f"{prefix}_{uuid.uuid4().hex[:6]}"
    influxd.create_database(db)
    for data in warm.lines:
        influxd.write(data, db)
    settled_cpu_s(influxd.pid)
    return db


def count_points(influxd: Any, db: str, field: str = "voltage_a") -> int:
    rows = influxd.query(f'SELECT count("{field}") FROM "meter_reading"', db=db)
    return int(rows[0]["count"]) if rows else 0


# -- influxd's ceiling ---------------------------------------------------------------------------


def ceiling_run(influxd: Any, bodies: list[tuple[bytes, int]], wl: Workload, clients: int, warm: Warm) -> Run:
    """Post ``bodies`` (gzipped, ``(body, lines)``) of ``wl`` with ``clients`` concurrent connections."""
    db = _database(influxd, "ceil", warm)
    url = urllib.parse.urlsplit(influxd.url)
    target = f"/write?{urllib.parse.urlencode({'db': db, 'precision': 'ms'})}"
    headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8"}
    errors: list[str] = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
        try:
            for body, _ in bodies[k::clients]:
                conn.request("POST", target, body, headers)
                resp = conn.getresponse()
                answer = resp.read()
                if resp.status != 204:
                    errors.append(f"{resp.status} {answer[:200]!r}")
                    return
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    try:
        cpu0 = cpu_s(influxd.pid)
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        influx_cpu = settled_cpu_s(influxd.pid) - cpu0
        assert not errors, errors
        stored = count_points(influxd, db) - warm.points
        assert stored == wl.points, f"{stored} of {wl.points} points in influxd"
        lines = sum(n for _, n in bodies)
        return Run(wl.readings / elapsed, 0.0, _per_reading_us(influx_cpu, wl.readings), f"{lines:,} lines")
    finally:
        influxd.drop_database(db)


# -- the publisher -------------------------------------------------------------------------------


class Publisher:
    """Publishes the messages QoS 1 from a background thread while the pipeline consumes them."""

    def __init__(self, mosquitto: Any, items: list[tuple[str, bytes]]) -> None:
        self.items = items
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bp-{uuid.uuid4().hex[:6]}")
        self.client.max_inflight_messages_set(100)
        self.client.connect(mosquitto.host, mosquitto.port)
        self.client.loop_start()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._publish, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _publish(self) -> None:
        infos = [self.client.publish(topic, payload, qos=1) for topic, payload in self.items]
        for i in infos:
            i.wait_for_publish(TIMEOUT_S)
        self.done.set()

    def close(self) -> None:
        self.thread.join(TIMEOUT_S)
        self.client.loop_stop()
        self.client.disconnect()


# -- ingest end to end ---------------------------------------------------------------------------


def _free_port_block(n: int) -> int:
    """A port p such that p .. p + n - 1 are free on loopback now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base: int = s.getsockname()[1]
        if base + n >= 65536:
            continue
        ok = True
        for p in range(base + 1, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no block of {n} free ports")


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):  # labelled samples of one metric are summed
            sample, _, value = line.rpartition(" ")
            name = sample.partition("{")[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def _rollup_table_rows(dedup: Path) -> int | None:
    """Rows of the dedup database's ``rollup_pending`` table; None where there is no such table."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{dedup}?mode=ro", uri=True, timeout=30)) as con:
            rows: int = con.execute("SELECT count(*) FROM rollup_pending").fetchone()[0]
            return rows
    except sqlite3.OperationalError:
        return None


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def ingest_run(
    mosquitto: Any,
    influxd: Any,
    wl: Workload,
    payloads: list[bytes],
    workers: int,
    tmp: Path,
    progress: Progress,
    warm: Warm,
    rollups: bool = True,
) -> Run:
    db = _database(influxd, "ingest", warm)
    run_dir = tmp / db
    run_dir.mkdir()
    port = _free_port_block(workers)
    group = f"bench{uuid.uuid4().hex[:6]}"
    # rollups=False: the write path alone, every period left owed (a diagnostic of the split)
    rollup_key = "rollup_delay_s = 1\nrollup_check_s = 0.5\n" if rollups else "rollup_delay_s = 604800\n"
    dedup = run_dir / "dedup.sqlite"
    cfg = run_dir / "ingest.toml"
    cfg.write_text(
        f"metrics_listen = '127.0.0.1:{port}'\n"
        f"[mqtt]\nurl = {json.dumps(mosquitto.url)}\nclient_id = 'b-{db}'\nsession_expiry_s = 1\n"
        f"topics = [{json.dumps(f'$share/{group}/ami/v1/+/up/readings')}]\n"
        f"[influx]\nurl = {json.dumps(influxd.url)}\napi = 'v1'\ndatabase = {json.dumps(db)}\n"
        f"[dead_letter]\npath = {json.dumps(str(run_dir / 'dl.sqlite'))}\n"
        f"[dedup]\npath = {json.dumps(str(dedup))}\n"
        f"[loss]\npath = {json.dumps(str(run_dir / 'loss.sqlite'))}\n"
        f"[pipeline]\n{rollup_key}"
    )
    log = run_dir / "ingest.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "ingest", "--config", str(cfg), "--workers", str(workers)],
            cwd=ROOT, stderr=log_file,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while log.read_text().count("ingest worker started") < workers:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        pids = [proc.pid] if workers == 1 else [proc.pid, *_children(proc.pid)]
        ports = [port + i for i in range(workers)]
        alive = lambda: proc.poll() is None  # noqa: E731
        if warm.payloads:  # the series of every measurement exist, as on a running head-end
            pub = Publisher(mosquitto, warm.payloads)
            pub.start()
            _wait_ingested(warm.readings, ports, dedup, time.monotonic(), lambda _m: None, alive)
            pub.close()
            settled_cpu_s(influxd.pid)
        items = [(topics.readings(b.gateway), p) for b, p in zip(wl.batches, payloads, strict=True)]
        pub = Publisher(mosquitto, items)
        cpu0 = sum(cpu_s(p) for p in pids)
        icpu0 = cpu_s(influxd.pid)
        t0 = time.monotonic()
        pub.start()
        note = _wait_ingested(warm.readings + wl.readings, ports, dedup, t0, progress, alive, rollups)
        elapsed = time.monotonic() - t0
        cpu = sum(cpu_s(p) for p in pids) - cpu0
        influx_cpu = settled_cpu_s(influxd.pid) - icpu0
        pub.close()
        stored = count_points(influxd, db) - warm.points
        assert stored == wl.points, f"{stored} of {wl.points} points in influxd"
        return Run(
            wl.readings / elapsed,
            _per_reading_us(cpu, wl.readings),
            _per_reading_us(influx_cpu, wl.readings),
            note,
        )
    finally:
        proc.terminate()
        proc.wait(60)
        influxd.drop_database(db)


def _wait_ingested(
    readings: int,
    ports: list[int],
    dedup: Path,
    t0: float,
    progress: Progress,
    alive: Callable[[], bool],
    rollups: bool = True,
) -> str:
    """Poll the workers' metrics until they count ``readings`` written, then (``rollups``) until
    no rollup is pending (where there is a rollup stage); returns what was waited for."""
    deadline = t0 + TIMEOUT_S
    last = t0
    while True:
        metrics = [_metrics(p) for p in ports]
        written = int(sum(m.get("amigw_ingest_readings_total", 0.0) for m in metrics))
        if written >= readings:
            break
        assert alive() and time.monotonic() < deadline, f"{written:,} of {readings:,} readings written"
        if time.monotonic() - last >= PROGRESS_S:
            last = time.monotonic()
            progress(f"{written:,} of {readings:,} readings written, {last - t0:.0f} s")
        time.sleep(0.2)
    if not rollups:
        return "readings written; rollups left owed (the write path alone)"
    pending: Callable[[], float | None]
    if all("amigw_ingest_rollup_pending" in m for m in metrics):
        pending = lambda: sum(_metrics(p)["amigw_ingest_rollup_pending"] for p in ports)  # noqa: E731
        source = "amigw_ingest_rollup_pending = 0 on every worker"
    elif _rollup_table_rows(dedup) is not None:
        pending = lambda: _rollup_table_rows(dedup)  # noqa: E731
        source = "dedup table rollup_pending empty"
    else:
        return "readings written; no rollup stage found (derived lines are written with each batch)"
    progress(f"every reading written after {time.monotonic() - t0:.0f} s; waiting for the rollups")
    while (left := pending()) != 0:
        assert alive() and time.monotonic() < deadline, f"{left} rollups pending"
        if time.monotonic() - last >= PROGRESS_S:
            last = time.monotonic()
            progress(f"{left} rollups pending, {last - t0:.0f} s")
        time.sleep(0.2)
    return f"readings written and rollups done ({source})"


# -- the conventional pipeline -------------------------------------------------------------------

CONVENTIONAL = textwrap.dedent(
    """
    import http.client, json, sys, urllib.parse
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from influxdb_client import Point, WritePrecision
    from protocols.quantities import QUANTITIES
    host, port, topic, url, db = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    NAMES = {q.code: (q.name, q.decimals) for q in QUANTITIES}
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    target = "/write?" + urllib.parse.urlencode({"db": db, "precision": "ms"})
    written = 0
    def post(lines):
        conn.request("POST", target, "\\n".join(lines).encode(), {"Content-Type": "text/plain"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 204:
            raise RuntimeError(f"{resp.status} {body[:200]!r}")
    def on_message(client, userdata, msg):
        global written
        doc = json.loads(msg.payload)
        points = []
        for r in doc["readings"]:
            name, dec = NAMES[r["quantity"]]
            points.append(Point("meter_reading").tag("meter", doc["meters"][r["meter"]])
                          .tag("gateway", doc["gateway"]).tag("quantity", name)
                          .field("value", r["value"] / 10 ** dec).field("flags", r["flags"])
                          .time(r["ts"], WritePrecision.MS))
        lines = [p.to_line_protocol() for p in points]
        for i in range(0, len(lines), 5000):
            post(lines[i:i + 5000])
        written += len(lines)
        print(written, flush=True)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="conv-" + db)
    c.on_message = on_message
    c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    c.on_subscribe = lambda *a: print("ready", flush=True)
    c.connect(host, port)
    c.loop_forever()
    """
)


def conventional_run(
    mosquitto: Any,
    influxd: Any,
    wl: Workload,
    payloads: list[bytes],
    tmp: Path,
    progress: Progress,
    warm: Warm,
) -> Run:
    db = _database(influxd, "conv", warm)
    script = tmp / "conventional.py"
    script.write_text(CONVENTIONAL)
    proc = subprocess.Popen(
        [sys.executable, str(script), mosquitto.host, str(mosquitto.port), "ami/v1/+/up/readings", influxd.url, db],
        cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout is not None
    out = _Lines(proc.stdout.fileno())
    try:
        assert out.next(60) == "ready", "the conventional subscriber did not subscribe"
        items = [(topics.readings(b.gateway), p) for b, p in zip(wl.batches, payloads, strict=True)]
        pub = Publisher(mosquitto, items)
        cpu0 = cpu_s(proc.pid)
        icpu0 = cpu_s(influxd.pid)
        t0 = time.monotonic()
        pub.start()
        written, last = 0, t0
        while written < wl.readings:
            line = out.next(max(1.0, t0 + TIMEOUT_S - time.monotonic()))
            assert line, f"conventional pipeline stopped at {written:,} of {wl.readings:,} readings"
            written = int(line)
            if time.monotonic() - last >= PROGRESS_S:
                last = time.monotonic()
                progress(f"{written:,} of {wl.readings:,} readings written, {last - t0:.0f} s")
        elapsed = time.monotonic() - t0
        cpu = cpu_s(proc.pid) - cpu0
        influx_cpu = settled_cpu_s(influxd.pid) - icpu0
        pub.close()
        stored = count_points(influxd, db, "value") - warm.points
        assert stored == wl.readings, f"{stored} of {wl.readings} points in influxd"
        return Run(
            wl.readings / elapsed, _per_reading_us(cpu, wl.readings), _per_reading_us(influx_cpu, wl.readings)
        )
    finally:
        proc.terminate()
        proc.wait(60)
        influxd.drop_database(db)


class _Lines:
    """Lines of a pipe, with a timeout (``""`` at end of file or timeout)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def next(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return ""
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return ""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode().strip()


def json_payloads(wl: Workload) -> list[bytes]:
    return [encode(b, "json") for b in wl.batches]


def binary_payloads(wl: Workload) -> list[bytes]:
    return [encode(b) for b in wl.batches]
