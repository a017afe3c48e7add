"""The edge agent end to end: simulators on real pseudo-terminals, the real mosquitto.

* two buses, one DL/T 645 and one Modbus RTU, arrive on MQTT with the right values and seqs;
* a dead meter and a meter answering garbage do not delay the healthy meter beyond the retry budget;
* forged, unsigned, expired and replayed commands are rejected and the relay never moves; a valid
  trip opens it (verified by read-back), close-allowed restores it;
* the agent works against the TLS + password + ACL broker.

The no-loss run (broker outage and SIGKILL) is in ``test_edge_no_loss.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.agent import EdgeAgent
from gateway.config import parse_config
from protocols.commands import Command, decode_result
from protocols.payload import decode
from protocols.quantities import by_name
from simulators.dlt645_sim import Dlt645Simulator
from simulators.modbus_sim import ModbusSimulator
from simulators.servers import free_port
from tests.e2e.edge_helpers import KEY, MqttRecorder, edge_toml

pytestmark = pytest.mark.integration

E_TOTAL = by_name("energy_fwd_active_total").code
VOLTAGE_A = by_name("voltage_a").code
M1, M2, M3 = "000000000101", "000000000102", "000000000103"


def _dlt_meter(mid: str, bus: str, plans: str = '["fast"]') -> str:
    return f'[[meters]]\nid = "{mid}"\nbus = "{bus}"\nprotocol = "dlt645-2007"\naddress = "{mid}"\nplans = {plans}\n'


FAST_PLAN = (
    '[[plans]]\nname = "fast"\nquantities = ["energy_fwd_active_total", "voltage_a"]\ninterval_s = 1\n'
)


async def _run_agent_until(agent: EdgeAgent, rec: MqttRecorder, predicate, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.to_thread(rec.wait_for, predicate, timeout_s)
    finally:
        agent.stop()
        await asyncio.wait_for(task, 15)


async def test_two_buses_dlt645_and_modbus_arrive_with_values_and_seqs(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rec = MqttRecorder(mosquitto.host, mosquitto.port, ["ami/v1/gw-two/up/readings"], client_id="rec-two")
    async with Dlt645Simulator([M1], load_kw=50.0) as dsim, ModbusSimulator(model="sdm120", unit=7) as msim:
        msim.set_value("voltage_a", 2287)
        dpath = await dsim.serve_pty()
        mpath = await msim.serve_rtu_pty()
        buses = (
            f'[[buses]]\nname = "dlt"\nport = "{dpath}"\nbaud = 9600\ntimeout_s = 0.5\n'
            f'[[buses]]\nname = "mb"\nport = "{mpath}"\nbaud = 9600\nparity = "N"\ntimeout_s = 0.5\n'
        )
        meters = (
            _dlt_meter(M1, "dlt")
            + '[[meters]]\nid = "sdm-7"\nbus = "mb"\nprotocol = "modbus"\naddress = "7"\nmodel = "sdm120"\n'
            'plans = ["fast"]\n'
        )
        cfg = parse_config(edge_toml(str(tmp_path), "gw-two", mosquitto.url, buses, meters, FAST_PLAN))
        agent = EdgeAgent(cfg)

        def both_seen() -> bool:
            meters_seen = {m for p in rec.snapshot() for m in decode(p).meters}
            return {M1, "sdm-7"} <= meters_seen and len(rec.snapshot()) >= 4

        await _run_agent_until(agent, rec, both_seen)
        sim_energy = {r.value for r in dsim.reads if r.meter == M1 and r.di == 0x00010000 and r.fault is None}
    rec.close()
    batches = [decode(p) for p in rec.snapshot()]
    seqs = [b.seq for b in batches]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    readings = [
        (b.meters[m], q, v) for b in batches for m, q, v in zip(b.meter, b.quantity, b.value, strict=True)
    ]
    assert ("sdm-7", VOLTAGE_A, 2287) in readings
    dlt_energy = {v for m, q, v in readings if m == M1 and q == E_TOTAL}
    assert dlt_energy and dlt_energy <= sim_energy  # the values the simulated meter answered, exactly
    assert any(m == M1 and q == VOLTAGE_A and 2000 < v < 2400 for m, q, v in readings)


async def test_dead_and_garbage_meters_do_not_starve_the_healthy_one(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rec = MqttRecorder(mosquitto.host, mosquitto.port, ["ami/v1/gw-bad/up/readings"], client_id="rec-bad")
    interval_s, max_timeout_s, retries = 2, 0.3, 1
    async with Dlt645Simulator([M1, M2, M3], load_kw=50.0) as sim:
        sim.meter(M1).inject("no_reply")  # dead
        sim.meter(M2).inject("garbage_inside")  # answers garbage, every time
        path = await sim.serve_pty()
        bus = (
            f'[[buses]]\nname = "b"\nport = "{path}"\nbaud = 9600\ntimeout_s = 0.2\nmin_timeout_s = 0.1\n'
            f"max_timeout_s = {max_timeout_s}\nretries = {retries}\n"
        )
        plans = FAST_PLAN.replace("interval_s = 1", f"interval_s = {interval_s}")
        cfg = parse_config(
            edge_toml(
                str(tmp_path),
                "gw-bad",
                mosquitto.url,
                bus,
                _dlt_meter(M1, "b") + _dlt_meter(M2, "b") + _dlt_meter(M3, "b"),
                plans,
            )
        )
        agent = EdgeAgent(cfg)

        def healthy_cycles() -> int:
            return sum(1 for p in rec.snapshot() for m in decode(p).meters if m == M3)

        await _run_agent_until(agent, rec, lambda: healthy_cycles() >= 3, 40)
    rec.close()
    stats = {mid: agent._meters[mid].stats for mid in (M1, M2, M3)}
    assert stats[M1].failures["timeout"] >= 1 and stats[M1].successes == 0
    assert stats[M2].failures["checksum"] + stats[M2].failures["timeout"] >= 1 and stats[M2].successes == 0
    assert stats[M3].failures == dict.fromkeys(stats[M3].failures, 0)
    # The healthy meter (polled last) is read within the bad meters' retry budget of each boundary.
    budget_ms = 2 * (retries + 1) * max_timeout_s * 1000 + 500
    for b in (decode(p) for p in rec.snapshot()):
        for m, q, t in zip(b.meter, b.quantity, b.ts, strict=True):
            if b.meters[m] == M3 and q == E_TOTAL:
                assert t % (interval_s * 1000) <= budget_ms, t % (interval_s * 1000)


async def test_commands_forged_unsigned_expired_replayed_rejected_trip_and_close(
    mosquitto, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    gw = "gw-cmd"
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [f"ami/v1/{gw}/up/#"], client_id="rec-cmd")
    async with Dlt645Simulator([M1], load_kw=50.0) as sim:
        path = await sim.serve_pty()
        cfg = parse_config(
            edge_toml(
                str(tmp_path),
                gw,
                mosquitto.url,
                f'[[buses]]\nname = "b"\nport = "{path}"\nbaud = 9600\n',
                _dlt_meter(M1, "b"),
                FAST_PLAN.replace("interval_s = 1", "interval_s = 60"),
            )
        )
        agent = EdgeAgent(cfg)
        task = asyncio.create_task(agent.run())
        try:
            await asyncio.to_thread(
                rec.wait_for, lambda: agent.publisher is not None and agent.publisher.connected, 15
            )
            now = int(time.time() * 1000)

            def cmd(cid: str, action: str, issued: int = now, expires: int = now + 120_000) -> Command:
                return Command(cid, gw, M1, action, issued, expires)

            def results() -> dict[str, object]:
                return {r.id: r for r in (decode_result(p, KEY) for p in rec.snapshot("/up/cmd-result"))}

            async def send(payload: bytes, expect_id: str) -> object:
                before = len(rec.snapshot("/up/cmd-result"))
                await asyncio.to_thread(rec.publish, f"ami/v1/{gw}/down/cmd", payload)
                await asyncio.to_thread(
                    rec.wait_for, lambda: len(rec.snapshot("/up/cmd-result")) > before, 20
                )
                return decode_result(rec.snapshot("/up/cmd-result")[-1], KEY)

            forged = await send(cmd("c-forged", "trip").signed(b"not-the-gateway-key-0123"), "c-forged")
            unsigned_doc = cmd("c-unsigned", "trip").to_dict()
            unsigned = await send(json.dumps(unsigned_doc).encode(), "c-unsigned")
            expired = await send(cmd("c-old", "trip", now - 300_000, now - 60_000).signed(KEY), "c-old")
            assert (forged.status, forged.reason) == ("rejected", "bad_signature")
            assert (unsigned.status, unsigned.reason) == ("rejected", "bad_signature")
            assert (expired.status, expired.reason) == ("rejected", "expired")
            assert not sim.meter(M1).relay_open, "a rejected command moved the relay"

            trip = cmd("c-trip", "trip").signed(KEY)
            done = await send(trip, "c-trip")
            assert (done.status, done.relay_state) == ("done", 1) and sim.meter(M1).relay_open
            closed = await send(cmd("c-close", "close_allowed").signed(KEY), "c-close")
            assert (closed.status, closed.relay_state) == ("done", 0) and not sim.meter(M1).relay_open
            replay = await send(trip, "c-trip")
            assert (replay.status, replay.reason) == ("rejected", "replayed")
            assert not sim.meter(M1).relay_open, "a replayed trip moved the relay"
            assert set(results()) >= {"c-trip", "c-close", "c-old"}
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)
    rec.close()
    events = [json.loads(p) for p in rec.snapshot("/up/events")]
    assert any(e["kind"] == "relay_changed" and e["detail"]["to"] == 1 for e in events)


async def test_agent_on_the_tls_password_acl_broker(mosquitto_secure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = mosquitto_secure
    rec = MqttRecorder(
        broker.host,
        broker.port,
        ["ami/v1/#"],
        client_id="rec-tls",
        username="headend",
        password=broker.passwords["headend"],
        ca_file=str(broker.ca_file),
    )
    async with Dlt645Simulator([M1], load_kw=50.0) as sim:
        path = await sim.serve_pty()
        mqtt = (
            f'[mqtt]\nurl = "{broker.url}"\nusername = "gw-1"\npassword = "{broker.passwords["gw-1"]}"\n'
            f'ca_file = "{broker.ca_file}"\n'
        )
        text = edge_toml(
            str(tmp_path),
            "gw-1",
            broker.url,
            f'[[buses]]\nname = "b"\nport = "{path}"\nbaud = 9600\n',
            _dlt_meter(M1, "b"),
            FAST_PLAN,
        )
        text = text.replace(f'[mqtt]\nurl = "{broker.url}"\n', mqtt)
        agent = EdgeAgent(parse_config(text))
        await _run_agent_until(agent, rec, lambda: len(rec.snapshot("/up/readings")) >= 2)
    rec.close()
    assert all(decode(p).gateway == "gw-1" for p in rec.snapshot("/up/readings"))


async def test_clock_skew_corrected_within_protocol_limit_and_reported(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gw = "gw-clock"
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [f"ami/v1/{gw}/#"], client_id="rec-clock")
    near, far = M1, M2
    async with Dlt645Simulator([near, far], load_kw=50.0, broadcast_sync_limit_s=300) as sim:
        sim.meter(near).set_local_time(sim.meter(near).local_time() + dt.timedelta(seconds=200))
        sim.meter(far).set_local_time(sim.meter(far).local_time() + dt.timedelta(seconds=900))
        path = await sim.serve_pty()
        port = free_port()
        text = edge_toml(
            str(tmp_path),
            gw,
            mosquitto.url,
            f'[[buses]]\nname = "b"\nport = "{path}"\nbaud = 9600\n',
            _dlt_meter(near, "b") + _dlt_meter(far, "b"),
            FAST_PLAN,
            extra="[clock]\ntolerance_s = 60\nmax_adjust_s = 300\n",
        )
        text = text.replace('metrics_listen = ""', f'metrics_listen = "127.0.0.1:{port}"')
        agent = EdgeAgent(parse_config(text), status_interval_s=0.5)

        def adjusted() -> int:
            return sum(1 for p in rec.snapshot("/up/events") if json.loads(p)["kind"] == "clock_adjusted")

        task = asyncio.create_task(agent.run())
        try:

            def counted_status() -> bool:  # the connect-time status has no counters yet
                return any(json.loads(p)["counters"] for p in rec.snapshot("/status"))

            await asyncio.to_thread(rec.wait_for, lambda: adjusted() >= 2 and counted_status(), 30)
            metrics = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            )
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)
        now_local = dt.datetime.now().replace(microsecond=0)
        near_off = (sim.meter(near).local_time() - now_local).total_seconds()
        far_off = (sim.meter(far).local_time() - now_local).total_seconds()
    rec.close()
    assert abs(near_off) <= 5, near_off  # broadcast time sync
    assert abs(far_off) <= 5, far_off  # beyond the broadcast limit: written with the password
    events = {
        e["meter"]: e for e in map(json.loads, rec.snapshot("/up/events")) if e["kind"] == "clock_adjusted"
    }
    assert (
        events[near]["detail"]["method"] == "broadcast"
        and 195_000 <= events[near]["detail"]["skew_ms"] <= 205_000
    )
    assert (
        events[far]["detail"]["method"] == "write" and 895_000 <= events[far]["detail"]["skew_ms"] <= 905_000
    )
    assert 'amigw_reads_total{bus="b",result="ok"}' in metrics
    assert "amigw_outbox_pending" in metrics
    # the adaptive timeout in force, per meter (a sample, not just the metric's HELP line)
    assert re.search(r'^amigw_response_timeout_seconds\{bus="b",meter="000000000101"\} 0\.\d+', metrics, re.M)
    statuses = [json.loads(p) for p in rec.snapshot("/status")]
    assert not statuses[-1]["online"]  # a clean stop says so (the last-will covers a crash)
    online = [s for s in statuses if s["online"] and s["counters"]]
    assert online and online[-1]["counters"]["bus_b_read_success_rate"] == 1.0


async def test_a_command_gets_the_bus_right_after_the_current_transaction(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Priority lane: a trip arriving mid-cycle on a slow, busy bus is executed after the read in
    progress, not after the whole cycle."""
    gw = "gw-lane"
    meters = [f"0000000003{i:02d}" for i in range(6)]
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [f"ami/v1/{gw}/up/#"], client_id="rec-lane")
    async with Dlt645Simulator(meters, load_kw=50.0, baud=2400, pace=True, turnaround_s=0.05) as sim:
        path = await sim.serve_pty()
        plan = (
            '[[plans]]\nname = "fast"\nquantities = ["energy_fwd_active_total", "voltage_a", "current_a", '
            '"power_active_total"]\ninterval_s = 2\n'
        )
        cfg = parse_config(
            edge_toml(
                str(tmp_path),
                gw,
                mosquitto.url,
                f'[[buses]]\nname = "b"\nport = "{path}"\nbaud = 2400\n',
                "".join(_dlt_meter(m, "b") for m in meters),
                plan,
            )
        )
        agent = EdgeAgent(cfg)
        task = asyncio.create_task(agent.run())
        try:
            # wait until a cycle is under way (its first reads answered), then send the trip
            await asyncio.to_thread(rec.wait_for, lambda: len({r.meter for r in sim.reads}) >= 2, 30)
            cycle_start = min(r.ts for r in sim.reads)
            now = int(time.time() * 1000)
            sent = time.time()
            await asyncio.to_thread(
                rec.publish,
                f"ami/v1/{gw}/down/cmd",
                Command("c-lane", gw, meters[-1], "trip", now, now + 60_000).signed(KEY),
            )
            await asyncio.to_thread(rec.wait_for, lambda: rec.snapshot("/up/cmd-result"), 30)
            latency = time.time() - sent
            await asyncio.to_thread(rec.wait_for, lambda: rec.snapshot("/up/readings"), 30)
            cycle_s = max(r.ts for r in sim.reads if r.di == 0x00010000) - cycle_start
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)
    rec.close()
    result = decode_result(rec.snapshot("/up/cmd-result")[0], KEY)
    assert result.status == "done" and result.relay_state == 1
    per_meter_s = cycle_s / (len(meters) - 1)
    assert cycle_s > 1.0, cycle_s  # a slow bus, so the comparison means something
    assert latency < cycle_s / 2, (latency, cycle_s)  # not queued behind the rest of the cycle
    assert latency < 4 * per_meter_s + 1.0, (latency, per_meter_s)
