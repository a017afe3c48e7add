"""The ops API's read routes and the console, through the real server: the fee-control service's
app with its views on the real influxd (points written by the pipeline's own transform and
encoder) and its fleet subscriber on the real mosquitto. Roles, bad arguments, acknowledgements
(audited), and the answer when the views are not configured."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.feectl.config import load_service_config
from ingest.feectl.service import FeeControlService
from ingest.ops import console
from ingest.ops.app import OpsSettings, build_app, serving
from ingest.ops.routes_views import VIEWS, open_views
from protocols import topics
from protocols.payload import Status
from simulators.servers import Influxd, Mosquitto
from tests.integration.test_ops_views import GW, METER, T0, Q, pipeline_lines
from tests.unit.ingest.ops.conftest import NOW, TOKENS, Recorder, config_text, write_files

pytestmark = pytest.mark.integration


@dataclass
class Api:
    base: str
    service: FeeControlService
    session: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, role: str | None = "read", body: Any = None
    ) -> tuple[int, Any]:
        headers = {} if role is None else {"Authorization": f"Bearer {TOKENS[role]}"}
        async with self.session.request(method, self.base + path, headers=headers, json=body) as resp:
            ctype = resp.headers.get("Content-Type", "")
            return resp.status, (await resp.json() if "json" in ctype else await resp.text())


@contextlib.asynccontextmanager
async def ops_api(tmp: Path, extra: str, with_views: bool) -> AsyncIterator[Api]:
    write_files(tmp)
    cfg = load_service_config(config_text(extra), tmp)
    service = FeeControlService(cfg, clock=lambda: NOW, publisher=Recorder())
    service.enroll()
    app = build_app(service, OpsSettings(cfg.api_tokens, cfg.service.http.max_body_bytes))
    async with contextlib.AsyncExitStack() as stack:
        if with_views:
            app[VIEWS] = await stack.enter_async_context(open_views(cfg, "ops-routes"))
        host, port = await stack.enter_async_context(serving(app, "127.0.0.1", 0))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield Api(f"http://{host}:{port}", service, session)
    service.controller.store.close()


@pytest.fixture
async def api(tmp_path: Path, influx_db: tuple[Influxd, str], mosquitto: Mosquitto) -> AsyncIterator[Api]:
    influxd, db = influx_db
    (tmp_path / "ingest.toml").write_text(
        f'[mqtt]\nurl = "{mosquitto.url}"\n[influx]\nurl = "{influxd.url}"\napi = "v1"\ndatabase = "{db}"\n'
        '[loss]\npath = "loss.sqlite"\n'
    )
    influxd.write(pipeline_lines(tmp_path, wide=True).decode(), db=db)
    extra = (
        f'[service.mqtt]\nurl = "{mosquitto.url}"\nclient_id = "ops-routes-{tmp_path.name[-12:]}"\n'
        '[service.views]\ningest_config = "ingest.toml"\nstale_after_s = 60\n'
    )
    async with ops_api(tmp_path, extra, True) as a:
        yield a


async def test_the_load_curve_and_latest_readings_are_served_with_their_flags(api: Api) -> None:
    meter = METER.replace(" ", "%20").replace(",", "%2C")  # "M 1,x": escaping all the way down
    status, curve = await api.call("GET", f"/v1/meters/{meter}/load-curve?start_ms={T0}&end_ms={T0 + 8 * Q}")
    assert status == 200, curve
    assert curve["meter"] == METER and curve["count"] == 4 and curve["estimated"] == 2
    marked = [(r["ts_ms"], r["estimated"], "GAP_BEFORE" in r["flag_names"]) for r in curve["intervals"]]
    assert marked == [(T0 + Q, False, False), (T0 + 2 * Q, True, True), (T0 + 3 * Q, True, True),
                      (T0 + 4 * Q, False, False)], marked  # fmt: skip
    status, body = await api.call("GET", f"/v1/meters/{meter}/latest")
    assert status == 200 and body["meter"] == METER
    assert {q["quantity"] for q in body["quantities"]} == {"energy_fwd_active_total", "voltage_a"}
    assert (await api.call("GET", "/v1/meters/%01x/latest"))[0] == 400


async def test_roles_and_bad_arguments(api: Api) -> None:
    assert (await api.call("GET", "/v1/fleet", role=None))[0] == 401
    status, body = await api.call("GET", "/v1/fleet", role="payments")
    assert status == 403 and body["error"] == "forbidden"
    for role in ("read", "operate", "admin"):
        assert (await api.call("GET", "/v1/fleet", role=role))[0] == 200, role
    bad = [
        "/v1/collection?from=2024-03-10",
        "/v1/collection?from=2024-03-10&to=2024-05-10",
        "/v1/collection?from=1640-04-12&to=1640-04-12",
        "/v1/collection?from=2024-03-10&to=2024-03-11&by=planet",
        f"/v1/meters/other/load-curve?start_ms={T0}",
        f"/v1/meters/other/load-curve?start_ms={T0}&end_ms={T0 - 1}",
        f"/v1/alarms?start_ms={T0}&end_ms={T0 + Q}&kind=volcano",
        f"/v1/alarms?start_ms={T0}&end_ms={T0 + Q}&acked=maybe",
    ]
    for path in bad:
        status, body = await api.call("GET", path)
        assert status == 400 and body["error"] in ("bad_argument", "bad_query"), (path, body)
    status, me = await api.call("GET", "/v1/whoami", role="operate")
    assert status == 200 and me == {"name": "operate-1", "role": "operate"}


async def test_collection_per_gateway(api: Api, influx_db: tuple[Influxd, str]) -> None:
    influxd, db = influx_db
    influxd.write(
        f'daily_tou,meter=m-a,gateway={GW} day="2024-03-10",total=10i,intervals=90i,estimated=2i,invalid=1i '
        f"{T0}",
        db=db,
    )
    status, body = await api.call("GET", "/v1/collection?from=2024-03-10&to=2024-03-10&by=gateway")
    assert status == 200, body
    (group,) = body["groups"]
    assert group["id"] == GW and group["days"][0]["day"] == "2024-03-10"
    assert (group["received"], group["estimated"]) == (88, 2)  # actual = intervals − estimated


async def test_the_fleet_shows_a_retained_status(api: Api, mosquitto: Mosquitto) -> None:
    status_msg = Status(
        "gw-route", True, NOW, "0.1.0", {"reads": 10, "read_successes": 9, "outbox_pending": 3}
    )
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ops-routes-status")
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        client.publish(topics.status("gw-route"), status_msg.to_json(), qos=1, retain=True).wait_for_publish(
            10
        )
        for _ in range(100):
            _, body = await api.call("GET", "/v1/fleet")
            found = [g for g in body["gateways"] if g["gateway"] == "gw-route"]
            if found:
                break
            await asyncio.sleep(0.1)
        assert found and found[0]["outbox_pending"] == 3 and found[0]["version"] == "0.1.0"
    finally:
        client.publish(topics.status("gw-route"), b"", qos=1, retain=True).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()


async def test_an_alarm_is_acknowledged_once_by_an_operator_and_audited(
    api: Api, influx_db: tuple[Influxd, str]
) -> None:
    influxd, db = influx_db
    influxd.write(
        f'daily_tou,meter=m-b,gateway={GW} day="2024-03-10",total=10i,intervals=96i,estimated=0i,invalid=3i '
        f"{T0}",
        db=db,
    )
    status, body = await api.call("GET", f"/v1/alarms?start_ms={T0}&end_ms={T0 + 86_400_000}&acked=false")
    assert status == 200, body
    (alarm,) = [a for a in body["alarms"] if a["kind"] == "invalid_intervals"]
    path = f"/v1/alarms/{alarm['id']}/ack"
    assert (await api.call("POST", path, role="read", body={"note": "x"}))[0] == 403
    status, first = await api.call("POST", path, role="operate", body={"note": "crew sent"})
    assert status == 200 and first["created"] is True and first["by"] == "operate-1"
    status, again = await api.call("POST", path, role="operate", body={"note": "again"})
    assert status == 200 and again["created"] is False and again["note"] == "crew sent"
    assert (await api.call("POST", path, role="operate", body={"bogus": 1}))[0] == 400
    status, body = await api.call("GET", f"/v1/alarms?start_ms={T0}&end_ms={T0 + 86_400_000}&acked=true")
    assert [a["id"] for a in body["alarms"]] == [alarm["id"]] and body["alarms"][0]["ack"][
        "by"
    ] == "operate-1"
    status, audit = await api.call("GET", "/v1/audit?limit=10", role="admin")
    acks = [e for e in audit["entries"] if e["path"] == path]
    assert [e["status"] for e in acks] == [400, 200, 200, 403], acks


async def test_the_console_page_and_its_assets_are_served(api: Api) -> None:
    status, page = await api.call("GET", "/console/", role=None)
    assert status == 200 and "<title>amigw ops console</title>" in page
    assert (await api.call("GET", "/console/console.js", role=None))[0] == 200
    status, _ = await api.call("GET", "/console/..%2F__init__.py", role=None)
    assert status == 404
    if not console.missing_assets():  # built by .ci/bootstrap (npm)
        status, lib = await api.call("GET", "/console/vendor/uPlot.iife.min.js", role=None)
        assert status == 200 and "uPlot" in lib


async def test_without_views_configured_the_views_say_so(tmp_path: Path) -> None:
    async with ops_api(tmp_path, "", False) as a:
        status, body = await a.call("GET", "/v1/fleet")
        assert status == 503 and body["error"] == "views_not_configured"
        status, body = await a.call("GET", "/v1/accounts/acc-1")  # the rest of the API works
        assert status == 200 and body["account"] == "acc-1"


async def test_the_billing_export_is_streamed_per_meter_and_per_account(
    api: Api, influx_db: tuple[Influxd, str]
) -> None:
    influxd, db = influx_db
    influxd.write(
        f'daily_tou,meter=m-1,gateway=gw-1 day="2024-03-10",total=1234i,sharp=0i,peak=234i,flat=1000i,'
        f"valley=0i,intervals=96i,estimated=2i,invalid=0i,tou_mismatch=0i {T0}",
        db=db,
    )
    status, csv = await api.call("GET", "/v1/export/daily?from=2024-03-10&to=2024-03-10", role="payments")
    assert status == 200, csv
    lines = csv.strip().splitlines()
    assert lines[0].startswith("day,meter,gateway,account,total_kwh")
    (row,) = [line for line in lines[1:] if ",m-1," in line]
    assert row.startswith("2024-03-10,m-1,gw-1,,12.34,") and row.endswith("estimated"), row
    status, doc = await api.call(
        "GET", "/v1/export/daily?from=2024-03-10&to=2024-03-10&by=account&format=json"
    )
    assert status == 200, doc
    (acc,) = [r for r in doc if r["account"] == "acc-1"]  # m-1 is acc-1's meter in the ledger
    assert acc["total_kwh"] == 12.34 and acc["intervals"] == 96
    status, body = await api.call("GET", "/v1/export/daily?from=2024-03-10&to=2024-03-01")
    assert status == 400 and body["error"] == "bad_argument" and body["detail"].startswith("to:"), body
    assert (await api.call("GET", "/v1/export/daily?from=2024-03-10&to=2024-03-10", role="enrol"))[0] == 403


async def test_a_failed_relay_command_is_an_alarm(api: Api) -> None:
    from ingest.feectl import operations as ops
    from ingest.feectl.lifecycle import CommandState

    issued = ops.manual_command(api.service, "m-1", "trip", "operator", "test", NOW)["command"]
    store = api.service.controller.store
    with store.transaction():
        store.set_command_state(issued["command_id"], CommandState.FAILED, NOW + 1000)
    status, body = await api.call("GET", f"/v1/alarms?start_ms={NOW - 3_600_000}&end_ms={NOW + 3_600_000}")
    assert status == 200, body
    (alarm,) = [a for a in body["alarms"] if a["kind"] == "command_failed"]
    assert (alarm["meter"], alarm["gateway"], alarm["ts_ms"]) == ("m-1", "gw-1", NOW + 1000)
    assert alarm["detail"]["state"] == "failed" and alarm["detail"]["action"] == "trip"
