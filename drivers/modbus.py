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
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable, Mapping, Sequence

from drivers.base import (
    Capability,
    DriverSetup,
    MeterDriver,
    MeterRef,
    MeterSpec,
    QuantityReading,
    ReadResult,
)
from drivers.bus import Bus
from drivers.lines import TransportKind
from drivers.modbus_transport import RegisterLink, RtuLink, TcpLink
from protocols.errors import ConfigError, MeterErrorReply, TransportTimeout
from protocols.flags import Flag
from protocols.modbus.maps import RegisterDef, RegisterMap, available_models, load_map
from protocols.modbus.plan import ReadBlock, decode_one, plan_reads
from protocols.quantities import Quantity

__all__ = ["ModbusDriver"]


class ModbusDriver(MeterDriver):
    protocol = "modbus"
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
