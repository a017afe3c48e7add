"""Fee-control notifications against real receivers: the service runs in-process with the real
mosquitto (its MQTT notifier publishes there, a subscriber reads them back) and a real aiohttp
webhook receiver on a free loopback port. Shown: a receiver that fails with 503 gets each
notification accepted exactly once, in order, signed; a receiver that is down for a while gets
everything once it is up, while MQTT delivery goes on and the metrics show the outage; a service
discarded right after deciding loses nothing: the next one on the same ledger delivers it all;
an area outage raised by ingest (a real worker and influxd) reaches the area's customers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp.web
import aiomqtt
import pytest

from ingest.feectl.cli import load
from ingest.feectl.service import FeeControlService
from protocols.payload import Event
from simulators.servers import Mosquitto

from .test_feectl_service import FLAT, GW, KEY, T0, intervals, until
from .test_ingest_bounds import registry
from .test_pipeline import T0 as PIPE_T0
from .test_pipeline import Publisher, ingest_toml, run_worker, topics_for

pytestmark = pytest.mark.integration
__all__ = ["run_worker"]  # the fixture, shared with test_pipeline

SECRET = "webhook-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A webhook receiver: answers 503 to the first ``fail_first`` requests, then 200; records
    every request's id and body, and the ids it accepted."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.requests: list[str] = []
        self.accepted: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.runner: aiohttp.web.AppRunner | None = None

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        body = await request.read()
        want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if request.headers.get("X-Amigw-Signature") != want:
            self.bad_signatures += 1
            return aiohttp.web.Response(status=401)
        note = json.loads(body)
        assert request.headers["X-Amigw-Notification-Id"] == note["id"]
        self.requests.append(note["id"])
        if len(self.requests) <= self.fail_first:
            return aiohttp.web.Response(status=503, text="busy")
        self.accepted.append(note)
        return aiohttp.web.Response(status=204)

    async def start(self, port: int) -> None:
        app = aiohttp.web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = aiohttp.web.AppRunner(app)
        await self.runner.setup()
        await aiohttp.web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def write_config(tmp: Path, broker: Mosquitto, port: int) -> tuple[Path, dict[str, str]]:
    tag = uuid.uuid4().hex[:8]
    ids = {"a": f"a-{tag}", "b": f"b-{tag}", "ma": f"ma-{tag}", "mb": f"mb-{tag}"}
    (tmp / "gw-1.key").write_text(KEY.hex())
    (tmp / "flat.toml").write_text(FLAT)
    (tmp / "hook.secret").write_text(SECRET)
    text = f"""
[feectl]
alarm1_fen = 500
alarm2_fen = 200
overdraft_limit_fen = 100
grace_s = 0
[feectl.windows]
allowed_hours = ["00:00", "24:00"]
weekend_days = []

[service]
db_path = "ledger.sqlite"
tick_interval_s = 0.2
command_key_files = {{ {GW} = "gw-1.key" }}
tariff_files = {{ flat = "flat.toml" }}
[service.mqtt]
url = "{broker.url}"
client_id = "feectl-{tag}"
session_expiry_s = 120
[service.notify]
retry_initial_s = 0.05
retry_max_s = 0.2
[[service.notify.webhook]]
url = "http://127.0.0.1:{port}/hook"
secret_file = "hook.secret"
timeout_s = 2

[[service.accounts]]
account_id = "{ids["a"]}"
tariff = "flat"
meters = [{{ meter = "{ids["ma"]}", gateway = "{GW}", area = "TA-{tag}" }}]
[[service.accounts]]
account_id = "{ids["b"]}"
tariff = "flat"
meters = [{{ meter = "{ids["mb"]}", gateway = "{GW}", area = "TA-{tag}" }}]
"""
    path = tmp / "feectl.toml"
    path.write_text(text)
    ids["area"] = f"TA-{tag}"
    return path, ids


class Subscriber:
    """The customer channel on MQTT: every notification published on ami/v1/agg/notifications."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.notes: list[dict[str, Any]] = []
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client(
            self.broker.host, self.broker.port, identifier=f"crm-{uuid.uuid4().hex[:8]}"
        ) as c:
            await c.subscribe("ami/v1/agg/notifications", qos=1)
            self.ready.set()
            async for m in c.messages:
                assert isinstance(m.payload, bytes)
                self.notes.append(json.loads(m.payload))


