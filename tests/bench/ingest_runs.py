"""The ingest run of the end-to-end ingest bench, and the anchors' runs for a :class:`Workload`.

* :func:`ingest_run`: ``amigw ingest --workers N`` as a subprocess, the messages published QoS 1
  by a concurrent publisher; done when the workers' ``amigw_ingest_readings_total`` (read from
  each worker's metrics endpoint, port + i) counts every reading and, where the pipeline has a
  rollup stage (a metric ``amigw_ingest_rollup_pending``, else a ``rollup_pending`` table in the
  dedup database), when nothing is pending any more.
* :func:`ceiling_run` and :func:`conventional_run`: the anchors of :mod:`simulators.bench_anchors`
  (influxd's ceiling with concurrent pre-gzipped writers; the conventional paho + JSON + ``Point``
  pipeline) over a workload's bodies or payloads.

Every run returns a :class:`~simulators.bench_anchors.Run` and checks that influxd holds every
point afterwards.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocols import topics
from protocols.payload import encode
from simulators import bench_anchors as anchors
from simulators.bench_anchors import Progress, Publisher, Run, Warm, count_points, cpu_s, settled_cpu_s
from tests.bench.ingest_workload import Workload

ROOT = Path(__file__).resolve().parents[2]
PROGRESS_S = anchors.PROGRESS_S
TIMEOUT_S = anchors.TIMEOUT_S

__all__ = ["Run", "Warm", "ceiling_run", "conventional_run", "ingest_run"]


def _per_reading_us(cpu: float, readings: int) -> float:
    return cpu / readings * 1e6


def ceiling_run(influxd: Any, bodies: list[tuple[bytes, int]], wl: Workload, clients: int, warm: Warm) -> Run:
    return anchors.ceiling_run(influxd, bodies, wl.readings, wl.points, clients, warm)


def conventional_run(
    mosquitto: Any,
    influxd: Any,
    wl: Workload,
    payloads: list[bytes],
    tmp: Path,
    progress: Progress,
    warm: Warm,
) -> Run:
    items = [(topics.readings(b.gateway), p) for b, p in zip(wl.batches, payloads, strict=True)]
    return anchors.conventional_run(mosquitto, influxd, items, wl.readings, tmp, progress, warm)


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
    db = anchors.fresh_database(influxd, "ingest", warm)
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


def json_payloads(wl: Workload) -> list[bytes]:
    return [encode(b, "json") for b in wl.batches]


def binary_payloads(wl: Workload) -> list[bytes]:
    return [encode(b) for b in wl.batches]
