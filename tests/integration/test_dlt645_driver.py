"""Dlt645Driver against the DL/T 645 simulator over real pseudo-terminals and real TCP sockets.

Every injected fault is exercised: the driver retries what is worth retrying, returns a typed error
(or a per-quantity flag) for the rest, and the bus keeps serving the other meters.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from drivers.base import MeterRef
from drivers.bus import Bus, ResponseTimeout
from drivers.dlt645 import Dlt645Driver
from drivers.serial_transport import SerialTransport
from drivers.tcp_transport import TcpTransport
from protocols.commands import Action
from protocols.dlt645 import ErrorBits, Password
from protocols.errors import ChecksumError, FrameError, FramingError, MeterErrorReply, TransportTimeout
from protocols.flags import Flag
from protocols.quantities import by_name
from simulators.dlt645_sim import Dlt645Simulator

pytestmark = pytest.mark.integration

A1, A2, A3 = "000000000001", "000000000002", "123456789012"
START = dt.datetime(2026, 3, 2, 9, 0).timestamp()  # 09:00 local: tariff 3 (flat) in DEFAULT_TOU
ENERGY = [by_name(n) for n in ("energy_fwd_active_total", "energy_fwd_active_t3", "energy_fwd_active_t2")]
INSTANT = [by_name(n) for n in ("voltage_a", "current_a", "power_active_total", "frequency")]


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Rig:
    sim: Dlt645Simulator
    bus: Bus
    driver: Dlt645Driver
    clock: FakeClock

    def ref(self, address: str, **kw: str) -> MeterRef:
        return MeterRef(f"m{address[-2:]}", address, "dlt645-2007", **kw)


async def _rig(
    kind: str, *, meters: tuple[str, ...] = (A1, A2, A3), retries: int = 1, **sim_kw: object
) -> Rig:
    clock = FakeClock(START)
    sim = Dlt645Simulator(meters, clock=clock, load_kw=1.5, **sim_kw)  # type: ignore[arg-type]
    if kind == "pty":
        transport: SerialTransport | TcpTransport = SerialTransport(
            await sim.serve_pty(), baud=9600, parity="E"
        )
    else:
        transport = await TcpTransport.connect("127.0.0.1", await sim.serve_tcp())
    bus = Bus(transport, baud=9600 if kind == "pty" else None)
    driver = Dlt645Driver(bus, retries=retries)
    for address in (*meters, "AAAAAAAAAAAA"):
        bus.configure_device(driver.device_key(address), timeout=ResponseTimeout(0.25, 0.25, 0.25))
    return Rig(sim, bus, driver, clock)


@pytest.fixture(params=["pty", "tcp"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    r = await _rig(request.param)
    yield r
    await r.driver.aclose()
    await r.bus.aclose()
    await r.sim.aclose()


async def test_energy_accumulates_by_tariff_and_instantaneous_values_follow_power(rig: Rig) -> None:
    before = await rig.driver.read(rig.ref(A1), ENERGY)
    assert [v for _, v, _ in before.values] == [0, 0, 0]
    rig.clock.t += 3600  # 09:00 -> 10:00 at 1.5 kW: all flat (tariff 3)
    rig.clock.t += 1800  # 10:00 -> 10:30: peak (tariff 2)
    after = await rig.driver.read(rig.ref(A1), [*ENERGY, *INSTANT])
    assert [after.value(q) for q in ENERGY] == [225, 150, 75]
    assert all(after.flags(q) == 0 for q in [*ENERGY, *INSTANT])
    assert after.value(by_name("voltage_a")) == 2200 and after.value(by_name("frequency")) == 5000
    assert after.value(by_name("power_active_total")) == 15000  # 1.5000 kW
    assert after.value(by_name("current_a")) == round(500 * 1000 / (220 * 0.95))  # P/3 / (V * PF), mA
    assert after.meter_ts_ms is None  # not asked for: two transactions saved
    # the record of reads answered holds what the driver got
    rec = [r for r in rig.sim.reads if r.meter == A1 and r.di == 0x0001FF00][-1]
    assert rec.value == (225, 0, 75, 150, 0) and rec.fault is None


async def test_meter_clock_read_on_request_with_drift(rig: Rig) -> None:
    rig.sim.meter(A2).set_local_time(dt.datetime(2026, 3, 2, 8, 59, 30))
    result = await rig.driver.read(rig.ref(A2), INSTANT[:1], meter_clock=True)
    assert result.meter_ts_ms == int(dt.datetime(2026, 3, 2, 8, 59, 30, tzinfo=dt.UTC).timestamp()) * 1000
    clock_q = by_name("meter_clock")
    result = await rig.driver.read(rig.ref(A2), [clock_q])
    assert result.value(clock_q) == result.meter_ts_ms


async def test_block_read_cuts_transactions_and_falls_back_when_refused(rig: Rig) -> None:
    volts = [by_name(n) for n in ("voltage_a", "voltage_b", "voltage_c")]
    n0 = rig.sim.requests
    await rig.driver.read(rig.ref(A1), volts)
    assert rig.sim.requests - n0 == 1  # 0201FF00
    rig.sim.meter(A3).inject("error_reply", dis=[0x0201FF00], error=int(ErrorBits.NO_DATA))
    result = await rig.driver.read(rig.ref(A3), volts)
    assert [result.value(q) for q in volts] == [2200, 2200, 2200] and result.flags(volts[0]) == 0
    n0 = rig.sim.requests
    await rig.driver.read(rig.ref(A3), volts)
    assert rig.sim.requests - n0 == 3  # the refusal is remembered: item by item


RECOVERABLE = ["no_reply", "delay", "bad_checksum", "garbage_inside", "wrong_address"]


@pytest.mark.parametrize("kind", RECOVERABLE)
async def test_one_bad_answer_is_retried(rig: Rig, kind: str) -> None:
    rig.sim.meter(A2).inject(kind, times=1, delay_s=0.4)
    result = await rig.driver.read(rig.ref(A2), INSTANT)
    assert result.value(by_name("voltage_a")) == 2200 and all(f == 0 for _, _, f in result.values)
    assert rig.driver.stats["retries"] >= 1
    assert rig.sim.meter(A2).faults == []


async def test_garbage_before_a_frame_needs_no_retry(rig: Rig) -> None:
    rig.sim.meter(A1).inject("garbage_before", garbage=b"\x00\x68\x11\xaa\x68\xfe")
    result = await rig.driver.read(rig.ref(A1), INSTANT)
    assert result.value(by_name("frequency")) == 5000
    assert rig.driver.stats["retries"] == 0


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("no_reply", TransportTimeout),
        ("delay", TransportTimeout),
        ("bad_checksum", ChecksumError),
        ("garbage_inside", FrameError),
        ("wrong_address", FramingError),
    ],
)
async def test_persistent_fault_raises_typed_error_and_bus_serves_the_others(
    rig: Rig, kind: str, error: type[Exception]
) -> None:
    rig.sim.meter(A2).inject(kind, delay_s=0.6)
    with pytest.raises(error) as info:
        await rig.driver.read(rig.ref(A2), INSTANT)
    if kind == "wrong_address":
        assert "000000000003" in str(info.value)  # says who answered instead
    assert rig.driver.stats["retries"] == 1  # retries=1: two attempts, then the error
    for address in (A1, A3):
        ok = await rig.driver.read(rig.ref(address), INSTANT)
        assert ok.value(by_name("voltage_a")) == 2200
    rig.sim.meter(A2).clear_faults()
    assert (await rig.driver.read(rig.ref(A2), INSTANT)).value(by_name("frequency")) == 5000


async def test_error_reply_flags_only_its_quantity_and_is_not_retried(rig: Rig) -> None:
    rig.sim.meter(A1).inject("error_reply", dis=[0x02800002], error=int(ErrorBits.NO_DATA))
    n0 = rig.sim.requests
    result = await rig.driver.read(rig.ref(A1), INSTANT)
    assert rig.sim.requests - n0 == 4
    freq = by_name("frequency")
    assert (result.value(freq), result.flags(freq)) == (0, int(Flag.METER_ERROR))
    assert result.value(by_name("voltage_a")) == 2200 and result.flags(by_name("voltage_a")) == 0
    readings = await rig.driver.read_detailed(rig.ref(A1), [freq])
    assert isinstance(readings[0].error, MeterErrorReply) and readings[0].error.error_code == 0x02
    assert rig.driver.stats["retries"] == 0


async def test_relay_trip_stops_energy_and_close_allowed_restores_it(rig: Rig) -> None:
    meter, total = rig.ref(A3), ENERGY[0]
    await rig.driver.control(meter, Action.TRIP)
    assert await rig.driver.read_relay_state(meter) == 1
    rig.clock.t += 3600
    tripped = await rig.driver.read(meter, [total, by_name("current_a"), by_name("relay_state")])
    assert tripped.value(total) == 0 and tripped.value(by_name("current_a")) == 0
    assert tripped.value(by_name("relay_state")) == 1
    assert rig.sim.meter(A1).energy() == 150  # the other meters kept running
    await rig.driver.control(meter, Action.CLOSE_ALLOWED)
    assert await rig.driver.read_relay_state(meter) == 0
    rig.clock.t += 3600
    assert (await rig.driver.read(meter, [total])).value(total) == 150
    assert rig.sim.meter(A3).counters["relay_trip_count"] == 1
    assert rig.sim.meter(A3).counters["relay_close_count"] == 1


async def test_wrong_password_is_a_meter_error_reply_naming_the_bit(rig: Rig) -> None:
    with pytest.raises(MeterErrorReply) as info:
        await rig.driver.control(rig.ref(A1, password="02123456"), Action.TRIP)
    assert info.value.error_code & ErrorBits.UNAUTHORIZED
    assert any("password" in r for r in info.value.reasons)
    assert rig.driver.stats["retries"] == 0
    assert await rig.driver.read_relay_state(rig.ref(A1)) == 0
    rig.sim.meter(A2).password = Password(3, "123456")
    await rig.driver.control(rig.ref(A2, password="03123456", operator="1234ABCD"), Action.TRIP)
    assert await rig.driver.read_relay_state(rig.ref(A2)) == 1


async def test_multi_frame_read_uses_followups(rig: Rig) -> None:
    rig.sim.meter(A1).max_payload = 9  # 4-byte DI + 5 data bytes per frame: the 20-byte block needs 5 frames
    rig.clock.t += 3600
    n0 = rig.sim.requests
    result = await rig.driver.read(rig.ref(A1), ENERGY)
    assert [result.value(q) for q in ENERGY] == [150, 150, 0]
    assert rig.sim.requests - n0 == 5


async def test_rollover_and_meter_replacement_show_in_registers(rig: Rig) -> None:
    rig.sim.meter(A1).set_energy(99_999_990)
    rig.clock.t += 3600
    assert (await rig.driver.read(rig.ref(A1), ENERGY[:1])).value(ENERGY[0]) == 140
    rig.sim.meter(A1).replace(initial=5)
    assert (await rig.driver.read(rig.ref(A1), ENERGY[:1])).value(ENERGY[0]) == 5


async def test_set_clock_broadcast_and_write(rig: Rig) -> None:
    target = dt.datetime(2026, 3, 2, 12, 34, 56)
    epoch_ms = int(target.replace(tzinfo=dt.UTC).timestamp() * 1000)
    await rig.driver.set_clock(rig.ref(A1), epoch_ms)
    # broadcast: every meter on the line took it; verify by reading it back
    for address in (A1, A2):
        assert (await rig.driver.read(rig.ref(address), [], meter_clock=True)).meter_ts_ms == epoch_ms
    writer = Dlt645Driver(rig.bus, clock_method="write")
    await writer.set_clock(rig.ref(A3), epoch_ms + 3_600_000)
    assert (await writer.read(rig.ref(A3), [], meter_clock=True)).meter_ts_ms == epoch_ms + 3_600_000
    with pytest.raises(MeterErrorReply):
        await writer.set_clock(rig.ref(A3, password="02999999"), epoch_ms)


async def test_relay_deadline_in_the_past_is_refused(rig: Rig) -> None:
    late = Dlt645Driver(rig.bus, local_now=lambda: dt.datetime(2026, 3, 1, 9, 0))  # a day behind
    with pytest.raises(MeterErrorReply) as info:
        await late.control(rig.ref(A1), Action.TRIP)
    assert info.value.error_code == ErrorBits.OTHER


@pytest.mark.parametrize("kind", ["pty", "tcp"])
async def test_read_address_of_a_lone_meter_and_collision(kind: str) -> None:
    lone = await _rig(kind, meters=(A3,), retries=0)
    try:
        assert await lone.driver.read_address() == A3
        lone.sim.add_meter(A1)
        with pytest.raises((FrameError, TransportTimeout)):
            await lone.driver.read_address()
    finally:
        await lone.bus.aclose()
        await lone.sim.aclose()


@pytest.mark.parametrize("kind", ["pty", "tcp"])
async def test_1997_meter_read(kind: str) -> None:
    r = await _rig(kind, meters=("000000001997",), edition=1997)
    try:
        r.clock.t += 7200
        meter = MeterRef("old", "000000001997", "dlt645-1997")
        qs = [by_name(n) for n in ("energy_fwd_active_total", "voltage_a", "current_a", "power_active_total")]
        result = await r.driver.read(meter, qs, meter_clock=True)
        # 1997 formats: whole volts, XX.XX A, rescaled to the quantities' decimals
        assert [result.value(q) for q in qs] == [300, 2200, 2390, 15000]
        assert result.meter_ts_ms is not None
        with pytest.raises(NotImplementedError):
            await r.driver.control(meter, Action.TRIP)
    finally:
        await r.bus.aclose()
        await r.sim.aclose()


async def test_paced_line_takes_at_least_the_wire_time() -> None:
    r = await _rig("pty", meters=(A1,), pace=True, baud=9600, turnaround_s=0.02)
    try:
        r.driver.preamble = 4
        started = time.perf_counter()
        await r.driver.read(r.ref(A1), INSTANT)
        elapsed = time.perf_counter() - started
        wire = (4 * 20 + 18 + 19 + 19 + 18) * 11 / 9600 + 4 * 0.02  # requests + replies + turnarounds
        assert wire <= elapsed < wire * 2 + 0.2
    finally:
        await r.bus.aclose()
        await r.sim.aclose()
