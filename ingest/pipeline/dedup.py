"""Persistent record of processed batches, keyed by (gateway, seq): skip redelivered work.

Contract
--------
* :meth:`DedupStore.seen` is true only when ``(gateway, seq)`` was :meth:`DedupStore.mark`-ed and
  is still remembered. :meth:`mark` must be called only **after** the batch's data is durably
  written (InfluxDB answered 2xx, or its rejected lines sit in the dead-letter store) and before
  the MQTT ack, so a crash between the write and the mark only costs a redundant rewrite.
* Optionally a short ``digest`` of the payload is stored with the key. ``seen`` with a digest that
  differs from the stored one answers *false* and counts a ``seq_reuse``: a gateway whose outbox
  was wiped restarts its sequence, and its new batch 1 must not be skipped as "already seen".
  :meth:`DedupStore.mark` of such a batch returns True (loss accounting starts the gateway afresh).
* Bounded: per gateway, only the newest ``keep_per_gateway`` seqs are kept (pruned every
  ``prune_every`` marks of that gateway, so the table stays between N and N + prune_every rows per
  gateway), and entries older than ``max_age_s`` are dropped.

Why forgetting is safe
----------------------
Pruning only ever turns a true "seen" into "not seen"; it never invents a "seen" (there is no
"everything below the low-water mark counts as seen" rule). A forgotten batch that comes back is
processed again, and that is harmless by construction: the sink's points are keyed by series and
timestamp, so rewriting them is an idempotent overwrite, and fee control charges exactly once per
(meter, interval) in its own ledger (DESIGN §6). What dedup saves is the *work* of the common
redelivery: after a worker crash the broker resends the last few unacked batches of a persistent
session, which are the newest seqs and well inside the kept window. A low-water-mark rule would
not be safe here: with a shared subscription, seq 50 of a gateway may still sit unacked at another
worker (or in a crashed worker's session) while this one has processed seqs up to 10,000.

Pending rollups
---------------
The same database holds the **periods still to be rolled up** (:mod:`ingest.pipeline.rollup`):
:meth:`mark` records the batch and the ``(gateway, kind, period start)`` keys whose totals it
changed (kind ``hour`` or ``day``, local periods, epoch ms) in **one transaction**, before the MQTT
ack, with the time of the touch. The rollup job takes the keys that are due
(:meth:`claim_due`: the period ended and nothing touched it for ``delay``), computes and writes
their totals, and only then drops them (:meth:`done_periods`), each only if no batch touched it
since it was claimed (a version counter): a batch that lands during a rollup leaves its key owed,
and the period is rolled up again. A claim is a lease: a worker that dies holding it leaves the key
to be claimed again after ``lease``, or at once when it starts again under the same name
(:meth:`release_claims`). A crash anywhere therefore loses no period's totals: the next
start rolls up what is owed.

Storage (:mod:`ingest.pipeline.statedb`): a SQLite file (``[dedup] path``, WAL with
``synchronous=NORMAL``), shared by the workers of one machine, or, with ``[state] url``, PostgreSQL,
shared by the workers of every machine. A mark lost to power failure only makes a later
redelivery look new, which, as above, costs a rewrite and never loses data. On PostgreSQL the
marks of one gateway are serialised by its advisory lock (the read of the old digest and the
write are one step for every machine), every writer touches owed periods in one order, and
:meth:`DedupStore.claim_due` skips the rows another worker holds (``FOR UPDATE SKIP LOCKED``).
Synchronous and thread-safe; each call is one small indexed statement or one transaction.
Raises :class:`~protocols.errors.StateUnavailable` when PostgreSQL is unreachable (nothing was
changed; the caller retries).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ingest.pipeline.statedb import StateDb

__all__ = ["PERIOD_MS", "DedupConfig", "DedupStats", "DedupStore", "PendingPeriod", "Period"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS processed (
    gateway TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    digest  BLOB,
    ts_ms   INTEGER NOT NULL,
    PRIMARY KEY (gateway, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS processed_ts ON processed(ts_ms);
CREATE TABLE IF NOT EXISTS rollup_pending (
    gateway    TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    period_ms  INTEGER NOT NULL,
    end_ms     INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    touched_ms INTEGER NOT NULL,
    claimed_ms INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (gateway, kind, period_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollup_pending_due ON rollup_pending(end_ms);
"""
_SCHEMA_PG = """
CREATE TABLE IF NOT EXISTS processed (
    gateway TEXT   NOT NULL,
    seq     BIGINT NOT NULL,
    digest  BYTEA,
    ts_ms   BIGINT NOT NULL,
    PRIMARY KEY (gateway, seq)
);
CREATE INDEX IF NOT EXISTS processed_ts ON processed(ts_ms);
CREATE TABLE IF NOT EXISTS rollup_pending (
    gateway    TEXT   NOT NULL,
    kind       TEXT   NOT NULL,
    period_ms  BIGINT NOT NULL,
    end_ms     BIGINT NOT NULL,
    version    BIGINT NOT NULL,
    touched_ms BIGINT NOT NULL,
    claimed_ms BIGINT NOT NULL DEFAULT 0,
    claimed_by TEXT   NOT NULL DEFAULT '',
    PRIMARY KEY (gateway, kind, period_ms)
);
CREATE INDEX IF NOT EXISTS rollup_pending_due ON rollup_pending(end_ms);
"""
PERIOD_MS = {"hour": 3_600_000, "day": 86_400_000}
"""The length of each kind of period (local hours and days of a zone without daylight saving)."""


