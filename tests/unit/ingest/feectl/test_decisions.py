"""FC-03, FC-06, FC-07, FC-08, FC-09, FC-14: alarms, trips, restores, windows and holds."""

from __future__ import annotations

import dataclasses
import datetime as dt

from ingest.feectl.config import FeeControlConfig, NoTripWindows
from ingest.feectl.decide import AccountSnapshot, MeterSnapshot, decide, level_of
from ingest.feectl.model import Account, Balance, DecisionKind, Level, MeterRef, RelayState
from protocols.commands import Action

from .conftest import QUARTER, make_controller, ms

TUE_10 = ms("2024-03-05 10:00")


def kinds(decisions):  # type: ignore[no-untyped-def]
    return [d.kind for d in decisions]


def go_negative(ctl, now, fen=3):  # type: ignore[no-untyped-def]
    """Charge ``fen`` fen at 0.5000 yuan/kWh from a zero balance (2 units = 1 fen)."""
    return ctl.charge_interval("M1", now - QUARTER, now, 2 * fen, False, now)


def test_fc03_levels() -> None:
    cfg = FeeControlConfig()
    assert [level_of(b, cfg) for b in (5_001, 5_000, 2_001, 2_000, 1, 0, -3)] == [
        Level.NORMAL, Level.ALARM1, Level.ALARM1, Level.ALARM2, Level.ALARM2, Level.TRIP_DUE, Level.TRIP_DUE,
    ]  # fmt: skip
    cfg_l = FeeControlConfig(overdraft_limit_fen=1_000)
    assert [level_of(b, cfg_l) for b in (0, -3, -999, -1_000)] == [Level.ZERO] * 3 + [Level.TRIP_DUE]


def test_fc03_alarm_once_per_downward_crossing_and_rearm(ctl) -> None:  # type: ignore[no-untyped-def]
    """FC-03 example: b = 5 230, charge 300 → 4 930: ALARM1 once; … 1 990: ALARM2; payment re-arms."""
    ctl.record_payment("A17", "P0", 5_230, TUE_10)
    first = ctl.charge_interval("M1", TUE_10, TUE_10 + QUARTER, 600, False, TUE_10)  # 300 fen
    assert (first.balance_fen, kinds(first.decisions)) == (4_930, [DecisionKind.ALARM1])
    second = ctl.charge_interval("M1", TUE_10 + QUARTER, TUE_10 + 2 * QUARTER, 20, False, TUE_10)
    assert second.decisions == ()  # still ALARM1: no second notice
    third = ctl.charge_interval("M1", TUE_10 + 2 * QUARTER, TUE_10 + 3 * QUARTER, 5_860, False, TUE_10)
    assert (third.balance_fen, kinds(third.decisions)) == (1_990, [DecisionKind.ALARM2])
    paid = ctl.record_payment("A17", "P1", 10_000, TUE_10)
    assert kinds(paid.decisions) == [DecisionKind.RECOVERED]  # 11 990 > A1: re-armed
    again = ctl.charge_interval("M1", TUE_10 + 3 * QUARTER, TUE_10 + 4 * QUARTER, 14_000, False, TUE_10)
    assert kinds(again.decisions) == [DecisionKind.ALARM1]  # 4 990 ≤ 5 000: notified again


def test_fc06_trip_after_grace_in_working_hours(ctl) -> None:  # type: ignore[no-untyped-def]
    """FC-06 example: b reaches −3 at Tue 10:00 (L = 0); notice at 10:00; trip at 10:30."""
    first = go_negative(ctl, TUE_10)
    assert kinds(first.decisions) == [DecisionKind.ZERO_NOTICE, DecisionKind.TRIP_DEFERRED]
    assert first.decisions[1].reasons == ("GRACE",)
    early = ctl.evaluate("A17", TUE_10 + 29 * 60_000)
    assert (
        early.decisions == () and early.next_check_ms == TUE_10 + 30 * 60_000
    )  # same reason: not re-journaled
    due = ctl.evaluate("A17", TUE_10 + 30 * 60_000)
    assert kinds(due.decisions) == [DecisionKind.TRIP_ISSUED]
    (command,) = due.commands
    assert command.fields() == {
        "id": "C-81", "gateway": "G1", "meter": "M1", "action": "trip",
        "issued_ms": TUE_10 + 30 * 60_000, "expires_ms": TUE_10 + 40 * 60_000,
    }  # fmt: skip
    issued = [e for e in ctl.journal("A17") if e.code == "TRIP_ISSUED"]
    assert issued[0].ref == "C-81" and '"notice_ms":' + str(TUE_10) in issued[0].detail  # FC-13


def test_fc06_payment_inside_grace_prevents_trip(ctl) -> None:  # type: ignore[no-untyped-def]
    go_negative(ctl, TUE_10)
    paid = ctl.record_payment("A17", "P1", 5_000, TUE_10 + 20 * 60_000)
    assert DecisionKind.RECOVERED in kinds(paid.decisions)
    assert ctl.evaluate("A17", TUE_10 + 31 * 60_000).commands == ()


