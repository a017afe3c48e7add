"""Register words -> numbers -> fixed-point integers, exactly.

Modbus carries 16-bit registers, big-endian inside each register (Modbus Application Protocol
V1.1b3 §4.2). Wider values span several registers in an order the standard leaves to the vendor,
named here by where the bytes of the big-endian value ``A B C D`` end up on the wire:

====== =============================== ==========================================
order  wire bytes of 0xAABBCCDD         seen in
====== =============================== ==========================================
ABCD   AA BB | CC DD                    Eastron SDM, Chint DxSU666 (the default)
CDAB   CC DD | AA BB                    "word swapped" (many PLCs, some Schneider)
BADC   BB AA | DD CC                    byte swapped inside each register
DCBA   DD CC | BB AA                    fully little-endian
====== =============================== ==========================================

16-bit types are affected only by the byte swap (BADC, DCBA).

Conversion to a quantity's fixed point (``value * scale * 10**decimals``) is done with
:class:`decimal.Decimal` on the exact binary value of the float, then rounded **half away from
zero** (``ROUND_HALF_UP`` in ``decimal``'s terms), so 230.05 V (float32 230.0500030517578)
is 2301 at 0.1 V and -0.0005 kW at 0.0001 kW is -5. Integers scale exactly. NaN and infinities
(meters use them for "not available") raise ``ValueError``; callers flag the quantity.

No I/O. Raises ``ValueError`` for bad input (wrong register count, non-finite values).
"""

from __future__ import annotations

import enum
import math
import struct
from decimal import ROUND_HALF_UP, Decimal, localcontext

__all__ = [
    "DataType",
    "WordOrder",
    "decode_registers",
    "encode_registers",
    "from_fixed",
    "probe_orders",
    "to_fixed",
]


class WordOrder(enum.StrEnum):
    ABCD = "ABCD"
    CDAB = "CDAB"
    BADC = "BADC"
    DCBA = "DCBA"


class DataType(enum.StrEnum):
    FLOAT32 = "float32"
    INT32 = "int32"
    UINT32 = "uint32"
    INT16 = "int16"
    UINT16 = "uint16"

    @property
    def width(self) -> int:
        """Number of 16-bit registers the type occupies."""
        return 1 if self in (DataType.INT16, DataType.UINT16) else 2


_STRUCT = {
    DataType.FLOAT32: ">f",
    DataType.INT32: ">i",
    DataType.UINT32: ">I",
    DataType.INT16: ">h",
    DataType.UINT16: ">H",
}


def _wire_to_be(wire: bytes, order: WordOrder) -> bytes:
    """Reorder the bytes as received into big-endian ``A B C D`` (the permutations are involutions)."""
    if order is WordOrder.ABCD:
        return wire
    if order is WordOrder.DCBA:
        return wire[::-1]
    if len(wire) == 2:  # 16-bit: only the byte swap exists
        return wire if order is WordOrder.CDAB else wire[::-1]
    if order is WordOrder.CDAB:
        return wire[2:4] + wire[0:2]
    return bytes((wire[1], wire[0], wire[3], wire[2]))  # BADC


def decode_registers(regs: tuple[int, ...] | list[int], dtype: DataType, order: WordOrder) -> int | float:
    """Interpret ``dtype.width`` registers (as the meter sent them) under ``order``."""
    if len(regs) != dtype.width:
        raise ValueError(f"{dtype.value} needs {dtype.width} registers, got {len(regs)}")
    wire = b"".join(r.to_bytes(2, "big") for r in regs)
    value: int | float = struct.unpack(_STRUCT[dtype], _wire_to_be(wire, order))[0]
    return value


def encode_registers(value: int | float, dtype: DataType, order: WordOrder) -> tuple[int, ...]:
    """The registers a meter using ``order`` sends for ``value`` (the inverse of :func:`decode_registers`).

    Raises ``struct.error`` (a ``ValueError`` subclass is not guaranteed) when out of range."""
    be = struct.pack(_STRUCT[dtype], value)
    wire = _wire_to_be(be, order)
    return tuple(int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2))


def to_fixed(raw: int | float, scale: Decimal, decimals: int) -> int:
    """``raw * scale`` in the quantity's unit, as an integer count of ``10**-decimals``.

    Exact: floats enter as their exact binary value; rounding is half away from zero."""
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ValueError(f"register value is {raw}")
    with localcontext() as ctx:
        ctx.prec = 60  # enough for any float32/int32 * scale without inexact intermediate steps
        exact = Decimal(raw) * scale * (Decimal(10) ** decimals)
        return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def from_fixed(value: int, scale: Decimal, decimals: int, dtype: DataType) -> int | float:
    """The raw register value a meter would hold for fixed-point ``value`` (simulators, tests).

    Integer types must come out whole: ``ValueError`` if ``value`` is not representable."""
    with localcontext() as ctx:
        ctx.prec = 60
        raw = Decimal(value) / (Decimal(10) ** decimals) / scale
    if dtype is DataType.FLOAT32:
        return float(raw)
    if raw != raw.to_integral_value():
        raise ValueError(f"{value} at 10^-{decimals} is not a whole multiple of scale {scale}")
    return int(raw)


def probe_orders(
    regs: tuple[int, ...] | list[int],
    dtype: DataType = DataType.FLOAT32,
    plausible: tuple[float, float] = (1e-3, 1e7),
) -> list[tuple[WordOrder, int | float, bool]]:
    """Decode two registers under all four orders, for a technician guessing a meter's order.

    ``plausible`` is true when the value is finite and zero or its magnitude is within
    ``plausible`` (lo, hi): a wrong order of a float32 usually lands at 1e-30 or 1e+30."""
    out: list[tuple[WordOrder, int | float, bool]] = []
    lo, hi = plausible
    for order in WordOrder:
        value = decode_registers(regs, dtype, order)
        ok = math.isfinite(value) and (value == 0 or lo <= abs(value) <= hi)
        out.append((order, value, ok))
    return out
