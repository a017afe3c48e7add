"""Benchmark: one poll cycle of 32 DL/T 645 meters x 4 quantities on a baud-paced 2400-baud pty bus.

Run: .venv/bin/python -m pytest tests/bench/test_bench_poll_cycle.py -s -o addopts=""

The baseline is the cycle's wire-time lower bound, computed in the same run from the same frames:
every request (with its 4 FE wake-up bytes) and every reply at 11 bits per character (8E1) at 2400
baud, plus the simulator's configured turnaround (Td) per request. The simulator only accepts a
request once its bytes would have arrived, and emits replies no faster than the baud rate, so the
ratio measures what the driver, the bus (guard times, locking) and asyncio add on top.
"""

from __future__ import annotations

import time

from drivers.base import MeterRef
from drivers.bus import Bus
from drivers.dlt645 import Dlt645Driver
from drivers.serial_transport import SerialTransport
from protocols.dlt645 import di_for_quantity, read_request
from protocols.quantities import by_name
from simulators.dlt645_sim import Dlt645Simulator

BAUD, METERS, TURNAROUND_S, PREAMBLE = 2400, 32, 0.020, 4
QUANTITIES = [by_name(n) for n in ("energy_fwd_active_total", "voltage_a", "current_a", "power_active_total")]


def _lower_bound_s(addresses: list[str]) -> tuple[float, int]:
    wire_bytes, transactions = 0, 0
    for address in addresses:
        for q in QUANTITIES:
            info = di_for_quantity(q.name)
            wire_bytes += PREAMBLE + len(read_request(address, info.di))  # request
            wire_bytes += 12 + 4 + info.length  # reply: header, DI echo, value (no FE from the simulator)
            transactions += 1
    return wire_bytes * 11 / BAUD + transactions * TURNAROUND_S, transactions


async def test_bench_poll_cycle_against_wire_time() -> None:
    addresses = [f"{i:012d}" for i in range(1, METERS + 1)]
    sim = Dlt645Simulator(addresses, baud=BAUD, pace=True, turnaround_s=TURNAROUND_S, load_kw=1.2)
    path = await sim.serve_pty()
    async with Bus(SerialTransport(path, baud=BAUD, parity="E"), baud=BAUD) as bus:
        driver = Dlt645Driver(bus, preamble=PREAMBLE)
        meters = [MeterRef(a, a, "dlt645-2007") for a in addresses]
        await driver.read(meters[0], QUANTITIES)  # warm up (imports, first timeouts)
        started = time.perf_counter()
        results = [await driver.read(m, QUANTITIES) for m in meters]
        elapsed = time.perf_counter() - started
    await sim.aclose()
    bound, transactions = _lower_bound_s(addresses)
    assert all(f == 0 for r in results for _, _, f in r.values)
    assert [r.value(QUANTITIES[1]) for r in results] == [2200] * METERS
    assert driver.stats["retries"] == 0
    ratio = elapsed / bound
    print(
        f"\npoll cycle, {METERS} meters x {len(QUANTITIES)} quantities at {BAUD} baud (paced pty): "
        f"{elapsed:.3f} s vs wire-time lower bound {bound:.3f} s ({transactions} transactions, "
        f"Td {TURNAROUND_S * 1000:.0f} ms each): ratio {ratio:.3f}x (aim <= 1.15x)"
    )
    assert ratio >= 0.99  # the simulator cannot beat the wire
