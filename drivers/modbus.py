"""Modbus meters (RTU on a shared bus, or TCP) read through their register maps.

The driver plans block reads from the model's map (:mod:`protocols.modbus.plan`), reads each
block through a :class:`~drivers.modbus_transport.RegisterLink`, and converts words to
fixed-point values in our pure code. Errors:

* a block answered with an exception is re-read register by register, so one refused register
  flags only its own quantity (``Flag.METER_ERROR``, value 0); a NaN/inf float is flagged the
  same way;
* ``TransportTimeout`` is retried ``retries`` times per block, then raised;
* a quantity the model's map does not have is a ``ConfigError`` (the meter config asks for
  something the model cannot give: fix it at start, not per poll).

It runs as RTU on a serial line or a transparent serial server (a shared bus) or over Modbus TCP
(its own connection). A meter's address is its unit id (``"1"`` .. ``"247"``) and its ``model``
names the register map. Relay control and clock setting are not part of these models' maps: the
driver declares no :class:`~drivers.base.Capability`, and they raise ``NotImplementedError``.

The field tool's raw options (:meth:`ModbusDriver.raw_reads`): ``--register ADDR[:TYPE[:ORDER]]``
read with ``--function`` (4 input, 3 holding), ``--probe-order`` to decode a 32-bit register under
every word order; ``--discover`` scans the unit ids of ``--units`` (:meth:`ModbusDriver.discover`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator, Hashable, Iterable, Mapping, Sequence
from typing import Self

from drivers.base import (
    Capability,
    DriverSetup,
    FieldRead,
    FieldRow,
    MeterDriver,
    MeterRef,
    MeterSpec,
    QuantityReading,
    ReadResult,
)
from drivers.bus import Bus
from drivers.lines import TransportKind
from drivers.modbus_transport import RegisterLink, RtuLink, TcpLink
from protocols.errors import ConfigError, FrameError, MeterErrorReply, TransportTimeout
from protocols.flags import Flag
from protocols.modbus import DataType, WordOrder, decode_registers, probe_orders
from protocols.modbus.maps import RegisterDef, RegisterMap, available_models, load_map
from protocols.modbus.plan import ReadBlock, decode_one, plan_reads
from protocols.quantities import Quantity

__all__ = ["ModbusDriver"]


class ModbusDriver(MeterDriver):
    protocol = "modbus"
    family = "Modbus"
    transports = (TransportKind.SERIAL, TransportKind.MODBUS_TCP, TransportKind.SERIAL_SERVER)

    def __init__(
        self, link: RegisterLink, *, retries: int = 1, maps: Mapping[str, RegisterMap] | None = None
    ) -> None:
        """``maps`` adds register maps by model name beside the packaged ones (site-specific meters)."""
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.link, self.retries = link, retries
        self._maps = dict(maps or {})
        self._opened = True

    @classmethod
    def open(cls, setup: DriverSetup) -> ModbusDriver:
        """Modbus TCP at ``modbus-tcp://host:port``, else RTU on the line's shared bus."""
        if setup.port.kind is TransportKind.MODBUS_TCP:
            port = setup.port
            return cls.tcp(port.host, port.tcp_port, timeout_s=setup.timeout_s, retries=setup.retries)
        if setup.bus is None:
            raise ConfigError("port", f"{setup.port.text}: Modbus RTU needs a serial line or serial server")
        return cls.rtu(setup.bus, retries=setup.retries)

    @classmethod
    def capabilities(cls, protocol: str) -> frozenset[Capability]:
        return frozenset()

    @classmethod
    def check_meter(cls, meter: MeterSpec) -> None:
        if not meter.address.isdigit() or not 1 <= int(meter.address) <= 247:
            raise ConfigError("address", f"a Modbus unit id is 1..247, got {meter.address!r}")
        if not meter.model:
            raise ConfigError(
                "model", f"a Modbus meter needs a register map ({', '.join(available_models())})"
            )

    @classmethod
    def quantities(cls, meter: MeterSpec) -> tuple[Quantity, ...]:
        return tuple(load_map(meter.model or "").quantities)

    @classmethod
    def why_unreadable(cls, meter: MeterSpec, names: Iterable[str]) -> str | None:
        regmap = load_map(meter.model or "")
        have = {q.name for q in regmap.quantities}
        for name in names:
            if name not in have:
                return f"model {regmap.model} has no register for {name!r}"
        return None

    # -- the field tool (amigw read) -----------------------------------------------------------

    @classmethod
    def add_raw_options(cls, group: argparse._ArgumentGroup) -> Sequence[argparse.Action]:
        return (
            group.add_argument("--register", action="append", default=[], metavar="ADDR[:TYPE[:ORDER]]",
                               help="raw register of --unit, e.g. 0x0000:float32:ABCD (repeatable)"),
            group.add_argument("--function", type=int, choices=(3, 4), default=4,
                               help="function for --register: 4 input (default), 3 holding registers"),
            group.add_argument("--probe-order", action="store_true",
                               help="show a 32-bit --register under every word order"),
            group.add_argument("--units", default="1-16", metavar="LO-HI",
                               help="unit ids --discover scans (default 1-16)"),
        )  # fmt: skip

    @classmethod
    def raw_reads(cls, protocol: str, options: argparse.Namespace) -> FieldRead[Self] | None:
        """``--register`` of ``--unit`` (with ``--function`` and ``--probe-order``); with
        ``--discover`` and no ``--unit`` the registers are checked but not read."""
        if not options.register:
            if options.probe_order:
                raise ConfigError("--probe-order", "needs a --register")
            return None
        unit, function, probe = options.unit, options.function, options.probe_order
        if unit is not None and not 1 <= unit <= 247:
            raise ConfigError(f"--unit {unit}", "a Modbus unit id is 1..247")
        if unit is None and not options.discover:
            raise ConfigError("--register", "needs the unit: --unit (or --discover)")
        registers = [_register(spec) for spec in options.register]
        if probe and any(dtype.width != 2 for _, dtype, _ in registers):
            raise ConfigError("--probe-order", "needs a 32-bit type (float32, int32, uint32)")

        async def read_registers(driver: Self) -> AsyncIterator[FieldRow | str]:
            if unit is None:
                return
            for register in registers:
                async for row in _raw_register(driver.link, unit, function, register, probe):
                    yield row

        return read_registers

    @classmethod
    def discover(cls, protocol: str, options: argparse.Namespace) -> FieldRead[Self]:
        """Scan the unit ids of ``--units``: a unit that answers, even with an exception, is
        listed; ``TransportTimeout`` when none does."""
        units, function = _units(options.units), options.function

        async def scan(driver: Self) -> AsyncIterator[FieldRow | str]:
            found = 0
            for unit in units:
                note, extra = "  answers", dict[str, object]()
                try:
                    await driver.link.read_registers(unit, function, 0, 1)
                except MeterErrorReply as exc:
                    if exc.error_code in (0x0A, 0x0B):  # a TCP gateway says: no such unit behind me
                        continue
                    # any other exception reply still proves that something answers to this unit id
                    note = f"  answers with exception {exc.error_code} ({', '.join(exc.reasons)})"
                    extra = {"exception": exc.error_code}
                except (TransportTimeout, FrameError):
                    continue
                found += 1
                yield FieldRow(str(unit), "quantity", "unit", str(unit), label="unit", note=note, extra=extra)
            if not found:
                raise TransportTimeout(f"no Modbus unit answered in {units.start}-{units.stop - 1}")

        return scan

    @property
    def bus(self) -> Bus | None:
        """The shared RS-485 bus for Modbus RTU; ``None`` for Modbus TCP (its own connection)."""
        return self.link.bus if isinstance(self.link, RtuLink) else None

    async def connect(self) -> None:
        """Modbus TCP: open the connection now (reads reconnect by themselves). RTU: nothing to
        open, the bus's owner opens it. Raises ``TransportError``."""
        await self.link.connect()

    def device_key(self, meter: MeterRef) -> Hashable:
        return (self.link.key if isinstance(self.link, RtuLink) else TransportKind.MODBUS_TCP, _unit(meter))

    def register_map(self, meter: MeterRef) -> RegisterMap:
        """The map for ``meter.model``. Raises ``ConfigError`` for an unknown model."""
        model = meter.model or ""
        return self._maps[model] if model in self._maps else load_map(model)

    @classmethod
    def rtu(
        cls, bus: Bus, *, retries: int = 1, maps: Mapping[str, RegisterMap] | None = None
    ) -> ModbusDriver:
        """Modbus RTU meters on ``bus`` (shared with other protocols)."""
        return cls(RtuLink(bus), retries=retries, maps=maps)

    @classmethod
    def tcp(
        cls,
        host: str,
        port: int = 502,
        *,
        timeout_s: float = 1.0,
        retries: int = 1,
        maps: Mapping[str, RegisterMap] | None = None,
    ) -> ModbusDriver:
        """Modbus TCP meters (or a Modbus TCP gateway) at ``host:port``."""
        return cls(TcpLink(host, port, timeout_s=timeout_s), retries=retries, maps=maps)

    def _defs(self, meter: MeterRef, quantities: Sequence[Quantity]) -> list[RegisterDef]:
        regmap = self.register_map(meter)
        try:
            return [regmap.for_quantity(q.name) for q in quantities]
        except KeyError as exc:
            raise ConfigError(f"meters[{meter.id}].quantities", str(exc.args[0])) from None

    async def _read(self, unit: int, function: int, start: int, count: int) -> tuple[int, ...]:
        for attempt in range(self.retries + 1):
            try:
                return await self.link.read_registers(unit, function, start, count)
            except TransportTimeout:
                if attempt == self.retries:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_block(self, unit: int, block: ReadBlock) -> dict[int, tuple[int, int]]:
        try:
            words = await self._read(unit, block.function, block.start, block.count)
        except MeterErrorReply:
            if len(block.registers) == 1:
                return {block.registers[0].quantity.code: (0, int(Flag.METER_ERROR))}
            out: dict[int, tuple[int, int]] = {}
            for reg in block.registers:  # find the register the meter refuses
                out |= await self._read_block(unit, ReadBlock(reg.function, reg.address, reg.count, (reg,)))
            return out
        out = {}
        for reg in block.registers:
            try:
                out[reg.quantity.code] = (
                    decode_one(reg, words[reg.address - block.start : reg.end - block.start]),
                    0,
                )
            except ValueError:  # NaN / infinity: the meter has no value for it
                out[reg.quantity.code] = (0, int(Flag.METER_ERROR))
        return out

    async def read(self, meter: MeterRef, quantities: Sequence[Quantity]) -> ReadResult:
        defs = self._defs(meter, quantities)
        read_ts_ms = time.time_ns() // 1_000_000
        got: dict[int, tuple[int, int]] = {}
        for block in plan_reads(defs, max_gap=self.register_map(meter).max_gap):
            got |= await self._read_block(_unit(meter), block)
        values = tuple((q.code, *got[q.code]) for q in quantities)
        return ReadResult(meter.id, read_ts_ms, values)

    async def read_detailed(self, meter: MeterRef, quantities: Sequence[Quantity]) -> list[QuantityReading]:
        """Like :meth:`read`; a refused value carries the exception the unit answers for its
        register alone, or "not a number" for a NaN or infinity."""
        result = await self.read(meter, quantities)
        out = []
        for q in quantities:
            error: MeterErrorReply | None = None
            if result.flags(q):
                reg = self.register_map(meter).for_quantity(q.name)
                try:
                    await self.link.read_registers(_unit(meter), reg.function, reg.address, reg.count)
                    error = MeterErrorReply(0, None, ("not a number",))
                except MeterErrorReply as exc:
                    error = exc
            out.append(QuantityReading(q, result.value(q), error))
        return out

    async def aclose(self) -> None:
        if not self._closed:
            await self.link.aclose()
        await super().aclose()


