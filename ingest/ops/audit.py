"""The audit trail of the ops API: every state-changing call, in the ledger's own SQLite file.

:func:`audit_middleware` records every ``POST``, ``PUT``, ``PATCH`` and ``DELETE`` request, whatever
its route and whatever the answer (refusals included: 400, 401, 403, 404, 413, ...), after the
answer is decided and before it is sent. A row holds:

* ``ts_ms``: when (the service's clock, ms since the epoch);
* ``who``: the authenticated token's name, or ``-`` when no valid token was presented;
* ``method``, ``path`` (with the query string, cut to 512 characters);
* ``body_sha256`` (hex) and ``body_bytes`` of the request body, and ``body_excerpt``: its first
  256 bytes decoded as UTF-8 with replacement; all three empty/NULL when the body was over
  ``max_body_bytes`` (not read);
* ``status``: the HTTP status sent, and ``error``: the error code of a refusal (else NULL).

The table (``audit``) is created on the ledger's connection with ``CREATE TABLE IF NOT EXISTS``,
and each row is written in its own transaction after the call's own ledger transaction has
committed. A failure to write a row is logged (``ops audit write failed``) and does not change the
answer, which reflects what was already done. Rows are kept; nothing prunes them.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from ingest.feectl.sqlite_store import SqliteLedgerStore

from .errors import ERROR_CODE, Handler

__all__ = ["AUDIT", "AUDITED_METHODS", "BODY_REFUSED", "WHO", "AuditEntry", "AuditLog", "audit_middleware"]

log = logging.getLogger("amigw.ops")

AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
EXCERPT_BYTES = 256
PATH_CHARS = 512
AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER NOT NULL, who TEXT NOT NULL,
    method TEXT NOT NULL, path TEXT NOT NULL, body_sha256 TEXT, body_bytes INTEGER,
    body_excerpt TEXT, status INTEGER NOT NULL, error TEXT
);
"""
WHO = web.RequestKey("amigw.who", str)  # set by the route middleware for a valid token
BODY_REFUSED = web.RequestKey("amigw.body_refused", bool)  # the body was over max_body_bytes


@dataclass(frozen=True, slots=True)
class AuditEntry:
    ts_ms: int
    who: str
    method: str
    path: str
    body_sha256: str | None
    body_bytes: int | None
    body_excerpt: str | None
    status: int
    error: str | None
    id: int | None = None  # assigned by the ledger

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class AuditLog:
    """The ``audit`` table on the ledger's connection (created here if missing)."""

    def __init__(self, store: SqliteLedgerStore, clock: Callable[[], int]) -> None:
        self._store = store
        self.clock = clock
        store.connection.executescript(AUDIT_SCHEMA)

    def record(
        self, who: str, method: str, path: str, body: bytes | None, status: int, error: str | None
    ) -> AuditEntry:
        """Write one row (its own transaction). Raises: sqlite3.Error."""
        entry = AuditEntry(
            self.clock(),
            who,
            method,
            path[:PATH_CHARS],
            None if body is None else hashlib.sha256(body).hexdigest(),
            None if body is None else len(body),
            None if body is None else body[:EXCERPT_BYTES].decode("utf-8", "replace"),
            status,
            error,
        )
        with self._store.transaction():
            cur = self._store.connection.execute(
                "INSERT INTO audit (ts_ms, who, method, path, body_sha256, body_bytes, body_excerpt,"
                " status, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.ts_ms, who, method, entry.path, entry.body_sha256, entry.body_bytes,
                 entry.body_excerpt, status, error),
            )  # fmt: skip
        return AuditEntry(**{**asdict(entry), "id": cur.lastrowid})

    def newest(self, limit: int) -> list[AuditEntry]:
        """The newest ``limit`` rows, newest first. Raises: sqlite3.Error."""
        with self._store.transaction():
            rows = self._store.connection.execute(
                "SELECT ts_ms, who, method, path, body_sha256, body_bytes, body_excerpt, status, error,"
                " id FROM audit ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [AuditEntry(*r) for r in rows]


AUDIT: web.AppKey[AuditLog] = web.AppKey("amigw.audit")


async def _body(request: web.Request) -> bytes | None:
    """The body as read for the handler (aiohttp keeps it), or read now for a call refused before
    its body was read; None when it is over ``max_body_bytes`` (then it is never re-read: a second
    read would return the unread tail as if it were the body)."""
    if request.get(BODY_REFUSED):
        return None
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Records every state-changing call (see the module docstring). It runs outside the error
    middleware, so it sees the final status of every answer."""
    response = await handler(request)
    if request.method in AUDITED_METHODS:
        body = await _body(request)
        try:
            request.app[AUDIT].record(
                request.get(WHO, "-"), request.method, request.path_qs, body, response.status,
                request.get(ERROR_CODE),
            )  # fmt: skip
        except sqlite3.Error as exc:
            log.error(
                "ops audit write failed",
                extra={"kv": {"method": request.method, "path": request.path, "reason": exc}},
            )
    return response
