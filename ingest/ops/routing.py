"""Route tables of the ops API: each route with the roles it admits and its OpenAPI description.

A module that adds routes makes one :class:`RouteTable` and decorates its handlers::

    routes = RouteTable("holds")

    @routes.route("POST", "/v1/holds", roles={"operate"}, summary="Place a hold",
                  body=HOLD_SCHEMA, responses={201: ("Hold placed", HOLD_ANSWER)})
    async def place_hold(request: web.Request) -> web.Response:
        doc = await json_body(request)            # checked against HOLD_SCHEMA
        service = request.app[SERVICE]
        ...

and :func:`ingest.ops.app.build_app` is given the table. ``roles=None`` makes a route public (no
token). Every route is listed in ``GET /v1/openapi.json`` from this declaration, and the
request body of a route that declares ``body`` is read and checked by :func:`json_body` against
exactly that schema, so the document and the checks cannot disagree.

Body schemas are a small subset of JSON Schema, checked at declaration: an ``object`` with
``properties``, ``required`` and ``additionalProperties: false``, whose properties are
``string`` (``minLength``, ``maxLength``), ``integer`` (``minimum``, ``maximum``; JSON
``true``/``false`` are not integers) or ``boolean``. Any other keyword is a ``ValueError`` when the
route is declared (or, for a schema computed from the service, when the app is built).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from protocols.errors import RequestRefused

from .auth import ROLES, ApiToken, Role

if TYPE_CHECKING:
    from ingest.feectl.service import FeeControlService

__all__ = [
    "BODY_SCHEMA",
    "CALLER",
    "SERVICE",
    "BodyError",
    "Handler",
    "Operation",
    "RouteTable",
    "check_schema",
    "json_body",
    "parameter",
    "query_int",
    "query_parameter",
    "validate",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Schema = Mapping[str, Any]
SchemaSource = Schema | Callable[["FeeControlService"], Schema]
SERVICE: web.AppKey[FeeControlService] = web.AppKey("amigw.service")
BODY_SCHEMA: web.RequestKey[Schema] = web.RequestKey("amigw.body_schema")  # the matched route's
CALLER: web.RequestKey[ApiToken] = web.RequestKey("amigw.caller")  # the valid token presented
_DECIMAL = re.compile(r"-?[0-9]{1,12}")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_OBJECT_KEYS = frozenset({"type", "properties", "required", "additionalProperties", "description"})
_PROPERTY_KEYS = {
    "string": frozenset({"type", "minLength", "maxLength", "description", "example"}),
    "integer": frozenset({"type", "minimum", "maximum", "description", "example"}),
    "boolean": frozenset({"type", "description", "example"}),
    "array": frozenset({"type", "items", "minItems", "maxItems", "description"}),
}


@dataclass(frozen=True, slots=True)
class Operation:
    """One route: method, path (aiohttp pattern, ``/v1/accounts/{account}``), handler, the roles
    it admits (None: public) and its OpenAPI description. ``responses`` maps a success status to
    ``(description, JSON schema or None)``; error answers are added by the OpenAPI builder."""

    method: str
    path: str
    handler: Handler
    roles: frozenset[Role] | None
    summary: str
    operation_id: str
    tag: str
    description: str = ""
    parameters: tuple[Schema, ...] = ()
    body: SchemaSource | None = None
    responses: Mapping[int, tuple[str, Schema | None]] | None = None
    content_type: str = "application/json"  # of the success answers

    def body_schema(self, service: FeeControlService) -> Schema | None:
        """The request body's schema (computed from the service when declared as a function)."""
        if self.body is None or isinstance(self.body, Mapping):
            return self.body
        schema = self.body(service)
        check_schema(schema)
        return schema


