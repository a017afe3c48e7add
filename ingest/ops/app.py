"""The ops API application (aiohttp.web), hosted by the fee-control service on its event loop.

:func:`build_app` makes the :class:`aiohttp.web.Application` from route tables
(:class:`~.routing.RouteTable`; :data:`DEFAULT_TABLES` are this module's service routes and
:mod:`.routes_payments`); :func:`serving` runs it on a host and port and yields the bound
address. Handlers call the service directly on the loop's thread (the core has one SQLite
connection and is never called from another thread).

Every request passes, outermost first:

1. :func:`~.audit.audit_middleware`: records every state-changing call and its final answer in
   the ``audit`` table;
2. :func:`~.errors.error_middleware`: every refusal or failure becomes ``{"error", "detail"}``;
3. :func:`route_middleware`: exactly one ``Authorization`` header (two: 400 ``bad_header``); a
   valid bearer token names the caller; a protected route needs a token (401 ``unauthorized``)
   whose role admits it (403 ``forbidden``); a query parameter the route does not declare is 400
   ``bad_query``; then the body of a ``POST``/``PUT``/``PATCH``/``DELETE`` is read whole (413
   ``body_too_large`` over ``max_body_bytes``) before the handler runs.

The server closes the connection after each answer (``Connection: close``) and writes no access
log. Service routes here: ``GET /healthz`` and ``GET /metrics`` (Prometheus text of the service's
registry) and ``GET /v1/openapi.json``, all public; ``GET /v1/audit?limit=N`` (``admin``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest.feectl.sqlite_store import SqliteLedgerStore
from protocols.errors import RequestRefused

from . import routes_feectl, routes_payments, routes_views
from .audit import AUDIT, AUDITED_METHODS, BODY_REFUSED, WHO, AuditLog, audit_middleware
from .auth import ApiToken, TokenTable, admits
from .errors import Handler, error_middleware
from .openapi import openapi_document
from .routing import BODY_SCHEMA, CALLER, SERVICE, Operation, RouteTable, Schema, query_int, query_parameter

if TYPE_CHECKING:
    from ingest.feectl.service import FeeControlService

__all__ = ["DEFAULT_TABLES", "OPENAPI", "OpsSettings", "build_app", "route_middleware", "routes", "serving"]


@dataclass(frozen=True, slots=True)
class OpsSettings:
    """What the app needs beyond the service: the tokens and the request body bound."""

    tokens: TokenTable
    max_body_bytes: int = 65_536


@dataclass(frozen=True, slots=True)
class _Route:
    operation: Operation
    body_schema: Schema | None
    query: frozenset[str]


OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("amigw.openapi")
_TOKENS: web.AppKey[TokenTable] = web.AppKey("amigw.tokens")
_ROUTES: web.AppKey[dict[web.AbstractRoute, _Route]] = web.AppKey("amigw.routes")

routes = RouteTable("service")


@routes.route("GET", "/healthz", roles=None, summary="Liveness and counters (no account data)")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].health())


@routes.route(
    "GET",
    "/metrics",
    roles=None,
    summary="Prometheus metrics of the fee-control service",
    responses={200: ("Prometheus text exposition", {"type": "string"})},
    content_type="text/plain",
)
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[SERVICE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.route(
    "GET",
    "/v1/openapi.json",
    roles=None,
    summary="This document",
    responses={200: ("The OpenAPI document", {"type": "object"})},
)
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


_AUDIT_ANSWER: Schema = {
    "type": "object",
    "required": ["entries"],
    "properties": {"entries": {"type": "array", "items": {"type": "object"}}},
}


@routes.route(
    "GET",
    "/v1/audit",
    roles={"admin"},
    summary="The newest audit rows, newest first",
    parameters=[query_parameter("limit", default=100, lo=1, hi=1000, description="how many rows")],
    responses={200: ("The rows", _AUDIT_ANSWER)},
)
async def audit(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", default=100, lo=1, hi=1000, code="bad_limit")
    rows = request.app[AUDIT].newest(limit)
    return web.json_response({"entries": [r.as_json() for r in rows]})


DEFAULT_TABLES: tuple[RouteTable, ...] = (
    routes, routes_payments.routes, routes_feectl.routes, routes_views.routes,
)  # fmt: skip


def _caller(request: web.Request, tokens: TokenTable) -> ApiToken | None:
    values = request.headers.getall("Authorization", [])
    if len(values) > 1:
        raise RequestRefused(400, "bad_header", "Authorization: given more than once")
    if not values:
        return None
    scheme, _, secret = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return None
    return tokens.authenticate(secret.strip())


@web.middleware
async def route_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, the route's roles, its declared query parameters and body schema."""
    token = _caller(request, request.app[_TOKENS])
    if token is not None:
        request[WHO] = token.name
        request[CALLER] = token
    route = request.app[_ROUTES].get(request.match_info.route)
    if route is None:  # no such route: aiohttp's 404 or 405
        return await handler(request)
    roles = route.operation.roles
    if roles is not None:
        if token is None:
            raise RequestRefused(401, "unauthorized", "Authorization: Bearer <token> required")
        if not admits(token.role, roles):
            raise RequestRefused(403, "forbidden", f"role {token.role!r} may not call this route")
    unknown = sorted(set(request.query) - route.query)
    if unknown:
        raise RequestRefused(400, "bad_query", f"unknown query parameters {unknown}")
    if request.method in AUDITED_METHODS:
        try:
            await request.read()  # the whole body, bounded, once: the handler and the audit share it
        except web.HTTPRequestEntityTooLarge:
            request[BODY_REFUSED] = True
            raise
    if route.body_schema is not None:
        request[BODY_SCHEMA] = route.body_schema
    return await handler(request)


