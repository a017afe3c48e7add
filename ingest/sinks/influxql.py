"""InfluxQL reads of the ingest pipeline: running daily totals, outage correlation, completeness.

Contract: :class:`InfluxQuery` posts InfluxQL to ``/query`` (1.x; 2.x through its
v1-compatibility endpoint and a DBRP mapping) and returns rows as dicts with epoch-ms times. It
raises :class:`~protocols.errors.SinkError` like the sink: retryable when unreachable or 5xx, not
retryable when the server refuses the statement. :func:`query_completeness` answers "meter M,
day D: 96 of 96 intervals, 0 duplicates, 2 estimated" (``docs/ingest.md`` has the queries).
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.parse
from typing import Any

import numpy as np

from ingest.pipeline.transform import DAY_MS, stored_tag
from ingest.rules import stages as st
from ingest.rules.kernels import NOT_BILLABLE
from ingest.sinks.influxdb import HttpConnection, SinkConfig
from protocols.errors import SinkError
from protocols.flags import Flag
from protocols.quantities import by_name

__all__ = ["InfluxQuery", "query_completeness", "quote_str"]

_EPOCH = dt.date(1970, 1, 1)


def quote_str(text: str) -> str:
    """An InfluxQL single-quoted string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class InfluxQuery:
    """InfluxQL over HTTP ``/query`` (1.x; 2.x through its v1-compatibility endpoint and a DBRP
    mapping). Raises ``SinkError`` like the sink: retryable when unreachable or 5xx."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self._http = HttpConnection(config.url, config.timeout_s, config.ca_file)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def rows(self, influxql: str) -> list[dict[str, Any]]:
        """Rows as ``{tag or column: value}``, times as epoch ms."""
        cfg = self.config
        params = {"db": cfg.bucket or cfg.database, "q": influxql, "epoch": "ms"}
        if cfg.retention_policy:
            params["rp"] = cfg.retention_policy
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if cfg.token:
            headers["Authorization"] = f"Token {cfg.token}"
        elif cfg.username is not None:
            params.update(u=cfg.username, p=cfg.password or "")
        resp = await self._http.request("POST", "/query", headers, urllib.parse.urlencode(params).encode())
        if resp.status >= 500:
            raise SinkError(f"influxdb query failed ({resp.status})", retryable=True, status=resp.status)
        try:
            doc = json.loads(resp.body or b"{}")
        except ValueError:
            doc = {}
        results = doc.get("results", []) if isinstance(doc, dict) else []
        errors = [r["error"] for r in results if isinstance(r, dict) and "error" in r]
        if resp.status // 100 != 2 or errors or "error" in doc:
            raise SinkError(f"influxql refused: {errors or doc}", retryable=False, status=resp.status)
        out = []
        for result in results:
            for series in result.get("series", ()):
                tags = series.get("tags") or {}
                out += [{**tags, **dict(zip(series["columns"], v, strict=True))} for v in series["values"]]
        return out


def _day_window(day: dt.date, utc_offset_ms: int) -> tuple[int, int]:
    start = (day - _EPOCH).days * DAY_MS - utc_offset_ms
    return start, start + DAY_MS


async def query_completeness(
    query: InfluxQuery,
    meter_id: str,
    day: dt.date,
    *,
    utc_offset_ms: int = 8 * 3_600_000,
    interval_ms: int = 900_000,
    quantity: str = "energy_fwd_active_total",
) -> st.DayCompleteness:
    """KPI-01 / VEE-13 for one meter-day from the ``intervals`` and ``reading_duplicate``
    measurements: intervals are end-labelled, so day D holds ``time > start AND time <= end``.

    Raises: SinkError (unreachable or refused)."""
    start, end = _day_window(day, utc_offset_ms)
    where = f"meter = {quote_str(stored_tag(meter_id))} AND time > {start}ms AND time <= {end}ms"
    # intervals are wide: the channel is a field, its flags a "<channel>_flags" field where non-zero
    field = by_name(quantity).name  # a known quantity name: safe as an identifier
    rows = await query.rows(f'SELECT "{field}", "{field}_flags" FROM "intervals" WHERE {where}')
    rows = [r for r in rows if r.get(field) is not None]
    flags = np.array([int(r.get(f"{field}_flags") or 0) for r in rows], dtype=np.int64)
    bad = (flags & NOT_BILLABLE) != 0
    est = ~bad & ((flags & int(Flag.ESTIMATED)) != 0)
    dup_where = f"{where} AND quantity = {quote_str(quantity)}"
    dups = await query.rows(f'SELECT count("flags") FROM "reading_duplicate" WHERE {dup_where}')
    n_dup = int(dups[0]["count"]) if dups else 0
    return st.DayCompleteness(
        meter_id, day, DAY_MS // interval_ms, int((~bad & ~est).sum()), int(est.sum()), int(bad.sum()), n_dup
    )
