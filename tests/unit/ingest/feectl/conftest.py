"""Shared fixtures for the fee-control unit tests: tariffs from the business-rules examples,
a controller over an in-memory (or file) SQLite ledger, and local-time helpers (UTC+8)."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable

import numpy as np
import pytest

from ingest.feectl.config import FeeControlConfig
from ingest.feectl.engine import FeeController
from ingest.feectl.model import Account, MeterRef
from ingest.feectl.sqlite_store import SqliteLedgerStore
from ingest.model.tariff import IntervalPrice, Tariff
from ingest.rules.stages import tou_periods

CST = dt.timezone(dt.timedelta(hours=8))
MIN = 60_000
QUARTER = 15 * MIN


def ms(text: str) -> int:
    """``"2024-03-05 10:00"`` local (UTC+8) → epoch ms."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=CST).timestamp() * 1000)


FLAT_TOML = """
id = "flat"
utc_offset_minutes = 480
[seasons.all]
months = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
workday = "flat"
[profiles.flat]
segments = [["00:00", "24:00", "flat"]]
[[versions]]
version = "f1"
effective_from = 2020-01-01T00:00:00+08:00
prices = { flat = 5000 }
"""

# TOU-03 Liaoning draft with TOU-02 Liaoning ratios on a 0.5000 flat price.
LIAONING_TOML = """
id = "ln"
utc_offset_minutes = 480
[seasons.sharp]
months = [1, 7, 8, 12]
workday = "with_sharp"
[seasons.rest]
months = [2, 3, 4, 5, 6, 9, 10, 11]
workday = "no_sharp"
[profiles.with_sharp]
segments = [
  ["00:00", "05:00", "valley"], ["05:00", "07:30", "flat"], ["07:30", "10:30", "peak"],
  ["10:30", "11:30", "flat"], ["11:30", "12:30", "valley"], ["12:30", "16:00", "flat"],
  ["16:00", "17:00", "peak"], ["17:00", "19:00", "sharp"], ["19:00", "21:00", "peak"],
  ["21:00", "22:00", "flat"], ["22:00", "24:00", "valley"],
]
[profiles.no_sharp]
segments = [
  ["00:00", "05:00", "valley"], ["05:00", "07:30", "flat"], ["07:30", "10:30", "peak"],
  ["10:30", "11:30", "flat"], ["11:30", "12:30", "valley"], ["12:30", "16:00", "flat"],
  ["16:00", "21:00", "peak"], ["21:00", "22:00", "flat"], ["22:00", "24:00", "valley"],
]
[[versions]]
version = "ln-2024"
effective_from = 2024-01-01T00:00:00+08:00
prices = { sharp = 9375, peak = 7500, flat = 5000, valley = 2500 }
"""


# TOU-03 Jiangsu large-industry summer sharp (2021): the sharp profile applies only on dates whose
# forecast maximum is ≥ 35 °C, published the evening before: a per-day override (here 2024-07-20).
# Other days put 10:00-11:00 and 14:00-15:00 in the peak. Sharp = peak + 0.1 yuan/kWh.
JIANGSU_TOML = """
id = "js"
utc_offset_minutes = 480
overrides = [{ date = 2024-07-20, profile = "hot" }]
[seasons.all]
months = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
workday = "normal"
[profiles.hot]
segments = [
  ["00:00", "08:00", "valley"], ["08:00", "10:00", "peak"], ["10:00", "11:00", "sharp"],
  ["11:00", "12:00", "peak"], ["12:00", "14:00", "flat"], ["14:00", "15:00", "sharp"],
  ["15:00", "19:00", "flat"], ["19:00", "22:00", "peak"], ["22:00", "24:00", "flat"],
]
[profiles.normal]
segments = [
  ["00:00", "08:00", "valley"], ["08:00", "12:00", "peak"], ["12:00", "14:00", "flat"],
  ["14:00", "15:00", "peak"], ["15:00", "19:00", "flat"], ["19:00", "22:00", "peak"],
  ["22:00", "24:00", "flat"],
]
[[versions]]
version = "js-2021"
effective_from = 2021-07-01T00:00:00+08:00
prices = { sharp = 8000, peak = 7000, flat = 4000, valley = 2000 }
"""


def tiered_toml(cycle: str, t1: int, t2: int, base: int = 4883, extra: str = "") -> str:
    return f"""
id = "tier"
utc_offset_minutes = 480
[seasons.all]
months = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
workday = "flat"
[profiles.flat]
segments = [["00:00", "24:00", "flat"]]
[[versions]]
version = "t1"
effective_from = 2020-01-01T00:00:00+08:00
prices = {{ flat = {base} }}
[versions.tiers]
cycle = "{cycle}"
thresholds_centi_kwh = [{t1}, {t2}]
surcharges = [0, 500, 3000]
{extra}
"""


def period_of(tariff: Tariff, start_ms: int, end_ms: int | None = None) -> int:
    """The period code the TOU kernel gives an interval (end-labelled; 15 min unless ``end_ms``)."""
    end = start_ms + QUARTER if end_ms is None else end_ms
    return int(tou_periods(np.array([end], dtype=np.int64), tariff.calendar, interval_ms=end - start_ms)[0])


def price(tariff: Tariff, start_ms: int, energy: int, cum: int = 0) -> IntervalPrice:
    """What charging asks of the model for a 15-minute interval starting at ``start_ms``."""
    return tariff.price_interval(start_ms, period_of(tariff, start_ms), energy, cum)


@pytest.fixture
def flat() -> Tariff:
    return Tariff.loads(FLAT_TOML)


@pytest.fixture
def liaoning() -> Tariff:
    return Tariff.loads(LIAONING_TOML)


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
