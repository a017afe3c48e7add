"""Payments, account and journal routes of the ops API (the fee-control service's seams:
:meth:`~ingest.feectl.service.FeeControlService.record_payment`, ``account_view``,
``journal_view``), called on the event loop's thread like every other use of the core.

* ``POST /v1/payments`` (roles ``payments``, ``operate``: a payment taken at a counter)
  ``{"account", "payment_id", "amount_fen"}``: exactly these keys; ids strings of 1..128
  characters; ``amount_fen`` an integer of 1..``[service.limits] max_payment_fen`` (above it:
  400 ``amount_out_of_range``, any other breach 400 ``bad_fields``). 201 recorded, 200 the same
  payment again (idempotent by ``payment_id``; ``paid_ms`` is the original's), 409
  ``payment_conflict`` (the id with another account or amount), 404 ``unknown_account``. Every
  answer past authentication is counted in ``amigw_feectl_payments_total{result}``
  (``recorded``, ``repeated`` or the error code).
* ``GET /v1/accounts/{account}`` (``read``, ``payments``): balance and state.
* ``GET /v1/accounts/{account}/journal?limit=N`` (``read``, ``payments``): the newest N journal
  rows (1..1000, default 100), oldest first.

An ``{account}`` longer than 128 characters is 400 ``bad_fields``; an unknown one 404.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from ingest.feectl.model import FeeControlError
from protocols.errors import RequestRefused

from .routing import SERVICE, BodyError, RouteTable, Schema, json_body, query_int, query_parameter

if TYPE_CHECKING:
    from ingest.feectl.service import FeeControlService

__all__ = ["MAX_ID", "payment_schema", "routes"]

routes = RouteTable("payments")
MAX_ID = 128
_ERROR_REF: Schema = {"$ref": "#/components/schemas/Error"}
_ID: Schema = {"type": "string", "minLength": 1, "maxLength": MAX_ID}
_NULLABLE_STR: Schema = {"type": "string", "nullable": True}
_DECISION: Schema = {
    "type": "object",
    "required": ["kind", "meter", "reasons", "action", "command_id"],
    "properties": {
        "kind": {"type": "string", "example": "RESTORE_ISSUED"},
        "meter": _NULLABLE_STR,
        "reasons": {"type": "array", "items": {"type": "string"}},
        "action": _NULLABLE_STR,
        "command_id": _NULLABLE_STR,
    },
}
PAYMENT_ANSWER: Schema = {
    "type": "object",
    "required": [
        "recorded", "account", "payment_id", "amount_fen", "balance_fen", "paid_ms", "decisions",
    ],
    "properties": {
        "recorded": {"type": "boolean"},
        "account": {"type": "string"},
        "payment_id": {"type": "string"},
        "amount_fen": {"type": "integer"},
        "balance_fen": {"type": "integer"},
        "paid_ms": {"type": "integer"},
        "decisions": {"type": "array", "items": _DECISION},
    },
}  # fmt: skip
_METER_VIEW: Schema = {
    "type": "object",
    "properties": {
        "meter": {"type": "string"},
        "gateway": {"type": "string"},
        "remote": {"type": "boolean"},
        "relay": {"type": "string"},
        "outstanding": _NULLABLE_STR,
        "blocked": _NULLABLE_STR,
    },
}
ACCOUNT_VIEW: Schema = {
    "type": "object",
    "required": ["account", "balance_fen", "actual_balance_fen", "level", "meters"],
    "properties": {
        "account": {"type": "string"},
        "tariff": {"type": "string"},
        "protected": {"type": "boolean"},
        "customer_class": {"type": "string"},
        "balance_fen": {"type": "integer"},
        "actual_balance_fen": {"type": "integer"},
        "level": {"type": "string"},
        "notice_ms": {"type": "integer", "nullable": True},
        "holds": {"type": "array", "items": {"type": "string"}},
        "meters": {"type": "array", "items": _METER_VIEW},
    },
}
JOURNAL: Schema = {
    "type": "object",
    "required": ["account", "entries"],
    "properties": {
        "account": {"type": "string"},
        "entries": {
            "type": "array",
            "items": {
                "type": "object",
                "description": "a journal row: seq, ts_ms, kind, amount_fen, ref, meter, ...",
                "properties": {"seq": {"type": "integer"}, "kind": {"type": "string"}},
            },
        },
    },
}
_ACCOUNT_PARAM: Schema = {"name": "account", "in": "path", "required": True, "schema": _ID}


def payment_schema(service: FeeControlService) -> Schema:
    """The request body of ``POST /v1/payments``; its maximum is ``[service.limits]``'s."""
    amount = {"type": "integer", "minimum": 1, "maximum": service.cfg.service.limits.max_payment_fen}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["account", "payment_id", "amount_fen"],
        "properties": {"account": _ID, "payment_id": _ID, "amount_fen": amount},
    }


