"""Meter metadata registry: rating, tariff, transformer area, account and master-meter flag per meter.

Loaded from a TOML file into numpy arrays indexed by the registry's meter index, so the kernels
can take a meter's parameters by integer index. ``MeterRegistry.load(path)`` reads and validates
the whole file; ``reload()`` re-reads it and swaps in the new arrays only when the new file is
valid (a bad edit leaves the old registry in force and raises). Every problem raises
:class:`protocols.errors.ConfigError` whose ``key_path`` names the bad key
(``meters."M1".phases``). It never logs.

File format (every key shown; ``multiplier``, ``ib_a``, ``register_digits``, ``tariff``, ``area``,
``account``, ``master`` and ``gateway`` are optional)::

    [meters."000012345678"]
    voltage_v = 220          # U_n, phase voltage (VEE-05/16/17); decimals allowed to 0.1 V
    imax_a = 60              # I_max of a 5(60) A meter (VEE-05); to 0.001 A
    ib_a = 5                 # I_b, basic current (VEE-17); default 5
    phases = 1               # 1 or 3
    multiplier = 1           # CT x PT (VEE-01); default 1, at most 1000000 (so no interval
                             # energy or sum of them can overflow int64)
    register_digits = 6      # integer digits of the energy registers (XXXXXX.XX; VEE-02 rollover
                             # point); 4..6, default 6
    tariff = "residential-tou"       # selects [tariff_calendars] in ingest.toml when listed
    area = "TA-0042"         # transformer area (LL-01, OUT-02)
    account = "AC-778"
    master = false           # true for the area's master (check) meter
    gateway = "gw-1"         # the one gateway that reads this meter (see "Binding" below)

    [areas."TA-0042"]        # optional, per transformer area named by some meter's ``area``
    type = "rural"           # selects the LL-02 band [line_loss.area_types.rural] in ingest.toml

Binding: a meter with ``gateway`` belongs to that gateway; ingest refuses (dead-letters) its
readings and events from any other gateway (:meth:`MeterRegistry.foreign`). A meter without
``gateway``, and a meter the registry does not list, is accepted from every gateway: the registry
is optional and a meter often reports before it is enrolled (it then has no rating checks and no
account). Bind every meter to make the check complete. A ``gateway`` must be a valid gateway id
that is not a reserved topic level (:func:`protocols.topics.check_gateway_id`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.errors import ConfigError
from protocols.topics import check_gateway_id

__all__ = ["MeterParams", "MeterRegistry"]

_KEYS = {
    "voltage_v", "imax_a", "ib_a", "phases", "multiplier", "register_digits",
    "tariff", "area", "account", "master", "gateway",
}  # fmt: skip
_REQUIRED = ("voltage_v", "imax_a", "phases")
MAX_MULTIPLIER = 1_000_000  # 110 kV/100 V PT x 2000/5 A CT is 440000; bounds energy x multiplier
_DEFAULT_DIGITS = 6  # XXXXXX.XX, the quantity table's energy register maximum
_PARAMS_CACHE_MAX = 256  # meter tables: one per active gateway is the steady state


@dataclass(frozen=True, slots=True)
class MeterParams:
    """Per-meter parameter columns for one batch's meter-id table (row i = batch meter i).

    Unknown meters get ``known = False``, ``un_dv = imax_ma = 0`` (rating checks skipped),
    ``multiplier = 1``, ``area = -1`` and ``gateway = -1`` (bound to none)."""

    known: npt.NDArray[np.bool_]
    un_dv: npt.NDArray[np.int64]  # rated phase voltage, 0.1 V
    imax_ma: npt.NDArray[np.int64]  # maximum current, mA
    ib_ma: npt.NDArray[np.int64]  # basic current, mA
    phases: npt.NDArray[np.int64]
    multiplier: npt.NDArray[np.int64]
    area: npt.NDArray[np.int32]  # index into MeterRegistry.areas, -1 = none
    master: npt.NDArray[np.bool_]
    # index into MeterRegistry.tariffs, -1 = none (empty: no tariff information at all)
    tariff: npt.NDArray[np.int32] = field(default_factory=lambda: np.empty(0, np.int32))
    # VEE-02: the energy registers' maximum (0.01 kWh) when the meter has fewer integer digits
    # than the quantity table's XXXXXX.XX; 0 = the table's (empty: 0 for every meter)
    energy_regmax: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    # index into MeterRegistry.gateways of the meter's bound gateway, -1 = none (empty: none bound)
    gateway: npt.NDArray[np.int32] = field(default_factory=lambda: np.empty(0, np.int32))


def _fixed(value: Any, scale: int, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(key, f"expected a number, got {value!r}")
    try:
        scaled = Decimal(str(value)) * scale
    except InvalidOperation:
        raise ConfigError(key, f"expected a number, got {value!r}") from None
    if scaled != scaled.to_integral_value() or scaled <= 0:
        raise ConfigError(key, f"expected a positive number with at most {len(str(scale)) - 1} decimals")
    return int(scaled)


def _label(table: dict[str, int], name: str | None) -> int:
    if name is None:
        return -1
    return table.setdefault(name, len(table))


class MeterRegistry:
    """The registry's arrays; see the module docstring for the file format."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._load()

    @classmethod
    def load(cls, path: str | Path) -> MeterRegistry:
        """Read and validate ``path``. Raises: ConfigError naming the bad key."""
        return cls(path)

    def reload(self) -> None:
        """Re-read the file; on error the previous contents stay. Raises: ConfigError."""
        self._load()

    def _load(self) -> None:
        try:
            doc = tomllib.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(str(self.path), f"cannot read registry: {exc}") from exc
        unknown = set(doc) - {"meters", "areas"}
        if unknown:
            raise ConfigError(sorted(unknown)[0], "unknown key")
        area_doc = doc.get("areas", {})
        if not isinstance(area_doc, dict):
            raise ConfigError("areas", "expected a table")
        meters = doc.get("meters", {})
        if not isinstance(meters, dict):
            raise ConfigError("meters", "expected a table")
        names = ("un", "imax", "ib", "ph", "mul", "regmax", "area", "tariff", "account", "master", "gateway")
        cols: dict[str, list[Any]] = {k: [] for k in names}
        labels: dict[str, dict[str, int]] = {"area": {}, "tariff": {}, "account": {}, "gateway": {}}
        for mid, row in meters.items():
            self._row(f'meters."{mid}"', row, cols, labels)
        areas = labels["area"]
        area_types = self._area_types(area_doc, areas)  # last check: nothing is replaced before it
        self.ids: tuple[str, ...] = tuple(meters)
        self.index = {m: i for i, m in enumerate(self.ids)}
        self._params_cache: dict[tuple[str, ...], MeterParams] = {}
        self.un_dv = np.array(cols["un"], dtype=np.int64)
        self.imax_ma = np.array(cols["imax"], dtype=np.int64)
        self.ib_ma = np.array(cols["ib"], dtype=np.int64)
        self.phases = np.array(cols["ph"], dtype=np.int64)
        self.multiplier = np.array(cols["mul"], dtype=np.int64)
        self.energy_regmax = np.array(cols["regmax"], dtype=np.int64)
        self.area = np.array(cols["area"], dtype=np.int32)
        self.tariff = np.array(cols["tariff"], dtype=np.int32)
        self.account = np.array(cols["account"], dtype=np.int32)
        self.master = np.array(cols["master"], dtype=np.bool_)
        self.gateway = np.array(cols["gateway"], dtype=np.int32)
        self.areas = tuple(areas)
        self.tariffs = tuple(labels["tariff"])
        self.accounts = tuple(labels["account"])
        self.gateways = tuple(labels["gateway"])
        self._gateway_index = labels["gateway"]
        self.area_types: tuple[str | None, ...] = area_types

    @staticmethod
    def _area_types(doc: dict[str, Any], areas: dict[str, int]) -> tuple[str | None, ...]:
        """``type`` of each area (``None`` = the default LL-02 band), indexed like ``areas``."""
        types: list[str | None] = [None] * len(areas)
        for name, row in doc.items():
            key = f'areas."{name}"'
            if not isinstance(row, dict):
                raise ConfigError(key, "expected a table")
            for k in row:
                if k != "type":
                    raise ConfigError(f"{key}.{k}", "unknown key")
            if name not in areas:
                raise ConfigError(key, "no meter is in this area (a misspelt name?)")
            t = row.get("type")
            if not isinstance(t, str) or not t:
                raise ConfigError(f"{key}.type", f"expected a non-empty string, got {t!r}")
            types[areas[name]] = t
        return tuple(types)

    @staticmethod
    def _row(key: str, row: Any, cols: dict[str, list[Any]], labels: dict[str, dict[str, int]]) -> None:
        if not isinstance(row, dict):
            raise ConfigError(key, "expected a table")
        for k in row:
            if k not in _KEYS:
                raise ConfigError(f"{key}.{k}", "unknown key")
        for k in _REQUIRED:
            if k not in row:
                raise ConfigError(f"{key}.{k}", "required key missing")
        phases = row["phases"]
        if isinstance(phases, bool) or phases not in (1, 3):
            raise ConfigError(f"{key}.phases", f"expected 1 or 3, got {phases!r}")
        mul = row.get("multiplier", 1)
        if isinstance(mul, bool) or not isinstance(mul, int) or not 1 <= mul <= MAX_MULTIPLIER:
            raise ConfigError(f"{key}.multiplier", f"expected an integer 1..{MAX_MULTIPLIER}, got {mul!r}")
        digits = row.get("register_digits", _DEFAULT_DIGITS)
        if isinstance(digits, bool) or not isinstance(digits, int) or not 4 <= digits <= _DEFAULT_DIGITS:
            raise ConfigError(f"{key}.register_digits", f"expected 4..{_DEFAULT_DIGITS}, got {digits!r}")
        names = {}
        for k in labels:
            v = row.get(k)
            if v is not None and (not isinstance(v, str) or not v):
                raise ConfigError(f"{key}.{k}", f"expected a non-empty string, got {v!r}")
            names[k] = v
        why = None if names["gateway"] is None else check_gateway_id(names["gateway"])
        if why is not None:
            raise ConfigError(f"{key}.gateway", why)
        master = row.get("master", False)
        if not isinstance(master, bool):
            raise ConfigError(f"{key}.master", f"expected true or false, got {master!r}")
        if master and names["area"] is None:
            raise ConfigError(f"{key}.area", "a master meter needs an area")
        cols["un"].append(_fixed(row["voltage_v"], 10, f"{key}.voltage_v"))
        cols["imax"].append(_fixed(row["imax_a"], 1000, f"{key}.imax_a"))
        cols["ib"].append(_fixed(row.get("ib_a", 5), 1000, f"{key}.ib_a"))
        cols["ph"].append(phases)
        cols["mul"].append(mul)
        cols["regmax"].append(0 if digits == _DEFAULT_DIGITS else 10 ** (digits + 2) - 1)  # 0.01 kWh
        for k, table in labels.items():
            cols[k].append(_label(table, names[k]))
        cols["master"].append(master)

    def rows(self, meter_ids: list[str] | tuple[str, ...]) -> npt.NDArray[np.int64]:
        """Registry index of each id; -1 for an id the registry does not know."""
        return np.array([self.index.get(m, -1) for m in meter_ids], dtype=np.int64)

    def params(self, meter_ids: list[str] | tuple[str, ...]) -> MeterParams:
        """Parameter columns for a batch's meter-id table (per meter, not per reading).

        A gateway sends the same meter table batch after batch, so the answer is cached per table
        (at most ``_PARAMS_CACHE_MAX`` tables; emptied by every successful load). The cached
        columns are shared, hence read-only."""
        key = tuple(meter_ids)
        cached = self._params_cache.get(key)
        if cached is None:
            if len(self._params_cache) >= _PARAMS_CACHE_MAX:
                del self._params_cache[next(iter(self._params_cache))]
            cached = self._params_cache[key] = self._params(key)
        return cached

    def _params(self, meter_ids: tuple[str, ...]) -> MeterParams:
        r = self.rows(meter_ids)
        known = r >= 0
        safe = np.where(known, r, 0)

        def take(col: npt.NDArray[Any], missing: int) -> npt.NDArray[Any]:
            if col.shape[0] == 0:
                return np.full(r.shape[0], missing, dtype=col.dtype)
            return np.where(known, col[safe], missing).astype(col.dtype)

        cols = MeterParams(
            known=known,
            un_dv=take(self.un_dv, 0),
            imax_ma=take(self.imax_ma, 0),
            ib_ma=take(self.ib_ma, 0),
            phases=take(self.phases, 1),
            multiplier=take(self.multiplier, 1),
            area=take(self.area, -1),
            master=take(self.master, False),
            tariff=take(self.tariff, -1),
            energy_regmax=take(self.energy_regmax, 0),
            gateway=take(self.gateway, -1),
        )
        for f in fields(cols):
            getattr(cols, f.name).setflags(write=False)
        return cols

    def foreign(self, meters: MeterParams, gateway: str) -> npt.NDArray[np.bool_]:
        """Per row of ``meters`` (``params`` of a meter table): True where the meter is bound to a
        gateway other than ``gateway`` (unbound and unknown meters are never foreign)."""
        own = self._gateway_index.get(gateway, -2)
        bound = meters.gateway if meters.gateway.shape[0] else np.full(meters.known.shape[0], -1, np.int32)
        foreign: npt.NDArray[np.bool_] = (bound >= 0) & (bound != own)
        return foreign

    def bound_gateway(self, meter: str) -> str | None:
        """The gateway ``meter`` is bound to, or None (unbound or unknown)."""
        row = self.index.get(meter)
        g = -1 if row is None else int(self.gateway[row])
        return self.gateways[g] if g >= 0 else None

    def area_sizes(self) -> npt.NDArray[np.int64]:
        """Customer (non-master) meters per area, indexed like :attr:`areas`."""
        customers = (self.area >= 0) & ~self.master
        return np.bincount(self.area[customers], minlength=len(self.areas)).astype(np.int64)
