"""The payments HTTP API of the fee-control service: a small HTTP/1.1 server on asyncio streams.

Standard library only. One request per connection (``Connection: close``), JSON in and out,
bodies up to ``max_body_bytes`` with a ``Content-Length`` (no chunked uploads). Every route but
``/healthz`` needs ``Authorization: Bearer <token>``, compared in constant time; anything else
is 401. Routes (documented with examples in ``docs/feectl.md``):

* ``POST /v1/payments`` ``{"account", "payment_id", "amount_fen"}`` → 201 recorded, 200 the same
  payment again (idempotent by ``payment_id``), 409 the id used with another account or amount,
  404 unknown account, 400 bad JSON or fields, 400 ``amount_out_of_range`` above
  ``[service.limits] max_payment_fen``; each answer is counted in ``amigw_feectl_payments_total``.
  The core re-evaluates the account in the payment's transaction; a restore command it decides
  is sent at once, not at the next tick.
* ``GET /v1/accounts/{id}`` → balance and state; ``GET /v1/accounts/{id}/journal?limit=N``
  → the newest N journal rows (default 100, at most 1000), oldest first; 404 unknown account.
* ``GET /healthz`` → 200 with counters (no token: it reveals no account data).

Errors are ``{"error": <code>, "detail": <text>}``. The handler never raises into asyncio: a
ledger failure is 503, a bug is 500 and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import sqlite3
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._log import kv
from .model import FeeControlError

if TYPE_CHECKING:
    from .service import FeeControlService

__all__ = ["HttpError", "PaymentsApi"]

log = logging.getLogger("amigw.feectl.api")

_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_MAX_HEADER_BYTES = 16_384
_READ_TIMEOUT_S = 10.0
_MAX_ID = 128
_PAYMENT_KEYS = frozenset({"account", "payment_id", "amount_fen"})


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


class HttpError(Exception):
    """An error response: ``status`` and the ``{"error", "detail"}`` body."""

    def __init__(self, status: int, error: str, detail: str = "") -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


class PaymentsApi:
    """Serves the routes above for one :class:`~.service.FeeControlService`."""

    def __init__(self, service: FeeControlService, token: str, *, max_body_bytes: int = 65_536) -> None:
        if len(token) < 16:
            raise ValueError("token: at least 16 characters")
        self.service = service
        self._token = token.encode()
        self._max_body = max_body_bytes

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        """Listen (port 0: any free port; read it back from ``server.sockets``)."""
        return await asyncio.start_server(self._serve, host, port, limit=_MAX_HEADER_BYTES)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT_S):
                    status, body = await self._respond(reader)
            except HttpError as exc:
                status, body = exc.status, {"error": exc.error, "detail": exc.detail}
            except TimeoutError:
                status, body = 400, {"error": "timeout", "detail": "request not received in time"}
            writer.write(_response(status, body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, Any]:
        req = await self._read(reader)
        try:
            return self._route(req)
        except HttpError:
            raise
        except FeeControlError as exc:
            status = {"unknown_account": 404, "payment_conflict": 409}.get(exc.reason, 400)
            raise HttpError(status, exc.reason, exc.detail or exc.subject) from None
        except sqlite3.Error as exc:
            log.error("http ledger error", extra=kv(path=req.path, reason=exc))
            raise HttpError(503, "ledger_unavailable", str(exc)) from None
        except Exception:  # the server must answer, whatever the bug
            log.exception("http handler failed", extra=kv(method=req.method, path=req.path))
            raise HttpError(500, "internal_error") from None

    async def _read(self, reader: asyncio.StreamReader) -> Request:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise HttpError(413, "headers_too_large") from None
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpError(400, "bad_request_line", lines[0][:100])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(400, "bad_header", line[:100])
            headers[name.strip().lower()] = value.strip()
        url = urllib.parse.urlsplit(parts[1])
        body = b""
        if "transfer-encoding" in headers:
            raise HttpError(411, "length_required", "chunked bodies are not accepted")
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise HttpError(400, "bad_header", "content-length") from None
            if length < 0 or length > self._max_body:
                raise HttpError(413, "body_too_large", f"at most {self._max_body} bytes")
            body = await reader.readexactly(length)
        return Request(parts[0], url.path, urllib.parse.parse_qs(url.query), headers, body)

    def _authorized(self, req: Request) -> bool:
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        # compare_digest on bytes: constant time whatever the token's content or length.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._token)

    def _route(self, req: Request) -> tuple[int, Any]:
        segs = [urllib.parse.unquote(s) for s in req.path.strip("/").split("/")]
        if segs == ["healthz"]:
            _method(req, "GET")
            return 200, self.service.health()
        if not self._authorized(req):
            raise HttpError(401, "unauthorized", "Authorization: Bearer <token> required")
        if segs == ["v1", "payments"]:
            _method(req, "POST")
            return self._payment(req)
        if len(segs) in (3, 4) and segs[:2] == ["v1", "accounts"] and segs[2]:
            _method(req, "GET")
            if len(segs) == 3:
                return 200, self.service.account_view(segs[2])
            if segs[3] == "journal":
                limit = _limit(req.query.get("limit", ["100"])[-1])
                rows = self.service.journal_view(segs[2], limit)
                return 200, {"account": segs[2], "entries": rows}
        raise HttpError(404, "not_found", req.path)

    def _payment(self, req: Request) -> tuple[int, Any]:
        """Counts each refusal by its error code (the service counts recorded and repeated)."""
        try:
            account, payment_id, amount = _payment_fields(
                req.body, self.service.cfg.service.limits.max_payment_fen
            )
            res, paid_ms = self.service.record_payment(account, payment_id, amount)
        except HttpError as exc:
            self.service.metrics.payments.labels(exc.error).inc()
            raise
        except FeeControlError as exc:
            self.service.metrics.payments.labels(exc.reason).inc()
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
        return (201 if res.recorded else 200), body


def _method(req: Request, allowed: str) -> None:
    if req.method != allowed:
        raise HttpError(405, "method_not_allowed", f"use {allowed}")


def _limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        raise HttpError(400, "bad_limit", "limit: expected an integer") from None
    if not 1 <= limit <= 1000:
        raise HttpError(400, "bad_limit", "limit: expected 1..1000")
    return limit


def _payment_fields(body: bytes, max_amount_fen: int) -> tuple[str, str, int]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise HttpError(400, "bad_json", str(exc)) from None
    if not isinstance(doc, dict):
        raise HttpError(400, "bad_json", "expected a JSON object")
    missing = sorted(_PAYMENT_KEYS - set(doc))
    unknown = sorted(set(doc) - _PAYMENT_KEYS)
    if missing or unknown:
        raise HttpError(400, "bad_fields", f"missing {missing}, unknown {unknown}")
    for name in ("account", "payment_id"):
        value = doc[name]
        if not isinstance(value, str) or not 0 < len(value) <= _MAX_ID:
            raise HttpError(400, "bad_fields", f"{name}: expected a non-empty string of at most {_MAX_ID}")
    amount = doc["amount_fen"]
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise HttpError(400, "bad_fields", "amount_fen: expected a positive integer (fen)")
    if amount > max_amount_fen:
        raise HttpError(
            400, "amount_out_of_range", f"amount_fen: at most {max_amount_fen} fen in one payment"
        )
    return doc["account"], doc["payment_id"], amount


def _response(status: int, body: Any) -> bytes:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(data)}",
        "Connection: close",
    ]
    if status == 401:
        head.append('WWW-Authenticate: Bearer realm="amigw-feectl"')
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data
