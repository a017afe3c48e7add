"""Run state carried across batches, per channel (VEE-08/09/19): a SQLite table shared by the
workers of a machine, one row per gateway holding the state of all its channels as arrays.

Contract
--------
* :meth:`RunStateStore.carry` is **one** query per batch (the gateway's row), mapped onto the
  batch's meter table with numpy (Python work per meter, none per channel or reading): a
  :class:`~ingest.rules.stages.RunCarry` for :func:`~ingest.pipeline.transform.transform`.
  Channels of meters not in the batch are dropped.
* :meth:`RunStateStore.save` merges the carry out of a whole group of batches into their
  gateways' rows in **one** transaction (vectorised; one row written per gateway). The worker
  calls it after the group is durable and right before the batches' ``dedup.mark``: a
  redelivered batch is dedup'd before transform and never advances a run twice; a crash between
  the two costs a missed flag, never a false one (the redelivered batch does not link to a carry
  that already ends where it ends).
* A channel's state is only ever replaced by one whose last step is later (``kernels.C_LAST``): a replayed
  old batch, or one of two workers that read the same carry at once, never winds a run back.
  Two workers handling consecutive batches of one gateway at once may read a stale carry: the
  later batch then does not continue the run (it restarts), so the flag is missed, never false.
* Bounded: a channel not saved for ``max_age_s`` is dropped when its gateway is next saved, and
  a gateway not saved for that long every ``prune_every`` saves. A carry only applies to the
  batch that continues it, so an old one is useless anyway.

WAL with ``synchronous=NORMAL``; a save lost to power failure restarts those runs.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ingest.rules import kernels as k
from ingest.rules.stages import RunCarry

__all__ = ["RunStateStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_state (
    gateway  TEXT    PRIMARY KEY,
    saved_ms INTEGER NOT NULL,
    channels INTEGER NOT NULL,
    meters   TEXT    NOT NULL,   -- JSON list: the gateway's meter table
    meter    BLOB    NOT NULL,   -- uint32 per channel: index into meters
    quantity BLOB    NOT NULL,   -- uint16 per channel
    state    BLOB    NOT NULL    -- int64 per channel: kernels.NCARRY columns, then the save time (ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS run_state_saved ON run_state(saved_ms);
"""
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
    ) -> None:
        if max_age_s <= 0 or prune_every < 1:
            raise ValueError("max_age_s and prune_every must be positive")
        self.path = Path(path)
        self.max_age_s = max_age_s
        self.prune_every = prune_every
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
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

    def _load(self, gateway: str) -> _Rows:
        row = self._db.execute(
            "SELECT meters, meter, quantity, state FROM run_state WHERE gateway = ?", (gateway,)
        ).fetchone()
        return _Rows.decode(row) if row else _Rows.empty()

    def carry(self, gateway: str, meter_ids: Sequence[str]) -> RunCarry:
        """The carried state of ``gateway``'s channels whose meter is in ``meter_ids`` (a batch's
        meter table; ``RunCarry.meter`` indexes it)."""
        with self._lock:
            rows = self._load(gateway)
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

    def save(self, carries: Sequence[tuple[str, Sequence[str], RunCarry]]) -> None:
        """Merge ``(gateway, meter_ids, carry out)`` of a group's batches in one transaction; a
        channel's state only replaces one with an earlier last step."""
        by_gateway: dict[str, list[tuple[Sequence[str], RunCarry]]] = {}
        for gateway, meter_ids, carry in carries:
            if len(carry):
                by_gateway.setdefault(gateway, []).append((meter_ids, carry))
        if not by_gateway:
            return
        now_ms = int(self._clock() * 1000)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for gateway, items in by_gateway.items():
                    rows = self._merge(self._load(gateway), items, now_ms)
                    self._db.execute(
                        "INSERT OR REPLACE INTO run_state(gateway, saved_ms, channels, meters, meter, "
                        "quantity, state) VALUES (?,?,?,?,?,?,?)",
                        (
                            gateway, now_ms, int(rows.meter.shape[0]), json.dumps(rows.meters),
                            rows.meter.tobytes(), rows.quantity.tobytes(), rows.state.tobytes(),
                        ),
                    )  # fmt: skip
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
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
            gone = self._db.execute(
                "SELECT COALESCE(SUM(channels), 0) FROM run_state WHERE saved_ms < ?", (cutoff,)
            ).fetchone()[0]
            self._db.execute("DELETE FROM run_state WHERE saved_ms < ?", (cutoff,))
            return int(gone)

    def __len__(self) -> int:
        """Channels stored, all gateways."""
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(channels), 0) FROM run_state").fetchone()[0])
