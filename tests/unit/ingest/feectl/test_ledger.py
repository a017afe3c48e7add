"""FC-02, FC-04, FC-05, TOU-06: exactly-once charging, true-up, rounding, and the journal."""

from __future__ import annotations

import sqlite3

import pytest

from ingest.feectl.config import FeeControlConfig
from ingest.feectl.model import ChargeStatus, EstimatePolicy, FeeControlError, round_half_up
from ingest.feectl.store import JournalKind
from ingest.model.tariff import Tariff

from .conftest import QUARTER, make_controller, ms, tiered_toml

T0 = ms("2024-03-05 10:00")


def charge(ctl, start, energy, estimated=False, meter="M1", now=None):  # type: ignore[no-untyped-def]
    return ctl.charge_interval(meter, start, start + QUARTER, energy, estimated, now or start + QUARTER)


def test_fc02_balance_example(ctl) -> None:  # type: ignore[no-untyped-def]
    """Payments 200.00, charges 152.37, adjustment −5.00 → 42.63 yuan = 4 263 fen."""
    ctl.record_payment("A17", "P1", 20_000, T0)
    charge(ctl, T0, 30_474)  # 304.74 kWh × 0.5000 = 152.37 yuan
    ctl.record_adjustment("A17", "ADJ1", -500, "meter test fee", T0)
    assert ctl.balance("A17").balance_fen == 4_263
    assert ctl.check_consistency().ok


def test_tou06_cumulative_rounding_example(flat) -> None:  # type: ignore[no-untyped-def]
    """Three charges of 39.5 fen post 40, 39, 40 = 119 fen (not 120)."""
    ctl = make_controller(Tariff.loads(tiered_toml("annual", 288_000, 480_000, base=5000)))
    posted = [charge(ctl, T0 + i * QUARTER, 79).posted_fen for i in range(3)]  # 79 × 5000 = 395 000
    assert posted == [40, 39, 40]
    assert ctl.balance("A17").balance_fen == -119 == -round_half_up(3 * 395_000)


def test_fc05_duplicate_replayed_and_out_of_order_charge_once(ctl) -> None:  # type: ignore[no-untyped-def]
    starts = [T0 + i * QUARTER for i in range(4)]
    assert charge(ctl, starts[2], 25).status is ChargeStatus.CHARGED  # out of order
    assert charge(ctl, starts[0], 25).status is ChargeStatus.CHARGED
    assert charge(ctl, starts[2], 25).status is ChargeStatus.DUPLICATE  # redelivered
    assert charge(ctl, starts[1], 25).status is ChargeStatus.CHARGED  # late
    replay = [charge(ctl, s, 25, now=T0 + 86_400_000).status for s in starts[:3]]  # replay next day
    assert replay == [ChargeStatus.DUPLICATE] * 3
    charges = [e for e in ctl.journal("A17") if e.kind is JournalKind.CHARGE]
    assert len(charges) == 3
    assert ctl.balance("A17").charge_exact_micro == 3 * 25 * 5000
    assert ctl.balance("A17").balance_fen == -round_half_up(3 * 125_000)  # 37.5 → 38 fen


def test_fc05_estimate_trued_up_by_actual(ctl) -> None:  # type: ignore[no-untyped-def]
    """FC-05 example: 25 units × 0.5000 = 12.5 fen; actual 27 replaces estimated 25: +1.0 fen."""
    first = charge(ctl, T0, 25, estimated=True)
    assert (first.status, first.exact_micro_delta) == (ChargeStatus.CHARGED, 125_000)
    again = charge(ctl, T0, 25, estimated=True)
    assert again.status is ChargeStatus.DUPLICATE
    actual = charge(ctl, T0, 27)
    assert (actual.status, actual.exact_micro_delta, actual.posted_fen) == (ChargeStatus.TRUED_UP, 10_000, 1)
    assert charge(ctl, T0, 26, estimated=True).status is ChargeStatus.SUPERSEDED  # VEE-10: actual wins
    conflict = charge(ctl, T0, 30)
    assert conflict.status is ChargeStatus.CONFLICT  # VEE-10: first actual kept
    assert ctl.balance("A17").charge_exact_micro == 27 * 5000
    rows = [e for e in ctl.journal("A17") if e.kind is not JournalKind.DECISION or e.code == "DUP_CONFLICT"]
    kinds = [(e.kind, e.code) for e in rows if e.meter == "M1"]
    assert kinds == [
        (JournalKind.CHARGE, "EST"),
        (JournalKind.TRUEUP, "ACT"),
        (JournalKind.DECISION, "DUP_CONFLICT"),
    ]
    assert ctl.check_consistency().ok


