"""The ledger store interface: what the fee-control engine needs from persistence, and no more.

Accepts and returns the value types of :mod:`.model`, :mod:`.lifecycle` and the rows below;
raises :class:`~.model.FeeControlError` for unknown accounts and meters. Contract every store
keeps:

- the journal is append-only: no row is ever changed or removed (FC-13);
- every call made inside one :meth:`LedgerStore.transaction` commits or rolls back together, so
  a charge and its balance change, or a decision and its command row, are atomic (FC-05, FC-11);
- ``(meter, interval_start_ms)`` has at most one ``charge`` journal row (FC-05), a payment or
  adjustment id at most one row, and a meter at most one outstanding command (FC-11): the store
  enforces these itself, not only the engine;
- balances are a cache derived from the journal; :meth:`check_consistency` recomputes them;
- rejected input (:class:`Reject`) is kept apart from the journal, in a table pruned to the newest
  ``keep`` rows: it is evidence for operators, not part of the ledger.

The SQLite store (:mod:`.sqlite_store`) is the embedded default (DESIGN §7).
"""

from __future__ import annotations

import abc
import datetime as dt
import enum
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from .decide import MeterSnapshot
from .lifecycle import CommandState, RelayOrder
from .model import Account, Balance, Level

__all__ = [
    "CHARGE_KINDS",
    "ConsistencyReport",
    "Hold",
    "IntervalRow",
    "JournalEntry",
    "JournalKind",
    "LedgerStore",
    "OutboxRow",
    "Reject",
]


class JournalKind(enum.StrEnum):
    CHARGE = "charge"  # first posting of an interval
    TRUEUP = "trueup"  # FC-05: difference when an interval's value changes (actual replaces estimate)
    REPRICE = "reprice"  # FC-05: difference when a late interval moves a later one's tier position
    HELD = "held"  # FC-04 defer: an estimated interval not charged
    PAYMENT = "payment"
    ADJUSTMENT = "adjustment"
    DECISION = "decision"
    COMMAND = "command"
    ACCOUNT = "account"  # account opened or changed (protected flag, tariff)
    NOTICE = "notice"  # a notice to the customer that no decision caused (a planned area outage)


