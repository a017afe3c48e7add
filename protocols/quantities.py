"""The quantity vocabulary: what a reading *is*, independent of how a meter encodes it.

Every reading carries a quantity code (``uint16`` on the wire, stable forever: codes are never
reused or renumbered; retire a quantity by leaving its code unused). Values are fixed-point
integers scaled by the quantity's ``decimals`` -- exactly what the meter's BCD carries (DL/T 645
XXXXXX.XX kWh is 0.01 kWh, XXX.X V is 0.1 V, XXX.XXX A is 0.001 A, XX.XXXX kW is 0.0001 kW).
Money is integer fen (0.01 CNY). Floats appear only at presentation (:func:`to_display`).

``kind`` is one of:

* ``cumulative``: a register that only grows, until it rolls over at ``register_max`` (energy,
  event counters). Ingest computes interval consumption from its deltas.
* ``instantaneous``: a sampled value (voltage, current, power, balance).
* ``state``: a discrete state or a timestamp (relay, status words, meter clock).

The quantity also carries what validation needs to know of it (ingest's kernels read these
through a table built from :data:`QUANTITIES`, never a literal code): :attr:`Quantity.valid_range`
(VEE-16: a value outside is ``OUT_OF_RANGE``), :attr:`Quantity.is_energy` (VEE-02/05 rating
checks) and ``stuck_check`` (VEE-19 applies to it).

``cim`` is the IEC 61968-9 ReadingType (the 18-field dotted code: macroPeriod, aggregate,
measuringPeriod, accumulation, flowDirection, commodity, measurementKind, interharmonic n/d,
argument n/d, TOU, CPP, consumptionTier, phases, multiplier, unit, currency) for MDM and billing
integration, or ``None`` where CIM has no reading type for it (relay state, status words, the
meter's clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ENERGY_FORWARD",
    "ENERGY_REVERSE",
    "QUANTITIES",
    "VALUE_BOUND",
    "Quantity",
    "by_code",
    "by_name",
    "to_display",
]

Kind = Literal["cumulative", "instantaneous", "state"]
_KINDS = ("cumulative", "instantaneous", "state")

# DL/T 645 XXXXXX.XX energy registers hold 8 BCD digits: they roll over to 0 after 999999.99 kWh.
ENERGY_REGISTER_MAX = 99_999_999
# XXXXXX event counters: 6 BCD digits.
COUNTER_REGISTER_MAX = 999_999
# No quantity reaches 10^15 of its units (a meter clock, epoch ms, is 1.7e12): the valid range of a
# quantity without its own bounds, so that every value a rule computes with is bounded.
VALUE_BOUND = 10**15
_ENERGY_UNITS = ("kWh", "kvarh", "kVAh")


@dataclass(frozen=True, slots=True)
class Quantity:
    """One measurable thing. ``code`` is stable forever; ``name`` is the snake_case key used in
    config files, CLI arguments and InfluxDB fields."""

    code: int
    name: str
    unit: str
    decimals: int
    kind: Kind
    description: str
    cim: str | None = None
    signed: bool = False
    register_max: int | None = None  # cumulative only: the value after which the register wraps to 0
    valid_min: int | None = None  # physical range (fixed point); None: see valid_range
    valid_max: int | None = None
    stuck_check: bool = False  # VEE-19: a run of one exact non-zero value is suspect

    def __post_init__(self) -> None:
        if not 0 < self.code < 0x10000:
            raise ValueError(f"quantity {self.name}: code {self.code} outside 1..65535")
        if self.kind not in _KINDS:
            raise ValueError(f"quantity {self.name}: kind {self.kind!r} not one of {_KINDS}")
        if not 0 <= self.decimals <= 6:
            raise ValueError(f"quantity {self.name}: decimals {self.decimals} outside 0..6")
        if (self.register_max is not None) != (self.kind == "cumulative"):
            raise ValueError(f"quantity {self.name}: register_max is required for, and only for, cumulative")
        lo, hi = self.valid_range
        if not -VALUE_BOUND <= lo <= hi <= VALUE_BOUND:
            raise ValueError(f"quantity {self.name}: valid range {lo}..{hi} empty or beyond VALUE_BOUND")

    @property
    def valid_range(self) -> tuple[int, int]:
        """``(lo, hi)``, inclusive: ``valid_min``/``valid_max`` where given, else a register's
        0..register_max (± when signed), else 0 (or -VALUE_BOUND when signed) .. VALUE_BOUND."""
        bound = self.register_max if self.register_max is not None else VALUE_BOUND
        lo = self.valid_min if self.valid_min is not None else (-bound if self.signed else 0)
        hi = self.valid_max if self.valid_max is not None else bound
        return lo, hi

    @property
    def is_energy(self) -> bool:
        """An energy register (kWh, kvarh, kVAh): the meter's rating bounds its deltas (VEE-05)."""
        return self.kind == "cumulative" and self.unit in _ENERGY_UNITS

    @property
    def scale(self) -> int:
        """The integer that one unit is multiplied by: 100 for 0.01 kWh."""
        return int(10**self.decimals)


