"""FC-11, FC-12, FC-07: command lifecycle, result matching, retries, escalation, crash recovery."""

from __future__ import annotations

import itertools

import pytest

from ingest.feectl.lifecycle import (
    TRANSITIONS,
    CommandEvent,
    CommandState,
    InvalidTransitionError,
    RelayOrderResult,
    next_state,
)
from ingest.feectl.model import DecisionKind, RelayState

from .conftest import QUARTER, make_controller, ms

TUE_10 = ms("2024-03-05 10:00")
TRIP_AT = TUE_10 + 1_800_000


def tripping(ctl):  # type: ignore[no-untyped-def]
    ctl.charge_interval("M1", TUE_10 - QUARTER, TUE_10, 6, False, TUE_10)  # b = −3
    (command,) = ctl.evaluate("A17", TRIP_AT).commands
    return command


def test_transition_table() -> None:
    assert next_state(CommandState.ISSUED, CommandEvent.RESULT_DONE) is CommandState.ACKED
    assert next_state(CommandState.ACKED, CommandEvent.READBACK_MATCH) is CommandState.VERIFIED
    assert next_state(CommandState.ISSUED, CommandEvent.DEADLINE_PASSED) is CommandState.EXPIRED
    with pytest.raises(InvalidTransitionError):
        next_state(CommandState.VERIFIED, CommandEvent.RESULT_DONE)
    assert all(
        src not in (CommandState.VERIFIED, CommandState.FAILED, CommandState.EXPIRED)
        for src, _ in TRANSITIONS
    )


def test_fc12_done_then_readback_verifies(ctl) -> None:  # type: ignore[no-untyped-def]
    cmd = tripping(ctl)
    out = ctl.on_result(RelayOrderResult(cmd.command_id, "G1", "M1", "done"), TRIP_AT + 3_000)
    assert out.accepted and out.command.state is CommandState.ACKED  # 9C alone is not success
    decisions = ctl.on_relay_status("G1", "M1", relay_open=True, commanded_open=True, now_ms=TRIP_AT + 8_000)
    assert DecisionKind.VERIFIED in [d.kind for d in decisions]
    assert ctl.command(cmd.command_id).state is CommandState.VERIFIED
    assert ctl.store.meter_snapshots("A17")[0].relay is RelayState.OPEN
    assert ctl.tick(TRIP_AT + 3_600_000).commands == ()  # tripped: nothing more to do


def test_fc11_results_matched_on_id_gateway_and_meter(ctl) -> None:  # type: ignore[no-untyped-def]
    cmd = tripping(ctl)
    stale = ctl.on_result(RelayOrderResult("C-80", "G1", "M1", "done"), TRIP_AT + 1)  # FC-11 example
    assert (stale.accepted, stale.reason) == (False, "UNKNOWN_COMMAND")
    wrong = ctl.on_result(RelayOrderResult(cmd.command_id, "G2", "M1", "done"), TRIP_AT + 2)
    assert (wrong.accepted, wrong.reason) == (False, "GATEWAY_METER_MISMATCH")
    assert ctl.command(cmd.command_id).state is CommandState.ISSUED
    ignored = [e for e in ctl.journal("A17") if e.code == "COMMAND_RESULT_IGNORED"]
    assert [e.ref for e in ignored] == ["C-80", cmd.command_id]
    ok = ctl.on_result(RelayOrderResult(cmd.command_id, "G1", "M1", "done"), TRIP_AT + 3)
    repeat = ctl.on_result(RelayOrderResult(cmd.command_id, "G1", "M1", "done"), TRIP_AT + 4)
    assert ok.accepted and not repeat.accepted and repeat.reason == "LATE_OR_REPEATED:acked"


