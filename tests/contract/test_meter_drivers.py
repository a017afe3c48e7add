"""One contract, every registered meter driver: each name in :data:`drivers.base.DRIVERS` is
opened the way the edge agent opens it (``load_driver(name).open(DriverSetup(...))``) against its
simulator over a real TCP socket, and must

* read every quantity it declares (:meth:`MeterDriver.quantities`), in the order asked: those its
  simulator models unflagged, the others (:data:`NOT_SIMULATED`: the simulator refuses them) as
  ``Flag.METER_ERROR`` with value 0, the rest of the read going on;
* do the relay actions and clock read/set when it declares the capability, and raise
  ``NotImplementedError`` for each capability it does not declare;
* raise ``TransportTimeout`` for a meter that does not answer.

A new driver is tested by registering it and adding its simulator to :data:`RIGS`
(``test_every_registered_driver_has_a_rig`` fails until then).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from drivers.base import DRIVERS, Capability, DriverSetup, MeterDriver, MeterRef, load_driver
from drivers.bus import Bus, ResponseTimeout
from drivers.lines import TransportKind, open_transport, parse_port
from protocols.commands import Action
from protocols.errors import TransportTimeout
from simulators.dlt645_sim import Dlt645Simulator
from simulators.modbus_sim import ModbusSimulator

pytestmark = pytest.mark.integration

A1 = "000000000001"
START = dt.datetime(2026, 3, 2, 9, 0).timestamp()


@dataclass
class Rig:
    driver: MeterDriver
    meter: MeterRef


async def _open(protocol: str, port: str, *, retries: int = 0) -> tuple[MeterDriver, Bus | None]:
    cls, line = load_driver(protocol), parse_port(port)
    bus = None
    if line.kind.shared:
        timeout = ResponseTimeout(0.3, 0.3, 0.3)
        bus = Bus(await open_transport(line, baud=9600), name=port, timeout=timeout)
    driver = cls.open(DriverSetup(line, bus, retries=retries, timeout_s=0.3))
    await driver.connect()
    return driver, bus


@contextlib.asynccontextmanager
async def _dlt645(protocol: str, edition: int) -> AsyncIterator[Rig]:
    sim = Dlt645Simulator([A1], clock=lambda: START, edition=edition)
    port = await sim.serve_tcp()
    driver, bus = await _open(protocol, f"tcp://127.0.0.1:{port}", retries=1)
    try:
        yield Rig(driver, MeterRef("m1", A1, protocol))
    finally:
        await driver.aclose()
        assert bus is not None
        await bus.aclose()
        await sim.aclose()


@contextlib.asynccontextmanager
async def _modbus(protocol: str) -> AsyncIterator[Rig]:
    async with ModbusSimulator("sdm630", unit=1) as sim:
        driver, _ = await _open(protocol, f"modbus-tcp://127.0.0.1:{sim.port}", retries=1)
        try:
            yield Rig(driver, MeterRef("m1", "1", protocol, "sdm630"))
        finally:
            await driver.aclose()


#: protocol name -> its simulator rig, and an address of a meter that is not on that line.
RIGS: dict[str, tuple[Callable[[str], contextlib.AbstractAsyncContextManager[Rig]], str]] = {
    "dlt645-2007": (lambda p: _dlt645(p, 2007), "000000000009"),
    "dlt645-1997": (lambda p: _dlt645(p, 1997), "000000000009"),
    "modbus": (_modbus, "9"),
}
PROTOCOLS = sorted(DRIVERS)
#: Quantities a driver declares that its simulator does not model (it answers with an error).
NOT_SIMULATED: dict[str, set[str]] = {
    "dlt645-2007": {
        "energy_combined_reactive1_total", "energy_combined_reactive2_total",
        "energy_reactive_q1_total", "energy_reactive_q2_total", "energy_reactive_q3_total",
        "energy_reactive_q4_total", "energy_fwd_apparent_total", "energy_fwd_active_a",
        "energy_fwd_active_b", "energy_fwd_active_c", "max_demand_fwd_active",
        "max_demand_rev_active", "current_n", "overdraft_amount",
    },
}  # fmt: skip


def test_every_registered_driver_has_a_rig() -> None:
    assert set(RIGS) == set(DRIVERS)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_every_declared_quantity_reads(protocol: str) -> None:
    async with RIGS[protocol][0](protocol) as rig:
        quantities = type(rig.driver).quantities(rig.meter)
        assert quantities
        result = await rig.driver.read(rig.meter, quantities)
    assert [code for code, _, _ in result.values] == [q.code for q in quantities]
    refused = {q.name for q in quantities if result.flags(q)}
    assert refused == NOT_SIMULATED.get(protocol, set())
    assert all(result.value(q) == 0 for q in quantities if q.name in refused)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_relay_control_where_declared(protocol: str) -> None:
    async with RIGS[protocol][0](protocol) as rig:
        driver, meter = rig.driver, rig.meter
        if Capability.RELAY not in driver.capabilities(protocol):
            with pytest.raises(NotImplementedError):
                await driver.control(meter, Action.TRIP)
            with pytest.raises(NotImplementedError):
                await driver.read_relay_state(meter)
            return
        await driver.control(meter, Action.TRIP)
        assert await driver.read_relay_state(meter) == 1
        await driver.control(meter, Action.DIRECT_CLOSE)
        assert await driver.read_relay_state(meter) == 0
        for action in (Action.ALARM, Action.ALARM_RELEASE):
            await driver.control(meter, action)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_clock_read_and_set_where_declared(protocol: str) -> None:
    async with RIGS[protocol][0](protocol) as rig:
        driver, meter = rig.driver, rig.meter
        caps = driver.capabilities(protocol)
        if Capability.CLOCK_READ not in caps:
            with pytest.raises(NotImplementedError):
                await driver.read_clock(meter)
        else:
            local = dt.datetime.fromtimestamp(START).replace(tzinfo=dt.UTC)
            assert await driver.read_clock(meter) == int(local.timestamp()) * 1000
        if Capability.CLOCK_SET not in caps:
            with pytest.raises(NotImplementedError):
                await driver.set_clock(meter, 0)
        else:
            target = int(dt.datetime(2026, 3, 2, 12, 34, 56, tzinfo=dt.UTC).timestamp() * 1000)
            await driver.set_clock(meter, target, broadcast=True)
            if Capability.CLOCK_READ in caps:
                assert await driver.read_clock(meter) == target


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_read_address_where_declared(protocol: str) -> None:
    async with RIGS[protocol][0](protocol) as rig:
        if Capability.READ_ADDRESS in rig.driver.capabilities(protocol):
            assert await rig.driver.read_address(rig.meter) == rig.meter.address
        else:
            with pytest.raises(NotImplementedError):
                await rig.driver.read_address(rig.meter)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_meter_that_does_not_answer_times_out(protocol: str) -> None:
    factory, absent = RIGS[protocol]
    async with factory(protocol) as rig:
        cls = type(rig.driver)
        meter = MeterRef("gone", absent, protocol, rig.meter.model)
        quantity = cls.quantities(meter)[0]
        if TransportKind.MODBUS_TCP in cls.transports and rig.driver.bus is None:
            meter = rig.meter  # a Modbus TCP server answers for every unit: make the line silent
            await _silent_line_read(protocol, meter, quantity)
            return
        with pytest.raises(TransportTimeout):
            await rig.driver.read(meter, [quantity])


async def _silent_line_read(protocol: str, meter: MeterRef, quantity: Any) -> None:
    """Read over a server that accepts the connection and never answers."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        driver, bus = await _open(protocol, f"tcp://127.0.0.1:{port}")
        try:
            with pytest.raises(TransportTimeout):
                await driver.read(meter, [quantity])
        finally:
            await driver.aclose()
            if bus is not None:
                await bus.aclose()
    finally:
        server.close()
