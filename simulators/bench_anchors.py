"""The anchors a throughput figure is read against, measured on the same machine in the same run.

* :func:`ceiling_run`: influxd's ceiling: pre-encoded, pre-gzipped requests posted straight to
  influxd by ``clients`` concurrent threads, each on its own kept-alive ``http.client``
  connection; the clock starts after every body is compressed.
* :func:`conventional_run`: the pipeline a user would write: a paho subscriber (QoS 1) decoding
  JSON payloads into influxdb-client ``Point`` objects, one per reading, ``to_line_protocol()``,
  POSTs of 5,000 lines on one kept-alive ``http.client`` connection, uncompressed
  (influxdb-client's default); done when it reports every reading written.
* :func:`readings_lines`, :func:`pipeline_lines`, :func:`conventional_lines`, :func:`bodies`:
  what each side writes for a list of batches (the readings alone as the wide ``meter_reading``
  points; what the sink encodes per batch; the conventional pipeline's narrow lines), cut into
  requests of at most 5,000 lines and gzipped as the sink does.
* :class:`Publisher`: publishes ``(topic, payload)`` messages QoS 1 from a background thread while
  a pipeline consumes them.

Every run returns a :class:`Run`: readings/s, CPU seconds per million readings of the pipeline's
processes (user + sys from ``/proc/<pid>/stat`` over the measured window) and of influxd (the
same, until influxd has gone idle after the window: its cache snapshots and compactions of the
run's writes count with the run, whichever run they would otherwise fall into), and checks
afterwards that influxd holds every point. Each run writes into a fresh database that it drops.

Used by ``tests/bench`` (the ingest benchmark) and ``amigw bench e2e``. Needs the ``ingest`` and
``edge`` extras (paho-mqtt, influxdb-client).
"""

from __future__ import annotations

import http.client
import os
import select
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ingest.pipeline.transform import Settings, columns, transform
from ingest.sinks.base import Writes
from ingest.sinks.influx.http import gzip_body
from ingest.sinks.influx.lines import LineTables, TagCache, encode_lines, encode_writes
from protocols import topics
from protocols.payload import ReadingBatch
from protocols.quantities import QUANTITIES

__all__ = [
    "CONVENTIONAL",
    "BenchError",
    "Publisher",
    "Run",
    "Warm",
    "bodies",
    "ceiling_run",
    "conventional_lines",
    "conventional_run",
    "count_points",
    "cpu_s",
    "fresh_database",
    "pipeline_lines",
    "readings_lines",
    "rss_bytes",
    "settled_cpu_s",
]

ROOT = Path(__file__).resolve().parents[1]
CLK = os.sysconf("SC_CLK_TCK")
PROGRESS_S = 10.0
TIMEOUT_S = float(os.environ.get("AMIGW_BENCH_TIMEOUT_S", "1800"))

Progress = Callable[[str], None]
Items = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Run:
    readings_per_s: float
    cpu_us: float  # the pipeline's processes, CPU µs per reading (0 for the ceiling: no pipeline)
    influxd_cpu_us: float  # influxd, CPU µs per reading
    note: str = ""


class BenchError(RuntimeError):
    """A measured run went wrong (a write refused, a point missing, a pipeline stopped)."""


def _check(ok: object, message: object) -> None:
    if not ok:
        raise BenchError(str(message))


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


def rss_bytes(pid: int) -> int:
    """Resident memory of a live process (``VmRSS``), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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


def fresh_database(influxd: Any, prefix: str, warm: Warm) -> str:
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


# -- what each side writes ----------------------------------------------------------------------

POST_LINES = 5000  # the sink's max_batch_lines


def readings_lines(batches: Sequence[ReadingBatch]) -> list[bytes]:
    """Per batch, the wide ``meter_reading`` lines of its readings (what they alone cost influxd)."""
    out = []
    for b in batches:
        r, _ = columns(b)
        out.append(encode_lines(r, LineTables.build(b.meters, b.gateway), wide=True))
    return out


def pipeline_lines(batches: Sequence[ReadingBatch], settings: Settings) -> list[bytes]:
    """Per batch, what the sink writes for it: ``encode_writes`` of the batch's transform."""
    cache = TagCache()
    return [
        encode_writes(Writes(batches=[transform(b, settings).columns]), cache, wide=True) for b in batches
    ]


