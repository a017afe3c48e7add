"""Benchmark: replaying a full outbox after an outage, bounded window against publish-await-PUBACK.

Both run in the same process against the same real mosquitto (DESIGN §9: ratios from one run).
The outbox holds 20,000 batches of ~2 KB, as after a few hours offline; the baseline publishes a
sample strictly one at a time (await the PUBACK, delete the row, next), which is what a naive
outbox loop does. Both measure the broker leg alone (``confirm="broker"``: a row leaves on its
PUBACK); the head-end's confirmations arrive separately and cost one small message per batch range.

Run: .venv/bin/python -m pytest tests/bench/test_bench_outbox.py -s -o addopts=""
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

from gateway.outbox import Outbox
from gateway.publisher import Publisher
from simulators.servers import Mosquitto

N = 20_000
BASELINE_N = 2_000
PAYLOAD_BYTES = 2_048


def _fill(outbox: Outbox, topic: str, n: int) -> None:
    rng = random.Random(1)
    for i in range(n):
        outbox.add(topic, i.to_bytes(4, "little") + rng.randbytes(PAYLOAD_BYTES - 4), kind="register")


async def _sequential(pub: Publisher, outbox: Outbox) -> float:
    started = time.perf_counter()
    while True:
        tx = outbox.begin(1)
        if not tx.rows:
            break
        row = tx.rows[0]
        await pub.publish(row.topic, row.payload, qos=1)
        outbox.end(tx, [row.id])
    return time.perf_counter() - started


async def test_bench_drain_window_vs_sequential(mosquitto: Mosquitto, tmp_path: Path) -> None:
    gw = f"gw-bench-{uuid.uuid4().hex[:6]}"
    topic = f"ami/v1/{gw}/up/readings"
    results: dict[str, float] = {}
    async with Publisher(mosquitto.url, gateway=gw, window=1000) as pub:
        await pub.wait_connected(10)
        with Outbox(tmp_path / "seq.db", max_bytes=1 << 30, confirm="broker") as outbox:
            _fill(outbox, topic, BASELINE_N)
            results["sequential"] = BASELINE_N / await _sequential(pub, outbox)
            assert len(outbox) == 0
        for window in (20, 100, 1000):
            with Outbox(tmp_path / f"w{window}.db", max_bytes=1 << 30, confirm="broker") as outbox:
                _fill(outbox, topic, N)
                started = time.perf_counter()
                delivered = await pub.drain(outbox, window=window)
                results[f"window {window}"] = N / (time.perf_counter() - started)
                assert delivered == N and len(outbox) == 0 and outbox.stats().published == N
    base = results["sequential"]
    print(
        f"\noutbox replay, {PAYLOAD_BYTES} B batches, MQTT {pub.protocol_version} to mosquitto on loopback:"
    )
    for name, rate in results.items():
        n = BASELINE_N if name == "sequential" else N
        print(f"  {name:>12}: {rate:8,.0f} batches/s ({n:,} batches)  x{rate / base:5.1f} vs sequential")
    assert results["window 100"] > 2 * base
