"""Fee-control decisions: a pure function of account state, configuration and ``now_ms``.

Accepts an :class:`AccountSnapshot` (balances, notification state, holds, per-meter relay and
command state); returns an :class:`Evaluation` (decisions with reasons, the new notification
state, the per-meter de-duplication signatures, and when to look again). It never reads the
clock, never touches storage and never raises for a business condition: a trip that may not
happen is a ``TRIP_DEFERRED``/``TRIP_SUPPRESSED`` decision with its reasons (FC-06).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from protocols.commands import Action

from .config import FeeControlConfig
from .model import Account, Balance, Decision, DecisionKind, Level, MeterRef, RelayState

__all__ = ["AccountSnapshot", "Evaluation", "MeterSnapshot", "Trigger", "decide", "level_of"]

Trigger = str  # "charge" | "payment" | "adjustment" | "tick" | "command" | "audit"
_CREDIT_TRIGGERS = frozenset({"payment", "adjustment"})
_NOTICE_OF = {
    Level.ALARM1: DecisionKind.ALARM1,
    Level.ALARM2: DecisionKind.ALARM2,
    Level.ZERO: DecisionKind.ZERO_NOTICE,
    Level.TRIP_DUE: DecisionKind.ZERO_NOTICE,  # with L = 0 the ZERO state is skipped (FC-03)
}


@dataclass(frozen=True, slots=True)
class MeterSnapshot:
    ref: MeterRef
    relay: RelayState = RelayState.CLOSED
    outstanding: Action | None = None  # action of the ISSUED/ACKED command, if any (FC-11)
    failed_action: Action | None = None  # action of the current failing streak (FC-12)
    failed_attempts: int = 0
    last_failed_ms: int | None = None
    blocked_reason: str | None = None  # "COMMAND_FAILED" (escalated) | "METER_IN_PROTECT" (FC-07)
    last_sig: str = ""  # signature of the last deferral journaled, so it is not repeated
    manual_by: str | None = None  # an operator's manual trip holds the relay open (no FC-08 restore)


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    account: Account
    balance: Balance
    notified_level: Level = Level.NORMAL
    notice_ms: int | None = None  # time of the zero/cut notice: the grace timer's start (FC-06)
    holds: tuple[str, ...] = ()  # active audit/operator holds (FC-14)
    meters: tuple[MeterSnapshot, ...] = ()


@dataclass(frozen=True, slots=True)
class Evaluation:
    decisions: tuple[Decision, ...]
    notified_level: Level
    notice_ms: int | None
    meter_sigs: tuple[tuple[str, str], ...]
    next_check_ms: int | None  # earliest time a re-evaluation could decide differently


def level_of(balance_fen: int, cfg: FeeControlConfig) -> Level:
    """FC-03: NORMAL b > A1; ALARM1 A2 < b ≤ A1; ALARM2 0 < b ≤ A2; ZERO −L < b ≤ 0; TRIP_DUE b ≤ −L."""
    if balance_fen > cfg.alarm1_fen:
        return Level.NORMAL
    if balance_fen > cfg.alarm2_fen:
        return Level.ALARM1
    if balance_fen > 0:
        return Level.ALARM2
    if balance_fen > -cfg.overdraft_limit_fen:
        return Level.ZERO
    return Level.TRIP_DUE


def decide(
    snap: AccountSnapshot, cfg: FeeControlConfig, now_ms: int, trigger: Trigger = "tick"
) -> Evaluation:
    """Evaluate one account: notifications (FC-03), trips (FC-06/07/09/14), restores (FC-08)."""
    decisions, level, notice_ms = _notifications(snap, cfg, now_ms)
    sigs: list[tuple[str, str]] = []
    wakes: list[int] = []
    for m in snap.meters:
        decision, sig, wake = _meter(snap, m, cfg, now_ms, notice_ms, trigger)
        if decision is not None and (sig == "" or sig != m.last_sig):
            decisions.append(decision)
        sigs.append((m.ref.meter, sig))
        if wake is not None:
            wakes.append(wake)
    return Evaluation(tuple(decisions), level, notice_ms, tuple(sigs), min(wakes, default=None))


def _notifications(
    snap: AccountSnapshot, cfg: FeeControlConfig, now_ms: int
) -> tuple[list[Decision], Level, int | None]:
    """FC-03: one notice per downward crossing (the deepest level crossed), re-armed on the way up."""
    b = snap.balance
    level, notified, notice_ms = level_of(b.balance_fen, cfg), snap.notified_level, snap.notice_ms
    out: list[Decision] = []
    if level > notified:
        if not (level >= Level.ZERO and notice_ms is not None):  # ZERO→TRIP_DUE: already noticed
            out.append(_account_decision(snap, _NOTICE_OF[level], (level.name,)))
        if level >= Level.ZERO and notice_ms is None:
            notice_ms = now_ms
    elif level < notified:
        reasons = (f"FROM:{notified.name}", f"TO:{level.name}")
        out.append(_account_decision(snap, DecisionKind.RECOVERED, reasons))
        if level < Level.ZERO:
            notice_ms = None
    return out, level, notice_ms


def _account_decision(snap: AccountSnapshot, kind: DecisionKind, reasons: tuple[str, ...]) -> Decision:
    b = snap.balance
    return Decision(kind, snap.account.account_id, None, reasons, b.balance_fen, b.actual_balance_fen)


def _meter(
    snap: AccountSnapshot,
    m: MeterSnapshot,
    cfg: FeeControlConfig,
    now_ms: int,
    notice_ms: int | None,
    trigger: str,
) -> tuple[Decision | None, str, int | None]:
    b = snap.balance.actual_balance_fen  # FC-04: trips and restores never rest on estimates
    if m.relay in (RelayState.CLOSED, RelayState.ARMED) and b <= -cfg.overdraft_limit_fen:
        return _trip(snap, m, cfg, now_ms, notice_ms)
    if m.relay is RelayState.OPEN:
        if m.manual_by is not None and b > cfg.restore_threshold_fen:
            # Opened by an operator, not for balance: only a manual restore closes it.
            return _deferral(snap, m, DecisionKind.RESTORE_DEFERRED, ["MANUAL_TRIP"], None)
        if b > cfg.restore_threshold_fen:
            return _restore(snap, m, cfg, now_ms)
        if trigger in _CREDIT_TRIGGERS:  # FC-08: "balance still negative", once per payment
            return _decision(snap, m, DecisionKind.RESTORE_DEFERRED, ("BALANCE_NOT_ABOVE_RESTORE",)), "", None
    return None, "", None


def _trip(
    snap: AccountSnapshot, m: MeterSnapshot, cfg: FeeControlConfig, now_ms: int, notice_ms: int | None
) -> tuple[Decision | None, str, int | None]:
    if not m.ref.remote:  # FC-01: a meter in local fee-control mode is monitored only
        return _deferral(snap, m, DecisionKind.TRIP_SUPPRESSED, ["LOCAL_MODE"], None)
    if snap.account.protected:  # FC-07: never trip a protected (保电) account for balance
        return _deferral(snap, m, DecisionKind.TRIP_SUPPRESSED, ["PROTECTED"], None)
    reasons: list[str] = []
    wakes: list[int] = []
    grace_end = (now_ms if notice_ms is None else notice_ms) + cfg.grace_s * 1000
    if now_ms < grace_end:  # FC-06.4
        reasons.append("GRACE")
        wakes.append(grace_end)
    local = dt.datetime.fromtimestamp(now_ms / 1000, tz=dt.UTC).astimezone(cfg.tz)
    window = cfg.windows.active(local)
    if window is not None:  # FC-09
        reasons.append(window)
        nxt = cfg.windows.next_allowed(local)
        if nxt is not None:
            wakes.append(int(nxt.timestamp() * 1000))
    if snap.holds:  # FC-14
        reasons.append("AUDIT_HOLD")
    wake = _command_blocks(m, Action.TRIP, cfg, now_ms, reasons)
    if wake is not None:
        wakes.append(wake)
    if reasons:
        return _deferral(snap, m, DecisionKind.TRIP_DEFERRED, reasons, min(wakes, default=None))
    return _decision(snap, m, DecisionKind.TRIP_ISSUED, (), Action.TRIP), "", None


def _restore(
    snap: AccountSnapshot, m: MeterSnapshot, cfg: FeeControlConfig, now_ms: int
) -> tuple[Decision | None, str, int | None]:
    """FC-08: restore at once; not subject to windows, grace, holds or protection."""
    reasons: list[str] = []
    wake = _command_blocks(m, Action.CLOSE_ALLOWED, cfg, now_ms, reasons)
    if reasons:
        return _deferral(snap, m, DecisionKind.RESTORE_DEFERRED, reasons, wake)
    return _decision(snap, m, DecisionKind.RESTORE_ISSUED, (), Action.CLOSE_ALLOWED), "", None


def _command_blocks(
    m: MeterSnapshot, action: Action, cfg: FeeControlConfig, now_ms: int, reasons: list[str]
) -> int | None:
    """FC-11 (one outstanding command per meter) and FC-12 (retry spacing, escalation)."""
    if m.outstanding is not None:
        reasons.append("COMMAND_IN_FLIGHT")
    if m.failed_action is not action:
        return None
    if m.blocked_reason is not None:
        reasons.append(m.blocked_reason)
        return None
    if m.last_failed_ms is not None and now_ms < m.last_failed_ms + cfg.retry_spacing_s * 1000:
        reasons.append("RETRY_WAIT")
        return m.last_failed_ms + cfg.retry_spacing_s * 1000
    return None


def _deferral(
    snap: AccountSnapshot, m: MeterSnapshot, kind: DecisionKind, reasons: list[str], wake: int | None
) -> tuple[Decision | None, str, int | None]:
    sig = f"{kind.value}:{','.join(reasons)}"
    return _decision(snap, m, kind, tuple(reasons)), sig, wake


def _decision(
    snap: AccountSnapshot,
    m: MeterSnapshot,
    kind: DecisionKind,
    reasons: tuple[str, ...],
    action: Action | None = None,
) -> Decision:
    b = snap.balance
    return Decision(
        kind,
        snap.account.account_id,
        m.ref.meter,
        reasons,
        b.balance_fen,
        b.actual_balance_fen,
        action,
    )
