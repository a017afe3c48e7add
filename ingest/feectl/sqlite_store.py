"""SQLite ledger store: the embedded default behind :class:`~.store.LedgerStore` (DESIGN §7).

One connection, WAL journal, ``synchronous=FULL``, explicit ``BEGIN IMMEDIATE`` transactions.
The rules that must hold whatever the code above does are in the schema: triggers refuse
UPDATE and DELETE on the journal (FC-13), partial UNIQUE indexes make an interval charge once
(FC-05), a payment id post once, and a meter carry at most one outstanding command (FC-11).
Blocking calls; low volume, correctness first. Never reads the clock.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from protocols.commands import Action

from .decide import MeterSnapshot
from .lifecycle import CommandState, RelayOrder
from .model import (
    Account,
    Balance,
    FeeControlError,
    Level,
    MeterRef,
    RelayState,
    round_half_up,
)
from .store import (
    CHARGE_KINDS,
    ConsistencyReport,
    Hold,
    IntervalRow,
    JournalEntry,
    JournalKind,
    LedgerStore,
    OutboxRow,
    Reject,
)

__all__ = ["SqliteLedgerStore"]

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account_id TEXT PRIMARY KEY, tariff_id TEXT NOT NULL, customer_class TEXT NOT NULL,
    protected INTEGER NOT NULL,
    notified_level INTEGER NOT NULL DEFAULT 0, notice_ms INTEGER
);
CREATE TABLE IF NOT EXISTS meters (
    meter TEXT PRIMARY KEY, account_id TEXT NOT NULL REFERENCES accounts(account_id),
    gateway TEXT NOT NULL, remote INTEGER NOT NULL, position INTEGER NOT NULL,
    relay TEXT NOT NULL DEFAULT 'closed', failed_action TEXT, failed_attempts INTEGER NOT NULL DEFAULT 0,
    last_failed_ms INTEGER, blocked_reason TEXT, last_sig TEXT NOT NULL DEFAULT '',
    max_power_w INTEGER, manual_by TEXT, area TEXT
);
-- an account's meters, read with every charge: without it each read scans every meter
CREATE INDEX IF NOT EXISTS meters_account ON meters(account_id, position);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER NOT NULL, account_id TEXT NOT NULL,
    kind TEXT NOT NULL, code TEXT NOT NULL, meter TEXT, interval_start_ms INTEGER, interval_end_ms INTEGER,
    revision INTEGER, energy_centi_kwh INTEGER, estimated INTEGER NOT NULL, exact_micro INTEGER NOT NULL,
    amount_fen INTEGER NOT NULL, ref TEXT, reasons TEXT NOT NULL, detail TEXT NOT NULL
);
-- FC-05: an interval is charged exactly once, whatever is redelivered or replayed.
CREATE UNIQUE INDEX IF NOT EXISTS journal_charge_once
    ON journal(meter, interval_start_ms) WHERE kind = 'charge';
CREATE UNIQUE INDEX IF NOT EXISTS journal_held_once ON journal(meter, interval_start_ms) WHERE kind = 'held';
CREATE UNIQUE INDEX IF NOT EXISTS journal_revision_once
    ON journal(meter, interval_start_ms, revision) WHERE kind IN ('trueup', 'reprice');
CREATE UNIQUE INDEX IF NOT EXISTS journal_ref_once
    ON journal(kind, ref) WHERE kind IN ('payment', 'adjustment');
CREATE INDEX IF NOT EXISTS journal_account ON journal(account_id, seq);
CREATE INDEX IF NOT EXISTS journal_account_time ON journal(account_id, ts_ms);
-- FC-13: the journal is append-only.
CREATE TRIGGER IF NOT EXISTS journal_no_update BEFORE UPDATE ON journal
    BEGIN SELECT RAISE(ABORT, 'journal is append-only'); END;
CREATE TRIGGER IF NOT EXISTS journal_no_delete BEFORE DELETE ON journal
    BEGIN SELECT RAISE(ABORT, 'journal is append-only'); END;
CREATE TABLE IF NOT EXISTS balances (
    account_id TEXT PRIMARY KEY REFERENCES accounts(account_id), balance_fen INTEGER NOT NULL,
    charge_exact_micro INTEGER NOT NULL, charge_posted_fen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS intervals (
    meter TEXT NOT NULL, interval_start_ms INTEGER NOT NULL, interval_end_ms INTEGER NOT NULL,
    account_id TEXT NOT NULL, energy_centi_kwh INTEGER NOT NULL, estimated INTEGER NOT NULL,
    charged INTEGER NOT NULL, exact_micro INTEGER NOT NULL, revision INTEGER NOT NULL,
    tariff_version TEXT NOT NULL, period TEXT NOT NULL,
    PRIMARY KEY (meter, interval_start_ms)
);
CREATE INDEX IF NOT EXISTS intervals_account ON intervals(account_id, interval_start_ms, meter);
CREATE TABLE IF NOT EXISTS holds (
    id INTEGER PRIMARY KEY AUTOINCREMENT, account_id TEXT NOT NULL, meter TEXT, day TEXT,
    reason TEXT NOT NULL, set_ms INTEGER NOT NULL, released_ms INTEGER, until_ms INTEGER
);
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, gateway TEXT NOT NULL, meter TEXT NOT NULL,
    action TEXT NOT NULL, issued_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL, attempt INTEGER NOT NULL,
    state TEXT NOT NULL, state_ms INTEGER NOT NULL
);
-- FC-11: at most one outstanding relay command per meter.
CREATE UNIQUE INDEX IF NOT EXISTS commands_one_outstanding
    ON commands(meter) WHERE state IN ('issued', 'acked');
CREATE INDEX IF NOT EXISTS commands_meter ON commands(meter, issued_ms);
CREATE INDEX IF NOT EXISTS commands_account ON commands(account_id, issued_ms);
-- Rejected input (not part of the ledger): pruned to the newest rows.
CREATE TABLE IF NOT EXISTS rejects (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER NOT NULL, topic TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL, digest TEXT NOT NULL, payload BLOB NOT NULL,
    payload_bytes INTEGER NOT NULL, gateway TEXT, meter TEXT, interval_start_ms INTEGER
);
-- The notifications outbox: one row per notification, one delivery row per notifier. Derived
-- from the journal's decision and notice rows up to notify_cursor (docs/feectl.md#notifications).
CREATE TABLE IF NOT EXISTS notifications (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, ts_ms INTEGER NOT NULL,
    account_id TEXT NOT NULL, payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS notifications_ts ON notifications(ts_ms);
CREATE TABLE IF NOT EXISTS notification_deliveries (
    seq INTEGER NOT NULL REFERENCES notifications(seq) ON DELETE CASCADE, notifier TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')), attempts INTEGER NOT NULL,
    next_ms INTEGER NOT NULL, done_ms INTEGER, reason TEXT,
    PRIMARY KEY (notifier, seq)
);
CREATE INDEX IF NOT EXISTS notification_deliveries_pending
    ON notification_deliveries(notifier, seq) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS notify_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, ledger TEXT NOT NULL
);
"""

