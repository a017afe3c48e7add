"""Benchmark: the ingest pipeline end to end, MQTT -> worker subprocess -> influxd, as ratios of one run.

(a) readings/s from MQTT into influxd against influxd's own ceiling (the same pre-encoded line
    protocol, same batches, posted straight to it by one sequential gzip client: InfluxWriter);
(b) CPU seconds per million readings of the worker process (user+sys from /proc/<pid>/stat, sink
    included) against a conventional pipeline: a paho callback decoding JSON payloads into
    influxdb-client ``Point`` objects, ``to_line_protocol()``, posted in batches of the same size.
    Two forms of it: the usual one (a ``Point`` per reading: the target, 10x, is judged
    on it) and a stricter one with our wide schema (a ``Point`` per meter and time, a field per
    quantity), which leaves out the schema's share of the gain and writes a quarter of our lines;
(c) two workers (``--workers 2``) against one (throughput);
(d) schema: wide vs narrow readings, values/s posted straight into influxd.

Run: .venv/bin/python -m pytest tests/bench/test_bench_ingest_e2e.py -s -o addopts=""
Loopback only, bounded loops (N_BATCHES batches of METERS x len(QUANTITIES) readings per run).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ingest.config import SAMPLE, parse_config
from ingest.pipeline.transform import Settings, columns, transform
from ingest.sinks.influx.http import InfluxWriter, SinkConfig
from ingest.sinks.influx.lines import LineTables, TagCache, encode_batch, encode_lines
from protocols.payload import BatchBuilder, ReadingBatch, encode
from protocols.quantities import by_name

ROOT = Path(__file__).resolve().parents[2]
N_BATCHES = 80
METERS = 500
QUANTITIES = [by_name(n).code for n in (
    "energy_fwd_active_total", "energy_fwd_active_t1", "energy_fwd_active_t2", "energy_fwd_active_t3",
    "energy_fwd_active_t4", "voltage_a", "voltage_b", "voltage_c", "current_a", "power_active_total")]  # fmt: skip
PER_BATCH = METERS * len(QUANTITIES)
TOTAL = N_BATCHES * PER_BATCH
Q = 900_000
T0 = 1_710_000_000_000
CLK = os.sysconf("SC_CLK_TCK")


def make_batches(gw: str) -> list[ReadingBatch]:
    out = []
    for b in range(N_BATCHES):
        bb = BatchBuilder()
        t = T0 + (b + 1) * Q
        for m in range(METERS):
            mid = f"{m:012d}"
            for q in QUANTITIES[:5]:
                bb.set_prev(mid, q, 100_000 + m + b * 25, t - Q)
            for q in QUANTITIES:
                v = 100_000 + m + (b + 1) * 25 if q < 10 else 2200 + (m % 50)
                bb.add(mid, t, q, v)
        out.append(bb.build(gw, b + 1, sent_ms=t))
    return out


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def count(influxd: Any, db: str, measurement: str = "meter_reading", field: str = "voltage_a") -> int:
    rows = influxd.query(f'SELECT count("{field}") FROM "{measurement}"', db=db)
    return int(rows[0]["count"]) if rows else 0


def publisher(mosquitto: Any) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bp-{uuid.uuid4().hex[:6]}")
    c.max_inflight_messages_set(200)
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    return c


def publish_all(c: mqtt.Client, items: list[tuple[str, bytes]]) -> None:
    infos = [c.publish(topic, payload, qos=1) for topic, payload in items]
    for i in infos:
        i.wait_for_publish(60)


def wait_count(influxd: Any, db: str, expected: int, timeout_s: float = 300, **kw: Any) -> float:
    deadline = time.monotonic() + timeout_s
    while (n := count(influxd, db, **kw)) < expected:
        assert time.monotonic() < deadline, f"only {n} of {expected} points"
        time.sleep(0.1)
    return time.monotonic()


def ingest_run(mosquitto: Any, influxd: Any, tmp: Path, workers: int) -> tuple[float, float]:
    """(readings/s, worker CPU s per million readings) for one ingest run with N workers."""
    db = f"bench_{uuid.uuid4().hex[:6]}"
    influxd.create_database(db)
    gw = f"gwb-{uuid.uuid4().hex[:6]}"
    cfg = tmp / f"ingest-{db}.toml"
    cfg.write_text(
        f"[mqtt]\nurl = {json.dumps(mosquitto.url)}\nclient_id = 'b-{db}'\nqueue_max = 16\n"
        f"topics = [{json.dumps(f'$share/{db}/ami/v1/{gw}/up/readings')}]\n"
        f"[influx]\nurl = {json.dumps(influxd.url)}\napi = 'v1'\ndatabase = {json.dumps(db)}\n"
        f"[dead_letter]\npath = {json.dumps(str(tmp / f'{db}-dl.sqlite'))}\n"
        f"[dedup]\npath = {json.dumps(str(tmp / f'{db}-dd.sqlite'))}\n"
    )
    log = tmp / f"{db}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "ingest", "--config", str(cfg), "--workers", str(workers)],
        cwd=ROOT, stderr=open(log, "wb"),  # noqa: SIM115
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("ingest worker started") < workers:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        pids = [proc.pid] if workers == 1 else _children(proc.pid)
        items = [(f"ami/v1/{gw}/up/readings", encode(b)) for b in make_batches(gw)]
        return measure(mosquitto, influxd, db, items, pids, TOTAL // len(QUANTITIES))
    finally:
        stop(proc, influxd, db)


def measure(
    mosquitto: Any,
    influxd: Any,
    db: str,
    items: list[tuple[str, bytes]],
    pids: list[int],
    points: int,
    **count_kw: Any,
) -> tuple[float, float]:
    """Publish ``items``, wait for ``points`` points in ``db``: (readings/s, CPU seconds per million
    readings of the processes ``pids``)."""  # fmt: skip
    pub = publisher(mosquitto)
    try:
        cpu0 = sum(cpu_s(p) for p in pids)
        t0 = time.monotonic()
        publish_all(pub, items)
        t1 = wait_count(influxd, db, points, **count_kw)
        cpu = sum(cpu_s(p) for p in pids) - cpu0
    finally:
        pub.loop_stop()
        pub.disconnect()
    return TOTAL / (t1 - t0), cpu / (TOTAL / 1e6)


def stop(proc: subprocess.Popen[bytes], influxd: Any, db: str) -> None:
    proc.terminate()
    proc.wait(30)
    influxd.drop_database(db)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


CONVENTIONAL = textwrap.dedent(
    """
    import gzip, json, sys, threading, urllib.request
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from influxdb_client import Point, WritePrecision
    from protocols.quantities import QUANTITIES
    host, port, topic, url, db, wide = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "wide"
    NAMES = {q.code: (q.name, q.decimals) for q in QUANTITIES}
    def post(lines):
        body = gzip.compress("\\n".join(lines).encode(), 1)
        req = urllib.request.Request(f"{url}/write?db={db}&precision=ms", data=body, method="POST",
                                     headers={"Content-Encoding": "gzip"})
        urllib.request.urlopen(req, timeout=30).read()
    def on_message(client, userdata, msg):
        doc = json.loads(msg.payload)
        if not wide:
            points = []
            for r in doc["readings"]:
                name, dec = NAMES[r["quantity"]]
                points.append(Point("meter_reading").tag("meter", doc["meters"][r["meter"]])
                              .tag("gateway", doc["gateway"]).tag("quantity", name)
                              .field("value", r["value"] / 10 ** dec).field("flags", r["flags"])
                              .time(r["ts"], WritePrecision.MS))
            post([p.to_line_protocol() for p in points])
            return
        points = {}
        for r in doc["readings"]:
            key = (r["meter"], r["ts"])
            p = points.get(key)
            if p is None:
                p = points[key] = (Point("meter_reading").tag("meter", doc["meters"][r["meter"]])
                                   .tag("gateway", doc["gateway"]).time(r["ts"], WritePrecision.MS))
            name, dec = NAMES[r["quantity"]]
            p.field(name, r["value"] / 10 ** dec)
            if r["flags"]:
                p.field(name + "_flags", r["flags"])
        post([p.to_line_protocol() for p in points.values()])
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="conv-" + db)
    c.on_message = on_message
    c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    c.connect(host, port)
    print("ready", flush=True)
    c.loop_forever()
    """
)


def conventional_run(mosquitto: Any, influxd: Any, tmp: Path, schema: str = "wide") -> tuple[float, float]:
    db = f"conv_{uuid.uuid4().hex[:6]}"
    influxd.create_database(db)
    gw = f"gwc-{uuid.uuid4().hex[:6]}"
    script = tmp / "conventional.py"
    script.write_text(CONVENTIONAL)
    topic = f"ami/v1/{gw}/up/readings"
    proc = subprocess.Popen(
        [sys.executable, str(script), mosquitto.host, str(mosquitto.port), topic, influxd.url, db, schema],
        cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(1.0)  # subscribed
        items = [(topic, encode(b, "json")) for b in make_batches(gw)]
        if schema == "wide":
            return measure(mosquitto, influxd, db, items, [proc.pid], TOTAL // len(QUANTITIES))
        return measure(mosquitto, influxd, db, items, [proc.pid], TOTAL, field="value")
    finally:
        stop(proc, influxd, db)


async def _post_all(influxd: Any, db: str, bodies: list[bytes], tmp: Path) -> float:
    async with InfluxWriter(SinkConfig(url=influxd.url, api="v1", database=db)) as sink:
        t0 = time.monotonic()
        for body in bodies:
            await sink.write(body)
        elapsed = time.monotonic() - t0
    return elapsed


def direct_run(influxd: Any, tmp: Path, bodies: list[bytes]) -> float:
    db = f"direct_{uuid.uuid4().hex[:6]}"
    influxd.create_database(db)
    try:
        return asyncio.run(_post_all(influxd, db, bodies, tmp))
    finally:
        influxd.drop_database(db)


def test_ingest_end_to_end(mosquitto: Any, influxd: Any, tmp_path: Path) -> None:
    settings = Settings.from_config(parse_config(SAMPLE))
    batches = make_batches("gw-ceiling")
    full = [encode_batch(transform(b, settings).columns, TagCache(), wide=True) for b in batches]
    wide, narrow = [], []
    for b in batches:
        r, _ = columns(b)
        tables = LineTables.build(b.meters, b.gateway)
        wide.append(encode_lines(r, tables, wide=True))
        narrow.append(encode_lines(r, tables, wide=False))

    ceiling = TOTAL / direct_run(influxd, tmp_path, full)
    one, cpu_one = ingest_run(mosquitto, influxd, tmp_path, 1)
    two, _ = ingest_run(mosquitto, influxd, tmp_path, 2)
    conv, cpu_conv = conventional_run(mosquitto, influxd, tmp_path)
    _, cpu_textbook = conventional_run(mosquitto, influxd, tmp_path, "narrow")
    wide_vps = TOTAL / direct_run(influxd, tmp_path, wide)
    narrow_vps = TOTAL / direct_run(influxd, tmp_path, narrow)

    print(
        f"\ningest e2e: {N_BATCHES} batches x {PER_BATCH} readings ({METERS} meters x {len(QUANTITIES)} quantities)"
    )
    print(f"(a) influxd ceiling (same lines posted directly): {ceiling:,.0f} readings/s")
    print(
        f"    ingest, 1 worker, MQTT -> influxd:          {one:,.0f} readings/s  = {one / ceiling:.2f}x ceiling"
    )
    print(f"(b) worker CPU:       {cpu_one:.2f} s per million readings (sink, intervals, daily TOU included)")
    print(
        f"    conventional CPU (paho + JSON + a Point per reading): {cpu_textbook:.2f} s per million readings"
    )
    print(
        f"    ratio: {cpu_textbook / cpu_one:.1f}x less CPU per reading (the conventional baseline; target 10x)"
    )
    print(f"    stricter, same wide schema (a Point per meter and time): {cpu_conv:.2f} s per million "
          f"readings, {conv:,.0f} readings/s = {cpu_conv / cpu_one:.1f}x ours")  # fmt: skip
    print(f"(c) 2 workers: {two:,.0f} readings/s = {two / one:.2f}x one worker")
    print(f"(d) schema into influxd: wide {wide_vps:,.0f} values/s, narrow {narrow_vps:,.0f} values/s "
          f"= wide {wide_vps / narrow_vps:.2f}x narrow")  # fmt: skip
    assert one > 0 and cpu_one > 0 and cpu_conv > 0 and cpu_textbook > 0
