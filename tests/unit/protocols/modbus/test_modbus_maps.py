"""Register maps: the packaged ones load; bad ones fail naming the key."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import pytest

from protocols.errors import ConfigError
from protocols.modbus.maps import available_models, load_map, parse_map
from protocols.modbus.words import DataType, WordOrder

GOOD: dict[str, Any] = {
    "model": "x",
    "function": 4,
    "register": [
        {"quantity": "voltage_a", "address": 0},
        {
            "quantity": "power_active_total",
            "address": 2,
            "scale": "0.001",
            "type": "int32",
            "word_order": "CDAB",
        },
        {"quantity": "frequency", "address": 10, "function": 3, "type": "uint16", "scale": "0.01"},
    ],
}


def test_packaged_models() -> None:
    assert {"sdm630", "sdm120", "dtsu666", "ddsu666"} <= set(available_models())
    for model in available_models():
        regmap = load_map(model)
        assert regmap.model == model
        assert regmap.registers


def test_sdm630_known_addresses() -> None:
    m = load_map("sdm630")
    assert m.for_quantity("voltage_a").address == 0x0000
    assert m.for_quantity("power_active_total").address == 0x0034
    assert m.for_quantity("power_active_total").scale == Decimal("0.001")
    assert m.for_quantity("frequency").function == 4
    assert load_map("dtsu666").for_quantity("energy_fwd_active_total").address == 0x401E
    assert load_map("ddsu666").for_quantity("frequency").address == 0x200E


def test_defaults_and_overrides() -> None:
    m = parse_map(copy.deepcopy(GOOD))
    v, p, f = m.registers
    assert (v.function, v.dtype, v.order, v.scale) == (4, DataType.FLOAT32, WordOrder.ABCD, Decimal(1))
    assert (p.dtype, p.order, p.scale) == (DataType.INT32, WordOrder.CDAB, Decimal("0.001"))
    assert (f.function, f.dtype, f.count) == (3, DataType.UINT16, 1)


def _bad(path: list[str | int], value: Any, *, delete: bool = False) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "key_path", "reason"),
    [
        (_bad(["colour"], "red"), "m.colour", "unknown key"),
        (_bad(["register", 1, "scal"], "1"), "m.register[1].scal", "unknown key"),
        (_bad(["register", 0, "quantity"], "voltage_z"), "m.register[0].quantity", "unknown quantity"),
        (_bad(["register", 0, "address"], "0"), "m.register[0].address", "expected int"),
        (_bad(["register", 0, "address"], True), "m.register[0].address", "expected int"),
        (_bad(["register", 0, "address"], 70000), "m.register[0].address", "outside"),
        (_bad(["register", 0, "type"], "float64"), "m.register[0].type", "not one of"),
        (_bad(["register", 0, "word_order"], "ADCB"), "m.register[0].word_order", "not one of"),
        (_bad(["register", 2, "function"], 6), "m.register[2].function", "not 3"),
        (_bad(["register", 1, "scale"], "abc"), "m.register[1].scale", "not a decimal"),
        (_bad(["register", 1, "scale"], "0"), "m.register[1].scale", "non-zero"),
        (_bad(["register", 1, "address"], 1), "m.register[1].address", "overlaps"),
        (_bad(["register", 2, "quantity"], "voltage_a"), "m.register[2].quantity", "mapped twice"),
        (_bad(["model"], None, delete=True), "m.model", "missing"),
        (_bad(["register"], []), "m.register", "at least one"),
        (_bad(["max_gap"], 500), "m.max_gap", "outside"),
    ],
)
def test_errors_name_the_key(doc: dict[str, Any], key_path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_map(doc, "m")
    assert info.value.key_path == key_path
    assert reason in info.value.reason


def test_unknown_model() -> None:
    with pytest.raises(ConfigError, match="no register map for 'nope'"):
        load_map("nope")
