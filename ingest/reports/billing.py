"""Billing export: validated daily and time-of-use totals per meter or per account, streamed.

Contract
--------
* :func:`export_daily` checks its arguments when called (:class:`~protocols.errors.ExportError`
  naming the argument: a range ending before it starts or longer than :data:`MAX_DAYS` days, an
  unknown ``by`` or ``fmt``, ``by="account"`` without a mapping) and returns an async iterator of
  encoded chunks (``bytes``): CSV (header once), a JSON array written incrementally, or NDJSON.
  It reads one local day at a time (:meth:`~ingest.sinks.base.Sink.day_sums`: one query per day,
  nothing read before the consumer asks for the day's chunk), and cuts a day into chunks of at
  most ``chunk_rows`` rows, so memory holds one day's rows whatever the range.
* The rows are the workers' ``daily_tou`` rollups (billable energy only, the calendar's TOU
  split; ``docs/ingest.md``, *InfluxDB schema*). A meter-day stored under several gateways is
  summed into one row. Every meter the caller knows (the registry's, the mapping's, or exactly
  ``meters``) gets a row on every day of the range: a day without a stored row is marked
  ``missing``, so billing sees the gap.
* :func:`meter_table`, :func:`account_table`, :func:`quality_marks` and the encoders are pure
  functions of one day's columns. Data problems are marks, never exceptions.
* It never writes, and never reads the clock. ``docs/billing.md`` has the columns, the marks and
  an example.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import io
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from ingest.pipeline.rollup import DAY_MS
from ingest.reports.daily import day_window
from ingest.rules import stages as st
from ingest.sinks.base import DaySums
from protocols.errors import ConfigError, ExportError

if TYPE_CHECKING:
    from ingest.config import IngestConfig
    from ingest.model.registry import MeterRegistry

__all__ = [
    "BY",
    "FIELDS",
    "FORMATS",
    "MARKS",
    "MAX_DAYS",
    "DaySumsSource",
    "DayTable",
    "account_table",
    "billing_export",
    "columns",
    "export_daily",
    "ledger_accounts",
    "meter_table",
    "quality_marks",
    "registry_accounts",
]

I64 = npt.NDArray[np.int64]
MAX_DAYS = 366
FIRST_DAY, LAST_DAY = dt.date(2000, 1, 1), dt.date(2099, 12, 31)  # what readings' times can be
"""The longest range one export covers, in days (both ends included)."""
BY = ("meter", "account")
FORMATS = {"csv": "text/csv; charset=utf-8", "json": "application/json", "ndjson": "application/x-ndjson"}
"""Export format -> its media type (for an HTTP answer)."""
FIELDS = (
    "total", "sharp", "peak", "flat", "valley", "rev_total",
    "intervals", "estimated", "invalid", "tou_mismatch",
)  # fmt: skip
"""The ``daily_tou`` fields summed per meter-day (energies in 0.01 kWh, then counts)."""
_ENERGY = 6  # FIELDS[:6] are energies (0.01 kWh), the rest counts
_F = {f: i for i, f in enumerate(FIELDS)}
MARKS = ("missing", "incomplete", "estimated", "invalid", "tou_mismatch")
"""Quality marks in the order a row lists them; a row with none is ``ok``."""
_COUNTS = ("intervals", "expected", "estimated", "invalid", "tou_mismatch", "completeness_pct", "quality")
_KWH = tuple(f"{f}_kwh" for f in FIELDS[:_ENERGY])


def columns(by: str) -> tuple[str, ...]:
    """The columns of an export grouped ``by`` (``meter`` or ``account``), in order."""
    ids = ("meter", "gateway", "account") if by == "meter" else ("account", "meters")
    return ("day", *ids, *_KWH, *_COUNTS)


class DaySumsSource(Protocol):
    """What the export reads: :meth:`~ingest.sinks.base.Sink.day_sums` (``InfluxSink`` has it)."""

    async def day_sums(self, start_ms: int, end_ms: int, fields: Sequence[str]) -> list[DaySums]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class DayTable:
    """One local day's export rows as columns; row r is meter or account ``ids[r]``.

    ``gateways[r]``: the gateways its rows were stored under (``;``-joined; a missing meter's bound
    gateway, else ""), ``accounts[r]``: its account ("" none); ``meters[r]``: meters in the row (1
    for a meter row), ``present[r]``: those with a stored row that day; ``values``: rows x
    :data:`FIELDS` sums; ``has_rev[r]``: some row carried ``rev_total``."""

    day: dt.date
    ids: tuple[str, ...]
    gateways: tuple[str, ...]
    accounts: tuple[str, ...]
    meters: I64
    present: I64
    values: I64
    has_rev: npt.NDArray[np.bool_]
    per_day: int

    def col(self, field: str) -> I64:
        return self.values[:, _F[field]]

    @property
    def expected(self) -> I64:
        """Intervals expected: meters x intervals per day."""
        return self.meters * self.per_day


# -- pure: one day's rows ----------------------------------------------------------------------


def meter_table(
    rows: Sequence[DaySums],
    day: dt.date,
    *,
    known: Sequence[str],
    only_known: bool = False,
    accounts: Mapping[str, str] | None = None,
    bound: Mapping[str, str] | None = None,
    per_day: int = DAY_MS // st.INTERVAL_MS,
) -> DayTable:
    """One row per meter for ``day`` from the day's ``daily_tou`` sums (one per meter and
    gateway): the ``known`` meters (a row also without data) and, unless ``only_known``, every
    other meter that has data, sorted by id. ``accounts`` maps meter -> account, ``bound`` meter ->
    the gateway named for a meter without data."""
    accounts, bound = accounts or {}, bound or {}
    ids = sorted(set(known) if only_known else set(known) | {r.meter for r in rows})
    index = {m: i for i, m in enumerate(ids)}
    kept = [r for r in rows if r.meter in index]
    n = len(ids)
    r_idx = np.array([index[r.meter] for r in kept], dtype=np.int64)
    r_val = np.array([[r.sums.get(f) or 0 for f in FIELDS] for r in kept], dtype=np.int64)
    values = np.zeros((n, len(FIELDS)), dtype=np.int64)
    np.add.at(values, r_idx, r_val.reshape(-1, len(FIELDS)))
    has_rev = np.zeros(n, dtype=np.bool_)
    has_rev[[index[r.meter] for r in kept if r.sums.get("rev_total") is not None]] = True
    gws: dict[str, set[str]] = {}
    for r in kept:
        gws.setdefault(r.meter, set()).add(r.gateway)
    return DayTable(
        day,
        tuple(ids),
        tuple(";".join(sorted(gws[m])) if m in gws else bound.get(m, "") for m in ids),
        tuple(accounts.get(m, "") for m in ids),
        np.ones(n, dtype=np.int64),
        np.bincount(r_idx, minlength=n).clip(max=1).astype(np.int64),
        values,
        has_rev,
        per_day,
    )


def account_table(meters: DayTable) -> DayTable:
    """One row per account of ``meters``' rows (meters without an account are left out): the sums
    of its meters' rows, ``meters`` and ``present`` counted, sorted by account."""
    names = sorted({a for a in meters.accounts if a})
    index = {a: i for i, a in enumerate(names)}
    group = np.array([index.get(a, -1) for a in meters.accounts], dtype=np.int64)
    sel = group >= 0
    g = group[sel]
    n = len(names)

    def per_account(col: I64) -> I64:
        out = np.zeros((n, *col.shape[1:]), dtype=np.int64)
        np.add.at(out, g, col[sel])
        return out

    return DayTable(
        meters.day,
        tuple(names),
        ("",) * n,
        tuple(names),
        per_account(meters.meters),
        per_account(meters.present),
        per_account(meters.values),
        per_account(meters.has_rev.astype(np.int64)) > 0,
        meters.per_day,
    )


