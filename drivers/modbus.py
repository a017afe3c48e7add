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

Relay control and clock setting are not part of these models' maps: ``NotImplementedError``.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence

from drivers.base import MeterDriver, MeterRef, ReadResult, RelayAction
from drivers.bus import Bus
from drivers.modbus_transport import RegisterLink, RtuLink, TcpLink
from protocols.errors import ConfigError, MeterErrorReply, TransportTimeout
from protocols.flags import Flag
from protocols.modbus.maps import RegisterDef, RegisterMap, load_map
from protocols.modbus.plan import ReadBlock, decode_one, plan_reads
from protocols.quantities import Quantity

__all__ = ["ModbusDriver"]


class ModbusDriver(MeterDriver):
    protocol = "modbus"

    def __init__(
        self, link: RegisterLink, *, retries: int = 1, maps: Mapping[str, RegisterMap] | None = None
    ) -> None:
        """``maps`` adds register maps by model name beside the packaged ones (site-specific meters)."""
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.link, self.retries = link, retries
        self._maps = dict(maps or {})
        self._opened = True

    @property
    def bus(self) -> Bus | None:  # type: ignore[override]
        """The shared RS-485 bus for Modbus RTU; ``None`` for Modbus TCP (its own connection)."""
        return self.link.bus if isinstance(self.link, RtuLink) else None

    async def connect(self) -> None:
        """Modbus TCP: open the connection now (reads reconnect by themselves). RTU: nothing to
        open, the bus is. Raises ``TransportError``."""
        await self.link.connect()

    def device_key(self, meter: MeterRef) -> Hashable:
        return (self.link.key if isinstance(self.link, RtuLink) else "modbus-tcp", meter.unit_id)

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
            got |= await self._read_block(meter.unit_id, block)
        values = tuple((q.code, *got[q.code]) for q in quantities)
        return ReadResult(meter.id, read_ts_ms, values)

    async def read_address(self, meter: MeterRef) -> str:
        """Modbus has no "who are you": read the map's first register to prove the unit answers."""
        reg = self.register_map(meter).registers[0]
        await self._read(meter.unit_id, reg.function, reg.address, reg.count)
        return str(meter.unit_id)

    async def control(self, meter: MeterRef, action: RelayAction) -> None:
        raise NotImplementedError(f"model {meter.model} has no relay control over Modbus")

    async def read_relay_state(self, meter: MeterRef) -> int:
        raise NotImplementedError(f"model {meter.model} has no relay state register")

    async def set_clock(self, meter: MeterRef, epoch_ms: int) -> None:
        raise NotImplementedError(f"model {meter.model} has no clock register in its map")

    async def aclose(self) -> None:
        if not self._closed:
            await self.link.aclose()
        await super().aclose()
