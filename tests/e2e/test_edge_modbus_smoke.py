"""The edge agent reads a Modbus TCP meter on schedule and its batches arrive on the real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.agent import EdgeAgent
from gateway.config import parse_config
from protocols.payload import decode
from protocols.quantities import by_name
from simulators.modbus_sim import ModbusSimulator
from tests.e2e.edge_helpers import MqttRecorder, edge_toml

pytestmark = pytest.mark.integration


async def test_modbus_tcp_meter_readings_arrive_with_increasing_seq(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rec = MqttRecorder(mosquitto.host, mosquitto.port, ["ami/v1/gw-mb/#"], client_id="rec-mb")
    try:
        async with ModbusSimulator(model="sdm630", unit=3) as sim:
            sim.set_value("voltage_a", 2301)
            sim.set_value("energy_fwd_active_total", 1234567)
            cfg = parse_config(
                edge_toml(
                    str(tmp_path),
                    "gw-mb",
                    mosquitto.url,
                    f'[[buses]]\nname = "mb"\nport = "modbus-tcp://127.0.0.1:{sim.port}"\nbaud = 9600\n',
                    '[[meters]]\nid = "sdm-3"\nbus = "mb"\nprotocol = "modbus"\naddress = "3"\nmodel = "sdm630"\nplans = ["fast"]\n',
                    '[[plans]]\nname = "fast"\nquantities = ["voltage_a", "energy_fwd_active_total"]\ninterval_s = 1\n',
                )
            )
            agent = EdgeAgent(cfg, status_interval_s=0.5)
            task = asyncio.create_task(agent.run())
            await asyncio.to_thread(rec.wait_for, lambda: len(rec.snapshot("/up/readings")) >= 3, 30)
            agent.stop()
            await asyncio.wait_for(task, 10)
        batches = [decode(p) for p in rec.snapshot("/up/readings")]
        seqs = [b.seq for b in batches]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        first = batches[0]
        values = dict(zip(first.quantity, first.value, strict=True))
        assert values[by_name("voltage_a").code] == 2301
        assert values[by_name("energy_fwd_active_total").code] == 1234567
        assert first.meters == ("sdm-3",) and first.gateway == "gw-mb"
        # from the second batch on, the cumulative channel carries the previous value sent
        assert list(batches[1].prev.value) == [1234567]
        assert rec.snapshot("/status"), "no status message"
    finally:
        rec.close()
