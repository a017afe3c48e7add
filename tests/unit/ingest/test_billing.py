"""The billing export's pure parts (``ingest.reports.billing``): one day's rows from ``daily_tou``
sums, per meter and per account, the quality marks, the encoders, argument checks, laziness, and
the meter -> account mappings. The store is a list-returning stand-in at the ``day_sums`` seam;
``tests/integration/test_billing.py`` runs the same export against a real influxd."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest

from ingest.feectl.model import Account, MeterRef
from ingest.feectl.sqlite_store import SqliteLedgerStore
from ingest.model.registry import MeterRegistry
from ingest.reports.billing import (
    FIELDS,
    MAX_DAYS,
    account_table,
    columns,
    export_daily,
    ledger_accounts,
    meter_table,
    quality_marks,
    registry_accounts,
)
from ingest.sinks.base import DaySums
from protocols.errors import ConfigError, ExportError

DAY = dt.date(2026, 12, 1)
DAY_MS = 86_400_000
START_MS = 1_796_054_400_000  # 2026-12-01 00:00 at UTC+8


def sums(total: int, intervals: int = 96, *, estimated: int = 0, invalid: int = 0, mismatch: int = 0,
         rev: int | None = None) -> dict[str, int | None]:  # fmt: skip
    """A daily_tou row's sums; TOU split total = 1 + 2 + 3 + rest."""
    return {"total": total, "sharp": 1, "peak": 2, "flat": 3, "valley": total - 6, "rev_total": rev,
            "intervals": intervals, "estimated": estimated, "invalid": invalid, "tou_mismatch": mismatch}  # fmt: skip


ROWS = [
    DaySums("M1", "gw-a", sums(1000)),
    DaySums("M2", "gw-a", sums(500, 40, estimated=2, rev=30)),
    DaySums("M2", "gw-b", sums(300, 56, invalid=1)),  # moved gateway mid-day: summed into one row
    DaySums("X9", "gw-b", sums(70, 96, mismatch=2)),  # not in the registry
]


def test_meter_rows_sum_gateways_and_give_known_meters_without_data_a_row() -> None:
    t = meter_table(ROWS, DAY, known=["M1", "M2", "M3"], accounts={"M1": "A", "M2": "A", "M3": "B"},
                    bound={"M3": "gw-c"})  # fmt: skip
    assert t.ids == ("M1", "M2", "M3", "X9")
    assert t.gateways == ("gw-a", "gw-a;gw-b", "gw-c", "gw-b")
    assert t.accounts == ("A", "A", "B", "")
    assert t.present.tolist() == [1, 1, 0, 1]
    assert t.col("total").tolist() == [1000, 800, 0, 70]
    assert t.col("valley").tolist() == [994, 788, 0, 64]
    assert t.col("intervals").tolist() == [96, 96, 0, 96]
    assert t.col("rev_total").tolist() == [0, 30, 0, 0] and t.has_rev.tolist() == [False, True, False, False]
    assert t.expected.tolist() == [96] * 4
    assert quality_marks(t) == [("ok",), ("estimated", "invalid"), ("missing",), ("tou_mismatch",)]


def test_only_known_leaves_other_meters_out_and_the_interval_sets_expected() -> None:
    t = meter_table(ROWS, DAY, known=["M1", "M3"], only_known=True, per_day=48)
    assert t.ids == ("M1", "M3") and t.expected.tolist() == [48, 48]
    assert quality_marks(t) == [("ok",), ("missing",)]  # 96 of 48: not incomplete


def test_account_rows_sum_their_meters_and_completeness_is_over_all_of_them() -> None:
    rows = [*ROWS, DaySums("M4", "gw-a", sums(200, 90, estimated=1))]
    mt = meter_table(rows, DAY, known=["M1", "M2", "M3", "M4"],
                     accounts={"M1": "A", "M2": "A", "M3": "B", "M4": "B"})  # fmt: skip
    t = account_table(mt)
    assert t.ids == ("A", "B")  # X9 has no account: in no account row
    assert t.meters.tolist() == [2, 2] and t.present.tolist() == [2, 1]
    assert t.col("total").tolist() == [1800, 200]
    assert t.col("intervals").tolist() == [192, 90] and t.expected.tolist() == [192, 192]
    assert t.has_rev.tolist() == [True, False]
    assert quality_marks(t) == [("estimated", "invalid"), ("missing", "incomplete", "estimated")]


