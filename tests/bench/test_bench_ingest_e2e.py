"""Benchmark: the ingest pipeline end to end (MQTT -> worker subprocesses -> influxd), as ratios
of figures measured in one run on one machine.

For each meter shape (A: single-phase household, 4 quantities, 2,000 meters per message; B: 10
quantities, 800 meters per message; :mod:`tests.bench.ingest_workload`), over 20,000 meters and
about 1.6 M readings of 15-minute reads a few days back (periods closed), it measures
(:mod:`tests.bench.ingest_runs`):

1. influxd's ceiling for the readings alone (the wide ``meter_reading`` lines) and for the
   pipeline's own lines (what the sink encodes per batch), posted by one client per core (at
   least 2), each on a kept-alive connection, gzipped before the clock starts;
2. ``amigw ingest --workers N`` for N = 1, 2, 4, ... up to the cores present, until every reading
   is written and every rollup done, with the workers' and influxd's CPU per reading;
3. the conventional pipeline (paho, JSON, a ``Point`` per reading, POSTs of 5,000 lines on a
   kept-alive connection, uncompressed).

It prints the ratios with their aims; it asserts only sanity (the workload flags nothing, every
point arrived, ratios positive): timing is not a test. A second, quick test checks how a run's
end is detected (readings counted, then the rollup stage drained) against metrics endpoints.

Run: ``bash .ci/bootstrap bench -k ingest_e2e``. Sizes: ``AMIGW_BENCH_READINGS`` (readings per
measured run, default 1,600,000), ``AMIGW_BENCH_METERS`` (default 20,000), ``AMIGW_BENCH_SHAPES``
(default ``A,B``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from ingest.config import SAMPLE, parse_config
from ingest.pipeline.transform import Settings, transform
from protocols import topics
from simulators.servers import Influxd
from tests.bench import ingest_runs as runs
from tests.bench import ingest_workload as workload

READINGS = int(os.environ.get("AMIGW_BENCH_READINGS", "1600000"))
METERS = int(os.environ.get("AMIGW_BENCH_METERS", "20000"))
SHAPES = os.environ.get("AMIGW_BENCH_SHAPES", "A,B").split(",")


def _version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip().splitlines()[0]


def _worker_counts(cores: int) -> list[int]:
    counts = [1]
    while counts[-1] * 2 <= cores:
        counts.append(counts[-1] * 2)
    if counts[-1] != cores and cores > 1:
        counts.append(cores)
    return counts


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        m, s = divmod(int(time.monotonic() - self.t0), 60)
        print(f"[bench {m:02d}:{s:02d}] {text}", flush=True)

    def prefixed(self, prefix: str) -> runs.Progress:
        return lambda text: self.say(f"{prefix}: {text}")


def _us(x: float) -> str:
    return f"{x:.2f} µs"


@pytest.fixture(scope="module")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influxd]:
    """The bench's own influxd: it snapshots its cache 1 s after the last write (default: 10
    min), so every run pays for the snapshot of what it wrote within its settle time, whether
    or not it filled the cache (25 MB) during the run."""
    server = Influxd(
        tmp_path_factory.mktemp("influxd-bench"), data={"cache-snapshot-write-cold-duration": '"1s"'}
    )
    server.start()
    yield server
    server.stop()


@pytest.mark.timeout(3600)  # the suite's 300 s is for tests; this runs for minutes
def test_ingest_e2e(mosquitto: Any, influxd: Any, tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    clients = max(2, cores)
    counts = _worker_counts(cores)
    clock = _Clock()
    print(
        f"\ningest e2e bench: os.cpu_count() = {os.cpu_count()}, usable cores (sched_getaffinity) = {cores}, "
        f"load average {os.getloadavg()[0]:.2f} at start\n"
        f"  {_version([influxd.binary, 'version'])}; {_version([mosquitto.binary, '-h'])}; "
        f"Python {platform.python_version()}\n"
        f"  {READINGS:,} readings per measured run, {METERS:,} meters, shapes {','.join(SHAPES)}; "
        f"workers {counts}; ceiling clients {clients}",
        flush=True,
    )
    settings = Settings.from_config(parse_config(SAMPLE))
    summary: list[str] = []
    first = True
    for name in SHAPES:
        shape = workload.SHAPES[name]
        wl = workload.build(shape, METERS, READINGS)
        clock.say(wl.describe())
        for b in (wl.batches[0], wl.batches[-1]):  # a healthy fleet: validation flags nothing
            flagged = int(np.count_nonzero(transform(b, settings).flags))
            assert flagged == 0, (
                f"the workload is not clean: {flagged} readings flagged in {b.gateway} #{b.seq}"
            )
        binary, as_json = runs.binary_payloads(wl), runs.json_payloads(wl)
        readings_bodies = workload.bodies(workload.readings_lines(wl))
        pipeline_bodies = workload.bodies(workload.pipeline_lines(wl, settings))
        before = workload.warm_up(wl)  # every run writes into existing series
        warm_readings = runs.Warm(workload.readings_lines(before), before.points)
        warm_pipeline = runs.Warm(workload.pipeline_lines(before, settings), before.points)
        warm_payloads = runs.binary_payloads(before)
        warm_ingest = runs.Warm(
            [],
            before.points,
            [(topics.readings(b.gateway), p) for b, p in zip(before.batches, warm_payloads, strict=True)],
            before.readings,
        )
        warm_conventional = runs.Warm(workload.conventional_lines(before), before.readings)
        if first:  # a fresh influxd's first run is slower than any later one: not measured
            clock.say(f"{name}: influxd warm-up (not measured)")
            runs.ceiling_run(influxd, readings_bodies, wl, clients, warm_readings)
            first = False

        clock.say(f"{name}: influxd ceiling, readings alone ({clients} clients)")
        ceil_r = runs.ceiling_run(influxd, readings_bodies, wl, clients, warm_readings)
        clock.say(f"{name}: influxd ceiling, the pipeline's lines ({clients} clients)")
        ceil_p = runs.ceiling_run(influxd, pipeline_bodies, wl, clients, warm_pipeline)
        ingest: dict[int, runs.Run] = {}
        for n in counts:
            clock.say(f"{name}: ingest, {n} worker(s)")
            ingest[n] = runs.ingest_run(
                mosquitto,
                influxd,
                wl,
                binary,
                n,
                tmp_path,
                clock.prefixed(f"{name}: ingest {n}w"),
                warm_ingest,
            )
        clock.say(f"{name}: ingest, 1 worker, write path alone (rollups left owed)")
        bare = runs.ingest_run(
            mosquitto,
            influxd,
            wl,
            binary,
            1,
            tmp_path,
            clock.prefixed(f"{name}: write path"),
            warm_ingest,
            False,
        )
        clock.say(f"{name}: conventional pipeline")
        conv = runs.conventional_run(
            mosquitto,
            influxd,
            wl,
            as_json,
            tmp_path,
            clock.prefixed(f"{name}: conventional"),
            warm_conventional,
        )
        one = ingest[1]
        lines = [
            "",
            wl.describe(),
            f"  influxd ceiling, readings alone ({ceil_r.note}, {clients} clients, gzipped before the clock): "
            f"{ceil_r.readings_per_s:,.0f} readings/s; influxd {_us(ceil_r.influxd_cpu_us)} CPU per reading",
            f"  influxd ceiling, the pipeline's lines ({ceil_p.note}: what encode_writes writes per batch; "
            f"rolled-up period lines, if any, not included): {ceil_p.readings_per_s:,.0f} readings/s "
            f"= {ceil_p.readings_per_s / ceil_r.readings_per_s:.2f}x the readings alone; influxd "
            f"{_us(ceil_p.influxd_cpu_us)} CPU per reading",
        ]
        for n, r in ingest.items():
            lines.append(
                f"  ingest, {n} worker(s) of {cores} cores: {r.readings_per_s:,.0f} readings/s "
                f"= {r.readings_per_s / one.readings_per_s:.2f}x 1 worker "
                f"= {r.readings_per_s / ceil_r.readings_per_s:.2f}x the readings-only ceiling (aim >= 0.5x) "
                f"= {r.readings_per_s / ceil_p.readings_per_s:.2f}x the pipeline-lines ceiling; "
                f"workers {_us(r.cpu_us)} CPU per reading; influxd {_us(r.influxd_cpu_us)} per reading "
                f"= {r.influxd_cpu_us / ceil_r.influxd_cpu_us:.2f}x the readings alone (aim <= 2x)"
            )
        lines += [
            f"    ({one.note})",
            f"  ingest, 1 worker, the write path alone (every period left owed, not rolled up): "
            f"{bare.readings_per_s:,.0f} readings/s = {bare.readings_per_s / ceil_r.readings_per_s:.2f}x the "
            f"readings-only ceiling; workers {_us(bare.cpu_us)} CPU per reading; influxd "
            f"{_us(bare.influxd_cpu_us)} per reading = {bare.influxd_cpu_us / ceil_r.influxd_cpu_us:.2f}x the "
            f"readings alone: the rest of the figures above is the rollups' cost",
            f"  conventional (paho, JSON, a Point per reading, POSTs of 5,000 lines, kept-alive, no gzip): "
            f"{conv.readings_per_s:,.0f} readings/s, {_us(conv.cpu_us)} CPU per reading, influxd "
            f"{_us(conv.influxd_cpu_us)} per reading",
            f"  ingest 1 worker / conventional: {one.readings_per_s / conv.readings_per_s:.2f}x readings/s "
            f"(aim >= 2x); conventional CPU / ours per reading: {conv.cpu_us / one.cpu_us:.1f}x (aim >= 5x)",
        ]
        print("\n".join(lines), flush=True)
        summary += lines
        for r in (ceil_r, ceil_p, *ingest.values(), bare, conv):
            assert r.readings_per_s > 0 and r.influxd_cpu_us > 0
        assert one.cpu_us > 0 and conv.cpu_us > 0
    print(
        f"\n== ingest e2e summary (load average {os.getloadavg()[0]:.2f} at the end, {sys.platform}) ==",
        *summary,
        sep="\n",
        flush=True,
    )


def _serve(registry: CollectorRegistry) -> int:
    port = runs._free_port_block(1)
    start_http_server(port, addr="127.0.0.1", registry=registry)
    return port


def test_ingest_e2e_waits_for_the_rollup_stage(tmp_path: Path) -> None:
    """The bench's end of a run: every reading counted by the workers' metrics, then, where the
    pipeline has a rollup stage, nothing pending (the gauge on every worker, else the dedup
    table); without one it says so. No servers but the metrics endpoints."""
    wl = workload.build(workload.SHAPES["A"], 2000, 8000)
    said: list[str] = []
    registries = [CollectorRegistry() for _ in range(2)]
    readings = [Counter("amigw_ingest_readings", "", registry=r) for r in registries]
    readings[0].inc(wl.readings // 2)
    readings[1].inc(wl.readings - wl.readings // 2)
    ports = [_serve(r) for r in registries]
    dedup = tmp_path / "dedup.sqlite"

    def alive() -> bool:
        return True

    assert "no rollup stage found" in runs._wait_ingested(
        wl.readings, ports, dedup, time.monotonic(), said.append, alive
    )

    with contextlib.closing(sqlite3.connect(dedup)) as con, con:
        con.execute("CREATE TABLE rollup_pending (gateway TEXT, kind TEXT, period_ms INTEGER)")
        con.execute("INSERT INTO rollup_pending VALUES ('gwb-000', 'daily', 0)")
    threading.Timer(0.5, _empty_table, (dedup,)).start()
    note = runs._wait_ingested(wl.readings, ports, dedup, time.monotonic(), said.append, alive)
    assert "rollup_pending empty" in note and runs._rollup_table_rows(dedup) == 0

    gauges = [Gauge("amigw_ingest_rollup_pending", "", ["kind"], registry=r) for r in registries]
    gauges[0].labels("daily").set(2)
    gauges[1].labels("hourly").set(1)
    threading.Timer(0.5, _zero, (gauges[0].labels("daily"), gauges[1].labels("hourly"))).start()
    note = runs._wait_ingested(wl.readings, ports, dedup, time.monotonic(), said.append, alive)
    assert "amigw_ingest_rollup_pending = 0 on every worker" in note
    assert all(runs._metrics(p)["amigw_ingest_rollup_pending"] == 0 for p in ports)


def _zero(*gauges: Gauge) -> None:
    for g in gauges:
        g.set(0)


def _empty_table(dedup: Path) -> None:
    with contextlib.closing(sqlite3.connect(dedup)) as con, con:
        con.execute("DELETE FROM rollup_pending")