def quality_marks(t: DayTable) -> list[tuple[str, ...]]:
    """Per row, its :data:`MARKS` (``("ok",)`` when none): ``missing`` a meter of the row has no
    stored row that day; ``incomplete`` fewer intervals than expected (not said of a row with no
    data at all); ``estimated``, ``invalid``, ``tou_mismatch`` the count is above 0."""
    marks = np.column_stack(
        (
            t.present < t.meters,
            (t.col("intervals") < t.expected) & (t.present > 0),
            t.col("estimated") > 0,
            t.col("invalid") > 0,
            t.col("tou_mismatch") > 0,
        )
    )
    return [tuple(m for m, on in zip(MARKS, row, strict=True) if on) or ("ok",) for row in marks.tolist()]


def _hundredths(v: int) -> Decimal:
    """0.01 kWh -> kWh (0.01 % -> %), exact: two decimals."""
    return Decimal(v).scaleb(-2)


def _cells(t: DayTable, by: str) -> Iterator[list[object]]:
    """Each row's values in :func:`columns` order: kWh and percentages as ``Decimal``, absent
    values as None, the quality marks as a tuple."""
    quality = quality_marks(t)
    pct = t.col("intervals") * 10_000 // t.expected
    day = t.day.isoformat()
    values, present, has_rev = t.values.tolist(), t.present.tolist(), t.has_rev.tolist()
    for r, ident in enumerate(t.ids):
        v = values[r]
        energy: list[object] = [_hundredths(c) if present[r] else None for c in v[:_ENERGY]]
        if not has_rev[r]:
            energy[_F["rev_total"]] = None
        ids: list[object] = (
            [ident, t.gateways[r], t.accounts[r]] if by == "meter" else [ident, int(t.meters[r])]
        )
        counts = [v[_F["intervals"]], int(t.expected[r]), *v[_F["estimated"] :]]
        yield [day, *ids, *energy, *counts, _hundredths(int(pct[r])), quality[r]]


