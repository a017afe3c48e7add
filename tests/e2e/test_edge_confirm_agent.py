"""The edge agent and the head-end's confirmations, end to end (simulated meter on a real pty, the
real mosquitto): batches and events stay in the agent's outbox after the PUBACK and leave on the
confirmation, which the test sends as the head-end; the outbox metrics move while the broker is
down (not only after a successful drain); a bad confirmation is counted and the agent runs on.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import pytest

from gateway.agent import EdgeAgent
from gateway.config import parse_config
from protocols import topics
from protocols.acks import Ack, seq_ranges
from protocols.payload import decode
from simulators.dlt645_sim import Dlt645Simulator
from simulators.servers import Mosquitto, free_port
from tests.e2e.edge_helpers import MqttRecorder, edge_toml

pytestmark = pytest.mark.integration

METER = "000000000301"
PLAN = '[[plans]]\nname = "fast"\nquantities = ["energy_fwd_active_total"]\ninterval_s = 1\n'


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


async def _until(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    try:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_the_agent_keeps_rows_until_confirmed_and_its_metrics_move_in_an_outage(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    gw = "gw-confirm"
    port = free_port()
    rec = MqttRecorder(mosquitto.host, mosquitto.port, [f"ami/v1/{gw}/up/#"], client_id="rec-confirm")

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    async with Dlt645Simulator([METER]) as sim:
        path = await sim.serve_pty()
        text = edge_toml(
            str(tmp_path),
            gw,
            mosquitto.url,
            f'[[buses]]\nname = "b"\nport = "{path}"\nbaud = 9600\n',
            f'[[meters]]\nid = "{METER}"\nbus = "b"\naddress = "{METER}"\nplans = ["fast"]\n',
            PLAN,
        ).replace('metrics_listen = ""', f'metrics_listen = "127.0.0.1:{port}"')
        agent = EdgeAgent(parse_config(text))
        task = asyncio.create_task(agent.run())
        try:
            await _until(lambda: len(rec.snapshot("/up/readings")) >= 3, 30, "batches")
            agent._event("meter_recovered", METER, {})  # an event, as the agent raises them
            await _until(lambda: rec.snapshot("/up/events"), 10, "the event")
            outbox = agent.outbox
            assert outbox is not None
            # PUBACKed, not confirmed: everything is still stored and counted as unconfirmed
            s = outbox.stats()
            assert s.confirmed == 0 and s.unconfirmed >= 4 and s.pending >= s.unconfirmed
            metrics = await asyncio.to_thread(scrape)
            assert _metric(metrics, "amigw_outbox_unconfirmed") >= 4
            assert "# TYPE amigw_outbox_dropped_total counter" in metrics

            # the head-end confirms what it got; a forged-shape confirmation is ignored and counted
            seqs = [decode(p).seq for p in rec.snapshot("/up/readings")]
            events = [json.loads(p)["id"] for p in rec.snapshot("/up/events")]
            rec.publish(topics.ack(gw), b"not json")
            rec.publish(topics.ack(gw), Ack(gw, seq_ranges(seqs), tuple(events)).to_json())
            await _until(lambda: outbox.stats().confirmed >= len(seqs) + len(events), 10, "the confirmation")
            metrics = await asyncio.to_thread(scrape)
            assert _metric(metrics, 'amigw_acks_rejected_total{reason="invalid"}') == 1
            assert _metric(metrics, "amigw_outbox_confirmed_total") >= len(seqs) + 1
            assert agent.counters()["outbox_confirmed"] >= len(seqs) + 1

            # broker down: readings pile up in the outbox, and the metrics say so meanwhile
            mosquitto.stop()
            before = _metric(await asyncio.to_thread(scrape), "amigw_outbox_pending")
            await asyncio.sleep(3.5)
            during = await asyncio.to_thread(scrape)
            assert _metric(during, "amigw_outbox_pending") >= before + 2
            assert _metric(during, "amigw_outbox_pending_bytes") > 0
            assert not task.done()
        finally:
            if not mosquitto.running:
                mosquitto.start()
            agent.stop()
            await asyncio.wait_for(task, 15)
    rec.close()
