"""Modbus register maps of real meter models, and the pure code that reads them.

* :mod:`protocols.modbus.maps` -- load and validate a model's TOML register map.
* :mod:`protocols.modbus.plan` -- merge registers into block reads (<= 125, bounded gaps).
* :mod:`protocols.modbus.words` -- word orders, data types, exact fixed-point conversion.
* :mod:`protocols.modbus.rtu` -- RTU framing for functions 0x03/0x04 (CRC16, exceptions).

No I/O and no pymodbus here: the pymodbus client lives behind ``drivers/modbus_transport.py``.
"""

from protocols.modbus.maps import RegisterDef, RegisterMap, available_models, load_map, parse_map
from protocols.modbus.plan import MAX_READ_REGISTERS, ReadBlock, decode_block, decode_one, plan_reads
from protocols.modbus.words import (
    DataType,
    WordOrder,
    decode_registers,
    encode_registers,
    from_fixed,
    probe_orders,
    to_fixed,
)

__all__ = [
    "MAX_READ_REGISTERS",
    "DataType",
    "ReadBlock",
    "RegisterDef",
    "RegisterMap",
    "WordOrder",
    "available_models",
    "decode_block",
    "decode_one",
    "decode_registers",
    "encode_registers",
    "from_fixed",
    "load_map",
    "parse_map",
    "plan_reads",
    "probe_orders",
    "to_fixed",
]
