"""Edge agent -> mosquitto -> ingest -> influxd: what the DL/T 645 simulator answered is in InfluxDB.

The edge agent (in-process) polls a simulated meter over a pty every second and publishes payload
v1 batches; an ingest worker (in-process) writes them; every register value the simulator's
``.reads`` record shows as answered appears in InfluxDB with that value.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.agent import EdgeAgent
from gateway.config import parse_config as parse_edge
from ingest.config import parse_config as parse_ingest
from ingest.pipeline.dedup import DedupStore
from ingest.pipeline.worker import IngestWorker
from protocols.dlt645 import di_info
from simulators.dlt645_sim import Dlt645Simulator
from tests.e2e.edge_helpers import edge_toml

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ADDR = "000000000001"
FIELDS = ("energy_fwd_active_total", "voltage_a")


def _stored(influxd: Any, db: str) -> set[tuple[str, int]]:
    rows = influxd.query(f"SELECT {', '.join(FIELDS)} FROM meter_reading WHERE meter = '{ADDR}'", db=db)
    return {
        (f, round(r[f] * (100 if f.startswith("energy") else 10)))
        for r in rows
        for f in FIELDS
        if r[f] is not None
    }


def _intervals(influxd: Any, db: str) -> list[dict[str, Any]]:
    return influxd.query("SELECT energy_fwd_active_total FROM intervals", db=db)  # type: ignore[no-any-return]


def _answered(sim: Dlt645Simulator) -> set[tuple[str, int]]:
    out = set()
    for rec in list(sim.reads):
        info = di_info(rec.di)
        if (
            rec.fault is None
            and info.quantities
            and info.quantities[0] in FIELDS
            and isinstance(rec.value, int)
        ):
            out.add((info.quantities[0], rec.value))
    return out


async def test_simulator_reads_arrive_in_influxdb(mosquitto: Any, influx_db: Any, tmp_path: Path) -> None:
    influxd, db = influx_db
    gw = f"gw-e2e-{uuid.uuid4().hex[:6]}"
    ingest_cfg = parse_ingest(
        f"[mqtt]\nurl = {json.dumps(mosquitto.url)}\nclient_id = 'e2e-{gw}'\n"
        f"topics = [{json.dumps(f'$share/e2e/ami/v1/{gw}/up/readings')}]\n"
        f"[influx]\nurl = {json.dumps(influxd.url)}\napi = 'v1'\ndatabase = {json.dumps(db)}\n"
        f"[dead_letter]\npath = {json.dumps(str(tmp_path / 'dl.sqlite'))}\n"
        f"[dedup]\npath = {json.dumps(str(tmp_path / 'dd.sqlite'))}\n"
        f"[loss]\npath = {json.dumps(str(tmp_path / 'loss.sqlite'))}\n"
        "[pipeline]\ninterval_s = 1\n"
    )
    worker = IngestWorker(ingest_cfg)
    worker_task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 15)
    sim = Dlt645Simulator([ADDR], load_kw=20.0)
    sim.meter(ADDR).set_energy(1_234_567)
    path = await sim.serve_pty()
    agent = EdgeAgent(parse_edge(edge_toml(
        str(tmp_path), gw, mosquitto.url,
        f'[[buses]]\nname = "b1"\nport = "{path}"\nbaud = 9600\n',
        f'[[meters]]\nid = "{ADDR}"\nbus = "b1"\naddress = "{ADDR}"\nplans = ["fast"]\n',
        f'[[plans]]\nname = "fast"\nquantities = {json.dumps(list(FIELDS))}\ninterval_s = 1\n',
    )), status_interval_s=5)  # fmt: skip
    agent_task = asyncio.create_task(agent.run())
    try:
        deadline = time.monotonic() + 30
        while len(_answered(sim)) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        wanted = _answered(sim)
        assert len(wanted) >= 4, f"the agent read too little: {wanted}"
        while not wanted <= (stored := await asyncio.to_thread(_stored, influxd, db)):
            assert time.monotonic() < deadline + 20, f"missing in InfluxDB: {wanted - stored}"
            await asyncio.sleep(0.3)
        assert {f for f, _ in wanted} == set(FIELDS)
        assert worker.metrics.batches.labels("written")._value.get() >= 2
        # The edge stamps register reads with their grid slot (VEE-13), so validated intervals
        # and daily TOU totals form from what the agent read, and they add up to the register.
        while True:
            rows = await asyncio.to_thread(
                influxd.query,
                "SELECT energy_fwd_active_total, energy_fwd_active_total_flags FROM intervals",
                db=db,
            )
            if len(rows) >= 3 or time.monotonic() > deadline + 30:
                break
            await asyncio.sleep(0.3)
        assert len(rows) >= 3, rows
        assert all(r["energy_fwd_active_total_flags"] is None for r in rows)  # no flag set
        totals = [v for q, v in _answered(sim) if q == "energy_fwd_active_total"]
        energy = [r["energy_fwd_active_total"] for r in rows if r["energy_fwd_active_total"] is not None]
        assert round(sum(energy), 2) <= (max(totals) - min(totals)) / 100 + 1e-9
        # The hours and days those intervals start in are owed a rollup once they have ended: with
        # the agent stopped and the worker drained, a clock two days on makes them due, and the
        # worker's rollup writes one daily_tou row per meter-day whose total is the intervals' sum.
        agent.stop()
        await asyncio.wait_for(agent_task, 10)
        n_rows = -1
        while (rows := await asyncio.to_thread(_intervals, influxd, db)) and len(rows) != n_rows:
            n_rows = len(rows)
            await asyncio.sleep(2)
        assert worker.metrics.unacked._value.get() == 0
        later = DedupStore(tmp_path / "dd.sqlite", clock=lambda: time.time() + 2 * 86_400)
        job = dataclasses.replace(worker.rollup_job(), dedup=later, delay_s=0)
        assert await job.run_once() >= 1  # the day (and its hours)
        energy = round(100 * sum(r["energy_fwd_active_total"] or 0 for r in rows))
        daily = await asyncio.to_thread(influxd.query, 'SELECT "total" FROM daily_tou', db=db)
        hourly = await asyncio.to_thread(influxd.query, 'SELECT "total" FROM hourly', db=db)
        assert energy > 0 and sum(r["total"] for r in daily) == energy == sum(r["total"] for r in hourly)
        assert later.pending_periods() == 0
    finally:
        agent.stop()
        await asyncio.wait_for(agent_task, 10)
        await sim.aclose()
        worker.stop()
        await asyncio.wait_for(worker_task, 10)
