"""Fee-control operations over the ops API (:mod:`ingest.feectl.operations`): enrolment by a
CIS, operators' relay commands, holds, adjustments, and the lists and statements they read.

Every route calls one operation on the event loop's thread; its decisions are applied by the
service at once (commands sent, notifications queued). The caller's token name is the ``by`` of
each change, so the journal and the audit trail name the same person. Routes and their roles:
``docs/ops-api.md``; the operations' rules and reason codes: ``docs/feectl.md#operations``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ingest.feectl import operations as ops
from ingest.feectl.operations import ID_MAX, LIMIT_MAX, TEXT_MAX
from protocols.errors import BadArgument

from .audit import WHO
from .auth import Role
from .routing import SERVICE, RouteTable, Schema, json_body, parameter

__all__ = ["routes"]

routes = RouteTable("fee control")
_READ: tuple[Role, ...] = ("read",)
_OPERATE: tuple[Role, ...] = ("operate",)
_BILLING: tuple[Role, ...] = ("read", "payments")
_ANSWER: Schema = {"type": "object"}
_ID: Schema = {"type": "string", "minLength": 1, "maxLength": ID_MAX}
_TEXT: Schema = {"type": "string", "minLength": 1, "maxLength": TEXT_MAX}
_MS: Schema = {"type": "integer", "minimum": 0, "maximum": 2**53}


def _now(request: web.Request) -> int:
    """The service's clock (the one its ledger stamps everything with)."""
    return int(request.app[SERVICE].clock())


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", "100")
    if not text.isdigit() or not 1 <= int(text) <= LIMIT_MAX:
        raise BadArgument("limit", f"expected an integer 1..{LIMIT_MAX}")
    return int(text)


_LIMIT = parameter(
    "limit", {"type": "integer", "minimum": 1, "maximum": LIMIT_MAX, "default": 100}, "at most"
)
_STATE: Schema = {"type": "string", "minLength": 1, "maxLength": 16}
_ACCOUNT = parameter("account_id", _ID, "account id", where="path")
_COMMAND = parameter("command_id", _ID, "command id", where="path")


