"""Word orders, data types and the exact fixed-point conversion."""

from __future__ import annotations

import math
import struct
from decimal import Decimal

import pytest

from protocols.modbus.words import (
    DataType,
    WordOrder,
    decode_registers,
    encode_registers,
    from_fixed,
    probe_orders,
    to_fixed,
)

# 0x43663333 is float32 230.2; wire layouts per order (A=0x43 B=0x66 C=0x33 D=0x33).
F230_2 = {
    WordOrder.ABCD: (0x4366, 0x3333),
    WordOrder.CDAB: (0x3333, 0x4366),
    WordOrder.BADC: (0x6643, 0x3333),
    WordOrder.DCBA: (0x3333, 0x6643),
}


@pytest.mark.parametrize("order", list(WordOrder))
def test_float32_each_order(order: WordOrder) -> None:
    value = decode_registers(F230_2[order], DataType.FLOAT32, order)
    assert value == struct.unpack(">f", bytes.fromhex("43663333"))[0]
    assert to_fixed(value, Decimal(1), 1) == 2302
    assert encode_registers(value, DataType.FLOAT32, order) == F230_2[order]


@pytest.mark.parametrize(
    ("order", "regs"),
    [
        (WordOrder.ABCD, (0xFFFE, 0x1DC0)),  # -123456 = 0xFFFE1DC0
        (WordOrder.CDAB, (0x1DC0, 0xFFFE)),
        (WordOrder.BADC, (0xFEFF, 0xC01D)),
        (WordOrder.DCBA, (0xC01D, 0xFEFF)),
    ],
)
def test_int32_negative_each_order(order: WordOrder, regs: tuple[int, int]) -> None:
    assert decode_registers(regs, DataType.INT32, order) == -123456
    assert decode_registers(regs, DataType.UINT32, order) == 0xFFFE1DC0
    assert encode_registers(-123456, DataType.INT32, order) == regs


def test_16_bit_types_only_byte_swap() -> None:
    assert decode_registers((0xFF85,), DataType.INT16, WordOrder.ABCD) == -123
    assert decode_registers((0xFF85,), DataType.INT16, WordOrder.CDAB) == -123
    assert decode_registers((0x85FF,), DataType.INT16, WordOrder.BADC) == -123
    assert decode_registers((0x85FF,), DataType.INT16, WordOrder.DCBA) == -123
    assert decode_registers((0xFF85,), DataType.UINT16, WordOrder.ABCD) == 0xFF85


def test_wrong_register_count_is_value_error() -> None:
    with pytest.raises(ValueError, match="needs 2 registers"):
        decode_registers((1,), DataType.FLOAT32, WordOrder.ABCD)


@pytest.mark.parametrize(
    ("raw", "scale", "decimals", "expected"),
    [
        (2301, "0.1", 1, 2301),  # DTSU666 voltage in 0.1 V -> 0.1 V
        (35123, "0.0001", 4, 35123),  # 3512.3 W in 0.1 W -> 0.0001 kW
        (1234.5, "0.001", 4, 12345),  # 1234.5 W -> 1.2345 kW
        (-1234.5, "0.001", 4, -12345),
        (0.25, "1", 1, 3),  # exact half rounds away from zero
        (-0.25, "1", 1, -3),
        (0.35, "1", 1, 3),  # float 0.35 is 0.34999999... : exact, not "half"
        (123456, "0.01", 2, 123456),  # int counts of 0.01 kWh
        (-5, "0.001", 3, -5),
    ],
)
def test_to_fixed_exact(raw: float, scale: str, decimals: int, expected: int) -> None:
    assert to_fixed(raw, Decimal(scale), decimals) == expected


def test_float32_scaling_round_trip() -> None:
    # 230.1 V is not representable in float32; the nearest float still reads back as 2301.
    f32 = struct.unpack(">f", struct.pack(">f", 230.1))[0]
    assert f32 != 230.1
    assert to_fixed(f32, Decimal(1), 1) == 2301
    for value in (1234567, -4210, 992, 5002, 1):
        for scale, dec in (("1", 2), ("0.001", 4), ("0.1", 1)):
            raw = from_fixed(value, Decimal(scale), dec, DataType.FLOAT32)
            f32 = decode_registers(
                encode_registers(raw, DataType.FLOAT32, WordOrder.ABCD), DataType.FLOAT32, WordOrder.ABCD
            )
            assert to_fixed(f32, Decimal(scale), dec) == value


def test_from_fixed_integer_must_be_whole() -> None:
    assert from_fixed(2301, Decimal("0.1"), 1, DataType.UINT16) == 2301
    with pytest.raises(ValueError, match="whole multiple"):
        from_fixed(2301, Decimal(1), 1, DataType.UINT16)


def test_non_finite_is_value_error() -> None:
    with pytest.raises(ValueError):
        to_fixed(math.nan, Decimal(1), 1)
    with pytest.raises(ValueError):
        to_fixed(math.inf, Decimal(1), 1)


def test_probe_orders_finds_the_plausible_one() -> None:
    results = probe_orders(F230_2[WordOrder.CDAB])
    assert [o for o, _, _ in results] == list(WordOrder)
    plausible = [o for o, _, ok in results if ok]
    assert plausible == [WordOrder.CDAB]
    assert dict((o, v) for o, v, _ in results)[WordOrder.CDAB] == pytest.approx(230.2, rel=1e-6)