CHARGE_KINDS = frozenset({JournalKind.CHARGE, JournalKind.TRUEUP, JournalKind.REPRICE})


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One append-only journal row. ``amount_fen`` is the signed effect on the balance (payments
    positive, charges negative); ``exact_micro`` the exact charge change behind it (TOU-06)."""

    ts_ms: int
    account_id: str
    kind: JournalKind
    code: str = ""
    meter: str | None = None
    interval_start_ms: int | None = None
    interval_end_ms: int | None = None
    revision: int | None = None
    energy_centi_kwh: int | None = None
    estimated: bool = False
    exact_micro: int = 0
    amount_fen: int = 0
    ref: str | None = None
    reasons: tuple[str, ...] = ()
    detail: str = "{}"  # JSON
    seq: int = 0  # assigned by the store

    def __post_init__(self) -> None:
        if self.kind in CHARGE_KINDS and (self.meter is None or self.interval_start_ms is None):
            raise ValueError("meter: charge rows need meter and interval_start_ms")
        if self.kind in (JournalKind.PAYMENT, JournalKind.ADJUSTMENT) and not self.ref:
            raise ValueError("ref: payments and adjustments need an id")


@dataclass(frozen=True, slots=True)
class IntervalRow:
    """Current state of one (meter, interval); its history is in the journal."""

    meter: str
    account_id: str
    interval_start_ms: int
    interval_end_ms: int
    energy_centi_kwh: int
    estimated: bool
    charged: bool  # False: held (FC-04 defer)
    exact_micro: int = 0
    revision: int = 0
    tariff_version: str = ""
    period: str = ""


@dataclass(frozen=True, slots=True)
class Hold:
    """An FC-14 audit hold, or an FC-09 operator hold, on an account (any hold defers every
    automatic trip of the account; ``meter`` says which meter's data or operator set it).
    ``until_ms``: the hold ends by itself then (None: until released)."""

    account_id: str
    meter: str | None
    day: dt.date | None
    reason: str
    set_ms: int
    until_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    """One rejected message, or one rejected interval of a message, with its reason.

    ``digest`` is the SHA-256 (hex) of the whole payload, so repeats of one message can be told
    apart from distinct ones; ``payload`` is its first bytes only, ``payload_bytes`` its length."""

    ts_ms: int
    topic: str
    reason: str
    detail: str
    digest: str
    payload: bytes
    payload_bytes: int
    gateway: str | None = None
    meter: str | None = None
    interval_start_ms: int | None = None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One notification waiting for one notifier: the head of that notifier's queue."""

    seq: int  # the outbox's own order (the journal's order of the rows it came from)
    note_id: str
    account_id: str
    payload: bytes
    attempts: int  # failed attempts so far
    next_ms: int  # not to be tried before this


@dataclass(frozen=True, slots=True)
class ConsistencyReport:
    ok: bool
    problems: tuple[str, ...]
    accounts_checked: int
    rows_checked: int


class LedgerStore(abc.ABC):
    """Persistence for the fee-control engine. Every method may be called only inside
    :meth:`transaction`, except :meth:`check_consistency` and :meth:`close`."""

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """One atomic unit. A nested call is a savepoint of the outer one: when it raises, its
        own changes are undone and the exception goes on; the outer one commits or rolls back
        everything, the nested units' changes included."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # accounts -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def put_account(self, account: Account) -> bool:
        """Insert or update an account and its meters (meters no longer listed are removed from
        it, their history stays); True when anything changed.

        Raises:
            FeeControlError: ``meter_conflict`` when a meter already belongs to another account.
        """

    @abc.abstractmethod
    def account(self, account_id: str) -> Account:
        """Raises: FeeControlError ``unknown_account``."""

    @abc.abstractmethod
    def account_of_meter(self, meter: str) -> str:
        """Raises: FeeControlError ``unknown_meter``."""

    @abc.abstractmethod
    def account_ids(self) -> list[str]: ...

    # intervals ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def interval(self, meter: str, interval_start_ms: int) -> IntervalRow | None: ...

    @abc.abstractmethod
    def put_interval(self, row: IntervalRow) -> None: ...

    @abc.abstractmethod
    def cycle_energy_before(self, account_id: str, lo_ms: int, start_ms: int, meter: str) -> int:
        """Charged energy of the account's intervals ordered before (start_ms, meter), from lo_ms."""

    @abc.abstractmethod
    def cycle_intervals_after(
        self, account_id: str, start_ms: int, meter: str, hi_ms: int
    ) -> list[IntervalRow]:
        """Charged intervals ordered after (start_ms, meter), before hi_ms, in (start, meter) order."""

    @abc.abstractmethod
    def meter_intervals(self, meter: str, lo_ms: int, hi_ms: int) -> list[IntervalRow]:
        """All intervals (charged or held) of a meter starting in [lo_ms, hi_ms)."""

    # journal and balances -------------------------------------------------------------------------
    @abc.abstractmethod
    def append(self, entry: JournalEntry) -> int:
        """Append one row, update the derived balance, return its sequence number.

        Raises:
            sqlite3.IntegrityError (or the store's equivalent): a uniqueness rule was broken.
        """

    @abc.abstractmethod
    def find_ref(self, kind: JournalKind, ref: str) -> JournalEntry | None: ...

    @abc.abstractmethod
    def last_entry(self, account_id: str, kind: JournalKind, codes: Sequence[str]) -> JournalEntry | None:
        """The newest row of the account with this kind and one of ``codes``."""

    @abc.abstractmethod
    def journal_tail(self, account_id: str, kinds: Sequence[JournalKind], limit: int) -> list[JournalEntry]:
        """The newest ``limit`` rows of the account of these kinds, oldest first."""

    @abc.abstractmethod
    def journal_range(self, account_id: str, lo_ms: int, hi_ms: int) -> Iterator[JournalEntry]:
        """The account's rows with ``lo_ms <= ts_ms < hi_ms``, in journal order, read lazily."""

    @abc.abstractmethod
    def money_before(self, account_id: str, ts_ms: int) -> int:
        """Σ ``amount_fen`` of the account's rows with ``ts_ms`` before this: its balance then."""

    @abc.abstractmethod
    def journal(self, account_id: str | None = None) -> Iterator[JournalEntry]: ...

    @abc.abstractmethod
    def balance(self, account_id: str) -> Balance: ...

    # notification, meter and hold state -----------------------------------------------------------
    @abc.abstractmethod
    def notification_state(self, account_id: str) -> tuple[Level, int | None]: ...

    @abc.abstractmethod
    def put_notification_state(self, account_id: str, level: Level, notice_ms: int | None) -> None: ...

    @abc.abstractmethod
    def meter_snapshots(self, account_id: str) -> list[MeterSnapshot]: ...

    @abc.abstractmethod
    def put_meter_snapshot(self, snap: MeterSnapshot) -> None:
        """Store relay, retry and signature state (``outstanding`` is derived from commands)."""

    @abc.abstractmethod
    def holds(self, account_id: str) -> list[Hold]:
        """Active (not released) holds, expired ones (``until_ms`` past) included."""

    @abc.abstractmethod
    def expire_holds(self, now_ms: int) -> list[Hold]:
        """Release the holds whose ``until_ms`` is at or before ``now_ms``; return them."""

    @abc.abstractmethod
    def add_hold(self, hold: Hold) -> bool:
        """False when the same (account, meter, day, reason) hold is already active."""

    @abc.abstractmethod
    def release_holds(self, account_id: str, meter: str | None, before: dt.date | None, now_ms: int) -> int:
        """Release active holds of ``meter`` (all meters if None) for days before ``before``
        (all if None); returns how many."""

    # commands -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def insert_command(self, command: RelayOrder) -> None:
        """Raises: the store's integrity error if the meter already has an outstanding command."""

    @abc.abstractmethod
    def command(self, command_id: str) -> RelayOrder | None: ...

    @abc.abstractmethod
    def set_command_state(self, command_id: str, state: CommandState, now_ms: int) -> None: ...

    @abc.abstractmethod
    def commands(self, states: Sequence[CommandState]) -> list[RelayOrder]: ...

    @abc.abstractmethod
    def command_history(
        self,
        account_id: str | None,
        meter: str | None,
        states: Sequence[CommandState] | None,
        limit: int,
    ) -> list[RelayOrder]:
        """The newest ``limit`` commands matching every filter given, newest first."""

    # rejected input -------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_rejects(self, rejects: Sequence[Reject], keep: int) -> None:
        """Record rejects, then prune the table to the newest ``keep`` rows."""

    @abc.abstractmethod
    def rejects(self, limit: int) -> list[Reject]:
        """The newest ``limit`` rejects, oldest first."""

    # notifications outbox -------------------------------------------------------------------------
    @abc.abstractmethod
    def accounts_in_area(self, area: str) -> list[str]:
        """Accounts with at least one meter in ``area``, sorted."""

    @abc.abstractmethod
    def notify_cursor(self) -> int:
        """The last journal ``seq`` whose notification (if any) is in the outbox."""

    @abc.abstractmethod
    def notice_rows_after(self, seq: int, limit: int) -> list[JournalEntry]:
        """Journal ``decision`` and ``notice`` rows after ``seq``, in journal order."""

    @abc.abstractmethod
    def add_notification(
        self, seq: int, note_id: str, ts_ms: int, account_id: str, payload: bytes, notifiers: Sequence[str]
    ) -> None:
        """Put one notification in the outbox, pending for each notifier (``seq`` orders it). A
        ``note_id`` already there is left as it is: it is never queued twice."""

    @abc.abstractmethod
    def set_notify_cursor(self, seq: int) -> None: ...

    @abc.abstractmethod
    def ledger_id(self) -> str:
        """A random id chosen when the ledger was created: notification ids are unique across
        ledgers, and stable for one."""

    @abc.abstractmethod
    def next_delivery(self, notifier: str) -> OutboxRow | None:
        """The oldest notification still pending for ``notifier``."""

    @abc.abstractmethod
    def finish_delivery(self, notifier: str, seq: int, state: str, now_ms: int, reason: str | None) -> None:
        """Mark one delivery ``sent`` or ``dead`` (``reason`` kept)."""

    @abc.abstractmethod
    def retry_delivery(self, notifier: str, seq: int, attempts: int, next_ms: int, reason: str) -> None: ...

    @abc.abstractmethod
    def pending_deliveries(self) -> dict[str, int]:
        """Pending deliveries per notifier."""

    @abc.abstractmethod
    def pending_notifications(self) -> int:
        """Notifications with a delivery still pending for any notifier."""

    @abc.abstractmethod
    def retire_notifiers(self, keep: Sequence[str], now_ms: int) -> int:
        """Mark deliveries pending for notifiers not in ``keep`` dead (``notifier_removed``)."""

    @abc.abstractmethod
    def deliveries(self, notifier: str) -> list[tuple[str, str, int, str | None]]:
        """``(note_id, state, attempts, reason)`` of every delivery to ``notifier``, in order."""

    @abc.abstractmethod
    def prune_notifications(self, before_ms: int) -> int:
        """Remove notifications older than ``before_ms`` with no delivery pending; returns how many."""

    # checks ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def check_consistency(self) -> ConsistencyReport:
        """Recompute every balance and interval total from the journal and compare (FC-02, TOU-06)."""
