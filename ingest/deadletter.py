"""Durable dead-letter store: what ingest could not use, kept with the reason, never silently lost.

Contract
--------
* Two kinds of entry: ``"payload"`` (an MQTT payload that did not decode: the raw bytes, the
  topic and :class:`~protocols.errors.PayloadError`'s reason) and ``"line"`` (a line of line
  protocol InfluxDB rejected: the line, a short reason such as ``"field type conflict"`` and the
  server's full message in ``detail``). ``reason`` is meant to be low-cardinality, so that
  :meth:`DeadLetterStore.count_by_reason` is a useful metric; put specifics in ``detail``.
* :meth:`DeadLetterStore.put` returns after the row is committed to SQLite in WAL mode with
  ``synchronous=FULL``: the caller may acknowledge the MQTT message right after (STYLE H8).
* Bounded by ``max_entries`` and ``max_bytes`` (payload bytes). When a put goes over either bound
  the oldest entries are evicted first, and every eviction is counted in a persistent counter
  (:attr:`DeadLetterStats.evicted`) and logged (edge-triggered), never silent (field lesson 15).
  The newest entry is never evicted, even when it alone exceeds ``max_bytes``.
* Synchronous and thread-safe (one connection behind a lock): dead letters are rare and small,
  so callers on the event loop call it directly; a caller that expects bursts may use
  ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KINDS", "DeadLetter", "DeadLetterConfig", "DeadLetterStats", "DeadLetterStore"]

log = logging.getLogger(__name__)

KINDS = frozenset({"payload", "line"})
_MAX_REASON_CHARS = 200

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
"""

_INSERT = "INSERT INTO dead_letter(kind, reason, detail, topic, ts_ms, payload) VALUES (?, ?, ?, ?, ?, ?)"

Entry = tuple[str, str, bytes, str | None, int | None, str]
"""(kind, reason, payload, topic, ts_ms or None for now, detail), as :meth:`put_many` takes."""


@dataclass(frozen=True, slots=True)
class DeadLetterConfig:
    """The ``[ingest.dead_letter]`` section."""

    path: str = "deadletter.sqlite"
    max_entries: int = 100_000
    max_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.max_bytes < 1:
            raise ValueError("max_entries: bounds must be positive")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    kind: str
    reason: str
    detail: str
    topic: str | None
    ts_ms: int
    payload: bytes


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
        self, path: str | Path, *, max_entries: int = 100_000, max_bytes: int = 256 * 1024 * 1024
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._evicting = False

    @classmethod
    def from_config(cls, config: DeadLetterConfig) -> DeadLetterStore:
        return cls(config.path, max_entries=config.max_entries, max_bytes=config.max_bytes)

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
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.executemany(_INSERT, rows)
                added = sum(len(r[5]) for r in rows)
                cur.execute("UPDATE meta SET value = value + ? WHERE key = 'entries'", (len(rows),))
                cur.execute("UPDATE meta SET value = value + ? WHERE key = 'bytes'", (added,))
                evicted = self._evict(cur)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
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
        sql = "SELECT id, kind, reason, detail, topic, ts_ms, payload FROM dead_letter"
        args: tuple[object, ...] = (limit,)
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind, limit)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", args).fetchall()
        return [DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6])) for r in rows]

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _row(
        kind: str, reason: str, payload: bytes, topic: str | None, ts_ms: int | None, detail: str
    ) -> tuple[str, str, str, str | None, int, bytes]:
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
        if not reason:
            raise ValueError("reason: must not be empty")
        when = time.time_ns() // 1_000_000 if ts_ms is None else int(ts_ms)
        return kind, reason[:_MAX_REASON_CHARS], detail, topic, when, bytes(payload)

    def _evict(self, cur: sqlite3.Cursor) -> int:
        """Delete the oldest rows until both bounds hold (never the newest row); count them."""
        entries, size = (
            cur.execute("SELECT value FROM meta WHERE key = ?", (k,)).fetchone()[0]
            for k in ("entries", "bytes")
        )
        if entries <= self.max_entries and size <= self.max_bytes:
            return 0
        newest = cur.execute("SELECT MAX(id) FROM dead_letter").fetchone()[0]
        n = freed = 0
        last_id = None
        oldest_first = self._db.execute(  # a lazy cursor: reads only as far as it must evict
            "SELECT id, length(payload) FROM dead_letter WHERE id < ? ORDER BY id", (newest,)
        )
        for row_id, length in oldest_first:
            if entries - n <= self.max_entries and size - freed <= self.max_bytes:
                break
            n, freed, last_id = n + 1, freed + length, row_id
        oldest_first.close()
        if last_id is None:
            return 0
        cur.execute("DELETE FROM dead_letter WHERE id <= ?", (last_id,))
        cur.execute("UPDATE meta SET value = value - ? WHERE key = 'entries'", (n,))
        cur.execute("UPDATE meta SET value = value - ? WHERE key = 'bytes'", (freed,))
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
