"""Run state carried across batches, per channel (VEE-08/09/19): a table shared by the workers
(:mod:`ingest.pipeline.statedb`: a SQLite file for the workers of one machine, or with
``[state] url`` PostgreSQL for the workers of every machine), one row per gateway holding the
state of all its channels as arrays.

Contract
--------
* :meth:`RunStateStore.carry` is **one** query per batch (the gateway's row), mapped onto the
  batch's meter table with numpy (Python work per meter, none per channel or reading): a
  :class:`~ingest.rules.stages.RunCarry` for :func:`~ingest.pipeline.transform.transform`.
  Channels of meters not in the batch are dropped.
* :meth:`RunStateStore.save` merges the carry out of a whole group of batches into the store's
  state at once (vectorised; what :meth:`RunStateStore.carry` answers next) and writes it to the
  file at most every ``write_every_s`` (default 1 s; :meth:`RunStateStore.flush`, also at close
  and from the worker's timer): one transaction, one row per gateway, each merged onto the row as
  stored then, so another worker's later states are kept. The worker saves after the group is
  durable and right before the batches' ``dedup.mark``: a redelivered batch is dedup'd before
  transform and never advances a run twice; a crash before the write costs missed flags, never a
  false one (the next batch does not link to a carry that ends earlier than it starts).
* A channel's state is only ever replaced by one whose last step is later (``kernels.C_LAST``): a replayed
  old batch, or one of two workers that read the same carry at once, never winds a run back.
  Two workers handling consecutive batches of one gateway at once may read a stale carry: the
  later batch then does not continue the run (it restarts), so the flag is missed, never false.
* Bounded: a channel not saved for ``max_age_s`` is dropped when its gateway is next saved, and
  a gateway not saved for that long every ``prune_every`` saves. A carry only applies to the
  batch that continues it, so an old one is useless anyway.

SQLite: WAL with ``synchronous=NORMAL``; a write lost to power failure restarts those runs.
PostgreSQL: :meth:`RunStateStore.flush` takes each gateway's advisory lock (in gateway order)
before it reads the row it merges onto, so two machines writing one gateway at once keep both
their states (on SQLite the write lock does this). Raises
:class:`~protocols.errors.StateUnavailable` when PostgreSQL is unreachable; unsaved carries stay
in memory and are written by the next flush. Each store
keeps the last row it read or wrote per gateway in memory with the row's ``version`` (stored
before the blobs, in a rowid table, so reading it does not read them): a batch whose gateway no
other worker wrote since reads one integer, not the row. Writing a gateway's row costs about 100
bytes per channel, so writing it per batch cost the worker more CPU per reading than validating
it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ingest.pipeline.statedb import StateDb
from ingest.rules import kernels as k
from ingest.rules.stages import RunCarry

__all__ = ["RunStateStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_state (
    gateway  TEXT    PRIMARY KEY,
    version  INTEGER NOT NULL DEFAULT 0,  -- one more at every write: a reader's cached copy is current
    saved_ms INTEGER NOT NULL,
    channels INTEGER NOT NULL,
    meters   TEXT    NOT NULL,   -- JSON list: the gateway's meter table
    meter    BLOB    NOT NULL,   -- uint32 per channel: index into meters
    quantity BLOB    NOT NULL,   -- uint16 per channel
    state    BLOB    NOT NULL    -- int64 per channel: kernels.NCARRY columns, then the save time (ms)
);  -- a rowid table: reading the version stops before the blobs (WITHOUT ROWID reads the record)
CREATE INDEX IF NOT EXISTS run_state_saved ON run_state(saved_ms);
"""
_SCHEMA_PG = """
CREATE TABLE IF NOT EXISTS run_state (
    gateway  TEXT   PRIMARY KEY,
    version  BIGINT NOT NULL DEFAULT 0,
    saved_ms BIGINT NOT NULL,
    channels BIGINT NOT NULL,
    meters   TEXT   NOT NULL,
    meter    BYTEA  NOT NULL,
    quantity BYTEA  NOT NULL,
    state    BYTEA  NOT NULL
);
CREATE INDEX IF NOT EXISTS run_state_saved ON run_state(saved_ms);
"""
_UPSERT = (
    "INSERT INTO run_state(gateway, version, saved_ms, channels, meters, meter, quantity, state) "
    "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(gateway) DO UPDATE SET version = excluded.version, "
    "saved_ms = excluded.saved_ms, channels = excluded.channels, meters = excluded.meters, "
    "meter = excluded.meter, quantity = excluded.quantity, state = excluded.state"
)
_WIDTH = k.NCARRY + 1  # the carry row, then when it was saved