def _cim(
    accumulation: int,
    flow: int,
    kind: int,
    unit: int,
    *,
    tou: int = 0,
    phases: int = 0,
    multiplier: int = 0,
    currency: int = 0,
) -> str:
    """Build an IEC 61968-9 ReadingType code from the attributes that vary in this vocabulary."""
    fields = (0, 0, 0, accumulation, flow, 1, kind, 0, 0, 0, 0, tou, 0, 0, phases, multiplier, unit, currency)
    return ".".join(str(f) for f in fields)


# IEC 61968-9 enumerations used below (Annex C):
_BULK, _INDICATING = 1, 6  # accumulation: bulkQuantity, indicating (instantaneous)
_FWD, _REV, _NET, _TOTAL = 1, 19, 4, 20  # flowDirection
_Q1, _Q2, _Q3, _Q4 = 15, 16, 17, 18  # flowDirection: reactive quadrants
_ENERGY, _POWER, _VOLTAGE, _CURRENT, _PF, _FREQ, _DEMAND, _MONEY = (
    12,
    37,
    54,
    4,
    38,
    15,
    8,
    0,
)  # measurementKind
_WH, _VARH, _VAH, _W, _VAR, _VA, _V, _A, _HZ, _COS = 72, 73, 71, 38, 63, 61, 29, 5, 33, 65  # unit
_KILO = 3
_PH_A, _PH_B, _PH_C, _PH_ABC, _PH_N = 128, 64, 32, 224, 16
_CNY = 156  # ISO 4217

_TARIFF_NAMES = ("sharp", "peak", "flat", "valley")  # tariffs 1..4 by the usual utility convention


