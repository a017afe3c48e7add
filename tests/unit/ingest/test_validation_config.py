"""``[validation]`` of the ingest config: every threshold reaches ``ValidationParams`` in the
kernel's units, errors name the key, and a configured threshold changes what the kernel flags."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ingest.config import SAMPLE, parse_config
from ingest.model.registry import MeterParams
from ingest.pipeline.transform import Settings, transform
from ingest.rules import stages
from protocols.errors import ConfigError
from protocols.flags import Flag
from protocols.payload import BatchBuilder

T0 = 1_700_000_000_000 // 900_000 * 900_000


def test_sample_defaults_are_the_rules_defaults() -> None:
    assert parse_config(SAMPLE).validation.params() == stages.ValidationParams()


def test_every_key_reaches_the_params_in_kernel_units() -> None:
    text = """
[validation]
clock_skew_tol_s = 60
meter_clock_utc_offset_min = -300
rollover_band_pct = 95
replaced_below_kwh = 5.5
replaced_drop_kwh = 20
register_decrease_min_kwh = 0.1
spike_margin_pct = 20
zero_power_min_kw = 0.25
voltage_invalid_pct = 130
phase_break_pct = 50
voltage_loss_pct = 80
voltage_loss_current_pct_ib = 1.5
pf_floor = 0.25
spike_rel_pct = 200
spike_rel_floor_kwh = 0.2
fast_running_ratio = 7.5
fast_running_min_kwh = 0.05
stopped_intervals = 8
zero_long_intervals = 96
stuck_readings = 12
flat_gap_max_intervals = 0
prolonged_est_days = 7
"""
    p = parse_config(text).validation.params()
    assert p == dataclasses.replace(
        stages.ValidationParams(),
        skew_tol_ms=60_000, meter_clock_utc_offset_ms=-300 * 60_000, rollover_band_pct=95,
        replaced_below=550, replaced_drop=2_000, decrease_min=10, spike_margin_pct=20,
        zero_power_min_w=250, voltage_invalid_pct=130, phase_break_pct=50, voltage_loss_pct=80,
        voltage_loss_current_permille=15, pf_floor=250, spike_rel_pct=200, spike_rel_floor=20,
        fast_ratio_x10=75, fast_min=5, stopped_intervals=8, zero_long_intervals=96, stuck_readings=12,
        flat_gap_max_intervals=0, prolonged_est_ms=7 * 86_400_000,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("register_decrease_min_kwh = 0.001", "validation.register_decrease_min_kwh"),
        ("rollover_band_pct = 0", "validation.rollover_band_pct"),
        ("meter_clock_utc_offset_min = 900", "validation.meter_clock_utc_offset_min"),
        ("pf_floor = 1.5", "validation.pf_floor"),
        ("pf_floor = 'low'", "validation.pf_floor"),
        ("stuck = 3", "validation.stuck"),
        ("fast_running_ratio = 10.25", "validation.fast_running_ratio"),
        ("stopped_intervals = 0", "validation.stopped_intervals"),
        ("prolonged_est_days = -1", "validation.prolonged_est_days"),
    ],
)
def test_bad_values_name_the_key(line: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(f"[validation]\n{line}\n")


def test_pipeline_values_the_kernel_cannot_take_are_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"pipeline\.future_tol_s"):
        parse_config("[pipeline]\nfuture_tol_s = 100000000000\n")
    assert parse_config("[pipeline]\ninterval_s = 1\n").validation_params().interval_ms == 1000


def _clock_batch(offset_ms: int) -> tuple[stages.Readings, MeterParams]:
    """A meter whose clock reads the read time in UTC-5 local time, and its energy register."""
    r = stages.Readings(
        np.array([0, 0], np.uint32),
        np.array([T0, T0], np.int64),
        np.array([1, 101], np.uint16),
        np.array([100, T0 + offset_ms], np.int64),
        np.zeros(2, np.uint32),
    )
    one = np.ones(1, np.int64)
    m = MeterParams(np.ones(1, np.bool_), one * 2200, one * 60_000, one * 5_000, one, one,
                    np.full(1, -1, np.int32), np.zeros(1, np.bool_))  # fmt: skip
    return r, m


def test_meter_clock_offset_is_configured_not_fixed() -> None:
    r, m = _clock_batch(-5 * 3_600_000)
    prev = stages.PreviousRegisters.empty()
    default = Settings.from_config(parse_config("")).validation
    utc5 = Settings.from_config(parse_config("[validation]\nmeter_clock_utc_offset_min = -300\n")).validation
    assert stages.validate_batch(r, prev, m, T0, default).flags[0] & Flag.CLOCK_SKEW
    assert not stages.validate_batch(r, prev, m, T0, utc5).flags[0] & Flag.CLOCK_SKEW


def test_the_pipeline_validates_with_the_configured_thresholds() -> None:
    """[validation] reaches transform: a meter clock in UTC-5 is skewed under the default
    offset and fine under the configured one."""
    b = BatchBuilder()
    b.add("M1", T0, 1, 100)
    b.add("M1", T0, 101, T0 - 5 * 3_600_000)
    batch = b.build("G1", 1, sent_ms=T0)
    default = Settings.from_config(parse_config(""))
    utc5 = Settings.from_config(parse_config("[validation]\nmeter_clock_utc_offset_min = -300\n"))
    assert all(f & Flag.CLOCK_SKEW for f in transform(batch, default).flags.tolist())
    assert not any(f & Flag.CLOCK_SKEW for f in transform(batch, utc5).flags.tolist())
