"""The read views of the ops API over the head-end's data, and the console page.

Routes (``docs/ops-api.md``; the views' sources and shapes: ``docs/ops-views.md``):

* ``GET /v1/whoami`` (any token): the caller's token name and role (the console shows the
  actions of that role only).
* ``GET /v1/fleet`` (``read``): gateway health from their status messages, with the loss
  account's gaps.
* ``GET /v1/collection?from=DAY&to=DAY&by=gateway|area`` (``read``): collection success per
  group and local day.
* ``GET /v1/meters/{meter}/latest`` and ``GET /v1/meters/{meter}/load-curve?start_ms&end_ms``
  (``read``): a meter's latest readings with their flags; its intervals with flagged and
  estimated ones marked.
* ``GET /v1/alarms?start_ms&end_ms&kind&limit&acked`` (``read``) and
  ``POST /v1/alarms/{alarm_id}/ack`` ``{"note"}`` (``operate``).
* ``GET /v1/export/daily?from=DAY&to=DAY&by=meter|account&format=csv|json|ndjson`` (``read``,
  ``payments``): the billing export (:mod:`ingest.reports.billing`), streamed day by day; by
  account through the fee-control ledger's meters.
* ``GET /console/`` (public: a static page; it asks for a token and calls the routes above).

The views need ``[service.views] ingest_config``; without it they answer 503
``views_not_configured``. InfluxDB unreachable or refusing is 503 ``store_unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ingest.feectl import operations as ops
from ingest.model.registry import MeterRegistry
from ingest.ops import console
from ingest.ops.alarms import ALARM_KINDS, MAX_LIMIT, AlarmAcks, alarms
from ingest.ops.fleet import FleetTracker, read_loss_account, run_fleet_subscriber
from ingest.ops.views import collection, load_curve, meter_latest
from ingest.reports.billing import FORMATS, export_daily, ledger_accounts
from ingest.sinks.influx.query import InfluxQuery
from ingest.sinks.influx.sink import InfluxSink
from protocols.errors import BadArgument, ExportError, RequestRefused, SinkError

from .audit import WHO
from .auth import ROLES, Role
from .routing import CALLER, SERVICE, RouteTable, Schema, json_body, parameter

if TYPE_CHECKING:
    from ingest.feectl.config import ServiceConfig

__all__ = ["VIEWS", "Views", "open_views", "routes"]

log = logging.getLogger("amigw.ops")
routes = RouteTable("views")
_ANY: Sequence[Role] = ROLES
_READ: Sequence[Role] = ("read",)
_OPERATE: Sequence[Role] = ("operate",)
_ALARM_ID = re.compile(r"[a-z_]{1,32}-[0-9a-f]{16}")
_METER = re.compile(r"[^\x00-\x1f\x7f]{1,128}")


@dataclass(slots=True)
class Views:
    """What the views read: ingest's InfluxDB (its sink's reads) and registry, the fleet
    tracker fed from MQTT, the loss account's file and the acknowledgements."""

    sink: InfluxSink
    registry: MeterRegistry
    tracker: FleetTracker
    acks: AlarmAcks
    loss_path: Path
    utc_offset_ms: int
    interval_ms: int
    wide: bool
    state_url: str = ""  # [state] url: the loss account every machine shares

    @property
    def query(self) -> InfluxQuery:
        return self.sink.query


VIEWS: web.AppKey[Views | None] = web.AppKey("amigw.views")


