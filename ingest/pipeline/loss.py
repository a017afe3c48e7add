"""Loss accounting: per gateway, which readings batches are durable and which are missing.

Every gateway numbers its readings batches densely (1, 2, 3, ...). The head-end records, per
gateway, the seq ranges it has made durable; the **missing** batches are the holes between the
lowest and the highest durable seq. Each hole remembers when it was first seen open. A hole that
stays open longer than ``[loss] gap_alarm_s`` raises one ``seq_gap`` alarm. A hole closes when the
missing batch arrives (the edge re-sends what the head-end has not confirmed). "Batches lost
between edge and InfluxDB" is then a number: :meth:`LossStore.missing`, the gauge
``amigw_ingest_missing_batches``, the CLI ``amigw ingest --loss``.

Contract
--------
* :meth:`LossStore.record` is called with the seqs of batches that are durable: written to
  InfluxDB and dedup-marked, dead-lettered with a reason, or recognised as a duplicate of a batch
  already durable. It merges them into the gateway's ranges (adjacent ranges merge, so a gateway
  that loses nothing is one row), closes or splits the holes they fall into (a split part keeps
  its first-seen time and alarm state), and opens a hole for any new space between the ranges.
  Seqs outside ``1..2**63-1`` are ignored.
* **Sequence reset.** A gateway whose outbox was wiped starts again at seq 1. Dedup notices: the
  seq is known with a different payload digest (``seq_reuse``). When such a reused seq lies inside
  the gateway's durable ranges, :meth:`record` starts the gateway afresh: the batches of its open
  holes can never arrive any more (they were in the wiped outbox), so they are counted as
  **lost** (per gateway, kept in the store), reported by :meth:`record`'s return value, and
  announced by a ``seq_reset`` alarm; the old ranges are dropped and the new seqs are recorded.
  A reset whose reused seqs dedup has already forgotten (beyond ``[dedup] keep_per_gateway`` or
  ``max_age_s``) is not seen: the new seqs fall inside the old ranges and change nothing.
* Alarms are claimed, so that each is raised once by one worker: :meth:`claim_alarms` marks the
  due holes and the unannounced resets as alarmed and returns them; a caller that could not write
  the alarm gives it back with :meth:`release` and it is claimed again at the next check.
* Bounded: a gateway costs one row per durable range and one per open hole; ranges merge, so a
  gateway whose holes close is one row again.

Storage (:mod:`ingest.pipeline.statedb`): SQLite (WAL) in ``[loss] path``, shared by the worker
processes of one machine (each change is one ``BEGIN IMMEDIATE`` transaction; concurrent workers
wait on SQLite's lock), or, with ``[state] url``, PostgreSQL, shared by the workers of every
machine. With ingest on several machines the account must be the shared one: a machine's own file
sees only the seqs that machine processed, and reports the others' as holes. On PostgreSQL each
:meth:`LossStore.record` holds its gateway's advisory lock (the merge reads the ranges and
rewrites them: two machines recording one gateway at once would otherwise lose a range), and
:meth:`LossStore.claim_alarms` one lock of its own (so each alarm is claimed by one worker).
Raises :class:`~protocols.errors.StateUnavailable` when PostgreSQL is unreachable (the batches are
then not confirmed, and recorded when the edge re-sends them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ingest.pipeline.statedb import StateDb
from protocols.acks import seq_ranges

__all__ = ["Alarm", "Gap", "GatewayLoss", "LossConfig", "LossStore", "Reset"]

MAX_SEQ = 2**63 - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS durable (
    gateway TEXT    NOT NULL,
    lo      INTEGER NOT NULL,
    hi      INTEGER NOT NULL,
    PRIMARY KEY (gateway, lo)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    gateway    TEXT    NOT NULL,
    lo         INTEGER NOT NULL,
    hi         INTEGER NOT NULL,
    opened_ms  INTEGER NOT NULL,
    alarmed_ms INTEGER,
    PRIMARY KEY (gateway, lo)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS gaps_opened ON gaps(opened_ms);
CREATE TABLE IF NOT EXISTS resets (
    gateway   TEXT    NOT NULL PRIMARY KEY,
    resets    INTEGER NOT NULL,
    lost      INTEGER NOT NULL,
    last_ms   INTEGER NOT NULL,
    last_lost INTEGER NOT NULL,
    last_gaps INTEGER NOT NULL,
    alarmed   INTEGER NOT NULL
) WITHOUT ROWID;
"""
_SCHEMA_PG = """
CREATE TABLE IF NOT EXISTS durable (
    gateway TEXT   NOT NULL,
    lo      BIGINT NOT NULL,
    hi      BIGINT NOT NULL,
    PRIMARY KEY (gateway, lo)
);
CREATE TABLE IF NOT EXISTS gaps (
    gateway    TEXT   NOT NULL,
    lo         BIGINT NOT NULL,
    hi         BIGINT NOT NULL,
    opened_ms  BIGINT NOT NULL,
    alarmed_ms BIGINT,
    PRIMARY KEY (gateway, lo)
);
CREATE INDEX IF NOT EXISTS gaps_opened ON gaps(opened_ms);
CREATE TABLE IF NOT EXISTS resets (
    gateway   TEXT   NOT NULL PRIMARY KEY,
    resets    BIGINT NOT NULL,
    lost      BIGINT NOT NULL,
    last_ms   BIGINT NOT NULL,
    last_lost BIGINT NOT NULL,
    last_gaps BIGINT NOT NULL,
    alarmed   INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class LossConfig:
    """The ``[loss]`` section."""

    path: str = "loss.sqlite"
    gap_alarm_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: must not be empty")
        if self.gap_alarm_s <= 0:
            raise ValueError(f"gap_alarm_s: expected > 0, got {self.gap_alarm_s}")

    @property
    def check_s(self) -> float:
        """How often a worker updates the gauge and looks for due alarms."""
        return min(5.0, max(0.1, self.gap_alarm_s / 4))


@dataclass(frozen=True, slots=True)
class Gap:
    """Missing seqs ``first..last`` of one gateway, open since ``opened_ms``."""

    gateway: str
    first: int
    last: int
    opened_ms: int
    alarmed_ms: int | None = None

    @property
    def missing(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True, slots=True)
class Reset:
    """A gateway's sequence started again; ``gaps`` were open then and are counted as lost."""

    gateway: str
    at_ms: int
    gaps: tuple[Gap, ...]

    @property
    def lost(self) -> int:
        return sum(g.missing for g in self.gaps)