def test_fc04_defer_policy_holds_estimates_until_actual(flat) -> None:  # type: ignore[no-untyped-def]
    ctl = make_controller(flat, config=FeeControlConfig(estimate_policy=EstimatePolicy.DEFER))
    assert charge(ctl, T0, 30, estimated=True).status is ChargeStatus.HELD
    assert charge(ctl, T0, 31, estimated=True).status is ChargeStatus.HELD
    assert ctl.balance("A17").balance_fen == 0
    done = charge(ctl, T0, 28)
    assert (done.status, done.exact_micro_delta) == (ChargeStatus.CHARGED, 140_000)
    assert charge(ctl, T0, 28).status is ChargeStatus.DUPLICATE
    assert ctl.check_consistency().ok


def test_fc04_actual_balance_excludes_unconfirmed_estimates(ctl) -> None:  # type: ignore[no-untyped-def]
    """FC-04 example: b = 120 with 300 fen estimated unconfirmed: b_after = −180, b_actual = 120."""
    ctl.record_payment("A17", "P1", 420, T0)
    charge(ctl, T0, 600, estimated=True)  # 600 × 5000 = 300 fen
    bal = ctl.balance("A17")
    assert (bal.balance_fen, bal.actual_balance_fen) == (120, 420)
    ctl.record_adjustment("A17", "X", -300, "prior charges", T0)  # the example's starting b = 120
    bal = ctl.balance("A17")
    assert (bal.balance_fen, bal.actual_balance_fen) == (-180, 120)
    charge(ctl, T0, 580)  # actual confirms 290 fen → b = −170, now real
    bal = ctl.balance("A17")
    assert (bal.balance_fen, bal.actual_balance_fen) == (-170, -170)


def test_tou05_month_boundary_resets_tier_position() -> None:
    ctl = make_controller(Tariff.loads(tiered_toml("monthly", 1_000, 2_000, base=5000)))
    last = ms("2024-03-31 23:45")  # interval ending 24:00 Mar 31: March cycle
    charge(ctl, last - QUARTER, 990)
    march = charge(ctl, last, 40)  # 10 at tier 1, 30 at tier 2
    april = charge(ctl, ms("2024-04-01 00:00"), 40)  # new cycle: all tier 1
    assert march.exact_micro_delta == 10 * 5000 + 30 * 5500
    assert april.exact_micro_delta == 40 * 5000


def test_fc05_late_interval_reprices_later_ones_in_cycle() -> None:
    """A late interval takes its own tier position; later intervals move up and only the
    difference is posted. The end state equals the in-order result."""
    tariff = Tariff.loads(tiered_toml("monthly", 100, 200, base=5000))
    energies = [60, 60, 60, 60]
    starts = [T0 + i * QUARTER for i in range(4)]
    in_order = make_controller(tariff)
    for s, e in zip(starts, energies, strict=True):
        charge(in_order, s, e)
    shuffled = make_controller(tariff)
    for i in (3, 0, 2, 1):
        charge(shuffled, starts[i], energies[i])
    assert shuffled.balance("A17").charge_exact_micro == in_order.balance("A17").charge_exact_micro
    # 240 units: 100 at tier 1, 100 at tier 2, 40 at tier 3
    assert in_order.balance("A17").charge_exact_micro == 100 * 5000 + 100 * 5500 + 40 * 8000
    assert any(e.kind is JournalKind.REPRICE for e in shuffled.journal("A17"))
    assert shuffled.check_consistency().ok


