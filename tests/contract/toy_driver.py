"""A throwaway protocol for the registration test: one line per request and answer over a serial
server (``tcp://``), and its meter simulator (a thread serving a real TCP socket).

Request ``R<address> <quantity code>\\n``; answer ``V<address> <value>\\n``, or ``E<address>\\n``
for a quantity the meter refuses. Its raw field-tool option ``--toy-code N`` asks for a quantity
code as it is. Nothing in ``gateway/`` knows of it.
"""

from __future__ import annotations

import argparse
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass
from typing import Self

from drivers.base import (
    Capability,
    DriverSetup,
    FieldRead,
    FieldRow,
    MeterDriver,
    MeterRef,
    MeterSpec,
    ReadResult,
)
from drivers.bus import Bus, BusTransaction
from drivers.lines import TransportKind
from protocols.errors import ConfigError, FramingError
from protocols.flags import Flag
from protocols.quantities import Quantity, by_name
from protocols.stream import NEED_DATA, NeedData, Skipped

PROTOCOL = "toy"
QUANTITIES = ("voltage_a", "energy_fwd_active_total")


@dataclass(frozen=True)
class ToyReply:
    address: str
    value: int | None


class ToyDecoder:
    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> ToyReply | Skipped | NeedData:
        end = self.buf.find(b"\n")
        if end < 0:
            return NEED_DATA
        line = bytes(self.buf[:end]).decode("ascii", "replace")
        del self.buf[: end + 1]
        if line[:1] == "V":
            address, _, value = line[1:].partition(" ")
            return ToyReply(address, int(value))
        if line[:1] == "E":
            return ToyReply(line[1:], None)
        return Skipped(end + 1, "not an answer")


class ToyDriver(MeterDriver):
    protocol = PROTOCOL
    family = "toy"
    transports = (TransportKind.SERIAL_SERVER,)

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    @classmethod
    def open(cls, setup: DriverSetup) -> ToyDriver:
        if setup.bus is None:
            raise ConfigError("port", "the toy protocol needs a shared line")
        return cls(setup.bus)

    @classmethod
    def capabilities(cls, protocol: str) -> frozenset[Capability]:
        return frozenset()

    @classmethod
    def check_meter(cls, meter: MeterSpec) -> None:
        if not meter.address.isdigit():
            raise ConfigError("address", f"a toy address is digits, got {meter.address!r}")

    @classmethod
    def quantities(cls, meter: MeterSpec) -> tuple[Quantity, ...]:
        return tuple(by_name(n) for n in QUANTITIES)

    @classmethod
    def add_raw_options(cls, group: argparse._ArgumentGroup) -> Sequence[argparse.Action]:
        return (group.add_argument("--toy-code", action="append", type=int, default=[], metavar="N"),)

    @classmethod
    def raw_reads(cls, protocol: str, options: argparse.Namespace) -> FieldRead[Self] | None:
        if not options.toy_code:
            return None
        if options.address is None:
            raise ConfigError("--toy-code", "needs the meter: --address")
        meter, codes = MeterRef(options.address, options.address, protocol), list(options.toy_code)

        async def read_codes(driver: Self) -> AsyncIterator[FieldRow | str]:
            for code in codes:
                async with driver.bus.transaction(device=driver.device_key(meter)) as tx:
                    value = await driver._ask(tx, meter.address, code)
                yield FieldRow(meter.address, "code", str(code), "refused" if value is None else str(value))

        return read_codes

    @property
    def bus(self) -> Bus:
        return self._bus

    async def _ask(self, tx: BusTransaction, address: str, code: int) -> int | None:
        reply = await tx.exchange(f"R{address} {code}\n".encode(), ToyDecoder())
        if not isinstance(reply, ToyReply) or reply.address != address:
            raise FramingError(f"unexpected answer {reply!r}")
        return reply.value

    def device_key(self, meter: MeterRef) -> Hashable:
        return (PROTOCOL, meter.address)

    async def read(self, meter: MeterRef, quantities: Sequence[Quantity]) -> ReadResult:
        ts = time.time_ns() // 1_000_000
        rows = []
        async with self.bus.transaction(device=self.device_key(meter)) as tx:
            for q in quantities:
                value = await self._ask(tx, meter.address, q.code)
                rows.append((q.code, 0, int(Flag.METER_ERROR)) if value is None else (q.code, value, 0))
        return ReadResult(meter.id, ts, tuple(rows))


class ToyMeters:
    """Toy meters behind one TCP port: ``values[address][quantity code]``; a thread serves them."""

    def __init__(self, values: dict[str, dict[int, int]]) -> None:
        meters = values

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for raw in self.rfile:
                    address, _, code = raw.decode().strip()[1:].partition(" ")
                    value = meters.get(address, {}).get(int(code))
                    if address not in meters:
                        continue  # not on this line: silence
                    answer = f"E{address}\n" if value is None else f"V{address} {value}\n"
                    self.wfile.write(answer.encode())

        socketserver.ThreadingTCPServer.daemon_threads = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
