"""The edge agent contains its faults (real mosquitto, simulators on real ptys and TCP).

* dead buses: a serial-server bus with nothing listening and a serial bus whose port does not
  exist yet do not stop the agent; the live bus keeps its schedule; both are reported down
  (metric, status, event) and, once their simulators appear, their meters are read without a
  restart; when they vanish again while running they are reported down and reopened again;
* a Modbus TCP server that refuses is reported down and retried until it answers;
* an unexpected error while reading one meter is that meter's failure, not the bus's.

The poison command stream is in ``test_edge_poison.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

from drivers.dlt645 import Dlt645Driver
from gateway.agent import EdgeAgent
from gateway.config import parse_config
from protocols.payload import decode
from protocols.quantities import by_name
from simulators.dlt645_sim import Dlt645Simulator
from simulators.modbus_sim import ModbusSimulator
from simulators.servers import free_port
from tests.e2e.edge_helpers import MqttRecorder, edge_toml

pytestmark = pytest.mark.integration

E_TOTAL = by_name("energy_fwd_active_total").code
LIVE, OVER_TCP, ON_TTY = "000000000701", "000000000702", "000000000703"
PLAN = '[[plans]]\nname = "fast"\nquantities = ["energy_fwd_active_total"]\ninterval_s = 1\n'


def _meter(mid: str, bus: str) -> str:
    return f'[[meters]]\nid = "{mid}"\nbus = "{bus}"\naddress = "{mid}"\nplans = ["fast"]\n'


def _bus(name: str, port: str) -> str:
    return f'[[buses]]\nname = "{name}"\nport = "{port}"\nbaud = 9600\ntimeout_s = 0.5\n'


async def test_dead_buses_are_retried_and_come_in_without_a_restart(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gw = "gw-deadbus"
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [f"ami/v1/{gw}/#"], client_id="rec-deadbus")
    tcp_port, metrics_port = free_port(), free_port()
    tty = tmp_path / "ttyUSB7"  # does not exist until a simulator's pty is linked there

    def readings_of(meter: str) -> list[int]:
        """Slot timestamps of ``meter``'s energy readings, in arrival order."""
        return [
            t
            for b in map(decode, rec.snapshot("/up/readings"))
            for m, q, t in zip(b.meter, b.quantity, b.ts, strict=True)
            if b.meters[m] == meter and q == E_TOTAL
        ]

    def events(kind: str, bus: str) -> int:
        found = (json.loads(p) for p in rec.snapshot("/up/events"))
        return sum(1 for e in found if e["kind"] == kind and e["detail"]["bus"] == bus)

    def status_counters() -> dict[str, object]:
        statuses = [json.loads(p) for p in rec.snapshot("/status")]
        counted = [s["counters"] for s in statuses if s["online"] and s["counters"]]
        return counted[-1] if counted else {}

    async def wait(predicate, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
        await asyncio.to_thread(rec.wait_for, predicate, timeout_s)

    async with (
        Dlt645Simulator([LIVE], load_kw=50.0) as live,
        Dlt645Simulator([OVER_TCP], load_kw=50.0) as server,
        Dlt645Simulator([ON_TTY], load_kw=50.0) as line,
    ):
        text = edge_toml(
            str(tmp_path),
            gw,
            mosquitto.url,
            _bus("live", await live.serve_pty())
            + _bus("tcp", f"tcp://127.0.0.1:{tcp_port}")
            + _bus("tty", str(tty)),
            _meter(LIVE, "live") + _meter(OVER_TCP, "tcp") + _meter(ON_TTY, "tty"),
            PLAN,
        ).replace('metrics_listen = ""', f'metrics_listen = "127.0.0.1:{metrics_port}"')
        agent = EdgeAgent(parse_config(text), status_interval_s=0.5)
        task = asyncio.create_task(agent.run())
        try:
            # Both dead buses are reported down while the live one polls on schedule.
            await wait(
                lambda: (
                    len(readings_of(LIVE)) >= 3
                    and events("bus_down", "tcp") == 1
                    and events("bus_down", "tty") == 1
                    and status_counters().get("bus_tcp_up") == 0
                )
            )
            assert not task.done()
            metrics = await asyncio.to_thread(
                lambda: (
                    urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
                    .read()
                    .decode()
                )
            )
            assert re.search(r'^amigw_bus_up\{bus="tcp"\} 0\.0$', metrics, re.M), metrics
            assert re.search(r'^amigw_bus_up\{bus="tty"\} 0\.0$', metrics, re.M)
            assert re.search(r'^amigw_bus_up\{bus="live"\} 1\.0$', metrics, re.M)
            counters = status_counters()
            assert (counters["bus_live_up"], counters["bus_tcp_up"], counters["bus_tty_up"]) == (1, 0, 0)

            # The serial server starts, the port appears: their meters come in, no restart.
            await server.serve_tcp(port=tcp_port)
            os.symlink(await line.serve_pty(), tty)
            await wait(lambda: readings_of(OVER_TCP) and readings_of(ON_TTY), 40)
            assert events("bus_up", "tcp") == 1 and events("bus_up", "tty") == 1

            # Both vanish while running (the server closes its connections, the pty goes away):
            # reported down again, and the serial server is reopened once it is back.
            await server.aclose()
            await line.aclose()
            await wait(lambda: events("bus_down", "tcp") == 2 and events("bus_down", "tty") == 2)
            seen = len(readings_of(OVER_TCP))
            await server.serve_tcp(port=tcp_port)
            await wait(lambda: len(readings_of(OVER_TCP)) > seen and events("bus_up", "tcp") == 2, 40)
            assert not task.done()
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)
    rec.close()
    # The live bus kept its schedule throughout: a reading on every one-second slot, give or
    # take one slot missed on a loaded machine.
    slots = sorted(set(readings_of(LIVE)))
    assert all(t % 1000 == 0 for t in slots)
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert max(gaps) <= 2000, gaps
    assert len(slots) >= 8


