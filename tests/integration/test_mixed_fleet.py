"""A mixed fleet against the real mosquitto and influxd: one gateway still sends readings payload
v1 (16 flag bits), another already v2 (32 flag bits), to the same ingest worker. Both land in
InfluxDB with their flags, a bit above 15 included; neither is dead-lettered. Real edge agents
send the version their config names."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.agent import EdgeAgent
from gateway.config import parse_config as parse_edge_config
from ingest.config import parse_config
from ingest.pipeline.worker import IngestWorker
from protocols.flags import Flag
from protocols.payload import BatchBuilder, ReadingBatch, decode, encode
from simulators.dlt645_sim import Dlt645Simulator
from tests.e2e.edge_helpers import MqttRecorder, edge_toml
from tests.integration.test_ingest_bounds import dead_lettered, dead_letters, registry
from tests.integration.test_pipeline import T0, Publisher, Q, _uid, ingest_toml, topics_for, wait_for, written

pytestmark = pytest.mark.integration

HIGH_BITS = 1 << 16 | 1 << 31  # bits only payload v2 carries (no rule of ingest sets them)


@pytest.fixture
async def worker() -> AsyncIterator[Callable[[str], Any]]:
    started: list[tuple[IngestWorker, asyncio.Task[None]]] = []

    async def start(text: str) -> IngestWorker:
        w = IngestWorker(parse_config(text))
        started.append((w, asyncio.create_task(w.run())))
        await asyncio.wait_for(w.ready.wait(), 15)
        return w

    yield start
    for w, task in started:
        w.stop()
        await asyncio.wait_for(task, 10)


def _batch(gw: str, seq: int, voltage_flags: int, t: int = T0) -> ReadingBatch:
    """One meter: two energy register reads after ``t`` and a phase-A voltage read with the
    edge's flags."""
    b = BatchBuilder()
    b.set_prev("M1", 1, 100_000, t)
    b.add("M1", t + Q, 1, 100_025)
    b.add("M1", t + 2 * Q, 1, 100_050)
    b.add("M1", t + 2 * Q, 30, 2201, voltage_flags)
    return b.build(gw, seq, sent_ms=t + 2 * Q)


async def test_v1_and_v2_gateways_land_side_by_side_with_their_flags(
    mosquitto: Any, influx_db: Any, tmp_path: Path, worker: Any
) -> None:
    influxd, db = influx_db
    old, new = f"gw-v1-{_uid()}", f"gw-v2-{_uid()}"
    w = await worker(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [old, new])))
    later = T0 + 8 * Q
    # (gateway, batch start, voltage flags the edge set, payload)
    fleet = [
        (old, T0, int(Flag.CLOCK_SKEW), encode(_batch(old, 1, int(Flag.CLOCK_SKEW)))),
        (
            new,
            T0,
            int(Flag.CLOCK_SKEW) | HIGH_BITS,
            encode(_batch(new, 1, int(Flag.CLOCK_SKEW) | HIGH_BITS), version=2),
        ),
        (new, later, 1 << 20, encode(_batch(new, 2, 1 << 20, later), "json", version=2)),
    ]
    assert [p[:4] for _, _, _, p in fleet[:2]] == [b"AMI\x01", b"AMI\x02"]
    pub = Publisher(mosquitto)
    try:
        for gw, _, _, payload in fleet:
            pub.send(f"ami/v1/{gw}/up/readings", payload)
        await wait_for(lambda: written(w) == len(fleet))
    finally:
        pub.close()
    assert w.metrics.dead_letters.labels("undecodable")._value.get() == 0
    for gw, t, flags, _ in fleet:
        rows = influxd.query(
            f"SELECT voltage_a, voltage_a_flags, energy_fwd_active_total FROM meter_reading "
            f"WHERE meter = 'M1' AND gateway = '{gw}' AND time = {t + 2 * Q}ms",
            db=db,
        )
        assert [(r["voltage_a"], r["voltage_a_flags"], r["energy_fwd_active_total"]) for r in rows] == [
            (220.1, flags, 1000.5)
        ], gw
    for gw, n in ((old, 2), (new, 4)):
        iv = influxd.query(f"SELECT energy_fwd_active_total FROM intervals WHERE gateway = '{gw}'", db=db)
        assert [r["energy_fwd_active_total"] for r in iv] == [0.25] * n, gw


async def test_a_v2_batch_with_a_foreign_meter_is_dead_lettered_with_every_flag_bit(
    mosquitto: Any, influx_db: Any, tmp_path: Path, worker: Any
) -> None:
    """The readings ingest refuses (a meter bound to another gateway) are dead-lettered as a
    payload of their own: it keeps the flag bits above 15 for the replay."""
    influxd, db = influx_db
    gw = f"gw-v2-{_uid()}"
    reg = registry(tmp_path, {"M1": (f"gw-other-{_uid()}", "TA-B")})
    w = await worker(
        ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw]), registry=reg)
    )
    pub = Publisher(mosquitto)
    try:
        pub.send(f"ami/v1/{gw}/up/readings", encode(_batch(gw, 1, HIGH_BITS), version=2))
        await wait_for(lambda: dead_lettered(w, "meter not bound to gateway") == 1)
    finally:
        pub.close()
    [dl] = dead_letters(tmp_path)
    assert list(decode(dl.payload).flags) == [0, 0, HIGH_BITS]


async def test_edge_agents_send_the_payload_version_their_config_names(
    mosquitto: Any, tmp_path: Path
) -> None:
    """Two real edge agents, ``[mqtt] payload_version`` left at its default (1) and set to 2."""
    gws = {f"gw-e1-{_uid()}": "", f"gw-e2-{_uid()}": "payload_version = 2\n"}
    rec = MqttRecorder(
        mosquitto.host, mosquitto.port, [f"ami/v1/{gw}/up/readings" for gw in gws], client_id=f"rec-{_uid()}"
    )
    agents, sims = [], []
    for i, (gw, key) in enumerate(gws.items()):
        meter = f"00000000010{i}"
        sim = Dlt645Simulator([meter], load_kw=5.0)
        await sim.__aenter__()
        sims.append(sim)
        buses = f'[[buses]]\nname = "dlt"\nport = "{await sim.serve_pty()}"\nbaud = 9600\ntimeout_s = 0.5\n'
        meters = f'[[meters]]\nid = "{meter}"\nbus = "dlt"\nprotocol = "dlt645-2007"\naddress = "{meter}"\nplans = ["fast"]\n'
        plan = '[[plans]]\nname = "fast"\nquantities = ["voltage_a"]\ninterval_s = 1\n'
        (tmp_path / gw).mkdir()
        text = edge_toml(str(tmp_path / gw), gw, mosquitto.url, buses, meters, plan)
        agents.append(EdgeAgent(parse_edge_config(text.replace("[mqtt]\n", "[mqtt]\n" + key, 1))))
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        await asyncio.to_thread(
            rec.wait_for, lambda: {decode(p).gateway for p in rec.snapshot()} == set(gws), 30
        )
    finally:
        for a in agents:
            a.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        for sim in sims:
            await sim.__aexit__(None, None, None)
        rec.close()
    versions = {decode(p).gateway: p[:4] for p in rec.snapshot()}
    assert [versions[gw] for gw in gws] == [b"AMI\x01", b"AMI\x02"]