def test_fc12_expiry_retries_with_new_id_then_escalates(ctl) -> None:  # type: ignore[no-untyped-def]
    first = tripping(ctl)
    t = first.expires_ms + 60_001  # FC-11: deadline + result grace
    ev = ctl.tick(t)
    assert DecisionKind.EXPIRED in [d.kind for d in ev.decisions] and ev.commands == ()  # retry waits 5 min
    ids = [first.command_id]
    for attempt in (2, 3):
        t += 300_000
        (retry,) = ctl.tick(t).commands
        assert retry.attempt == attempt and retry.command_id not in ids
        ids.append(retry.command_id)
        t += 1_000
        ctl.on_result(RelayOrderResult(retry.command_id, "G1", "M1", "failed", "MAC error"), t)
    escalation = [e for e in ctl.journal("A17") if e.code == "COMMAND_FAILED"]
    assert len(escalation) == 1 and escalation[0].ref == ids[-1]
    assert ctl.tick(t + 3_600_000).commands == ()  # no fourth attempt (FC-12)


def test_fc12_payment_during_retry_wait_stops_the_retry(ctl) -> None:  # type: ignore[no-untyped-def]
    first = tripping(ctl)
    ctl.on_result(RelayOrderResult(first.command_id, "G1", "M1", "failed", "no answer"), TRIP_AT + 5_000)
    ctl.record_payment("A17", "P1", 5_000, TRIP_AT + 60_000)
    assert ctl.tick(TRIP_AT + 600_000).commands == ()


def test_fc07_meter_in_protect_is_not_retried(ctl) -> None:  # type: ignore[no-untyped-def]
    cmd = tripping(ctl)
    out = ctl.on_result(
        RelayOrderResult(cmd.command_id, "G1", "M1", "rejected", "meter_in_protect"), TRIP_AT + 1
    )
    assert DecisionKind.METER_IN_PROTECT in [d.kind for d in out.decisions]
    assert ctl.tick(TRIP_AT + 3_600_000).commands == ()
    ctl.reset_meter("M1", "operator7", TRIP_AT + 3_600_001)
    assert len(ctl.tick(TRIP_AT + 3_600_002).commands) == 1


def test_fc11_one_outstanding_command_per_meter(ctl) -> None:  # type: ignore[no-untyped-def]
    cmd = tripping(ctl)
    for minutes in range(1, 9):
        assert ctl.tick(TRIP_AT + minutes * 60_000).commands == ()
    assert [c.command_id for c in ctl.pending_commands(TRIP_AT + 60_000)] == [cmd.command_id]


def test_crash_recovery_resends_same_id_and_never_issues_twice(tmp_path, flat) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "feectl.sqlite")
    ids = (f"uuid-{i}" for i in itertools.count())
    ctl = make_controller(flat, path, ids=lambda: next(ids))
    cmd = tripping(ctl)
    ctl.store.close()  # crash: decided and persisted, result never received
    fresh = (f"after-restart-{i}" for i in itertools.count())
    again = make_controller(flat, path, ids=lambda: next(fresh))
    assert again.pending_commands(TRIP_AT + 60_000) == (cmd,)  # resent with the SAME id
    assert again.tick(TRIP_AT + 60_000).commands == ()  # and not decided a second time
    out = again.on_result(RelayOrderResult(cmd.command_id, "G1", "M1", "done"), TRIP_AT + 61_000)
    assert out.accepted
    again.on_relay_status("G1", "M1", True, True, TRIP_AT + 62_000)
    assert again.command(cmd.command_id).state is CommandState.VERIFIED
    assert sum(e.code == "TRIP_ISSUED" for e in again.journal("A17")) == 1
    assert again.check_consistency().ok


def test_fc12_close_allowed_armed_then_customer_closes(ctl) -> None:  # type: ignore[no-untyped-def]
    cmd = tripping(ctl)
    ctl.on_relay_status("G1", "M1", True, True, TRIP_AT + 5_000)
    paid = ctl.record_payment("A17", "P1", 10_000, TRIP_AT + 60_000)
    restore_id = next(d.command_id for d in paid.decisions if d.kind is DecisionKind.RESTORE_ISSUED)
    assert restore_id != cmd.command_id
    ctl.on_result(RelayOrderResult(restore_id, "G1", "M1", "done"), TRIP_AT + 62_000)
    armed = ctl.on_relay_status("G1", "M1", relay_open=True, commanded_open=False, now_ms=TRIP_AT + 65_000)
    assert {DecisionKind.VERIFIED, DecisionKind.RESTORE_ALLOWED} <= {d.kind for d in armed}
    closed = ctl.on_relay_status("G1", "M1", relay_open=False, commanded_open=False, now_ms=TRIP_AT + 160_000)
    assert DecisionKind.RESTORE_CONFIRMED in [d.kind for d in closed]