async def test_a_modbus_tcp_server_that_refuses_is_retried_until_it_answers(
    mosquitto, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    gw = "gw-deadmodbus"
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [f"ami/v1/{gw}/#"], client_id="rec-deadmodbus")
    port = free_port()
    text = edge_toml(
        str(tmp_path),
        gw,
        mosquitto.url,
        f'[[buses]]\nname = "mb"\nport = "modbus-tcp://127.0.0.1:{port}"\ntimeout_s = 0.5\n',
        '[[meters]]\nid = "sdm-1"\nbus = "mb"\nprotocol = "modbus"\naddress = "1"\nmodel = "sdm120"\n'
        'plans = ["fast"]\n',
        PLAN,
    )
    agent = EdgeAgent(parse_config(text))
    task = asyncio.create_task(agent.run())

    def events(kind: str) -> int:
        return sum(1 for p in rec.snapshot("/up/events") if json.loads(p)["kind"] == kind)

    try:
        await asyncio.to_thread(rec.wait_for, lambda: events("bus_down") == 1, 30)
        assert not task.done() and not rec.snapshot("/up/readings")
        async with ModbusSimulator(model="sdm120", unit=1, port=port):
            await asyncio.to_thread(
                rec.wait_for, lambda: events("bus_up") == 1 and rec.snapshot("/up/readings"), 40
            )
    finally:
        agent.stop()
        await asyncio.wait_for(task, 15)
    rec.close()
    assert {m for p in rec.snapshot("/up/readings") for m in decode(p).meters} == {"sdm-1"}


async def test_an_unexpected_error_reading_one_meter_costs_only_that_meter(
    mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A driver bug (here injected: a KeyError for one meter) is that meter's failure."""
    gw = "gw-bug"
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [f"ami/v1/{gw}/#"], client_id="rec-bug")
    healthy, buggy = "000000000711", "000000000712"
    read = Dlt645Driver.read

    async def read_with_a_bug(self, meter, quantities, **kw):  # type: ignore[no-untyped-def]
        if meter.id == buggy:
            raise KeyError("a bug in the driver")
        return await read(self, meter, quantities, **kw)

    monkeypatch.setattr(Dlt645Driver, "read", read_with_a_bug)
    async with Dlt645Simulator([healthy, buggy], load_kw=50.0) as sim:
        text = edge_toml(
            str(tmp_path),
            gw,
            mosquitto.url,
            _bus("b", await sim.serve_pty()),
            _meter(healthy, "b") + _meter(buggy, "b"),
            PLAN,
        )
        agent = EdgeAgent(parse_config(text))
        task = asyncio.create_task(agent.run())

        def healthy_batches() -> int:
            return sum(1 for p in rec.snapshot("/up/readings") if healthy in decode(p).meters)

        def unreachable() -> list[dict[str, object]]:
            found = (json.loads(p) for p in rec.snapshot("/up/events"))
            return [e for e in found if e["kind"] == "meter_unreachable"]

        try:
            await asyncio.to_thread(rec.wait_for, lambda: healthy_batches() >= 3 and unreachable(), 30)
            assert not task.done()
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)
    rec.close()
    assert [(e["meter"], e["detail"]) for e in unreachable()] == [(buggy, {"cause": "other"})]
