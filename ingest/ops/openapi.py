"""The OpenAPI 3.0 document of the ops API, built from the route tables (served at
``GET /v1/openapi.json``, no token).

:func:`openapi_document` lists every :class:`~.routing.Operation`: its parameters (path
parameters not declared by the route are added as strings of 1..128 characters), its request body
schema (the very schema :func:`~.routing.json_body` checks), its success answers, and the error
answers that follow from its declaration: 400 for any protected route or one with a body or
parameters, 401 and 403 for a protected route, 404 for a route with path parameters, 413 for one
with a body, and ``default`` for the rest (500 ``internal_error``, 503 ``ledger_unavailable``).
Protected routes carry the ``bearer`` security scheme and ``x-amigw-roles``, the roles they admit
(a token whose role grants one of them may call it; ``admin`` grants every role).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .auth import ROLES
from .routing import Operation, Schema

if TYPE_CHECKING:
    from ingest.feectl.service import FeeControlService

__all__ = ["ERROR_SCHEMA", "OPENAPI_VERSION", "openapi_document"]

OPENAPI_VERSION = "3.0.3"
API_VERSION = "1"
ERROR_SCHEMA: Schema = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "a stable code, e.g. unknown_account"},
        "detail": {"type": "string"},
    },
}
_ERRORS = {
    400: "Refused: a malformed request (bad_header, bad_json, bad_fields, bad_limit, ...)",
    401: "No valid bearer token (WWW-Authenticate: Bearer)",
    403: "The token's role does not admit this route (forbidden)",
    404: "Not found (not_found, unknown_account)",
    413: "The body is over max_body_bytes (body_too_large)",
}
_PATH_PARAM = re.compile(r"\{(\w+)\}")


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _parameters(op: Operation) -> list[dict[str, Any]]:
    params = [dict(p) for p in op.parameters]
    declared = {p["name"] for p in params if p.get("in") == "path"}
    for name in _PATH_PARAM.findall(op.path):
        if name not in declared:
            schema = {"type": "string", "minLength": 1, "maxLength": 128}
            params.append({"name": name, "in": "path", "required": True, "schema": schema})
    return params


def _operation(op: Operation, service: FeeControlService) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag]}
    if op.description:
        out["description"] = op.description
    params = _parameters(op)
    if params:
        out["parameters"] = params
    body = op.body_schema(service)
    if body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": dict(body)}}}
    responses: dict[str, Any] = {}
    for status, (description, schema) in (op.responses or {200: ("OK", None)}).items():
        responses[str(status)] = {"description": description}
        if schema is not None:
            responses[str(status)]["content"] = {op.content_type: {"schema": dict(schema)}}
    errors = set()
    if op.roles is not None:
        errors |= {400, 401, 403}
        out["security"] = [{"bearer": []}]
        out["x-amigw-roles"] = sorted(op.roles, key=ROLES.index)
    else:
        out["security"] = []
    if body is not None:
        errors |= {400, 413}
    if params:
        errors.add(400)
    if any(p.get("in") == "path" for p in params):
        errors.add(404)
    for status in sorted(errors):
        responses.setdefault(str(status), _error(_ERRORS[status]))
    responses["default"] = _error("Failure: internal_error (500) or ledger_unavailable (503)")
    out["responses"] = responses
    return out


def openapi_document(operations: Sequence[Operation], service: FeeControlService) -> dict[str, Any]:
    """The whole document for these routes (body schemas computed from ``service``)."""
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, service)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "amigw ops API",
            "version": API_VERSION,
            "description": "Operators' and billing's API of the fee-control service (docs/ops-api.md).",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": dict(ERROR_SCHEMA)},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
