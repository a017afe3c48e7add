"""Strict loading of the [feectl] table (STYLE H6) with the reference defaults."""

from __future__ import annotations

import datetime as dt

import pytest

from ingest.feectl.config import FeeControlConfig, load_feectl_config
from ingest.feectl.model import EstimatePolicy
from protocols.errors import ConfigError

SAMPLE = """
[feectl]
alarm1_fen = 3000
alarm2_fen = 1000
overdraft_limit_fen = 1000
estimate_policy = "defer"
zone = "Asia/Shanghai"
[feectl.windows]
allowed_hours = ["09:00", "16:00"]
weekend_days = ["sun"]
holidays = [2024-10-01]
"""


def test_defaults_are_the_reference_defaults() -> None:
    cfg = load_feectl_config("")
    assert cfg == FeeControlConfig()
    assert (cfg.alarm1_fen, cfg.alarm2_fen, cfg.overdraft_limit_fen, cfg.grace_s) == (5_000, 2_000, 0, 1_800)
    assert (cfg.command_validity_s, cfg.result_grace_s, cfg.max_attempts, cfg.retry_spacing_s) == (
        600,
        60,
        3,
        300,
    )


def test_sample_loads() -> None:
    cfg = load_feectl_config(SAMPLE)
    assert cfg.estimate_policy is EstimatePolicy.DEFER
    assert cfg.windows.allowed_from_min == 540 and cfg.windows.weekend_days == ("sun",)
    assert cfg.windows.holidays == (dt.date(2024, 10, 1),)
    assert cfg.tz.utcoffset(dt.datetime(2024, 7, 1)) == dt.timedelta(hours=8)


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        ("[feectl]\nalarm1_fen = 'x'", "feectl.alarm1_fen"),
        ("[feectl]\nalarm1_fen = 100\nalarm2_fen = 200", "feectl.alarm1_fen"),
        ("[feectl]\ngrace = 5", "feectl.grace"),
        ("[feectl]\nestimate_policy = 'maybe'", "feectl.estimate_policy"),
        ("[feectl.windows]\nweekend_days = ['caturday']", "feectl.windows.weekend_days[0]"),
        ("[feectl]\nzone = 'Mars/Olympus'", "feectl.zone"),
        ("[feectl]\ncommand_validity_s = 90000", "feectl.command_validity_s"),
        ("[feectl.windows]\nholidays = ['2024-10-01']", "feectl.windows.holidays[0]"),
        ("[feectl.windows]\nallowed_hours = ['9:00', '16:00']", "feectl.windows.allowed_hours"),
        ("[feeds]\nx = 1", "feeds"),
        ("[feectl.windows]\nallowed_hours = ['17:00', '09:00']", "feectl.windows.allowed_hours"),
        ("[feectl]\nmax_attempts = true", "feectl.max_attempts"),
    ],
)
def test_errors_name_the_key(text: str, key_path: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_feectl_config(text)
    assert err.value.key_path == key_path
