"""The fee-control engine: charging, payments, audits, decisions and the command lifecycle.

Accepts intervals, payments, audit readings, command results and relay read-backs, each with the
caller's ``now_ms`` (time is injected; nothing here reads the clock); returns result objects with
the decisions taken; raises :class:`~.model.FeeControlError` for unknown meters or accounts, an
interval reported by a gateway other than its meter's, and conflicting payment ids,
:class:`~protocols.errors.ConfigError` when no tariff version is in force, and ``ValueError``
for arguments no caller should pass (negative energy, end ≤ start).

Every public call is one store transaction: the journal rows, the derived balance, the interval
row, the decisions and any command rows commit together or not at all (FC-05, FC-11, FC-13).
Commands are plain fields (:class:`~.lifecycle.Command`); signing and transport live elsewhere.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ingest.model.tariff import Tariff
from ingest.rules.stages import tou_periods
from protocols.commands import Action

from .config import FeeControlConfig
from .decide import AccountSnapshot, MeterSnapshot, decide
from .lifecycle import TRANSITIONS, CommandEvent, CommandState, RelayOrder, RelayOrderResult, next_state
from .model import (
    ORDER_ACTIONS,
    Account,
    Balance,
    ChargeResult,
    ChargeStatus,
    Decision,
    DecisionKind,
    EstimatePolicy,
    FeeControlError,
    PaymentResult,
    RelayState,
    round_half_up,
)
from .store import ConsistencyReport, Hold, IntervalRow, JournalEntry, JournalKind, LedgerStore

__all__ = ["OPENING_REF_PREFIX", "AuditResult", "Enrolment", "Evaluated", "FeeController", "ResultOutcome"]

OPENING_REF_PREFIX = "opening:"  # the adjustment id of an account's opening balance: opening:<account>
_FILE_CODES = ("PUT", "FILE")  # ACCOUNT journal codes of enrolments from the configuration file

_RESULT_EVENTS = {
    "done": CommandEvent.RESULT_DONE,
    "failed": CommandEvent.RESULT_FAILED,
    "rejected": CommandEvent.RESULT_REJECTED,
}
METER_IN_PROTECT_DETAIL = "meter_in_protect"  # the edge's detail for ERR "跳闸失败(保电)" (FC-07)


@dataclass(frozen=True, slots=True)
class Evaluated:
    decisions: tuple[Decision, ...]
    commands: tuple[RelayOrder, ...]  # created by these decisions, to send now
    next_check_ms: int | None


@dataclass(frozen=True, slots=True)
class Enrolment:
    """What :meth:`FeeController.enrol` did: ``created`` a new account, ``changed`` its definition,
    posted an opening balance (``opening_fen``, None: none posted by this call)."""

    account_id: str
    created: bool
    changed: bool
    opening_fen: int | None
    added: tuple[str, ...]
    removed: tuple[str, ...]
    decisions: tuple[Decision, ...] = ()


@dataclass(frozen=True, slots=True)
class ResultOutcome:
    accepted: bool  # False: unknown id, gateway/meter mismatch, or late/repeated (logged, ignored)
    command: RelayOrder | None
    reason: str
    decisions: tuple[Decision, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditResult:
    """VEE-14 sum check and FC-14 estimated share for one meter-day."""

    meter: str
    day: dt.date
    interval_sum_centi_kwh: int
    frozen_delta_centi_kwh: int
    intervals: int
    estimated: int
    flags: tuple[str, ...]  # "SUM_FAIL", "ESTIMATED_SHARE"
    decisions: tuple[Decision, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.flags


def _new_command_id() -> str:
    return uuid.uuid4().hex


class FeeController:
    """Remote prepaid fee control (FC-01 remote model) over a :class:`~.store.LedgerStore`."""

    def __init__(
        self,
        store: LedgerStore,
        config: FeeControlConfig,
        tariffs: Mapping[str, Tariff],
        *,
        new_command_id: Callable[[], str] = _new_command_id,
    ) -> None:
        self.store = store
        self.config = config
        self.tariffs = dict(tariffs)
        self._new_id = new_command_id

    # accounts -------------------------------------------------------------------------------------
    def open_account(self, account: Account, now_ms: int) -> bool:
        """Create or update an account (meters, protected flag, tariff); journals the change
        (code ``PUT``). Does not re-evaluate: the next tick does. True when anything changed.

        Raises:
            FeeControlError: as :meth:`enrol`.
        """
        return self.enrol(account, now_ms, by="", code="PUT", evaluate=False).changed

    def enrol(
        self,
        account: Account,
        now_ms: int,
        *,
        by: str,
        code: str = "API",
        opening_balance_fen: int | None = None,
        evaluate: bool = True,
        record: bool = False,
    ) -> Enrolment:
        """Create or update an account in one transaction, then re-evaluate it (FC-07 protection,
        a new tariff or new meters take effect at once). A change is journaled as an ``account``
        row with ``code`` (``API``, ``FILE``, ``PUT``), the definition and ``by``; ``record``
        journals it even when nothing changed. Meters left out are removed from the account.
        ``opening_balance_fen`` is posted only when the account is created (adjustment id
        ``opening:<account>``); for an existing account it must equal what was posted then
        (0 when nothing was).

        Raises:
            FeeControlError: ``unknown_tariff``; ``meter_conflict`` (a meter belongs to another
                account); ``command_conflict`` / ``relay_conflict`` (a removed meter has a relay
                command outstanding / is not closed); ``opening_balance_conflict``.
        """
        if account.tariff_id not in self.tariffs:
            raise FeeControlError("unknown_tariff", account.tariff_id)
        account_id = account.account_id
        with self.store.transaction():
            try:
                before: Account | None = self.store.account(account_id)
            except FeeControlError:
                before = None
            old = () if before is None else tuple(m.meter for m in before.meters)
            new = tuple(m.meter for m in account.meters)
            removed = tuple(m for m in old if m not in new)
            self._check_removable(account_id, removed)
            ref = OPENING_REF_PREFIX + account_id
            if before is not None and opening_balance_fen is not None:
                prev = self.store.find_ref(JournalKind.ADJUSTMENT, ref)
                had = 0 if prev is None else prev.amount_fen
                if had != opening_balance_fen:
                    raise FeeControlError(
                        "opening_balance_conflict",
                        account_id,
                        f"opened with {had} fen, not {opening_balance_fen}",
                    )
            changed = self.store.put_account(account)
            if changed or record:
                detail = {**_definition(account), "by": by, "removed": list(removed)}
                self.store.append(
                    JournalEntry(now_ms, account_id, JournalKind.ACCOUNT, code, detail=_j(detail))
                )
            opening = None
            if before is None and opening_balance_fen:
                self.store.append(
                    JournalEntry(
                        now_ms,
                        account_id,
                        JournalKind.ADJUSTMENT,
                        "OPENING",
                        amount_fen=opening_balance_fen,
                        ref=ref,
                        detail=_j({"by": by}),
                    )
                )
                opening = opening_balance_fen
            decisions: tuple[Decision, ...] = ()
            if evaluate and (changed or opening is not None):
                decisions = self._evaluate(account_id, now_ms, "account").decisions
            added = tuple(m for m in new if m not in old)
            return Enrolment(account_id, before is None, changed, opening, added, removed, decisions)

    def _check_removable(self, account_id: str, removed: tuple[str, ...]) -> None:
        """A meter leaves fee control only at rest: no command in flight (FC-11) and its relay
        closed (nothing would restore a tripped meter that fee control no longer knows)."""
        if not removed:
            return
        snaps = {s.ref.meter: s for s in self.store.meter_snapshots(account_id)}
        for meter in removed:
            s = snaps[meter]
            if s.outstanding is not None:
                raise FeeControlError("command_conflict", meter, f"{s.outstanding.value} command outstanding")
            if s.relay is not RelayState.CLOSED:
                raise FeeControlError("relay_conflict", meter, f"relay {s.relay.value}: restore it first")

    def file_enrolment_due(self, account: Account) -> bool:
        """True when the configuration file's ``account`` differs from what the file said when
        it was last applied (journal ``account`` rows ``FILE``/``PUT``), or was never applied:
        only then does a start apply it, so changes made since through the operations survive
        a restart with an unchanged file."""
        with self.store.transaction():
            last = self.store.last_entry(account.account_id, JournalKind.ACCOUNT, _FILE_CODES)
        if last is None:
            return True
        said = json.loads(last.detail)
        return {k: said.get(k) for k in _definition(account)} != _definition(account)

    def balance(self, account_id: str) -> Balance:
        with self.store.transaction():
            return self.store.balance(account_id)

    def journal(self, account_id: str | None = None) -> list[JournalEntry]:
        with self.store.transaction():
            return list(self.store.journal(account_id))

    def check_consistency(self) -> ConsistencyReport:
        return self.store.check_consistency()

    # charging -------------------------------------------------------------------------------------
    def charge_interval(
        self,
        meter: str,
        interval_start_ms: int,
        interval_end_ms: int,
        energy_centi_kwh: int,
        estimated: bool,
        now_ms: int,
        *,
        gateway: str | None = None,
    ) -> ChargeResult:
        """Charge one interval exactly once (FC-05), or hold it (FC-04 defer), then re-evaluate.
        ``gateway``, when given, is the gateway that reported it: it must be the meter's enrolled one.

        Raises:
            FeeControlError: ``unknown_meter`` (not enrolled in fee control), or
                ``gateway_mismatch`` (``gateway`` is not the meter's enrolled gateway).
            ConfigError: no tariff version in force at ``interval_start_ms``.
            ValueError: ``interval_end_ms <= interval_start_ms`` or negative energy.
        """
        if interval_end_ms <= interval_start_ms:
            raise ValueError("interval_end_ms: must be after interval_start_ms")
        if energy_centi_kwh < 0:
            raise ValueError("energy_centi_kwh: must not be negative (VEE-04: never charge a decrease)")
        with self.store.transaction():
            account_id = self.store.account_of_meter(meter)
            account = self.store.account(account_id)
            if gateway is not None:
                enrolled = next(m.gateway for m in account.meters if m.meter == meter)
                if enrolled != gateway:
                    raise FeeControlError(
                        "gateway_mismatch", meter, f"enrolled on {enrolled}, sent by {gateway}"
                    )
            tariff = self._tariff(account)
            prev = self.store.interval(meter, interval_start_ms)
            new = IntervalRow(
                meter,
                account_id,
                interval_start_ms,
                interval_end_ms,
                energy_centi_kwh,
                estimated,
                charged=True,
            )
            status, exact, posted = self._apply(tariff, prev, new, now_ms)
            decisions: tuple[Decision, ...] = ()
            if exact or posted or status is ChargeStatus.TRUED_UP:
                decisions = self._evaluate(account_id, now_ms, "charge").decisions
            balance = self.store.balance(account_id).balance_fen
            return ChargeResult(status, meter, interval_start_ms, exact, posted, balance, decisions)

    def _apply(
        self, tariff: Tariff, prev: IntervalRow | None, new: IntervalRow, now_ms: int
    ) -> tuple[ChargeStatus, int, int]:
        """The FC-04/FC-05/VEE-10 precedence table; returns (status, exact delta, fen posted)."""
        defer = self.config.estimate_policy is EstimatePolicy.DEFER
        if prev is None or not prev.charged:
            if prev is not None and prev.interval_end_ms != new.interval_end_ms:
                return self._conflict(prev, new, now_ms), 0, 0
            if new.estimated and defer:
                return self._hold(prev, new, now_ms), 0, 0
            exact, posted = self._post(tariff, prev, new, JournalKind.CHARGE, now_ms)
            return ChargeStatus.CHARGED, exact, posted
        same = prev.energy_centi_kwh == new.energy_centi_kwh and prev.interval_end_ms == new.interval_end_ms
        if prev.interval_end_ms != new.interval_end_ms:
            return self._conflict(prev, new, now_ms), 0, 0
        if not prev.estimated:  # an actual is in place: it wins (VEE-10)
            if new.estimated:
                return ChargeStatus.SUPERSEDED, 0, 0
            return (ChargeStatus.DUPLICATE, 0, 0) if same else (self._conflict(prev, new, now_ms), 0, 0)
        if new.estimated and same:
            return ChargeStatus.DUPLICATE, 0, 0
        # FC-05: actual replaces estimate (or a re-estimate): post only the difference.
        exact, posted = self._post(tariff, prev, new, JournalKind.TRUEUP, now_ms)
        return ChargeStatus.TRUED_UP, exact, posted

    def _hold(self, prev: IntervalRow | None, new: IntervalRow, now_ms: int) -> ChargeStatus:
        row = dataclasses.replace(new, charged=False)
        self.store.put_interval(row)
        if prev is None:
            self.store.append(
                JournalEntry(
                    now_ms,
                    new.account_id,
                    JournalKind.HELD,
                    "EST",
                    new.meter,
                    new.interval_start_ms,
                    new.interval_end_ms,
                    0,
                    new.energy_centi_kwh,
                    True,
                    reasons=("ESTIMATE_DEFERRED",),
                )
            )
        return ChargeStatus.HELD

    def _conflict(self, prev: IntervalRow, new: IntervalRow, now_ms: int) -> ChargeStatus:
        """VEE-10: a second, different actual keeps the first and journals the conflict."""
        detail = {
            "kept": prev.energy_centi_kwh,
            "received": new.energy_centi_kwh,
            "end_ms": new.interval_end_ms,
        }
        self.store.append(
            JournalEntry(
                now_ms,
                new.account_id,
                JournalKind.DECISION,
                DecisionKind.DUP_CONFLICT.value,
                new.meter,
                new.interval_start_ms,
                new.interval_end_ms,
                energy_centi_kwh=new.energy_centi_kwh,
                reasons=("DUP_CONFLICT",),
                detail=_j(detail),
            )
        )
        return ChargeStatus.CONFLICT

    def _post(
        self, tariff: Tariff, prev: IntervalRow | None, new: IntervalRow, kind: JournalKind, now_ms: int
    ) -> tuple[int, int]:
        """Price ``new`` at its own time and tier position, post the difference from what is already
        charged for it, then re-price later intervals of the same tier cycle (FC-05, TOU-04/05)."""
        bounds = tariff.cycle_bounds(new.interval_start_ms)
        cum = 0
        if bounds is not None:
            cum = self.store.cycle_energy_before(new.account_id, bounds[0], new.interval_start_ms, new.meter)
        price = tariff.price_interval(new.interval_start_ms, _period(tariff, new), new.energy_centi_kwh, cum)
        old_exact = prev.exact_micro if prev is not None and prev.charged else 0
        revision = 0 if kind is JournalKind.CHARGE else (prev.revision + 1 if prev else 0)
        row = dataclasses.replace(
            new,
            exact_micro=price.exact_micro,
            revision=revision,
            tariff_version=price.version,
            period=price.period,
        )
        detail = {
            "version": price.version,
            "period": price.period,
            "cum_before": cum,
            "parts": [[p.tier, p.energy_centi_kwh, p.price] for p in price.parts],
            "exact": price.exact_micro,
        }
        if prev is not None:
            detail["previous"] = {
                "energy": prev.energy_centi_kwh,
                "estimated": prev.estimated,
                "exact": old_exact,
            }
        posted = self._journal_charge(row, kind, price.exact_micro - old_exact, detail, now_ms)
        self.store.put_interval(row)
        exact_total = price.exact_micro - old_exact
        if bounds is not None:
            e, p = self._reprice_after(tariff, row, cum + row.energy_centi_kwh, bounds[1], now_ms)
            exact_total, posted = exact_total + e, posted + p
        return exact_total, posted

    def _reprice_after(
        self, tariff: Tariff, cause: IntervalRow, cum: int, hi_ms: int, now_ms: int
    ) -> tuple[int, int]:
        """FC-05: a late, out-of-order or corrected interval moves the tier position of every later
        interval of its cycle; each keeps its own period and version, only differences are posted."""
        exact_total = posted_total = 0
        for row in self.store.cycle_intervals_after(
            cause.account_id, cause.interval_start_ms, cause.meter, hi_ms
        ):
            period = _period(tariff, row)
            price = tariff.price_interval(row.interval_start_ms, period, row.energy_centi_kwh, cum)
            cum += row.energy_centi_kwh
            delta = price.exact_micro - row.exact_micro
            if delta == 0:
                continue
            new = dataclasses.replace(row, exact_micro=price.exact_micro, revision=row.revision + 1)
            detail = {
                "cause": [cause.meter, cause.interval_start_ms],
                "cum_before": cum - row.energy_centi_kwh,
                "parts": [[p.tier, p.energy_centi_kwh, p.price] for p in price.parts],
                "exact": price.exact_micro,
            }
            posted_total += self._journal_charge(new, JournalKind.REPRICE, delta, detail, now_ms)
            exact_total += delta
            self.store.put_interval(new)
        return exact_total, posted_total

    def _journal_charge(
        self, row: IntervalRow, kind: JournalKind, delta_micro: int, detail: dict[str, object], now_ms: int
    ) -> int:
        """TOU-06 cumulative rounding per account: the fen posted is the change of
        round_half_up(Σ exact) caused by this row, so Σ posted never drifts from Σ exact by ≥ ½ fen."""
        total = self.store.balance(row.account_id).charge_exact_micro
        posted = round_half_up(total + delta_micro) - round_half_up(total)
        self.store.append(
            JournalEntry(
                now_ms,
                row.account_id,
                kind,
                "EST" if row.estimated else "ACT",
                row.meter,
                row.interval_start_ms,
                row.interval_end_ms,
                row.revision,
                row.energy_centi_kwh,
                row.estimated,
                delta_micro,
                -posted,
                detail=_j(detail),
            )
        )
        return posted

    def _tariff(self, account: Account) -> Tariff:
        try:
            return self.tariffs[account.tariff_id]
        except KeyError:
            raise FeeControlError("unknown_tariff", account.tariff_id) from None

    # payments -------------------------------------------------------------------------------------
    def record_payment(self, account_id: str, payment_id: str, amount_fen: int, now_ms: int) -> PaymentResult:
        """Post a payment once per ``payment_id`` and re-evaluate at once (FC-08 prompt restore).

        Raises:
            FeeControlError: ``unknown_account``; ``payment_conflict`` when the id was used with
                another account or amount.
            ValueError: ``amount_fen <= 0``.
        """
        if amount_fen <= 0:
            raise ValueError("amount_fen: a payment must be positive")
        return self._credit(JournalKind.PAYMENT, account_id, payment_id, amount_fen, "PAYMENT", now_ms)

    def record_adjustment(
        self, account_id: str, adjustment_id: str, amount_fen: int, reason: str, now_ms: int, *, by: str = ""
    ) -> PaymentResult:
        """Post a signed manual adjustment once per ``adjustment_id`` (FC-02), with its reason
        (the row's code) and who made it (``by``, in the row's detail).

        Raises:
            FeeControlError: ``unknown_account``; ``adjustment_conflict`` when the id was used
                with another account or amount.
            ValueError: ``amount_fen == 0`` or an empty reason.
        """
        if amount_fen == 0 or not reason:
            raise ValueError("amount_fen/reason: an adjustment needs a non-zero amount and a reason")
        return self._credit(
            JournalKind.ADJUSTMENT, account_id, adjustment_id, amount_fen, reason, now_ms, by=by
        )

    def _credit(
        self,
        kind: JournalKind,
        account_id: str,
        ref: str,
        amount_fen: int,
        code: str,
        now_ms: int,
        *,
        by: str = "",
    ) -> PaymentResult:
        with self.store.transaction():
            self.store.account(account_id)
            prev = self.store.find_ref(kind, ref)
            if prev is not None:
                if prev.account_id != account_id or prev.amount_fen != amount_fen:
                    raise FeeControlError(
                        f"{kind.value}_conflict", ref, f"seen for {prev.account_id}, {prev.amount_fen}"
                    )
                bal = self.store.balance(account_id).balance_fen
                return PaymentResult(False, account_id, ref, amount_fen, bal)
            detail = _j({"by": by}) if by else "{}"
            self.store.append(
                JournalEntry(now_ms, account_id, kind, code, amount_fen=amount_fen, ref=ref, detail=detail)
            )
            trigger = "payment" if kind is JournalKind.PAYMENT else "adjustment"
            decisions = self._evaluate(account_id, now_ms, trigger).decisions
            bal = self.store.balance(account_id).balance_fen
            return PaymentResult(True, account_id, ref, amount_fen, bal, decisions)

    # audits and holds -----------------------------------------------------------------------------
    def audit_day(
        self, meter: str, day: dt.date, frozen_register_start: int, frozen_register_end: int, *, now_ms: int
    ) -> AuditResult:
        """VEE-14 / FC-14: reconcile a local day's intervals with the daily frozen register delta.

        Registers are in 0.01 kWh. The day's intervals are those *starting* in [D 00:00, D+1 00:00)
        local, i.e. ending 00:15 … 24:00 (end-labelled). A failing day puts the account on audit
        hold (trips held, charging continues); a clean later day releases that meter's holds.

        Raises:
            FeeControlError: the meter is not enrolled.
        """
        lo = _local_midnight_ms(day, self.config.tz)
        hi = _local_midnight_ms(day + dt.timedelta(days=1), self.config.tz)
        with self.store.transaction():
            account_id = self.store.account_of_meter(meter)
            rows = self.store.meter_intervals(meter, lo, hi)
            s = sum(r.energy_centi_kwh for r in rows)
            f = frozen_register_end - frozen_register_start
            diff = abs(s - f)
            flags: list[str] = []
            # VEE-14: |S − F| > max(tol_rel · F, tol_abs), in integers (tol_rel in basis points).
            if diff * 10_000 > self.config.sum_tol_bp * f and diff > self.config.sum_tol_abs_centi_kwh:
                flags.append("SUM_FAIL")
            estimated = sum(r.estimated for r in rows)
            expected = (hi - lo) // (self.config.interval_s * 1000)
            if estimated * 10_000 > self.config.max_estimated_share_bp * expected:  # FC-14: > 25 %
                flags.append("ESTIMATED_SHARE")
            detail = {"day": day.isoformat(), "S": s, "F": f, "intervals": len(rows), "estimated": estimated}
            decisions: list[Decision] = []
            if flags:
                for flag in flags:
                    self.store.add_hold(Hold(account_id, meter, day, flag, now_ms))
                if "SUM_FAIL" in flags:
                    decisions.append(
                        self._log(account_id, meter, DecisionKind.SUM_FAIL, ("SUM_FAIL",), detail, now_ms)
                    )
                decisions.append(
                    self._log(account_id, meter, DecisionKind.AUDIT_HOLD, tuple(flags), detail, now_ms)
                )
            elif self.store.release_holds(account_id, meter, day, now_ms):
                decisions.append(
                    self._log(account_id, meter, DecisionKind.HOLD_RELEASED, ("CLEAN_DAY",), detail, now_ms)
                )
            decisions += self._evaluate(account_id, now_ms, "audit").decisions
            return AuditResult(meter, day, s, f, len(rows), estimated, tuple(flags), tuple(decisions))

    def hold(
        self,
        account_id: str,
        reason: str,
        now_ms: int,
        *,
        meter: str | None = None,
        day: dt.date | None = None,
        until_ms: int | None = None,
        by: str = "",
    ) -> bool:
        """Set an FC-14 hold from another data-quality flag (REG_DECREASE, FAST_RUNNING,
        METER_CHANGE_SUSPECT, CLOCK_SKEW) or an FC-09 operator hold; False if already held.
        ``until_ms``: the hold ends by itself then (:meth:`tick` releases it).

        Raises:
            FeeControlError: ``unknown_account``; ``unknown_meter`` (``meter`` not of the account).
        """
        with self.store.transaction():
            account = self.store.account(account_id)
            if meter is not None and meter not in {m.meter for m in account.meters}:
                raise FeeControlError("unknown_meter", meter, f"not a meter of {account_id}")
            if not self.store.add_hold(Hold(account_id, meter, day, reason, now_ms, until_ms)):
                return False
            detail: dict[str, object] = {"day": None if day is None else day.isoformat()}
            if until_ms is not None or by:
                detail |= {"until_ms": until_ms, "by": by}
            self._log(account_id, meter, DecisionKind.AUDIT_HOLD, (reason,), detail, now_ms)
            return True

    def release_holds(self, account_id: str, by: str, now_ms: int) -> int:
        """Operator release of every hold on the account (FC-14); returns how many were active."""
        return self.release_account_holds(account_id, by, now_ms)[0]

    def release_account_holds(
        self, account_id: str, by: str, now_ms: int, *, meter: str | None = None
    ) -> tuple[int, tuple[Decision, ...]]:
        """Operator release of the account's holds (of ``meter`` only, when given), then
        re-evaluate; returns how many were active and the decisions taken.

        Raises:
            FeeControlError: ``unknown_account``.
        """
        with self.store.transaction():
            self.store.account(account_id)
            n = self.store.release_holds(account_id, meter, None, now_ms)
            if not n:
                return 0, ()
            reasons = (f"OPERATOR:{by}",)
            d = self._log(account_id, meter, DecisionKind.HOLD_RELEASED, reasons, {"count": n}, now_ms)
            return n, (d, *self._evaluate(account_id, now_ms, "audit").decisions)

    # manual relay commands --------------------------------------------------------------------------
    def manual_command(
        self, meter: str, action: Action, by: str, reason: str, now_ms: int, *, force: bool = False
    ) -> Evaluated:
        """An operator's trip or restore, issued like fee control's own (FC-11: ISSUED row in
        this transaction, id chosen now) and journaled as ``TRIP_ISSUED`` / ``RESTORE_ISSUED``
        with reasons ``MANUAL``, ``OPERATOR:<by>`` and the detail ``{by, reason, force}``.
        A manual trip holds the relay open against FC-08 automatic restores until a manual
        restore (or a trip of fee control's own) replaces it. Then the account is re-evaluated.

        Raises:
            FeeControlError: ``unknown_meter``; ``command_conflict`` (a command is outstanding,
                FC-11); ``protected_conflict`` (a trip of a protected account without ``force``,
                FC-07).
            ValueError: ``action`` is not one fee control issues (``ORDER_ACTIONS``).
        """
        if action not in ORDER_ACTIONS:
            raise ValueError(f"action: expected one of {sorted(a.value for a in ORDER_ACTIONS)}")
        with self.store.transaction():
            account_id = self.store.account_of_meter(meter)
            account = self.store.account(account_id)
            snap = next(s for s in self.store.meter_snapshots(account_id) if s.ref.meter == meter)
            if snap.outstanding is not None:
                raise FeeControlError(
                    "command_conflict", meter, f"{snap.outstanding.value} command outstanding"
                )
            reasons = ["MANUAL", f"OPERATOR:{by}"]
            if action is Action.TRIP and account.protected:
                if not force:
                    raise FeeControlError("protected_conflict", account_id, "protected account (FC-07)")
                reasons.append("PROTECTION_OVERRIDDEN")
            command = self._issue(account_id, snap, action, now_ms)
            manual_by = by if action is Action.TRIP else None
            cur = next(s for s in self.store.meter_snapshots(account_id) if s.ref.meter == meter)
            self.store.put_meter_snapshot(dataclasses.replace(cur, manual_by=manual_by))
            b = self.store.balance(account_id)
            kind = DecisionKind.TRIP_ISSUED if action is Action.TRIP else DecisionKind.RESTORE_ISSUED
            d = Decision(
                kind, account_id, meter, tuple(reasons), b.balance_fen, b.actual_balance_fen, action,
                command.command_id,
            )  # fmt: skip
            self._journal_decision(d, {"by": by, "reason": reason, "force": force}, now_ms)
            ev = self._evaluate(account_id, now_ms, "command")
            return Evaluated((d, *ev.decisions), (command, *ev.commands), ev.next_check_ms)

    # decisions ------------------------------------------------------------------------------------
    def evaluate(self, account_id: str, now_ms: int) -> Evaluated:
        """Re-run the decisions for one account (time, window or grace changes)."""
        with self.store.transaction():
            return self._evaluate(account_id, now_ms, "tick")

    def tick(self, now_ms: int) -> Evaluated:
        """Expire overdue commands (FC-11/12), then evaluate every account. Call it every minute or
        at the earliest ``next_check_ms`` returned."""
        decisions: list[Decision] = []
        commands: list[RelayOrder] = []
        wakes: list[int] = []
        with self.store.transaction():
            grace, verify = self.config.result_grace_s * 1000, self.config.verify_timeout_s * 1000
            for c in self.store.commands([CommandState.ISSUED]):
                if now_ms > c.expires_ms + grace:
                    decisions += self._transition(c, CommandEvent.DEADLINE_PASSED, now_ms, ())
            for c in self.store.commands([CommandState.ACKED]):
                if now_ms > c.state_ms + verify:
                    decisions += self._transition(c, CommandEvent.VERIFY_TIMEOUT, now_ms, ())
            for h in self.store.expire_holds(now_ms):
                detail = {"reason": h.reason, "until_ms": h.until_ms}
                decisions.append(
                    self._log(h.account_id, h.meter, DecisionKind.HOLD_RELEASED, ("EXPIRED",), detail, now_ms)
                )
            for account_id in self.store.account_ids():
                ev = self._evaluate(account_id, now_ms, "tick")
                decisions += ev.decisions
                commands += ev.commands
                if ev.next_check_ms is not None:
                    wakes.append(ev.next_check_ms)
        return Evaluated(tuple(decisions), tuple(commands), min(wakes, default=None))

    def _evaluate(self, account_id: str, now_ms: int, trigger: str) -> Evaluated:
        account = self.store.account(account_id)
        balance = self.store.balance(account_id)
        level, notice_ms = self.store.notification_state(account_id)
        live = [h for h in self.store.holds(account_id) if h.until_ms is None or now_ms < h.until_ms]
        holds = tuple(f"{h.reason}@{h.meter or '*'}:{h.day or '-'}" for h in live)
        meters = {m.ref.meter: m for m in self.store.meter_snapshots(account_id)}
        snap = AccountSnapshot(account, balance, level, notice_ms, holds, tuple(meters.values()))
        ev = decide(snap, self.config, now_ms, trigger)
        if (ev.notified_level, ev.notice_ms) != (level, notice_ms):
            self.store.put_notification_state(account_id, ev.notified_level, ev.notice_ms)
        for meter, sig in ev.meter_sigs:
            if meters[meter].last_sig != sig:
                self.store.put_meter_snapshot(dataclasses.replace(meters[meter], last_sig=sig))
        out: list[Decision] = []
        commands: list[RelayOrder] = []
        for d in ev.decisions:
            if d.action is not None and d.meter is not None:
                command = self._issue(account_id, meters[d.meter], d.action, now_ms)
                commands.append(command)
                d = dataclasses.replace(d, command_id=command.command_id)
            extra = {"notice_ms": ev.notice_ms, "holds": list(holds), "level": ev.notified_level.name}
            self._journal_decision(d, extra, now_ms)
            out.append(d)
        wakes = [t for t in [ev.next_check_ms, *(h.until_ms for h in live)] if t is not None]
        return Evaluated(tuple(out), tuple(commands), min(wakes, default=None))

    def _issue(self, account_id: str, m: MeterSnapshot, action: Action, now_ms: int) -> RelayOrder:
        """FC-11: id chosen before sending, row written in the decision's transaction."""
        attempt = m.failed_attempts + 1 if m.failed_action is action else 1
        command = RelayOrder(
            self._new_id(),
            account_id,
            m.ref.gateway,
            m.ref.meter,
            action,
            now_ms,
            now_ms + self.config.command_validity_s * 1000,
            attempt,
            CommandState.ISSUED,
            now_ms,
        )
        self.store.insert_command(command)
        if m.manual_by is not None:  # fee control's own command replaces an operator's trip
            cur = next(s for s in self.store.meter_snapshots(account_id) if s.ref.meter == m.ref.meter)
            self.store.put_meter_snapshot(dataclasses.replace(cur, manual_by=None))
        return command

    def _journal_decision(self, d: Decision, extra: Mapping[str, object], now_ms: int) -> None:
        cfg = self.config
        detail = {
            "b": d.balance_fen,
            "b_actual": d.actual_balance_fen,
            "A1": cfg.alarm1_fen,
            "A2": cfg.alarm2_fen,
            "L": cfg.overdraft_limit_fen,
            "R": cfg.restore_threshold_fen,
            "grace_s": cfg.grace_s,
            "rules": cfg.rules_version,
            "action": None if d.action is None else d.action.value,
            **extra,
        }
        self.store.append(
            JournalEntry(
                now_ms,
                d.account_id,
                JournalKind.DECISION,
                d.kind.value,
                d.meter,
                ref=d.command_id,
                reasons=d.reasons,
                detail=_j(detail),
            )
        )

    def _log(
        self,
        account_id: str,
        meter: str | None,
        kind: DecisionKind,
        reasons: tuple[str, ...],
        detail: Mapping[str, object],
        now_ms: int,
        command_id: str | None = None,
    ) -> Decision:
        d = Decision(kind, account_id, meter, reasons, command_id=command_id)
        self._journal_decision(d, detail, now_ms)
        return d

    # command lifecycle ----------------------------------------------------------------------------
    def command(self, command_id: str) -> RelayOrder | None:
        with self.store.transaction():
            return self.store.command(command_id)

    def pending_commands(self, now_ms: int) -> tuple[RelayOrder, ...]:
        """Commands to (re)send: ISSUED and still valid. After a restart this returns the very
        commands decided before the crash, with the same ids (the edge de-duplicates by id)."""
        with self.store.transaction():
            return tuple(c for c in self.store.commands([CommandState.ISSUED]) if now_ms <= c.expires_ms)

    def on_result(self, result: RelayOrderResult, now_ms: int) -> ResultOutcome:
        """Match a result to its order by (command_id, gateway, meter) (FC-11) and advance it; a
        "done" result's read-back (``relay_open``) is then applied as :meth:`on_relay_status`
        does, in the same transaction: the ledger never holds the result without its read-back.
        The read-back also counts when the result itself is a repeat.

        Unknown ids, mismatched gateway/meter, and late or repeated results are journaled as
        ``COMMAND_RESULT_IGNORED`` and change nothing else.
        """
        with self.store.transaction():
            outcome = self._result(result, now_ms)
            c = outcome.command
            if c is None or result.status != "done" or result.relay_open is None:
                return outcome
            readback = self._relay_status(
                c.gateway, c.meter, result.relay_open, c.action is Action.TRIP, now_ms
            )
            command = self.store.command(c.command_id)
            return dataclasses.replace(outcome, command=command, decisions=outcome.decisions + readback)

    def _result(self, result: RelayOrderResult, now_ms: int) -> ResultOutcome:
        with self.store.transaction():
            c = self.store.command(result.command_id)
            reasons = (f"status:{result.status}", f"detail:{result.detail}")
            if c is None or (c.gateway, c.meter) != (result.gateway, result.meter):
                why = "UNKNOWN_COMMAND" if c is None else "GATEWAY_METER_MISMATCH"
                account_id = c.account_id if c is not None else self._account_or_dash(result.meter)
                detail = {"gateway": result.gateway, "meter": result.meter}
                self._log(
                    account_id,
                    result.meter,
                    DecisionKind.COMMAND_RESULT_IGNORED,
                    (why, *reasons),
                    detail,
                    now_ms,
                    result.command_id,
                )
                return ResultOutcome(False, None, why)
            event = _RESULT_EVENTS[result.status]
            if (c.state, event) not in TRANSITIONS:
                why = f"LATE_OR_REPEATED:{c.state.value}"
                self._log(
                    c.account_id,
                    c.meter,
                    DecisionKind.COMMAND_RESULT_IGNORED,
                    (why, *reasons),
                    {},
                    now_ms,
                    c.command_id,
                )
                return ResultOutcome(False, c, why)
            decisions = self._transition(c, event, now_ms, reasons, result.detail)
            decisions += self._evaluate(c.account_id, now_ms, "command").decisions
            return ResultOutcome(True, self.store.command(c.command_id), "accepted", tuple(decisions))

    def on_relay_status(
        self, gateway: str, meter: str, relay_open: bool, commanded_open: bool, now_ms: int
    ) -> tuple[Decision, ...]:
        """A read-back of status word 3 (bit4 ``relay_open``, bit6 ``commanded_open``) (FC-12).

        Verifies the outstanding command when the meter shows its intended state, records relay
        changes (``RESTORE_CONFIRMED`` when an armed relay closes), then re-evaluates.

        Raises:
            FeeControlError: the meter is not enrolled.
        """
        with self.store.transaction():
            return self._relay_status(gateway, meter, relay_open, commanded_open, now_ms)

    def _relay_status(
        self, gateway: str, meter: str, relay_open: bool, commanded_open: bool, now_ms: int
    ) -> tuple[Decision, ...]:
        with self.store.transaction():
            account_id = self.store.account_of_meter(meter)
            snap = next(m for m in self.store.meter_snapshots(account_id) if m.ref.meter == meter)
            if snap.ref.gateway != gateway:
                detail = {"gateway": gateway, "expected": snap.ref.gateway}
                return (
                    self._log(
                        account_id,
                        meter,
                        DecisionKind.COMMAND_RESULT_IGNORED,
                        ("GATEWAY_METER_MISMATCH",),
                        detail,
                        now_ms,
                    ),
                )
            relay = RelayState.CLOSED
            if relay_open:
                relay = RelayState.OPEN if commanded_open else RelayState.ARMED
            decisions: list[Decision] = []
            if relay is not snap.relay:
                reasons = (f"FROM:{snap.relay.value}", f"TO:{relay.value}")
                decisions.append(self._log(account_id, meter, DecisionKind.RELAY_STATE, reasons, {}, now_ms))
                # Supply is back whether the customer closed an armed relay or the meter closed
                # at once (close-allowed on meters without a button, direct close).
                if snap.relay in (RelayState.ARMED, RelayState.OPEN) and relay is RelayState.CLOSED:
                    decisions.append(
                        self._log(account_id, meter, DecisionKind.RESTORE_CONFIRMED, (), {}, now_ms)
                    )
                snap = _clear_failures(dataclasses.replace(snap, relay=relay))
            for c in self.store.commands([CommandState.ISSUED, CommandState.ACKED]):
                if c.meter == meter and _shows(c.action, relay):
                    decisions += self._transition(
                        c, CommandEvent.READBACK_MATCH, now_ms, (f"relay:{relay.value}",)
                    )
                    if c.action is Action.CLOSE_ALLOWED and relay is RelayState.ARMED:
                        decisions.append(
                            self._log(
                                account_id, meter, DecisionKind.RESTORE_ALLOWED, (), {}, now_ms, c.command_id
                            )
                        )
                    snap = _clear_failures(snap)
            self.store.put_meter_snapshot(dataclasses.replace(snap, last_sig=""))
            decisions += self._evaluate(account_id, now_ms, "command").decisions
            return tuple(decisions)

    def _transition(
        self, c: RelayOrder, event: CommandEvent, now_ms: int, reasons: tuple[str, ...], detail: str = ""
    ) -> list[Decision]:
        state = next_state(c.state, event)
        self.store.set_command_state(c.command_id, state, now_ms)
        kinds = {
            CommandState.ACKED: DecisionKind.COMMAND_RESULT,
            CommandState.VERIFIED: DecisionKind.VERIFIED,
            CommandState.FAILED: DecisionKind.FAILED,
            CommandState.EXPIRED: DecisionKind.EXPIRED,
            CommandState.UNCONFIRMED: DecisionKind.UNCONFIRMED,
        }
        info = {"from": c.state.value, "to": state.value, "event": event.value, "attempt": c.attempt}
        self.store.append(
            JournalEntry(
                now_ms,
                c.account_id,
                JournalKind.COMMAND,
                state.value,
                c.meter,
                ref=c.command_id,
                reasons=reasons,
                detail=_j(info),
            )
        )
        out = [
            Decision(kinds[state], c.account_id, c.meter, reasons, action=c.action, command_id=c.command_id)
        ]
        if state in (CommandState.FAILED, CommandState.EXPIRED, CommandState.UNCONFIRMED):
            out += self._attempt_failed(c, detail, now_ms)
        return out

    def _attempt_failed(self, c: RelayOrder, detail: str, now_ms: int) -> list[Decision]:
        """FC-12: count the failed attempt; after ``max_attempts`` escalate (COMMAND_FAILED) and stop
        retrying. FC-07: a meter refusing a trip because it is in 保电 is not retried."""
        account = self.store.account(c.account_id)
        m = next(s for s in self.store.meter_snapshots(c.account_id) if s.ref.meter == c.meter)
        attempts = m.failed_attempts + 1 if m.failed_action is c.action else 1
        blocked = None
        out: list[Decision] = []
        info = {"attempts": attempts, "max_attempts": self.config.max_attempts}
        if c.action is Action.TRIP and detail == METER_IN_PROTECT_DETAIL and not account.protected:
            blocked = DecisionKind.METER_IN_PROTECT.value
            out.append(
                self._log(
                    c.account_id,
                    c.meter,
                    DecisionKind.METER_IN_PROTECT,
                    ("NO_RETRY",),
                    info,
                    now_ms,
                    c.command_id,
                )
            )
        elif attempts >= self.config.max_attempts:
            blocked = DecisionKind.COMMAND_FAILED.value
            out.append(
                self._log(
                    c.account_id,
                    c.meter,
                    DecisionKind.COMMAND_FAILED,
                    ("MAX_ATTEMPTS",),
                    info,
                    now_ms,
                    c.command_id,
                )
            )
        self.store.put_meter_snapshot(
            dataclasses.replace(
                m,
                failed_action=c.action,
                failed_attempts=attempts,
                last_failed_ms=now_ms,
                blocked_reason=blocked,
            )
        )
        return out

    def reset_meter(self, meter: str, by: str, now_ms: int) -> None:
        """Operator: clear an escalated COMMAND_FAILED / METER_IN_PROTECT block so decisions resume."""
        with self.store.transaction():
            account_id = self.store.account_of_meter(meter)
            m = next(s for s in self.store.meter_snapshots(account_id) if s.ref.meter == meter)
            self.store.put_meter_snapshot(_clear_failures(m))
            self._log(
                account_id, meter, DecisionKind.HOLD_RELEASED, (f"OPERATOR:{by}", "COMMAND_BLOCK"), {}, now_ms
            )

    def _account_or_dash(self, meter: str) -> str:
        try:
            return self.store.account_of_meter(meter)
        except FeeControlError:
            return "-"


def _shows(action: Action, relay: RelayState) -> bool:
    """FC-12: a trip is proven by relay open + command state open; close-allowed by the command
    state no longer open (armed, or already closed on builds that close at once)."""
    if action is Action.TRIP:
        return relay is RelayState.OPEN
    return relay in (RelayState.ARMED, RelayState.CLOSED)


def _clear_failures(m: MeterSnapshot) -> MeterSnapshot:
    return dataclasses.replace(
        m, failed_action=None, failed_attempts=0, last_failed_ms=None, blocked_reason=None
    )


def _local_midnight_ms(day: dt.date, zone: dt.tzinfo) -> int:
    return int(dt.datetime.combine(day, dt.time(), tzinfo=zone).timestamp() * 1000)


def _definition(account: Account) -> dict[str, object]:
    """An account's enrolment as journaled (and compared, :meth:`FeeController.file_enrolment_due`)."""
    return {
        "tariff": account.tariff_id,
        "protected": account.protected,
        "class": account.customer_class,
        "meters": [
            [m.meter, m.gateway, m.remote, m.max_power_w, *([m.area] if m.area else [])]
            for m in account.meters
        ],
    }


def _j(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _period(tariff: Tariff, row: IntervalRow) -> int:
    """TOU-03: the period code of an interval, from the very kernel the daily TOU totals use
    (end-labelled, classified by its start), so charging and the totals cannot disagree."""
    end = np.array([row.interval_end_ms], dtype=np.int64)
    return int(tou_periods(end, tariff.calendar, interval_ms=row.interval_end_ms - row.interval_start_ms)[0])
