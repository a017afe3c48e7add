"""Hypothesis: under any sequence of charges (actual or estimated, duplicated, out of order,
late), payments (some replayed) and adjustments, the balance equals the journal's sum, the
posted charges equal round_half_up(Σ exact) (TOU-06), and each interval is charged once (FC-05)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.feectl.model import ChargeStatus, round_half_up
from ingest.feectl.store import JournalKind
from ingest.model.tariff import Tariff

from .conftest import QUARTER, make_controller, ms, tiered_toml

T0 = ms("2024-03-31 22:00")  # eight quarters before and after the March/April cycle boundary
TARIFF = Tariff.loads(tiered_toml("monthly", 300, 600, base=5283))

charge_op = st.tuples(
    st.just("charge"), st.sampled_from(["M1", "M2"]), st.integers(0, 15), st.integers(0, 400), st.booleans()
)
pay_op = st.tuples(st.just("pay"), st.integers(0, 5), st.integers(1, 5_000))
adjust_op = st.tuples(st.just("adjust"), st.integers(0, 3), st.integers(-500, 500).filter(bool))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(charge_op, pay_op, adjust_op), max_size=40))
def test_balance_always_equals_journal_sum(ops) -> None:  # type: ignore[no-untyped-def]
    ctl = make_controller(TARIFF, meters=("M1", "M2"))
    paid: dict[str, int] = {}
    for i, op in enumerate(ops):
        now = T0 + i * 1_000
        if op[0] == "charge":
            _, meter, slot, energy, est = op
            start = T0 + slot * QUARTER
            result = ctl.charge_interval(meter, start, start + QUARTER, energy, est, now)
            assert result.status is not ChargeStatus.HELD
        elif op[0] == "pay":
            ref, amount = f"P{op[1]}", op[2]
            amount = paid.setdefault(ref, amount)  # a replayed id carries the same amount
            ctl.record_payment("A17", ref, amount, now)
        else:
            ref, amount = f"ADJ{op[1]}", op[2]
            amount = paid.setdefault(ref, amount)
            ctl.record_adjustment("A17", ref, amount, "test", now)
        journal = ctl.journal("A17")
        balance = ctl.balance("A17")
        assert balance.balance_fen == sum(e.amount_fen for e in journal)
        charged_exact = sum(
            e.exact_micro
            for e in journal
            if e.kind in (JournalKind.CHARGE, JournalKind.TRUEUP, JournalKind.REPRICE)
        )
        posted = -sum(
            e.amount_fen
            for e in journal
            if e.kind in (JournalKind.CHARGE, JournalKind.TRUEUP, JournalKind.REPRICE)
        )
        assert posted == round_half_up(charged_exact)
        assert balance.balance_fen == sum(paid.values()) - posted
    keys = [(e.meter, e.interval_start_ms) for e in ctl.journal("A17") if e.kind is JournalKind.CHARGE]
    assert len(keys) == len(set(keys))
    report = ctl.check_consistency()
    assert report.ok, report.problems


@settings(max_examples=40, deadline=None)
@given(st.permutations(list(range(12))), st.lists(st.integers(0, 200), min_size=12, max_size=12))
def test_arrival_order_never_changes_the_total(order, energies) -> None:  # type: ignore[no-untyped-def]
    """FC-05: late and out-of-order intervals are priced at their own tier position."""
    in_order = make_controller(TARIFF)
    shuffled = make_controller(TARIFF)
    for i in range(12):
        in_order.charge_interval("M1", T0 + i * QUARTER, T0 + (i + 1) * QUARTER, energies[i], False, T0)
    for i in order:
        shuffled.charge_interval("M1", T0 + i * QUARTER, T0 + (i + 1) * QUARTER, energies[i], False, T0)
    assert shuffled.balance("A17").charge_exact_micro == in_order.balance("A17").charge_exact_micro
    assert shuffled.balance("A17").balance_fen == in_order.balance("A17").balance_fen
