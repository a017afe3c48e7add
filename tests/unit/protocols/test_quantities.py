"""The quantity vocabulary: stable codes, sane attributes, docs in sync."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.flags import Flag, describe
from protocols.quantities import QUANTITIES, Quantity, by_code, by_name, to_display

DOC = Path(__file__).resolve().parents[3] / "docs" / "quantities.md"


def test_at_least_thirty_quantities_with_unique_codes_and_names() -> None:
    assert len(QUANTITIES) >= 30
    assert len({q.code for q in QUANTITIES}) == len({q.name for q in QUANTITIES}) == len(QUANTITIES)


def test_codes_are_stable() -> None:
    # Renumbering breaks every stored reading: these must never change.
    assert by_name("energy_fwd_active_total").code == 1
    assert by_name("energy_fwd_active_t4").code == 5
    assert by_name("voltage_a").code == 30
    assert by_name("relay_state").code == 100
    assert by_name("prepaid_balance").code == 70


def test_required_quantities_exist() -> None:
    for name in (
        "energy_rev_active_total",
        "energy_combined_reactive1_total",
        "current_c",
        "power_apparent_b",
        "power_factor_total",
        "frequency",
        "max_demand_fwd_active",
        "meter_clock",
        "power_down_count",
    ):
        assert by_name(name).name == name


def test_fixed_point_display_is_exact() -> None:
    assert to_display(by_name("voltage_a"), 2201) == "220.1"
    assert to_display(by_name("current_a"), -5) == "-0.005"
    assert to_display(by_name("energy_fwd_active_total"), 99_999_999) == "999999.99"
    assert to_display(by_name("power_down_count"), 7) == "7"


def test_cumulative_quantities_have_a_rollover_and_others_do_not() -> None:
    for q in QUANTITIES:
        assert (q.register_max is not None) == (q.kind == "cumulative"), q.name
    with pytest.raises(ValueError, match="register_max"):
        Quantity(999, "bad", "kWh", 2, "cumulative", "no rollover")


def test_unknown_lookups_name_the_key() -> None:
    with pytest.raises(KeyError, match="nope"):
        by_name("nope")
    with pytest.raises(KeyError, match="65000"):
        by_code(65000)


def test_flags_describe() -> None:
    assert describe(Flag.ROLLOVER | Flag.ESTIMATED) == ("ROLLOVER", "ESTIMATED")
    assert describe(1 << 15) == ("BEFORE_MIN_TIME",) and describe(1 << 31) == ("bit31",)


def test_docs_list_every_quantity_and_flag() -> None:
    text = DOC.read_text()
    for q in QUANTITIES:
        assert f"| {q.code} | `{q.name}` |" in text, q.name
    for f in Flag:
        assert f"`{f.name}`" in text
