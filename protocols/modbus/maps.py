"""Register maps of real meter models, kept as TOML data files in ``protocols/modbus/maps/``.

A map file looks like this (every key is checked; unknown keys are errors)::

    model = "sdm630"                 # the name MeterRef.model uses; must match the file name
    vendor = "Eastron"
    description = "..."
    function = 4                     # default function: 3 = holding, 4 = input registers
    word_order = "ABCD"              # default word order (see protocols.modbus.words)
    type = "float32"                 # default data type
    max_gap = 4                      # optional: unmapped registers a block read may span

    [[register]]
    quantity = "voltage_a"           # a name from protocols.quantities
    address = 0x0000                 # 0-based protocol address (30001 in the vendor's table is 0)
    scale = "1"                      # raw * scale = value in the quantity's unit (V, A, kW, kWh ...)
    # optional per register: function, type, word_order

``scale`` is a decimal string so that ``"0.001"`` (W -> kW) is exact. :func:`parse_map` is pure
(a dict in, a :class:`RegisterMap` out); :func:`load_map` reads a packaged file. Both raise
:class:`~protocols.errors.ConfigError` naming the bad key, e.g. ``sdm630.register[3].type``.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any

from protocols.errors import ConfigError
from protocols.modbus.words import DataType, WordOrder
from protocols.quantities import Quantity, by_name

__all__ = ["READ_FUNCTIONS", "RegisterDef", "RegisterMap", "available_models", "load_map", "parse_map"]

READ_FUNCTIONS = (3, 4)  # read holding registers, read input registers (MB AP V1.1b3 §6.3, §6.4)
_TOP_KEYS = {"model", "vendor", "description", "function", "word_order", "type", "max_gap", "register"}
_REG_KEYS = {"quantity", "address", "scale", "function", "type", "word_order"}


@dataclass(frozen=True, slots=True)
class RegisterDef:
    """Where one quantity lives in a meter and how to read it."""

    quantity: Quantity
    address: int
    function: int
    dtype: DataType
    order: WordOrder
    scale: Decimal

    @property
    def count(self) -> int:
        return self.dtype.width

    @property
    def end(self) -> int:
        """One past the last register."""
        return self.address + self.dtype.width


@dataclass(frozen=True, slots=True)
class RegisterMap:
    model: str
    vendor: str
    description: str
    registers: tuple[RegisterDef, ...]
    max_gap: int = 4

    def for_quantity(self, name: str) -> RegisterDef:
        """The register of quantity ``name``. Raises ``KeyError`` when the model lacks it."""
        for reg in self.registers:
            if reg.quantity.name == name:
                return reg
        raise KeyError(f"model {self.model} has no register for {name!r}")

    @property
    def quantities(self) -> tuple[Quantity, ...]:
        return tuple(r.quantity for r in self.registers)


def _get(table: dict[str, Any], key: str, kind: type, path: str, default: Any = None) -> Any:
    if key not in table:
        if default is None:
            raise ConfigError(f"{path}.{key}", "missing")
        return default
    value = table[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{path}.{key}", f"expected {kind.__name__}, got {value!r}")
    return value


def _enum(enum_cls: Any, value: str, path: str) -> Any:
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_cls)
        raise ConfigError(path, f"{value!r} is not one of {allowed}") from None


def _function(value: int, path: str) -> int:
    if value not in READ_FUNCTIONS:
        raise ConfigError(path, f"function {value} is not 3 (holding) or 4 (input)")
    return value


def _register(raw: Any, i: int, defaults: dict[str, Any], path: str) -> RegisterDef:
    where = f"{path}.register[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(where, "expected a table")
    if unknown := set(raw) - _REG_KEYS:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key")
    name = _get(raw, "quantity", str, where)
    try:
        quantity = by_name(name)
    except KeyError:
        raise ConfigError(f"{where}.quantity", f"unknown quantity {name!r}") from None
    address = _get(raw, "address", int, where)
    if not 0 <= address <= 0xFFFF:
        raise ConfigError(f"{where}.address", f"{address} outside 0..65535")
    scale_text = _get(raw, "scale", str, where, "1")
    try:
        scale = Decimal(scale_text)
    except InvalidOperation:
        raise ConfigError(f"{where}.scale", f"not a decimal number: {scale_text!r}") from None
    if not scale.is_finite() or scale == 0:
        raise ConfigError(f"{where}.scale", f"must be finite and non-zero, got {scale_text!r}")
    dtype = _enum(DataType, _get(raw, "type", str, where, defaults["type"]), f"{where}.type")
    if address + dtype.width > 0x10000:
        raise ConfigError(f"{where}.address", "register runs past 65535")
    return RegisterDef(
        quantity=quantity,
        address=address,
        function=_function(_get(raw, "function", int, where, defaults["function"]), f"{where}.function"),
        dtype=dtype,
        order=_enum(
            WordOrder, _get(raw, "word_order", str, where, defaults["word_order"]), f"{where}.word_order"
        ),
        scale=scale,
    )


def _check_overlaps(regs: list[RegisterDef], path: str) -> None:
    seen: dict[str, int] = {}
    for i, reg in enumerate(regs):
        if reg.quantity.name in seen:
            raise ConfigError(f"{path}.register[{i}].quantity", f"{reg.quantity.name} mapped twice")
        seen[reg.quantity.name] = i
    for i, a in enumerate(regs):
        for j, b in enumerate(regs[:i]):
            if a.function == b.function and a.address < b.end and b.address < a.end:
                raise ConfigError(f"{path}.register[{i}].address", f"overlaps register[{j}]")


def parse_map(data: dict[str, Any], source: str = "map") -> RegisterMap:
    """Validate a decoded TOML document. Raises ``ConfigError`` naming ``source.key``."""
    if unknown := set(data) - _TOP_KEYS:
        raise ConfigError(f"{source}.{sorted(unknown)[0]}", "unknown key")
    model = _get(data, "model", str, source)
    defaults = {
        "function": _function(_get(data, "function", int, source, 3), f"{source}.function"),
        "type": _enum(DataType, _get(data, "type", str, source, "float32"), f"{source}.type").value,
        "word_order": _enum(
            WordOrder, _get(data, "word_order", str, source, "ABCD"), f"{source}.word_order"
        ).value,
    }
    max_gap = _get(data, "max_gap", int, source, 4)
    if not 0 <= max_gap <= 120:
        raise ConfigError(f"{source}.max_gap", f"{max_gap} outside 0..120")
    raw_regs = _get(data, "register", list, source)
    if not raw_regs:
        raise ConfigError(f"{source}.register", "a map needs at least one register")
    regs = [_register(r, i, defaults, source) for i, r in enumerate(raw_regs)]
    _check_overlaps(regs, source)
    return RegisterMap(
        model=model,
        vendor=_get(data, "vendor", str, source, ""),
        description=_get(data, "description", str, source, ""),
        registers=tuple(regs),
        max_gap=max_gap,
    )


def available_models() -> tuple[str, ...]:
    """Names of the packaged maps (the file names without ``.toml``)."""
    folder = resources.files("protocols.modbus") / "maps"
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")))


@functools.cache
def load_map(model: str) -> RegisterMap:
    """Load and validate the packaged map of ``model`` (cached). Raises ``ConfigError``."""
    if model not in available_models():
        raise ConfigError("model", f"no register map for {model!r}; known: {', '.join(available_models())}")
    text = (resources.files("protocols.modbus") / "maps" / f"{model}.toml").read_text("utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(model, f"TOML syntax: {exc}") from None
    regmap = parse_map(data, model)
    if regmap.model != model:
        raise ConfigError(f"{model}.model", f"file says {regmap.model!r}")
    return regmap
