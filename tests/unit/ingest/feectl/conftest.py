"""Shared fixtures for the fee-control unit tests: tariffs from the business-rules examples,
a controller over an in-memory (or file) SQLite ledger, and local-time helpers (UTC+8)."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable

import pytest

from ingest.feectl import (
    Account,
    FeeControlConfig,
    FeeController,
    MeterRef,
    SqliteLedgerStore,
    Tariff,
    load_tariff,
)

CST = dt.timezone(dt.timedelta(hours=8))
MIN = 60_000
QUARTER = 15 * MIN


def ms(text: str) -> int:
    """``"2024-03-05 10:00"`` local (UTC+8) → epoch ms."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=CST).timestamp() * 1000)


FLAT_TOML = """
id = "flat"
zone = "+08:00"
[[versions]]
version = "f1"
effective_from = 2020-01-01T00:00:00+08:00
prices = { flat = 5000 }
[[versions.calendar]]
segments = [["00:00", "24:00", "flat"]]
"""

# TOU-03 Liaoning draft with TOU-02 Liaoning ratios on a 0.5000 flat price.
LIAONING_TOML = """
id = "ln"
zone = "+08:00"
[[versions]]
version = "ln-2024"
effective_from = 2024-01-01T00:00:00+08:00
prices = { sharp = 9375, peak = 7500, flat = 5000, valley = 2500 }
[[versions.calendar]]
months = [1, 7, 8, 12]
segments = [
  ["00:00", "05:00", "valley"], ["05:00", "07:30", "flat"], ["07:30", "10:30", "peak"],
  ["10:30", "11:30", "flat"], ["11:30", "12:30", "valley"], ["12:30", "16:00", "flat"],
  ["16:00", "17:00", "peak"], ["17:00", "19:00", "sharp"], ["19:00", "21:00", "peak"],
  ["21:00", "22:00", "flat"], ["22:00", "24:00", "valley"],
]
[[versions.calendar]]
months = [2, 3, 4, 5, 6, 9, 10, 11]
segments = [
  ["00:00", "05:00", "valley"], ["05:00", "07:30", "flat"], ["07:30", "10:30", "peak"],
  ["10:30", "11:30", "flat"], ["11:30", "12:30", "valley"], ["12:30", "16:00", "flat"],
  ["16:00", "21:00", "peak"], ["21:00", "22:00", "flat"], ["22:00", "24:00", "valley"],
]
"""


def tiered_toml(cycle: str, t1: int, t2: int, base: int = 4883, extra: str = "") -> str:
    return f"""
id = "tier"
zone = "+08:00"
[[versions]]
version = "t1"
effective_from = 2020-01-01T00:00:00+08:00
prices = {{ flat = {base} }}
[[versions.calendar]]
segments = [["00:00", "24:00", "flat"]]
[versions.tiers]
cycle = "{cycle}"
thresholds_centi_kwh = [{t1}, {t2}]
surcharges = [0, 500, 3000]
{extra}
"""


@pytest.fixture
def flat() -> Tariff:
    return load_tariff(FLAT_TOML)


@pytest.fixture
def liaoning() -> Tariff:
    return load_tariff(LIAONING_TOML)


def make_controller(
    tariff: Tariff,
    path: str = ":memory:",
    config: FeeControlConfig | None = None,
    protected: bool = False,
    meters: tuple[str, ...] = ("M1",),
    ids: Callable[[], str] | None = None,
) -> FeeController:
    counter = itertools.count(81)
    ctl = FeeController(
        SqliteLedgerStore(path),
        config or FeeControlConfig(),
        {tariff.tariff_id: tariff},
        new_command_id=ids or (lambda: f"C-{next(counter)}"),
    )
    refs = tuple(MeterRef(m, "G1") for m in meters)
    ctl.open_account(Account("A17", refs, tariff.tariff_id, protected=protected), ms("2024-01-01 00:00"))
    return ctl


@pytest.fixture
def ctl(flat: Tariff) -> FeeController:
    return make_controller(flat)
