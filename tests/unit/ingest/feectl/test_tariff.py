"""TOU-02…TOU-06: calendars, tiers, versions, local time, and strict loading."""

from __future__ import annotations

import datetime as dt
import tomllib

import pytest

from ingest.feectl.model import round_half_up
from ingest.model.tariff import Tariff, TariffCalendar
from protocols.errors import ConfigError

from .conftest import FLAT_TOML, JIANGSU_TOML, LIAONING_TOML, QUARTER, ms, price, tiered_toml


@pytest.mark.parametrize(
    ("interval_end", "period"),
    [
        ("2024-07-15 17:30", "sharp"),  # TOU-03 example: starts 17:15 in July → T1
        ("2024-05-15 17:30", "peak"),  # same time in May → T2
        ("2024-05-15 12:00", "valley"),  # starts 11:45 → T4
        ("2024-05-15 05:15", "flat"),  # starts 05:00 → T3
        ("2024-05-15 05:00", "valley"),  # starts 04:45: still valley (start-time rule)
    ],
)
def test_tou03_liaoning_period_of_interval_start(interval_end: str, period: str) -> None:
    tariff = Tariff.loads(LIAONING_TOML)
    start = ms(interval_end) - QUARTER
    got = price(tariff, start, 100)
    assert got.period == period
    # TOU-02 Liaoning ratios on flat 0.5000: sharp 0.9375, peak 0.7500, flat 0.5000, valley 0.2500
    assert got.exact_micro == 100 * {"sharp": 9375, "peak": 7500, "flat": 5000, "valley": 2500}[period]


def test_tou03_local_day_boundary_in_fixed_zone() -> None:
    """Local time is UTC+8: 16:00 UTC is 00:00 next day locally (valley), 15:45 UTC is 23:45 (valley),
    22:30 UTC is 06:30 local (flat); a UTC reading of the clock would get these wrong."""
    tariff = Tariff.loads(LIAONING_TOML)
    utc = dt.UTC
    at = [dt.datetime(2024, 5, 14, h, m, tzinfo=utc) for h, m in ((15, 45), (16, 0), (22, 30), (2, 0))]
    periods = [price(tariff, int(t.timestamp() * 1000), 1).period for t in at]
    assert periods == ["valley", "valley", "flat", "peak"]  # 02:00 UTC = 10:00 local: peak


def test_tou03_holiday_and_weekend_profiles() -> None:
    text = (
        FLAT_TOML.replace('workday = "flat"', 'workday = "flat"\nweekend = "rest"\nholiday = "rest"').replace(
            "holidays", "x"
        )
        + '[profiles.rest]\nsegments = [["00:00", "24:00", "valley"]]\n'
    )
    text = text.replace("utc_offset_minutes = 480", "utc_offset_minutes = 480\nholidays = [2024-10-01]")
    text = text.replace("prices = { flat = 5000 }", "prices = { flat = 5000, valley = 3000 }")
    tariff = Tariff.loads(text)
    period = [price(tariff, ms(f"2024-10-{d:02d} 12:00"), 1).period for d in (1, 2, 12, 13)]
    assert period == ["valley", "flat", "valley", "valley"]  # holiday Tue, Wed, Sat, Sun


UTC8 = "utc_offset_minutes = 480"


def _weekend_rest(extra: str) -> Tariff:
    """FLAT_TOML with a valley ``rest`` profile on weekends and holidays, plus ``extra`` top-level keys."""
    text = FLAT_TOML.replace('workday = "flat"', 'workday = "flat"\nweekend = "rest"')
    text = text.replace(UTC8, f"{UTC8}\n{extra}")
    text = text.replace("prices = { flat = 5000 }", "prices = { flat = 5000, valley = 3000 }")
    return Tariff.loads(text + '[profiles.rest]\nsegments = [["00:00", "24:00", "valley"]]\n')


