"""Register reads over Modbus RTU (on a shared :class:`~drivers.bus.Bus`) and Modbus TCP (pymodbus).

This is the **only** module that imports pymodbus (pinned to 3.16.x, whose API changes between
minor releases): its client, exceptions and PDUs stay in here, and what comes out are plain
register tuples and our own errors:

* an exception response (MB AP V1.1b3 §7) -> :class:`~protocols.errors.MeterErrorReply`
  with ``error_code`` = the exception code and ``reasons`` = its name;
* no answer -> :class:`~protocols.errors.TransportTimeout`;
* connection refused / lost -> :class:`~protocols.errors.TransportError`;
* a malformed or mismatched answer -> :class:`~protocols.errors.FrameError`.

RTU does not use pymodbus: it runs our own framing (:mod:`protocols.modbus.rtu`, see its
docstring for why) inside a bus transaction, so Modbus RTU meters share an RS-485 line with
DL/T 645 meters under the bus's lock and guard times.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Hashable

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers.bus import Bus
from protocols.errors import FrameError, MeterErrorReply, TransportError, TransportTimeout
from protocols.modbus.rtu import EXCEPTION_NAMES, ExceptionReply, RegistersReply, ResponseDecoder, encode_read

__all__ = ["RegisterLink", "RtuLink", "TcpLink"]

# pymodbus logs every timeout at ERROR; we raise typed errors instead and log once per loop (H12).
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def _error_reply(code: int) -> MeterErrorReply:
    return MeterErrorReply(code, None, (EXCEPTION_NAMES.get(code, f"exception_{code}"),))


class RegisterLink(abc.ABC):
    """Reads registers from Modbus units: one request at a time per link."""

    @abc.abstractmethod
    async def read_registers(self, unit: int, function: int, start: int, count: int) -> tuple[int, ...]:
        """``count`` registers with function 3 or 4. Raises as described in the module docstring."""

    async def connect(self) -> None:  # noqa: B027 - most links have nothing to open
        """Open the link's own connection now, if it has one. Raises ``TransportError``."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...


class RtuLink(RegisterLink):
    """Modbus RTU over a shared bus; each read is one bus transaction keyed by ``(key, unit)``."""

    def __init__(self, bus: Bus, *, key: Hashable = "modbus") -> None:
        self.bus, self.key = bus, key

    async def read_registers(self, unit: int, function: int, start: int, count: int) -> tuple[int, ...]:
        async with self.bus.transaction(device=(self.key, unit)) as tx:
            reply = await tx.exchange(
                encode_read(unit, function, start, count), ResponseDecoder(unit, function, count)
            )
        if isinstance(reply, ExceptionReply):
            raise _error_reply(reply.code)
        if not isinstance(reply, RegistersReply):  # pragma: no cover - the decoder returns nothing else
            raise FrameError(f"unexpected decoder result {reply!r}")
        return reply.registers

    async def aclose(self) -> None:
        """The bus belongs to whoever made it; nothing to release here."""


class TcpLink(RegisterLink):
    """Modbus TCP (MBAP framing) through pymodbus' ``AsyncModbusTcpClient``; retries are the driver's."""

    def __init__(self, host: str, port: int = 502, *, timeout_s: float = 1.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._client = AsyncModbusTcpClient(host, port=port, timeout=timeout_s, retries=0, reconnect_delay=0)
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        if self._client.connected:
            return
        try:
            ok = await self._client.connect()
        except (ModbusException, OSError) as exc:
            raise TransportError(f"connect to {self.host}:{self.port} failed: {exc}") from exc
        if not ok:
            raise TransportError(f"connect to {self.host}:{self.port} failed")

    async def read_registers(self, unit: int, function: int, start: int, count: int) -> tuple[int, ...]:
        async with self._lock:
            await self.connect()
            call = self._client.read_holding_registers if function == 3 else self._client.read_input_registers
            try:
                response = await call(start, count=count, device_id=unit)
            except ModbusIOException as exc:
                raise TransportTimeout(f"unit {unit} at {self.host}:{self.port}: no answer ({exc})") from exc
            except (ConnectionException, OSError) as exc:
                raise TransportError(f"unit {unit} at {self.host}:{self.port}: {exc}") from exc
            except ModbusException as exc:
                raise FrameError(f"unit {unit} at {self.host}:{self.port}: {exc}") from exc
        if response.isError():
            raise _error_reply(int(getattr(response, "exception_code", 0)))
        registers = tuple(int(r) for r in response.registers)
        if len(registers) != count:
            raise FrameError(f"asked unit {unit} for {count} registers, got {len(registers)}")
        return registers

    async def aclose(self) -> None:
        self._client.close()
