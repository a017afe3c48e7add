"""No loss: the broker is stopped mid-run and restarted, the agent is SIGKILLed and restarted;
afterwards every reading the simulated meters answered is on MQTT exactly once after
de-duplication by (gateway, seq), checked against the simulator's own record of its reads, and
the sequence numbers are dense (1, 2, 3, ... across the SIGKILL and the restart). The test plays
the head-end's confirming part: it confirms every batch it received on ``down/ack``, so the
agent's outbox empties by confirmation, as in production.

A read that was in flight when the agent was killed (or stopped) was never stored, so the
simulator's reads inside the cycle that the kill interrupted are not expected (a real meter's
register is simply read again next cycle); everything before it must be there.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.outbox import Outbox
from protocols import topics
from protocols.acks import Ack, seq_ranges
from protocols.payload import decode
from protocols.quantities import by_name
from simulators.dlt645_sim import Dlt645Simulator
from tests.e2e.edge_helpers import MqttRecorder, edge_toml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

E_TOTAL = by_name("energy_fwd_active_total").code
GW = "gw-noloss"
METERS = ("000000000201", "000000000202", "000000000203")
ROOT = Path(__file__).resolve().parents[2]


def _start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "edge", "--config", str(config)],
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_broker_outage_and_sigkill_lose_nothing(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [f"ami/v1/{GW}/up/readings"], client_id="rec-noloss")
    log = tmp_path / "agent.log"
    cut_windows: list[tuple[float, float]] = []  # simulated-time windows whose reads may be lost
    async with Dlt645Simulator(list(METERS), load_kw=80.0) as sim:
        path = await sim.serve_pty()
        meters = "".join(
            f'[[meters]]\nid = "{m}"\nbus = "b"\naddress = "{m}"\nplans = ["fast"]\n' for m in METERS
        )
        config = tmp_path / "edge.toml"
        config.write_text(
            edge_toml(
                str(tmp_path),
                GW,
                mosquitto.url,
                f'[[buses]]\nname = "b"\nport = "{path}"\nbaud = 9600\n',
                meters,
                '[[plans]]\nname = "fast"\nquantities = ["energy_fwd_active_total"]\ninterval_s = 1\n',
            )
        )

        def batches() -> int:  # distinct ones: a restart re-sends what was not confirmed yet
            return len({decode(p).seq for p in rec.snapshot()})

        async def confirm() -> None:  # the head-end: confirm everything received, every 0.5 s
            while True:
                seqs = seq_ranges(decode(p).seq for p in rec.snapshot())
                if seqs:
                    rec.client.publish(topics.ack(GW), Ack(GW, seqs).to_json(), qos=1)
                await asyncio.sleep(0.5)

        confirming = asyncio.create_task(confirm())
        agent = _start_agent(config, log)
        try:
            await _wait(lambda: batches() >= 3, 30, "first batches")
            t_down = time.time()
            mosquitto.stop()  # outage: the agent keeps reading into its outbox
            await asyncio.sleep(4)
            t_up = time.time()
            mosquitto.start()
            await _wait(lambda: batches() >= 10, 40, "replay after the outage")
            n_before_kill = batches()
            t_kill = time.time()
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            cut_windows.append((t_kill - 1.5, t_kill + 0.5))
            await asyncio.sleep(2)
            agent = _start_agent(config, log)
            await _wait(lambda: batches() >= n_before_kill + 4, 40, "batches after the restart")
        finally:
            t_stop = time.time()
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
            cut_windows.append((t_stop - 1.5, t_stop + 5))
            confirming.cancel()
        reads = [r for r in sim.reads if r.di == 0x00010000 and r.fault is None]
    await asyncio.sleep(1)
    rec.close()
    assert agent.returncode == 0, log.read_text()[-3000:]

    by_seq = {}
    for payload in rec.snapshot():
        b = decode(payload)
        by_seq.setdefault((b.gateway, b.seq), b)  # de-duplication by (gateway, seq)
    readings = [
        (b.meters[m], t, v)
        for b in by_seq.values()
        for m, t, q, v in zip(b.meter, b.ts, b.quantity, b.value, strict=True)
        if q == E_TOTAL
    ]
    # exactly once: no reading is carried by two different batches
    assert len(readings) == len({(m, t) for m, t, _ in readings})
    on_mqtt = {(m, v) for m, _, v in readings}

    def cut(ts: float) -> bool:
        return any(a <= ts <= b for a, b in cut_windows)

    expected = {(r.meter, r.value) for r in reads if not cut(r.ts)}
    missing = expected - on_mqtt
    assert len(expected) >= 30, f"only {len(expected)} reads: the run was too short to mean anything"
    assert not missing, (
        f"{len(missing)} of {len(expected)} readings never reached MQTT, e.g. {sorted(missing)[:5]}"
    )
    during_outage = {(r.meter, r.value) for r in reads if t_down + 0.5 < r.ts < t_up - 0.5}
    assert (
        len(during_outage) >= 2 * len(METERS) and during_outage <= on_mqtt
    )  # held by the outbox, then replayed
    # sequence numbers are dense across the broker outage, the SIGKILL and the restarts
    seqs = sorted(s for _, s in by_seq)
    assert seqs == list(range(1, len(seqs) + 1)), f"gaps in {seqs}"
    # the agent kept batches until the head-end confirmed them, and applied the confirmations
    with Outbox(tmp_path / "outbox.sqlite", max_bytes=1 << 30) as outbox:
        s = outbox.stats()
    assert s.confirmed >= len(seqs) - 5 and s.dropped_total == 0, s
    assert s.added == s.published + s.confirmed + s.pending