def test_tou03_weather_triggered_override_day() -> None:
    """TOU-03 Jiangsu example: 07-20 is forecast at 36 °C, so 10:00-11:00 is sharp that day; 07-21
    (34 °C, no override) is peak at the same time."""
    tariff = Tariff.loads(JIANGSU_TOML)
    hot, normal = price(tariff, ms("2024-07-20 10:00"), 100), price(tariff, ms("2024-07-21 10:00"), 100)
    assert (hot.period, hot.exact_micro) == ("sharp", 800_000)
    assert (normal.period, normal.exact_micro) == ("peak", 700_000)
    assert price(tariff, ms("2024-07-20 14:45"), 1).period == "sharp"  # the override's whole day
    assert price(tariff, ms("2024-07-20 15:00"), 1).period == "flat"


def test_tou03_makeup_workday_uses_the_workday_profile() -> None:
    """调休: Saturday 2024-10-12 is worked by decree (workday profile); Sunday 10-13 is a weekend."""
    tariff = _weekend_rest("makeup_workdays = [2024-10-12]")
    period = [price(tariff, ms(f"2024-10-{d:02d} 12:00"), 1).period for d in (11, 12, 13)]
    assert period == ["flat", "flat", "valley"]
    assert price(_weekend_rest(""), ms("2024-10-12 12:00"), 1).period == "valley"  # without it


def test_tou05_calendar_version_applies_by_interval_start() -> None:
    """A calendar version from 2024-07-15 17:30 drops July's sharp: the interval starting 17:15
    keeps the old calendar (sharp), the one starting 17:30 takes the new one (peak)."""
    text = LIAONING_TOML.replace(
        "[[versions]]",
        "[[calendar_versions]]\neffective_from = 2024-07-15T17:30:00\n"
        "[calendar_versions.seasons.all]\nmonths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]\n"
        'workday = "no_sharp"\n[[versions]]',
    )
    tariff = Tariff.loads(text)
    period = [
        price(tariff, ms(f"2024-07-{t}"), 1).period for t in ("14 17:30", "15 17:15", "15 17:30", "16 17:30")
    ]
    assert period == ["sharp", "sharp", "peak", "peak"]


def test_tou05_holiday_takes_the_holiday_profile_of_the_version_in_force() -> None:
    """Holiday 2024-10-01 (a Tuesday) has no holiday profile of its own at first (so the workday's:
    flat); a calendar version from 12:00 that day gives holidays the valley ``rest`` profile."""
    doc = tomllib.loads(FLAT_TOML.replace(UTC8, f"{UTC8}\nholidays = [2024-10-01]"))
    doc["profiles"]["rest"] = {"segments": [["00:00", "24:00", "valley"]]}
    doc["versions"][0]["prices"]["valley"] = 3000
    doc["calendar_versions"] = [
        {
            "effective_from": dt.datetime(2024, 10, 1, 12),
            "seasons": {"all": {**doc["seasons"]["all"], "holiday": "rest"}},
        }
    ]
    tariff = Tariff.from_dict(doc)
    period = [
        price(tariff, ms(t), 1).period for t in ("2024-10-01 11:45", "2024-10-01 12:00", "2024-10-02 12:00")
    ]
    assert period == ["flat", "valley", "flat"]


def test_calendar_document_is_a_tariff_without_prices() -> None:
    """One schema: ingest reads the calendar of a tariff document; charging needs id and versions."""
    doc = tomllib.loads(LIAONING_TOML)
    assert (TariffCalendar.from_dict(doc).profiles == Tariff.loads(LIAONING_TOML).calendar.profiles).all()
    del doc["id"], doc["versions"]
    TariffCalendar.from_dict(doc)
    with pytest.raises(ConfigError) as err:
        Tariff.from_dict(doc)
    assert err.value.key_path == "tariff.id"


def test_tou04_annual_interval_crossing_t1_is_split() -> None:
    """TOU-04 example: T1 = 2 880.00 kWh, cumulative 2 879.50, 1.20 kWh in the valley at 0.3000."""
    tariff = Tariff.loads(tiered_toml("annual", 288_000, 480_000, base=3000))
    got = price(tariff, ms("2024-06-01 02:00"), 120, 287_950)
    assert [(p.tier, p.energy_centi_kwh, p.price) for p in got.parts] == [(1, 50, 3000), (2, 70, 3500)]
    assert got.exact_micro == 150_000 + 245_000 == 395_000  # 39.5 fen


