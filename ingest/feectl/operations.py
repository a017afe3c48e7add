"""Fee-control operations for an ops API and a CIS, as plain functions over the running service.

Accepts the :class:`~.service.FeeControlService` and plain JSON-like arguments (what a JSON body or
a query string decodes to), checked strictly; time is passed in (``now_ms``). Each change is one
ledger transaction of the core (:class:`~.engine.FeeController`); the decisions it takes go to the
service (:meth:`~.service.FeeControlService.apply_decisions`: logged, counted, notified, commands
sent at once) and the enrolled-meter map is re-read after an enrolment, so nothing waits for a
restart. Returns JSON-ready dicts. No HTTP here.

Raises :class:`~.model.FeeControlError` ``(reason, subject, detail)``; for a bad argument
``subject`` names the field (``meters[1].gateway``). Reasons (``docs/feectl.md#operations``):

- ``unknown_account``, ``unknown_meter``, ``unknown_command``: no such id in the ledger;
- ``meter_conflict``, ``command_conflict``, ``relay_conflict``, ``protected_conflict``,
  ``adjustment_conflict``, ``opening_balance_conflict``: the request contradicts the ledger;
- ``bad_fields``, ``unknown_tariff``, ``unknown_gateway``, ``amount_out_of_range``: bad arguments.

A ledger failure (``sqlite3.Error``) passes through unchanged.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from protocols.commands import Action
from protocols.topics import check_gateway_id

from .engine import OPENING_REF_PREFIX
from .lifecycle import CommandState, RelayOrder
from .model import Account, Decision, FeeControlError, MeterRef
from .store import CHARGE_KINDS, JournalEntry, JournalKind

if TYPE_CHECKING:
    from .service import FeeControlService

__all__ = [
    "MANUAL_ACTIONS",
    "account",
    "add_hold",
    "command",
    "commands",
    "decisions",
    "enrol_account",
    "holds",
    "manual_command",
    "record_adjustment",
    "rejects",
    "release_holds",
    "reset_meter",
    "statement",
    "statement_days",
]

ID_MAX = 128  # ids, names and codes: non-empty printable strings up to this length
TEXT_MAX = 500  # free text (a manual command's reason)
LIMIT_MAX = 1000  # the most rows one list returns
STATEMENT_DAYS_MAX = 366  # the most days one statement returns (statement_days streams any range)
# The API names a manual trip by its action and a restore by what it does (close-allowed, FC-08).
MANUAL_ACTIONS: Mapping[str, Action] = {Action.TRIP.value: Action.TRIP, "restore": Action.CLOSE_ALLOWED}
_ACCOUNT_KEYS = ("account_id", "tariff", "protected", "customer_class", "meters")
_METER_KEYS = ("meter", "gateway", "remote")


# -- argument checks ---------------------------------------------------------------------------
def _bad(field: str, detail: str) -> FeeControlError:
    return FeeControlError("bad_fields", field, f"{field}: {detail}")


def _keys(doc: Any, required: Sequence[str], optional: Sequence[str], path: str) -> Mapping[str, Any]:
    if not isinstance(doc, dict):
        raise _bad(path or "body", "expected an object")
    for k in doc:
        if k not in required and k not in optional:
            raise _bad(f"{path}.{k}" if path else str(k), "unknown key")
    for k in required:
        if k not in doc:
            raise _bad(f"{path}.{k}" if path else k, "missing")
    return doc


def _id(value: Any, field: str, most: int = ID_MAX) -> str:
    if not isinstance(value, str) or not value or len(value) > most or not value.isprintable():
        raise _bad(field, f"expected a non-empty printable string of at most {most} characters")
    return value


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(field, "expected true or false")
    return value


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, "expected an integer")
    return value


def _limit(value: Any, field: str = "limit") -> int:
    n = _int(value, field)
    if not 1 <= n <= LIMIT_MAX:
        raise _bad(field, f"expected 1..{LIMIT_MAX}")
    return n


def _amount(service: FeeControlService, value: Any, field: str, *, zero: bool) -> int:
    n = _int(value, field)
    if n == 0 and not zero:
        raise _bad(field, "must not be 0")
    most = service.cfg.service.limits.max_payment_fen
    if abs(n) > most:
        raise FeeControlError("amount_out_of_range", field, f"{field}: |{n}| over {most} fen")
    return n


def _day(value: Any, field: str) -> dt.date:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise _bad(field, "expected a date YYYY-MM-DD")


# -- views -------------------------------------------------------------------------------------
def _decision(d: Decision) -> dict[str, Any]:
    return {
        "kind": d.kind.value,
        "account": d.account_id,
        "meter": d.meter,
        "reasons": list(d.reasons),
        "balance_fen": d.balance_fen,
        "action": None if d.action is None else d.action.value,
        "command_id": d.command_id,
    }


def _command(c: RelayOrder) -> dict[str, Any]:
    return {
        "command_id": c.command_id,
        "account": c.account_id,
        "gateway": c.gateway,
        "meter": c.meter,
        "action": c.action.value,
        "attempt": c.attempt,
        "state": c.state.value,
        "issued_ms": c.issued_ms,
        "expires_ms": c.expires_ms,
        "state_ms": c.state_ms,
    }


def _entry(e: JournalEntry) -> dict[str, Any]:
    row = dataclasses.asdict(e)
    row["kind"] = e.kind.value
    row["reasons"] = list(e.reasons)
    row["detail"] = json.loads(e.detail) if e.detail else {}
    return row


def _apply(service: FeeControlService, ds: Sequence[Decision]) -> list[dict[str, Any]]:
    service.apply_decisions(ds)
    return [_decision(d) for d in ds]


def account(service: FeeControlService, account_id: Any) -> dict[str, Any]:
    """The account view (:meth:`~.service.FeeControlService.account_view`).

    Raises: FeeControlError ``unknown_account``, ``bad_fields``."""
    return service.account_view(_id(account_id, "account_id"))


# -- 1. enrolment ------------------------------------------------------------------------------
def _account_of(service: FeeControlService, doc: Mapping[str, Any]) -> Account:
    """The same rules as ``[[service.accounts]]`` (config.py), as FeeControlErrors."""
    account_id = _id(doc["account_id"], "account_id")
    tariff = _id(doc["tariff"], "tariff")
    if tariff not in service.controller.tariffs:
        raise FeeControlError("unknown_tariff", "tariff", f"tariff: {tariff!r} is not a loaded tariff")
    protected = _bool(doc["protected"], "protected")
    customer_class = _id(doc["customer_class"], "customer_class")
    meters = doc["meters"]
    if not isinstance(meters, list) or not meters or len(meters) > LIMIT_MAX:
        raise _bad("meters", f"expected a list of 1..{LIMIT_MAX} meters")
    refs: list[MeterRef] = []
    for j, m in enumerate(meters):
        path = f"meters[{j}]"
        _keys(m, _METER_KEYS, ("max_power_w",), path)
        meter = _id(m["meter"], f"{path}.meter")
        if meter in {r.meter for r in refs}:
            raise _bad(f"{path}.meter", f"meter {meter!r} listed twice")
        gateway = m["gateway"]
        why = "expected a string" if not isinstance(gateway, str) else check_gateway_id(gateway)
        if why is not None:
            raise _bad(f"{path}.gateway", why)
        if gateway not in service.cfg.command_keys:
            raise FeeControlError(
                "unknown_gateway", f"{path}.gateway", f"{path}.gateway: no command key for {gateway!r}"
            )
        remote = _bool(m["remote"], f"{path}.remote")
        power = None
        if "max_power_w" in m:
            power = _int(m["max_power_w"], f"{path}.max_power_w")
            if power <= 0:
                raise _bad(f"{path}.max_power_w", "must be > 0")
        refs.append(MeterRef(meter, gateway, remote, power))
    return Account(account_id, tuple(refs), tariff, customer_class, protected)


def enrol_account(service: FeeControlService, doc: Any, by: Any, now_ms: int) -> dict[str, Any]:
    """Create an account, or change one (tariff, protection, class, meters added or removed), at
    once: the next interval of a new meter is charged, the account is re-evaluated (FC-07), and
    the change is journaled (``account`` row, code ``API``, with ``by``). Repeating an enrolment
    changes nothing. ``doc``: ``{account_id, tariff, protected, customer_class, meters: [{meter,
    gateway, remote, max_power_w?}], opening_balance_fen?}``, a full definition (meters left out
    are removed). ``opening_balance_fen`` is posted only when the account is created.

    Returns ``{"created", "changed", "opening_balance_fen" (posted now, else null),
    "meters_added", "meters_removed", "decisions", "account" (the account view)}``.

    Raises:
        FeeControlError: ``bad_fields``, ``unknown_tariff``, ``unknown_gateway``,
            ``amount_out_of_range``, ``meter_conflict``, ``command_conflict``, ``relay_conflict``,
            ``opening_balance_conflict``.
    """
    who = _id(by, "by")
    fields = _keys(doc, _ACCOUNT_KEYS, ("opening_balance_fen",), "")
    acct = _account_of(service, fields)
    opening = None
    if "opening_balance_fen" in fields:
        opening = _amount(service, fields["opening_balance_fen"], "opening_balance_fen", zero=True)
    res = service.controller.enrol(acct, now_ms, by=who, code="API", opening_balance_fen=opening)
    service.accounts_changed()
    return {
        "created": res.created,
        "changed": res.changed,
        "opening_balance_fen": res.opening_fen,
        "meters_added": list(res.added),
        "meters_removed": list(res.removed),
        "decisions": _apply(service, res.decisions),
        "account": service.account_view(acct.account_id),
    }


# -- 2. manual relay commands ------------------------------------------------------------------
def manual_command(
    service: FeeControlService,
    meter: Any,
    action: Any,
    by: Any,
    reason: Any,
    now_ms: int,
    *,
    force: Any = False,
) -> dict[str, Any]:
    """An operator's ``trip`` (0x1A) or ``restore`` (close-allowed, 0x1B, as FC-08 restores),
    written ISSUED in its decision's transaction and sent, signed with the gateway's key, by the
    service's next flush (woken now). A manual trip keeps the relay open: no automatic restore
    until a manual ``restore``. A protected account (FC-07) is tripped only with ``force=True``.

    Returns ``{"command": {...}, "decisions": [...]}``.

    Raises:
        FeeControlError: ``bad_fields``, ``unknown_meter``, ``command_conflict`` (a command is
            outstanding for the meter), ``protected_conflict``.
    """
    meter = _id(meter, "meter")
    if action not in MANUAL_ACTIONS:
        raise _bad("action", f"expected one of {sorted(MANUAL_ACTIONS)}")
    who, why = _id(by, "by"), _id(reason, "reason", TEXT_MAX)
    ev = service.controller.manual_command(
        meter, MANUAL_ACTIONS[action], who, why, now_ms, force=_bool(force, "force")
    )
    return {"command": _command(ev.commands[0]), "decisions": _apply(service, ev.decisions)}


# -- 3. lists and operator changes -------------------------------------------------------------
def commands(
    service: FeeControlService,
    account: Any = None,
    meter: Any = None,
    states: Any = None,
    limit: Any = 100,
) -> dict[str, Any]:
    """Relay command history, newest first, filtered by account, meter and states
    (``issued``, ``acked``, ``verified``, ``failed``, ``expired``, ``unconfirmed``).

    Returns ``{"commands": [{command_id, account, gateway, meter, action, attempt, state,
    issued_ms, expires_ms, state_ms}]}``.

    Raises:
        FeeControlError: ``bad_fields``; ``unknown_account``; ``unknown_meter`` (a meter neither
            enrolled nor named by any command).
    """
    n = _limit(limit)
    wanted = None
    if states is not None:
        known = {s.value: s for s in CommandState}
        if not isinstance(states, list) or not states or any(s not in known for s in states):
            raise _bad("states", f"expected a non-empty list of {sorted(known)}")
        wanted = [known[s] for s in states]
    store = service.controller.store
    with store.transaction():
        if account is not None:
            store.account(_id(account, "account"))
        if meter is not None:
            meter = _id(meter, "meter")
        rows = store.command_history(account, meter, wanted, n)
        if meter is not None and not rows and not store.command_history(None, meter, None, 1):
            store.account_of_meter(meter)
    return {"commands": [_command(c) for c in rows]}


def command(service: FeeControlService, command_id: Any) -> dict[str, Any]:
    """One relay command. Raises: FeeControlError ``unknown_command``, ``bad_fields``."""
    cid = _id(command_id, "command_id")
    c = service.controller.command(cid)
    if c is None:
        raise FeeControlError("unknown_command", cid)
    return _command(c)


def holds(service: FeeControlService, account_id: Any) -> dict[str, Any]:
    """The account's holds not yet released (one past its ``until_ms`` is released by the next
    tick): ``{"account", "holds": [{meter, day, reason, set_ms, until_ms}]}``.

    Raises: FeeControlError ``unknown_account``, ``bad_fields``."""
    aid = _id(account_id, "account_id")
    store = service.controller.store
    with store.transaction():
        store.account(aid)
        rows = store.holds(aid)
    out = [
        {
            "meter": h.meter,
            "day": None if h.day is None else h.day.isoformat(),
            "reason": h.reason,
            "set_ms": h.set_ms,
            "until_ms": h.until_ms,
        }
        for h in rows
    ]
    return {"account": aid, "holds": out}


def add_hold(
    service: FeeControlService,
    account_id: Any,
    reason: Any,
    by: Any,
    now_ms: int,
    *,
    meter: Any = None,
    until_ms: Any = None,
) -> dict[str, Any]:
    """An operator hold (FC-09/FC-14): every automatic trip of the account is deferred
    (``TRIP_DEFERRED AUDIT_HOLD``) until it is released, or until ``until_ms``. Restores are
    not held. ``reason`` is a code (``EXTREME_WEATHER``, ``DISPUTE``); the same active hold
    again changes nothing.

    Returns ``{"added", "account", "holds": [...]}``.

    Raises:
        FeeControlError: ``bad_fields`` (``until_ms`` not after ``now_ms``), ``unknown_account``,
            ``unknown_meter`` (``meter`` not of the account).
    """
    aid, code, who = _id(account_id, "account_id"), _id(reason, "reason"), _id(by, "by")
    m = None if meter is None else _id(meter, "meter")
    until = None
    if until_ms is not None:
        until = _int(until_ms, "until_ms")
        if until <= now_ms:
            raise _bad("until_ms", "must be in the future")
    added = service.controller.hold(aid, code, now_ms, meter=m, until_ms=until, by=who)
    return {"added": added, **holds(service, aid)}


def release_holds(
    service: FeeControlService, account_id: Any, by: Any, now_ms: int, *, meter: Any = None
) -> dict[str, Any]:
    """Release the account's holds (those set for ``meter`` only, when given), journaled
    ``HOLD_RELEASED OPERATOR:<by>``, and re-evaluate: a trip held back may be issued now.

    Returns ``{"released": n, "decisions": [...]}``.

    Raises: FeeControlError ``unknown_account``, ``bad_fields``."""
    aid, who = _id(account_id, "account_id"), _id(by, "by")
    m = None if meter is None else _id(meter, "meter")
    n, ds = service.controller.release_account_holds(aid, who, now_ms, meter=m)
    return {"released": n, "decisions": _apply(service, ds)}


def decisions(service: FeeControlService, account_id: Any, limit: Any = 100) -> dict[str, Any]:
    """The newest ``limit`` decision rows of the account's journal, oldest first: notices,
    trips issued, deferred or suppressed, restores, command outcomes, holds (FC-13).

    Returns ``{"account", "decisions": [journal rows]}``.

    Raises: FeeControlError ``unknown_account``, ``bad_fields``."""
    aid, n = _id(account_id, "account_id"), _limit(limit)
    store = service.controller.store
    with store.transaction():
        store.account(aid)
        rows = store.journal_tail(aid, [JournalKind.DECISION], n)
    return {"account": aid, "decisions": [_entry(e) for e in rows]}


def record_adjustment(
    service: FeeControlService,
    account_id: Any,
    adjustment_id: Any,
    amount_fen: Any,
    reason: Any,
    by: Any,
    now_ms: int,
) -> dict[str, Any]:
    """Post a signed adjustment once per ``adjustment_id`` (FC-02), re-evaluating the account
    (a credit may restore, FC-08). The same id with the same account and amount again is a
    no-op (``"recorded": false``). Ids starting ``opening:`` are reserved for opening balances.

    Returns ``{"recorded", "account", "adjustment_id", "amount_fen", "balance_fen",
    "decisions"}``.

    Raises:
        FeeControlError: ``bad_fields``, ``amount_out_of_range`` (over
            ``[service.limits] max_payment_fen``), ``unknown_account``, ``adjustment_conflict``.
    """
    aid, ref = _id(account_id, "account_id"), _id(adjustment_id, "adjustment_id")
    if ref.startswith(OPENING_REF_PREFIX):
        raise _bad("adjustment_id", f"ids starting {OPENING_REF_PREFIX!r} are reserved")
    amount = _amount(service, amount_fen, "amount_fen", zero=False)
    code, who = _id(reason, "reason"), _id(by, "by")
    res = service.controller.record_adjustment(aid, ref, amount, code, now_ms, by=who)
    return {
        "recorded": res.recorded,
        "account": aid,
        "adjustment_id": ref,
        "amount_fen": amount,
        "balance_fen": res.balance_fen,
        "decisions": _apply(service, res.decisions),
    }


def rejects(service: FeeControlService, limit: Any = 100) -> dict[str, Any]:
    """The newest ``limit`` rejected messages or intervals, oldest first, with the first bytes of
    each payload in hex: ``{"rejects": [{ts_ms, topic, reason, detail, digest, payload_hex,
    payload_bytes, gateway, meter, interval_start_ms}]}``. Raises: FeeControlError ``bad_fields``."""
    n = _limit(limit)
    store = service.controller.store
    with store.transaction():
        rows = store.rejects(n)
    out = []
    for r in rows:
        row = dataclasses.asdict(r)
        row["payload_hex"] = row.pop("payload").hex()
        out.append(row)
    return {"rejects": out}


def reset_meter(service: FeeControlService, meter: Any, by: Any, now_ms: int) -> dict[str, Any]:
    """Clear a meter's escalation block (``COMMAND_FAILED``, ``METER_IN_PROTECT``; FC-12),
    journaled ``HOLD_RELEASED OPERATOR:<by> COMMAND_BLOCK``, and re-evaluate its account.

    Returns ``{"meter", "account", "decisions"}``.

    Raises: FeeControlError ``unknown_meter``, ``bad_fields``."""
    m, who = _id(meter, "meter"), _id(by, "by")
    ctl = service.controller
    ctl.reset_meter(m, who, now_ms)
    with ctl.store.transaction():
        aid = ctl.store.account_of_meter(m)
    ev = ctl.evaluate(aid, now_ms)
    return {"meter": m, "account": aid, "decisions": _apply(service, ev.decisions)}


# -- 4. statements -----------------------------------------------------------------------------
def statement_days(
    service: FeeControlService, account_id: Any, from_day: Any, to_day: Any
) -> Iterator[dict[str, Any]]:
    """One statement row per local day (the account's tariff calendar's UTC offset), from
    ``from_day`` to ``to_day`` inclusive, read one day (one transaction) at a time. A row's money
    is the journal rows *posted* in that day (``ts_ms``), whatever interval they charge:
    ``closing_fen = opening_fen + payments.fen + adjustments.fen − charges.fen``, and a day's
    closing is the next day's opening.

    Row: ``{"day", "opening_fen", "charges": {"fen", "intervals", "estimated", "corrections"},
    "payments": {"fen", "count"}, "adjustments": {"fen", "count"}, "closing_fen"}``:
    ``charges.fen`` is the fen charged (trued-up and re-priced differences included),
    ``intervals`` the intervals first charged, ``estimated`` how many of those were estimates,
    ``corrections`` the true-up and re-price rows.

    Raises (at the call, before any row):
        FeeControlError: ``bad_fields`` (a bad date, ``to_day`` before ``from_day``),
            ``unknown_account``.
    """
    aid, lo, hi = _id(account_id, "account_id"), _day(from_day, "from_day"), _day(to_day, "to_day")
    if hi < lo:
        raise _bad("to_day", "must not be before from_day")
    store = service.controller.store
    with store.transaction():
        acct = store.account(aid)
    zone = service.controller.tariffs[acct.tariff_id].calendar.zone
    return _days(service, aid, lo, hi, zone)


def _midnight_ms(day: dt.date, zone: dt.tzinfo) -> int:
    return int(dt.datetime.combine(day, dt.time(), tzinfo=zone).timestamp()) * 1000


def _days(
    service: FeeControlService, aid: str, lo: dt.date, hi: dt.date, zone: dt.tzinfo
) -> Iterator[dict[str, Any]]:
    store = service.controller.store
    with store.transaction():
        balance = store.money_before(aid, _midnight_ms(lo, zone))
    day = lo
    while day <= hi:
        start, end = _midnight_ms(day, zone), _midnight_ms(day + dt.timedelta(days=1), zone)
        charges = {"fen": 0, "intervals": 0, "estimated": 0, "corrections": 0}
        payments = {"fen": 0, "count": 0}
        adjustments = {"fen": 0, "count": 0}
        with store.transaction():
            for e in store.journal_range(aid, start, end):
                if e.kind in CHARGE_KINDS:
                    charges["fen"] -= e.amount_fen
                    if e.kind is JournalKind.CHARGE:
                        charges["intervals"] += 1
                        charges["estimated"] += e.estimated
                    else:
                        charges["corrections"] += 1
                elif e.kind is JournalKind.PAYMENT:
                    payments["fen"] += e.amount_fen
                    payments["count"] += 1
                elif e.kind is JournalKind.ADJUSTMENT:
                    adjustments["fen"] += e.amount_fen
                    adjustments["count"] += 1
        closing = balance + payments["fen"] + adjustments["fen"] - charges["fen"]
        yield {
            "day": day.isoformat(),
            "opening_fen": balance,
            "charges": charges,
            "payments": payments,
            "adjustments": adjustments,
            "closing_fen": closing,
        }
        balance = closing
        day += dt.timedelta(days=1)


def statement(service: FeeControlService, account_id: Any, from_day: Any, to_day: Any) -> dict[str, Any]:
    """The account statement of :func:`statement_days` for at most
    :data:`STATEMENT_DAYS_MAX` days, with the period's opening and closing balances.

    Returns ``{"account", "tariff", "utc_offset_minutes", "from_day", "to_day", "opening_fen",
    "closing_fen", "days": [rows]}``.

    Raises:
        FeeControlError: as :func:`statement_days`; ``bad_fields`` for a longer period.
    """
    lo, hi = _day(from_day, "from_day"), _day(to_day, "to_day")
    if (hi - lo).days >= STATEMENT_DAYS_MAX:
        raise _bad("to_day", f"a statement covers at most {STATEMENT_DAYS_MAX} days")
    days = list(statement_days(service, account_id, lo, hi))
    acct = service.account_view(str(account_id))
    offset = service.controller.tariffs[acct["tariff"]].calendar.utc_offset_ms // 60_000
    return {
        "account": acct["account"],
        "tariff": acct["tariff"],
        "utc_offset_minutes": offset,
        "from_day": lo.isoformat(),
        "to_day": hi.isoformat(),
        "opening_fen": days[0]["opening_fen"],
        "closing_fen": days[-1]["closing_fen"],
        "days": days,
    }
