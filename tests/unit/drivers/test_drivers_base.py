"""MeterRef validation by the protocol's driver, ReadResult access, the lazy registry, the
relay-action code maps, and the kinds of line."""

from __future__ import annotations

import pytest

from drivers.base import DRIVERS, Capability, MeterDriver, MeterRef, ReadResult, load_driver
from drivers.lines import TransportKind, parse_port
from protocols.commands import RELAY_ACTIONS, Action
from protocols.dlt645 import RELAY_CODES, RelayCode
from protocols.errors import ConfigError
from protocols.quantities import by_name


def test_meter_ref_validation_is_the_drivers() -> None:
    assert MeterRef("m1", "7", "modbus", "sdm630").address == "7"
    with pytest.raises(ConfigError) as info:
        MeterRef("m2", "300", "modbus", "sdm630")
    assert info.value.key_path == "meters[m2].address" and "1..247" in info.value.reason
    with pytest.raises(ConfigError) as info:
        MeterRef("m3", "1", "modbus")
    assert info.value.key_path == "meters[m3].model"
    with pytest.raises(ConfigError) as info:
        MeterRef("m4", "1", "iec62056")
    assert info.value.key_path == "meters[m4].protocol"
    with pytest.raises(ConfigError) as info:
        MeterRef("m5", "12345", "dlt645-2007")
    assert info.value.key_path == "meters[m5].address" and "12 digits" in info.value.reason


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
    with pytest.raises(ConfigError, match="'bacnet' not one of dlt645-2007"):
        load_driver("bacnet")


def test_drivers_declare_transports_and_capabilities() -> None:
    dlt, modbus = load_driver("dlt645-2007"), load_driver("modbus")
    assert TransportKind.MODBUS_TCP not in dlt.transports and TransportKind.MODBUS_TCP in modbus.transports
    assert dlt.capabilities("dlt645-2007") == frozenset(Capability)
    assert Capability.RELAY not in dlt.capabilities("dlt645-1997")
    assert modbus.capabilities("modbus") == frozenset()


def test_every_relay_action_has_one_dlt645_code() -> None:
    assert set(RELAY_CODES) == RELAY_ACTIONS
    assert RELAY_CODES[Action.TRIP] is RelayCode.TRIP and len(set(RELAY_CODES.values())) == len(RELAY_CODES)


@pytest.mark.parametrize(
    ("port", "kind"),
    [
        ("/dev/ttyS1", TransportKind.SERIAL),
        ("tcp://10.0.0.7:8899", TransportKind.SERIAL_SERVER),
        ("modbus-tcp://10.0.0.9:502", TransportKind.MODBUS_TCP),
    ],
)
def test_ports_tell_their_kind(port: str, kind: TransportKind) -> None:
    assert parse_port(port).kind is kind


@pytest.mark.parametrize("port", ["tcp://host", "udp://h:1", "modbus-tcp://:502"])
def test_network_ports_need_host_and_port(port: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_port(port)
