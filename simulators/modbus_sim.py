"""A Modbus meter simulator serving a model's register map: TCP on pymodbus' server, RTU on a pty.

    async with ModbusSimulator(model="sdm630", unit=1) as sim:      # TCP on 127.0.0.1, port 0
        sim.set_value("voltage_a", 2301)                              # fixed point: 230.1 V
        ... ModbusDriver.tcp("127.0.0.1", sim.port) ...
        sim.set_fault("exception", code=2, quantity="frequency")    # or "no_reply", "wrong_values"
        path = await sim.serve_rtu_pty()                              # RTU on a pseudo-terminal

Values are held per quantity as the fixed-point integers of :mod:`protocols.quantities`, and
encoded into registers on every request through the same map (type, word order, scale) the
driver decodes with, so tests can assert exact readback. Faults, settable at run time:

* ``"no_reply"``: the request is swallowed (pymodbus' ``ignore_missing_devices`` path);
* ``"exception"``: exception response ``code``, for every read or only reads touching ``quantity``;
* ``"wrong_values"``: every value served ten times too large.

``main()`` runs one simulator until interrupted (wired into ``amigw sim modbus``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tty
from types import TracebackType
from typing import Any, Self

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from protocols.modbus.maps import RegisterMap, load_map
from protocols.modbus.rtu import crc16, encode_exception_reply, encode_registers_reply
from protocols.modbus.words import encode_registers, from_fixed

__all__ = ["DEFAULT_VALUES", "ModbusSimulator", "main"]

#: Plausible readings (fixed point) by quantity-name prefix; the first match wins.
DEFAULT_VALUES: tuple[tuple[str, int], ...] = (
    ("voltage_", 2301),  # 230.1 V
    ("current_n", 120),  # 0.120 A
    ("current_", 5123),  # 5.123 A
    ("power_active_total", 35123),  # 3.5123 kW
    ("power_active_", 11708),
    ("power_reactive_total", -4210),  # -0.421 kvar
    ("power_reactive_", -1403),
    ("power_apparent_total", 35400),
    ("power_apparent_", 11800),
    ("power_factor_", 992),  # 0.992
    ("frequency", 5002),  # 50.02 Hz
    ("energy_fwd_active_total", 1234567),  # 12345.67 kWh
    ("energy_fwd_active_", 411522),
    ("energy_rev_active_total", 2345),
    ("energy_combined_reactive", 45678),
)


def _default(name: str) -> int:
    return next((v for prefix, v in DEFAULT_VALUES if name.startswith(prefix)), 0)


class ModbusSimulator:
    def __init__(
        self,
        model: str = "sdm630",
        unit: int = 1,
        *,
        register_map: RegisterMap | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.map = register_map or load_map(model)
        self.unit, self.host, self._port = unit, host, port
        self.values: dict[str, int] = {r.quantity.name: _default(r.quantity.name) for r in self.map.registers}
        self.fault: str | None = None
        self.fault_code = 4
        self.fault_quantity: str | None = None
        self.requests = 0
        self._server: ModbusTcpServer | None = None
        self._pty: tuple[int, int] | None = None
        self._rtu_buf = bytearray()

    # -- the meter's state -------------------------------------------------------------------
    def set_value(self, quantity: str, value: int) -> None:
        """Hold ``value`` (fixed point) for ``quantity``. ``KeyError`` if the model lacks it."""
        self.map.for_quantity(quantity)
        self.values[quantity] = value

    def set_fault(self, kind: str | None, *, code: int = 4, quantity: str | None = None) -> None:
        if kind not in (None, "no_reply", "exception", "wrong_values"):
            raise ValueError(f"unknown fault {kind!r}")
        if quantity is not None:
            self.map.for_quantity(quantity)
        self.fault, self.fault_code, self.fault_quantity = kind, code, quantity

    def clear_fault(self) -> None:
        self.set_fault(None)

    def registers(self, function: int) -> dict[int, int]:
        """Address -> register word, as the meter would answer now."""
        factor = 10 if self.fault == "wrong_values" else 1
        words: dict[int, int] = {}
        for reg in self.map.registers:
            if reg.function == function:
                raw = from_fixed(
                    self.values[reg.quantity.name] * factor, reg.scale, reg.quantity.decimals, reg.dtype
                )
                for i, w in enumerate(encode_registers(raw, reg.dtype, reg.order)):
                    words[reg.address + i] = w
        return words

    def _answer(self, function: int, address: int, count: int) -> list[int] | int | None:
        """Registers, an exception code, or None for "stay silent"."""
        self.requests += 1
        if self.fault == "no_reply":
            return None
        if self.fault == "exception" and self._fault_hits(function, address, count):
            return self.fault_code
        words = self.registers(function)
        lo, hi = self._span(function)
        if function not in (3, 4) or address < lo or address + count > hi:
            return int(ExcCodes.ILLEGAL_ADDRESS)
        return [words.get(a, 0) for a in range(address, address + count)]

    def _fault_hits(self, function: int, address: int, count: int) -> bool:
        if self.fault_quantity is None:
            return True
        reg = self.map.for_quantity(self.fault_quantity)
        return reg.function == function and reg.address < address + count and address < reg.end

    def _span(self, function: int) -> tuple[int, int]:
        regs = [r for r in self.map.registers if r.function == function]
        if not regs:
            return (0, 0)
        return min(r.address for r in regs), max(r.end for r in regs)

    # -- Modbus TCP on pymodbus --------------------------------------------------------------
    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: Any,
    ) -> ExcCodes | None:
        answer = self._answer(function_code, address, count)
        if answer is None:
            raise NoSuchIdException("simulated silence")  # server drops the request
        if isinstance(answer, int):
            return ExcCodes(answer)
        current_registers[address - start_address : address - start_address + count] = answer
        return None

    def _device(self) -> SimDevice:
        blocks: list[list[SimData]] = []
        for function in (3, 4):
            lo, hi = self._span(function)
            blocks.append([SimData(lo, count=max(hi - lo, 1), values=0, datatype=SimType.REGISTERS)])
        bits = [SimData(0, count=16, values=False, datatype=SimType.BITS)]
        return SimDevice(self.unit, simdata=(bits, list(bits), blocks[0], blocks[1]), action=self._action)

    @property
    def port(self) -> int:
        """The TCP port actually bound (``port=0`` asks the OS for a free one)."""
        if self._server is None or self._server.transport is None:
            raise RuntimeError("simulator not started")
        server: Any = self._server.transport  # an asyncio.Server once listening
        return int(server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = ModbusTcpServer(
            self._device(), address=(self.host, self._port), ignore_missing_devices=True
        )
        await self._server.serve_forever(background=True)

    # -- Modbus RTU on a pseudo-terminal -----------------------------------------------------
    async def serve_rtu_pty(self) -> str:
        """Serve RTU on a new pty; returns the slave's path for the client's SerialTransport."""
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._pty = (master, slave)
        asyncio.get_running_loop().add_reader(master, self._on_rtu_bytes)
        return os.ttyname(slave)

    def _on_rtu_bytes(self) -> None:
        assert self._pty is not None
        try:
            self._rtu_buf += os.read(self._pty[0], 4096)
        except (BlockingIOError, OSError):
            return
        buf = self._rtu_buf
        while len(buf) >= 8:  # a 0x03/0x04 request is 8 bytes (Serial Line §2.5.1)
            frame = bytes(buf[:8])
            if crc16(frame[:6]) != int.from_bytes(frame[6:], "little"):
                del buf[:1]  # hunt for the next frame start
                continue
            del buf[:8]
            if frame[0] == self.unit:
                self._reply_rtu(
                    frame[1], int.from_bytes(frame[2:4], "big"), int.from_bytes(frame[4:6], "big")
                )

    def _reply_rtu(self, function: int, address: int, count: int) -> None:
        assert self._pty is not None
        answer = self._answer(function, address, count)
        if answer is None:
            return
        if isinstance(answer, int):
            os.write(self._pty[0], encode_exception_reply(self.unit, function, answer))
        else:
            os.write(self._pty[0], encode_registers_reply(self.unit, function, answer))

    # -- lifecycle ---------------------------------------------------------------------------
    async def stop(self) -> None:
        if self._pty is not None:
            asyncio.get_running_loop().remove_reader(self._pty[0])
            for fd in self._pty:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pty = None
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def _run(args: argparse.Namespace) -> None:
    async with ModbusSimulator(args.model, args.unit, host=args.host, port=args.port) as sim:
        where = f"tcp {args.host}:{sim.port}"
        if args.rtu_pty:
            where += f", rtu {await sim.serve_rtu_pty()}"
        print(f"modbus simulator model={args.model} unit={args.unit} on {where}", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    """``amigw sim modbus``: serve one simulated meter until interrupted."""
    p = argparse.ArgumentParser(prog="amigw sim modbus", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sdm630")
    p.add_argument("--unit", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rtu-pty", action="store_true", help="also serve Modbus RTU on a new pseudo-terminal")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))
    return 0