_NAMES = {q.code: (q.name, q.decimals) for q in QUANTITIES}


def conventional_lines(batches: Sequence[ReadingBatch]) -> list[bytes]:
    """Per batch, the narrow lines the conventional pipeline writes for it (a float ``value``
    and an integer ``flags`` per reading, tagged meter, gateway and quantity)."""
    out = []
    for b in batches:
        rows = zip(b.meter, b.ts, b.quantity, b.value, b.flags, strict=True)
        out.append(
            "".join(
                f"meter_reading,gateway={b.gateway},meter={b.meters[m]},quantity={_NAMES[q][0]} "
                f"value={v / 10 ** _NAMES[q][1]!r},flags={f}i {t}\n"
                for m, t, q, v, f in rows
            ).encode()
        )
    return out


def bodies(per_batch: Sequence[bytes], level: int = 1) -> list[tuple[bytes, int]]:
    """Requests of at most :data:`POST_LINES` lines cut from each batch's lines, gzipped at
    ``level`` as the sink does: ``(body, lines)``."""
    out = []
    for data in per_batch:
        lines = data.split(b"\n")[:-1]
        for i in range(0, len(lines), POST_LINES):
            part = lines[i : i + POST_LINES]
            out.append((gzip_body(b"\n".join(part) + b"\n", level), len(part)))
    return out


# -- influxd's ceiling ---------------------------------------------------------------------------


def ceiling_run(
    influxd: Any,
    bodies: list[tuple[bytes, int]],
    readings: int,
    points: int,
    clients: int,
    warm: Warm,
    field: str = "voltage_a",
) -> Run:
    """Post ``bodies`` (gzipped, ``(body, lines)``: ``readings`` readings in ``points`` wide
    ``meter_reading`` points, each with the field ``field``) with ``clients`` concurrent
    connections."""
    db = fresh_database(influxd, "ceil", warm)
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
        _check(not errors, errors)
        stored = count_points(influxd, db, field) - warm.points
        _check(stored == points, f"{stored} of {points} points in influxd")
        lines = sum(n for _, n in bodies)
        return Run(readings / elapsed, 0.0, _per_reading_us(influx_cpu, readings), f"{lines:,} lines")
    finally:
        influxd.drop_database(db)


# -- the publisher -------------------------------------------------------------------------------


class Publisher:
    """Publishes the messages QoS 1 from a background thread while the pipeline consumes them."""

    def __init__(self, mosquitto: Any, items: Items) -> None:
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
    items: Items,
    readings: int,
    tmp: Path,
    progress: Progress,
    warm: Warm,
) -> Run:
    db = fresh_database(influxd, "conv", warm)
    script = tmp / "conventional.py"
    script.write_text(CONVENTIONAL)
    argv = [sys.executable, str(script), mosquitto.host, str(mosquitto.port), topics.readings("+")]
    proc = subprocess.Popen(
        [*argv, influxd.url, db],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    out = _Lines(proc.stdout.fileno())
    try:
        _check(out.next(60) == "ready", "the conventional subscriber did not subscribe")
        pub = Publisher(mosquitto, items)
        cpu0 = cpu_s(proc.pid)
        icpu0 = cpu_s(influxd.pid)
        t0 = time.monotonic()
        pub.start()
        written, last = 0, t0
        while written < readings:
            line = out.next(max(1.0, t0 + TIMEOUT_S - time.monotonic()))
            _check(line, f"conventional pipeline stopped at {written:,} of {readings:,} readings")
            written = int(line)
            if time.monotonic() - last >= PROGRESS_S:
                last = time.monotonic()
                progress(f"{written:,} of {readings:,} readings written, {last - t0:.0f} s")
        elapsed = time.monotonic() - t0
        cpu = cpu_s(proc.pid) - cpu0
        influx_cpu = settled_cpu_s(influxd.pid) - icpu0
        pub.close()
        stored = count_points(influxd, db, "value") - warm.points
        _check(stored == readings, f"{stored} of {readings} points in influxd")
        return Run(readings / elapsed, _per_reading_us(cpu, readings), _per_reading_us(influx_cpu, readings))
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
