"""Run state carried across batches, per channel (VEE-08/09/19): a SQLite table shared by the
workers of a machine, keyed by (gateway, meter, quantity).

Contract
--------
* :meth:`RunStateStore.carry` is **one** query per batch (the gateway's rows), mapped onto the
  batch's meter table: a :class:`~ingest.rules.stages.RunCarry` for
  :func:`~ingest.pipeline.transform.transform`. Rows of meters not in the batch are dropped.
* :meth:`RunStateStore.save` writes the carry out of a whole group of batches in **one**
  transaction. The worker calls it after the group is durable and right before the batches'
  ``dedup.mark``: a redelivered batch is dedup'd before transform and never advances a run twice;
  a crash between the two costs a missed flag, never a false one (the redelivered batch does not
  link to a carry that already ends where it ends).
* A row is only ever replaced by one whose last step is later (``kernels.C_LAST``): a replayed
  old batch, or one of two workers that read the same carry at once, never winds a run back.
  Two workers handling consecutive batches of one gateway at once may read a stale carry: the
  later batch then does not continue the run (it restarts), so the flag is missed, never false.
* Bounded: rows not saved for ``max_age_s`` are dropped (every ``prune_every`` saves). A carry
  only applies to the batch that continues it, so an old row is useless anyway.

WAL with ``synchronous=NORMAL``; a save lost to power failure restarts those runs.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ingest.rules import kernels as k
from ingest.rules.stages import RunCarry

__all__ = ["RunStateStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_state (
    gateway  TEXT    NOT NULL,
    meter    TEXT    NOT NULL,
    quantity INTEGER NOT NULL,
    last_ts  INTEGER NOT NULL,
    saved_ms INTEGER NOT NULL,
    state    BLOB    NOT NULL,
    PRIMARY KEY (gateway, meter, quantity)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS run_state_saved ON run_state(saved_ms);
"""
_ROW_BYTES = 8 * k.NCARRY


class RunStateStore:
    """See the module contract. Thread-safe; each call is one statement or one transaction."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_age_s: float = 7 * 86_400.0,
        prune_every: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_age_s <= 0 or prune_every < 1:
            raise ValueError("max_age_s and prune_every must be positive")
        self.path = Path(path)
        self.max_age_s = max_age_s
        self.prune_every = prune_every
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._saves = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> RunStateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def carry(self, gateway: str, meter_ids: Sequence[str]) -> RunCarry:
        """The carried state of ``gateway``'s channels whose meter is in ``meter_ids`` (a batch's
        meter table; ``RunCarry.meter`` indexes it)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT meter, quantity, state FROM run_state WHERE gateway = ?", (gateway,)
            ).fetchall()
        if not rows:
            return RunCarry.empty()
        index = {m: i for i, m in enumerate(meter_ids)}
        meter = np.fromiter((index.get(m, -1) for m, _, _ in rows), np.int64, len(rows))
        quantity = np.fromiter((q for _, q, _ in rows), np.int64, len(rows))
        state = np.frombuffer(b"".join(s for _, _, s in rows), dtype=np.int64).reshape(len(rows), k.NCARRY)
        keep = meter >= 0
        return RunCarry(meter[keep].astype(np.uint32), quantity[keep].astype(np.uint16), state[keep].copy())

    def save(self, carries: Sequence[tuple[str, Sequence[str], RunCarry]]) -> None:
        """Write ``(gateway, meter_ids, carry out)`` of a group's batches in one transaction; a
        row only replaces one with an earlier last step."""
        now_ms = int(self._clock() * 1000)
        rows = [
            (gateway, meter_ids[m], q, last, now_ms, state.tobytes())
            for gateway, meter_ids, carry in carries
            for m, q, last, state in zip(
                carry.meter.tolist(),
                carry.quantity.tolist(),
                carry.state[:, k.C_LAST].tolist(),
                np.ascontiguousarray(carry.state),
                strict=True,
            )
        ]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO run_state(gateway, meter, quantity, last_ts, saved_ms, state) "
                    "VALUES (?,?,?,?,?,?) ON CONFLICT(gateway, meter, quantity) DO UPDATE SET "
                    "last_ts = excluded.last_ts, saved_ms = excluded.saved_ms, state = excluded.state "
                    "WHERE excluded.last_ts > run_state.last_ts",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._saves += 1
            due = self._saves >= self.prune_every
        if due:
            self.prune()

    def prune(self) -> int:
        """Drop rows not saved for ``max_age_s``; returns how many."""
        cutoff = int((self._clock() - self.max_age_s) * 1000)
        with self._lock:
            self._saves = 0
            return int(self._db.execute("DELETE FROM run_state WHERE saved_ms < ?", (cutoff,)).rowcount)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM run_state").fetchone()[0])
