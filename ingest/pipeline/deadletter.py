"""Durable dead-letter store: what ingest could not use, kept with the reason, never silently lost.

Contract
--------
* Two kinds of entry: ``"payload"`` (an MQTT payload that did not decode: the raw bytes, the
  topic and :class:`~protocols.errors.PayloadError`'s reason) and ``"line"`` (a record the sink
  rejected for good, :class:`~ingest.sinks.base.Rejected`, put here by the worker: for InfluxDB a
  line of line protocol, a short reason such as ``"field type conflict"`` and the server's full
  message in ``detail``). ``reason`` is meant to be low-cardinality, so that
  :meth:`DeadLetterStore.count_by_reason` is a useful metric; put specifics in ``detail``.
* :meth:`DeadLetterStore.put` returns after the row is committed to SQLite in WAL mode with
  ``synchronous=FULL``: the caller may acknowledge the MQTT message right after (STYLE H8).
* An entry keeps at most ``max_entry_bytes`` of its payload (default 16 MiB, the largest payload
  the decoder accepts): a larger payload is stored as that prefix with its full ``size``, the
  SHA-256 ``digest`` of the whole and ``truncated`` set, so a few huge messages cannot fill the
  store. A truncated entry cannot be replayed (its bytes are gone); it stays as evidence.
* Bounded by ``max_entries`` and ``max_bytes`` (stored payload bytes). When a put goes over a
  bound, entries are evicted **fairly by reason**: the oldest entry of the reason that holds the
  most (entries, or bytes when ``max_bytes`` is exceeded) goes first, one at a time, until both
  bounds hold. So a flood of one reason evicts its own older entries and leaves the others alone:
  a reason that holds no more than its share (``max_entries / R`` entries and ``max_bytes / R``
  bytes, with R reasons stored) loses nothing while another reason holds more. Every eviction is
  counted in a persistent counter (:attr:`DeadLetterStats.evicted`) and logged (edge-triggered),
  never silent (field lesson 15). The newest entry is never evicted, even when it alone exceeds
  ``max_bytes``.
* Replay support (``amigw ingest --replay-dead-letters``, :mod:`ingest.pipeline.replay`): :meth:`select`
  pages through entries oldest first with filters (kind, reason, time), :meth:`remove` deletes
  entries that have landed, :meth:`set_reason` records why one failed again (same id and time).
* Synchronous and thread-safe (one connection behind a lock): dead letters are rare and small,
  so callers on the event loop call it directly; a caller that expects bursts may use
  ``asyncio.to_thread``.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "MAX_ENTRY_BYTES", "DeadLetter", "DeadLetterConfig", "DeadLetterStats", "DeadLetterStore"]

log = logging.getLogger(__name__)

KINDS = frozenset({"payload", "line"})
_MAX_REASON_CHARS = 200

MAX_ENTRY_BYTES = 16 * 1024 * 1024  # protocols.payload.MAX_PAYLOAD_BYTES: any decodable payload fits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letter (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT    NOT NULL,
    reason  TEXT    NOT NULL,
    detail  TEXT    NOT NULL DEFAULT '',
    topic   TEXT,
    ts_ms   INTEGER NOT NULL,
    payload BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letter_reason ON dead_letter(reason);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('entries', 0), ('bytes', 0), ('evicted', 0);
CREATE TABLE IF NOT EXISTS reason_usage (
    reason  TEXT PRIMARY KEY,
    entries INTEGER NOT NULL,
    bytes   INTEGER NOT NULL
) WITHOUT ROWID;
"""
# Columns added after the first release: a store written by an older version is upgraded in place.
_ADDED_COLUMNS = (
    ("size", "INTEGER"),  # the payload's full size (NULL in old rows: the stored length)
    ("digest", "TEXT NOT NULL DEFAULT ''"),  # SHA-256 of the full payload, hex
    ("truncated", "INTEGER NOT NULL DEFAULT 0"),
)
# The per-reason usage that fair eviction picks from, rebuilt at every open (self-healing).
_REBUILD_USAGE = """
DELETE FROM reason_usage;
INSERT INTO reason_usage SELECT reason, COUNT(*), SUM(length(payload)) FROM dead_letter GROUP BY reason;
"""
# The oldest row (but the newest of all) of the reason holding the most of ``measure``.
_VICTIM = """
SELECT v FROM (
    SELECT (SELECT id FROM dead_letter d WHERE d.reason = u.reason AND d.id < ? ORDER BY id LIMIT 1) AS v,
           u.{measure} AS used, u.entries AS n
    FROM reason_usage u
) WHERE v IS NOT NULL ORDER BY used DESC, n DESC LIMIT 1
"""
_COLUMNS = (
    "id, kind, reason, detail, topic, ts_ms, payload, COALESCE(size, length(payload)), digest, truncated"
)
_INSERT = (
    "INSERT INTO dead_letter(kind, reason, detail, topic, ts_ms, payload, size, digest, truncated) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_USE = (
    "INSERT INTO reason_usage VALUES (?, ?, ?) ON CONFLICT(reason) "
    "DO UPDATE SET entries = entries + excluded.entries, bytes = bytes + excluded.bytes"
)

