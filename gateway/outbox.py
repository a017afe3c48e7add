"""The durable outbox: every uplink message sits here until it is confirmed delivered (DESIGN §5).

Contract
--------
* ``add(topic, payload, kind=..., event_id=None)`` stores one message and returns how many
  messages the call dropped (itself or others) to keep the byte bound; ``add_batch`` does the same
  for a readings batch and, in the *same* SQLite transaction, allocates its per-gateway sequence
  number and records the "previous value sent" of its cumulative channels.
* ``begin(max_items)`` hands out the oldest rows that are *due* (never sent, or sent and due for a
  re-send) and that no other open transaction holds, in insertion order. ``end(tx, accepted_ids)``
  settles the rows the broker acknowledged (PUBACK) and releases the others, which the next
  ``begin`` hands out again, oldest first.
* What a PUBACK does to a row depends on ``confirm`` and on whether the head-end can name the
  row: a readings batch (its ``seq``) or an event (its ``event_id``) is *keyed*.

  ``confirm="head-end"`` (default)
      A keyed row stays stored after its PUBACK, "sent, awaiting confirmation" (counted in
      ``unconfirmed``), until :meth:`Outbox.confirm` receives a
      :class:`~protocols.acks.Ack` naming its seq or event id; then it is deleted and counted as
      ``confirmed``. A row not confirmed within ``ack_timeout_s`` of its PUBACK becomes due
      again and is re-sent (counted in ``resent``); each further re-send waits twice as long,
      up to ``max(ack_timeout_s, resend_cap_s)``. Rows without a key (command results: fee
      control reads them on a plain persistent subscription, where the broker's PUBACK is the
      end of the story) are deleted on PUBACK and counted as ``published``.
  ``confirm="broker"``
      Every row is deleted on PUBACK (``published``), for a head-end that sends no confirmations.

  A confirmation deletes the rows it names whatever their state, also rows in flight (a re-send
  under way) and rows not yet re-sent after a restart; naming an unknown seq or id is harmless.
  Reopening an outbox makes every unconfirmed row due at once: after a restart it is re-sent.
* A row leaves the outbox only through ``end`` (PUBACK, where that is enough), ``confirm`` or
  the drop policy (counted by kind).
* ``stats()`` is a frozen :class:`OutboxStats`; the counters live in the database and survive
  restarts. Invariant: ``added == published + confirmed + dropped_total + pending``, where
  ``pending`` counts every stored row, the ``unconfirmed`` ones included. ``stats()`` reads only
  memory, so a metrics thread may call it.
* Programming errors (unknown kind, ending a transaction twice) raise ``ValueError``; SQLite
  failures propagate as ``sqlite3.Error`` (a full disk is not something the caller can route
  around). A database that cannot be opened because it is corrupt is moved aside
  (``<path>.corrupt-<epoch_ms>``) and replaced by an empty one; ``stats().corrupt_resets`` counts it.
  A file written by an older version (no ``seq``/``event_id``/``sends``/``due_ms`` columns) is
  migrated in place (``ALTER TABLE``); its stored rows carry no key and leave on PUBACK.

Drop policy when ``pending_bytes`` would exceed ``max_bytes`` (bytes = topic + payload; rows
awaiting confirmation count like any stored row):

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
transaction (in flight to the broker) are never shed; rows awaiting confirmation may be.

Sequence numbers
----------------
Per gateway (one outbox per gateway), ``seq`` is *dense*: 1, 2, 3, ... with no gaps across clean
stops, crashes (SIGKILL) and restarts, so the head-end can tell a lost batch from a restart. The
number is allocated in the transaction that stores the batch, and that commit is fully
synchronous (it fsyncs the WAL; batches are a few per minute), so a number once published is
never allocated again, even after a power loss. A batch that the drop policy refuses on arrival
or sheds later still consumed its number: the head-end sees that gap, and ``dropped`` says why.
An outbox written by an older version, which reserved numbers in blocks, continues once after
its reservation and densely from then on.

Durability and threading
------------------------
SQLite in WAL mode with ``synchronous=NORMAL`` and automatic checkpoints turned off. Each call
is one short write transaction that appends to the WAL (readings batches also fsync it, see
above), so the methods are called directly on the event-loop thread. What that buys:

* **process crash (SIGKILL, OOM kill)**: every committed call survives; nothing is lost.
* **power loss / kernel crash**: every readings batch and what was committed before it survives;
  later ``NORMAL`` commits may be lost (an event, a deletion after PUBACK or confirmation: a
  deleted row comes back and is re-sent, which the head-end's de-duplication absorbs). SQLite's
  WAL checksums discard a torn tail, the file stays consistent.

:meth:`Outbox.checkpoint` syncs the WAL, copies it into the database and syncs that. It uses its
own connection, may block for milliseconds on slow flash, and is meant to run in a worker thread
(``await asyncio.to_thread(outbox.checkpoint)``) once per poll cycle, concurrently with
``add``/``end`` on the loop thread (WAL lets a checkpoint run beside a writer). As a backstop
``add`` checkpoints inline when more than ``wal_limit_bytes`` went unchecked.

Time for re-sends comes from ``clock`` (seconds, monotonic by default; injected in tests).
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

from protocols.acks import Ack

__all__ = [
    "KINDS",
    "RESEND_CAP_S",
    "SHED_ORDER",
    "BatchAdded",
    "Confirm",
    "Outbox",
    "OutboxRow",
    "OutboxStats",
    "Policy",
    "Transaction",
]

Policy = Literal["shed_by_kind", "reject_new"]
Confirm = Literal["head-end", "broker"]
KINDS = ("instant", "event", "register", "daily", "cmd_result")
SHED_ORDER = ("instant", "event", "register", "daily")
"""Kinds in the order ``shed_by_kind`` sheds them; ``cmd_result`` is never shed."""
RESEND_CAP_S = 600.0
"""Re-sends of an unconfirmed row back off up to this (or ``ack_timeout_s`` if that is longer)."""
_RANK = {kind: rank for rank, kind in enumerate(KINDS)}
_COUNTERS = ("added", "published", "confirmed", "resent", "corrupt_resets", *(f"dropped.{k}" for k in KINDS))
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
# Added after the first release: created by ALTER TABLE on older files too.
_COLUMNS = {
    "seq": "INTEGER",  # a readings batch's sequence number (its confirmation key)
    "event_id": "TEXT",  # an event's id (its confirmation key)
    "sends": "INTEGER NOT NULL DEFAULT 0",  # PUBACKed sends of this row
    "due_ms": "INTEGER NOT NULL DEFAULT 0",  # 0: due now; else clock ms of the next re-send
}
_INDEXES = """
CREATE INDEX IF NOT EXISTS outbox_seq ON outbox (seq);
CREATE INDEX IF NOT EXISTS outbox_event ON outbox (event_id);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (due_ms);
"""
_ROW = "id, topic, payload, kind, seq, event_id, sends"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    topic: str
    payload: bytes
    kind: str
    seq: int | None = None
    event_id: str | None = None
    sends: int = 0  # PUBACKed sends before this one

    @property
    def keyed(self) -> bool:
        """True if a head-end confirmation can name this row (a batch's seq, an event's id)."""
        return self.seq is not None or self.event_id is not None


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
    confirmed: int = 0
    unconfirmed: int = 0
    resent: int = 0
    confirm: Confirm = "head-end"

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
        confirm: Confirm = "head-end",
        ack_timeout_s: float = 60.0,
        resend_cap_s: float = RESEND_CAP_S,
        clock: Callable[[], float] = time.monotonic,
        wal_limit_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        if max_bytes <= 0 or ack_timeout_s <= 0:
            raise ValueError("max_bytes and ack_timeout_s must be positive")
        if policy not in ("shed_by_kind", "reject_new"):
            raise ValueError(f"policy {policy!r}: expected 'shed_by_kind' or 'reject_new'")
        if confirm not in ("head-end", "broker"):
            raise ValueError(f"confirm {confirm!r}: expected 'head-end' or 'broker'")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.policy: Policy = policy
        self.confirm_by: Confirm = confirm
        self._ack_timeout_ms = int(ack_timeout_s * 1000)
        self._resend_cap_ms = int(max(ack_timeout_s, resend_cap_s) * 1000)
        self._clock = clock
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
            have = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
            for name, decl in _COLUMNS.items():
                if name not in have:  # a file from an older version
                    db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {decl}")
            db.executescript(_INDEXES)
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
        self._unconfirmed = self._db.execute("SELECT COUNT(*) FROM outbox WHERE sends > 0").fetchone()[0]
        self._seq_next = int(meta.get("seq_next", 1))
        with self._write():
            if "seq_reserved" in meta:  # an older version reserved blocks: never reuse a number of one
                self._seq_next = max(self._seq_next, int(meta["seq_reserved"]))
                self._put("seq_next", self._seq_next)
                self._db.execute("DELETE FROM meta WHERE key = 'seq_reserved'")
            self._db.execute("UPDATE outbox SET due_ms = 0 WHERE due_ms != 0")  # re-send what is unconfirmed
            self._save_counters(_COUNTERS)

    # -- adding -------------------------------------------------------------------------------

    def add(self, topic: str, payload: bytes, *, kind: str, event_id: str | None = None) -> int:
        """Store one message; return the number of messages dropped to respect the bound.

        ``event_id`` (kind ``event`` only) is the id a head-end confirmation names it by.

        Raises:
            ValueError: unknown ``kind``, or an ``event_id`` on a row that is not an event.
            sqlite3.Error: the database failed (e.g. disk full).
        """
        _check_kind(kind)
        if event_id is not None and kind != "event":
            raise ValueError(f"event_id on a {kind!r} row: only events carry one")
        with self._write():
            return self._admit(topic, payload, kind, event_id=event_id)[0]

    def add_batch(
        self,
        topic: str,
        make_payload: Callable[[int], bytes],
        *,
        kind: str = "register",
        prev: Mapping[tuple[str, int], tuple[int, int]] | None = None,
    ) -> BatchAdded:
        """Allocate the next sequence number, build the payload with it and store it, atomically
        and durably (the commit fsyncs the WAL, so the number is never allocated again).

        ``make_payload(seq)`` runs inside the transaction: if it raises, nothing is stored and
        the number is not consumed. ``prev`` maps ``(meter, quantity)`` to ``(value, ts_ms)`` of
        the cumulative readings this batch carries; it becomes what :meth:`get_prev` returns,
        in the same transaction, unless the batch itself was dropped by the policy.

        Raises:
            ValueError: unknown ``kind``.
            sqlite3.Error: the database failed.
        """
        _check_kind(kind)
        with self._write(durable=True):
            seq = self._seq_next
            self._seq_next += 1
            self._put("seq_next", self._seq_next)
            payload = make_payload(seq)
            dropped, stored = self._admit(topic, payload, kind, seq=seq)
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

    def _admit(
        self, topic: str, payload: bytes, kind: str, *, seq: int | None = None, event_id: str | None = None
    ) -> tuple[int, bool]:
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
        self._db.execute(
            "INSERT INTO outbox (topic, payload, kind, size, seq, event_id) VALUES (?, ?, ?, ?, ?, ?)",
            (topic, payload, kind, size, seq, event_id),
        )
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
        for _, kind in self._delete([v[0] for v in victims]):
            self._bump(f"dropped.{kind}")
        self._save_counters({f"dropped.{v[1]}" for v in victims})
        return len(victims)

    def _delete(self, ids: list[int]) -> list[tuple[int, str]]:
        """Delete rows by id; the (id, kind) of those that existed."""
        found: list[tuple[int, str, int, int]] = []
        for chunk in _chunks(ids, 500):
            where = f"WHERE id IN ({','.join('?' * len(chunk))})"  # no RETURNING: that needs SQLite 3.35
            found += self._db.execute(f"SELECT id, kind, size, sends FROM outbox {where}", chunk)
            self._db.execute(f"DELETE FROM outbox {where}", chunk)
        for _, kind, size, sends in found:
            self._rows[kind] -= 1
            self._bytes[kind] -= size
            self._unconfirmed -= sends > 0
        return [(row_id, kind) for row_id, kind, _, _ in found]

    # -- delivering ---------------------------------------------------------------------------

    def begin(self, max_items: int) -> Transaction:
        """The oldest due rows (at most ``max_items``) that no open transaction holds, in
        insertion order. Due: never sent, or unconfirmed past its re-send time."""
        if max_items <= 0:
            raise ValueError("max_items must be positive")
        # Held rows all lie at or below the cursor: past it nothing needs skipping; after a
        # release (rewind) the scan starts over and may meet every held row.
        low = 0 if self._rewind else self._cursor
        limit = max_items + (len(self._held) if self._rewind else 0)
        fetched = self._db.execute(
            # "+due_ms": walk the rows in id order (the primary key), not through the due_ms index
            f"SELECT {_ROW} FROM outbox WHERE id > ? AND +due_ms <= ? ORDER BY id LIMIT ?",
            (low, self._now_ms(), limit),
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
        """Settle the rows of ``tx`` the broker acknowledged; release the rest for the next ``begin``.

        An acknowledged row is deleted (``published``) unless it must wait for the head-end's
        confirmation (see the module doc): then it is kept, due again after the ack timeout.
        Returns the number of acknowledged rows still stored when the transaction ended (a row
        confirmed while in flight is gone already).

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
        stored = [r for r in tx.rows if r.id in accepted and r.id in self._held]
        for row_id in ids:
            self._held.pop(row_id, None)  # a row confirmed in flight has left already
        if ids - accepted:
            self._rewind = True
        if not self._held:
            self._cursor, self._rewind = 0, False
        awaiting = [r for r in stored if r.keyed and self.confirm_by == "head-end"]
        leaving = sorted({r.id for r in stored} - {r.id for r in awaiting})
        with self._write():
            if awaiting:
                now = self._now_ms()
                self._db.executemany(
                    "UPDATE outbox SET sends = ?, due_ms = ? WHERE id = ?",
                    [(r.sends + 1, now + self._resend_delay_ms(r.sends + 1), r.id) for r in awaiting],
                )
                self._unconfirmed += sum(1 for r in awaiting if r.sends == 0)
            done = self._delete(leaving)
            self._counters["published"] += len(done)
            self._counters["resent"] += sum(1 for r in stored if r.sends > 0)
            self._save_counters(("published", "resent"))
        return len(stored)

    def confirm(self, ack: Ack) -> int:
        """Delete the rows ``ack`` names (batch seqs, event ids); return how many there were.

        Rows it names that are gone already (confirmed before, shed) are ignored: confirming is
        idempotent. The caller checks that ``ack`` is for this outbox's gateway.
        """
        by_seq = "SELECT id FROM outbox WHERE seq BETWEEN ? AND ?"
        ids = [row_id for lo, hi in ack.seqs for (row_id,) in self._db.execute(by_seq, (lo, hi))]
        by_event = "SELECT id FROM outbox WHERE event_id = ?"
        ids += [row_id for event in ack.events for (row_id,) in self._db.execute(by_event, (event,))]
        if not ids:
            return 0
        with self._write():
            done = self._delete(ids)
            self._counters["confirmed"] += len(done)
            self._save_counters(("confirmed",))
        for row_id, _ in done:
            self._held.pop(row_id, None)  # in flight: its end() finds it gone
        return len(done)

    def next_due_s(self) -> float | None:
        """Seconds until the next unconfirmed row is due for a re-send (0 if one is due now);
        None when no row waits for a confirmation."""
        due: int | None = self._db.execute("SELECT MIN(due_ms) FROM outbox WHERE due_ms > 0").fetchone()[0]
        if due is None:
            return None
        return max(0.0, (due - self._now_ms()) / 1000)

    # -- state --------------------------------------------------------------------------------

    def stats(self) -> OutboxStats:
        c = self._counters
        return OutboxStats(
            added=c["added"], published=c["published"], dropped={k: c[f"dropped.{k}"] for k in KINDS},
            pending=sum(self._rows.values()), pending_bytes=self._pending_bytes(), in_flight=len(self._held),
            max_bytes=self.max_bytes, policy=self.policy, corrupt_resets=c["corrupt_resets"],
            confirmed=c["confirmed"], unconfirmed=self._unconfirmed, resent=c["resent"],
            confirm=self.confirm_by,
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

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _resend_delay_ms(self, sends: int) -> int:
        """How long after its ``sends``-th PUBACK an unconfirmed row waits before the next send."""
        return min(self._resend_cap_ms, self._ack_timeout_ms << min(sends - 1, 40))

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
        self._saved = (dict(ob._counters), dict(ob._rows), dict(ob._bytes), ob._seq_next, ob._unconfirmed)
        if self._durable:  # SQLite only lets the safety level change outside a transaction
            ob._db.execute("PRAGMA synchronous = FULL")  # this commit fsyncs the WAL
        ob._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        ob = self._ob
        try:
            if exc_type is not None:
                ob._db.execute("ROLLBACK")
                ob._counters, ob._rows, ob._bytes, ob._seq_next, ob._unconfirmed = self._saved
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
