"""Registry loading (ConfigError naming the key), tariff calendar checks, wrapper column checks."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.model.registry import MeterRegistry
from ingest.model.tariff import TariffCalendar
from ingest.rules import stages
from protocols.errors import ConfigError

GOOD = """
[meters."M1"]
voltage_v = 220
imax_a = 60
phases = 1
area = "TA-1"
tariff = "res"
account = "AC1"
[meters."M2"]
voltage_v = 57.7
imax_a = 1.5
ib_a = 0.3
phases = 3
multiplier = 40
area = "TA-1"
master = true
"""


def test_registry_loads_arrays_and_reloads(tmp_path) -> None:
    path = tmp_path / "meters.toml"
    path.write_text(GOOD)
    reg = MeterRegistry.load(path)
    assert reg.un_dv.tolist() == [2200, 577] and reg.imax_ma.tolist() == [60_000, 1_500]
    assert reg.ib_ma.tolist() == [5_000, 300] and reg.multiplier.tolist() == [1, 40]
    assert reg.master.tolist() == [False, True] and reg.area_sizes().tolist() == [1]
    p = reg.params(["M2", "nope"])
    assert (
        p.known.tolist() == [True, False] and p.area.tolist() == [0, -1] and p.multiplier.tolist() == [40, 1]
    )
    path.write_text(GOOD.replace("phases = 3", "phases = 2"))
    with pytest.raises(ConfigError) as exc:
        reg.reload()
    assert exc.value.key_path == 'meters."M2".phases'
    assert reg.phases.tolist() == [1, 3]  # the old registry stays in force


def test_registry_params_are_cached_per_meter_table_until_a_reload(tmp_path) -> None:
    path = tmp_path / "meters.toml"
    path.write_text(GOOD)
    reg = MeterRegistry.load(path)
    first = reg.params(("M1", "M2"))
    assert reg.params(["M1", "M2"]) is first  # an equal table, as the next batch decodes it
    assert reg.params(("M2", "M1")) is not first and reg.params(("M2", "M1")).multiplier.tolist() == [40, 1]
    with pytest.raises(ValueError):
        first.multiplier[0] = 7  # shared between batches: read-only
    path.write_text(GOOD.replace("multiplier = 40", "multiplier = 80"))
    reg.reload()
    assert reg.params(("M1", "M2")).multiplier.tolist() == [1, 80]  # not the stale cached answer


def test_registry_register_digits_set_the_energy_rollover_point(tmp_path) -> None:
    path = tmp_path / "meters.toml"
    path.write_text(
        GOOD.replace('phases = 1\narea = "TA-1"', 'phases = 1\nregister_digits = 5\narea = "TA-1"')
    )
    reg = MeterRegistry.load(path)
    assert reg.params(("M1", "M2", "?")).energy_regmax.tolist() == [9_999_999, 0, 0]  # 99 999.99 kWh


def test_registry_area_types_and_a_bad_one_keeps_the_old_registry(tmp_path) -> None:
    path = tmp_path / "meters.toml"
    path.write_text(GOOD)
    reg = MeterRegistry.load(path)
    assert reg.areas == ("TA-1",) and reg.area_types == (None,)
    path.write_text(GOOD.replace('[meters."M1"]', '[areas."TA-1"]\ntype = "rural"\n[meters."M1"]'))
    reg.reload()
    assert reg.area_types == ("rural",)
    path.write_text(GOOD.replace("multiplier = 40", "multiplier = 80") + '[areas."TA-2"]\ntype = "urban"\n')
    with pytest.raises(ConfigError) as exc:
        reg.reload()
    assert exc.value.key_path == 'areas."TA-2"' and "no meter" in str(exc.value)
    assert reg.area_types == ("rural",) and reg.multiplier.tolist() == [1, 40]  # nothing half-replaced


def test_registry_binds_meters_to_gateways(tmp_path) -> None:
    path = tmp_path / "meters.toml"
    path.write_text(GOOD.replace('account = "AC1"', 'account = "AC1"\ngateway = "gw-1"'))
    reg = MeterRegistry.load(path)
    table = ("M1", "M2", "unknown")
    p = reg.params(table)
    assert reg.gateways == ("gw-1",) and p.gateway.tolist() == [0, -1, -1]
    # bound elsewhere = foreign; unbound (M2) and unknown meters are accepted from any gateway
    assert reg.foreign(p, "gw-1").tolist() == [False, False, False]
    assert reg.foreign(p, "gw-2").tolist() == [True, False, False]
    assert reg.bound_gateway("M1") == "gw-1" and reg.bound_gateway("M2") is None
    assert reg.bound_gateway("unknown") is None


@pytest.mark.parametrize(
    ("gateway", "why"), [("agg", "reserved topic level"), ("a/b", "expected letters"), ("", "non-empty")]
)
def test_registry_refuses_gateway_ids_that_are_no_topic_level(tmp_path, gateway, why) -> None:
    path = tmp_path / "m.toml"
    path.write_text(f'[meters."X"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\ngateway = "{gateway}"\n')
    with pytest.raises(ConfigError, match=why) as exc:
        MeterRegistry.load(path)
    assert exc.value.key_path == 'meters."X".gateway'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[areas."TA-1"]\ntype = 3\n' + GOOD, 'areas."TA-1".type'),
        ('[areas."TA-1"]\ntype = "x"\nhigh_pct = 3\n' + GOOD, 'areas."TA-1".high_pct'),
        ("areas = 1\n" + GOOD, "areas"),
        ('[meters."X"]\nvoltage_v = 220\nphases = 1', 'meters."X".imax_a'),
        ('[meters."X"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\ncolour = 1', 'meters."X".colour'),
        ('[meters."X"]\nvoltage_v = "high"\nimax_a = 60\nphases = 1', 'meters."X".voltage_v'),
        ('[meters."X"]\nvoltage_v = 220\nimax_a = 0.0001\nphases = 1', 'meters."X".imax_a'),
        ('[meters."X"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\nmaster = true', 'meters."X".area'),
        ("[other]\n", "other"),
        (
            '[meters."X"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\nregister_digits = 9',
            'meters."X".register_digits',
        ),
        (
            '[meters."X"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\nmultiplier = 1000000000000000',
            'meters."X".multiplier',
        ),
    ],
)
def test_registry_errors_name_the_key(tmp_path, text, key) -> None:
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        MeterRegistry.load(path)
    assert exc.value.key_path == key


def test_calendar_rejects_gaps_and_overlaps() -> None:
    base = {"seasons": {"all": {"months": list(range(1, 13)), "workday": "d"}}}
    with pytest.raises(ConfigError, match="do not cover 08:00"):
        TariffCalendar.from_dict({**base, "profiles": {"d": {"segments": [["00:00", "08:00", "valley"]]}}})
    with pytest.raises(ConfigError, match="overlaps"):
        TariffCalendar.from_dict(
            {
                **base,
                "profiles": {"d": {"segments": [["00:00", "24:00", "flat"], ["01:00", "02:00", "peak"]]}},
            }
        )
    with pytest.raises(ConfigError) as exc:
        TariffCalendar.from_dict(
            {
                "seasons": {"s": {"months": [1], "workday": "d"}},
                "profiles": {"d": {"segments": [["00:00", "24:00", "flat"]]}},
            }
        )
    assert exc.value.key_path == "tariff_calendar.seasons"


def test_wrapper_names_the_bad_column() -> None:
    with pytest.raises(TypeError, match="column 'value': expected dtype int64, got float64"):
        stages.Readings(
            np.zeros(1, np.uint32),
            np.zeros(1, np.int64),
            np.zeros(1, np.uint16),
            np.zeros(1, np.float64),
            np.zeros(1, np.uint32),
        )
    with pytest.raises(ValueError, match="column 'flags': expected length 1"):
        stages.Readings(
            np.zeros(1, np.uint32),
            np.zeros(1, np.int64),
            np.zeros(1, np.uint16),
            np.zeros(1, np.int64),
            np.zeros(2, np.uint32),
        )
    one = stages.Readings(*(np.zeros(1, t) for t in (np.uint32, np.int64, np.uint16, np.int64, np.uint32)))
    with pytest.raises(ValueError, match="order: 2 positions for 1 readings"):
        stages.encode_lines(one, stages.LineTables.build(["m"], "g"), order=np.zeros(2, np.int64))


T = 1_700_000_100_000 // 900_000 * 900_000


def test_read_only_frombuffer_columns_work_and_stay_unchanged() -> None:
    raw = {
        name: np.frombuffer(np.array(v, dt).tobytes(), dtype=dt)
        for name, v, dt in (
            ("meter", [0, 0], np.uint32),
            ("ts", [T + 900_000, T + 1_800_000], np.int64),
            ("quantity", [1, 1], np.uint16),
            ("value", [100, 90], np.int64),
            ("flags", [0, 0], np.uint32),
        )
    }
    r = stages.Readings(**raw)
    reg = stages.validate_batch(
        r, stages.PreviousRegisters.empty(), MeterRegistryStub.params(), receive_ts_ms=T + 10**7
    )
    assert reg.flags.tolist() == [0, 2] and r.value.tolist() == [100, 90] and not r.value.flags.writeable


class MeterRegistryStub:
    @staticmethod
    def params():
        from tests.unit.ingest.test_rules import meters

        return meters()