Period = tuple[str, int]
"""``(kind, local period start in epoch ms)``: kind ``hour`` or ``day``."""


@dataclass(frozen=True, slots=True)
class PendingPeriod:
    """A claimed key: ``gateway``'s ``kind`` period starting at ``period_ms``, as of ``version``."""

    gateway: str
    kind: str
    period_ms: int
    version: int


@dataclass(frozen=True, slots=True)
class DedupConfig:
    """The ``[ingest.pipeline.dedup]`` section."""

    path: str = "dedup.sqlite"
    keep_per_gateway: int = 10_000
    max_age_s: float | None = 7 * 86_400.0
    prune_every: int = 1000

    def __post_init__(self) -> None:
        if self.keep_per_gateway < 1 or self.prune_every < 1:
            raise ValueError("keep_per_gateway: and prune_every must be positive")


@dataclass(frozen=True, slots=True)
class DedupStats:
    entries: int
    pruned: int
    seq_reuse: int


class DedupStore:
    """SQLite (WAL) set of processed (gateway, seq) keys, pruned per gateway. See the module docs."""

    def __init__(
        self,
        path: str | Path,
        *,
        keep_per_gateway: int = 10_000,
        max_age_s: float | None = 7 * 86_400.0,
        prune_every: int = 1000,
        clock: Callable[[], float] = time.time,
        url: str = "",
    ) -> None:
        if keep_per_gateway < 1 or prune_every < 1:
            raise ValueError("keep_per_gateway and prune_every must be positive")
        self.path = Path(path)
        self.keep_per_gateway = keep_per_gateway
        self.max_age_s = max_age_s
        self.prune_every = prune_every
        self._clock = clock
        self._lock = threading.Lock()
        self._db = StateDb(self.path, url=url)
        self._db.script(_SCHEMA, _SCHEMA_PG)
        self._adopt_daily_pending()
        self._marks_since_prune: dict[str, int] = {}
        self._pruned = 0
        self._seq_reuse = 0

    @classmethod
    def from_config(cls, config: DedupConfig, url: str = "") -> DedupStore:
        """The ``[dedup]`` store, in ``url``'s database (``[state] url``) when given."""
        return cls(
            config.path,
            keep_per_gateway=config.keep_per_gateway,
            max_age_s=config.max_age_s,
            prune_every=config.prune_every,
            url=url,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DedupStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def seen(self, gateway: str, seq: int, digest: bytes | None = None) -> bool:
        """Whether this batch was marked processed (and, given a digest, is the same batch)."""
        with self._lock:
            row = self._db.execute(
                "SELECT digest FROM processed WHERE gateway = ? AND seq = ?", (gateway, seq)
            ).fetchone()
        if row is None:
            return False
        if digest is not None and row[0] is not None and bytes(row[0]) != digest:
            self._seq_reuse += 1
            log.warning("sequence reused with different content gateway=%s seq=%d", gateway, seq)
            return False
        return True

    def mark(
        self, gateway: str, seq: int, digest: bytes | None = None, periods: Sequence[Period] = ()
    ) -> bool:
        """Record the batch as durably processed, and in the same transaction the periods
        (``(kind, start ms)``) whose totals it changed; prunes that gateway every ``prune_every``
        marks.

        Returns True when this replaced a remembered mark of the same ``(gateway, seq)`` with a
        different digest: the gateway reused the seq (its outbox was wiped; :mod:`ingest.pipeline.loss`)."""
        now_ms = int(self._clock() * 1000)
        keys = [_key(gateway, kind, start, now_ms) for kind, start in periods]
        with self._lock:
            # SQLite: IMMEDIATE takes the write lock before reading, so a write of another worker
            # waits in the busy handler instead of invalidating this transaction's snapshot;
            # PostgreSQL: the gateway's lock orders the marks of all machines
            with self._db.transaction() as db:
                db.lock("dedup", gateway)
                old = db.execute(
                    "SELECT digest FROM processed WHERE gateway = ? AND seq = ?", (gateway, seq)
                ).fetchone()
                db.execute(
                    "INSERT INTO processed(gateway, seq, digest, ts_ms) VALUES (?,?,?,?) "
                    "ON CONFLICT(gateway, seq) "
                    "DO UPDATE SET digest = excluded.digest, ts_ms = excluded.ts_ms",
                    (gateway, seq, digest, now_ms),
                )
                self._touch(keys)
            count = self._marks_since_prune.get(gateway, 0) + 1
            self._marks_since_prune[gateway] = count
        if count >= self.prune_every:
            self.prune(gateway)
        return old is not None and old[0] is not None and digest is not None and bytes(old[0]) != digest

    def _touch(self, keys: list[tuple[str, str, int, int, int]]) -> None:
        if keys:
            self._db.executemany(
                "INSERT INTO rollup_pending(gateway, kind, period_ms, end_ms, version, touched_ms) "
                "VALUES (?,?,?,?,1,?) ON CONFLICT(gateway, kind, period_ms) "
                "DO UPDATE SET version = rollup_pending.version + 1, touched_ms = excluded.touched_ms",
                sorted(keys),  # one order for every writer (no deadlock on PostgreSQL)
            )

    def claim_due(
        self, delay_s: float, lease_s: float, owner: str = "", limit: int = 10_000
    ) -> list[PendingPeriod]:
        """Claim for ``owner`` the keys due for their rollup: the period ended and its last touch
        are at least ``delay_s`` ago, and no live claim (younger than ``lease_s``) holds it;
        oldest period first. The claim is one transaction, so two workers never claim the same
        key at once (PostgreSQL: the rows are locked as they are read, and a worker skips the rows
        another worker is claiming or a batch is touching)."""
        now_ms = int(self._clock() * 1000)
        delay_ms, lease_ms = int(delay_s * 1000), int(lease_s * 1000)
        due_ms = now_ms - delay_ms
        with self._lock, self._db.transaction() as db:
            rows = db.execute(
                "SELECT gateway, kind, period_ms, version FROM rollup_pending "
                "WHERE end_ms <= ? AND touched_ms <= ? AND claimed_ms <= ? "
                "ORDER BY period_ms, kind DESC, gateway LIMIT ?" + db.skip_locked,
                (due_ms, due_ms, now_ms - lease_ms, limit),
            ).fetchall()
            db.executemany(
                "UPDATE rollup_pending SET claimed_ms = ?, claimed_by = ? "
                "WHERE gateway = ? AND kind = ? AND period_ms = ?",
                [(now_ms, owner, g, k, p) for g, k, p, _ in rows],
            )
        return [PendingPeriod(str(g), str(k), int(p), int(v)) for g, k, p, v in rows]

    def done_periods(self, done: Sequence[PendingPeriod], failed: Sequence[PendingPeriod] = ()) -> int:
        """Drop the rolled-up keys ``done``, each only if no batch touched it since its claim
        (same version; else it stays owed); release the claims of ``failed``. Returns how many
        were dropped."""
        with self._lock:
            dropped = self._db.executemany(
                "DELETE FROM rollup_pending WHERE gateway = ? AND kind = ? AND period_ms = ? AND version = ?",
                [(p.gateway, p.kind, p.period_ms, p.version) for p in done],
            )
            self._db.executemany(
                "UPDATE rollup_pending SET claimed_ms = 0 WHERE gateway = ? AND kind = ? AND period_ms = ?",
                [(p.gateway, p.kind, p.period_ms) for p in (*done, *failed)],
            )
            return dropped

    def release_claims(self, owner: str) -> int:
        """Release every claim of ``owner`` (a worker starting again under its name: the claims
        of its previous life died with it). Returns how many."""
        with self._lock:
            return self._db.execute(
                "UPDATE rollup_pending SET claimed_ms = 0, claimed_by = '' "
                "WHERE claimed_by = ? AND claimed_ms > 0",
                (owner,),
            ).rowcount

    def pending_periods(self) -> int:
        """How many keys are owed a rollup (claimed or not)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM rollup_pending").fetchone()[0])

    def _adopt_daily_pending(self) -> None:
        """Keys owed by a store of the earlier layout (``daily_pending``: days whose totals were
        still to be published) become day rollups, so an upgrade loses none."""
        if self._db.dialect != "sqlite":
            return  # the earlier layout was a SQLite file only
        with self._lock:
            if not self._db.table_exists("daily_pending"):
                return
            with self._db.transaction() as db:
                db.execute(
                    "INSERT INTO rollup_pending"
                    "(gateway, kind, period_ms, end_ms, version, touched_ms) "
                    "SELECT gateway, 'day', day_ms, day_ms + ?, version, 0 FROM daily_pending WHERE true "
                    "ON CONFLICT DO NOTHING",
                    (PERIOD_MS["day"],),
                )
                db.execute("DROP TABLE daily_pending")

    def prune(self, gateway: str | None = None) -> int:
        """Apply the bounds now (one gateway, or all); returns how many entries were dropped."""
        now_ms = int(self._clock() * 1000)
        with self._lock:
            gateways = (
                [gateway]
                if gateway is not None
                else [g for (g,) in self._db.execute("SELECT DISTINCT gateway FROM processed")]
            )
            dropped = 0
            for gw in gateways:
                self._marks_since_prune[gw] = 0
                row = self._db.execute(
                    "SELECT seq FROM processed WHERE gateway = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                    (gw, self.keep_per_gateway),
                ).fetchone()
                if row is not None:
                    dropped += self._db.execute(
                        "DELETE FROM processed WHERE gateway = ? AND seq <= ?", (gw, row[0])
                    ).rowcount
            if self.max_age_s is not None:
                cutoff = now_ms - int(self.max_age_s * 1000)
                dropped += self._db.execute("DELETE FROM processed WHERE ts_ms < ?", (cutoff,)).rowcount
            self._pruned += dropped
        return dropped

    def stats(self) -> DedupStats:
        with self._lock:
            entries = self._db.execute("SELECT COUNT(*) FROM processed").fetchone()[0]
        return DedupStats(entries, self._pruned, self._seq_reuse)


def _key(gateway: str, kind: str, start_ms: int, now_ms: int) -> tuple[str, str, int, int, int]:
    if kind not in PERIOD_MS:
        raise ValueError(f"unknown period kind {kind!r}")
    start = int(start_ms)
    return (gateway, kind, start, start + PERIOD_MS[kind], now_ms)