Entry = tuple[str, str, bytes, str | None, int | None, str]
"""(kind, reason, payload, topic, ts_ms or None for now, detail), as :meth:`put_many` takes."""


@dataclass(frozen=True, slots=True)
class DeadLetterConfig:
    """The ``[ingest.dead_letter]`` section."""

    path: str = "deadletter.sqlite"
    max_entries: int = 100_000
    max_bytes: int = 256 * 1024 * 1024
    max_entry_bytes: int = MAX_ENTRY_BYTES

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.max_bytes < 1:
            raise ValueError("max_entries: bounds must be positive")
        if self.max_entry_bytes < 1:
            raise ValueError("max_entry_bytes: must be positive")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One stored entry. ``payload`` is the whole payload unless ``truncated`` (then its first
    ``max_entry_bytes``); ``size`` and ``digest`` (SHA-256, hex) are of the whole payload."""

    id: int
    kind: str
    reason: str
    detail: str
    topic: str | None
    ts_ms: int
    payload: bytes
    size: int = 0
    digest: str = ""
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class DeadLetterStats:
    entries: int
    payload_bytes: int
    evicted: int
    max_entries: int
    max_bytes: int


class DeadLetterStore:
    """SQLite (WAL) dead-letter table with oldest-first, counted eviction. See the module contract."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_entries: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        max_entry_bytes: int = MAX_ENTRY_BYTES,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or max_entry_bytes < 1:
            raise ValueError("max_entries, max_bytes and max_entry_bytes must be positive")
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(dead_letter)")}
        for name, decl in _ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE dead_letter ADD COLUMN {name} {decl}")
        self._db.executescript(f"BEGIN IMMEDIATE;{_REBUILD_USAGE}COMMIT;")
        self._evicting = False

    @classmethod
    def from_config(cls, config: DeadLetterConfig) -> DeadLetterStore:
        return cls(
            config.path,
            max_entries=config.max_entries,
            max_bytes=config.max_bytes,
            max_entry_bytes=config.max_entry_bytes,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DeadLetterStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def put(
        self,
        kind: str,
        reason: str,
        payload: bytes,
        topic: str | None = None,
        ts_ms: int | None = None,
        detail: str = "",
    ) -> int:
        """Store one entry durably; returns how many older entries this put evicted.

        ``ts_ms`` is when it was received or rejected (now when ``None``).
        Raises:
            ValueError: ``kind`` not in :data:`KINDS` or an empty ``reason`` (programming errors).
            sqlite3.Error: the disk failed; the caller must not acknowledge.
        """
        return self.put_many([(kind, reason, payload, topic, ts_ms, detail)])

    def put_many(self, entries: Iterable[Entry]) -> int:
        """Store several entries in one transaction; returns how many older entries were evicted."""
        rows = [self._row(*entry) for entry in entries]
        if not rows:
            return 0
        with self._transaction() as cur:
            cur.executemany(_INSERT, rows)
            for row in rows:
                self._account(cur, row[1], 1, len(row[5]))
            evicted = self._evict(cur)
        self._log_eviction(evicted)
        return evicted

    def count_by_reason(self, kind: str | None = None) -> dict[str, int]:
        """Entries currently stored, per reason (optionally of one kind)."""
        sql = "SELECT reason, COUNT(*) FROM dead_letter"
        args: tuple[str, ...] = ()
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind,)
        with self._lock:
            return dict(self._db.execute(sql + " GROUP BY reason", args).fetchall())

    def stats(self) -> DeadLetterStats:
        with self._lock:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        return DeadLetterStats(
            meta["entries"], meta["bytes"], meta["evicted"], self.max_entries, self.max_bytes
        )

    def list(self, limit: int = 100, kind: str | None = None) -> list[DeadLetter]:
        """The newest ``limit`` entries, newest first (optionally of one kind)."""
        sql = f"SELECT {_COLUMNS} FROM dead_letter"
        args: tuple[object, ...] = (limit,)
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind, limit)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", args).fetchall()
        return [_entry(r) for r in rows]

    def select(
        self,
        *,
        kind: str | None = None,
        reason: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> builtins.list[DeadLetter]:
        """Up to ``limit`` entries with ``id > after_id``, oldest first, of ``kind`` and ``reason``
        when given, received in ``since_ms <= ts_ms < until_ms`` (either bound optional)."""
        filters = {"id > ?": after_id, "kind = ?": kind, "reason = ?": reason,
                   "ts_ms >= ?": since_ms, "ts_ms < ?": until_ms}  # fmt: skip
        where = [clause for clause, value in filters.items() if value is not None]
        args = [value for value in filters.values() if value is not None]
        sql = f"SELECT {_COLUMNS} FROM dead_letter WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [_entry(r) for r in rows]

    def remove(self, entry_id: int) -> bool:
        """Delete one entry (it has been replayed); False when it is no longer there."""
        with self._transaction() as cur:
            return self._delete(cur, entry_id) is not None

    def set_reason(self, entry_id: int, reason: str, detail: str) -> None:
        """Record why an entry failed again (its id, time and payload stay)."""
        if not reason:
            raise ValueError("reason: must not be empty")
        reason = reason[:_MAX_REASON_CHARS]
        with self._transaction() as cur:
            row = cur.execute(
                "SELECT reason, length(payload) FROM dead_letter WHERE id = ?", (entry_id,)
            ).fetchone()
            if row is not None:
                cur.execute(
                    "UPDATE dead_letter SET reason = ?, detail = ? WHERE id = ?", (reason, detail, entry_id)
                )
                self._account(cur, row[0], -1, -row[1], totals=False)
                self._account(cur, reason, 1, row[1], totals=False)

    # -- internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    @staticmethod
    def _account(cur: sqlite3.Cursor, reason: str, entries: int, size: int, *, totals: bool = True) -> None:
        """Add ``entries`` and ``size`` bytes (negative: remove) to ``reason``'s usage, and to the
        totals unless the rows only moved between reasons."""
        cur.execute(_USE, (reason, entries, size))
        if entries < 0:
            cur.execute("DELETE FROM reason_usage WHERE reason = ? AND entries <= 0", (reason,))
        if totals:
            cur.execute("UPDATE meta SET value = value + ? WHERE key = 'entries'", (entries,))
            cur.execute("UPDATE meta SET value = value + ? WHERE key = 'bytes'", (size,))

    def _row(
        self, kind: str, reason: str, payload: bytes, topic: str | None, ts_ms: int | None, detail: str
    ) -> tuple[str, str, str, str | None, int, bytes, int, str, int]:
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
        if not reason:
            raise ValueError("reason: must not be empty")
        when = time.time_ns() // 1_000_000 if ts_ms is None else int(ts_ms)
        data = bytes(payload)
        kept = data[: self.max_entry_bytes]
        return (kind, reason[:_MAX_REASON_CHARS], detail, topic, when, kept, len(data),
                hashlib.sha256(data).hexdigest(), int(len(kept) < len(data)))  # fmt: skip

    def _delete(self, cur: sqlite3.Cursor, entry_id: int) -> int | None:
        """Delete one row and account for it; returns its stored bytes (None: no such row)."""
        row = cur.execute(
            "SELECT reason, length(payload) FROM dead_letter WHERE id = ?", (entry_id,)
        ).fetchone()
        if row is None:
            return None
        reason, length = row
        cur.execute("DELETE FROM dead_letter WHERE id = ?", (entry_id,))
        self._account(cur, reason, -1, -length)
        return int(length)

    def _evict(self, cur: sqlite3.Cursor) -> int:
        """Fair eviction (see the module contract): while a bound is exceeded, delete the oldest
        row of the reason holding the most of what is over; never the newest row. Counted."""
        newest = cur.execute("SELECT MAX(id) FROM dead_letter").fetchone()[0]
        n = 0
        while True:
            entries, size = (
                cur.execute("SELECT value FROM meta WHERE key = ?", (k,)).fetchone()[0]
                for k in ("entries", "bytes")
            )
            if entries <= self.max_entries and size <= self.max_bytes:
                break
            measure = "bytes" if size > self.max_bytes else "entries"
            victim = cur.execute(_VICTIM.format(measure=measure), (newest,)).fetchone()
            if victim is None:
                break  # only the newest row is left
            self._delete(cur, victim[0])
            n += 1
        if n:
            cur.execute("UPDATE meta SET value = value + ? WHERE key = 'evicted'", (n,))
        return n

    def _log_eviction(self, evicted: int) -> None:
        """Edge-triggered (STYLE H12): WARNING when eviction starts, DEBUG while it goes on."""
        if evicted and not self._evicting:
            self._evicting = True
            log.warning(
                "dead-letter store full, evicting oldest path=%s evicted=%d max_entries=%d max_bytes=%d",
                self.path,
                evicted,
                self.max_entries,
                self.max_bytes,
            )
        elif evicted:
            log.debug("dead-letter eviction path=%s evicted=%d", self.path, evicted)
        elif self._evicting:
            self._evicting = False


def _entry(r: tuple[Any, ...]) -> DeadLetter:
    return DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), r[7], r[8], bool(r[9]))