@pytest.fixture
async def subscriber(mosquitto: Mosquitto) -> AsyncIterator[Subscriber]:
    s = Subscriber(mosquitto)
    task = asyncio.create_task(s.run())
    await asyncio.wait_for(s.ready.wait(), 10)
    yield s
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def started(path: Path) -> tuple[FeeControlService, asyncio.Task[None]]:
    service = FeeControlService(load(path))
    task = asyncio.create_task(service.run())
    await until(lambda: getattr(service.publisher, "connected", False), what="publisher up")
    return service, task


async def stopped(service: FeeControlService, task: asyncio.Task[None]) -> None:
    service.stop()
    await asyncio.wait_for(task, 10)


def decide(service: FeeControlService, ids: dict[str, str]) -> None:
    """Both accounts open at 0 (ZERO_NOTICE); a pays 10.00 (RECOVERED) and is charged down through
    ALARM1 and ALARM2 to ZERO_NOTICE; b pays 10.00 (RECOVERED)."""
    service.tick()
    service.record_payment(ids["a"], f"pay-{ids['a']}", 1_000)
    service.record_payment(ids["b"], f"pay-{ids['b']}", 1_000)
    for i, energy in enumerate((1_200, 500, 400)):  # 600, 250, 200 fen: 400, 150, -50
        start = T0 + i * 900_000
        assert service.handle_message(
            f"ami/v1/agg/intervals/{GW}", intervals(ids["ma"], start, energy, seq=i + 1)
        )


def expected(service: FeeControlService) -> list[str]:
    """Every notification id in the outbox, in outbox order."""
    store = service.controller.store
    with store.transaction():
        return [row[0] for row in store.deliveries("webhook")]


def kinds_of(notes: list[dict[str, Any]], account: str) -> list[str]:
    return [n["kind"] for n in notes if n["account"] == account]


A_KINDS = ["ZERO_NOTICE", "RECOVERED", "ALARM1", "ALARM2", "ZERO_NOTICE"]