def test_tou04_beijing_monthly_250_kwh() -> None:
    """240 × 0.4883 + 10 × 0.5383 = 122.575 yuan, as 0.01 kWh steps summed over the month."""
    tariff = Tariff.loads(tiered_toml("monthly", 24_000, 40_000))
    total, cum = 0, 0
    for i in range(250):  # 1 kWh per interval
        total += price(tariff, ms("2024-03-01 00:00") + i * QUARTER, 100, cum).exact_micro
        cum += 100
    assert total == 122_575_000
    assert round_half_up(total) == 12_258  # fen


def test_tou04_third_tier_and_exact_threshold() -> None:
    tariff = Tariff.loads(tiered_toml("monthly", 24_000, 40_000, base=5000))
    on_t1 = price(tariff, ms("2024-03-02 00:00"), 100, 23_900)  # ends exactly at T1: tier 1
    assert [(p.tier, p.energy_centi_kwh) for p in on_t1.parts] == [(1, 100)]
    across_both = price(tariff, ms("2024-03-02 00:00"), 17_000, 23_500)
    assert [(p.tier, p.energy_centi_kwh) for p in across_both.parts] == [(1, 500), (2, 16_000), (3, 500)]
    assert across_both.exact_micro == 500 * 5000 + 16_000 * 5500 + 500 * 8000


def test_tou05_cycle_bounds_year_and_month() -> None:
    annual = Tariff.loads(tiered_toml("annual", 288_000, 480_000))
    # interval ending 00:00 Jan 1 (starts 23:45 Dec 31) is in the old cycle; ending 00:15 in the new
    assert annual.cycle_bounds(ms("2024-12-31 23:45")) == (ms("2024-01-01 00:00"), ms("2025-01-01 00:00"))
    assert annual.cycle_bounds(ms("2025-01-01 00:00")) == (ms("2025-01-01 00:00"), ms("2026-01-01 00:00"))
    monthly = Tariff.loads(tiered_toml("monthly", 24_000, 40_000, extra="start_day = 15"))
    assert monthly.cycle_bounds(ms("2024-03-14 23:45")) == (ms("2024-02-15 00:00"), ms("2024-03-15 00:00"))
    assert monthly.cycle_bounds(ms("2024-12-20 10:00")) == (ms("2024-12-15 00:00"), ms("2025-01-15 00:00"))


def test_tou05_price_change_mid_day_applies_by_interval_start() -> None:
    text = FLAT_TOML + (
        '[[versions]]\nversion = "f2"\neffective_from = 2024-07-01T14:00:00\nprices = { flat = 6000 }\n'
    )  # a local date-time: at utc_offset_minutes
    tariff = Tariff.loads(text)
    before = price(tariff, ms("2024-07-01 13:45"), 10)  # interval ending 14:00: old price
    after = price(tariff, ms("2024-07-01 14:00"), 10)  # interval ending 14:15: new price
    assert (before.version, before.exact_micro) == ("f1", 50_000)
    assert (after.version, after.exact_micro) == ("f2", 60_000)


def test_version_not_yet_in_force_is_config_error() -> None:
    tariff = Tariff.loads(FLAT_TOML)
    with pytest.raises(ConfigError) as err:
        price(tariff, ms("2019-12-31 23:45"), 1)
    assert err.value.key_path == "tariffs.flat.versions"