@contextlib.asynccontextmanager
async def open_views(cfg: ServiceConfig, mqtt_client_id: str) -> AsyncIterator[Views | None]:
    """The views of ``cfg`` (None when ``[service.views] ingest_config`` is empty), with the
    fleet subscriber running until the block exits.

    Raises: ConfigError (the registry or calendar of ingest's configuration)."""
    ing = cfg.views_ingest
    if ing is None or cfg.acks_path is None:
        yield None
        return
    from ingest.config import load_calendar, load_registry

    registry = load_registry(ing)
    calendar = load_calendar(ing)
    sink = InfluxSink(ing.influx, wide=ing.pipeline.schema == "wide")
    acks = AlarmAcks(cfg.acks_path)
    tracker = FleetTracker(stale_after_s=cfg.service.views.stale_after_s)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_fleet_subscriber(tracker, cfg.mqtt, stop, client_id=f"{mqtt_client_id}-fleet"), name="ops-fleet"
    )
    try:
        yield Views(
            sink,
            registry,
            tracker,
            acks,
            Path(ing.loss.path),
            int(calendar.utc_offset_ms),
            ing.pipeline.interval_s * 1000,
            ing.pipeline.schema == "wide",
            ing.state.url,
        )
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)
        await sink.aclose()
        acks.close()


def _views(request: web.Request) -> Views:
    views = request.app.get(VIEWS)
    if views is None:
        raise RequestRefused(503, "views_not_configured", "set [service.views] ingest_config")
    return views


def _int_query(request: web.Request, name: str, default: int | None = None) -> int:
    text = request.query.get(name)
    if text is None:
        if default is None:
            raise BadArgument(name, "required")
        return default
    if not re.fullmatch(r"-?[0-9]{1,16}", text):
        raise BadArgument(name, "expected an integer")
    return int(text)


def _day(request: web.Request, name: str) -> dt.date:
    text = request.query.get(name)
    if text is None:
        raise BadArgument(name, "required (YYYY-MM-DD)")
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise BadArgument(name, "expected YYYY-MM-DD") from None


def _meter(request: web.Request) -> str:
    meter = request.match_info["meter"]
    if not _METER.fullmatch(meter):
        raise BadArgument("meter", "expected 1..128 characters, no control characters")
    return meter


_ANSWER: Schema = {"type": "object"}
_MS = {"type": "integer", "minimum": 0, "maximum": 2**53}
_STRING: Schema = {"type": "string"}
_DATE: Schema = {"type": "string", "format": "date"}
_ALARM_LIMIT: Schema = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 200}
_FILE = parameter("name", _STRING, "file name", where="path")


@routes.route(
    "GET", "/v1/whoami", roles=_ANY, summary="The caller's token name and role",
    responses={200: ("The caller", {"type": "object", "required": ["name", "role"]})},
)  # fmt: skip
async def whoami(request: web.Request) -> web.Response:
    caller = request[CALLER]
    return web.json_response({"name": caller.name, "role": caller.role})


@routes.route(
    "GET", "/v1/fleet", roles=_READ, summary="Gateway health: online, last seen, outbox, buses, loss gaps",
    responses={200: ("Every gateway heard from", _ANSWER)},
)  # fmt: skip
async def fleet(request: web.Request) -> web.Response:
    views = _views(request)
    try:
        loss = await asyncio.to_thread(read_loss_account, views.loss_path, views.state_url)
    except Exception as exc:  # sqlite3.Error, OSError: the health view still answers
        log.warning("loss account unreadable", extra={"kv": {"path": str(views.loss_path), "reason": exc}})
        loss = None
    return web.json_response(views.tracker.snapshot(int(time.time() * 1000), loss=loss))


@routes.route(
    "GET", "/v1/collection", roles=_READ, summary="Collection success per gateway or area and local day",
    parameters=[
        parameter("from", _DATE, "first local day", required=True),
        parameter("to", _DATE, "last local day (at most 31 days)", required=True),
        parameter("by", {"type": "string", "enum": ["gateway", "area"], "default": "gateway"}, "grouping"),
    ],
    responses={200: ("Received, expected and estimated intervals per group and day", _ANSWER)},
)  # fmt: skip
async def collection_view(request: web.Request) -> web.Response:
    views = _views(request)
    start, end = _day(request, "from"), _day(request, "to")
    by = request.query.get("by", "gateway")
    answer = await collection(
        views.query, views.registry, start, end, by,
        utc_offset_ms=views.utc_offset_ms, interval_ms=views.interval_ms,
    )  # fmt: skip
    return web.json_response(answer)


