"""``amigw sim`` as a subprocess: the first stdout line says where to connect, and a read works there."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from drivers.base import MeterRef
from drivers.bus import Bus
from drivers.dlt645 import Dlt645Driver
from drivers.modbus import ModbusDriver
from drivers.serial_transport import SerialTransport
from drivers.tcp_transport import TcpTransport
from protocols.quantities import by_name

pytestmark = pytest.mark.integration


@asynccontextmanager
async def amigw_sim(*args: str) -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "sim",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        first = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        yield first
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) in (0, -signal.SIGTERM)


@pytest.mark.parametrize("where", [["--pty"], ["--tcp", "127.0.0.1:0"]])
async def test_dlt645_sim_prints_where_to_connect_and_serves_its_meters(where: list[str]) -> None:
    async with amigw_sim(
        "dlt645", "--meters", "000000000001,000000000002", *where, "--load-kw", "2"
    ) as first:
        if where == ["--pty"]:
            assert first.startswith("/dev/")
            transport: SerialTransport | TcpTransport = SerialTransport(first, baud=2400, parity="E")
        else:
            m = re.fullmatch(r"tcp://127\.0\.0\.1:(\d+)", first)
            assert m, first
            transport = await TcpTransport.connect("127.0.0.1", int(m.group(1)))
        async with Bus(transport, baud=2400) as bus:
            driver = Dlt645Driver(bus)
            qs = [by_name("power_active_total"), by_name("voltage_a")]
            for address in ("000000000001", "000000000002"):
                result = await driver.read(MeterRef(address, address, "dlt645-2007"), qs)
                assert [v for _, v, _ in result.values] == [20000, 2200]


async def test_modbus_sim_delegates_and_serves_tcp() -> None:
    async with amigw_sim("modbus", "--model", "sdm120", "--unit", "7") as first:
        m = re.search(r"on tcp 127\.0\.0\.1:(\d+)", first)
        assert m, first
        async with ModbusDriver.tcp("127.0.0.1", int(m.group(1)), timeout_s=1.0) as driver:
            result = await driver.read(MeterRef("m", "7", "modbus", "sdm120"), [by_name("voltage_a")])
            assert result.value(by_name("voltage_a")) == 2301