@routes.route(
    "POST",
    "/v1/payments",
    roles={"payments", "operate"},
    summary="Record a payment (idempotent by payment_id)",
    body=payment_schema,
    responses={
        201: ("Recorded", PAYMENT_ANSWER),
        200: ("The same payment again: not recorded twice", PAYMENT_ANSWER),
        409: ("payment_conflict: the id was used with another account or amount", _ERROR_REF),
    },
)
async def post_payment(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        res, paid_ms = service.record_payment(*await _payment_fields(request, service))
    except RequestRefused as exc:
        service.metrics.payments.labels(exc.code).inc()
        raise
    except FeeControlError as exc:
        service.metrics.payments.labels(exc.reason).inc()
        raise
    body = {
        "recorded": res.recorded,
        "account": res.account_id,
        "payment_id": res.ref,
        "amount_fen": res.amount_fen,
        "balance_fen": res.balance_fen,
        "paid_ms": paid_ms,
        "decisions": [
            {
                "kind": d.kind.value,
                "meter": d.meter,
                "reasons": list(d.reasons),
                "action": None if d.action is None else d.action.value,
                "command_id": d.command_id,
            }
            for d in res.decisions
        ],
    }
    return web.json_response(body, status=201 if res.recorded else 200)


async def _payment_fields(request: web.Request, service: FeeControlService) -> tuple[str, str, int]:
    try:
        doc = await json_body(request)
    except BodyError as exc:
        if exc.field == "amount_fen" and exc.keyword == "maximum":
            top = service.cfg.service.limits.max_payment_fen
            detail = f"amount_fen: at most {top} fen in one payment"
            raise RequestRefused(400, "amount_out_of_range", detail) from None
        raise
    return doc["account"], doc["payment_id"], doc["amount_fen"]


def _account(request: web.Request) -> str:
    account = request.match_info["account"]
    if len(account) > MAX_ID:
        raise RequestRefused(400, "bad_fields", f"account: at most {MAX_ID} characters")
    return account


@routes.route(
    "GET",
    "/v1/accounts/{account}",
    roles={"read", "payments"},
    summary="An account's balance and state",
    parameters=[_ACCOUNT_PARAM],
    responses={200: ("The account", ACCOUNT_VIEW)},
)
async def get_account(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].account_view(_account(request)))


@routes.route(
    "GET",
    "/v1/accounts/{account}/journal",
    roles={"read", "payments"},
    summary="The newest journal rows of an account, oldest first",
    parameters=[
        _ACCOUNT_PARAM,
        query_parameter("limit", default=100, lo=1, hi=1000, description="how many rows"),
    ],
    responses={200: ("The rows", JOURNAL)},
)
async def get_journal(request: web.Request) -> web.Response:
    account = _account(request)
    limit = query_int(request, "limit", default=100, lo=1, hi=1000, code="bad_limit")
    rows: list[dict[str, Any]] = request.app[SERVICE].journal_view(account, limit)
    return web.json_response({"account": account, "entries": rows})
