"""InfluxQL over HTTP: the query client of the InfluxDB sink.

Contract: :class:`InfluxQuery` posts InfluxQL to ``/query`` (1.x; 2.x through its
v1-compatibility endpoint and a DBRP mapping) and returns rows as dicts with epoch-ms times. It
asks for MessagePack (about a third less of influxd's CPU than JSON for reads of many rows) and
reads whichever of MessagePack or JSON the server answers. An answer the server cut short
(``partial``: its ``max-row-limit``) is an error, never a silently short read. It
raises :class:`~protocols.errors.SinkError` like the writer: retryable when unreachable or 5xx,
not retryable when the server refuses the statement. The statements themselves are the sink's
(:mod:`ingest.sinks.influx.sink`).
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import msgpack

from ingest.sinks.influx.http import HttpConnection, SinkConfig
from protocols.errors import SinkError

__all__ = ["InfluxQuery", "quote_str"]


def quote_str(text: str) -> str:
    """An InfluxQL single-quoted string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class InfluxQuery:
    """InfluxQL over HTTP ``/query`` (1.x; 2.x through its v1-compatibility endpoint and a DBRP
    mapping). Raises ``SinkError`` like the sink: retryable when unreachable or 5xx."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self._http = HttpConnection(config.url, config.timeout_s, config.ca_file)
        self.answered = ""
        """The media type of the last answer (``application/x-msgpack`` from InfluxDB 1.x)."""

    async def aclose(self) -> None:
        await self._http.aclose()

    async def rows(self, influxql: str) -> list[dict[str, Any]]:
        """Rows as ``{tag or column: value}``, times as epoch ms."""
        out = []
        for series in await self.series(influxql):
            tags = series.get("tags") or {}
            out += [{**tags, **dict(zip(series["columns"], v, strict=True))} for v in series["values"]]
        return out

    async def series(self, influxql: str) -> list[dict[str, Any]]:
        """The answer's series as InfluxDB gives them (``tags``, ``columns``, ``values``: a list
        per row), times as epoch ms: for reads of many rows, converted per column, not per row."""
        cfg = self.config
        params = {"db": cfg.bucket or cfg.database, "q": influxql, "epoch": "ms"}
        if cfg.retention_policy:
            params["rp"] = cfg.retention_policy
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/x-msgpack",  # 1.x matches the header whole; others answer JSON
        }
        if cfg.token:
            headers["Authorization"] = f"Token {cfg.token}"
        elif cfg.username is not None:
            params.update(u=cfg.username, p=cfg.password or "")
        resp = await self._http.request("POST", "/query", headers, urllib.parse.urlencode(params).encode())
        if resp.status >= 500:
            raise SinkError(f"influxdb query failed ({resp.status})", retryable=True, status=resp.status)
        self.answered = resp.headers.get("content-type", "")
        doc = _decoded(self.answered, resp.body or b"")
        results = doc.get("results", []) if isinstance(doc, dict) else []
        errors = [r["error"] for r in results if isinstance(r, dict) and "error" in r]
        if resp.status // 100 != 2 or errors or "error" in doc:
            raise SinkError(f"influxql refused: {errors or doc}", retryable=False, status=resp.status)
        if any(r.get("partial") for r in results):  # a series' own "partial" only marks chunks
            raise SinkError(
                "influxql answer cut short by the server (max-row-limit): set it to 0 in influxdb.conf",
                retryable=False,
                status=resp.status,
            )
        return [series for result in results for series in result.get("series", ())]


def _decoded(content_type: str, body: bytes) -> Any:
    """The answer's document (``{}`` when it is neither MessagePack nor JSON)."""
    try:
        if content_type.startswith("application/x-msgpack"):
            return msgpack.unpackb(body, strict_map_key=False)
        return json.loads(body or b"{}")
    except (ValueError, msgpack.UnpackException):
        return {}
