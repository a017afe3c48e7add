"""Plan block reads for a set of registers, and pull values out of the answers.

Fewer, larger reads are cheaper on a 9600-baud line (each request costs a turnaround and a
3.5-character gap), so registers of the same function that are contiguous, or separated by at
most ``max_gap`` unmapped registers, are merged into one read. A read never exceeds 125
registers, the limit of functions 0x03/0x04 (MB AP V1.1b3 §6.3: "1 to 125 (0x7D)"), and never
splits a value. Some meters answer a read that spans unmapped registers with exception 0x02;
set ``max_gap = 0`` in such a meter's map (the driver also falls back to single reads).

Pure: no I/O. Raises ``ValueError`` when an answer has the wrong register count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocols.modbus.maps import RegisterDef
from protocols.modbus.words import decode_registers, to_fixed

__all__ = ["MAX_READ_REGISTERS", "ReadBlock", "decode_block", "decode_one", "plan_reads"]

MAX_READ_REGISTERS = 125


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: ``count`` registers of ``function`` from ``start``, holding ``registers``."""

    function: int
    start: int
    count: int
    registers: tuple[RegisterDef, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_READ_REGISTERS:
            raise ValueError(f"block of {self.count} registers outside 1..{MAX_READ_REGISTERS}")


def plan_reads(
    registers: Iterable[RegisterDef], *, max_gap: int = 4, max_count: int = MAX_READ_REGISTERS
) -> list[ReadBlock]:
    """Group ``registers`` into as few reads as the gap and size limits allow.

    Blocks come out ordered by (function, start); duplicates are read once."""
    if not 1 <= max_count <= MAX_READ_REGISTERS:
        raise ValueError(f"max_count {max_count} outside 1..{MAX_READ_REGISTERS}")
    blocks: list[ReadBlock] = []
    current: list[RegisterDef] = []
    for reg in sorted(set(registers), key=lambda r: (r.function, r.address)):
        if current and _fits(current, reg, max_gap, max_count):
            current.append(reg)
            continue
        if current:
            blocks.append(_block(current))
        current = [reg]
    if current:
        blocks.append(_block(current))
    return blocks


def _fits(current: list[RegisterDef], reg: RegisterDef, max_gap: int, max_count: int) -> bool:
    first, end = current[0], max(r.end for r in current)
    return (
        reg.function == first.function
        and reg.address - end <= max_gap
        and max(end, reg.end) - first.address <= max_count
    )


def _block(regs: list[RegisterDef]) -> ReadBlock:
    start = regs[0].address
    return ReadBlock(regs[0].function, start, max(r.end for r in regs) - start, tuple(regs))


def decode_block(block: ReadBlock, values: Sequence[int]) -> dict[int, int]:
    """Quantity code -> fixed-point value for every register of ``block``.

    Raises ``ValueError`` if ``values`` is not ``block.count`` long or a value is NaN/infinite
    (callers that want per-quantity errors use :func:`decode_one`)."""
    if len(values) != block.count:
        raise ValueError(f"expected {block.count} registers, got {len(values)}")
    return {
        reg.quantity.code: decode_one(reg, values[reg.address - block.start : reg.end - block.start])
        for reg in block.registers
    }


def decode_one(reg: RegisterDef, words: Sequence[int]) -> int:
    """One register definition's words -> its quantity's fixed-point integer."""
    raw = decode_registers(list(words), reg.dtype, reg.order)
    return to_fixed(raw, reg.scale, reg.quantity.decimals)
