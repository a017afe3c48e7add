"""The OpenAPI document is valid, lists every route the app serves, and the real server (a
background thread with its own event loop, a temporary SQLite ledger, its read views on the real
influxd and its fleet subscriber on the real mosquitto) answers every request that schemathesis
generates from it, valid and invalid, without a 5xx and with a JSON error body for every
refusal."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from ingest.feectl.config import load_service_config
from ingest.feectl.service import FeeControlService
from ingest.ops.app import DEFAULT_TABLES, OPENAPI, OpsSettings, build_app, serving
from ingest.ops.routes_views import VIEWS, open_views
from simulators.servers import Influxd, Mosquitto
from tests.unit.ingest.ops.conftest import NOW, TOKENS, Recorder, config_text, write_files

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 150  # per operation and mode; about 10 s in all


class Server:
    """The service and its ops API on a loop of their own (the service is built on that thread:
    its SQLite connection is used only there)."""

    def __init__(self, tmp: Path, influxd: Influxd, mosquitto: Mosquitto) -> None:
        self.tmp = tmp
        self.influxd, self.mosquitto = influxd, mosquitto
        self.port = 0
        self.document: dict[str, Any] = {}
        self.routes: set[tuple[str, str]] = set()
        self._ready = threading.Event()
        self._views = contextlib.AsyncExitStack()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))

    async def _main(self) -> None:
        write_files(self.tmp)
        self.influxd.create_database("fuzz")
        (self.tmp / "ingest.toml").write_text(
            f'[mqtt]\nurl = "{self.mosquitto.url}"\n[influx]\nurl = "{self.influxd.url}"\napi = "v1"\n'
            'database = "fuzz"\n[loss]\npath = "loss.sqlite"\n'
        )
        extra = (
            f'[service.mqtt]\nurl = "{self.mosquitto.url}"\nclient_id = "ops-fuzz"\n'
            '[service.views]\ningest_config = "ingest.toml"\n'
        )
        cfg = load_service_config(config_text(extra), self.tmp)
        service = FeeControlService(cfg, clock=lambda: NOW, publisher=Recorder())
        service.enroll()
        app = build_app(service, OpsSettings(cfg.api_tokens, cfg.service.http.max_body_bytes))
        app[VIEWS] = views = await self._views.enter_async_context(open_views(cfg, "ops-fuzz"))
        assert views is not None
        self.routes = {
            (r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None
        }
        async with serving(app, "127.0.0.1", 0) as (_, port):
            self.port = port
            self.document = app[OPENAPI]
            self._ready.set()
            await self._stop.wait()
        await self._views.aclose()
        service.controller.store.close()

    def __enter__(self) -> Server:
        self._thread.start()
        assert self._ready.wait(10), "server did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, influxd: Influxd, mosquitto: Mosquitto
) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("ops-fuzz"), influxd, mosquitto) as s:
        yield s


def test_the_served_document_is_the_apps_and_lists_every_route(server: Server) -> None:
    served = requests.get(f"http://127.0.0.1:{server.port}/v1/openapi.json", timeout=10)
    assert served.status_code == 200 and served.json() == server.document
    listed = {(m.upper(), p) for p, ops in server.document["paths"].items() for m in ops}
    assert listed == server.routes
    declared = {(op.method, op.path) for t in DEFAULT_TABLES for op in t.operations}
    assert declared == listed
    schemathesis.openapi.from_dict(server.document).validate()  # against the OpenAPI 3.0 meta-schema


def test_every_protected_route_declares_bearer_security_and_its_roles(server: Server) -> None:
    for path, ops in server.document["paths"].items():
        for method, op in ops.items():
            if op["security"]:
                assert op["security"] == [{"bearer": []}] and op["x-amigw-roles"], (method, path)
                assert {"401", "403"} <= set(op["responses"]), (method, path)
    payment = server.document["paths"]["/v1/payments"]["post"]["requestBody"]["content"]["application/json"]
    amount = payment["schema"]["properties"]["amount_fen"]
    assert (amount["minimum"], amount["maximum"]) == (1, 10_000_000)
    assert payment["schema"]["additionalProperties"] is False


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_generated_requests_never_get_a_server_error(
    server: Server, mode: schemathesis.GenerationMode
) -> None:
    schema = schemathesis.openapi.from_dict(server.document)
    base_url = f"http://127.0.0.1:{server.port}"
    headers = {"Authorization": f"Bearer {TOKENS['admin']}"}
    seen: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        raw = server.document["paths"][operation.path][operation.method.lower()]
        if mode is schemathesis.GenerationMode.NEGATIVE and not ({"parameters", "requestBody"} & set(raw)):
            continue  # nothing in the request to make invalid

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=base_url, headers=headers, timeout=10)
            case.validate_response(response, checks=[not_a_server_error])
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            if response.status_code >= 400:
                doc = response.json()
                assert set(doc) == {"error", "detail"}, (case.path, response.text)

        try:
            check()
        except Unsatisfiable:
            # only negative mode: nothing in this operation's declared inputs can be made invalid
            # (a free-form path segment); its positive run covers it
            assert mode is schemathesis.GenerationMode.NEGATIVE, operation.path
    assert sum(seen.values()) > 50 and all(status < 500 for status in seen)
