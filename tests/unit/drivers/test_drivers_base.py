"""MeterRef validation, ReadResult access, the lazy registry."""

from __future__ import annotations

import pytest

from drivers.base import DRIVERS, MeterDriver, MeterRef, ReadResult, RelayAction, load_driver
from protocols.errors import ConfigError
from protocols.quantities import by_name


def test_meter_ref_validation() -> None:
    m = MeterRef("m1", "7", "modbus", "sdm630")
    assert m.unit_id == 7
    with pytest.raises(ConfigError) as info:
        MeterRef("m2", "300", "modbus", "sdm630")
    assert info.value.key_path == "meters[m2].address"
    with pytest.raises(ConfigError) as info:
        MeterRef("m3", "1", "modbus")
    assert info.value.key_path == "meters[m3].model"
    with pytest.raises(ConfigError) as info:
        MeterRef("m4", "1", "iec62056")
    assert info.value.key_path == "meters[m4].protocol"
    with pytest.raises(ValueError):
        _ = MeterRef("m5", "000000123456", "dlt645-2007").unit_id


def test_read_result_rows() -> None:
    v = by_name("voltage_a")
    r = ReadResult("m1", 1_700_000_000_000, ((v.code, 2301, 0), (56, 0, 512)))
    assert r.value(v) == 2301 and r.flags(56) == 512
    with pytest.raises(KeyError):
        r.value(by_name("frequency").code + 1000)


def test_registry_is_lazy_and_complete() -> None:
    assert set(DRIVERS) == {"dlt645-2007", "dlt645-1997", "modbus"}
    cls = load_driver("modbus")
    assert issubclass(cls, MeterDriver) and cls.protocol == "modbus"
    with pytest.raises(ConfigError, match="unknown driver"):
        load_driver("bacnet")


def test_relay_actions_are_protocol_neutral() -> None:
    assert [a.value for a in RelayAction] == [
        "trip",
        "close_allowed",
        "direct_close",
        "alarm",
        "alarm_release",
        "protect",
        "protect_release",
    ]
