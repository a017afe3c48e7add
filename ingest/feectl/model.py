"""Value types shared by the fee-control core: accounts, money, levels, decisions, results.

Everything here is a frozen, slotted dataclass validated at construction (STYLE H3) or a
``StrEnum`` whose values are what the ledger stores. Money is integer only: balances and postings
in fen (0.01 yuan), exact charges in micro-yuan (10⁻⁶ yuan = energy in 0.01 kWh × price in
10⁻⁴ yuan/kWh, ``docs/rules.md#conventions``). Nothing here reads the clock or does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from protocols.alarms import check_area
from protocols.commands import Action
from protocols.errors import AmigwError

__all__ = [
    "MICRO_PER_FEN",
    "ORDER_ACTIONS",
    "Account",
    "Balance",
    "ChargeResult",
    "ChargeStatus",
    "Decision",
    "DecisionKind",
    "EstimatePolicy",
    "FeeControlError",
    "Level",
    "MeterRef",
    "PaymentResult",
    "RelayState",
    "check_area",
    "round_half_up",
]

MICRO_PER_FEN = 10_000


def round_half_up(micro: int) -> int:
    """Micro-yuan → fen, halves rounded up (towards +∞), exactly, in integers (TOU-06)."""
    return (micro + MICRO_PER_FEN // 2) // MICRO_PER_FEN


class FeeControlError(AmigwError):
    """The outside world referred to something the ledger does not have, or contradicted it.

    ``reason`` is a code: the core raises ``unknown_meter``, ``unknown_account``,
    ``unknown_tariff``, ``gateway_mismatch``, ``payment_conflict``, ``adjustment_conflict``,
    ``meter_conflict``, ``command_conflict``, ``relay_conflict``, ``protected_conflict`` and
    ``opening_balance_conflict``; the operations (:mod:`.operations`) add their argument checks
    (``bad_fields``, ``amount_out_of_range``, ``unknown_gateway``, ``unknown_command``).
    ``subject`` is the id or field concerned. Defined here (not in ``protocols/errors.py``) because
    only fee control raises it.
    """

    def __init__(self, reason: str, subject: str, detail: str = "") -> None:
        self.reason = reason
        self.subject = subject
        self.detail = detail
        super().__init__(f"{reason}: {subject}" + (f" ({detail})" if detail else ""))


class EstimatePolicy(enum.StrEnum):
    """FC-04. ``charge``: charge estimates, journal them marked EST, true them up (FC-05); trips
    never rest on estimates (the trip test uses b_actual). ``defer``: hold estimated intervals
    uncharged until the actual value arrives."""

    CHARGE = "charge"
    DEFER = "defer"


class Level(enum.IntEnum):
    """FC-03 balance states, ordered by severity."""

    NORMAL = 0
    ALARM1 = 1
    ALARM2 = 2
    ZERO = 3
    TRIP_DUE = 4


# The relay actions fee control issues (a subset of protocols.commands.RELAY_ACTIONS).
ORDER_ACTIONS = frozenset({Action.TRIP, Action.CLOSE_ALLOWED})


class RelayState(enum.StrEnum):
    """Last known relay state of a meter (FC-12, status word 3 bits 4 and 6)."""

    CLOSED = "closed"
    OPEN = "open"  # tripped by command (bit4 = 1, bit6 = 1)
    ARMED = "armed"  # close allowed, waiting for the customer's button (bit4 = 1, bit6 = 0)


class DecisionKind(enum.StrEnum):
    """FC-13 decision vocabulary, plus the few events the reference names elsewhere."""

    ALARM1 = "ALARM1"
    ALARM2 = "ALARM2"
    ZERO_NOTICE = "ZERO_NOTICE"
    RECOVERED = "RECOVERED"
    TRIP_ISSUED = "TRIP_ISSUED"
    TRIP_DEFERRED = "TRIP_DEFERRED"
    TRIP_SUPPRESSED = "TRIP_SUPPRESSED"
    RESTORE_ISSUED = "RESTORE_ISSUED"
    RESTORE_DEFERRED = "RESTORE_DEFERRED"
    COMMAND_RESULT = "COMMAND_RESULT"
    COMMAND_RESULT_IGNORED = "COMMAND_RESULT_IGNORED"
    VERIFIED = "VERIFIED"
    EXPIRED = "EXPIRED"
    FAILED = "FAILED"
    UNCONFIRMED = "UNCONFIRMED"
    COMMAND_FAILED = "COMMAND_FAILED"
    METER_IN_PROTECT = "METER_IN_PROTECT"
    RESTORE_ALLOWED = "RESTORE_ALLOWED"
    RESTORE_CONFIRMED = "RESTORE_CONFIRMED"
    RELAY_STATE = "RELAY_STATE"
    SUM_FAIL = "SUM_FAIL"
    AUDIT_HOLD = "AUDIT_HOLD"
    HOLD_RELEASED = "HOLD_RELEASED"
    DUP_CONFLICT = "DUP_CONFLICT"


class ChargeStatus(enum.StrEnum):
    CHARGED = "charged"  # first posting for this (meter, interval)
    DUPLICATE = "duplicate"  # same data again: nothing posted (FC-05, VEE-10)
    HELD = "held"  # estimated under the defer policy: nothing posted (FC-04)
    TRUED_UP = "trued_up"  # actual replaced an estimate, or a re-estimate: difference posted (FC-05)
    SUPERSEDED = "superseded"  # an estimate after the actual: the actual wins (VEE-10)
    CONFLICT = "conflict"  # a second, different actual: first kept, conflict journaled (VEE-10)


@dataclass(frozen=True, slots=True)
class MeterRef:
    """A meter of an account: its address, the gateway that reaches it, and its control mode.

    ``remote=False`` means the meter runs local fee control (FC-01): monitored, never tripped.
    ``max_power_w`` is its rated maximum power (bounds its intervals' energy; None: the service's
    default rating).
    ``area`` is the transformer area (台区) the meter is supplied from, if known: an area outage
    is announced to the accounts of its meters.
    """

    meter: str
    gateway: str
    remote: bool = True
    max_power_w: int | None = None
    area: str | None = None

    def __post_init__(self) -> None:
        if not self.meter:
            raise ValueError("meter: must not be empty")
        if not self.gateway:
            raise ValueError("gateway: must not be empty")
        if self.max_power_w is not None and self.max_power_w <= 0:
            raise ValueError("max_power_w: must be > 0")
        if self.area is not None:
            why = check_area(self.area)
            if why is not None:
                raise ValueError(f"area: {why}")


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    meters: tuple[MeterRef, ...]
    tariff_id: str
    customer_class: str = "residential"
    protected: bool = False  # FC-07 保电

    def __post_init__(self) -> None:
        if not self.account_id:
            raise ValueError("account_id: must not be empty")
        if not self.meters:
            raise ValueError("meters: an account owns at least one meter")
        names = [m.meter for m in self.meters]
        if len(set(names)) != len(names):
            raise ValueError(f"meters: duplicate meter in {names}")
        if not self.tariff_id:
            raise ValueError("tariff_id: must not be empty")


@dataclass(frozen=True, slots=True)
class Balance:
    """FC-02/FC-04 view of an account's money, in fen.

    ``balance_fen`` is what the customer sees (all posted charges). ``actual_balance_fen`` leaves
    out charges that rest only on unconfirmed estimates; trips are tested against it (FC-04).
    """

    account_id: str
    balance_fen: int
    actual_balance_fen: int
    charge_exact_micro: int
    estimated_exact_micro: int


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision with its reasons (FC-13). ``command_id`` is set once a command was created."""

    kind: DecisionKind
    account_id: str
    meter: str | None = None
    reasons: tuple[str, ...] = ()
    balance_fen: int | None = None
    actual_balance_fen: int | None = None
    action: Action | None = None
    command_id: str | None = None
    detail: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind in (DecisionKind.TRIP_ISSUED, DecisionKind.RESTORE_ISSUED) and self.action is None:
            raise ValueError(f"action: required for {self.kind}")


@dataclass(frozen=True, slots=True)
class ChargeResult:
    status: ChargeStatus
    meter: str
    interval_start_ms: int
    exact_micro_delta: int = 0  # exact change posted for this interval (including tier re-pricing)
    posted_fen: int = 0  # fen taken from the balance by this call (negative = refunded)
    balance_fen: int = 0
    decisions: tuple[Decision, ...] = ()


@dataclass(frozen=True, slots=True)
class PaymentResult:
    recorded: bool  # False: the id was seen before with the same data (idempotent no-op)
    account_id: str
    ref: str
    amount_fen: int
    balance_fen: int
    decisions: tuple[Decision, ...] = ()