@routes.route(
    "GET", "/v1/meters/{meter}/latest", roles=_READ, summary="A meter's latest readings with their flags",
    parameters=[parameter("meter", _STRING, "meter id", where="path")],
    responses={200: ("Each quantity's latest value", _ANSWER)},
)  # fmt: skip
async def latest(request: web.Request) -> web.Response:
    views = _views(request)
    return web.json_response(await meter_latest(views.query, _meter(request), wide=views.wide))


@routes.route(
    "GET", "/v1/meters/{meter}/load-curve", roles=_READ,
    summary="A meter's intervals with flagged and estimated ones marked (at most 31 days)",
    parameters=[
        parameter("meter", _STRING, "meter id", where="path"),
        parameter("start_ms", _MS, "from (epoch ms, inclusive)", required=True),
        parameter("end_ms", _MS, "to (epoch ms, exclusive)", required=True),
    ],
    responses={200: ("The intervals", _ANSWER)},
)  # fmt: skip
async def load_curve_view(request: web.Request) -> web.Response:
    views = _views(request)
    meter = _meter(request)
    start, end = _int_query(request, "start_ms"), _int_query(request, "end_ms")
    return web.json_response(await load_curve(views.query, meter, start, end))


@routes.route(
    "GET", "/v1/alarms", roles=_READ, summary="Alarms in a range, newest first, with acknowledgements",
    parameters=[
        parameter("start_ms", _MS, "from (epoch ms, inclusive)", required=True),
        parameter("end_ms", _MS, "to (epoch ms, exclusive; at most 31 days)", required=True),
        parameter("kind", {"type": "string", "enum": list(ALARM_KINDS)}, "only this kind"),
        parameter("limit", _ALARM_LIMIT, "at most"),
        parameter("acked", {"type": "string", "enum": ["true", "false"]}, "only acknowledged / open ones"),
    ],
    responses={200: ("The alarms", _ANSWER)},
)  # fmt: skip
async def alarms_view(request: web.Request) -> web.Response:
    views = _views(request)
    start, end = _int_query(request, "start_ms"), _int_query(request, "end_ms")
    kind = request.query.get("kind")
    acked_text = request.query.get("acked")
    if acked_text not in (None, "true", "false"):
        raise BadArgument("acked", "expected true or false")
    answer = await alarms(
        views.query, start, end, None if kind is None else [kind], _int_query(request, "limit", 200),
        acks=views.acks, acked=None if acked_text is None else acked_text == "true",
        failed_commands=_failed_commands(request),
    )  # fmt: skip
    return web.json_response(answer)


def _failed_commands(request: web.Request) -> Any:
    """Fee control's relay commands that failed or expired in the range, as alarm records."""
    service = request.app[SERVICE]

    async def failed(start_ms: int, end_ms: int, limit: int) -> Sequence[Mapping[str, Any]]:
        listed = ops.commands(service, states=["failed", "expired"], limit=1000)["commands"]
        return [
            {"id": c["command_id"], "ts_ms": c["state_ms"], "gateway": c["gateway"], "meter": c["meter"],
             "action": c["action"], "state": c["state"], "attempt": c["attempt"], "account": c["account"]}
            for c in listed
            if start_ms <= c["state_ms"] < end_ms
        ][:limit]  # fmt: skip

    return failed


_ACK_BODY: Schema = {
    "type": "object",
    "properties": {"note": {"type": "string", "minLength": 0, "maxLength": 500}},
    "additionalProperties": False,
}


@routes.route(
    "POST", "/v1/alarms/{alarm_id}/ack", roles=_OPERATE, summary="Acknowledge an alarm (idempotent)",
    parameters=[parameter("alarm_id", _STRING, "alarm id, as listed", where="path")], body=_ACK_BODY,
    responses={200: ("The acknowledgement (created false: it was acknowledged before)", _ANSWER)},
)  # fmt: skip
async def ack(request: web.Request) -> web.Response:
    views = _views(request)
    alarm = request.match_info["alarm_id"]
    if not _ALARM_ID.fullmatch(alarm):
        raise BadArgument("alarm_id", "expected an alarm id as listed (<kind>-<16 hex digits>)")
    doc = await json_body(request)
    now = int(request.app[SERVICE].clock())
    answer = await asyncio.to_thread(views.acks.ack, alarm, request[WHO], str(doc.get("note", "")), now)
    return web.json_response(answer)