def _build() -> tuple[Quantity, ...]:
    q: list[Quantity] = []
    e = ENERGY_REGISTER_MAX

    def add(*args: object, **kw: object) -> None:
        q.append(Quantity(*args, **kw))  # type: ignore[arg-type]

    # --- energy registers (0.01 kWh / kvarh) -------------------------------------------------
    add(
        1,
        "energy_fwd_active_total",
        "kWh",
        2,
        "cumulative",
        "forward active energy, total",
        _cim(_BULK, _FWD, _ENERGY, _WH, multiplier=_KILO),
        register_max=e,
    )
    for t, tname in enumerate(_TARIFF_NAMES, start=1):
        add(
            1 + t,
            f"energy_fwd_active_t{t}",
            "kWh",
            2,
            "cumulative",
            f"forward active energy, tariff {t} ({tname})",
            _cim(_BULK, _FWD, _ENERGY, _WH, tou=t, multiplier=_KILO),
            register_max=e,
        )
    add(
        6,
        "energy_rev_active_total",
        "kWh",
        2,
        "cumulative",
        "reverse active energy, total",
        _cim(_BULK, _REV, _ENERGY, _WH, multiplier=_KILO),
        register_max=e,
    )
    for t, tname in enumerate(_TARIFF_NAMES, start=1):
        add(
            6 + t,
            f"energy_rev_active_t{t}",
            "kWh",
            2,
            "cumulative",
            f"reverse active energy, tariff {t} ({tname})",
            _cim(_BULK, _REV, _ENERGY, _WH, tou=t, multiplier=_KILO),
            register_max=e,
        )
    # Combined active = forward + reverse (or forward - reverse), by meter setting: it can be negative.
    add(
        11,
        "energy_combined_active_total",
        "kWh",
        2,
        "cumulative",
        "combined active energy, total",
        _cim(_BULK, _NET, _ENERGY, _WH, multiplier=_KILO),
        signed=True,
        register_max=e,
    )
    add(
        12,
        "energy_combined_reactive1_total",
        "kvarh",
        2,
        "cumulative",
        "combined reactive energy 1, total",
        _cim(_BULK, _FWD, _ENERGY, _VARH, multiplier=_KILO),
        signed=True,
        register_max=e,
    )
    add(
        13,
        "energy_combined_reactive2_total",
        "kvarh",
        2,
        "cumulative",
        "combined reactive energy 2, total",
        _cim(_BULK, _REV, _ENERGY, _VARH, multiplier=_KILO),
        signed=True,
        register_max=e,
    )
    for i, flow in enumerate((_Q1, _Q2, _Q3, _Q4), start=1):
        add(
            13 + i,
            f"energy_reactive_q{i}_total",
            "kvarh",
            2,
            "cumulative",
            f"quadrant {i} reactive energy, total",
            _cim(_BULK, flow, _ENERGY, _VARH, multiplier=_KILO),
            register_max=e,
        )
    add(
        18,
        "energy_fwd_apparent_total",
        "kVAh",
        2,
        "cumulative",
        "forward apparent energy, total",
        _cim(_BULK, _FWD, _ENERGY, _VAH, multiplier=_KILO),
        register_max=e,
    )
    for i, (ph, code) in enumerate((("a", _PH_A), ("b", _PH_B), ("c", _PH_C))):
        add(
            19 + i,
            f"energy_fwd_active_{ph}",
            "kWh",
            2,
            "cumulative",
            f"phase {ph.upper()} forward active energy",
            _cim(_BULK, _FWD, _ENERGY, _WH, phases=code, multiplier=_KILO),
            register_max=e,
        )

    # --- instantaneous values ---------------------------------------------------------------
    for i, (ph, code) in enumerate((("a", _PH_A), ("b", _PH_B), ("c", _PH_C))):
        add(
            30 + i,
            f"voltage_{ph}",
            "V",
            1,
            "instantaneous",
            f"phase {ph.upper()} voltage",
            _cim(_INDICATING, 0, _VOLTAGE, _V, phases=code),
            stuck_check=True,
        )
    for i, (ph, code) in enumerate((("a", _PH_A), ("b", _PH_B), ("c", _PH_C), ("n", _PH_N))):
        add(
            33 + i,
            f"current_{ph}",
            "A",
            3,
            "instantaneous",
            f"{'neutral' if ph == 'n' else 'phase ' + ph.upper()} current (sign is the direction)",
            _cim(_INDICATING, 0, _CURRENT, _A, phases=code),
            signed=True,
            stuck_check=True,
        )
    for base, stem, unit, cim_unit, what in (
        (40, "power_active", "kW", _W, "active power"),
        (44, "power_reactive", "kvar", _VAR, "reactive power"),
        (48, "power_apparent", "kVA", _VA, "apparent power"),
    ):
        for i, (ph, code) in enumerate((("total", _PH_ABC), ("a", _PH_A), ("b", _PH_B), ("c", _PH_C))):
            add(
                base + i,
                f"{stem}_{ph}",
                unit,
                4,
                "instantaneous",
                f"{what}, {'total' if ph == 'total' else 'phase ' + ph.upper()}",
                _cim(_INDICATING, 0, _POWER, cim_unit, phases=code, multiplier=_KILO),
                signed=True,
                stuck_check=True,
            )
    for i, (ph, code) in enumerate((("total", _PH_ABC), ("a", _PH_A), ("b", _PH_B), ("c", _PH_C))):
        add(
            52 + i,
            f"power_factor_{ph}",
            "",
            3,
            "instantaneous",
            f"power factor, {'total' if ph == 'total' else 'phase ' + ph.upper()}",
            _cim(_INDICATING, 0, _PF, _COS, phases=code),
            signed=True,
        )
    add(
        56,
        "frequency",
        "Hz",
        2,
        "instantaneous",
        "grid frequency",
        _cim(_INDICATING, 0, _FREQ, _HZ),
        valid_min=4_500,  # 45.00 .. 65.00 Hz
        valid_max=6_500,
    )
    add(
        57,
        "demand_active",
        "kW",
        4,
        "instantaneous",
        "current active demand",
        _cim(_INDICATING, _FWD, _DEMAND, _W, multiplier=_KILO),
        signed=True,
    )
    add(
        58,
        "max_demand_fwd_active",
        "kW",
        4,
        "instantaneous",
        "forward active maximum demand since the last settlement",
        _cim(_BULK, _FWD, _DEMAND, _W, multiplier=_KILO),
    )
    add(
        59,
        "max_demand_rev_active",
        "kW",
        4,
        "instantaneous",
        "reverse active maximum demand since the last settlement",
        _cim(_BULK, _REV, _DEMAND, _W, multiplier=_KILO),
    )
    add(60, "meter_temperature", "°C", 1, "instantaneous", "meter internal temperature", None, signed=True)
    add(
        61,
        "clock_battery_voltage",
        "V",
        2,
        "instantaneous",
        "clock battery voltage",
        _cim(_INDICATING, 0, _VOLTAGE, _V),
    )

    # --- prepaid (money in fen) --------------------------------------------------------------
    add(
        70,
        "prepaid_balance",
        "CNY",
        2,
        "instantaneous",
        "remaining prepaid balance held by the meter",
        _cim(_INDICATING, 0, _MONEY, 0, currency=_CNY),
    )
    add(
        71,
        "overdraft_amount",
        "CNY",
        2,
        "instantaneous",
        "overdraft used, held by the meter",
        _cim(_INDICATING, 0, _MONEY, 0, currency=_CNY),
    )

    # --- event counters ---------------------------------------------------------------------
    c = COUNTER_REGISTER_MAX
    add(80, "power_down_count", "", 0, "cumulative", "power-down events, total", None, register_max=c)
    add(81, "cover_open_count", "", 0, "cumulative", "meter cover opened, total", None, register_max=c)
    add(82, "programming_count", "", 0, "cumulative", "programming operations, total", None, register_max=c)
    add(83, "meter_clear_count", "", 0, "cumulative", "meter cleared, total", None, register_max=c)
    add(84, "time_set_count", "", 0, "cumulative", "clock set operations, total", None, register_max=c)
    add(85, "relay_trip_count", "", 0, "cumulative", "relay trip operations, total", None, register_max=c)
    add(86, "relay_close_count", "", 0, "cumulative", "relay close operations, total", None, register_max=c)

    # --- states -----------------------------------------------------------------------------
    add(
        100,
        "relay_state",
        "",
        0,
        "state",
        "relay state: 0 = closed (supply on), 1 = open (tripped)",
        valid_max=1,
    )
    add(
        101,
        "meter_clock",
        "ms",
        0,
        "state",
        "meter clock as epoch milliseconds (meter-local time as UTC-naive)",
    )
    add(102, "status_word_1", "", 0, "state", "meter run status word 1 (bit field)")
    add(
        103,
        "status_word_3",
        "",
        0,
        "state",
        "meter run status word 3 (bit field; bit 4 relay, bit 6 relay command)",
    )
    return tuple(q)


