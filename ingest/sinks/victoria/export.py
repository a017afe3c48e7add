"""Raw samples out of VictoriaMetrics: ``/api/v1/export`` of one series selector and time range.

Contract
--------
* :meth:`VictoriaExport.series` posts one selector (built with :func:`selector`) and a closed
  range ``[start_ms, end_ms]`` to ``<read_url>/api/v1/export`` and returns every matching series
  as :class:`Series` (labels, timestamps ascending, values). Export reads raw samples: no
  MetricsQL lookback, step or staleness between the data and the answer.
* A series holding two samples at one timestamp (a rewrite, a redelivered batch, replicas of a
  cluster) is reduced to one when they are equal. When they differ the store holds two answers
  for one record, and which one VictoriaMetrics keeps is not defined (its deduplication keeps an
  arbitrary one up to 1.84 and the larger value after): :class:`~protocols.errors.SinkError`
  (not retryable) names the series, never a silent pick.
* Unreachable, timeouts and 5xx raise ``SinkError(retryable=True)``; any other non-2xx answer
  (a bad selector) ``SinkError(retryable=False)``; a path the server does not serve (a wrong
  cluster prefix) ``SinkRefused(reason="not_found")``.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ingest.sinks.influx.http import HttpConnection
from protocols.errors import SinkError, SinkRefused

__all__ = ["Series", "VictoriaExport", "quote_label", "regex_of", "selector"]

_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")


def quote_label(value: str) -> str:
    """A MetricsQL double-quoted string literal of ``value``."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def regex_of(values: Iterable[str]) -> str:
    """An RE2 alternation matching exactly ``values`` (VictoriaMetrics anchors label regexps)."""
    return "|".join("".join("\\" + c if c in _RE2_SPECIAL else c for c in v) for v in values)


def selector(
    names: Iterable[str], labels: Mapping[str, str], regex_labels: Mapping[str, Iterable[str]]
) -> str:
    """``{__name__=~"a|b",label="v",other=~"x|y"}``: the metric names ``names``, labels equal to
    ``labels``, labels in ``regex_labels``' sets."""
    parts = [f"__name__=~{quote_label(regex_of(names))}"]
    parts += [f"{k}={quote_label(v)}" for k, v in labels.items()]
    parts += [f"{k}=~{quote_label(regex_of(vs))}" for k, vs in regex_labels.items()]
    return "{" + ",".join(parts) + "}"


@dataclass(frozen=True, slots=True)
class Series:
    """One exported series: its labels (``__name__`` included), timestamps (ms, ascending, each
    once) and values."""

    labels: dict[str, str]
    ts: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]


def _one_per_timestamp(
    labels: dict[str, str], ts: npt.NDArray[np.int64], v: npt.NDArray[np.float64]
) -> Series:
    order = np.argsort(ts, kind="stable")
    ts, v = ts[order], v[order]
    same = np.flatnonzero(ts[1:] == ts[:-1])
    if same.shape[0]:
        differ = same[v[same + 1] != v[same]]
        if differ.shape[0]:
            i = int(differ[0])
            raise SinkError(
                f"victoriametrics holds two values ({v[i]}, {v[i + 1]}) of {labels} at {int(ts[i])} ms: "
                "a record rewritten with another value, which VictoriaMetrics cannot overwrite",
                retryable=False,
            )
        keep = np.ones(ts.shape[0], bool)
        keep[same + 1] = False
        ts, v = ts[keep], v[keep]
    return Series(labels, ts, v)


class VictoriaExport:
    """The reads of the VictoriaMetrics sink (see the module contract); one request at a time."""

    def __init__(self, read_url: str, timeout_s: float, ca_file: str | None = None) -> None:
        self.url = read_url
        self._http = HttpConnection(read_url, timeout_s, ca_file)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def series(self, match: str, start_ms: int, end_ms: int) -> list[Series]:
        """Every series of ``match`` with its samples in ``[start_ms, end_ms]`` (ms).

        Raises:
            SinkError: unreachable or 5xx (retryable); refused, or conflicting samples (not)."""
        form = urllib.parse.urlencode(
            {"match[]": match, "start": f"{start_ms / 1000:.3f}", "end": f"{end_ms / 1000:.3f}"}
        ).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        resp = await self._http.request("POST", "/api/v1/export", headers, form)
        if resp.status // 100 != 2:
            text = resp.body.decode("utf-8", "replace").strip()[:300]
            if resp.status in (400, 404) and "unsupported path" in text:
                raise SinkRefused(f"({resp.status}): {text}", reason="not_found", status=resp.status)
            raise SinkError(
                f"victoriametrics {self.url} export ({resp.status}): {text}",
                retryable=resp.status >= 500 or resp.status in (408, 429),
                status=resp.status,
            )
        out: dict[tuple[tuple[str, str], ...], list[tuple[list[int], list[float]]]] = {}
        for line in resp.body.splitlines():
            if not line.strip():
                continue
            doc = json.loads(line)
            key = tuple(sorted(doc["metric"].items()))
            out.setdefault(key, []).append((doc["timestamps"], doc["values"]))
        series = []
        for key, parts in out.items():  # a series can come in several lines (blocks)
            ts = np.array([t for p in parts for t in p[0]], np.int64)
            values = np.array([v for p in parts for v in p[1]], np.float64)
            s = _one_per_timestamp(dict(key), ts, values)
            keep = (s.ts >= start_ms) & (s.ts <= end_ms)
            series.append(Series(s.labels, s.ts[keep], s.values[keep]))
        return series
