"""Benchmark: line-protocol bytes/s and points/s, numba encoder (narrow and wide schemas) against
influxdb-client's ``Point(...).tag().field().time().to_line_protocol()``, in one run.

Run: .venv/bin/python -m pytest tests/bench/test_bench_lineproto.py -s -o addopts="" """

from __future__ import annotations

import time

import numpy as np
from influxdb_client import Point, WritePrecision

from ingest.rules import stages
from ingest.sinks.influx import lines as lp

T0 = 1_710_000_000_000
QS = np.array([1, 3, 30, 33, 40], np.uint16)


def _batch(nmeters: int, per_meter_points: int):
    rng = np.random.default_rng(2)
    n = nmeters * per_meter_points * QS.shape[0]
    m = np.repeat(np.arange(nmeters, dtype=np.uint32), per_meter_points * QS.shape[0])
    ts = T0 + np.tile(np.repeat(np.arange(per_meter_points) * 900_000, QS.shape[0]), nmeters)
    r = stages.Readings(
        m,
        ts.astype(np.int64),
        np.tile(QS, n // QS.shape[0]),
        rng.integers(0, 10**8, n).astype(np.int64),
        np.zeros(n, np.uint32),
    )
    ids = [f"{i:012d}" for i in range(nmeters)]
    return r, ids


def _point_api(r, ids):
    names = {int(q): lp._FIELD_NAMES[int(q)].decode() for q in QS}
    dec = {int(q): int(stages.Q_DECIMALS[q]) for q in QS}
    out = []
    for m, t, q, v in zip(
        r.meter.tolist(), r.ts.tolist(), r.quantity.tolist(), r.value.tolist(), strict=True
    ):
        p = (
            Point("meter_reading")
            .tag("meter", ids[m])
            .tag("gateway", "gw-1")
            .tag("quantity", names[q])
            .field("value", v / 10 ** dec[q])
            .field("flags", 0)
            .time(t, WritePrecision.MS)
        )
        out.append(p.to_line_protocol())
    return "\n".join(out).encode()


def _rate(fn, min_s=1.0):
    runs, nbytes, started = 0, 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_s or runs == 0:
        nbytes += len(fn())
        runs += 1
    return runs, nbytes / elapsed, elapsed


def test_bench_line_protocol_vs_point_api() -> None:
    r, ids = _batch(2_000, 40)  # 400,000 readings
    rs, ids_s = _batch(40, 40)  # 8,000 readings for the slow path
    tables = lp.LineTables.build(ids, "gw-1")
    lp.encode_lines(rs, lp.LineTables.build(ids_s, "gw-1"))  # compile
    res = {}
    for name, fn, n in (
        ("numba narrow", lambda: lp.encode_lines(r, lp.LineTables.build(ids, "gw-1")), len(r)),
        ("numba wide", lambda: lp.encode_lines(r, tables, wide=True), len(r)),
        ("Point API", lambda: _point_api(rs, ids_s), len(rs)),
    ):
        runs, bps, elapsed = _rate(fn)
        res[name] = (bps, runs * n / elapsed, len(fn()) / n)
    print()
    for name, (bps, rps, per) in res.items():
        print(f"{name:13s} {bps / 1e6:8.1f} MB/s {rps:12,.0f} readings/s {per:6.1f} B/reading")
    base = res["Point API"][1]
    print(
        f"readings/s ratio vs Point API: narrow {res['numba narrow'][1] / base:,.0f}x, "
        f"wide {res['numba wide'][1] / base:,.0f}x; bytes/s ratio: narrow "
        f"{res['numba narrow'][0] / res['Point API'][0]:,.0f}x, "
        f"wide {res['numba wide'][0] / res['Point API'][0]:,.0f}x"
    )
    assert res["numba narrow"][1] > base