def _json(answer: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(answer, status=status)


# -- enrolment (a CIS) ---------------------------------------------------------------------------
_METER: Schema = {
    "type": "object",
    "properties": {
        "meter": _ID,
        "gateway": _ID,
        "remote": {"type": "boolean"},
        "max_power_w": {"type": "integer", "minimum": 1, "maximum": 10**9},
    },
    "required": ["meter", "gateway", "remote"],
    "additionalProperties": False,
}
_ENROLMENT: Schema = {
    "type": "object",
    "properties": {
        "account_id": _ID,
        "tariff": _ID,
        "protected": {"type": "boolean"},
        "customer_class": _ID,
        "meters": {"type": "array", "items": _METER, "minItems": 1, "maxItems": LIMIT_MAX},
        "opening_balance_fen": {"type": "integer", "minimum": 0, "maximum": 10**12},
    },
    "required": ["account_id", "tariff", "protected", "customer_class", "meters"],
    "additionalProperties": False,
}


@routes.route(
    "POST", "/v1/accounts", roles=("enrol",), body=_ENROLMENT,
    summary="Enrol an account or change it (the whole definition; effective at once)",
    description="Meters left out are removed; opening_balance_fen is posted once, at creation.",
    responses={201: ("Created", _ANSWER), 200: ("Changed, or the same definition again", _ANSWER)},
)  # fmt: skip
async def enrol(request: web.Request) -> web.Response:
    doc = await json_body(request)
    answer = ops.enrol_account(request.app[SERVICE], doc, request[WHO], _now(request))
    return _json(answer, 201 if answer["created"] else 200)


# -- relay commands (operators) --------------------------------------------------------------------
_RELAY: Schema = {
    "type": "object",
    "properties": {
        "action": {"type": "string", "minLength": 4, "maxLength": 7, "description": "trip or restore"},
        "reason": _TEXT,
        "force": {"type": "boolean", "description": "trip a protected account's meter"},
    },
    "required": ["action", "reason"],
    "additionalProperties": False,
}


@routes.route(
    "POST", "/v1/meters/{meter}/relay", roles=_OPERATE, body=_RELAY,
    summary="A manual trip or restore, signed and sent through the same path as fee control's",
    parameters=[parameter("meter", _ID, "meter id", where="path")],
    responses={201: ("The command, issued", _ANSWER)},
)  # fmt: skip
async def relay(request: web.Request) -> web.Response:
    doc = await json_body(request)
    answer = ops.manual_command(
        request.app[SERVICE], request.match_info["meter"], doc["action"], request[WHO], doc["reason"],
        _now(request), force=doc.get("force", False),
    )  # fmt: skip
    return _json(answer, 201)


@routes.route(
    "POST", "/v1/meters/{meter}/reset", roles=_OPERATE,
    summary="Forget a meter's relay failures after a site visit (FC-12)",
    parameters=[parameter("meter", _ID, "meter id", where="path")], responses={200: ("Reset", _ANSWER)},
)  # fmt: skip
async def reset(request: web.Request) -> web.Response:
    return _json(
        ops.reset_meter(request.app[SERVICE], request.match_info["meter"], request[WHO], _now(request))
    )


@routes.route(
    "GET", "/v1/commands", roles=_READ, summary="Relay command history, newest first",
    parameters=[
        parameter("account", _ID, "only this account's"),
        parameter("meter", _ID, "only this meter's"),
        parameter("state", _STATE, "only commands in this state"),
        _LIMIT,
    ],
    responses={200: ("The commands", _ANSWER)},
)  # fmt: skip
async def command_list(request: web.Request) -> web.Response:
    q = request.query
    states = None if "state" not in q else [q["state"]]
    answer = ops.commands(request.app[SERVICE], q.get("account"), q.get("meter"), states, _limit(request))
    return _json(answer)


@routes.route(
    "GET", "/v1/commands/{command_id}", roles=_READ, summary="One relay command",
    parameters=[_COMMAND], responses={200: ("The command", _ANSWER)},
)  # fmt: skip
async def command_one(request: web.Request) -> web.Response:
    return _json(ops.command(request.app[SERVICE], request.match_info["command_id"]))


# -- holds, decisions, adjustments, statements -----------------------------------------------------
_HOLD: Schema = {
    "type": "object",
    "properties": {"reason": _TEXT, "meter": _ID, "until_ms": _MS},
    "required": ["reason"],
    "additionalProperties": False,
}
_RELEASE: Schema = {"type": "object", "properties": {"meter": _ID}, "additionalProperties": False}


@routes.route(
    "GET", "/v1/accounts/{account_id}/holds", roles=_READ, summary="An account's holds on trips",
    parameters=[_ACCOUNT], responses={200: ("The holds", _ANSWER)},
)  # fmt: skip
async def hold_list(request: web.Request) -> web.Response:
    return _json(ops.holds(request.app[SERVICE], request.match_info["account_id"]))


@routes.route(
    "POST", "/v1/accounts/{account_id}/holds", roles=_OPERATE, body=_HOLD,
    summary="Hold an account's (or one meter's) trips, until a time or until released",
    parameters=[_ACCOUNT], responses={200: ("The holds", _ANSWER)},
)  # fmt: skip
async def hold_add(request: web.Request) -> web.Response:
    doc = await json_body(request)
    answer = ops.add_hold(
        request.app[SERVICE], request.match_info["account_id"], doc["reason"], request[WHO], _now(request),
        meter=doc.get("meter"), until_ms=doc.get("until_ms"),
    )  # fmt: skip
    return _json(answer)


@routes.route(
    "POST", "/v1/accounts/{account_id}/holds/release", roles=_OPERATE, body=_RELEASE,
    summary="Release an account's holds (or one meter's)",
    parameters=[_ACCOUNT], responses={200: ("Released", _ANSWER)},
)  # fmt: skip
async def hold_release(request: web.Request) -> web.Response:
    doc = await json_body(request)
    answer = ops.release_holds(
        request.app[SERVICE],
        request.match_info["account_id"],
        request[WHO],
        _now(request),
        meter=doc.get("meter"),
    )
    return _json(answer)


@routes.route(
    "GET", "/v1/accounts/{account_id}/decisions", roles=_READ,
    summary="An account's decisions (notices, trips, restores, deferrals), oldest first",
    parameters=[_ACCOUNT, _LIMIT], responses={200: ("The decisions", _ANSWER)},
)  # fmt: skip
async def decision_list(request: web.Request) -> web.Response:
    return _json(ops.decisions(request.app[SERVICE], request.match_info["account_id"], _limit(request)))


_ADJUSTMENT: Schema = {
    "type": "object",
    "properties": {
        "adjustment_id": _ID,
        "amount_fen": {"type": "integer", "minimum": -(10**12), "maximum": 10**12, "description": "signed"},
        "reason": _TEXT,
    },
    "required": ["adjustment_id", "amount_fen", "reason"],
    "additionalProperties": False,
}


@routes.route(
    "POST", "/v1/accounts/{account_id}/adjustments", roles=("payments",), body=_ADJUSTMENT,
    summary="A signed adjustment of the balance (idempotent by adjustment_id)",
    parameters=[_ACCOUNT],
    responses={201: ("Recorded", _ANSWER), 200: ("The same adjustment again", _ANSWER)},
)  # fmt: skip
async def adjustment(request: web.Request) -> web.Response:
    doc = await json_body(request)
    answer = ops.record_adjustment(
        request.app[SERVICE], request.match_info["account_id"], doc["adjustment_id"], doc["amount_fen"],
        doc["reason"], request[WHO], _now(request),
    )  # fmt: skip
    return _json(answer, 201 if answer["recorded"] else 200)


@routes.route(
    "GET", "/v1/accounts/{account_id}/statement", roles=_BILLING,
    summary="An account's statement per local day: charges, payments, adjustments, balances",
    parameters=[
        _ACCOUNT,
        parameter("from", {"type": "string", "format": "date"}, "first local day", required=True),
        parameter("to", {"type": "string", "format": "date"}, "last local day (<= 366 days)", required=True),
    ],
    responses={200: ("The statement", _ANSWER)},
)  # fmt: skip
async def statement(request: web.Request) -> web.Response:
    q = request.query
    if "from" not in q or "to" not in q:
        raise BadArgument("from" if "from" not in q else "to", "required (YYYY-MM-DD)")
    return _json(ops.statement(request.app[SERVICE], request.match_info["account_id"], q["from"], q["to"]))


@routes.route(
    "GET", "/v1/rejects", roles=_READ, summary="Messages and intervals fee control rejected, newest first",
    parameters=[_LIMIT], responses={200: ("The rejects", _ANSWER)},
)  # fmt: skip
async def reject_list(request: web.Request) -> web.Response:
    return _json(ops.rejects(request.app[SERVICE], _limit(request)))


_OUTAGE: Schema = {
    "type": "object",
    "properties": {"area": _ID, "start_ms": _MS, "end_ms": _MS, "reason": _TEXT},
    "required": ["area", "start_ms", "end_ms", "reason"],
    "additionalProperties": False,
}


@routes.route(
    "POST", "/v1/outages", roles=_OPERATE, body=_OUTAGE,
    summary="Announce a planned outage of a transformer area to the customers supplied from it",
    responses={201: ("Announced", _ANSWER), 200: ("Announced before: nothing sent again", _ANSWER)},
)  # fmt: skip
async def outage(request: web.Request) -> web.Response:
    doc = await json_body(request)
    try:
        notice = request.app[SERVICE].announce_outage(
            doc["area"], doc["start_ms"], doc["end_ms"], doc["reason"], request[WHO]
        )
    except ValueError as exc:
        param, _, reason = str(exc).partition(": ")
        raise BadArgument(param, reason) from None
    answer = {"area": notice.area, "start_ms": notice.start_ms, "end_ms": notice.end_ms,
              "accounts": list(notice.accounts), "announced": notice.announced}  # fmt: skip
    return _json(answer, 201 if notice.announced else 200)