def _unit(meter: MeterRef) -> int:
    """The unit id of ``meter`` (its address, checked by :meth:`ModbusDriver.check_meter`)."""
    return int(meter.address)


def _units(text: str) -> range:
    """``--units LO-HI`` (or one id). Raises ``ConfigError`` (key ``--units 'TEXT'``)."""
    lo, _, hi = text.partition("-")
    if not (lo.isdigit() and (hi or lo).isdigit() and 1 <= int(lo) <= int(hi or lo) <= 247):
        raise ConfigError(f"--units {text!r}", "expected LO-HI within 1..247")
    return range(int(lo), int(hi or lo) + 1)


def _register(spec: str) -> tuple[int, DataType, WordOrder]:
    """``--register ADDR[:TYPE[:ORDER]]``. Raises ``ConfigError`` (key ``--register 'SPEC'``)."""
    parts = spec.split(":")
    try:
        address = int(parts[0], 0)
        dtype = DataType(parts[1].lower()) if len(parts) > 1 else DataType.FLOAT32
        order = WordOrder(parts[2].upper()) if len(parts) > 2 else WordOrder.ABCD
        if not 0 <= address <= 0xFFFF or len(parts) > 3:
            raise ValueError(spec)
    except ValueError:
        hint = "expected ADDR[:TYPE[:ORDER]] with ADDR 0..0xFFFF, e.g. 0x0000:float32:ABCD"
        raise ConfigError(f"--register {spec!r}", hint) from None
    return address, dtype, order


async def _raw_register(
    link: RegisterLink, unit: int, function: int, register: tuple[int, DataType, WordOrder], probe: bool
) -> AsyncIterator[FieldRow | str]:
    """One ``--register`` as read (``probe``: decoded under each word order)."""
    address, dtype, order = register
    label, meter = f"register {address:#06x}", str(unit)
    try:
        words = await link.read_registers(unit, function, address, dtype.width)
    except MeterErrorReply as exc:  # the unit refuses this register: say which exception
        yield FieldRow(meter, "register", f"{address}:{dtype}:{order}", error=exc)
        return
    if probe:
        yield f"{label} words {' '.join(f'{w:04X}' for w in words)} as {dtype} under each order:"
        for probe_order, value, plausible in probe_orders(words, dtype):
            mark = "   <- plausible" if plausible else ""
            yield FieldRow(meter, "register", f"{address}:{dtype}:{probe_order}", repr(value),
                           label=f"  {probe_order}", note=mark)  # fmt: skip
        return
    value = decode_registers(words, dtype, order)
    yield FieldRow(meter, "register", f"{address}:{dtype}:{order}", repr(value),
                   label=f"{label} {dtype} {order}")  # fmt: skip