def test_an_incomplete_day_is_marked_and_an_empty_table_has_no_rows() -> None:
    t = meter_table([DaySums("M1", "g", sums(10, 95))], DAY, known=[])
    assert quality_marks(t) == [("incomplete",)]
    empty = meter_table([], DAY, known=[])
    assert empty.ids == () and quality_marks(empty) == [] and account_table(empty).ids == ()


class Source:
    """The ``day_sums`` seam: the same rows for every day, each call recorded."""

    def __init__(self, rows: Sequence[DaySums] = ROWS) -> None:
        self.rows = list(rows)
        self.calls: list[tuple[int, int, tuple[str, ...]]] = []

    async def day_sums(self, start_ms: int, end_ms: int, fields: Sequence[str]) -> list[DaySums]:
        self.calls.append((start_ms, end_ms, tuple(fields)))
        return self.rows


async def collect(src: Source, **kw: object) -> bytes:
    return b"".join([c async for c in export_daily(src, **kw)])  # type: ignore[arg-type]


ACCOUNTS = {"M1": "A", "M2": "A", "M3": "B"}
M_CELLS = {  # meter rows of DAY, as CSV text
    "M1": ["gw-a", "A", "10.00", "0.01", "0.02", "0.03", "9.94", "", "96", "96", "0", "0", "0", "100.00", "ok"],
    "M2": ["gw-a;gw-b", "A", "8.00", "0.02", "0.04", "0.06", "7.88", "0.30", "96", "96", "2", "1", "0", "100.00",
           "estimated;invalid"],
    "M3": ["", "B", "", "", "", "", "", "", "0", "96", "0", "0", "0", "0.00", "missing"],
    "X9": ["gw-b", "", "0.70", "0.01", "0.02", "0.03", "0.64", "", "96", "96", "0", "0", "2", "100.00",
           "tou_mismatch"],
}  # fmt: skip


async def test_csv_per_meter_every_cell_over_two_days_one_query_a_day() -> None:
    src = Source()
    out = await collect(src, start_day=DAY, end_day=DAY + dt.timedelta(days=1), accounts=ACCOUNTS)
    assert out.endswith(b"\r\n")
    header, *rows = list(csv.reader(io.StringIO(out.decode())))
    assert tuple(header) == columns("meter")
    want = [[d, m, *cells] for d in ("2026-12-01", "2026-12-02") for m, cells in M_CELLS.items()]
    assert rows == want
    assert src.calls == [
        (START_MS, START_MS + DAY_MS, FIELDS),
        (START_MS + DAY_MS, START_MS + 2 * DAY_MS, FIELDS),
    ]


async def test_json_and_ndjson_per_account_carry_exact_decimals_and_null_for_absent() -> None:
    kw = {"start_day": DAY, "end_day": DAY, "by": "account", "accounts": ACCOUNTS}
    doc = json.loads(await collect(Source(), fmt="json", **kw), parse_float=Decimal)
    a = {"day": "2026-12-01", "account": "A", "meters": 2, "total_kwh": Decimal("18.00"),
         "sharp_kwh": Decimal("0.03"), "peak_kwh": Decimal("0.06"), "flat_kwh": Decimal("0.09"),
         "valley_kwh": Decimal("17.82"), "rev_total_kwh": Decimal("0.30"), "intervals": 192, "expected": 192,
         "estimated": 2, "invalid": 1, "tou_mismatch": 0, "completeness_pct": Decimal("100.00"),
         "quality": ["estimated", "invalid"]}  # fmt: skip
    b = {"day": "2026-12-01", "account": "B", "meters": 1, "total_kwh": None, "sharp_kwh": None,
         "peak_kwh": None, "flat_kwh": None, "valley_kwh": None, "rev_total_kwh": None, "intervals": 0,
         "expected": 96, "estimated": 0, "invalid": 0, "tou_mismatch": 0, "completeness_pct": Decimal("0.00"),
         "quality": ["missing"]}  # fmt: skip
    assert doc == [a, b]
    nd = (await collect(Source(), fmt="ndjson", **kw)).decode().splitlines()
    assert [json.loads(line, parse_float=Decimal) for line in nd] == [a, b]