@routes.route(
    "GET", "/v1/export/daily", roles=("read", "payments"),
    summary="Billing export: daily and TOU totals per meter or account, streamed",
    description="Columns, units, quality marks and completeness: docs/billing.md.",
    parameters=[
        parameter("from", _DATE, "first local day", required=True),
        parameter("to", _DATE, "last local day (<= 366 days)", required=True),
        parameter("by", {"type": "string", "enum": ["meter", "account"], "default": "meter"}, "rows per"),
        parameter("format", {"type": "string", "enum": list(FORMATS), "default": "csv"}, "output format"),
    ],
    responses={200: ("The rows (CSV, a JSON array or NDJSON)", {"type": "string"})}, content_type="text/csv",
)  # fmt: skip
async def export(request: web.Request) -> web.StreamResponse:
    views = _views(request)
    start, end = _day(request, "from"), _day(request, "to")
    fmt = request.query.get("format", "csv")
    by = request.query.get("by", "meter")
    service = request.app[SERVICE]
    accounts = await asyncio.to_thread(ledger_accounts, service.cfg.db_path) if by == "account" else None
    try:
        chunks = export_daily(
            views.sink, start_day=start, end_day=end, by=by, fmt=fmt, accounts=accounts,
            registry=views.registry, interval_s=views.interval_ms // 1000, utc_offset_ms=views.utc_offset_ms,
        ).__aiter__()  # fmt: skip
        first = await anext(chunks)  # a refusal or an unreachable store is still a clean error here
    except ExportError as exc:
        raise BadArgument(exc.key_path, exc.reason) from None
    except StopAsyncIteration:
        first = b""
    response = web.StreamResponse(headers={"Content-Type": FORMATS[fmt]})
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(first)
    try:
        async for chunk in chunks:
            await response.write(chunk)
    except SinkError as exc:  # mid-stream: the client must see a broken transfer, not a short file
        log.error("billing export stopped", extra={"kv": {"from": str(start), "to": str(end), "reason": exc}})
        response.force_close()
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


# -- the console --------------------------------------------------------------------------------
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


@routes.route(
    "GET", "/console/", roles=None, summary="The ops console (a web page)",
    parameters=[
        parameter("meter", {"type": "string"}, "a meter to show (read by the page, not the server)"),
        parameter("account", {"type": "string"}, "an account to show (read by the page, not the server)"),
    ],
    responses={200: ("The page", {"type": "string"})}, content_type="text/html",
)  # fmt: skip
async def console_page(request: web.Request) -> web.StreamResponse:
    return _static("index.html")


@routes.route(
    "GET", "/console/{name}", roles=None, summary="The console's scripts and styles",
    parameters=[_FILE], responses={200: ("The file", {"type": "string"})},
    content_type="text/plain",
)  # fmt: skip
async def console_file(request: web.Request) -> web.StreamResponse:
    return _static(request.match_info["name"])


@routes.route(
    "GET", "/console/vendor/{name}", roles=None, summary="The console's chart library (built from npm)",
    parameters=[_FILE], responses={200: ("The file", {"type": "string"})},
    content_type="text/plain",
)  # fmt: skip
async def console_vendor(request: web.Request) -> web.StreamResponse:
    missing = console.missing_assets()
    if missing:
        raise RequestRefused(503, "console_not_built", f"missing {missing}: run bash .ci/bootstrap setup")
    return _static("vendor/" + request.match_info["name"])


def _static(name: str) -> web.StreamResponse:
    path = (console.STATIC / name).resolve()
    if console.STATIC.resolve() not in path.parents or not path.is_file():
        raise RequestRefused(404, "not_found", name)
    content_type = _TYPES.get(path.suffix, "application/octet-stream")
    return web.FileResponse(path, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
