"""Read views of the ops API over InfluxDB: collection success, a meter's latest readings, a
meter's load curve. Every function returns one JSON-ready ``dict`` (shapes in
``docs/ops-views.md``); the HTTP routes are the ops app's.

Contract
--------
* Reads only, through :class:`~ingest.sinks.influx.query.InfluxQuery` (InfluxQL, MessagePack),
  over the schema of ``docs/ingest.md`` ("InfluxDB schema"). Tag values are queried as stored
  (:func:`~ingest.sinks.influx.lines.stored_tag`) and returned unescaped.
* Every range is bounded: at most :data:`MAX_RANGE_DAYS` days, else :class:`BadArgument`
  (also for an empty or reversed range, an unknown grouping or channel). Nothing is queried
  before the arguments are checked.
* :func:`collection` is KPI-01 as the daily report computes it
  (:func:`ingest.reports.daily.compute_report`, applied to each day's ``daily_tou`` rows): the
  same numbers the report writes to ``collection``, for any day, whether or not the report ran.
* Flags are returned as the integer and as names (:func:`protocols.flags.describe`).
* Raises :class:`~protocols.errors.SinkError` when InfluxDB is unreachable or refuses a query.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any, Literal

from ingest.config import LineLossSection, LossBand
from ingest.model.registry import MeterRegistry
from ingest.pipeline.rollup import DAY_MS
from ingest.reports.daily import Collection, compute_report, day_window
from ingest.rules import stages as st
from ingest.rules.kernels import NOT_BILLABLE
from ingest.sinks.base import DaySums
from ingest.sinks.influx.lines import stored_tag, unescape_stored
from ingest.sinks.influx.query import InfluxQuery, quote_str
from protocols.errors import BadArgument, SinkError
from protocols.flags import Flag, describe
from protocols.quantities import ENERGY_FORWARD, QUANTITIES, by_code, by_name

__all__ = [
    "MAX_RANGE_DAYS",
    "MAX_RANGE_MS",
    "check_range",
    "collection",
    "flags_doc",
    "load_curve",
    "meter_latest",
]

MAX_RANGE_DAYS = 31
MAX_RANGE_MS = MAX_RANGE_DAYS * DAY_MS
_COLLECTION_FIELDS = ("intervals", "estimated", "invalid")
_COLLECTION_SELECT = ", ".join(f'"{f}"' for f in ("meter", "gateway", *_COLLECTION_FIELDS))


EARLIEST_MS = 946_684_800_000  # 2000-01-01 UTC: the pipeline's earliest reading time by default
LATEST_MS = 4_102_444_800_000  # 2100-01-01 UTC: no meter reads later, InfluxQL takes it


def check_range(start_ms: int, end_ms: int, *, max_ms: int = MAX_RANGE_MS) -> None:
    """Raises: BadArgument unless ``EARLIEST_MS <= start_ms < end_ms <= start_ms + max_ms``
    and ``end_ms <= LATEST_MS``."""
    if isinstance(start_ms, bool) or not isinstance(start_ms, int):
        raise BadArgument("start_ms", "expected an integer epoch ms")
    if isinstance(end_ms, bool) or not isinstance(end_ms, int):
        raise BadArgument("end_ms", "expected an integer epoch ms")
    if not EARLIEST_MS <= start_ms <= LATEST_MS:
        raise BadArgument("start_ms", f"expected {EARLIEST_MS} (2000-01-01) .. {LATEST_MS} (2100-01-01)")
    if end_ms > LATEST_MS:
        raise BadArgument("end_ms", f"expected at most {LATEST_MS} (2100-01-01)")
    if end_ms <= start_ms:
        raise BadArgument("end_ms", "must be after start_ms")
    if end_ms - start_ms > max_ms:
        raise BadArgument("end_ms", f"the range is limited to {max_ms // DAY_MS} days")


def flags_doc(flags: int) -> dict[str, Any]:
    """``{"flags": n, "flag_names": [...]}`` of a flags value (names lowest bit first)."""
    return {"flags": flags, "flag_names": list(describe(flags))}


# -- collection success -------------------------------------------------------------------------


async def collection(
    query: InfluxQuery,
    registry: MeterRegistry,
    start_day: dt.date,
    end_day: dt.date,
    group_by: str = "gateway",
    *,
    utc_offset_ms: int = st.SHANGHAI_MS,
    interval_ms: int = st.INTERVAL_MS,
) -> dict[str, Any]:
    """KPI-01 collection success per gateway or transformer area and local day, ``start_day``
    to ``end_day`` inclusive (at most :data:`MAX_RANGE_DAYS` days), from one ``daily_tou``
    query; each group also has the range's totals.

    Raises: BadArgument (range, ``group_by``), SinkError."""
    level = _group_level(group_by)
    days = (end_day - start_day).days + 1
    if days < 1:
        raise BadArgument("end_day", "must not be before start_day")
    if days > MAX_RANGE_DAYS:
        raise BadArgument("end_day", f"the range is limited to {MAX_RANGE_DAYS} days")
    start, _ = day_window(start_day, utc_offset_ms)
    end = start + days * DAY_MS
    if not (start >= EARLIEST_MS and end <= LATEST_MS):
        raise BadArgument("start_day", "expected days from 2000-01-01 to 2099-12-31")
    rows = await query.rows(
        f'SELECT {_COLLECTION_SELECT} FROM "daily_tou" WHERE time >= {start}ms AND time < {end}ms'
    )
    per_day = _day_rows(rows, start, days)
    bands = LineLossSection(area_types={t: LossBand() for t in registry.area_types if t is not None})
    groups: dict[str, list[dict[str, Any]]] = {}
    for i in range(days):
        day = start_day + dt.timedelta(days=i)
        report = compute_report(
            per_day[i], registry, day, utc_offset_ms=utc_offset_ms, interval_ms=interval_ms, bands=bands
        )
        for c in report.level(level):
            groups.setdefault(c.id, []).append({"day": day.isoformat(), **_counts(c)})
    return {
        "group_by": group_by,
        "start_day": start_day.isoformat(),
        "end_day": end_day.isoformat(),
        "utc_offset_ms": utc_offset_ms,
        "intervals_per_day": DAY_MS // interval_ms,
        "groups": [{"id": gid, **_total(ds), "days": ds} for gid, ds in sorted(groups.items())],
    }


def _group_level(group_by: str) -> Literal["gateway", "area"]:
    if group_by == "gateway":
        return "gateway"
    if group_by == "area":
        return "area"
    raise BadArgument("group_by", "expected 'gateway' or 'area'")


def _day_rows(rows: Iterable[dict[str, Any]], start: int, days: int) -> list[list[DaySums]]:
    """The rows of each day (a ``daily_tou`` row is stamped with its local day's start)."""
    out: list[list[DaySums]] = [[] for _ in range(days)]
    for r in rows:
        if not r.get("meter") or not r.get("gateway"):
            continue
        i = (int(r["time"]) - start) // DAY_MS
        sums = {f: None if r.get(f) is None else int(r[f]) for f in _COLLECTION_FIELDS}
        out[i].append(DaySums(unescape_stored(r["meter"]), unescape_stored(r["gateway"]), sums))
    return out


def _counts(c: Collection) -> dict[str, int]:
    return {
        "received": c.received,
        "expected": c.expected,
        "estimated": c.estimated,
        "invalid": c.invalid,
        "rate_bp": c.rate_bp,
    }


def _total(days: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("received", "expected", "estimated", "invalid")
    tot = {k: sum(int(d[k]) for d in days) for k in keys}
    tot["rate_bp"] = tot["received"] * 10_000 // tot["expected"] if tot["expected"] else 0
    return tot


# -- a meter's readings -------------------------------------------------------------------------


async def meter_latest(query: InfluxQuery, meter: str, *, wide: bool = True) -> dict[str, Any]:
    """The latest stored reading of every quantity of ``meter`` in ``meter_reading`` (each with
    its own time: quantities are read on different schedules), with its flags. ``wide``: the
    pipeline's ``[pipeline] schema`` (a field per quantity, or a ``quantity`` tag).

    Raises: BadArgument (empty meter id), SinkError."""
    if not meter:
        raise BadArgument("meter", "must not be empty")
    where = f'"meter" = {quote_str(stored_tag(meter))}'
    if wide:
        latest = await _latest_wide(query, where)
    else:
        rows = await query.rows(
            f'SELECT last("value") AS "value", "flags" FROM "meter_reading" WHERE {where} GROUP BY "quantity"'
        )
        latest = {
            unescape_stored(r["quantity"]): r
            for r in rows
            if r.get("quantity") and r.get("value") is not None
        }
    quantities = []
    for name in sorted(latest):
        r = latest[name]
        unit = _unit(name)
        flags = int(r.get("flags") or 0)
        quantities.append(
            {"quantity": name, "value": r["value"], "unit": unit, "ts_ms": int(r["time"]), **flags_doc(flags)}
        )
    return {
        "meter": meter,
        "ts_ms": max((q["ts_ms"] for q in quantities), default=None),
        "quantities": quantities,
    }


async def _latest_wide(query: InfluxQuery, where: str) -> dict[str, dict[str, Any]]:
    """One statement per quantity field of the measurement (a selector with another field
    returns that field of the selected point: the value's own flags)."""
    fields = await _field_keys(query, "meter_reading")
    names = [q.name for q in QUANTITIES if fields is None or q.name in fields]
    if not names:
        return {}
    statements = "; ".join(
        f'SELECT last("{n}") AS "{n}", "{n}_flags" FROM "meter_reading" WHERE {where}' for n in names
    )  # quantity names are snake_case identifiers: safe in double quotes
    out: dict[str, dict[str, Any]] = {}
    for series in await query.series(statements):
        cols = series["columns"]
        name = cols[1]
        for v in series["values"]:
            row = dict(zip(cols, v, strict=True))
            if row.get(name) is not None:
                out[name] = {"time": row["time"], "value": row[name], "flags": row.get(f"{name}_flags")}
    return out


async def _field_keys(query: InfluxQuery, measurement: str) -> set[str] | None:
    """The measurement's field keys; None where the server does not answer ``SHOW FIELD KEYS``."""
    try:
        rows = await query.rows(f'SHOW FIELD KEYS FROM "{measurement}"')
    except SinkError as exc:
        if exc.retryable:
            raise
        return None
    return {str(r["fieldKey"]) for r in rows if r.get("fieldKey")}


def _unit(name: str) -> str | None:
    try:
        return by_name(name).unit
    except KeyError:
        return None


_ENERGY_CHANNELS = {by_code(q).name for q in st.ENERGY_CHANNELS}


async def load_curve(
    query: InfluxQuery,
    meter: str,
    start_ms: int,
    end_ms: int,
    *,
    channel: str = by_code(ENERGY_FORWARD).name,
) -> dict[str, Any]:
    """The stored intervals of one energy ``channel`` of ``meter`` ending in
    ``(start_ms, end_ms]`` (intervals are end-labelled), oldest first: kWh (CT x PT applied),
    flags with names, and whether each is estimated or not billable.

    Raises: BadArgument (range over :data:`MAX_RANGE_DAYS` days, empty meter, a channel
    that is not an interval channel), SinkError."""
    check_range(start_ms, end_ms)
    if not meter:
        raise BadArgument("meter", "must not be empty")
    if channel not in _ENERGY_CHANNELS:
        raise BadArgument("channel", f"expected one of {sorted(_ENERGY_CHANNELS)}")
    where = f'"meter" = {quote_str(stored_tag(meter))} AND time > {start_ms}ms AND time <= {end_ms}ms'
    rows = await query.rows(f'SELECT "{channel}", "{channel}_flags" FROM "intervals" WHERE {where}')
    points = []
    for r in sorted((r for r in rows if r.get(channel) is not None), key=lambda r: int(r["time"])):
        flags = int(r.get(f"{channel}_flags") or 0)
        points.append(
            {
                "ts_ms": int(r["time"]),
                "kwh": r[channel],
                **flags_doc(flags),
                "estimated": bool(flags & Flag.ESTIMATED),
                "billable": not flags & NOT_BILLABLE,
            }
        )
    return {
        "meter": meter,
        "channel": channel,
        "unit": by_name(channel).unit,
        "start_ms": start_ms,
        "end_ms": end_ms,
        "count": len(points),
        "estimated": sum(1 for p in points if p["estimated"]),
        "intervals": points,
    }
