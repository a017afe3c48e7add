"""ModbusDriver against the simulator: pymodbus' TCP server on loopback, and RTU on a pty bus."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from drivers.base import MeterRef
from drivers.bus import Bus, ResponseTimeout
from drivers.modbus import ModbusDriver
from drivers.serial_transport import SerialTransport
from protocols.commands import Action
from protocols.errors import ConfigError, TransportTimeout
from protocols.flags import Flag
from protocols.modbus.maps import available_models, load_map, parse_map
from protocols.quantities import by_name
from simulators.modbus_sim import ModbusSimulator

pytestmark = pytest.mark.integration

MODELS = ["sdm630", "sdm120", "dtsu666", "ddsu666"]


def test_every_packaged_map_is_tested() -> None:
    assert set(MODELS) == set(available_models())


@pytest.mark.parametrize("model", MODELS)
async def test_every_quantity_reads_back_exactly(model: str) -> None:
    regmap = load_map(model)
    async with ModbusSimulator(model, unit=11) as sim:
        # distinct, signed where allowed, non-trivial values per quantity
        for i, q in enumerate(regmap.quantities):
            value = (1000 + 37 * i) * (-1 if q.signed and i % 2 else 1)
            sim.set_value(q.name, value)
        async with ModbusDriver.tcp("127.0.0.1", sim.port, timeout_s=0.5) as driver:
            meter = MeterRef("m", "11", "modbus", model)
            result = await driver.read(meter, regmap.quantities)
    assert [code for code, _, _ in result.values] == [q.code for q in regmap.quantities]
    for q in regmap.quantities:
        assert (result.value(q), result.flags(q)) == (sim.values[q.name], 0), q.name


async def test_faults_flag_or_raise_while_other_meters_keep_working() -> None:
    qs = [by_name(n) for n in ("voltage_a", "frequency", "energy_fwd_active_total")]
    async with ModbusSimulator("sdm630", 1) as bad, ModbusSimulator("sdm120", 2) as good:
        d_bad = ModbusDriver.tcp("127.0.0.1", bad.port, timeout_s=0.2, retries=0)
        d_good = ModbusDriver.tcp("127.0.0.1", good.port, timeout_s=0.5)
        m_bad, m_good = MeterRef("bad", "1", "modbus", "sdm630"), MeterRef("good", "2", "modbus", "sdm120")
        async with d_bad, d_good:
            bad.set_fault("exception", code=2, quantity="frequency")
            r = await d_bad.read(m_bad, qs)
            assert r.flags(by_name("frequency")) == Flag.METER_ERROR and r.value(by_name("frequency")) == 0
            assert (
                r.value(by_name("voltage_a")) == bad.values["voltage_a"]
                and r.flags(by_name("voltage_a")) == 0
            )

            bad.set_fault("exception", code=4)
            r = await d_bad.read(m_bad, qs)
            assert all(flags == Flag.METER_ERROR for _, _, flags in r.values)

            bad.set_fault("no_reply")
            both = await asyncio.gather(
                d_bad.read(m_bad, qs), d_good.read(m_good, qs), return_exceptions=True
            )
            assert isinstance(both[0], TransportTimeout)
            assert not isinstance(both[1], BaseException) and both[1].value(qs[0]) == good.values["voltage_a"]

            bad.set_fault("wrong_values")
            r = await d_bad.read(m_bad, qs)
            assert r.value(qs[0]) == 10 * bad.values["voltage_a"]

            bad.clear_fault()
            r = await d_bad.read(m_bad, qs)
            assert r.value(qs[1]) == bad.values["frequency"] and r.flags(qs[1]) == 0


async def test_unmapped_quantity_and_unsupported_operations() -> None:
    async with ModbusSimulator("sdm120", 1) as sim, ModbusDriver.tcp("127.0.0.1", sim.port) as driver:
        meter = MeterRef("m", "1", "modbus", "sdm120")
        with pytest.raises(ConfigError) as info:
            await driver.read(meter, [by_name("voltage_b")])
        assert info.value.key_path == "meters[m].quantities"
        for unsupported in (driver.read_address(meter), driver.control(meter, Action.TRIP)):
            with pytest.raises(NotImplementedError):
                await unsupported


async def test_custom_map_int32_cdab_and_int16_end_to_end() -> None:
    """Word order and integer scaling through the whole stack, with a map other than float32/ABCD."""
    doc: dict[str, Any] = {
        "model": "custom",
        "function": 3,
        "type": "int32",
        "word_order": "CDAB",
        "register": [
            {"quantity": "power_active_total", "address": 100, "scale": "0.001"},  # W, int32 CDAB
            {
                "quantity": "energy_fwd_active_total",
                "address": 102,
                "type": "uint32",
                "word_order": "DCBA",
                "scale": "0.01",
            },
            {"quantity": "voltage_a", "address": 104, "type": "uint16", "word_order": "BADC", "scale": "0.1"},
            {"quantity": "current_a", "address": 105, "type": "int16", "scale": "0.01"},
        ],
    }
    regmap = parse_map(copy.deepcopy(doc), "custom")
    async with ModbusSimulator(register_map=regmap, unit=3) as sim:
        sim.set_value("power_active_total", -123450)  # -12.345 kW = -12345 W
        sim.set_value("energy_fwd_active_total", 98765432)
        sim.set_value("voltage_a", 2301)
        sim.set_value("current_a", -12340)  # -12.34 A = -1234 x 0.01 A
        words = sim.registers(3)
        assert (words[100], words[101]) == (0xCFC7, 0xFFFF)  # -12345 = 0xFFFFCFC7, low word first
        async with ModbusDriver.tcp("127.0.0.1", sim.port, maps={"custom": regmap}) as driver:
            result = await driver.read(MeterRef("c", "3", "modbus", "custom"), regmap.quantities)
    assert {c: v for c, v, _ in result.values} == {by_name(n).code: sim.values[n] for n in sim.values}


async def test_rtu_over_pty_on_a_shared_bus() -> None:
    async with ModbusSimulator("ddsu666", unit=4) as sim:
        path = await sim.serve_rtu_pty()
        sim.set_value("voltage_a", 2299)
        async with Bus(SerialTransport(path, baud=9600), baud=9600) as bus:
            bus.configure_device(("modbus", 4), timeout=ResponseTimeout(initial_s=0.5, min_s=0.05, max_s=1.0))
            driver = ModbusDriver.rtu(bus, retries=0)
            meter = MeterRef("r", "4", "modbus", "ddsu666")
            qs = load_map("ddsu666").quantities
            results = await asyncio.gather(*(driver.read(meter, qs) for _ in range(3)))
            for r in results:
                assert [v for _, v, _ in r.values] == [sim.values[q.name] for q in qs]
            assert 0.05 <= bus.response_timeout_s(("modbus", 4)) < 0.5  # adapted down from 0.5 s
            sim.set_fault("exception", code=2, quantity="frequency")
            r = await driver.read(meter, qs)
            assert r.flags(by_name("frequency")) == Flag.METER_ERROR
            sim.set_fault("no_reply")
            with pytest.raises(TransportTimeout):
                await driver.read(meter, qs[:1])
            await driver.aclose()
