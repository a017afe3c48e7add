"""Benchmark: resident memory of the edge agent polling 128 simulated DL/T 645 meters.

Run: bash .ci/bootstrap bench -k edge_memory
Prints the agent's VmRSS after several poll cycles against a baseline measured in the same run:
the same interpreter with the agent's modules imported and nothing running. The difference is
what the meters, buses, outbox and MQTT link cost.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from simulators.dlt645_sim import Dlt645Simulator
from tests.e2e.edge_helpers import MqttRecorder, edge_toml

ROOT = Path(__file__).resolve().parents[2]
METERS, BUSES = 128, 4


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_bench_agent_rss_for_128_meters(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    idle = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import gateway.agent, drivers.dlt645, drivers.modbus, time; "
            "print('ready', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert idle.stdout is not None and idle.stdout.readline().strip() == b"ready"
    baseline = _rss_kib(idle.pid)
    idle.kill()

    rec = MqttRecorder(mosquitto.host, mosquitto.port, ["ami/v1/gw-mem/up/readings"], client_id="rec-mem")
    sims = [
        Dlt645Simulator([f"{b:04d}{m:08d}" for m in range(METERS // BUSES)], load_kw=20.0)
        for b in range(BUSES)
    ]
    buses, meters = "", ""
    for b, sim in enumerate(sims):
        await sim.__aenter__()
        path = await sim.serve_pty()
        buses += f'[[buses]]\nname = "b{b}"\nport = "{path}"\nbaud = 9600\n'
        meters += "".join(
            f'[[meters]]\nid = "{a}"\nbus = "b{b}"\naddress = "{a}"\nplans = ["registers", "instant"]\n'
            for a in (f"{b:04d}{m:08d}" for m in range(METERS // BUSES))
        )
    plans = (
        '[[plans]]\nname = "registers"\nquantities = ["energy_fwd_active_total", "energy_fwd_active_t1", '
        '"energy_fwd_active_t2", "energy_fwd_active_t3", "energy_fwd_active_t4"]\ninterval_s = 10\n'
        '[[plans]]\nname = "instant"\nquantities = ["voltage_a", "current_a", "power_active_total"]\n'
        'interval_s = 10\nkind = "instant"\n'
    )
    config = tmp_path / "edge.toml"
    config.write_text(edge_toml(str(tmp_path), "gw-mem", mosquitto.url, buses, meters, plans))
    agent = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "edge", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        started = time.monotonic()
        while len(rec.snapshot()) < 3 * BUSES * 2 and time.monotonic() - started < 120:
            await asyncio.sleep(0.5)
        cycles = len(rec.snapshot()) // (BUSES * 2)
        rss = _rss_kib(agent.pid)
    finally:
        agent.terminate()
        agent.wait(20)
        for sim in sims:
            await sim.__aexit__(None, None, None)
        rec.close()
    assert cycles >= 2, "the agent did not complete its poll cycles"
    print(
        f"\nedge agent, {METERS} meters on {BUSES} buses, {cycles} cycles: VmRSS {rss / 1024:.1f} MiB; "
        f"baseline (same imports, idle) {baseline / 1024:.1f} MiB; ratio {rss / baseline:.2f}x; "
        f"{(rss - baseline) / METERS:.1f} KiB per meter above baseline"
    )