def test_payment_idempotent_by_id_and_conflict_detected(ctl) -> None:  # type: ignore[no-untyped-def]
    assert ctl.record_payment("A17", "P1", 10_000, T0).recorded
    again = ctl.record_payment("A17", "P1", 10_000, T0 + 5)
    assert (again.recorded, again.balance_fen) == (False, 10_000)
    with pytest.raises(FeeControlError) as err:
        ctl.record_payment("A17", "P1", 9_999, T0)
    assert err.value.reason == "payment_conflict"
    assert ctl.balance("A17").balance_fen == 10_000


def test_unknown_meter_and_account(ctl) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FeeControlError) as err:
        charge(ctl, T0, 1, meter="NOPE")
    assert err.value.reason == "unknown_meter"
    with pytest.raises(FeeControlError):
        ctl.record_payment("NOPE", "P", 1, T0)


def test_bad_interval_arguments_are_value_errors(ctl) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="energy"):
        ctl.charge_interval("M1", T0, T0 + QUARTER, -1, False, T0)
    with pytest.raises(ValueError, match="interval_end_ms"):
        ctl.charge_interval("M1", T0, T0, 1, False, T0)


def test_journal_is_append_only_in_the_database(ctl) -> None:  # type: ignore[no-untyped-def]
    charge(ctl, T0, 10)
    db = ctl.store._db
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE journal SET amount_fen = 0")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM journal")


def test_database_refuses_a_second_charge_row(ctl) -> None:  # type: ignore[no-untyped-def]
    charge(ctl, T0, 10)
    row = next(e for e in ctl.journal("A17") if e.kind is JournalKind.CHARGE)
    with pytest.raises(sqlite3.IntegrityError), ctl.store.transaction():
        ctl.store.append(row)
    assert ctl.check_consistency().ok  # the failed transaction rolled back


def test_check_consistency_detects_a_tampered_balance(ctl) -> None:  # type: ignore[no-untyped-def]
    charge(ctl, T0, 10)
    ctl.store._db.execute("UPDATE balances SET balance_fen = balance_fen + 1")
    report = ctl.check_consistency()
    assert not report.ok
    assert "A17" in report.problems[0]


def test_ledger_survives_reopen(tmp_path, flat) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "ledger.sqlite")
    ctl = make_controller(flat, path)
    ctl.record_payment("A17", "P1", 500, T0)
    charge(ctl, T0, 10)
    ctl.store.close()
    again = make_controller(flat, path)
    assert again.balance("A17").balance_fen == 500 - 5
    assert charge(again, T0, 10).status is ChargeStatus.DUPLICATE
    assert again.store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_nested_transaction_that_raises_undoes_only_its_own_changes(ctl) -> None:  # type: ignore[no-untyped-def]
    """A nested transaction is a savepoint: its changes go when it raises, the outer one's stay
    and commit with it."""
    store = ctl.store
    with store.transaction():
        charge(ctl, T0, 100)
        with pytest.raises(RuntimeError), store.transaction():
            charge(ctl, T0 + QUARTER, 100)
            raise RuntimeError("the inner unit fails after writing")
        charge(ctl, T0 + 2 * QUARTER, 100)
    starts = [e.interval_start_ms for e in ctl.journal("A17") if e.kind is JournalKind.CHARGE]
    assert starts == [T0, T0 + 2 * QUARTER]
    assert ctl.balance("A17").balance_fen == -100
    assert ctl.check_consistency().ok


def test_an_accounts_meters_are_read_through_an_index(ctl) -> None:  # type: ignore[no-untyped-def]
    """Every charge reads its account's meters; without the index each read scans every meter of
    the ledger (2.4 ms a charge at 25,000 accounts instead of 0.4 ms)."""
    db = ctl.store.connection
    for sql in (
        "SELECT meter FROM meters WHERE account_id = ? ORDER BY position",
        "SELECT m.meter FROM meters m LEFT JOIN commands c ON c.meter = m.meter "
        "WHERE m.account_id = ? ORDER BY m.position",
    ):
        plan = " ".join(str(r[-1]) for r in db.execute(f"EXPLAIN QUERY PLAN {sql}", ("A17",)))
        assert "USING INDEX meters_account" in plan, plan