class RouteTable:
    """The routes one module adds (see the module docstring)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.operations: list[Operation] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        roles: Iterable[Role] | None,
        summary: str,
        description: str = "",
        parameters: Iterable[Schema] = (),
        body: SchemaSource | None = None,
        responses: Mapping[int, tuple[str, Schema | None]] | None = None,
        content_type: str = "application/json",
    ) -> Callable[[Handler], Handler]:
        """Declare a route. Raises: ValueError (unknown method or role, an unsupported schema)."""
        if method not in _METHODS:
            raise ValueError(f"method: expected one of {sorted(_METHODS)}, got {method!r}")
        admitted = None if roles is None else frozenset(roles)
        if admitted is not None and (not admitted or not admitted <= set(ROLES)):
            raise ValueError(f"roles: expected a non-empty subset of {ROLES}, got {roles!r}")
        if isinstance(body, Mapping):
            check_schema(body)

        def register(handler: Handler) -> Handler:
            self.operations.append(
                Operation(
                    method,
                    path,
                    handler,
                    admitted,
                    summary,
                    handler.__name__,
                    self.tag,
                    description,
                    tuple(parameters),
                    body,
                    responses,
                    content_type,
                )
            )
            return handler

        return register


def check_schema(schema: Schema) -> None:
    """Raises ValueError when ``schema`` uses anything :func:`validate` does not check."""
    if schema.get("type") != "object" or schema.get("additionalProperties") is not False:
        raise ValueError("body schema: expected an object with additionalProperties false")
    if set(schema) - _OBJECT_KEYS:
        raise ValueError(f"body schema: unsupported keywords {sorted(set(schema) - _OBJECT_KEYS)}")
    props = schema.get("properties", {})
    for name, prop in props.items():
        allowed = _PROPERTY_KEYS.get(prop.get("type"))
        if allowed is None or set(prop) - allowed:
            raise ValueError(f"body schema: {name}: unsupported property schema {dict(prop)}")
        if prop["type"] == "array":
            check_schema(prop["items"])  # arrays hold objects of the same subset
    if not set(schema.get("required", ())) <= set(props):
        raise ValueError("body schema: required names a key that is not a property")


class BodyError(RequestRefused):
    """A body that breaks its schema: 400 ``bad_fields``; ``field`` and ``keyword`` say where."""

    def __init__(self, field: str, keyword: str, detail: str) -> None:
        super().__init__(400, "bad_fields", detail)
        self.field = field
        self.keyword = keyword


def _check_property(name: str, value: object, prop: Schema) -> None:
    kind = prop["type"]
    if kind == "string":
        if not isinstance(value, str):
            raise BodyError(name, "type", f"{name}: expected a string")
        lo, hi = prop.get("minLength", 0), prop.get("maxLength")
        if len(value) < lo or (hi is not None and len(value) > hi):
            keyword = "minLength" if len(value) < lo else "maxLength"
            raise BodyError(name, keyword, f"{name}: expected a string of {lo}..{hi} characters")
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise BodyError(name, "type", f"{name}: expected an integer")
        lo, hi = prop.get("minimum"), prop.get("maximum")
        if lo is not None and value < lo:
            raise BodyError(name, "minimum", f"{name}: expected an integer >= {lo}")
        if hi is not None and value > hi:
            raise BodyError(name, "maximum", f"{name}: expected an integer <= {hi}")
    elif kind == "array":
        if not isinstance(value, list):
            raise BodyError(name, "type", f"{name}: expected an array")
        lo, hi = prop.get("minItems", 0), prop.get("maxItems")
        if len(value) < lo or (hi is not None and len(value) > hi):
            keyword = "minItems" if len(value) < lo else "maxItems"
            raise BodyError(name, keyword, f"{name}: expected {lo}..{hi} items")
        for i, item in enumerate(value):
            validate(item, prop["items"], f"{name}[{i}].")
    elif not isinstance(value, bool):
        raise BodyError(name, "type", f"{name}: expected true or false")


def validate(doc: object, schema: Schema, prefix: str = "") -> dict[str, Any]:
    """``doc`` checked against a body schema (:func:`check_schema`'s subset; ``prefix`` names
    where an object inside an array sits). Raises: BodyError."""
    if not isinstance(doc, dict):
        if prefix:
            raise BodyError(prefix.rstrip("."), "type", f"{prefix.rstrip('.')}: expected an object")
        raise RequestRefused(400, "bad_json", "expected a JSON object")
    props: Schema = schema.get("properties", {})
    missing = sorted(set(schema.get("required", ())) - set(doc))
    unknown = sorted(set(doc) - set(props))
    if missing or unknown:
        raise BodyError(prefix + (missing + unknown)[0], "required" if missing else "additionalProperties",
                        f"{prefix.rstrip('.')}: missing {missing}, unknown {unknown}" if prefix
                        else f"missing {missing}, unknown {unknown}")  # fmt: skip
    for name, value in doc.items():
        _check_property(prefix + name, value, props[name])
    return doc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise RequestRefused(400, "bad_json", f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise RequestRefused(400, "bad_json", f"{name} is not JSON")


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON body, checked against the matched route's body schema.

    The ``Content-Type`` must be absent or ``application/json``; the body UTF-8 JSON without
    duplicate keys or ``NaN``/``Infinity``; then :func:`validate`. Its size is bounded by the
    app's ``client_max_size`` (413 above it).

    Raises:
        RequestRefused: 400 ``bad_content_type``, 400 ``bad_json``, 400 ``bad_fields``.
        web.HTTPRequestEntityTooLarge: the body is over ``max_body_bytes``.
    """
    schema = request.get(BODY_SCHEMA)
    if schema is None:
        raise TypeError(f"{request.method} {request.path}: the route declares no body schema")
    if hdrs.CONTENT_TYPE in request.headers and request.content_type != "application/json":
        raise RequestRefused(400, "bad_content_type", "Content-Type: expected application/json")
    raw = await request.read()
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestRefused(400, "bad_json", str(exc)) from None
    return validate(doc, schema)


def query_int(request: web.Request, name: str, *, default: int, lo: int, hi: int, code: str) -> int:
    """An integer query parameter in ``lo..hi`` (``default`` when absent).

    Raises: RequestRefused 400 ``code`` (given twice, not an integer, or out of range)."""
    values = request.query.getall(name, [])
    if not values:
        return default
    if len(values) > 1:
        raise RequestRefused(400, code, f"{name}: given more than once")
    if not _DECIMAL.fullmatch(values[0]) or not lo <= int(values[0]) <= hi:
        raise RequestRefused(400, code, f"{name}: expected an integer {lo}..{hi}")
    return int(values[0])


def parameter(
    name: str, schema: Schema, description: str, *, where: str = "query", required: bool = False
) -> Schema:
    """The OpenAPI declaration of a query (or ``where="path"``: always required) parameter."""
    required = required or where == "path"
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


def query_parameter(name: str, *, default: int, lo: int, hi: int, description: str) -> Schema:
    """The OpenAPI declaration of a :func:`query_int` parameter."""
    schema = {"type": "integer", "minimum": lo, "maximum": hi, "default": default}
    return parameter(name, schema, description)
