"""Block planning: contiguous merge, gap bound, the 125-register limit, function split."""

from __future__ import annotations

from decimal import Decimal

import pytest

from protocols.modbus.maps import RegisterDef
from protocols.modbus.plan import MAX_READ_REGISTERS, ReadBlock, decode_block, plan_reads
from protocols.modbus.words import DataType, WordOrder, encode_registers
from protocols.quantities import Quantity


def _regs(*spec: tuple[int, int, DataType]) -> list[RegisterDef]:
    return [
        RegisterDef(
            Quantity(1000 + i, f"q{i}", "", 1, "instantaneous", "test"),
            addr,
            fc,
            dt,
            WordOrder.ABCD,
            Decimal(1),
        )
        for i, (fc, addr, dt) in enumerate(spec)
    ]


F, U = DataType.FLOAT32, DataType.UINT16


def _shape(blocks: list[ReadBlock]) -> list[tuple[int, int, int]]:
    return [(b.function, b.start, b.count) for b in blocks]


def test_contiguous_registers_merge() -> None:
    regs = _regs((4, 0, F), (4, 2, F), (4, 4, U), (4, 5, F))
    assert _shape(plan_reads(regs)) == [(4, 0, 7)]


def test_gap_threshold() -> None:
    regs = _regs((4, 0, F), (4, 6, F), (4, 20, F))
    assert _shape(plan_reads(regs, max_gap=4)) == [(4, 0, 8), (4, 20, 2)]
    assert _shape(plan_reads(regs, max_gap=3)) == [(4, 0, 2), (4, 6, 2), (4, 20, 2)]
    assert _shape(plan_reads(regs, max_gap=0)) == [(4, 0, 2), (4, 6, 2), (4, 20, 2)]
    assert _shape(plan_reads(regs, max_gap=14)) == [(4, 0, 22)]


def test_functions_never_merge_and_order_is_stable() -> None:
    regs = _regs((4, 2, F), (3, 0, F), (4, 0, F))
    assert _shape(plan_reads(regs)) == [(3, 0, 2), (4, 0, 4)]


def test_125_register_limit_never_splits_a_value() -> None:
    regs = _regs(*[(3, a, F) for a in range(0, 130, 2)])  # 65 floats, 130 registers, contiguous
    blocks = plan_reads(regs)
    assert all(b.count <= MAX_READ_REGISTERS for b in blocks)
    assert _shape(blocks) == [(3, 0, 124), (3, 124, 6)]
    odd = _regs((3, 0, U), *[(3, a, F) for a in range(1, 130, 2)])
    assert _shape(plan_reads(odd)) == [(3, 0, 125), (3, 125, 6)]
    assert sum(len(b.registers) for b in plan_reads(odd)) == len(odd)


def test_max_count_is_configurable_and_checked() -> None:
    regs = _regs((3, 0, F), (3, 2, F), (3, 4, F))
    assert _shape(plan_reads(regs, max_count=4)) == [(3, 0, 4), (3, 4, 2)]
    with pytest.raises(ValueError):
        plan_reads(regs, max_count=126)


def test_decode_block() -> None:
    regs = _regs((4, 0, F), (4, 4, U))
    (block,) = plan_reads(regs)
    words = [*encode_registers(1.5, F, WordOrder.ABCD), 0, 0, 7]
    assert decode_block(block, words) == {
        regs[0].quantity.code: round(1.5 * regs[0].quantity.scale),
        regs[1].quantity.code: 7 * regs[1].quantity.scale,
    }
    with pytest.raises(ValueError, match="expected 5"):
        decode_block(block, words[:4])