@pytest.mark.parametrize(
    ("old", "new", "key_path"),
    [
        ('id = "flat"', "id = 7", "tariff.id"),
        ('version = "f1"', 'version = "f1"\nbogus = 1', "tariff.versions[0].bogus"),
        ("prices = { flat = 5000 }", "prices = { flat = 0.5 }", "tariff.versions[0].prices.flat"),
        ("prices = { flat = 5000 }", "prices = { peak = 5000 }", "tariff.versions[0].prices"),
        ("prices = { flat = 5000 }", "prices = { deep = 5000 }", "tariff.versions[0].prices"),
        ('["00:00", "24:00", "flat"]', '["00:00", "23:00", "flat"]', "tariff.profiles.flat.segments"),
        ('["00:00", "24:00", "flat"]', '["00:00", "25:00", "flat"]', "tariff.profiles.flat.segments"),
        ('["00:00", "24:00", "flat"]', '["0:00", "24:00", "flat"]', "tariff.profiles.flat.segments"),
        ("utc_offset_minutes = 480", 'utc_offset_minutes = "+08:00"', "tariff.utc_offset_minutes"),
        (
            "effective_from = 2020-01-01T00:00:00+08:00",
            "effective_from = 2020-01-01",
            "tariff.versions[0].effective_from",
        ),
    ],
)
def test_loader_errors_name_the_key(old: str, new: str, key_path: str) -> None:
    with pytest.raises(ConfigError) as err:
        Tariff.loads(FLAT_TOML.replace(old, new))
    assert err.value.key_path == key_path


CAL_VERSION = """
[[calendar_versions]]
effective_from = 2024-07-01T00:00:00
[calendar_versions.seasons.all]
months = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
workday = "flat"
"""


@pytest.mark.parametrize(
    ("top", "tail", "key_path"),
    [
        ("holidays = [2024-10-01T00:00:00]", "", "tariff.holidays"),
        ("makeup_workdays = [2024-10-11]", "", "tariff.makeup_workdays"),  # a Friday
        ("makeup_workdays = 2024-10-12", "", "tariff.makeup_workdays"),
        ("overrides = [{ date = 2024-07-20, profile = 'hot' }]", "", "tariff.overrides[0].profile"),
        ("overrides = [{ date = '07-20', profile = 'flat' }]", "", "tariff.overrides[0].date"),
        ("overrides = [{ date = 2024-07-20, profile = 'flat', x = 1 }]", "", "tariff.overrides[0].x"),
        ("overrides = { date = 2024-07-20, profile = 'flat' }", "", "tariff.overrides"),
        (
            "holidays = [2024-07-20]\noverrides = [{ date = 2024-07-20, profile = 'flat' }]",
            "",
            "tariff.overrides[0].date",
        ),
        ("", CAL_VERSION.replace("T00:00:00", ""), "tariff.calendar_versions[0].effective_from"),
        ("", CAL_VERSION + CAL_VERSION, "tariff.calendar_versions[1].effective_from"),  # not later
        (
            "",
            CAL_VERSION.replace("effective_from", "prices = 1\neffective_from"),
            "tariff.calendar_versions[0].prices",
        ),
        (
            "",
            CAL_VERSION.replace("3, 4, 5, 6, 7, 8, 9, 10, 11, 12", "3"),
            "tariff.calendar_versions[0].seasons",
        ),
        ("", CAL_VERSION.replace('"flat"', '"hot"'), "tariff.calendar_versions[0].seasons.all.workday"),
    ],
)
def test_calendar_loader_errors_name_the_key(top: str, tail: str, key_path: str) -> None:
    Tariff.loads(FLAT_TOML.replace(UTC8, f"{UTC8}\nmakeup_workdays = [2024-10-12]") + CAL_VERSION)  # valid
    with pytest.raises(ConfigError) as err:
        Tariff.loads(FLAT_TOML.replace(UTC8, f"{UTC8}\n{top}") + tail)
    assert err.value.key_path == key_path


def test_calendar_must_cover_every_month_once() -> None:
    bad = LIAONING_TOML.replace("months = [2, 3, 4, 5, 6, 9, 10, 11]", "months = [2, 3, 4, 5, 6, 9, 10]")
    with pytest.raises(ConfigError, match=r"months \[11\] are in no season"):
        Tariff.loads(bad)


def test_tou05_non_increasing_tiers_rejected_at_load() -> None:
    with pytest.raises(ConfigError) as err:
        Tariff.loads(tiered_toml("monthly", 40_000, 24_000))
    assert err.value.key_path == "tariff.versions[0].tiers.thresholds_centi_kwh"
