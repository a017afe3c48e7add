"""The head-end's state database: one machine's SQLite file, or PostgreSQL shared by every machine.

The stores of :mod:`ingest.pipeline` (dedup marks and owed rollups, the loss account, the run
state, the dead letters) each own their tables and their contract; this module owns only *where*
the tables live and how a statement reaches them:

* ``[state] url = ""`` (the default): each store is a SQLite file (WAL) named by its own ``path``
  key, shared by the worker processes of one machine through SQLite's single-writer lock.
* ``[state] url = "postgresql://user:password@host:port/database"``: every store lives in that
  PostgreSQL database, shared by every worker on every machine (``docs/shared-state.md``).

Contract
--------
* :class:`StateDb` runs the stores' statements on either engine. DML is written once, in the
  subset both engines run (``INSERT ... ON CONFLICT ... DO UPDATE``/``DO NOTHING``, SQLite 3.24+
  and PostgreSQL 9.5+; no ``INSERT OR REPLACE``, no ``TOTAL``), with ``?`` placeholders, which
  the PostgreSQL connection passes to psycopg as ``%s`` (the driver's placeholder; nothing else
  in a statement is rewritten). DDL is per engine: each store keeps a schema for each.
* :meth:`StateDb.transaction` is one write transaction. On SQLite it is ``BEGIN IMMEDIATE``: the
  file's write lock is held from the start, so transactions of all processes are serialised and
  a store's read-then-write is safe. PostgreSQL runs transactions concurrently (READ COMMITTED),
  so a store whose transaction reads before it writes takes :meth:`StateDb.lock` first: an
  advisory lock held to the end of the transaction, named by the store and, where the invariant
  is per gateway, the gateway. On SQLite :meth:`lock` does nothing (the write lock is already
  held). :attr:`StateDb.skip_locked` is the clause a claim appends to its ``SELECT`` so that
  concurrent claimers on PostgreSQL each take rows nobody else holds (empty on SQLite).
* A PostgreSQL connection that cannot be made, is lost, or whose transaction the server aborts
  (deadlock, shutdown) raises :class:`~protocols.errors.StateUnavailable`; the transaction was
  rolled back, nothing of it is kept, and the next call connects again. The caller retries (the
  worker keeps the batch unacknowledged). SQLite errors (``sqlite3.Error``) pass unchanged.
* Thread safety is the store's: one :class:`StateDb` is one connection, used under the store's
  lock.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from protocols.errors import ConfigError, StateUnavailable

__all__ = ["Rows", "StateConfig", "StateDb", "check_url", "redact"]

log = logging.getLogger(__name__)

_SCHEMES = ("postgresql", "postgres")


class Rows(Protocol):
    """What a statement returns, on either engine (a DB-API cursor)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


@dataclass(frozen=True, slots=True)
class StateConfig:
    """The ``[state]`` section: where the head-end's shared state lives (see the module docs)."""

    url: str = ""
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.url:
            check_url(self.url)
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s: expected > 0, got {self.connect_timeout_s}")

    @property
    def shared(self) -> bool:
        """Whether the state lives in PostgreSQL (shared by every machine)."""
        return bool(self.url)


def check_url(url: str) -> None:
    """Raises: ValueError (``"url: ..."``) when ``url`` is not a ``postgresql://`` URL with a
    host and a database."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"url: expected postgresql://user:password@host:port/database, got scheme {parts.scheme!r}"
        )
    if not parts.hostname:
        raise ValueError("url: no host (postgresql://user:password@host:port/database)")
    if not parts.path.strip("/"):
        raise ValueError("url: no database (postgresql://user:password@host:port/database)")
    try:
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise ValueError(f"url: bad port in {redact(url)!r}") from None


def redact(url: str) -> str:
    """``url`` without its password, for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """The statement with psycopg's placeholder (``%s``; a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


SQLITE_OPEN_TIMEOUT_S = 30.0


def _open_sqlite(path: Path, synchronous: str) -> sqlite3.Connection:
    """The SQLite file in WAL mode. Switching a new file to WAL takes an exclusive lock that the
    busy handler does not wait for: workers opening a new file at the same moment get "database
    is locked", so the switch is retried (for up to the connection's busy timeout)."""
    deadline = time.monotonic() + SQLITE_OPEN_TIMEOUT_S
    db = sqlite3.connect(path, timeout=SQLITE_OPEN_TIMEOUT_S, check_same_thread=False, isolation_level=None)
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                db.close()
                raise
            time.sleep(0.02)
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