def test_fc07_protected_account_never_trips(flat) -> None:  # type: ignore[no-untyped-def]
    ctl = make_controller(flat, protected=True)
    first = go_negative(ctl, TUE_10, fen=5_000)
    assert kinds(first.decisions) == [DecisionKind.ZERO_NOTICE, DecisionKind.TRIP_SUPPRESSED]
    assert first.decisions[1].reasons == ("PROTECTED",)
    for hours in (1, 5, 24, 24 * 7):
        assert ctl.tick(TUE_10 + hours * 3_600_000).commands == ()
    assert ctl.pending_commands(TUE_10 + 3_600_000) == ()


def test_fc01_local_mode_meter_is_monitored_only(flat) -> None:  # type: ignore[no-untyped-def]
    ctl = make_controller(flat)
    ctl.open_account(Account("A17", (MeterRef("M1", "G1", remote=False),), "flat"), TUE_10)
    first = go_negative(ctl, TUE_10)
    assert first.decisions[-1].reasons == ("LOCAL_MODE",)
    assert ctl.tick(TUE_10 + 3_600_000).commands == ()


def test_fc09_no_trip_window_defers_to_monday_0830(ctl) -> None:  # type: ignore[no-untyped-def]
    """FC-09 example: due on Fri 17:10 → deferred through the weekend → issued Mon 08:30."""
    fri = ms("2024-03-08 16:40")
    go_negative(ctl, fri)
    ev = ctl.evaluate("A17", ms("2024-03-08 17:10"))
    assert kinds(ev.decisions) == [DecisionKind.TRIP_DEFERRED]
    assert ev.decisions[0].reasons == ("NO_TRIP_WINDOW:OUTSIDE_HOURS",)
    assert ev.next_check_ms == ms("2024-03-11 08:30")
    sat = ctl.evaluate("A17", ms("2024-03-09 11:00"))
    assert sat.decisions[0].reasons == ("NO_TRIP_WINDOW:WEEKEND",)
    assert ctl.evaluate("A17", ms("2024-03-11 08:29")).commands == ()
    assert len(ctl.evaluate("A17", ms("2024-03-11 08:30")).commands) == 1


def test_fc09_holiday_monday_and_makeup_saturday(flat) -> None:  # type: ignore[no-untyped-def]
    windows = NoTripWindows(holidays=(dt.date(2024, 3, 11),))
    ctl = make_controller(flat, config=FeeControlConfig(windows=windows))
    go_negative(ctl, ms("2024-03-08 16:40"))
    ev = ctl.evaluate("A17", ms("2024-03-11 09:00"))
    assert ev.decisions[0].reasons == ("NO_TRIP_WINDOW:HOLIDAY",)
    assert ev.next_check_ms == ms("2024-03-12 08:30")
    makeup = NoTripWindows(makeup_workdays=(dt.date(2024, 3, 9),))
    ctl2 = make_controller(flat, config=FeeControlConfig(windows=makeup))
    go_negative(ctl2, ms("2024-03-08 16:40"))
    assert ctl2.evaluate("A17", ms("2024-03-09 08:29")).next_check_ms == ms("2024-03-09 08:30")
    assert len(ctl2.evaluate("A17", ms("2024-03-09 08:30")).commands) == 1


def test_fc09_window_uses_configured_local_zone(ctl) -> None:  # type: ignore[no-untyped-def]
    """Tue 00:35 UTC is 08:35 local: inside the allowed hours, so the trip goes out."""
    at = int(dt.datetime(2024, 3, 5, 0, 35, tzinfo=dt.UTC).timestamp() * 1000)
    go_negative(ctl, at - 1_800_000)
    assert len(ctl.evaluate("A17", at).commands) == 1


def test_fc08_restore_promptly_after_payment(ctl) -> None:  # type: ignore[no-untyped-def]
    """FC-08 example: b = −1 230 (tripped); 10.00 leaves −230: no restore; 100.00 → close-allowed."""
    go_negative(ctl, TUE_10, fen=1_230)
    trip = ctl.evaluate("A17", TUE_10 + 1_800_000).commands[0]
    ctl.on_relay_status("G1", "M1", relay_open=True, commanded_open=True, now_ms=TUE_10 + 1_810_000)
    small = ctl.record_payment("A17", "P1", 1_000, ms("2024-03-05 23:00"))  # night: restores ignore windows
    assert kinds(small.decisions) == [DecisionKind.RESTORE_DEFERRED]
    assert small.decisions[0].reasons == ("BALANCE_NOT_ABOVE_RESTORE",)
    big = ctl.record_payment("A17", "P2", 10_000, ms("2024-03-05 23:00"))
    restore = [d for d in big.decisions if d.kind is DecisionKind.RESTORE_ISSUED]
    assert restore and restore[0].action is Action.CLOSE_ALLOWED and restore[0].command_id != trip.command_id
    assert ctl.command(restore[0].command_id).issued_ms == ms("2024-03-05 23:00")  # at payment time