# -- encoders ----------------------------------------------------------------------------------


class _Encoder:
    """CSV: a header line, then one line per row (quoting per RFC 4180, ``;`` between marks)."""

    def __init__(self, by: str) -> None:
        self.by = by
        self.rows = 0

    def head(self) -> bytes:
        return self._csv([list(columns(self.by))])

    def encode(self, cells: list[list[object]]) -> bytes:
        self.rows += len(cells)
        return self._csv([[_csv_value(v) for v in row] for row in cells])

    def tail(self) -> bytes:
        return b""

    @staticmethod
    def _csv(rows: list[list[object]]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerows(rows)
        return buf.getvalue().encode()


def _csv_value(v: object) -> object:
    if v is None:
        return ""
    return ";".join(v) if isinstance(v, tuple) else v


def _json_value(v: object) -> str:
    # Decimal as its exact text (a JSON number with two decimals), the rest as JSON
    return str(v) if isinstance(v, Decimal) else json.dumps(v, ensure_ascii=False, separators=(",", ":"))


class _JsonEncoder(_Encoder):
    """JSON: one array, an object per row, one row per line; NDJSON: an object per line."""

    def __init__(self, by: str, *, array: bool) -> None:
        super().__init__(by)
        self.array = array
        self.names = [json.dumps(c) for c in columns(by)]

    def head(self) -> bytes:
        return b"[" if self.array else b""

    def encode(self, cells: list[list[object]]) -> bytes:
        objects = [
            "{" + ",".join(f"{k}:{_json_value(v)}" for k, v in zip(self.names, row, strict=True)) + "}"
            for row in cells
        ]
        if not self.array:
            self.rows += len(cells)
            return "".join(o + "\n" for o in objects).encode()
        text = ("\n" if self.rows == 0 else ",\n") + ",\n".join(objects)
        self.rows += len(cells)
        return text.encode()

    def tail(self) -> bytes:
        if not self.array:
            return b""
        return b"\n]\n" if self.rows else b"]\n"


# -- the export --------------------------------------------------------------------------------


def _check(
    start_day: dt.date, end_day: dt.date, by: str, fmt: str, accounts: Mapping[str, str] | None
) -> int:
    """The number of days; raises ExportError for a bad request."""
    if start_day < FIRST_DAY:
        raise ExportError("from", f"{start_day} is before {FIRST_DAY}")
    if end_day > LAST_DAY:
        raise ExportError("to", f"{end_day} is after {LAST_DAY}")
    if end_day < start_day:
        raise ExportError("to", f"{end_day} is before from={start_day}")
    days = (end_day - start_day).days + 1
    if days > MAX_DAYS:
        raise ExportError("to", f"the range is {days} days, at most {MAX_DAYS} per export")
    if by not in BY:
        raise ExportError("by", f"expected one of {', '.join(BY)}, got {by!r}")
    if fmt not in FORMATS:
        raise ExportError("format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if by == "account" and accounts is None:
        raise ExportError("by", "account needs a meter -> account mapping")
    return days


def export_daily(
    source: DaySumsSource,
    *,
    start_day: dt.date,
    end_day: dt.date,
    by: str = "meter",
    fmt: str = "csv",
    accounts: Mapping[str, str] | None = None,
    meters: Sequence[str] | None = None,
    registry: MeterRegistry | None = None,
    interval_s: int = st.INTERVAL_MS // 1000,
    utc_offset_ms: int = st.SHANGHAI_MS,
    chunk_rows: int = 5_000,
    progress: Callable[[int, int], None] | None = None,
) -> AsyncIterator[bytes]:
    """The export of local days ``start_day`` .. ``end_day`` (both included; local to
    ``utc_offset_ms``) as encoded chunks (see the module contract).

    ``by``: ``meter`` or ``account`` (the sums over an account's meters, ``accounts`` mapping
    meter -> account). ``fmt``: one of :data:`FORMATS`. ``meters``: exactly these meters (each
    gets a row every day); else the ``registry``'s meters, the ``accounts`` mapping's and every
    meter with data. ``registry`` also names the gateway of a missing meter (its bound gateway).
    ``interval_s`` gives the intervals expected per day. ``progress(days_done, days)`` is called
    after each day.

    Raises: ExportError (at the call, before anything is read); the iterator raises SinkError
    when the store is unreachable or refuses a day's query."""
    days = _check(start_day, end_day, by, fmt, accounts)
    if interval_s <= 0 or 86_400 % interval_s:
        raise ExportError("interval_s", f"must divide a day, got {interval_s}")
    if chunk_rows < 1:
        raise ExportError("chunk_rows", f"expected >= 1, got {chunk_rows}")
    mapping = dict(accounts or {})
    known = list(meters) if meters is not None else [*(registry.ids if registry else ()), *mapping]
    bound = {m: g for m in known if registry and (g := registry.bound_gateway(m))}
    encoder = _Encoder(by) if fmt == "csv" else _JsonEncoder(by, array=fmt == "json")

    async def chunks() -> AsyncIterator[bytes]:
        if head := encoder.head():
            yield head
        for n in range(days):
            day = start_day + dt.timedelta(days=n)
            start_ms, end_ms = day_window(day, utc_offset_ms)
            rows = await source.day_sums(start_ms, end_ms, FIELDS)
            table = meter_table(
                rows, day, known=known, only_known=meters is not None, accounts=mapping, bound=bound,
                per_day=DAY_MS // (interval_s * 1000),
            )  # fmt: skip
            if by == "account":
                table = account_table(table)
            cells = list(_cells(table, by))
            for i in range(0, len(cells), chunk_rows):
                yield encoder.encode(cells[i : i + chunk_rows])
            if progress is not None:
                progress(n + 1, days)
        if tail := encoder.tail():
            yield tail

    return chunks()


# -- meter -> account mappings -----------------------------------------------------------------


def registry_accounts(registry: MeterRegistry) -> dict[str, str]:
    """meter -> account of the registry's meters that name one (``account = "..."``)."""
    return {
        m: registry.accounts[a]
        for m, a in zip(registry.ids, registry.account.tolist(), strict=True)
        if a >= 0
    }


def ledger_accounts(path: str | Path) -> dict[str, str]:
    """meter -> account of the fee-control ledger (its ``meters`` table), read through a read-only
    connection (nothing is created or locked for writing).

    Raises: ConfigError naming the file when it is missing, unreadable or not a ledger."""
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            return dict(db.execute("SELECT meter, account_id FROM meters ORDER BY meter").fetchall())
    except sqlite3.Error as exc:
        raise ConfigError(str(path), f"cannot read the fee-control ledger: {exc}") from None


async def billing_export(
    cfg: IngestConfig,
    out: Callable[[bytes], object],
    *,
    start_day: dt.date,
    end_day: dt.date,
    by: str = "meter",
    fmt: str = "csv",
    accounts_db: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """:func:`export_daily` with the registry, calendar, interval and sink of ``cfg``, each chunk
    passed to ``out``; accounts from the ledger at ``accounts_db``, else the registry's.

    Raises: ConfigError / ExportError (arguments, registry, calendar, ledger), SinkError."""
    from ingest.config import load_calendar, load_registry
    from ingest.sinks.influx.sink import InfluxSink

    registry = load_registry(cfg)
    accounts = ledger_accounts(accounts_db) if accounts_db is not None else registry_accounts(registry)
    async with InfluxSink(cfg.influx, wide=cfg.pipeline.schema == "wide") as sink:
        chunks = export_daily(
            sink, start_day=start_day, end_day=end_day, by=by, fmt=fmt, accounts=accounts,
            registry=registry, interval_s=cfg.pipeline.interval_s,
            utc_offset_ms=load_calendar(cfg).utc_offset_ms, progress=progress,
        )  # fmt: skip
        async for chunk in chunks:
            out(chunk)