# Columns added after schema version 1: a version-1 ledger gets them at open (NULL = unset).
_ADDED_COLUMNS = (
    ("meters", "max_power_w", "INTEGER"),
    ("meters", "manual_by", "TEXT"),
    ("holds", "until_ms", "INTEGER"),
    ("meters", "area", "TEXT"),
)


class SqliteLedgerStore(LedgerStore):
    """``path`` is a file (WAL mode) or ``":memory:"`` (tests)."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        for table, column, decl in _ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        # A ledger from before the outbox starts its cursor at its end: history is not re-notified.
        self._db.execute(
            "INSERT OR IGNORE INTO notify_cursor VALUES "
            "(1, (SELECT COALESCE(MAX(seq), 0) FROM journal), lower(hex(randomblob(4))))"
        )
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._depth = 0

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self._depth:  # a savepoint of the outer transaction
            name = f"sp{self._depth}"
            self._db.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._db.execute(f"ROLLBACK TO {name}")
                self._db.execute(f"RELEASE {name}")
                raise
            else:
                self._db.execute(f"RELEASE {name}")
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
        finally:
            self._depth = 0

    def close(self) -> None:
        self._db.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The one connection, for tables other modules keep beside the ledger (the ops API's
        audit trail); use it inside :meth:`transaction`."""
        return self._db

    def _one(self, sql: str, *args: object) -> tuple | None:  # type: ignore[type-arg]
        return self._db.execute(sql, args).fetchone()  # type: ignore[no-any-return]

    # accounts -------------------------------------------------------------------------------------
    def put_account(self, account: Account) -> bool:
        try:
            before = self.account(account.account_id)
        except FeeControlError:
            before = None
        if before == account:
            return False
        for ref in account.meters:
            owner = self._one("SELECT account_id FROM meters WHERE meter = ?", ref.meter)
            if owner is not None and owner[0] != account.account_id:
                raise FeeControlError("meter_conflict", ref.meter, f"belongs to {owner[0]}")
        self._db.execute(
            "INSERT INTO accounts(account_id, tariff_id, customer_class, protected) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(account_id) DO UPDATE SET tariff_id = excluded.tariff_id, "
            "customer_class = excluded.customer_class, protected = excluded.protected",
            (account.account_id, account.tariff_id, account.customer_class, int(account.protected)),
        )
        self._db.execute(
            "INSERT OR IGNORE INTO balances VALUES (?, 0, 0, 0)",
            (account.account_id,),
        )
        keep = [ref.meter for ref in account.meters]
        self._db.execute(
            f"DELETE FROM meters WHERE account_id = ? AND meter NOT IN ({', '.join('?' for _ in keep)})",
            (account.account_id, *keep),
        )
        for pos, ref in enumerate(account.meters):
            self._db.execute(
                "INSERT INTO meters(meter, account_id, gateway, remote, position, max_power_w, area) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(meter) DO UPDATE SET gateway = excluded.gateway, remote = excluded.remote, "
                "position = excluded.position, max_power_w = excluded.max_power_w, area = excluded.area",
                (ref.meter, account.account_id, ref.gateway, int(ref.remote), pos, ref.max_power_w, ref.area),
            )
        return True

    def account(self, account_id: str) -> Account:
        row = self._one(
            "SELECT tariff_id, customer_class, protected FROM accounts WHERE account_id = ?", account_id
        )
        if row is None:
            raise FeeControlError("unknown_account", account_id)
        meters = self._db.execute(
            "SELECT meter, gateway, remote, max_power_w, area FROM meters WHERE account_id = ? "
            "ORDER BY position",
            (account_id,),
        ).fetchall()
        refs = tuple(MeterRef(m, g, bool(r), p, a) for m, g, r, p, a in meters)
        return Account(account_id, refs, row[0], row[1], bool(row[2]))

    def account_of_meter(self, meter: str) -> str:
        row = self._one("SELECT account_id FROM meters WHERE meter = ?", meter)
        if row is None:
            raise FeeControlError("unknown_meter", meter)
        return str(row[0])

    def account_ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT account_id FROM accounts ORDER BY account_id")]

    # intervals ------------------------------------------------------------------------------------
    _ICOLS = (
        "meter, account_id, interval_start_ms, interval_end_ms, energy_centi_kwh, estimated, charged, "
        "exact_micro, revision, tariff_version, period"
    )

    @staticmethod
    def _irow(r: tuple) -> IntervalRow:  # type: ignore[type-arg]
        return IntervalRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6]), r[7], r[8], r[9], r[10])

    def interval(self, meter: str, interval_start_ms: int) -> IntervalRow | None:
        r = self._one(
            f"SELECT {self._ICOLS} FROM intervals WHERE meter = ? AND interval_start_ms = ?",
            meter,
            interval_start_ms,
        )
        return None if r is None else self._irow(r)

    def put_interval(self, row: IntervalRow) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO intervals({self._ICOLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.meter,
                row.account_id,
                row.interval_start_ms,
                row.interval_end_ms,
                row.energy_centi_kwh,
                int(row.estimated),
                int(row.charged),
                row.exact_micro,
                row.revision,
                row.tariff_version,
                row.period,
            ),
        )

    def cycle_energy_before(self, account_id: str, lo_ms: int, start_ms: int, meter: str) -> int:
        r = self._one(
            "SELECT COALESCE(SUM(energy_centi_kwh), 0) FROM intervals WHERE account_id = ? AND charged = 1 "
            "AND interval_start_ms >= ? AND (interval_start_ms < ? OR (interval_start_ms = ? AND meter < ?))",
            account_id,
            lo_ms,
            start_ms,
            start_ms,
            meter,
        )
        return int(r[0]) if r else 0

    def cycle_intervals_after(
        self, account_id: str, start_ms: int, meter: str, hi_ms: int
    ) -> list[IntervalRow]:
        rows = self._db.execute(
            f"SELECT {self._ICOLS} FROM intervals WHERE account_id = ? AND charged = 1 "
            "AND interval_start_ms < ? AND (interval_start_ms > ? OR (interval_start_ms = ? AND meter > ?)) "
            "ORDER BY interval_start_ms, meter",
            (account_id, hi_ms, start_ms, start_ms, meter),
        )
        return [self._irow(r) for r in rows]

    def meter_intervals(self, meter: str, lo_ms: int, hi_ms: int) -> list[IntervalRow]:
        rows = self._db.execute(
            f"SELECT {self._ICOLS} FROM intervals WHERE meter = ? AND interval_start_ms >= ? "
            "AND interval_start_ms < ? ORDER BY interval_start_ms",
            (meter, lo_ms, hi_ms),
        )
        return [self._irow(r) for r in rows]

    # journal and balances -------------------------------------------------------------------------
    def append(self, entry: JournalEntry) -> int:
        cur = self._db.execute(
            "INSERT INTO journal(ts_ms, account_id, kind, code, meter, interval_start_ms, interval_end_ms, "
            "revision, energy_centi_kwh, estimated, exact_micro, amount_fen, ref, reasons, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.ts_ms,
                entry.account_id,
                entry.kind.value,
                entry.code,
                entry.meter,
                entry.interval_start_ms,
                entry.interval_end_ms,
                entry.revision,
                entry.energy_centi_kwh,
                int(entry.estimated),
                entry.exact_micro,
                entry.amount_fen,
                entry.ref,
                json.dumps(list(entry.reasons)),
                entry.detail,
            ),
        )
        if entry.amount_fen or entry.exact_micro:
            is_charge = entry.kind in CHARGE_KINDS
            self._db.execute(
                "UPDATE balances SET balance_fen = balance_fen + ?, "
                "charge_exact_micro = charge_exact_micro + ?, "
                "charge_posted_fen = charge_posted_fen + ? WHERE account_id = ?",
                (
                    entry.amount_fen,
                    entry.exact_micro if is_charge else 0,
                    -entry.amount_fen if is_charge else 0,
                    entry.account_id,
                ),
            )
        return int(cur.lastrowid or 0)

    _JCOLS = (
        "ts_ms, account_id, kind, code, meter, interval_start_ms, interval_end_ms, revision, "
        "energy_centi_kwh, estimated, exact_micro, amount_fen, ref, reasons, detail, seq"
    )

    @staticmethod
    def _jrow(r: tuple) -> JournalEntry:  # type: ignore[type-arg]
        return JournalEntry(
            r[0],
            r[1],
            JournalKind(r[2]),
            r[3],
            r[4],
            r[5],
            r[6],
            r[7],
            r[8],
            bool(r[9]),
            r[10],
            r[11],
            r[12],
            tuple(json.loads(r[13])),
            r[14],
            r[15],
        )

    def find_ref(self, kind: JournalKind, ref: str) -> JournalEntry | None:
        r = self._one(f"SELECT {self._JCOLS} FROM journal WHERE kind = ? AND ref = ?", kind.value, ref)
        return None if r is None else self._jrow(r)

    def last_entry(self, account_id: str, kind: JournalKind, codes: Sequence[str]) -> JournalEntry | None:
        marks = ", ".join("?" for _ in codes)
        r = self._one(
            f"SELECT {self._JCOLS} FROM journal WHERE account_id = ? AND kind = ? AND code IN ({marks}) "
            "ORDER BY seq DESC LIMIT 1",
            account_id,
            kind.value,
            *codes,
        )
        return None if r is None else self._jrow(r)

    def journal_tail(self, account_id: str, kinds: Sequence[JournalKind], limit: int) -> list[JournalEntry]:
        marks = ", ".join("?" for _ in kinds)
        rows = self._db.execute(
            f"SELECT {self._JCOLS} FROM journal WHERE account_id = ? AND kind IN ({marks}) "
            "ORDER BY seq DESC LIMIT ?",
            (account_id, *(k.value for k in kinds), limit),
        ).fetchall()
        return [self._jrow(r) for r in reversed(rows)]

    def journal_range(self, account_id: str, lo_ms: int, hi_ms: int) -> Iterator[JournalEntry]:
        cur = self._db.execute(
            f"SELECT {self._JCOLS} FROM journal WHERE account_id = ? AND ts_ms >= ? AND ts_ms < ? "
            "ORDER BY seq",
            (account_id, lo_ms, hi_ms),
        )
        return (self._jrow(r) for r in cur)

    def money_before(self, account_id: str, ts_ms: int) -> int:
        r = self._one(
            "SELECT COALESCE(SUM(amount_fen), 0) FROM journal WHERE account_id = ? AND ts_ms < ?",
            account_id,
            ts_ms,
        )
        return int(r[0]) if r else 0

    def journal(self, account_id: str | None = None) -> Iterator[JournalEntry]:
        if account_id is None:
            rows = self._db.execute(f"SELECT {self._JCOLS} FROM journal ORDER BY seq").fetchall()
        else:
            rows = self._db.execute(
                f"SELECT {self._JCOLS} FROM journal WHERE account_id = ? ORDER BY seq", (account_id,)
            ).fetchall()
        return iter([self._jrow(r) for r in rows])

    def balance(self, account_id: str) -> Balance:
        r = self._one(
            "SELECT balance_fen, charge_exact_micro, charge_posted_fen FROM balances WHERE account_id = ?",
            account_id,
        )
        if r is None:
            raise FeeControlError("unknown_account", account_id)
        est = self._one(
            "SELECT COALESCE(SUM(exact_micro), 0) FROM intervals WHERE account_id = ? AND charged = 1 "
            "AND estimated = 1",
            account_id,
        )
        balance, exact, posted = r
        est_micro = int(est[0]) if est else 0
        credits = balance + posted
        actual = credits - round_half_up(exact - est_micro)  # FC-04 b_actual, rounded as TOU-06
        return Balance(account_id, balance, actual, exact, est_micro)

    # notification, meter and hold state -----------------------------------------------------------
    def notification_state(self, account_id: str) -> tuple[Level, int | None]:
        r = self._one("SELECT notified_level, notice_ms FROM accounts WHERE account_id = ?", account_id)
        if r is None:
            raise FeeControlError("unknown_account", account_id)
        return Level(r[0]), r[1]

    def put_notification_state(self, account_id: str, level: Level, notice_ms: int | None) -> None:
        self._db.execute(
            "UPDATE accounts SET notified_level = ?, notice_ms = ? WHERE account_id = ?",
            (int(level), notice_ms, account_id),
        )

    def meter_snapshots(self, account_id: str) -> list[MeterSnapshot]:
        rows = self._db.execute(
            "SELECT m.meter, m.gateway, m.remote, m.relay, c.action, m.failed_action, m.failed_attempts, "
            "m.last_failed_ms, m.blocked_reason, m.last_sig, m.max_power_w, m.manual_by, m.area "
            "FROM meters m LEFT JOIN commands c "
            "ON c.meter = m.meter AND c.state IN ('issued', 'acked') "
            "WHERE m.account_id = ? ORDER BY m.position",
            (account_id,),
        ).fetchall()
        return [
            MeterSnapshot(
                MeterRef(r[0], r[1], bool(r[2]), r[10], r[12]),
                RelayState(r[3]),
                None if r[4] is None else Action(r[4]),
                None if r[5] is None else Action(r[5]),
                r[6],
                r[7],
                r[8],
                r[9],
                r[11],
            )
            for r in rows
        ]

    def put_meter_snapshot(self, snap: MeterSnapshot) -> None:
        self._db.execute(
            "UPDATE meters SET relay = ?, failed_action = ?, failed_attempts = ?, last_failed_ms = ?, "
            "blocked_reason = ?, last_sig = ?, manual_by = ? WHERE meter = ?",
            (
                snap.relay.value,
                None if snap.failed_action is None else snap.failed_action.value,
                snap.failed_attempts,
                snap.last_failed_ms,
                snap.blocked_reason,
                snap.last_sig,
                snap.manual_by,
                snap.ref.meter,
            ),
        )

    def holds(self, account_id: str) -> list[Hold]:
        rows = self._db.execute(
            f"SELECT {self._HCOLS} FROM holds WHERE account_id = ? AND released_ms IS NULL ORDER BY id",
            (account_id,),
        )
        return [self._hrow(r) for r in rows]

    _HCOLS = "account_id, meter, day, reason, set_ms, until_ms"

    @staticmethod
    def _hrow(r: tuple) -> Hold:  # type: ignore[type-arg]
        a, m, d, reason, set_ms, until_ms = r
        return Hold(a, m, None if d is None else dt.date.fromisoformat(d), reason, set_ms, until_ms)

    def expire_holds(self, now_ms: int) -> list[Hold]:
        rows = self._db.execute(
            f"SELECT id, {self._HCOLS} FROM holds WHERE released_ms IS NULL AND until_ms <= ? ORDER BY id",
            (now_ms,),
        ).fetchall()
        for r in rows:
            self._db.execute("UPDATE holds SET released_ms = until_ms WHERE id = ?", (r[0],))
        return [self._hrow(r[1:]) for r in rows]

    def add_hold(self, hold: Hold) -> bool:
        day = None if hold.day is None else hold.day.isoformat()
        dup = self._one(
            "SELECT 1 FROM holds WHERE account_id = ? AND meter IS ? AND day IS ? AND reason = ? "
            "AND released_ms IS NULL",
            hold.account_id,
            hold.meter,
            day,
            hold.reason,
        )
        if dup:
            return False
        self._db.execute(
            "INSERT INTO holds(account_id, meter, day, reason, set_ms, until_ms) VALUES (?, ?, ?, ?, ?, ?)",
            (hold.account_id, hold.meter, day, hold.reason, hold.set_ms, hold.until_ms),
        )
        return True

    def release_holds(self, account_id: str, meter: str | None, before: dt.date | None, now_ms: int) -> int:
        sql = "UPDATE holds SET released_ms = ? WHERE account_id = ? AND released_ms IS NULL"
        args: list[object] = [now_ms, account_id]
        if meter is not None:
            sql += " AND meter = ?"
            args.append(meter)
        if before is not None:
            sql += " AND day < ?"
            args.append(before.isoformat())
        return self._db.execute(sql, args).rowcount

    # commands -------------------------------------------------------------------------------------
    _CCOLS = "command_id, account_id, gateway, meter, action, issued_ms, expires_ms, attempt, state, state_ms"

    @staticmethod
    def _crow(r: tuple) -> RelayOrder:  # type: ignore[type-arg]
        return RelayOrder(r[0], r[1], r[2], r[3], Action(r[4]), r[5], r[6], r[7], CommandState(r[8]), r[9])

    def insert_command(self, command: RelayOrder) -> None:
        self._db.execute(
            f"INSERT INTO commands({self._CCOLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                command.command_id,
                command.account_id,
                command.gateway,
                command.meter,
                command.action.value,
                command.issued_ms,
                command.expires_ms,
                command.attempt,
                command.state.value,
                command.state_ms or command.issued_ms,
            ),
        )

    def command(self, command_id: str) -> RelayOrder | None:
        r = self._one(f"SELECT {self._CCOLS} FROM commands WHERE command_id = ?", command_id)
        return None if r is None else self._crow(r)

    def set_command_state(self, command_id: str, state: CommandState, now_ms: int) -> None:
        self._db.execute(
            "UPDATE commands SET state = ?, state_ms = ? WHERE command_id = ?",
            (state.value, now_ms, command_id),
        )

    def commands(self, states: Sequence[CommandState]) -> list[RelayOrder]:
        marks = ", ".join("?" for _ in states)
        rows = self._db.execute(
            f"SELECT {self._CCOLS} FROM commands WHERE state IN ({marks}) ORDER BY issued_ms, command_id",
            [s.value for s in states],
        )
        return [self._crow(r) for r in rows]

    def command_history(
        self,
        account_id: str | None,
        meter: str | None,
        states: Sequence[CommandState] | None,
        limit: int,
    ) -> list[RelayOrder]:
        where: list[str] = []
        args: list[object] = []
        if account_id is not None:
            where.append("account_id = ?")
            args.append(account_id)
        if meter is not None:
            where.append("meter = ?")
            args.append(meter)
        if states is not None:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args += [s.value for s in states]
        sql = f"SELECT {self._CCOLS} FROM commands"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.execute(sql + " ORDER BY issued_ms DESC, command_id DESC LIMIT ?", (*args, limit))
        return [self._crow(r) for r in rows]

    # rejected input -------------------------------------------------------------------------------
    _RCOLS = "ts_ms, topic, reason, detail, digest, payload, payload_bytes, gateway, meter, interval_start_ms"

    def add_rejects(self, rejects: Sequence[Reject], keep: int) -> None:
        self._db.executemany(
            f"INSERT INTO rejects({self._RCOLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (r.ts_ms, r.topic, r.reason, r.detail, r.digest, r.payload, r.payload_bytes, r.gateway,
                 r.meter, r.interval_start_ms)
                for r in rejects
            ],
        )  # fmt: skip
        self._db.execute("DELETE FROM rejects WHERE id <= (SELECT MAX(id) FROM rejects) - ?", (keep,))

    def rejects(self, limit: int) -> list[Reject]:
        rows = self._db.execute(
            f"SELECT {self._RCOLS} FROM (SELECT * FROM rejects ORDER BY id DESC LIMIT ?) ORDER BY id",
            (limit,),
        )
        return [Reject(*r) for r in rows]

    # notifications outbox -------------------------------------------------------------------------
    def accounts_in_area(self, area: str) -> list[str]:
        rows = self._db.execute(
            "SELECT DISTINCT account_id FROM meters WHERE area = ? ORDER BY account_id", (area,)
        )
        return [r[0] for r in rows]

    def notify_cursor(self) -> int:
        r = self._one("SELECT seq FROM notify_cursor WHERE id = 1")
        return int(r[0]) if r else 0

    def ledger_id(self) -> str:
        r = self._one("SELECT ledger FROM notify_cursor WHERE id = 1")
        return str(r[0]) if r else ""

    def set_notify_cursor(self, seq: int) -> None:
        self._db.execute("UPDATE notify_cursor SET seq = ? WHERE id = 1", (seq,))

    def notice_rows_after(self, seq: int, limit: int) -> list[JournalEntry]:
        rows = self._db.execute(
            f"SELECT {self._JCOLS} FROM journal WHERE seq > ? AND kind IN ('decision', 'notice') "
            "ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [self._jrow(r) for r in rows]

    def add_notification(
        self, seq: int, note_id: str, ts_ms: int, account_id: str, payload: bytes, notifiers: Sequence[str]
    ) -> None:
        cur = self._db.execute(
            "INSERT OR IGNORE INTO notifications(seq, id, ts_ms, account_id, payload) VALUES (?, ?, ?, ?, ?)",
            (seq, note_id, ts_ms, account_id, payload),
        )
        if cur.rowcount:
            self._db.executemany(
                "INSERT INTO notification_deliveries(seq, notifier, state, attempts, next_ms) "
                "VALUES (?, ?, 'pending', 0, 0)",
                [(seq, n) for n in notifiers],
            )

    def next_delivery(self, notifier: str) -> OutboxRow | None:
        r = self._one(
            "SELECT d.seq, n.id, n.account_id, n.payload, d.attempts, d.next_ms "
            "FROM notification_deliveries d JOIN notifications n ON n.seq = d.seq "
            "WHERE d.notifier = ? AND d.state = 'pending' ORDER BY d.seq LIMIT 1",
            notifier,
        )
        return None if r is None else OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5])

    def finish_delivery(self, notifier: str, seq: int, state: str, now_ms: int, reason: str | None) -> None:
        self._db.execute(
            "UPDATE notification_deliveries SET state = ?, done_ms = ?, reason = ? "
            "WHERE notifier = ? AND seq = ?",
            (state, now_ms, reason, notifier, seq),
        )

    def retry_delivery(self, notifier: str, seq: int, attempts: int, next_ms: int, reason: str) -> None:
        self._db.execute(
            "UPDATE notification_deliveries SET attempts = ?, next_ms = ?, reason = ? "
            "WHERE notifier = ? AND seq = ?",
            (attempts, next_ms, reason, notifier, seq),
        )

    def pending_deliveries(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT notifier, COUNT(*) FROM notification_deliveries WHERE state = 'pending' GROUP BY notifier"
        )
        return {n: int(c) for n, c in rows}

    def pending_notifications(self) -> int:
        r = self._one("SELECT COUNT(DISTINCT seq) FROM notification_deliveries WHERE state = 'pending'")
        return int(r[0]) if r else 0

    def retire_notifiers(self, keep: Sequence[str], now_ms: int) -> int:
        marks = ", ".join("?" * len(keep))
        cur = self._db.execute(
            "UPDATE notification_deliveries SET state = 'dead', done_ms = ?, reason = 'notifier_removed' "
            f"WHERE state = 'pending' AND notifier NOT IN ({marks})",
            (now_ms, *keep),
        )
        return cur.rowcount

    def deliveries(self, notifier: str) -> list[tuple[str, str, int, str | None]]:
        rows = self._db.execute(
            "SELECT n.id, d.state, d.attempts, d.reason FROM notification_deliveries d "
            "JOIN notifications n ON n.seq = d.seq WHERE d.notifier = ? ORDER BY d.seq",
            (notifier,),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def prune_notifications(self, before_ms: int) -> int:
        cur = self._db.execute(
            "DELETE FROM notifications WHERE ts_ms < ? AND NOT EXISTS (SELECT 1 FROM "
            "notification_deliveries d WHERE d.seq = notifications.seq AND d.state = 'pending')",
            (before_ms,),
        )
        return cur.rowcount

    # checks ---------------------------------------------------------------------------------------
    def check_consistency(self) -> ConsistencyReport:
        problems: list[str] = []
        money: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # balance, exact, posted
        per_interval: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0, 0])  # exact, charges, est
        rows = 0
        for e in self.journal():
            rows += 1
            acc = money[e.account_id]
            acc[0] += e.amount_fen
            if e.kind in CHARGE_KINDS:
                acc[1] += e.exact_micro
                acc[2] -= e.amount_fen
                assert e.meter is not None and e.interval_start_ms is not None
                iv = per_interval[(e.meter, e.interval_start_ms)]
                iv[0] += e.exact_micro
                iv[1] += e.kind is JournalKind.CHARGE
                iv[2] = int(e.estimated)
        cached = {r[0]: r[1:] for r in self._db.execute("SELECT * FROM balances")}
        for account_id, (balance, exact, posted) in cached.items():
            got = money.get(account_id, [0, 0, 0])
            if [balance, exact, posted] != got:
                problems.append(
                    f"{account_id}: cached (b, exact, posted)={balance, exact, posted} journal={got}"
                )
            if got[2] != round_half_up(got[1]):  # TOU-06: posted total = round_half_up(exact total)
                problems.append(f"{account_id}: posted {got[2]} fen != round_half_up({got[1]} micro)")
        for account_id in set(money) - set(cached):
            problems.append(f"{account_id}: journal rows without an account balance")
        for r in self._db.execute(f"SELECT {self._ICOLS} FROM intervals"):
            row = self._irow(r)
            exact, charges, est = per_interval.pop((row.meter, row.interval_start_ms), [0, 0, 0])
            if (
                charges != int(row.charged)
                or exact != row.exact_micro
                or (row.charged and est != row.estimated)
            ):
                problems.append(f"{row.meter}@{row.interval_start_ms}: interval row disagrees with journal")
        for key in per_interval:
            problems.append(f"{key[0]}@{key[1]}: journal charges without an interval row")
        return ConsistencyReport(not problems, tuple(problems), len(cached), rows)