@dataclass(frozen=True, slots=True)
class Alarm:
    """One alarm to raise: ``kind`` ``seq_gap`` (the gateway's holes that came due together, at
    the first one's first-seen time) or ``seq_reset`` (at the reset's time)."""

    kind: str
    gateway: str
    ts_ms: int
    gaps: int
    missing: int
    first: int = 0
    last: int = 0
    claimed_ms: int = 0


@dataclass(frozen=True, slots=True)
class GatewayLoss:
    """One gateway's account: the durable span, its open holes, and what resets lost."""

    gateway: str
    first: int | None
    last: int | None
    gaps: tuple[Gap, ...]
    resets: int = 0
    lost: int = 0

    @property
    def missing(self) -> int:
        return sum(g.missing for g in self.gaps)


class LossStore:
    """SQLite (WAL) account of durable seq ranges and open holes per gateway (module contract)."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time, url: str = "") -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = StateDb(self.path, url=url)
        self._db.script(_SCHEMA, _SCHEMA_PG)

    @classmethod
    def from_config(cls, config: LossConfig, url: str = "") -> LossStore:
        """The ``[loss]`` account, in ``url``'s database (``[state] url``) when given."""
        return cls(config.path, url=url)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> LossStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- recording ---------------------------------------------------------------------------

    def record(self, gateway: str, seqs: Iterable[int], *, reused: Iterable[int] = ()) -> Reset | None:
        """Record durable ``seqs`` of ``gateway``. ``reused``: those of them dedup found with a
        different digest; one inside the durable ranges resets the gateway first (returned)."""
        ranges = seq_ranges(s for s in seqs if 1 <= s <= MAX_SEQ)
        if not ranges:
            return None
        now = self._now_ms()
        with self._tx("loss", gateway) as db:
            reset = None
            if any(self._covered(db, gateway, s) for s in set(reused)):
                reset = self._reset(db, gateway, now)
            for lo, hi in ranges:
                self._add(db, gateway, lo, hi, now)
        return reset

    def _add(self, db: StateDb, gw: str, a: int, b: int, now: int) -> None:
        first = db.execute("SELECT MIN(lo) FROM durable WHERE gateway = ?", (gw,)).fetchone()[0]
        top = db.execute(
            "SELECT hi FROM durable WHERE gateway = ? ORDER BY lo DESC LIMIT 1", (gw,)
        ).fetchone()
        touching = _overlapping(db, "durable", "lo, hi", gw, a - 1, min(b + 1, MAX_SEQ))
        lo, hi = min([a, *(r[0] for r in touching)]), max([b, *(r[1] for r in touching)])
        db.executemany("DELETE FROM durable WHERE gateway = ? AND lo = ?", [(gw, r[0]) for r in touching])
        db.execute("INSERT INTO durable(gateway, lo, hi) VALUES (?,?,?)", (gw, lo, hi))
        for g_lo, g_hi, opened, alarmed in _overlapping(
            db, "gaps", "lo, hi, opened_ms, alarmed_ms", gw, a, b
        ):
            db.execute("DELETE FROM gaps WHERE gateway = ? AND lo = ?", (gw, g_lo))
            parts = [(g_lo, a - 1)] if g_lo < a else []
            parts += [(b + 1, g_hi)] if g_hi > b else []
            for p_lo, p_hi in parts:
                self._open(db, gw, p_lo, p_hi, opened, alarmed)
        if first is None:
            return
        if a > top[0] + 1:
            self._open(db, gw, top[0] + 1, a - 1, now)
        if b < first - 1:
            self._open(db, gw, b + 1, first - 1, now)

    @staticmethod
    def _open(db: StateDb, gw: str, lo: int, hi: int, opened: int, alarmed: int | None = None) -> None:
        db.execute(
            "INSERT INTO gaps(gateway, lo, hi, opened_ms, alarmed_ms) VALUES (?,?,?,?,?)",
            (gw, lo, hi, opened, alarmed),
        )

    @staticmethod
    def _covered(db: StateDb, gw: str, seq: int) -> bool:
        row = db.execute(
            "SELECT hi FROM durable WHERE gateway = ? AND lo <= ? ORDER BY lo DESC LIMIT 1", (gw, seq)
        ).fetchone()
        return row is not None and row[0] >= seq

    def _reset(self, db: StateDb, gw: str, now: int) -> Reset:
        gaps = tuple(
            Gap(gw, lo, hi, opened, alarmed)
            for lo, hi, opened, alarmed in db.execute(
                "SELECT lo, hi, opened_ms, alarmed_ms FROM gaps WHERE gateway = ? ORDER BY lo", (gw,)
            )
        )
        reset = Reset(gw, now, gaps)
        db.execute("DELETE FROM durable WHERE gateway = ?", (gw,))
        db.execute("DELETE FROM gaps WHERE gateway = ?", (gw,))
        db.execute(
            "INSERT INTO resets(gateway, resets, lost, last_ms, last_lost, last_gaps, alarmed) "
            "VALUES (?, 1, ?, ?, ?, ?, 0) ON CONFLICT(gateway) DO UPDATE SET resets = resets.resets + 1, "
            "lost = resets.lost + excluded.lost, last_ms = excluded.last_ms, last_lost = excluded.last_lost, "
            "last_gaps = excluded.last_gaps, alarmed = 0",
            (gw, reset.lost, now, reset.lost, len(gaps)),
        )
        return reset

    # -- alarms ------------------------------------------------------------------------------

    def claim_alarms(self, gap_alarm_s: float) -> list[Alarm]:
        """Mark as alarmed, and return, every hole open longer than ``gap_alarm_s`` and not
        alarmed yet (one :class:`Alarm` per gateway) and every reset not announced yet."""
        now = self._now_ms()
        due_ms = now - int(gap_alarm_s * 1000)
        with self._tx("loss-alarms") as db:
            rows = db.execute(
                "SELECT gateway, lo, hi, opened_ms FROM gaps WHERE alarmed_ms IS NULL AND opened_ms <= ? "
                "ORDER BY gateway, lo",
                (due_ms,),
            ).fetchall()
            db.execute(
                "UPDATE gaps SET alarmed_ms = ? WHERE alarmed_ms IS NULL AND opened_ms <= ?", (now, due_ms)
            )
            resets = db.execute(
                "SELECT gateway, last_ms, last_gaps, last_lost FROM resets WHERE alarmed = 0 ORDER BY gateway"
            ).fetchall()
            db.execute("UPDATE resets SET alarmed = 1 WHERE alarmed = 0")
        by_gw: dict[str, list[tuple[int, int, int]]] = {}
        for gw, lo, hi, opened in rows:
            by_gw.setdefault(gw, []).append((lo, hi, opened))
        alarms = []
        for gw, gaps in by_gw.items():
            missing = sum(hi - lo + 1 for lo, hi, _ in gaps)
            opened = min(g[2] for g in gaps)
            alarms.append(Alarm("seq_gap", gw, opened, len(gaps), missing, gaps[0][0], gaps[-1][1], now))
        alarms += [Alarm("seq_reset", gw, ts, n, lost, claimed_ms=now) for gw, ts, n, lost in resets]
        return alarms

    def release(self, alarm: Alarm) -> None:
        """Give a claimed alarm back (it could not be written): it is claimed again next time."""
        with self._tx("loss-alarms") as db:
            if alarm.kind == "seq_reset":
                db.execute(
                    "UPDATE resets SET alarmed = 0 WHERE gateway = ? AND last_ms = ?",
                    (alarm.gateway, alarm.ts_ms),
                )
            else:
                db.execute(
                    "UPDATE gaps SET alarmed_ms = NULL WHERE gateway = ? AND alarmed_ms = ?",
                    (alarm.gateway, alarm.claimed_ms),
                )

    # -- reading -----------------------------------------------------------------------------

    def missing(self) -> int:
        """Batches missing over all gateways (the sum of the open holes)."""
        with self._lock:
            total = self._db.execute("SELECT COALESCE(SUM(hi - lo + 1), 0) FROM gaps").fetchone()[0]
        return int(total)

    def report(self) -> list[GatewayLoss]:
        """Every gateway's account, by gateway id."""
        with self._lock:
            spans = self._db.execute(
                "SELECT gateway, MIN(lo), MAX(hi) FROM durable GROUP BY gateway"
            ).fetchall()
            gaps = self._db.execute(
                "SELECT gateway, lo, hi, opened_ms, alarmed_ms FROM gaps ORDER BY gateway, lo"
            ).fetchall()
            resets = self._db.execute("SELECT gateway, resets, lost FROM resets").fetchall()
        by_gw: dict[str, list[Gap]] = {}
        for gw, lo, hi, opened, alarmed in gaps:
            by_gw.setdefault(gw, []).append(Gap(gw, lo, hi, opened, alarmed))
        span = {gw: (lo, hi) for gw, lo, hi in spans}
        reset = {gw: (n, lost) for gw, n, lost in resets}
        return [
            GatewayLoss(gw, *span.get(gw, (None, None)), tuple(by_gw.get(gw, ())), *reset.get(gw, (0, 0)))
            for gw in sorted(span.keys() | by_gw.keys() | reset.keys())
        ]

    # -- helpers -----------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    @contextmanager
    def _tx(self, *lock: str) -> Iterator[StateDb]:
        """One write transaction, holding SQLite's write lock from the start (other workers wait),
        or on PostgreSQL the advisory lock ``lock``."""
        with self._lock, self._db.transaction() as db:
            db.lock(*lock)
            yield db


def _overlapping(db: StateDb, table: str, cols: str, gw: str, a: int, b: int) -> list[tuple[int, ...]]:
    """Rows of ``table`` (non-overlapping ranges keyed by ``lo``) that intersect ``[a, b]``: the
    one starting before ``a`` if it reaches ``a``, and those starting within; two index seeks."""
    before = db.execute(
        f"SELECT {cols} FROM {table} WHERE gateway = ? AND lo < ? ORDER BY lo DESC LIMIT 1", (gw, a)
    ).fetchone()
    within = db.execute(
        f"SELECT {cols} FROM {table} WHERE gateway = ? AND lo >= ? AND lo <= ? ORDER BY lo", (gw, a, b)
    ).fetchall()
    return ([before] if before is not None and before[1] >= a else []) + within