QUANTITIES: tuple[Quantity, ...] = _build()
_BY_CODE = {q.code: q for q in QUANTITIES}
_BY_NAME = {q.name: q for q in QUANTITIES}
if len(_BY_CODE) != len(QUANTITIES) or len(_BY_NAME) != len(QUANTITIES):
    raise RuntimeError("quantity vocabulary has a duplicate code or name")


def by_code(code: int) -> Quantity:
    """The quantity with this code. Raises ``KeyError`` naming the code when unknown."""
    try:
        return _BY_CODE[code]
    except KeyError:
        raise KeyError(f"unknown quantity code {code}") from None


def by_name(name: str) -> Quantity:
    """The quantity with this name. Raises ``KeyError`` naming the name when unknown."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown quantity {name!r}") from None


# The codes the pipeline and billing single out: forward (import) and reverse (export) active
# energy totals. Name them by these constants, never by a literal code.
ENERGY_FORWARD = by_name("energy_fwd_active_total").code
ENERGY_REVERSE = by_name("energy_rev_active_total").code


def to_display(quantity: Quantity, value: int) -> str:
    """Render a fixed-point value for people: ``to_display(voltage_a, 2201) == "220.1"``.

    Exact decimal formatting from the integer (no float round trip)."""
    if quantity.decimals == 0:
        return str(value)
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value), quantity.scale)
    return f"{sign}{whole}.{frac:0{quantity.decimals}d}"
