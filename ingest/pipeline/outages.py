"""Open area-outage alarms (OUT-02), shared by the workers, so that an outage is one alarm at its
first power-down whatever order its batches are handled in.

The workers correlate power-downs as their batches are written, and batches are not written in
the order they were read: a worker commits several groups at once, several workers share a
gateway's stream, and a batch re-sent after an outage arrives late. The correlation that runs
first may therefore see only the later points of an outage. This store is where the workers agree
on what the outage's alarm is.

Contract
--------
* :meth:`AreaAlarmStore.merge` takes an outage the correlation found (area, time of its first
  power-down, meters down) and, in one transaction holding the area's lock, either opens an alarm
  for it or merges it into the area's open alarm: the one whose time lies within ``hold_ms`` of
  the outage's. A merge keeps the earlier time and the larger count, so an earlier power-down
  handled later **moves the alarm back** to it. It returns the alarm as stored now and what
  changed (:class:`Merge`).
* ``known``: an alarm already in the sink that this store does not hold (pruned, or stored before
  the store held alarms): adopted as published, so it is neither opened nor announced twice.
* Each change bumps the alarm's ``version``; ``last_ms`` is the latest time the alarm has had. The
  worker writes the alarm at its time and drops the area's alarm points in ``(ts_ms, last_ms]``,
  then reads the alarm again (:meth:`AreaAlarmStore.current`): a version that moved meanwhile
  (another worker merged) is written again. The sink then ends as the store says, whatever the
  interleaving: the last write of each worker is of a version that was current after it.
* An alarm is published once: :meth:`AreaAlarmStore.mark_published` after the PUBACK. A publish
  that failed is retried by the next merge of the area (a repeat carries the same area and time).
* Bounded: alarms older than ``max_age_s`` (by their time) are dropped when an alarm is opened;
  the sink's copy then stands for them (``known``).

Storage (:mod:`ingest.pipeline.statedb`): table ``area_alarms`` in the run-state database (the
SQLite file of ``[pipeline] state_path``, or with ``[state] url`` PostgreSQL, where each merge
holds the advisory lock of its area). Raises :class:`~protocols.errors.StateUnavailable` when
PostgreSQL is unreachable.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ingest.pipeline.statedb import StateDb

__all__ = ["AreaAlarmStore", "Merge", "OpenAlarm"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS area_alarms (
    area      TEXT    NOT NULL,
    ts_ms     INTEGER NOT NULL,
    events    INTEGER NOT NULL,
    last_ms   INTEGER NOT NULL,
    version   INTEGER NOT NULL,
    published INTEGER NOT NULL,
    PRIMARY KEY (area, ts_ms)
) WITHOUT ROWID;
"""
_SCHEMA_PG = """
CREATE TABLE IF NOT EXISTS area_alarms (
    area      TEXT    NOT NULL,
    ts_ms     BIGINT  NOT NULL,
    events    BIGINT  NOT NULL,
    last_ms   BIGINT  NOT NULL,
    version   BIGINT  NOT NULL,
    published INTEGER NOT NULL,
    PRIMARY KEY (area, ts_ms)
);
"""
_COLS = "area, ts_ms, events, last_ms, version, published"


class Merge(enum.Enum):
    """What :meth:`AreaAlarmStore.merge` did to the area's alarms."""

    OPENED = "opened"  # a new alarm
    MOVED = "moved"  # the open alarm now starts earlier (and may count more meters)
    COUNTED = "counted"  # the open alarm counts more meters
    SAME = "same"  # nothing new


@dataclass(frozen=True, slots=True)
class OpenAlarm:
    """An area's alarm as the store holds it (see the module contract)."""

    area: str
    ts_ms: int
    events: int
    last_ms: int
    version: int
    published: bool


class AreaAlarmStore:
    """See the module contract. Thread-safe; each call is one transaction."""

    def __init__(
        self,
        path: str | Path,
        *,
        url: str = "",
        max_age_s: float = 7 * 86_400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_age_s <= 0:
            raise ValueError("max_age_s must be positive")
        self.path = Path(path)
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._db = StateDb(self.path, url=url)
        self._db.script(_SCHEMA, _SCHEMA_PG)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def merge(
        self, area: str, ts_ms: int, events: int, hold_ms: int, known: tuple[int, int] | None = None
    ) -> tuple[OpenAlarm, Merge]:
        """Open or merge the outage of ``area`` starting at ``ts_ms`` with ``events`` meters down;
        ``known``: (time, events) of the area's alarm in the sink within ``hold_ms``, if any."""
        with self._lock, self._db.transaction() as db:
            db.lock("area_alarms", area)
            row = _near(db, area, ts_ms, hold_ms)
            if row is None and known is not None:
                k_ts, k_events = known
                db.execute(
                    f"INSERT INTO area_alarms({_COLS}) VALUES (?, ?, ?, ?, 1, 1) ON CONFLICT DO NOTHING",
                    (area, k_ts, k_events, k_ts),
                )
                row = _near(db, area, ts_ms, hold_ms)
            if row is None:
                cutoff = int((self._clock() - self.max_age_s) * 1000)
                db.execute("DELETE FROM area_alarms WHERE ts_ms < ?", (cutoff,))
                db.execute(
                    f"INSERT INTO area_alarms({_COLS}) VALUES (?, ?, ?, ?, 1, 0)",
                    (area, ts_ms, events, ts_ms),
                )
                return OpenAlarm(area, ts_ms, events, ts_ms, 1, False), Merge.OPENED
            new_ts, new_events = min(row.ts_ms, ts_ms), max(row.events, events)
            if (new_ts, new_events) == (row.ts_ms, row.events):
                return row, Merge.SAME
            version = row.version + 1
            db.execute(
                "UPDATE area_alarms SET ts_ms = ?, events = ?, version = ? WHERE area = ? AND ts_ms = ?",
                (new_ts, new_events, version, area, row.ts_ms),
            )
            moved = new_ts < row.ts_ms
            merged = OpenAlarm(area, new_ts, new_events, row.last_ms, version, row.published)
            return merged, Merge.MOVED if moved else Merge.COUNTED

    def current(self, area: str, near_ms: int, hold_ms: int) -> OpenAlarm | None:
        """The area's alarm within ``hold_ms`` of ``near_ms`` (the earliest), as stored now."""
        with self._lock:
            return _near(self._db, area, near_ms, hold_ms)

    def mark_published(self, area: str, ts_ms: int) -> None:
        """The alarm at ``ts_ms`` was published (PUBACK received)."""
        with self._lock, self._db.transaction() as db:
            db.execute("UPDATE area_alarms SET published = 1 WHERE area = ? AND ts_ms = ?", (area, ts_ms))

    def alarms(self) -> list[OpenAlarm]:
        """Every alarm held, by area and time (for tests and inspection)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLS} FROM area_alarms ORDER BY area, ts_ms").fetchall()
        return [_alarm(r) for r in rows]


def _near(db: StateDb, area: str, ts_ms: int, hold_ms: int) -> OpenAlarm | None:
    row = db.execute(
        f"SELECT {_COLS} FROM area_alarms WHERE area = ? AND ts_ms >= ? AND ts_ms <= ? "
        "ORDER BY ts_ms LIMIT 1",
        (area, ts_ms - hold_ms, ts_ms + hold_ms),
    ).fetchone()
    return None if row is None else _alarm(row)


def _alarm(row: tuple[str, int, int, int, int, int]) -> OpenAlarm:
    area, ts, events, last, version, published = row
    return OpenAlarm(area, int(ts), int(events), int(last), int(version), bool(published))