def test_fc12_done_without_readback_becomes_unconfirmed(ctl) -> None:  # type: ignore[no-untyped-def]
    cmd = tripping(ctl)
    ctl.on_result(RelayOrderResult(cmd.command_id, "G1", "M1", "done"), TRIP_AT + 3_000)
    ev = ctl.tick(TRIP_AT + 3_000 + 300_001)
    assert DecisionKind.UNCONFIRMED in [d.kind for d in ev.decisions]
    (retry,) = ctl.tick(TRIP_AT + 3_000 + 600_002).commands  # re-sending a trip is idempotent
    assert retry.attempt == 2


def test_fc12_close_allowed_that_closes_at_once_confirms_the_restore(ctl) -> None:  # type: ignore[no-untyped-def]
    tripping(ctl)
    ctl.on_relay_status("G1", "M1", True, True, TRIP_AT + 5_000)
    paid = ctl.record_payment("A17", "P1", 10_000, TRIP_AT + 60_000)
    restore_id = next(d.command_id for d in paid.decisions if d.kind is DecisionKind.RESTORE_ISSUED)
    ctl.on_result(RelayOrderResult(restore_id, "G1", "M1", "done"), TRIP_AT + 62_000)
    closed = ctl.on_relay_status("G1", "M1", relay_open=False, commanded_open=False, now_ms=TRIP_AT + 63_000)
    kinds = [d.kind for d in closed]
    assert DecisionKind.VERIFIED in kinds and DecisionKind.RESTORE_CONFIRMED in kinds
    assert ctl.command(restore_id).state is CommandState.VERIFIED


def test_fc12_result_and_its_readback_commit_together(tmp_path, flat) -> None:  # type: ignore[no-untyped-def]
    """A crash while the read-back of a "done" result is being applied leaves neither applied;
    the redelivered result then applies both, at once (one ledger transaction)."""
    path = str(tmp_path / "feectl.sqlite")
    ctl = make_controller(flat, path)
    cmd = tripping(ctl)
    done = RelayOrderResult(cmd.command_id, "G1", "M1", "done", relay_open=True)

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt("power lost before the read-back")

    ctl._relay_status = crash  # the read-back, after the result's state change
    with pytest.raises(KeyboardInterrupt):
        ctl.on_result(done, TRIP_AT + 3_000)
    ctl.store.close()
    again = make_controller(flat, path)
    assert again.command(cmd.command_id).state is CommandState.ISSUED  # not ACKED without its read-back
    assert again.store.meter_snapshots("A17")[0].relay is RelayState.CLOSED
    out = again.on_result(done, TRIP_AT + 4_000)  # the broker redelivers the unacknowledged result
    assert out.accepted and out.command.state is CommandState.VERIFIED
    assert DecisionKind.VERIFIED in [d.kind for d in out.decisions]
    assert again.store.meter_snapshots("A17")[0].relay is RelayState.OPEN
    assert again.check_consistency().ok


def test_fc12_readback_of_a_repeated_result_still_verifies(ctl) -> None:  # type: ignore[no-untyped-def]
    cmd = tripping(ctl)
    ctl.on_result(RelayOrderResult(cmd.command_id, "G1", "M1", "done"), TRIP_AT + 3_000)  # no read-back
    repeat = ctl.on_result(
        RelayOrderResult(cmd.command_id, "G1", "M1", "done", relay_open=True), TRIP_AT + 4_000
    )
    assert not repeat.accepted and repeat.command.state is CommandState.VERIFIED
