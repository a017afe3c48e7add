"""The durable outbox: every uplink message sits here until the broker acknowledged it (DESIGN §5).

Contract
--------
* ``add(topic, payload, kind=...)`` stores one message and returns how many messages the call
  dropped (itself or others) to keep the byte bound; ``add_batch`` does the same for a readings
  batch and, in the *same* SQLite transaction, allocates its per-gateway sequence number and
  records the "previous value sent" of its cumulative channels.
* ``begin(max_items)`` hands out the oldest rows no other open transaction holds, in insertion
  order; ``end(tx, accepted_ids)`` deletes exactly the accepted rows (those the broker PUBACKed)
  and releases the others, which the next ``begin`` hands out again, oldest first. A row leaves
  the outbox only through ``end`` (delivered) or the drop policy (counted by kind).
* ``stats()`` is a frozen :class:`OutboxStats`; the counters live in the database and survive
  restarts. Invariant: ``added == published + dropped_total + pending``.
* Programming errors (unknown kind, ending a transaction twice) raise ``ValueError``; SQLite
  failures propagate as ``sqlite3.Error`` (a full disk is not something the caller can route
  around). A database that cannot be opened because it is corrupt is moved aside
  (``<path>.corrupt-<epoch_ms>``) and replaced by an empty one; ``stats().corrupt_resets`` counts it.

Drop policy when ``pending_bytes`` would exceed ``max_bytes`` (bytes = topic + payload):

``shed_by_kind`` (default)
    Make room by deleting the *oldest* rows of the least valuable kind first, in the order
    ``instant`` → ``event`` → ``register`` → ``daily``, never touching a kind more valuable than
    the one being added (a new instantaneous value never pushes out a register read). If that
    cannot free enough room, nothing is deleted and the new row is dropped instead.
``reject_new``
    Keep what is stored; drop the new row.

In both policies ``cmd_result`` rows are never dropped: a command result is the only record that
a relay was (or was not) switched. It is stored even past the bound (after shedding what the
policy allows); command results are a few hundred bytes and rare. Rows held by an open
transaction (in flight to the broker) are never shed.

Durability and threading
------------------------
SQLite in WAL mode with ``synchronous=NORMAL`` and automatic checkpoints turned off. Each call
is one short write transaction that appends to the WAL without fsync (tens of microseconds), so
the methods are called directly on the event-loop thread. What that buys:

* **process crash (SIGKILL, OOM kill)**: every committed call survives; nothing is lost.
* **power loss / kernel crash**: what was committed up to the last :meth:`Outbox.checkpoint` survives;
  later commits may be lost (SQLite's WAL checksums discard a torn tail, the file stays consistent).

:meth:`Outbox.checkpoint` is the batch fsync: it syncs the WAL, copies it into the database and
syncs that. It uses its own connection, may block for milliseconds on slow flash, and is meant to
run in a worker thread (``await asyncio.to_thread(outbox.checkpoint)``) once per poll cycle,
concurrently with ``add``/``end`` on the loop thread (WAL lets a checkpoint run beside a writer).
As a backstop ``add`` checkpoints inline when more than ``wal_limit_bytes`` went unchecked.

Sequence numbers stay strictly increasing even across a power loss: numbers are reserved in
blocks of ``seq_block`` with a fully synchronous commit, and a reopened outbox continues after
the reserved block. A restart can therefore leave a gap of up to ``seq_block`` numbers: ``seq``
is increasing, not dense.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "KINDS",
    "SHED_ORDER",
    "BatchAdded",
    "Outbox",
    "OutboxRow",
    "OutboxStats",
    "Policy",
    "Transaction",
]

Policy = Literal["shed_by_kind", "reject_new"]
KINDS = ("instant", "event", "register", "daily", "cmd_result")
SHED_ORDER = ("instant", "event", "register", "daily")
"""Kinds in the order ``shed_by_kind`` sheds them; ``cmd_result`` is never shed."""
_RANK = {kind: rank for rank, kind in enumerate(KINDS)}
_COUNTERS = ("added", "published", "corrupt_resets", *(f"dropped.{k}" for k in KINDS))
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- AUTOINCREMENT: ids never reused, so id order is age
    topic TEXT NOT NULL, payload BLOB NOT NULL, kind TEXT NOT NULL, size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox (kind, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS prev (
    meter TEXT NOT NULL, quantity INTEGER NOT NULL, value INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
    PRIMARY KEY (meter, quantity)) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    topic: str
    payload: bytes
    kind: str


@dataclass(frozen=True, slots=True)
class Transaction:
    """Rows handed out by :meth:`Outbox.begin`, oldest first. End it exactly once."""

    id: int
    rows: tuple[OutboxRow, ...]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True, slots=True)
class BatchAdded:
    seq: int
    dropped: int


@dataclass(frozen=True, slots=True)
class OutboxStats:
    added: int
    published: int
    dropped: Mapping[str, int]
    pending: int
    pending_bytes: int
    in_flight: int
    max_bytes: int
    policy: Policy
    corrupt_resets: int

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class Outbox:
    """A byte-bounded, durable FIFO of MQTT messages in one SQLite file (see the module doc)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int,
        policy: Policy = "shed_by_kind",
        seq_block: int = 1024,
        wal_limit_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        if max_bytes <= 0 or seq_block <= 0:
            raise ValueError("max_bytes and seq_block must be positive")
        if policy not in ("shed_by_kind", "reject_new"):
            raise ValueError(f"policy {policy!r}: expected 'shed_by_kind' or 'reject_new'")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.policy: Policy = policy
        self._seq_block = seq_block
        self._wal_limit = wal_limit_bytes
        self._unsynced = 0
        self._held: dict[int, tuple[str, int]] = {}  # id -> (kind, size) of rows in open transactions
        self._open_tx: dict[int, frozenset[int]] = {}
        self._tx_ids = itertools.count(1)
        self._cursor = 0  # highest id handed out while transactions are open
        self._rewind = False  # an end() released rows below the cursor
        self._ckpt_lock = threading.Lock()
        self._ckpt_db: sqlite3.Connection | None = None
        resets = 0
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError:
            self._move_aside()
            self._db = self._connect()
            resets = 1
        self._load(resets)

    # -- opening ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise sqlite3.DatabaseError("could not switch to WAL mode")
            db.execute("PRAGMA synchronous = NORMAL")  # WAL: commits append, checkpoints fsync
            db.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints are ours (checkpoint())
            db.execute("PRAGMA journal_size_limit = 8388608")
            db.executescript(_SCHEMA)
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _move_aside(self) -> None:
        stamp = int(time.time() * 1000)
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.rename(f"{self.path}.corrupt-{stamp}{suffix}")

    def _load(self, resets: int) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        self._counters = {name: int(meta.get(name, 0)) for name in _COUNTERS}
        self._counters["corrupt_resets"] += resets
        self._rows = dict.fromkeys(KINDS, 0)
        self._bytes = dict.fromkeys(KINDS, 0)
        query = "SELECT kind, COUNT(*), SUM(size) FROM outbox GROUP BY kind"
        for kind, count, size in self._db.execute(query):
            self._rows[kind], self._bytes[kind] = count, size
        # Continue after the durable reservation: numbers up to it may have gone out before a power loss.
        self._seq_next = max(int(meta.get("seq_next", 1)), int(meta.get("seq_reserved", 1)))
        self._seq_reserved = self._seq_next
        with self._write():
            self._save_counters(_COUNTERS)

    # -- adding -------------------------------------------------------------------------------

    def add(self, topic: str, payload: bytes, *, kind: str) -> int:
        """Store one message; return the number of messages dropped to respect the bound.

        Raises:
            ValueError: unknown ``kind``.
            sqlite3.Error: the database failed (e.g. disk full).
        """
        _check_kind(kind)
        with self._write():
            return self._admit(topic, payload, kind)[0]

    def add_batch(
        self,
        topic: str,
        make_payload: Callable[[int], bytes],
        *,
        kind: str = "register",
        prev: Mapping[tuple[str, int], tuple[int, int]] | None = None,
    ) -> BatchAdded:
        """Allocate the next sequence number, build the payload with it and store it, atomically.

        ``make_payload(seq)`` runs inside the transaction: if it raises, nothing is stored and
        the number is not consumed. ``prev`` maps ``(meter, quantity)`` to ``(value, ts_ms)`` of
        the cumulative readings this batch carries; it becomes what :meth:`get_prev` returns,
        in the same transaction, unless the batch itself was dropped by the policy.

        Raises:
            ValueError: unknown ``kind``.
            sqlite3.Error: the database failed.
        """
        _check_kind(kind)
        # A new block reservation must survive a power loss: that commit syncs the WAL.
        with self._write(durable=self._seq_next >= self._seq_reserved):
            seq = self._allocate_seq()
            payload = make_payload(seq)
            dropped, stored = self._admit(topic, payload, kind)
            if prev and stored:
                self._db.executemany(
                    "INSERT INTO prev (meter, quantity, value, ts_ms) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (meter, quantity)"
                    " DO UPDATE SET value = excluded.value, ts_ms = excluded.ts_ms",
                    [(m, q, v, t) for (m, q), (v, t) in prev.items()],
                )
        return BatchAdded(seq, dropped)

    def get_prev(self, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        """``{(meter, quantity): (value, ts_ms)}`` last recorded by ``add_batch``, for the known keys."""
        found: dict[tuple[str, int], tuple[int, int]] = {}
        query = "SELECT value, ts_ms FROM prev WHERE meter = ? AND quantity = ?"
        for key in keys:
            row = self._db.execute(query, key).fetchone()
            if row is not None:
                found[key] = (row[0], row[1])
        return found

    @property
    def next_seq(self) -> int:
        """The number the next ``add_batch`` will use (read-only; allocation is in ``add_batch``)."""
        return self._seq_next

    def _allocate_seq(self) -> int:
        seq = self._seq_next
        self._seq_next += 1
        if self._seq_next > self._seq_reserved:
            self._seq_reserved = seq + self._seq_block
            self._put("seq_reserved", self._seq_reserved)
        self._put("seq_next", self._seq_next)
        return seq

    def _admit(self, topic: str, payload: bytes, kind: str) -> tuple[int, bool]:
        """Store the row or drop it by policy; (rows dropped, whether this one was stored)."""
        size = len(topic.encode()) + len(payload)
        over = self._pending_bytes() + size - self.max_bytes
        victims: list[tuple[int, str, int]] = []
        if over > 0 and self.policy == "shed_by_kind":
            victims = self._victims(over, kind)
        dropped = self._drop(victims)
        self._bump("added")
        if over - sum(v[2] for v in victims) > 0 and kind != "cmd_result":
            self._bump(f"dropped.{kind}")
            self._save_counters(("added", f"dropped.{kind}"))
            return dropped + 1, False
        self._db.execute("INSERT INTO outbox (topic, payload, kind, size) VALUES (?, ?, ?, ?)",
                         (topic, payload, kind, size))  # fmt: skip
        self._rows[kind] += 1
        self._bytes[kind] += size
        self._unsynced += size
        self._save_counters(("added",))
        return dropped, True

    def _victims(self, over: int, kind: str) -> list[tuple[int, str, int]]:
        """Oldest unheld rows of kinds no more valuable than ``kind``, least valuable first,
        freeing at least ``over`` bytes; or nothing if that much cannot be freed (unless
        ``kind`` is ``cmd_result``, which sheds what it can and is stored regardless)."""
        kinds = [k for k in SHED_ORDER if _RANK[k] <= _RANK[kind]]
        held = sum(size for k, size in self._held.values() if k in kinds)
        if sum(self._bytes[k] for k in kinds) - held < over and kind != "cmd_result":
            return []
        victims: list[tuple[int, str, int]] = []
        freed = 0
        for victim_kind in kinds:
            rows = self._db.execute("SELECT id, size FROM outbox WHERE kind = ? ORDER BY id", (victim_kind,))
            for row_id, size in rows:
                if row_id in self._held:
                    continue
                victims.append((row_id, victim_kind, size))
                freed += size
                if freed >= over:
                    return victims
        return victims

    def _drop(self, victims: list[tuple[int, str, int]]) -> int:
        for kind, _ in self._delete([v[0] for v in victims]):
            self._bump(f"dropped.{kind}")
        self._save_counters({f"dropped.{v[1]}" for v in victims})
        return len(victims)

    def _delete(self, ids: list[int]) -> list[tuple[str, int]]:
        """Delete rows by id; the (kind, size) of those that existed."""
        found: list[tuple[str, int]] = []
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))  # no RETURNING: that needs SQLite 3.35
            found += self._db.execute(f"SELECT kind, size FROM outbox WHERE id IN ({marks})", chunk)
            self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
        for kind, size in found:
            self._rows[kind] -= 1
            self._bytes[kind] -= size
        return found

    # -- delivering ---------------------------------------------------------------------------

    def begin(self, max_items: int) -> Transaction:
        """The oldest rows (at most ``max_items``) that no open transaction holds, in insertion order."""
        if max_items <= 0:
            raise ValueError("max_items must be positive")
        # Held rows all lie at or below the cursor: past it nothing needs skipping; after a
        # release (rewind) the scan starts over and may meet every held row.
        low = 0 if self._rewind else self._cursor
        limit = max_items + (len(self._held) if self._rewind else 0)
        fetched = self._db.execute(
            "SELECT id, topic, payload, kind FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (low, limit)
        ).fetchall()
        rows = tuple(OutboxRow(*r) for r in fetched if r[0] not in self._held)[:max_items]
        if self._rewind and (len(fetched) < limit or any(r.id > self._cursor for r in rows)):
            self._rewind = False  # every released row below the cursor has been handed out again
        tx = Transaction(next(self._tx_ids), rows)
        if rows:
            self._cursor = max(self._cursor, rows[-1].id)
            for row in rows:
                self._held[row.id] = (row.kind, len(row.topic.encode()) + len(row.payload))
            self._open_tx[tx.id] = frozenset(r.id for r in rows)
        return tx

    def end(self, tx: Transaction, accepted_ids: Iterable[int]) -> int:
        """Delete the accepted rows of ``tx``; release the rest for the next ``begin``.

        Returns the number of rows deleted.

        Raises:
            ValueError: ``tx`` is not open, or an accepted id is not one of its rows.
        """
        if not tx.rows:
            return 0
        ids = self._open_tx.pop(tx.id, None)
        if ids is None:
            raise ValueError(f"transaction {tx.id} is not open (ended twice?)")
        accepted = set(accepted_ids)
        if not accepted <= ids:
            self._open_tx[tx.id] = ids
            raise ValueError(f"ids {sorted(accepted - ids)[:5]} are not rows of transaction {tx.id}")
        for row_id in ids:
            del self._held[row_id]
        if ids - accepted:
            self._rewind = True
        if not self._held:
            self._cursor, self._rewind = 0, False
        with self._write():
            deleted = self._delete(sorted(accepted))
            self._counters["published"] += len(deleted)
            self._save_counters(("published",))
        return len(deleted)

    # -- state --------------------------------------------------------------------------------

    def stats(self) -> OutboxStats:
        c = self._counters
        return OutboxStats(
            added=c["added"], published=c["published"], dropped={k: c[f"dropped.{k}"] for k in KINDS},
            pending=sum(self._rows.values()), pending_bytes=self._pending_bytes(), in_flight=len(self._held),
            max_bytes=self.max_bytes, policy=self.policy, corrupt_resets=c["corrupt_resets"],
        )  # fmt: skip

    def __len__(self) -> int:
        return sum(self._rows.values())

    def checkpoint(self) -> None:
        """Make every commit so far survive a power loss (fsync WAL, copy into the DB, fsync DB).

        Thread-safe and independent of the loop-thread connection: run it with
        ``asyncio.to_thread``. Raises ``sqlite3.Error`` if the database fails.
        """
        with self._ckpt_lock:
            if self._ckpt_db is None:
                self._ckpt_db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self._ckpt_db.execute("PRAGMA busy_timeout = 5000")
                self._ckpt_db.execute("PRAGMA synchronous = NORMAL")
            self._ckpt_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def close(self) -> None:
        """Checkpoint (truncating the WAL) and close. Open transactions are simply forgotten:
        their rows are still stored and replay after reopening."""
        with self._ckpt_lock:
            if self._ckpt_db is not None:
                self._ckpt_db.close()
                self._ckpt_db = None
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------------

    def _pending_bytes(self) -> int:
        return sum(self._bytes.values())

    def _bump(self, name: str) -> None:
        self._counters[name] += 1

    def _put(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _save_counters(self, names: Iterable[str]) -> None:
        for name in names:
            self._put(name, self._counters[name])

    def _write(self, *, durable: bool = False) -> _WriteTx:
        return _WriteTx(self, durable)


class _WriteTx:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK`` and restore the in-memory state)."""

    def __init__(self, outbox: Outbox, durable: bool) -> None:
        self._ob = outbox
        self._durable = durable

    def __enter__(self) -> None:
        ob = self._ob
        self._saved = (dict(ob._counters), dict(ob._rows), dict(ob._bytes), ob._seq_next, ob._seq_reserved)
        if self._durable:  # SQLite only lets the safety level change outside a transaction
            ob._db.execute("PRAGMA synchronous = FULL")  # this commit fsyncs the WAL
        ob._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        ob = self._ob
        try:
            if exc_type is not None:
                ob._db.execute("ROLLBACK")
                ob._counters, ob._rows, ob._bytes, ob._seq_next, ob._seq_reserved = self._saved
                return
            ob._db.execute("COMMIT")
        finally:
            if self._durable:
                ob._db.execute("PRAGMA synchronous = NORMAL")
        if ob._unsynced > ob._wal_limit:
            ob._unsynced = 0
            ob.checkpoint()


def _check_kind(kind: str) -> None:
    if kind not in _RANK:
        raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