class _Rows:
    """A gateway's stored channels: meter table, and per channel meter index, quantity, state."""

    __slots__ = ("meter", "meters", "quantity", "state")

    def __init__(
        self,
        meters: list[str],
        meter: npt.NDArray[np.uint32],
        quantity: npt.NDArray[np.uint16],
        state: npt.NDArray[np.int64],
    ) -> None:
        self.meters, self.meter, self.quantity, self.state = meters, meter, quantity, state

    @classmethod
    def empty(cls) -> _Rows:
        return cls([], np.empty(0, np.uint32), np.empty(0, np.uint16), np.empty((0, _WIDTH), np.int64))

    @classmethod
    def decode(cls, row: tuple[str, bytes, bytes, bytes]) -> _Rows:
        meters, meter, quantity, state = row
        m = np.frombuffer(meter, dtype=np.uint32)
        return cls(
            json.loads(meters), m, np.frombuffer(quantity, dtype=np.uint16),
            np.frombuffer(state, dtype=np.int64).reshape(m.shape[0], _WIDTH),
        )  # fmt: skip


class RunStateStore:
    """See the module contract. Thread-safe; each call is one statement or one transaction."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_age_s: float = 7 * 86_400.0,
        prune_every: int = 1000,
        clock: Callable[[], float] = time.time,
        write_every_s: float = 1.0,
        url: str = "",
    ) -> None:
        if max_age_s <= 0 or prune_every < 1:
            raise ValueError("max_age_s and prune_every must be positive")
        self.path = Path(path)
        self.max_age_s = max_age_s
        self.prune_every = prune_every
        self._clock = clock
        self._lock = threading.Lock()
        self._db = StateDb(self.path, url=url)
        if self._db.dialect == "sqlite":
            self._adopt_unversioned()
        self._db.script(_SCHEMA, _SCHEMA_PG)
        self.write_every_s = write_every_s
        self._saves = 0
        self._written_s = clock()
        self._cache: dict[str, tuple[int, _Rows]] = {}  # as stored, at that version
        self._unsaved: dict[str, list[tuple[list[tuple[Sequence[str], RunCarry]], int]]] = {}
        self._merged: dict[str, tuple[int, _Rows]] = {}  # stored at that version + unsaved

    def _adopt_unversioned(self) -> None:
        """A file from before rows had a version: its rows moved into the current layout."""
        columns = [r[1] for r in self._db.execute("PRAGMA table_info(run_state)")]
        if not columns or "version" in columns:
            return
        self._db.script(
            "BEGIN IMMEDIATE; DROP INDEX IF EXISTS run_state_saved; "
            "ALTER TABLE run_state RENAME TO run_state_old;"
            + _SCHEMA
            + "INSERT INTO run_state(gateway, version, saved_ms, channels, meters, meter, quantity, state) "
            "SELECT gateway, 0, saved_ms, channels, meters, meter, quantity, state FROM run_state_old; "
            "DROP TABLE run_state_old; COMMIT;",
            "",
        )

    def close(self) -> None:
        """Write what is unsaved, then close."""
        self.flush()
        with self._lock:
            self._db.close()

    def __enter__(self) -> RunStateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _load(self, gateway: str) -> tuple[int, _Rows]:
        """The gateway's row and its version (0 and no channels where there is none): the cached
        copy while the stored version is the cached one's."""
        row = self._db.execute("SELECT version FROM run_state WHERE gateway = ?", (gateway,)).fetchone()
        if row is None:
            self._cache.pop(gateway, None)
            return 0, _Rows.empty()
        cached = self._cache.get(gateway)
        if cached is not None and cached[0] == row[0]:
            return cached
        full = self._db.execute(
            "SELECT version, meters, meter, quantity, state FROM run_state WHERE gateway = ?", (gateway,)
        ).fetchone()
        if full is None:
            return 0, _Rows.empty()
        loaded = int(full[0]), _Rows.decode(full[1:])
        self._cache[gateway] = loaded
        return loaded

    def carry(self, gateway: str, meter_ids: Sequence[str]) -> RunCarry:
        """The carried state of ``gateway``'s channels whose meter is in ``meter_ids`` (a batch's
        meter table; ``RunCarry.meter`` indexes it)."""
        with self._lock:
            _, rows = self._current(gateway)
        if rows.meter.shape[0] == 0:
            return RunCarry.empty()
        index = {m: i for i, m in enumerate(meter_ids)}
        to_batch = np.array([index.get(m, -1) for m in rows.meters], dtype=np.int64)
        meter = to_batch[rows.meter]
        keep = meter >= 0
        return RunCarry(
            meter[keep].astype(np.uint32), rows.quantity[keep].copy(),
            np.ascontiguousarray(rows.state[keep, : k.NCARRY]),
        )  # fmt: skip

    def _current(self, gateway: str) -> tuple[int, _Rows]:
        """The gateway's stored version, and its state: as stored, with this store's unsaved
        carries merged in (merged again onto the stored row when another store wrote it since).
        Under the lock."""
        version, stored = self._load(gateway)
        unsaved = self._unsaved.get(gateway)
        if not unsaved:
            return version, stored
        merged = self._merged.get(gateway)
        if merged is not None and merged[0] == version:
            return merged
        rows = stored
        for items, now_ms in unsaved:
            rows = self._merge(rows, items, now_ms)
        self._merged[gateway] = (version, rows)
        return version, rows

    def save(self, carries: Sequence[tuple[str, Sequence[str], RunCarry]]) -> None:
        """Merge ``(gateway, meter_ids, carry out)`` of a group's batches into this store's state
        (what :meth:`carry` answers at once); a channel's state only replaces one with an earlier
        last step. Written to the file (:meth:`flush`) when ``write_every_s`` passed since the
        last write: a crash loses at most that much run progress, which restarts those runs
        (missed flags, never false ones)."""
        by_gateway: dict[str, list[tuple[Sequence[str], RunCarry]]] = {}
        for gateway, meter_ids, carry in carries:
            if len(carry):
                by_gateway.setdefault(gateway, []).append((meter_ids, carry))
        if not by_gateway:
            return
        now_ms = int(self._clock() * 1000)
        with self._lock:
            for gateway, items in by_gateway.items():
                version, rows = self._current(gateway)
                self._unsaved.setdefault(gateway, []).append((items, now_ms))
                self._merged[gateway] = (version, self._merge(rows, items, now_ms))
            due = self._clock() - self._written_s >= self.write_every_s
        if due:
            self.flush()

    def flush(self) -> None:
        """Write every gateway with unsaved carries, in one transaction (each merged onto the row
        as stored now, so another store's later states are kept)."""
        written: dict[str, tuple[int, _Rows]] = {}
        with self._lock:
            self._written_s = self._clock()
            if not self._unsaved:
                return
            now_ms = int(self._written_s * 1000)
            with self._db.transaction() as db:
                for gateway in sorted(self._unsaved):  # one lock order for every machine
                    db.lock("run_state", gateway)
                    stored_version, rows = self._current(gateway)
                    version = stored_version + 1
                    db.execute(_UPSERT, (
                        gateway, version, now_ms, int(rows.meter.shape[0]), json.dumps(rows.meters),
                        rows.meter.tobytes(), rows.quantity.tobytes(), rows.state.tobytes(),
                    ))  # fmt: skip
                    written[gateway] = (version, rows)
            self._cache.update(written)
            self._unsaved.clear()
            self._merged.clear()
            self._saves += 1
            due = self._saves >= self.prune_every
        if due:
            self.prune()

    def _merge(self, old: _Rows, items: list[tuple[Sequence[str], RunCarry]], now_ms: int) -> _Rows:
        """``old`` with the carries of ``items``: per channel the state with the latest last step
        (the stored one on a tie), channels not saved for ``max_age_s`` dropped."""
        meters = list(old.meters)
        index = {m: i for i, m in enumerate(meters)}
        parts_m, parts_q, parts_s = [old.meter], [old.quantity], [old.state]
        for meter_ids, carry in items:
            to_table = np.array([index.setdefault(m, len(index)) for m in meter_ids], dtype=np.uint32)
            parts_m.append(to_table[carry.meter])
            parts_q.append(carry.quantity)
            stamped = np.empty((len(carry), _WIDTH), dtype=np.int64)
            stamped[:, : k.NCARRY] = carry.state
            stamped[:, k.NCARRY] = now_ms
            parts_s.append(stamped)
        meters = list(index)
        meter, quantity, state = np.concatenate(parts_m), np.concatenate(parts_q), np.concatenate(parts_s)
        stored = np.zeros(meter.shape[0], dtype=np.int64)
        stored[: old.meter.shape[0]] = 1  # on a tie of the last step the stored state stays
        key = (meter.astype(np.int64) << 16) | quantity.astype(np.int64)
        order = np.lexsort((stored, state[:, k.C_LAST], key))  # by key, then last step, then stored
        last_of_key = np.ones(order.shape[0], dtype=np.bool_)
        last_of_key[:-1] = key[order][1:] != key[order][:-1]
        pick = order[last_of_key]
        pick = pick[state[pick, k.NCARRY] >= now_ms - int(self.max_age_s * 1000)]
        used = np.unique(meter[pick])  # compact the meter table to the meters still present
        remap = np.full(len(meters), -1, dtype=np.int64)
        remap[used] = np.arange(used.shape[0])
        return _Rows(
            [meters[i] for i in used.tolist()], remap[meter[pick]].astype(np.uint32),
            np.ascontiguousarray(quantity[pick]), np.ascontiguousarray(state[pick]),
        )  # fmt: skip

    def prune(self) -> int:
        """Drop gateways not saved for ``max_age_s``; returns how many channels went with them."""
        cutoff = int((self._clock() - self.max_age_s) * 1000)
        with self._lock:
            self._saves = 0
            self._cache.clear()
            gone = self._db.execute(
                "SELECT COALESCE(SUM(channels), 0) FROM run_state WHERE saved_ms < ?", (cutoff,)
            ).fetchone()[0]
            self._db.execute("DELETE FROM run_state WHERE saved_ms < ?", (cutoff,))
            return int(gone)

    def __len__(self) -> int:
        """Channels stored, all gateways (after writing what is unsaved)."""
        self.flush()
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(channels), 0) FROM run_state").fetchone()[0])