def test_fc14_audit_hold_defers_trip(ctl) -> None:  # type: ignore[no-untyped-def]
    """FC-14 example: sum check fails (24.30 vs 24.90) → AUDIT_HOLD; b = −50 → TRIP_DEFERRED (AUDIT_HOLD)."""
    day, start, after = dt.date(2024, 3, 4), ms("2024-03-04 00:00"), ms("2024-03-05 00:30")
    for i in range(96):
        ctl.charge_interval("M1", start + i * QUARTER, start + (i + 1) * QUARTER, 25 + (i < 30), False, after)
    audit = ctl.audit_day("M1", day, 500_000, 502_490, now_ms=ms("2024-03-05 01:00"))
    assert audit.interval_sum_centi_kwh == 2_430 and audit.flags == ("SUM_FAIL",)
    assert [d.kind for d in audit.decisions[:2]] == [DecisionKind.SUM_FAIL, DecisionKind.AUDIT_HOLD]
    paid = ctl.record_payment("A17", "P1", 1_215 - 50, ms("2024-03-05 09:00"))  # 2 430 units cost 1 215 fen
    assert paid.balance_fen == -50
    assert kinds(paid.decisions) == [DecisionKind.TRIP_DEFERRED] and paid.decisions[0].reasons == (
        "AUDIT_HOLD",
    )
    assert ctl.evaluate("A17", TUE_10).commands == ()  # charging continued, only the trip is held
    clean = ctl.audit_day("M1", dt.date(2024, 3, 5), 502_490, 502_490, now_ms=TUE_10 + 1)
    assert DecisionKind.HOLD_RELEASED in kinds(clean.decisions)
    assert DecisionKind.TRIP_ISSUED in kinds(clean.decisions)


def test_vee14_sum_check_examples(ctl) -> None:  # type: ignore[no-untyped-def]
    """VEE-14: S = 24.80 vs F = 24.90 passes (|Δ| = 0.10 ≤ 0.498); day boundary is local midnight."""
    day, start = dt.date(2024, 3, 4), ms("2024-03-04 00:00")
    for i in range(96):
        ctl.charge_interval(
            "M1", start + i * QUARTER, start + (i + 1) * QUARTER, 25 + (i < 80), False, TUE_10
        )
    ctl.charge_interval("M1", start - QUARTER, start, 500, False, TUE_10)  # ends 00:00: the previous day
    ctl.charge_interval("M1", start + 96 * QUARTER, start + 97 * QUARTER, 500, False, TUE_10)  # next day
    audit = ctl.audit_day("M1", day, 100_000, 102_490, now_ms=TUE_10)
    assert (audit.intervals, audit.interval_sum_centi_kwh, audit.passed) == (96, 2_480, True)
    assert ctl.audit_day("M1", day, 100_000, 102_560, now_ms=TUE_10).flags == ("SUM_FAIL",)  # 0.80 > 2 %


def test_fc14_estimated_share_over_25_percent_holds(ctl) -> None:  # type: ignore[no-untyped-def]
    day, start = dt.date(2024, 3, 4), ms("2024-03-04 00:00")
    for i in range(96):
        ctl.charge_interval("M1", start + i * QUARTER, start + (i + 1) * QUARTER, 10, i < 25, TUE_10)
    assert ctl.audit_day("M1", day, 0, 960, now_ms=TUE_10).flags == ("ESTIMATED_SHARE",)  # 25/96 > 25 %


def _snap(b: int, **meter: object) -> AccountSnapshot:
    acct = Account("A", (MeterRef("M", "G"),), "t")
    bal = Balance("A", b, b, 0, 0)
    return AccountSnapshot(
        acct, bal, Level.TRIP_DUE, 0, (), (dataclasses.replace(MeterSnapshot(MeterRef("M", "G")), **meter),)
    )  # type: ignore[arg-type]


def test_decide_is_pure_and_blocks_on_command_state() -> None:
    cfg = FeeControlConfig()
    now = TUE_10 + 3_600_000
    assert kinds(decide(_snap(-5), cfg, now).decisions) == [DecisionKind.TRIP_ISSUED]
    assert decide(_snap(-5), cfg, now) == decide(_snap(-5), cfg, now)
    inflight = decide(_snap(-5, outstanding=Action.TRIP), cfg, now).decisions[0]
    assert inflight.reasons == ("COMMAND_IN_FLIGHT",)
    waiting = decide(_snap(-5, failed_action=Action.TRIP, failed_attempts=1, last_failed_ms=now), cfg, now)
    assert waiting.decisions[0].reasons == ("RETRY_WAIT",) and waiting.next_check_ms == now + 300_000
    escalated = _snap(-5, failed_action=Action.TRIP, failed_attempts=3, blocked_reason="COMMAND_FAILED")
    assert decide(escalated, cfg, now).decisions[0].reasons == ("COMMAND_FAILED",)
    already_open = decide(_snap(-5, relay=RelayState.OPEN), cfg, now)
    assert already_open.decisions == ()