class StateDb:
    """One connection to the state database: the SQLite file ``path`` when ``url`` is empty,
    else the PostgreSQL database ``url`` (see the module contract)."""

    def __init__(
        self,
        path: str | Path,
        *,
        url: str = "",
        synchronous: str = "NORMAL",
        connect_timeout_s: float = 5.0,
        application: str = "amigw-ingest",
    ) -> None:
        self.url = url
        self.path = Path(path)
        self.dialect = "postgresql" if url else "sqlite"
        self.skip_locked = " FOR UPDATE SKIP LOCKED" if url else ""
        self._timeout_s = connect_timeout_s
        self._application = application
        self._pg: Any = None
        self._sqlite: sqlite3.Connection | None = None
        if url:
            check_url(url)
            self._connect_pg()
        else:
            self._sqlite = _open_sqlite(self.path, synchronous)

    @property
    def where(self) -> str:
        """The database, for logs: the file, or the URL without its password."""
        return redact(self.url) if self.url else str(self.path)

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            self._pg.close()
            self._pg = None

    # -- statements --------------------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        """Run one statement (``?`` placeholders). Raises: StateUnavailable (PostgreSQL)."""
        if self._sqlite is not None:
            return self._sqlite.execute(sql, params)
        with self._pg_errors():
            cur = self._connect_pg().cursor()
            cur.execute(_pg_sql(sql), params if params else None)
            rows: Rows = cur
            return rows

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run one statement per row; returns the rows changed in all. Raises: StateUnavailable."""
        if self._sqlite is not None:
            before = self._sqlite.total_changes
            self._sqlite.executemany(sql, rows)
            return self._sqlite.total_changes - before
        changed = 0
        with self._pg_errors():
            cur = self._connect_pg().cursor()
            for row in rows:  # one statement each: rowcount is exact, and no batch is half-sent
                cur.execute(_pg_sql(sql), row)
                changed += max(cur.rowcount, 0)
        return changed

    def script(self, sqlite_ddl: str, postgresql_ddl: str) -> None:
        """Create the store's tables (the DDL of this engine), in one transaction; on PostgreSQL
        under an advisory lock, so workers starting together do not race on the catalogue."""
        if self._sqlite is not None:
            self._sqlite.executescript(sqlite_ddl)
            return
        with self.transaction():
            self.lock("schema")
            with self._pg_errors():
                self._connect_pg().execute(postgresql_ddl)

    def table_exists(self, name: str) -> bool:
        if self._sqlite is not None:
            sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        else:
            sql = (
                "SELECT 1 FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_name = ?"
            )
        return self.execute(sql, (name,)).fetchone() is not None

    @contextmanager
    def transaction(self) -> Iterator[StateDb]:
        """One write transaction (see the module contract); rolled back on any error.

        Raises: StateUnavailable (PostgreSQL: the transaction is lost, nothing of it kept)."""
        if self._sqlite is not None:
            self._sqlite.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._sqlite.execute("ROLLBACK")
                raise
            self._sqlite.execute("COMMIT")
            return
        with self._pg_errors(), self._connect_pg().transaction():
            yield self

    def lock(self, *key: str) -> None:
        """Inside :meth:`transaction`: hold the advisory lock ``key`` (e.g. ``("loss", gateway)``)
        to the end of it (PostgreSQL); nothing on SQLite, whose write lock is already held."""
        if self._sqlite is None:
            self.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", ("\x1f".join(key),))

    # -- PostgreSQL connection ---------------------------------------------------------------

    def _connect_pg(self) -> Any:
        if self._pg is not None and not self._pg.closed:
            return self._pg
        import psycopg  # the ingest extra; only needed when [state] url is set

        try:
            self._pg = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=max(1, round(self._timeout_s)),
                application_name=self._application,
            )
        except psycopg.Error as exc:
            self._pg = None
            raise StateUnavailable(f"state database {self.where} unreachable: {_first_line(exc)}") from exc
        return self._pg

    @contextmanager
    def _pg_errors(self) -> Iterator[None]:
        """psycopg's connection-level failures -> StateUnavailable (the connection is dropped
        when it broke, so the next call connects again)."""
        import psycopg

        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            conn, self._pg = self._pg, None
            if conn is not None and not conn.closed and not conn.broken:
                self._pg = conn  # an aborted transaction (deadlock): the connection is fine
            elif conn is not None:
                conn.close()
            raise StateUnavailable(f"state database {self.where}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def config_error(exc: StateUnavailable) -> ConfigError:
    """A start-up failure to reach ``[state] url`` as the configuration error naming the key."""
    return ConfigError("state.url", str(exc))