async def test_webhook_failing_with_503_gets_each_notification_once_in_order(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    port = free_port()
    receiver = Receiver(fail_first=3)
    await receiver.start(port)
    path, ids = write_config(tmp_path, mosquitto, port)
    service, task = await started(path)
    try:
        decide(service, ids)
        notice = service.announce_outage(ids["area"], T0 + 86_400_000, T0 + 90_000_000, "maintenance", "op-1")
        assert notice.accounts == (ids["a"], ids["b"])
        want = expected(service)
        assert len(want) == 9
        await until(lambda: len(receiver.accepted) == len(want), what="webhook deliveries")
        await until(lambda: len({n["id"] for n in subscriber.notes}) >= len(want), what="mqtt deliveries")
        await asyncio.sleep(0.3)  # anything sent twice would arrive now
        assert [n["id"] for n in receiver.accepted] == want  # exactly once each, in outbox order
        assert receiver.requests[:3] == [want[0]] * 3 and len(receiver.requests) == len(want) + 3
        assert receiver.bad_signatures == 0
        assert kinds_of(receiver.accepted, ids["a"]) == [*A_KINDS, "OUTAGE_PLANNED"]
        assert kinds_of(receiver.accepted, ids["b"]) == ["ZERO_NOTICE", "RECOVERED", "OUTAGE_PLANNED"]
        assert receiver.accepted[-1]["outage"]["area"] == ids["area"]
        mqtt_ids = list(
            dict.fromkeys(n["id"] for n in subscriber.notes if n["account"] in (ids["a"], ids["b"]))
        )
        assert mqtt_ids == want
        m = service.metrics.registry
        assert (
            m.get_sample_value("amigw_feectl_notifications_total", {"notifier": "webhook", "result": "retry"})
            == 3
        )
        assert (
            m.get_sample_value("amigw_feectl_notifications_total", {"notifier": "webhook", "result": "sent"})
            == 9
        )
        health = service.health()
        assert health["pending_notifications"] == 0 and health["notifications"]["webhook"]["retry"] == 3
    finally:
        await stopped(service, task)
        await receiver.stop()


async def test_webhook_down_then_up_gets_everything_and_mqtt_does_not_wait(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    port = free_port()  # nothing listens there yet: connection refused
    path, ids = write_config(tmp_path, mosquitto, port)
    service, task = await started(path)
    receiver = Receiver()
    try:
        decide(service, ids)
        want = expected(service)
        await until(lambda: len({n["id"] for n in subscriber.notes} & set(want)) == len(want), what="mqtt")
        m = service.metrics.registry
        labels = {"notifier": "webhook", "result": "retry"}
        await until(
            lambda: (m.get_sample_value("amigw_feectl_notifications_total", labels) or 0) >= 3, what="retries"
        )
        assert m.get_sample_value("amigw_feectl_notifications_pending", {"notifier": "webhook"}) == len(want)
        assert m.get_sample_value("amigw_feectl_notifications_pending", {"notifier": "mqtt"}) == 0
        assert service.health()["pending_notifications"] == len(want)
        await receiver.start(port)
        await until(lambda: len(receiver.accepted) == len(want), what="webhook after it is up")
        await asyncio.sleep(0.3)
        assert [n["id"] for n in receiver.accepted] == want
        assert kinds_of(receiver.accepted, ids["a"]) == A_KINDS
        assert m.get_sample_value("amigw_feectl_notifications_pending", {"notifier": "webhook"}) == 0
    finally:
        await stopped(service, task)
        await receiver.stop()


async def test_decisions_of_a_discarded_service_are_delivered_by_the_next(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    port = free_port()
    receiver = Receiver()
    await receiver.start(port)
    path, ids = write_config(tmp_path, mosquitto, port)
    # the first process decides (some through the service, some straight in the core, whose rows
    # never reached any outbox) and dies before it delivers anything
    before = FeeControlService(load(path))
    before.enroll()
    decide(before, ids)
    before.controller.record_payment(ids["a"], "pay-late", 10_000, T0 + 3_600_000)  # RECOVERED
    store = before.controller.store
    with store.transaction():
        ledger = store.ledger_id()
        notified = [
            e.seq
            for e in store.journal()
            if e.account_id in (ids["a"], ids["b"]) and e.kind.value == "decision"
        ]
    journal_rows = [e for e in before.controller.journal() if e.seq in notified]
    store.close()
    want_ids = [
        f"{ledger}-{e.seq}"
        for e in journal_rows
        if e.code in ("ZERO_NOTICE", "RECOVERED", "ALARM1", "ALARM2")
    ]
    assert len(want_ids) == 8

    service, task = await started(path)
    try:
        await until(lambda: len(receiver.accepted) == len(want_ids), what="webhook after restart")
        await until(lambda: {n["id"] for n in subscriber.notes} >= set(want_ids), what="mqtt after restart")
        await asyncio.sleep(0.3)
        assert [n["id"] for n in receiver.accepted] == want_ids
        assert kinds_of(receiver.accepted, ids["a"]) == [*A_KINDS, "RECOVERED"]
    finally:
        await stopped(service, task)
        await receiver.stop()


async def test_area_outage_raised_by_ingest_reaches_the_customers_of_the_area(
    tmp_path: Path, mosquitto: Mosquitto, influx_db: Any, run_worker: Any
) -> None:
    influxd, db = influx_db
    port = free_port()
    receiver = Receiver()
    await receiver.start(port)
    path, ids = write_config(tmp_path, mosquitto, port)
    edge_gw = f"gw-o-{uuid.uuid4().hex[:8]}"
    area = ids["area"]
    reg = registry(tmp_path, {m: (edge_gw, area) for m in (ids["ma"], ids["mb"], "o-3", "o-4")})
    group = f"g{uuid.uuid4().hex[:8]}"
    await run_worker(
        ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(group, [edge_gw], events=True), registry=reg)
    )
    service, task = await started(path)
    await until(lambda: service.consumer is not None, what="fee control subscribed")
    await asyncio.sleep(0.3)
    pub = Publisher(mosquitto)
    try:
        for i, meter in enumerate((ids["ma"], ids["mb"], "o-3")):  # 3 of the area's 4 meters
            down = Event(f"pd-{i}-{group}", edge_gw, "power_down", PIPE_T0 + i * 1_000, meter)
            pub.send(f"ami/v1/{edge_gw}/up/events", down.to_json())
        await until(
            lambda: len([n for n in receiver.accepted if n["kind"] == "OUTAGE_DETECTED"]) == 2,
            timeout_s=20,
            what="outage notices",
        )
        await asyncio.sleep(0.5)  # a repeated alarm would notify again now
        outages = [n for n in receiver.accepted if n["kind"] == "OUTAGE_DETECTED"]
        assert sorted(n["account"] for n in outages) == sorted((ids["a"], ids["b"]))
        o = outages[0]["outage"]
        assert (o["area"], o["events"], o["end_ms"]) == (area, 3, None)
        assert PIPE_T0 <= o["start_ms"] <= PIPE_T0 + 2_000
        [alarm] = influxd.query("SELECT * FROM alarms", db=db)
        assert alarm["area"] == area
    finally:
        pub.close()
        await stopped(service, task)
        await receiver.stop()
