"""Error answers of the ops API: always JSON ``{"error": <code>, "detail": <text>}``.

:class:`RequestRefused` is what a handler raises to refuse a request. :func:`error_middleware` turns
it, aiohttp's own :class:`~aiohttp.web.HTTPException` (404, 405, 413, ...), the fee-control
core's :class:`~ingest.feectl.model.FeeControlError` and anything unexpected into that body:

* ``FeeControlError``: ``unknown_account`` 404, ``payment_conflict`` 409, any other reason 400;
  the reason is the code.
* ``sqlite3.Error``: 503 ``ledger_unavailable`` (logged).
* any other exception: 500 ``internal_error`` (logged with its traceback; the detail is empty).

A 401 carries ``WWW-Authenticate: Bearer realm="amigw"``. The code of every error answer is put
on the request (:data:`ERROR_CODE`) for the audit trail. Requests that aiohttp's HTTP parser
refuses (malformed framing) never reach a middleware: aiohttp answers those itself with a
plain-text 400.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from ingest.feectl.model import FeeControlError
from protocols.errors import RequestRefused, SinkError

__all__ = ["ERROR_CODE", "WWW_AUTHENTICATE", "error_middleware", "error_response"]

log = logging.getLogger("amigw.ops")

WWW_AUTHENTICATE = 'Bearer realm="amigw"'
ERROR_CODE = web.RequestKey("amigw.error_code", str)
_FEECTL_STATUS = {"unknown_account": 404, "unknown_meter": 404, "unknown_command": 404, "unknown_area": 404}
# aiohttp's exceptions, by status, as our codes (others: the reason phrase in snake case).
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The JSON error answer (with ``WWW-Authenticate`` on a 401)."""
    extra = dict(headers or {})
    if status == 401:
        extra["WWW-Authenticate"] = WWW_AUTHENTICATE
    return web.json_response({"error": code, "detail": detail}, status=status, headers=extra)


def _kv(**fields: object) -> dict[str, dict[str, object]]:
    """The key=value log layout's fields (as :mod:`ingest.feectl`'s log lines)."""
    return {"kv": fields}


def _http_code(exc: web.HTTPException) -> str:
    return _HTTP_CODES.get(exc.status, exc.reason.lower().replace(" ", "_").replace("-", "_"))


def _as_error(request: web.Request, exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    if isinstance(exc, RequestRefused):
        return exc.status, exc.code, exc.detail, {}
    if isinstance(exc, web.HTTPException):
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        detail = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else request.path
        return exc.status, _http_code(exc), detail, headers
    if isinstance(exc, FeeControlError):
        status = 409 if exc.reason.endswith("_conflict") else _FEECTL_STATUS.get(exc.reason, 400)
        return status, exc.reason, exc.detail or exc.subject, {}
    if isinstance(exc, SinkError):
        log.error("ops store error", extra=_kv(method=request.method, path=request.path, reason=exc))
        return 503, "store_unavailable", str(exc), {}
    if isinstance(exc, sqlite3.Error):
        log.error("ops ledger error", extra=_kv(method=request.method, path=request.path, reason=exc))
        return 503, "ledger_unavailable", str(exc), {}
    log.error("ops handler failed", exc_info=exc, extra=_kv(method=request.method, path=request.path))
    return 500, "internal_error", "", {}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal and failure below it becomes a JSON error answer."""
    try:
        response = await handler(request)
    except Exception as exc:  # the server must answer, whatever the bug
        if isinstance(exc, web.HTTPException) and exc.status < 400:
            raise  # a redirect or success raised as an exception is not an error
        status, code, detail, headers = _as_error(request, exc)
        request[ERROR_CODE] = code
        return error_response(status, code, detail, headers)
    return response