async def _close_connection(request: web.Request, response: web.StreamResponse) -> None:
    # The hook runs after aiohttp chose the Connection header, so it is set here too.
    response.force_close()
    response.headers["Connection"] = "close"


def build_app(
    service: FeeControlService, settings: OpsSettings, tables: Sequence[RouteTable] = DEFAULT_TABLES
) -> web.Application:
    """The application for ``service`` with every route of ``tables``.

    Creates the ``audit`` table on the service's ledger connection if missing.

    Raises:
        ValueError: two tables declare the same method and path, or a body schema computed
            from the service uses an unsupported keyword.
        TypeError: the service's ledger is not a :class:`SqliteLedgerStore`.
    """
    store = service.controller.store
    if not isinstance(store, SqliteLedgerStore):
        raise TypeError("the ops API keeps its audit trail in a SqliteLedgerStore's file")
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[audit_middleware, error_middleware, route_middleware],
    )
    app[SERVICE] = service
    app[routes_views.VIEWS] = None  # the service sets its views when [service.views] configures them
    app[_TOKENS] = settings.tokens
    app[AUDIT] = AuditLog(store, service.clock)
    table: dict[web.AbstractRoute, _Route] = {}
    seen: set[tuple[str, str]] = set()
    operations = [op for t in tables for op in t.operations]
    for op in operations:
        if (op.method, op.path) in seen:
            raise ValueError(f"{op.method} {op.path}: declared twice")
        seen.add((op.method, op.path))
        query = frozenset(p["name"] for p in op.parameters if p.get("in") == "query")
        route = app.router.add_route(op.method, op.path, op.handler)
        table[route] = _Route(op, op.body_schema(service), query)
    app[_ROUTES] = table
    app[OPENAPI] = openapi_document(operations, service)
    app.on_response_prepare.append(_close_connection)
    return app


@contextlib.asynccontextmanager
async def serving(app: web.Application, host: str, port: int) -> AsyncIterator[tuple[str, int]]:
    """Serve ``app`` on ``host:port`` (0: any free port) until the block exits; yields the bound
    ``(host, port)``. Raises: OSError (the address cannot be bound)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        yield str(bound[0]), int(bound[1])
    finally:
        await runner.cleanup()
