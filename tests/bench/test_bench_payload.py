"""Benchmark: decode readings/s of a 10,000-reading batch, binary against JSON, in one run.

Run: bash .ci/bootstrap bench -k payload   (or: .venv/bin/python -m pytest tests/bench/test_bench_payload.py -s -o addopts="")
"""

from __future__ import annotations

import random
import time

import numpy as np

from protocols.payload import BatchBuilder, decode, encode

N = 10_000


def _batch():  # type: ignore[no-untyped-def]
    rng = random.Random(1)
    b = BatchBuilder()
    for i in range(N):
        b.add(f"{i % 250:012d}", 1_700_000_000_000 + (i // 250) * 900_000, 1 + i % 8, rng.randrange(10**8), 0)
    return b.build("gw-bench", seq=1)


def _rate(data: bytes, min_s: float = 1.0) -> float:
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_s:
        batch = decode(data)
        np.frombuffer(batch.value, dtype="<i8").sum()  # what ingest does next: touch the column
        runs += 1
    return runs * N / elapsed


def test_bench_decode_binary_vs_json() -> None:
    batch = _batch()
    binary, js = encode(batch, "binary"), encode(batch, "json")
    assert decode(binary) == decode(js) == batch
    rb, rj = _rate(binary), _rate(js)
    print(
        f"\npayload decode, {N}-reading batch: binary {rb:,.0f} readings/s ({len(binary):,} B), "
        f"json {rj:,.0f} readings/s ({len(js):,} B); binary/json = {rb / rj:.1f}x"
    )
    assert rb > rj