async def test_json_of_no_rows_is_an_empty_array() -> None:
    out = await collect(Source([]), start_day=DAY, end_day=DAY, fmt="json")
    assert json.loads(out) == []


async def test_the_export_is_lazy_one_day_read_per_chunk_taken() -> None:
    src = Source()
    end = DAY + dt.timedelta(days=2)
    it = export_daily(src, start_day=DAY, end_day=end, accounts=ACCOUNTS, chunk_rows=3)  # type: ignore[arg-type]
    assert src.calls == []  # nothing read at the call
    assert (await anext(it)).startswith(b"day,meter,")
    assert src.calls == []  # the header needs no query
    first = await anext(it)
    assert len(src.calls) == 1 and first.count(b"\r\n") == 3  # 3 of the day's 4 rows
    assert (await anext(it)).count(b"\r\n") == 1 and len(src.calls) == 1
    await anext(it)
    assert len(src.calls) == 2
    rest = [c async for c in it]
    assert len(src.calls) == 3 and len(rest) == 3


async def test_progress_is_called_after_each_day() -> None:
    seen: list[tuple[int, int]] = []
    await collect(
        Source(), start_day=DAY, end_day=DAY + dt.timedelta(days=2), progress=lambda d, n: seen.append((d, n))
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize(
    ("kw", "key", "words"),
    [
        ({"end_day": DAY - dt.timedelta(days=1)}, "to", "before"),
        ({"end_day": DAY + dt.timedelta(days=MAX_DAYS)}, "to", f"{MAX_DAYS + 1} days"),
        ({"by": "area"}, "by", "'area'"),
        ({"fmt": "xlsx"}, "format", "'xlsx'"),
        ({"by": "account"}, "by", "mapping"),
        ({"interval_s": 7}, "interval_s", "divide"),
        ({"chunk_rows": 0}, "chunk_rows", ">= 1"),
    ],
)
def test_bad_requests_raise_export_error_at_the_call_before_any_read(kw: dict[str, object], key: str,
                                                                      words: str) -> None:  # fmt: skip
    src = Source()
    with pytest.raises(ExportError) as err:
        export_daily(src, **{"start_day": DAY, "end_day": DAY, **kw})  # type: ignore[arg-type]
    assert err.value.key_path == key and words in err.value.reason and isinstance(err.value, ConfigError)
    assert src.calls == []


async def test_the_longest_range_is_accepted() -> None:
    src = Source([])
    out = await collect(src, start_day=DAY, end_day=DAY + dt.timedelta(days=MAX_DAYS - 1), fmt="ndjson")
    assert out == b"" and len(src.calls) == MAX_DAYS


def test_ledger_accounts_read_only_and_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "feectl.sqlite"
    store = SqliteLedgerStore(path)
    store.put_account(Account("AC-1", (MeterRef("M1", "gw-a"), MeterRef("M2", "gw-a")), "t1"))
    store.put_account(Account("AC-2", (MeterRef("M3", "gw-b"),), "t1"))
    store.close()
    assert ledger_accounts(path) == {"M1": "AC-1", "M2": "AC-1", "M3": "AC-2"}
    missing = tmp_path / "nope.sqlite"
    with pytest.raises(ConfigError, match=r"nope\.sqlite"):
        ledger_accounts(missing)
    assert not missing.exists()  # read-only: nothing created
    other = tmp_path / "other.sqlite"
    SqliteLedgerStore(other).close()
    (tmp_path / "empty.sqlite").write_bytes(b"")
    assert ledger_accounts(other) == {}
    with pytest.raises(ConfigError, match="fee-control ledger"):
        ledger_accounts(tmp_path / "empty.sqlite")  # no meters table


def test_registry_accounts_are_the_meters_that_name_one(tmp_path: Path) -> None:
    path = tmp_path / "meters.toml"
    path.write_text(
        '[meters.M1]\nvoltage_v = 220\nimax_a = 60\nphases = 1\naccount = "A"\n'
        "[meters.M2]\nvoltage_v = 220\nimax_a = 60\nphases = 1\n"
        '[meters.M3]\nvoltage_v = 220\nimax_a = 60\nphases = 1\naccount = "B"\n'
    )
    assert registry_accounts(MeterRegistry.load(path)) == {"M1": "A", "M3": "B"}
