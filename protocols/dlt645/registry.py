"""The DL/T 645 data-identifier (DI) registry, as data, and value decoding by DI.

A :class:`DataIdentifier` says how many bytes a DI's value has, its format (see
:mod:`protocols.dlt645.values`), its fixed decimals and sign, and the quantity (names from
:mod:`protocols.quantities`) each of its items maps to. 2007 DIs are 4 bytes (``DI3 DI2 DI1 DI0``),
1997 DIs are 2 bytes; the two numbering spaces do not collide in this table, so one lookup serves both.

Derived DIs: energy (DI3 = 00) and max demand (DI3 = 01) entries of the current period (DI0 = 00)
also answer for DI0 = 01..0C, the previous 1..12 settlement days; the daily-freeze blocks
05060101/05060201 also answer for DI0 = 02..3E, the previous 2..62 freezes. Derived entries map to
no quantity (they are history, not the current register).

Lookups raise ``KeyError`` for an unknown DI or quantity: asking for a DI we do not know is the
caller's mistake, not the meter's. :func:`decode_value` raises ``FrameError`` when the meter's bytes do
not fit the DI. Entries marked ``UNCONFIRMED`` in ``note`` come from a single or secondary source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from protocols.dlt645.values import FORMATS, Value, decode_item, encode_item
from protocols.errors import FrameError
from protocols.quantities import by_name

__all__ = [
    "REGISTRY",
    "DataIdentifier",
    "decode_value",
    "di_for_quantity",
    "di_info",
    "encode_value",
    "quantity_map",
    "relay_state",
    "scale_to_quantity",
]


@dataclass(frozen=True, slots=True)
class DataIdentifier:
    """One DI: ``length`` value bytes (after the DI echo) holding ``count`` items of ``fmt``.

    ``quantities`` has one quantity name (or ``None``) per item, or is empty. ``variable_count`` blocks
    (a DI byte of FF, daily-freeze blocks) accept any whole number of items, since meters send as many
    tariffs as they have.
    """

    di: int
    name: str
    length: int
    fmt: str
    decimals: int = 0
    signed: bool = False
    quantities: tuple[str | None, ...] = ()
    edition: int = 2007
    count: int = 1
    variable_count: bool = False
    unit: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.edition not in (1997, 2007):
            raise ValueError(f"DataIdentifier.edition: {self.edition} for {self.name}")
        if not 0 <= self.di < (1 << (32 if self.edition == 2007 else 16)):
            raise ValueError(f"DataIdentifier.di: {self.di:X} too wide for {self.edition}")
        if self.fmt not in FORMATS:
            raise ValueError(f"DataIdentifier.fmt: {self.fmt!r} for {self.name}")
        if self.count < 1 or self.length % self.count:
            raise ValueError(f"DataIdentifier.length: {self.length} not {self.count} equal items")
        if self.quantities and len(self.quantities) != self.count:
            raise ValueError(f"DataIdentifier.quantities: {len(self.quantities)} names for {self.count}")
        for q in self.quantities:
            if q is not None:
                by_name(q)  # KeyError for a name the vocabulary lacks

    @property
    def item_length(self) -> int:
        return self.length // self.count

    @property
    def quantity(self) -> str | None:
        """The quantity of a single-item DI (``None`` for blocks and unmapped DIs)."""
        return self.quantities[0] if self.count == 1 and self.quantities else None

    @property
    def di_bytes(self) -> int:
        """Width of the DI on the wire: 4 (2007) or 2 (1997)."""
        return 4 if self.edition == 2007 else 2


# ---------------------------------------------------------------------------------------------
# The table. Formats and lengths: reference §4.2 (2007) and the 1997 table; sources are cited there.


def _energy() -> Iterable[DataIdentifier]:
    # DI2 = quantity, DI1 = tariff (00 total, 01..04, FF block), DI0 = 00 current period (§4).
    kinds = (
        (0x00, "combined_active", True, "energy_combined_active_total", None, "kWh"),
        (0x01, "fwd_active", False, "energy_fwd_active_total", "energy_fwd_active_t", "kWh"),
        (0x02, "rev_active", False, "energy_rev_active_total", "energy_rev_active_t", "kWh"),
        (0x03, "combined_reactive1", True, "energy_combined_reactive1_total", None, "kvarh"),
        (0x04, "combined_reactive2", True, "energy_combined_reactive2_total", None, "kvarh"),
        (0x05, "reactive_q1", False, "energy_reactive_q1_total", None, "kvarh"),
        (0x06, "reactive_q2", False, "energy_reactive_q2_total", None, "kvarh"),
        (0x07, "reactive_q3", False, "energy_reactive_q3_total", None, "kvarh"),
        (0x08, "reactive_q4", False, "energy_reactive_q4_total", None, "kvarh"),
        (0x09, "fwd_apparent", False, "energy_fwd_apparent_total", None, "kVAh"),
        (0x0A, "rev_apparent", False, None, None, "kVAh"),
    )
    for di2, stem, signed, total, tariff, unit in kinds:
        base = di2 << 16
        yield DataIdentifier(base, f"energy_{stem}_total", 4, "bcd", 2, signed, (total,), unit=unit)
        tariffs = tuple(f"{tariff}{t}" if tariff else None for t in range(1, 5))
        if di2 <= 0x02:  # tariff registers and the block for the three registers the drivers read
            for t in range(1, 5):
                yield DataIdentifier(
                    base | t << 8, f"energy_{stem}_t{t}", 4, "bcd", 2, signed, (tariffs[t - 1],), unit=unit
                )
            yield DataIdentifier(
                base | 0xFF00, f"energy_{stem}_block", 20, "bcd", 2, signed, (total, *tariffs),
                count=5, variable_count=True, unit=unit, note="total then tariffs 1..k",
            )  # fmt: skip
    for di2, ph in ((0x15, "a"), (0x29, "b"), (0x3D, "c")):
        yield DataIdentifier(di2 << 16, f"energy_fwd_active_{ph}", 4, "bcd", 2, False,
                             (f"energy_fwd_active_{ph}",), unit="kWh")  # fmt: skip


def _demand() -> Iterable[DataIdentifier]:
    # XX.XXXX kW + YYMMDDhhmm, wire order mm hh DD MM YY (§4.2, I-libdlt645 dlt645Demand_s).
    yield DataIdentifier(0x01010000, "max_demand_fwd_active", 8, "demand", 4, False,
                         ("max_demand_fwd_active",), unit="kW")  # fmt: skip
    yield DataIdentifier(0x01020000, "max_demand_rev_active", 8, "demand", 4, False,
                         ("max_demand_rev_active",), unit="kW")  # fmt: skip


def _variables() -> Iterable[DataIdentifier]:
    phases = ("a", "b", "c")
    for i, ph in enumerate(phases, 1):
        yield DataIdentifier(0x02010000 | i << 8, f"voltage_{ph}", 2, "bcd", 1, False, (f"voltage_{ph}",),
                             unit="V")  # fmt: skip
    volts = tuple(f"voltage_{p}" for p in phases)
    yield DataIdentifier(0x0201FF00, "voltage_block", 6, "bcd", 1, False, volts, count=3, variable_count=True,
                         unit="V")  # fmt: skip
    for i, ph in enumerate(phases, 1):
        yield DataIdentifier(0x02020000 | i << 8, f"current_{ph}", 3, "bcd", 3, True, (f"current_{ph}",),
                             unit="A")  # fmt: skip
    amps = tuple(f"current_{p}" for p in phases)
    yield DataIdentifier(0x0202FF00, "current_block", 9, "bcd", 3, True, amps, count=3, variable_count=True,
                         unit="A")  # fmt: skip
    # Power: ±XX.XXXX, 3 bytes; DI1 00 total, 01..03 phase A..C (§4.2).
    for di2, stem, unit in ((0x03, "power_active", "kW"), (0x04, "power_reactive", "kvar"),
                            (0x05, "power_apparent", "kVA")):  # fmt: skip
        names = tuple(f"{stem}_{p}" for p in ("total", *phases))
        for i, q in enumerate(names):
            yield DataIdentifier(0x02000000 | di2 << 16 | i << 8, q, 3, "bcd", 4, True, (q,), unit=unit)
        yield DataIdentifier(0x0200FF00 | di2 << 16, f"{stem}_block", 12, "bcd", 4, True, names, count=4,
                             variable_count=True, unit=unit)  # fmt: skip
    for i, p in enumerate(("total", *phases)):
        yield DataIdentifier(0x02060000 | i << 8, f"power_factor_{p}", 2, "bcd", 3, True,
                             (f"power_factor_{p}",))  # fmt: skip
    for i, ph in enumerate(phases, 1):
        yield DataIdentifier(0x02070000 | i << 8, f"phase_angle_{ph}", 2, "bcd", 1, False, (None,), unit="°")
    yield DataIdentifier(0x02800001, "current_n", 3, "bcd", 3, True, ("current_n",), unit="A")
    yield DataIdentifier(0x02800002, "frequency", 2, "bcd", 2, False, ("frequency",), unit="Hz")
    yield DataIdentifier(0x02800004, "demand_active", 3, "bcd", 4, True, ("demand_active",), unit="kW")
    yield DataIdentifier(0x02800007, "meter_temperature", 2, "bcd", 1, True, ("meter_temperature",),
                         unit="°C")  # fmt: skip
    yield DataIdentifier(0x02800008, "clock_battery_voltage", 2, "bcd", 2, False, ("clock_battery_voltage",),
                         unit="V")  # fmt: skip
    yield DataIdentifier(0x0280000A, "battery_working_time", 4, "bcd", 0, False, (None,), unit="min",
                         note="UNCONFIRMED unit")  # fmt: skip


def _events() -> Iterable[DataIdentifier]:
    counters = (
        (0x03110000, "power_down_count", "power_down_count", ""),
        (0x03300000, "programming_count", "programming_count", ""),
        (0x03300100, "meter_clear_count", "meter_clear_count", ""),
        (0x03300200, "demand_clear_count", None, ""),
        (0x03300400, "time_set_count", "time_set_count", ""),
        (0x03300D00, "cover_open_count", "cover_open_count", ""),
        # Relay trip (拉闸) / close (合闸) event records, DI3 = 1D / 1E: no public source confirms them.
        (0x1D000001, "relay_trip_count", "relay_trip_count", "UNCONFIRMED DI (reference §4.3)"),
        (0x1E000001, "relay_close_count", "relay_close_count", "UNCONFIRMED DI (reference §4.3)"),
    )
    for di, name, q, note in counters:
        yield DataIdentifier(di, name, 3, "bcd", 0, False, (q,), note=note)
    yield DataIdentifier(0x03110001, "power_down_record_1", 12, "second", count=2,
                         note="start, end of the last power-down")  # fmt: skip
    yield DataIdentifier(0x03010000, "voltage_loss_abc", 18, "bcd", count=6,
                         note="(count, minutes) for phases A, B, C")  # fmt: skip


def _parameters() -> Iterable[DataIdentifier]:
    yield DataIdentifier(0x04000101, "date", 4, "date", note="YYMMDDWW, 0 = Sunday")
    yield DataIdentifier(0x04000102, "time", 3, "time")
    yield DataIdentifier(0x04000401, "comm_address", 6, "digits")
    yield DataIdentifier(0x04000402, "meter_number", 6, "digits")
    yield DataIdentifier(0x04000403, "asset_code", 32, "ascii", note="byte order UNCONFIRMED")
    yield DataIdentifier(0x04000409, "active_meter_constant", 3, "bcd", unit="imp/kWh")
    for n in range(1, 8):
        q = {1: "status_word_1", 3: "status_word_3"}.get(n)
        yield DataIdentifier(0x04000500 | n, f"status_word_{n}", 2, "bits", quantities=(q,))
    yield DataIdentifier(0x04000703, "baud_word_port1", 1, "bits")
    yield DataIdentifier(0x04000B01, "settlement_day_1", 2, "ddhh")
    # Prepaid registers of the 2007 amendment (剩余金额 / 透支金额, XXXXXX.XX yuan): not in the
    # reference's sources, hence UNCONFIRMED; only prepaid meters carry them.
    yield DataIdentifier(0x00900200, "prepaid_balance", 4, "bcd", 2, False, ("prepaid_balance",),
                         unit="CNY", note="UNCONFIRMED DI")  # fmt: skip
    yield DataIdentifier(0x00900201, "overdraft_amount", 4, "bcd", 2, False, ("overdraft_amount",),
                         unit="CNY", note="UNCONFIRMED DI")  # fmt: skip


def _freeze() -> Iterable[DataIdentifier]:
    yield DataIdentifier(0x05060001, "daily_freeze_time_1", 5, "minute")
    for di, stem in ((0x05060101, "fwd_active"), (0x05060201, "rev_active")):
        yield DataIdentifier(di, f"daily_freeze_{stem}_1", 20, "bcd", 2, False, (), count=5,
                             variable_count=True, unit="kWh",
                             note="total then tariffs 1..k; block reading UNCONFIRMED")  # fmt: skip


def _edition_1997() -> Iterable[DataIdentifier]:
    # 1997 formats: energy XXXXXX.XX, voltage XXX, current XX.XX, power XX.XXXX; sign UNCONFIRMED,
    # decoded as unsigned (reference §4.1, §8).
    e = 1997
    yield DataIdentifier(0x9010, "energy_fwd_active_total", 4, "bcd", 2, False, ("energy_fwd_active_total",),
                         e, unit="kWh")  # fmt: skip
    for t in range(1, 5):
        q = f"energy_fwd_active_t{t}"
        yield DataIdentifier(0x9010 + t, q, 4, "bcd", 2, False, (q,), e, unit="kWh")
    yield DataIdentifier(0x901F, "energy_fwd_active_block", 20, "bcd", 2, False,
                         ("energy_fwd_active_total", *(f"energy_fwd_active_t{t}" for t in range(1, 5))), e,
                         count=5, variable_count=True, unit="kWh")  # fmt: skip
    yield DataIdentifier(0x9020, "energy_rev_active_total", 4, "bcd", 2, False, ("energy_rev_active_total",),
                         e, unit="kWh")  # fmt: skip
    yield DataIdentifier(0x9110, "energy_fwd_reactive_total", 4, "bcd", 2, False, (None,), e, unit="kvarh")
    for i, ph in enumerate("abc", 1):
        yield DataIdentifier(0xB610 + i, f"voltage_{ph}", 2, "bcd", 0, False, (f"voltage_{ph}",), e, unit="V")
        yield DataIdentifier(0xB620 + i, f"current_{ph}", 2, "bcd", 2, False, (f"current_{ph}",), e, unit="A")
    for i, p in enumerate(("total", "a", "b", "c")):
        q = f"power_active_{p}"
        yield DataIdentifier(0xB630 + i, q, 3, "bcd", 4, False, (q,), e, unit="kW")
    yield DataIdentifier(0xC010, "date", 4, "date", edition=e)
    yield DataIdentifier(0xC011, "time", 3, "time", edition=e)
    yield DataIdentifier(0xC032, "meter_number", 6, "digits", edition=e)


def _build() -> dict[int, DataIdentifier]:
    table: dict[int, DataIdentifier] = {}
    for group in (_energy, _demand, _variables, _events, _parameters, _freeze, _edition_1997):
        for entry in group():
            if entry.di in table:
                raise RuntimeError(f"duplicate DI {entry.di:08X}")
            table[entry.di] = entry
    return table


#: Every registered DI, keyed by its number.
REGISTRY: Final[dict[int, DataIdentifier]] = _build()

_PREFERRED: Final[dict[tuple[str, int], DataIdentifier]] = {}
for _entry in REGISTRY.values():
    if _entry.quantity is not None:
        _PREFERRED.setdefault((_entry.quantity, _entry.edition), _entry)
# relay_state comes from status word 3, bit 4 (§4.3): read 04000503 and apply relay_state().
_PREFERRED[("relay_state", 2007)] = REGISTRY[0x04000503]


def _derived(di: int) -> DataIdentifier | None:
    di3, di0 = di >> 24, di & 0xFF
    if di3 in (0x00, 0x01) and 1 <= di0 <= 0x0C and (di >> 16) & 0xFF != 0x90:  # 0090xxxx: prepaid
        base = REGISTRY.get(di & ~0xFF)
        suffix = f"_prev{di0}"
    elif di >> 8 in (0x050601, 0x050602) and 2 <= di0 <= 0x3E:
        base = REGISTRY.get(di & ~0xFF | 0x01)
        suffix = f"_{di0}"
    else:
        return None
    if base is None or base.edition != 2007:
        return None
    return dataclasses.replace(base, di=di, name=base.name.removesuffix("_1") + suffix,
                               quantities=(None,) * base.count if base.quantities else ())  # fmt: skip


def di_info(di: int) -> DataIdentifier:
    """The registry entry for ``di`` (2007 or 1997), including derived history DIs.

    Raises:
        KeyError: the DI is not in the registry.
    """
    entry = REGISTRY.get(di) or _derived(di)
    if entry is None:
        raise KeyError(f"unknown data identifier {di:08X}")
    return entry


def di_for_quantity(name: str, edition: int = 2007) -> DataIdentifier:
    """The DI a driver reads for one quantity (the current-period, single-item DI).

    ``relay_state`` maps to status word 3 (04000503): decode it, then apply :func:`relay_state`.
    ``meter_clock`` has no single DI: read 04000101 (date) and 04000102 (time).

    Raises:
        KeyError: no DI of that edition carries the quantity.
    """
    try:
        return _PREFERRED[(name, edition)]
    except KeyError:
        raise KeyError(f"no DL/T 645-{edition} data identifier for quantity {name!r}") from None


def quantity_map(edition: int = 2007) -> dict[str, DataIdentifier]:
    """Every quantity name a DI of ``edition`` maps to, with that DI (see :func:`di_for_quantity`)."""
    return {q: entry for (q, ed), entry in _PREFERRED.items() if ed == edition}


def relay_state(status_word_3: int) -> int:
    """Relay state from status word 3: bit 4, 0 = closed (supply on), 1 = open (tripped) (§4.3)."""
    return (status_word_3 >> 4) & 1


def scale_to_quantity(info: DataIdentifier, value: int) -> int:
    """Rescale a fixed-point value from the DI's decimals to its quantity's decimals.

    1997 voltage ``XXX`` (whole volts) becomes 0.1 V, as ``voltage_a`` is stored.

    Raises:
        KeyError: the DI maps to no quantity.
        ValueError: the quantity has fewer decimals than the DI and the value is not a whole multiple.
    """
    if info.quantity is None:
        raise KeyError(f"DI {info.di:08X} maps to no single quantity")
    shift: int = by_name(info.quantity).decimals - info.decimals
    if shift >= 0:
        return value * int(10**shift)
    whole, rest = divmod(value, int(10**-shift))
    if rest:
        raise ValueError(f"{value} loses digits when scaled to {info.quantity}")
    return whole


def _items(info: DataIdentifier, nbytes: int) -> int:
    size = info.item_length
    if info.variable_count:
        if nbytes == 0 or nbytes % size:
            return -1
        return nbytes // size
    return info.count if nbytes == info.length else -1


def decode_value(di: int, raw: bytes) -> Value:
    """Decode the value bytes of ``di`` (after the DI echo, 0x33 removed, wire order).

    Returns the fixed-point ``int`` for single BCD items; a ``tuple`` for blocks and records; the
    types listed in :mod:`protocols.dlt645.values` for dates, times and max demand.

    Raises:
        KeyError: unknown DI.
        FrameError: wrong length for the DI, or bytes invalid for its format.
    """
    info = di_info(di)
    n = _items(info, len(raw))
    if n < 0:
        raise FrameError(f"DI {di:08X} ({info.name}): {len(raw)} value bytes, expected {info.length}", raw)
    if info.count == 1:
        return decode_item(info.fmt, raw, signed=info.signed)
    size = info.item_length
    return tuple(decode_item(info.fmt, raw[i * size : (i + 1) * size], signed=info.signed) for i in range(n))


def encode_value(di: int, value: Value) -> bytes:
    """The value bytes of ``di`` (before the +0x33 offset), for a meter simulator's reply.

    Raises:
        KeyError: unknown DI.
        ValueError: ``value`` does not fit the DI (type, range, item count).
    """
    info = di_info(di)
    if info.count == 1:
        return encode_item(info.fmt, value, info.length, signed=info.signed)
    if not isinstance(value, tuple) or not value:
        raise ValueError(f"DI {di:08X} ({info.name}) takes a tuple of {info.count} items, got {value!r}")
    if len(value) != info.count and not info.variable_count:
        raise ValueError(f"DI {di:08X} ({info.name}) takes {info.count} items, got {len(value)}")
    return b"".join(encode_item(info.fmt, v, info.item_length, signed=info.signed) for v in value)
