"""The DI registry as data, value formats, and decode(encode(x)) == x for every DI (hypothesis)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.dlt645 import (
    REGISTRY,
    DataIdentifier,
    MaxDemand,
    MeterDate,
    Value,
    decode_value,
    di_for_quantity,
    di_info,
    encode_value,
    quantity_map,
    relay_state,
    scale_to_quantity,
)
from protocols.errors import FrameError
from protocols.quantities import by_name


def test_registry_size_and_coverage() -> None:
    assert len(REGISTRY) >= 60
    names = {q for e in REGISTRY.values() for q in e.quantities if q}
    for needed in (
        "energy_fwd_active_total", "energy_fwd_active_t1", "energy_fwd_active_t4", "energy_rev_active_total",
        "energy_combined_active_total", "energy_reactive_q1_total", "energy_fwd_active_a", "voltage_c",
        "current_a", "current_n", "power_active_total", "power_reactive_b", "power_apparent_c",
        "power_factor_total", "frequency", "max_demand_fwd_active", "prepaid_balance", "overdraft_amount",
        "power_down_count", "cover_open_count", "relay_trip_count", "status_word_3",
    ):  # fmt: skip
        assert needed in names, needed
    assert {e.edition for e in REGISTRY.values()} == {1997, 2007}


def test_every_quantity_in_the_map_exists_and_units_agree() -> None:
    for edition in (1997, 2007):
        for name, entry in quantity_map(edition).items():
            q = by_name(name)
            assert entry.edition == edition
            if entry.fmt == "bcd" and entry.edition == 2007:
                assert entry.decimals == q.decimals, name  # 2007 digits are the quantity's scale


def test_di_for_quantity() -> None:
    assert di_for_quantity("energy_fwd_active_total").di == 0x00010000
    assert di_for_quantity("energy_fwd_active_total", 1997).di == 0x9010
    assert di_for_quantity("voltage_a", 1997).di == 0xB611
    assert di_for_quantity("relay_state").di == 0x04000503
    with pytest.raises(KeyError):
        di_for_quantity("meter_clock")
    with pytest.raises(KeyError):
        di_info(0x12345678)


def test_derived_history_dis() -> None:
    prev = di_info(0x00010001)
    assert (prev.length, prev.quantity, prev.name) == (4, None, "energy_fwd_active_total_prev1")
    assert di_info(0x0506013E).count == 5
    assert di_info(0x0101000C).fmt == "demand"
    with pytest.raises(KeyError):
        di_info(0x0001000D)


def test_scaling_and_relay_state() -> None:
    assert scale_to_quantity(di_info(0xB611), 220) == 2200  # 1997 whole volts -> 0.1 V
    assert scale_to_quantity(di_info(0xB621), 150) == 1500  # 1997 0.01 A -> 0.001 A
    assert relay_state(0x0010) == 1 and relay_state(0x0040) == 0


@pytest.mark.parametrize(
    ("di", "raw", "value"),
    [
        (0x02030000, bytes.fromhex("12 25 80"), -2512),  # V40: -0.2512 kW
        (0x02060000, bytes.fromhex("00 81"), -100),  # -0.100
        (0x04000101, bytes.fromhex("03 15 08 24"), MeterDate(2024, 8, 15, 3)),
        (0x04000102, bytes.fromhex("51 22 10"), dt.time(10, 22, 51)),
        (0x01010000, bytes.fromhex("00 50 01") + bytes.fromhex("00 12 01 01 23"),
         MaxDemand(15000, dt.datetime(2023, 1, 1, 12, 0))),
        (0x01010000, bytes(8), MaxDemand(0, None)),
        (0x04000402, bytes.fromhex("02 01 00 00 00 00"), "000000000102"),
        (0x04000503, bytes.fromhex("10 00"), 0x10),
        (0x03010000, bytes.fromhex("01 00 00 30 00 00") * 3, (1, 30, 1, 30, 1, 30)),
        (0x0001FF00, bytes.fromhex("00 01 00 00") * 3, (100, 100, 100)),  # a meter with 2 tariffs
    ],
)  # fmt: skip
def test_known_values(di: int, raw: bytes, value: Value) -> None:
    assert decode_value(di, raw) == value
    assert encode_value(di, value) == raw or value == MaxDemand(0, None)


@pytest.mark.parametrize(
    ("di", "raw"),
    [
        (0x00010000, bytes(3)),
        (0x00010000, bytes.fromhex("0A 00 00 00")),
        (0x02010100, bytes.fromhex("00 A0")),  # nibble A is not BCD
        (0x04000101, bytes.fromhex("00 01 13 24")),  # month 13
        (0x04000102, bytes.fromhex("60 00 00")),
        (0x0201FF00, bytes(5)),
        (0x04000403, b"\xff" * 32),
    ],
)
def test_bad_value_bytes_raise_frame_error(di: int, raw: bytes) -> None:
    with pytest.raises(FrameError):
        decode_value(di, raw)


@pytest.mark.parametrize(
    "bad", [(0x00010000, -1), (0x00010000, 10**8), (0x02020100, 800000), (0x0201FF00, 5)]
)
def test_encode_rejects_values_out_of_range(bad: tuple[int, Value]) -> None:
    with pytest.raises(ValueError):
        encode_value(*bad)


_DATETIMES = st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2099, 12, 31, 23, 59, 59))


def _item(entry: DataIdentifier) -> st.SearchStrategy[Value]:
    n = entry.item_length
    if entry.fmt == "bcd":
        top = 8 * 10 ** (2 * n - 1) - 1 if entry.signed else 10 ** (2 * n) - 1
        edges = st.sampled_from([0, top, -top if entry.signed else 1, 1])
        return st.one_of(edges, st.integers(-top if entry.signed else 0, top))
    if entry.fmt == "bits":
        return st.integers(0, (1 << (8 * n)) - 1)
    if entry.fmt == "second":
        return st.one_of(st.none(), _DATETIMES.map(lambda d: d.replace(microsecond=0)))
    if entry.fmt == "minute":
        return st.one_of(st.none(), _DATETIMES.map(lambda d: d.replace(second=0, microsecond=0)))
    if entry.fmt == "demand":
        minute = _DATETIMES.map(lambda d: d.replace(second=0, microsecond=0))
        return st.builds(MaxDemand, st.integers(0, 999999), st.one_of(st.none(), minute))
    if entry.fmt == "date":
        return st.dates(dt.date(2000, 1, 1), dt.date(2099, 12, 31)).map(MeterDate.from_date)
    if entry.fmt == "time":
        return st.times().map(lambda t: t.replace(microsecond=0))
    if entry.fmt == "ddhh":
        return st.tuples(st.integers(1, 28), st.integers(0, 23))
    if entry.fmt == "digits":
        return st.text("0123456789", min_size=2 * n, max_size=2 * n)
    assert entry.fmt == "ascii"
    return st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=n)


@st.composite
def _di_and_value(draw: st.DrawFn) -> tuple[int, Value]:
    entry = draw(st.sampled_from(sorted(REGISTRY.values(), key=lambda e: e.di)))
    item = _item(entry)
    if entry.count == 1:
        return entry.di, draw(item)
    k = draw(st.integers(1, entry.count + 2)) if entry.variable_count else entry.count
    return entry.di, tuple(draw(item) for _ in range(k))


@settings(max_examples=1500, deadline=None)
@given(_di_and_value())
def test_round_trip_every_di(case: tuple[int, Value]) -> None:
    di, value = case
    raw = encode_value(di, value)
    assert decode_value(di, raw) == value


@pytest.mark.parametrize("entry", sorted(REGISTRY.values(), key=lambda e: e.di), ids=lambda e: f"{e.di:08X}")
def test_round_trip_extremes_of_each_di(entry: DataIdentifier) -> None:
    if entry.fmt != "bcd":
        return
    top = 8 * 10 ** (2 * entry.item_length - 1) - 1 if entry.signed else 10 ** (2 * entry.item_length) - 1
    for v in (0, top, -top) if entry.signed else (0, top):
        value: Value = v if entry.count == 1 else (v,) * entry.count
        assert decode_value(entry.di, encode_value(entry.di, value)) == value
