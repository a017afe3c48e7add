"""InfluxDB writes: awaited, gzip-compressed line-protocol requests, with line-level rejection.

Contract
--------
* :meth:`InfluxWriter.prepare` takes line protocol (``bytes``, one point per ``\\n``-separated
  line, ``precision=ms``) and cuts it into request bodies bounded by ``max_batch_lines`` and
  ``max_batch_bytes`` (uncompressed), each gzip-compressed once (:class:`PreparedLines`).
  Well-formed ``bytes`` (every line ends in ``\n``; no empty, blank-led or ``\r`` lines: what
  the pipeline's encoders produce) are cut at newline offsets found vectorised and kept as
  slices, with no Python object per line; anything else is split into lines first. Either way the
  same lines reach the server.
* :meth:`InfluxWriter.send` posts the bodies not yet done, one after the other with
  ``Content-Encoding: gzip``, and returns a :class:`~ingest.sinks.base.WriteResult` only when every
  line is either **written** (the server answered 2xx for it) or **rejected** (the server will
  never accept it: the line, a short reason and the server's message are in ``rejected``; the
  caller dead-letters them, the writer stores nothing). So the caller may acknowledge the MQTT
  message once it has dead-lettered the rejected lines (STYLE H8). Each body the server has
  answered for is marked done in the :class:`PreparedLines` (with the lines it rejected), so a
  ``send`` of the same object after a failure resumes at the first body not done: no accepted
  body is posted twice, none is compressed twice. :meth:`InfluxWriter.write` is
  ``send(prepare(lines))``. There is no background batching: the write is awaited, never
  fire-and-forget (unlike influxdb-client's ``WriteApi``).
* The writer does not retry. An outage or overload (connection refused/reset, timeouts, 5xx,
  408, 429) raises ``SinkError(retryable=True)`` at once, with the server's ``Retry-After`` in
  ``retry_after_s``; the caller's retry layer (:func:`~ingest.sinks.base.send_until_written`)
  waits and sends again. A body interrupted while being bisected is posted whole again: points
  the server kept are rewritten, which is harmless because an InfluxDB point is keyed by series
  and timestamp, so rewriting the same line is an idempotent overwrite (DESIGN §6).
* Line rejection (400 naming a partial write, a parse error, a field type conflict or a retention
  policy; 413 too large) is resolved by bisecting the request by lines down to the offending lines,
  which are rejected with the server's message, while every other line is written. One bad
  point never blocks or drops a batch (field lessons 10 and 18). Halves re-sent after a partial
  write may rewrite points the server already kept: idempotent, as above.
* Any other 4xx (401 credentials, 403 privileges, 404 unknown database, bucket or org, a bad
  request shape) is a refusal of *us*, not of the data: it raises
  :class:`~protocols.errors.SinkRefused` (``.reason`` ``unauthorized``/``forbidden``/``not_found``/
  ``refused``; ``retryable``), and nothing is rejected. The caller keeps the data and retries
  once the configuration or the server is fixed. With ``create_database = true`` (v1) a write
  that finds its database missing creates it (``CREATE DATABASE``) and is sent again.
* :meth:`InfluxWriter.probe` checks, without writing a point, that a write would be accepted: the
  server answers (and says which API it speaks), the database or bucket exists, the credentials
  and privileges are accepted. It posts an empty body to the write endpoint: 1.x answers 204 only
  after authenticating the user, finding the database and authorising the write; 2.x answers
  400 "writing requires points" only after authorising the token and finding org and bucket. With
  ``create_database = true`` a missing v1 database is created.

API generations (``SinkConfig.api``): ``"v1"`` posts ``/write?db=&rp=&precision=ms`` (InfluxDB 1.x,
optional basic auth); ``"v2"`` posts ``/api/v2/write?org=&bucket=&precision=ms`` with
``Authorization: Token …`` (InfluxDB 2.x, 3.x and anything speaking that API); ``"auto"`` asks
``GET /ping`` once and reads ``X-Influxdb-Version`` (``1.*`` → v1, anything newer → v2).

Transport choice: a ~100-line asyncio HTTP/1.1 client (:class:`HttpConnection`, one keep-alive
connection, ``Content-Length`` and chunked responses, optional TLS) rather than influxdb-client or
urllib in a thread. It keeps the sink a plain coroutine (STYLE H9: no threads where no library
forces one), makes ``asyncio.timeout`` and cancellation work on the socket itself, and exposes the
raw status, headers and error body that retry and bisection decide on. The v2 request is held to
influxdb-client's: a test has the reference client write the same lines to a recording peer and
compares the two requests (no 2.x/3.x server is packaged for the test machines).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import gzip
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

try:  # Intel ISA-L: zlib-compatible gzip, several times faster at the low levels
    from isal import igzip as _isal_gzip
except ImportError:  # pragma: no cover - a platform without an isal wheel
    _isal_gzip = None  # type: ignore[assignment]

from ingest.sinks.base import Rejected, RetryPolicy, WriteResult
from protocols.errors import SinkError, SinkRefused

__all__ = [
    "HttpConnection",
    "InfluxWriter",
    "PreparedLines",
    "SinkConfig",
    "SinkStats",
    "gzip_body",
    "split_lines",
]

log = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 64 * 1024
_MAX_BODY_BYTES = 64 * 1024 * 1024
# Substrings (lower case) of a 400 answer that means "these lines are bad", by server generation:
# 1.x "partial write: field type conflict ... dropped=1", "unable to parse '...': ...",
# "partial write: points beyond retention policy dropped=1"; 2.x "partial write error (n accepted)",
# "unable to parse"; 3.x "partial write of line protocol occurred", "parsing failed".
_LINE_REJECTION_MARKERS = (
    "partial write",
    "unable to parse",
    "field type conflict",
    "beyond retention policy",
    "parsing failed",
    "line protocol",
    "max-values-per-tag",
    "max-series-per-database",
)
# Short, low-cardinality dead-letter reasons; the server's full message goes into ``detail``.
_REASONS = (
    ("field type conflict", "field type conflict"),
    ("conflict", "field type conflict"),
    ("unable to parse", "unable to parse"),
    ("parsing failed", "unable to parse"),
    ("beyond retention policy", "beyond retention policy"),
    ("max-values-per-tag", "series limit"),
    ("max-series-per-database", "series limit"),
)


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """The ``[ingest.influx]`` section. Units are in the names (STYLE H6).

    ``database``/``retention_policy``/``username``/``password`` serve v1; ``org``/``bucket``/``token``
    serve v2 (``bucket`` defaults to ``database``). ``ca_file`` is for ``https://`` URLs.
    ``create_database``: create a missing v1 database (``CREATE DATABASE``, needs an admin user)
    instead of waiting for an operator to create it. ``max_attempts``, ``backoff_initial_s`` and
    ``backoff_max_s`` bound the retries of one-shot commands (:attr:`one_shot_retry`: the daily
    report, the dead-letter replay); ``retry_after_max_s`` caps the ``Retry-After`` any retry
    honours. The writer itself never retries.
    """

    url: str = "http://127.0.0.1:8086"
    api: Literal["v1", "v2", "auto"] = "auto"
    database: str = "amigw"
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = None
    org: str = ""
    bucket: str | None = None
    token: str | None = None
    ca_file: str | None = None
    gzip: bool = True
    gzip_level: int = 1
    max_batch_lines: int = 5000
    max_batch_bytes: int = 4 * 1024 * 1024
    timeout_s: float = 10.0
    max_attempts: int = 5
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    retry_after_max_s: float = 60.0
    create_database: bool = False

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"url: expected http:// or https://, got {self.url!r}")
        if self.max_batch_lines < 1 or self.max_batch_bytes < 1:
            raise ValueError("max_batch_lines: and max_batch_bytes must be positive")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: expected >= 1, got {self.max_attempts}")
        if not 0 <= self.gzip_level <= 9:
            raise ValueError(f"gzip_level: expected 0..9, got {self.gzip_level}")
        if self.timeout_s <= 0 or self.backoff_initial_s < 0 or self.backoff_max_s < 0:
            raise ValueError("timeout_s: timeouts and back-off must be positive")

    @property
    def one_shot_retry(self) -> RetryPolicy:
        """The bounded retry of a one-shot command's writes (a short outage does not fail it)."""
        return RetryPolicy(
            self.backoff_initial_s, self.backoff_max_s, self.max_attempts, self.retry_after_max_s
        )


@dataclass(slots=True)
class SinkStats:
    """Counters for the metrics endpoint (STYLE H12); monotonically increasing."""

    requests: int = 0
    lines_written: int = 0
    lines_rejected: int = 0
    bytes_sent: int = 0
    failures: int = 0
    last_status: int | None = None
    api: str | None = None
    by_status: dict[int, int] = field(default_factory=dict)


def split_lines(data: bytes | Sequence[bytes]) -> list[bytes]:
    """Non-empty lines of line protocol (``bytes`` split on ``\\n``, or already a sequence)."""
    raw = bytes(data).split(b"\n") if isinstance(data, bytes | bytearray | memoryview) else data
    return [bytes(line).rstrip(b"\r") for line in raw if line.strip()]


def _chunks(lines: list[bytes], max_lines: int, max_bytes: int) -> list[list[bytes]]:
    chunks: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if current and (len(current) >= max_lines or size + len(line) + 1 > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        chunks.append(current)
    return chunks


def gzip_body(data: bytes, level: int) -> bytes:
    """A gzip member of ``data``: ISA-L for levels 1 and 2 when installed (zlib level 1's ratio
    on line protocol at ~4.5x its speed), else zlib at ``level``. Either decompresses anywhere."""
    if _isal_gzip is not None and level in (1, 2):
        return _isal_gzip.compress(data, compresslevel=level, mtime=0)
    return gzip.compress(data, compresslevel=level, mtime=0)


def _cut(data: bytes, max_lines: int, max_bytes: int) -> list[tuple[bytes, int]] | None:
    """Well-formed ``data`` (every line ends in ``\\n``; none is empty, starts blank or holds
    ``\\r``) cut at line ends into ``(body, lines in it)`` of at most ``max_lines`` lines and
    ``max_bytes`` bytes (a longer single line travels alone), exactly as ``_chunks`` groups the
    lines; ``None`` when ``data`` is not well-formed. Vectorised: no Python object per line."""
    if not data.endswith(b"\n") or data[:1] in (b"\n", b" ", b"\t") or b"\r" in data:
        return None
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw == 10) + 1  # offset after each line
    after = raw[ends[:-1]]  # first byte of every later line
    if ((after == 10) | (after == 32) | (after == 9)).any():
        return None
    n = ends.shape[0]
    if len(data) <= max_bytes and n <= max_lines:
        return [(data, n)]
    out = []
    start, i = 0, 0
    while i < n:
        j = min(n, i + max_lines)  # first line not in this body, by count
        by_size = int(np.searchsorted(ends, start + max_bytes, side="right"))  # lines that fit
        j = max(i + 1, min(j, by_size))
        end = int(ends[j - 1])
        out.append((data[start:end], j - i))
        start, i = end, j
    return out


def _retry_after_s(value: str | None, now_s: float) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_s)


def _server_message(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    if isinstance(doc, dict):
        for key in ("error", "message"):
            if isinstance(doc.get(key), str):
                extra = doc.get("data")
                return str(doc[key]) + (f" {json.dumps(extra)}" if extra else "")
    return text


def _is_line_rejection(status: int, message: str) -> bool:
    if status == 413:
        return True
    low = message.lower()
    return status in (400, 422) and any(m in low for m in _LINE_REJECTION_MARKERS)


def _reason(status: int, message: str) -> str:
    if status == 413:
        return "request too large"
    low = message.lower()
    return next((reason for marker, reason in _REASONS if marker in low), "rejected")


@dataclass(frozen=True, slots=True)
class _Body:
    """One request: its ``n`` lines (one well-formed slice, or a list) and ``payload``, what is
    posted (compressed once, when the body was prepared)."""

    lines: bytes | list[bytes]
    n: int
    payload: bytes


@dataclass(slots=True, eq=False)
class PreparedLines:
    """Line protocol cut into request bodies, each compressed once (the
    :class:`~ingest.sinks.base.PreparedWrite` of the InfluxDB sink). ``done`` bodies (a prefix)
    have been answered for: ``written`` lines accepted, ``rejected`` the lines refused for good."""

    requests: tuple[_Body, ...]
    done: int = 0
    written: int = 0
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def bodies(self) -> int:
        return len(self.requests)

    @property
    def lines(self) -> int:
        return sum(b.n for b in self.requests)

    def result(self) -> WriteResult:
        return WriteResult(self.written, tuple(self.rejected))


_REFUSALS = {401: "unauthorized", 403: "forbidden", 404: "not_found"}
# What to check, per refusal and API generation: the operator's next step, in the message.
_REFUSAL_HINTS = {
    ("unauthorized", "v1"): "check [influx] username and password",
    ("unauthorized", "v2"): "check [influx] token",
    ("forbidden", "v1"): "grant the user WRITE on the database",
    ("forbidden", "v2"): "give the token write permission on the bucket",
    ("not_found", "v1"): "create the database or set [influx] create_database = true",
    ("not_found", "v2"): "check [influx] org and bucket",
}


def _refusal(status: int, message: str, what: str, api: str | None) -> SinkRefused:
    """The :class:`SinkRefused` of a non-line 4xx answer to ``what`` (``"the write"``), its message
    naming the status, the server's words and what to check."""
    reason = _REFUSALS.get(status, "refused")
    hint = _REFUSAL_HINTS.get((reason, api or "v1"), "")
    return SinkRefused(
        f"influxdb refused {what} ({status} {reason}): {message[:300]}" + (f"; {hint}" if hint else ""),
        reason=reason,
        status=status,
    )


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes


class HttpConnection:
    """One keep-alive HTTP/1.1 connection; reconnects lazily. Transport failures raise
    ``SinkError(retryable=True)`` (translated once, here: STYLE H4)."""

    def __init__(self, url: str, timeout_s: float, ca_file: str | None) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self.ssl = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()  # one request at a time on the connection (no pipelining)

    async def request(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Response:
        try:
            async with self._lock, asyncio.timeout(self.timeout_s):
                return await self._exchange(method, target, headers, body)
        except TimeoutError as exc:
            await self.aclose()
            raise SinkError(
                f"influxdb {self.host}:{self.port}: no answer in {self.timeout_s}s", retryable=True
            ) from exc
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            await self.aclose()
            raise SinkError(f"influxdb {self.host}:{self.port} unreachable: {exc!r}", retryable=True) from exc
        except BaseException:  # cancelled mid-request: the connection state is unknown
            await self.aclose()
            raise

    async def _exchange(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Response:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ssl, limit=_MAX_HEADER_BYTES
            )
        reader, writer = self._reader, self._writer
        assert reader is not None
        head = [f"{method} {self.base_path}{target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in {**headers, "Content-Length": str(len(body))}.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status, resp_headers = self._parse_head(await reader.readuntil(b"\r\n\r\n"))
        resp_body = await self._read_body(reader, method, status, resp_headers)
        if resp_headers.get("connection", "").lower() == "close":
            await self.aclose()
        return _Response(status, resp_headers, resp_body)

    @staticmethod
    def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(rest[:3]), headers

    async def _read_body(
        self, reader: asyncio.StreamReader, method: str, status: int, headers: dict[str, str]
    ) -> bytes:
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size > _MAX_BODY_BYTES:
                    raise ValueError(f"chunk of {size} bytes")
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the end
                        pass
                    return b"".join(parts)
                parts.append((await reader.readexactly(size + 2))[:-2])
        if "content-length" in headers:
            length = int(headers["content-length"])
            if length > _MAX_BODY_BYTES:
                raise ValueError(f"body of {length} bytes")
            return await reader.readexactly(length)
        body = await reader.read(_MAX_BODY_BYTES)  # delimited by close
        await self.aclose()
        return body

    async def aclose(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


class InfluxWriter:
    """Awaited writes to InfluxDB 1.x (``/write``) or 2.x/3.x (``/api/v2/write``).

    Use as ``async with InfluxWriter(config) as w: await w.write(lines)``, or
    ``prepared = w.prepare(lines)`` then ``await w.send(prepared)`` until it returns.
    """

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.stats = SinkStats()
        self._http = HttpConnection(config.url, config.timeout_s, config.ca_file)
        self._api: Literal["v1", "v2"] | None = None if config.api == "auto" else config.api
        self._failing = False

    async def __aenter__(self) -> InfluxWriter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def api(self) -> Literal["v1", "v2"] | None:
        """The API generation in use; ``None`` until ``auto`` detection has run."""
        return self._api

    async def detect_api(self) -> Literal["v1", "v2"]:
        """``GET /ping`` and read ``X-Influxdb-Version`` (cached once known).

        Raises:
            SinkError: unreachable; SinkRefused (``api_unknown``): no version header.
        """
        if self._api is None:
            resp = await self._request("GET", "/ping", {}, b"")
            version = resp.headers.get("x-influxdb-version", "").strip().lstrip("vV")
            if not version[:1].isdigit():
                raise SinkRefused(
                    f"cannot detect the InfluxDB API: /ping answered {resp.status} with "
                    f'X-Influxdb-Version={version!r}; set api = "v1" or "v2"',
                    reason="api_unknown",
                    status=resp.status,
                )
            self._api = "v1" if version.split(".")[0] in ("0", "1") else "v2"
            self.stats.api = self._api
            log.info("influxdb api detected url=%s version=%s api=%s", self.config.url, version, self._api)
        return self._api

    def prepare(self, lines: bytes | Sequence[bytes]) -> PreparedLines:
        """Line protocol (``precision=ms``) cut into request bodies, each compressed once."""
        cfg = self.config
        cut = _cut(lines, cfg.max_batch_lines, cfg.max_batch_bytes) if isinstance(lines, bytes) else None
        parts: list[tuple[bytes, int]] | list[tuple[list[bytes], int]]
        if cut is not None:
            parts = cut
        else:
            chunks = _chunks(split_lines(lines), cfg.max_batch_lines, cfg.max_batch_bytes)
            parts = [(c, len(c)) for c in chunks]
        return PreparedLines(tuple(_Body(body, n, self._payload(body)) for body, n in parts))

    async def send(self, prepared: PreparedLines) -> WriteResult:
        """Post the bodies of ``prepared`` not yet done (see the module contract).

        Raises:
            SinkError: unreachable or overloaded (``retryable``, ``retry_after_s``); the bodies
                done so far stay done.
            SinkRefused: a refusal that is not about lines (credentials, privileges, unknown
                database or bucket); nothing was rejected.
        """
        if prepared.done < prepared.bodies:
            target, headers = self._write_target(await self.detect_api())
            try:
                await self._send_bodies(prepared, target, headers)
            except SinkRefused as exc:
                if not await self._created_missing_database(exc):
                    raise
                await self._send_bodies(prepared, target, headers)
        return prepared.result()

    async def write(self, lines: bytes | Sequence[bytes]) -> WriteResult:
        """``send(prepare(lines))``: one attempt (raises like :meth:`send`)."""
        return await self.send(self.prepare(lines))

    async def probe(self, *, create: bool = True) -> str:
        """Would a write be accepted? (see the module contract). Returns a one-line summary.
        ``create=False``: never create the database, whatever ``create_database`` says.

        Raises:
            SinkError: the server is unreachable or overloaded.
            SinkRefused: credentials, privileges, database or bucket (the message says which).
        """
        api = await self.detect_api()
        target, headers = self._write_target(api)
        body = gzip_body(b"", self.config.gzip_level) if self.config.gzip else b""
        for attempt in (1, 2):
            resp = await self._request("POST", target, headers, body)
            message = _server_message(resp.body)
            if resp.status // 100 == 2 or (api == "v2" and "requires points" in message):
                break
            exc = _refusal(resp.status, message, "the probe write", api)
            if attempt == 2 or not create or not await self._created_missing_database(exc):
                raise exc
        where = f"database {self.config.database!r}" if api == "v1" else f"bucket {self._bucket!r}"
        return f"influxdb {self.config.url} ({api}): {where} accepts writes"

    async def create_database(self, name: str) -> None:
        """v1 only: ``CREATE DATABASE`` (a no-op when it exists).

        Raises:
            SinkError: unreachable; SinkRefused: refused (e.g. the user is not an admin).
        """
        if await self.detect_api() != "v1":
            raise SinkRefused("create_database is an InfluxDB 1.x (InfluxQL) operation", reason="refused")
        ident = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        form = urllib.parse.urlencode({"q": f"CREATE DATABASE {ident}"}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded", **self._auth_headers("v1")}
        resp = await self._request("POST", "/query", headers, form)
        try:
            doc = json.loads(resp.body or b"{}")
        except ValueError:
            doc = {}
        results = doc.get("results", []) if isinstance(doc, dict) else []
        errors = [r["error"] for r in results if isinstance(r, dict) and "error" in r]
        if resp.status // 100 != 2 or errors:
            message = errors[0] if errors else _server_message(resp.body)
            raise _refusal(resp.status, message, f"CREATE DATABASE {name!r}", "v1")
        log.warning("influxdb database created", extra={"kv": {"url": self.config.url, "database": name}})

    # -- internals ---------------------------------------------------------------------------

    @property
    def _bucket(self) -> str:
        return self.config.bucket or self.config.database

    def _payload(self, lines: bytes | list[bytes]) -> bytes:
        """What is posted for ``lines``: the body, gzip-compressed when configured."""
        body = lines if isinstance(lines, bytes) else b"\n".join(lines) + b"\n"
        return gzip_body(body, self.config.gzip_level) if self.config.gzip else body

    async def _send_bodies(self, prepared: PreparedLines, target: str, headers: dict[str, str]) -> None:
        while prepared.done < prepared.bodies:
            body = prepared.requests[prepared.done]
            ok, bad = await self._write_bisect(body.lines, body.n, target, headers, body.payload)
            prepared.written += ok
            prepared.rejected += bad
            prepared.done += 1
            self.stats.lines_written += ok
            self.stats.lines_rejected += len(bad)

    async def _created_missing_database(self, exc: SinkRefused) -> bool:
        """With ``create_database`` (v1): create the database ``exc`` found missing; True when done."""
        if exc.reason != "not_found" or not self.config.create_database or self._api != "v1":
            return False
        await self.create_database(self.config.database)
        return True

    def _auth_headers(self, api: str) -> dict[str, str]:
        cfg = self.config
        if api == "v2" and cfg.token:
            return {"Authorization": f"Token {cfg.token}"}
        if api == "v1" and cfg.username is not None:
            cred = base64.b64encode(f"{cfg.username}:{cfg.password or ''}".encode()).decode()
            return {"Authorization": f"Basic {cred}"}
        return {}

    def _write_target(self, api: Literal["v1", "v2"]) -> tuple[str, dict[str, str]]:
        cfg = self.config
        if api == "v1":
            params = {"db": cfg.database, "precision": "ms"}
            if cfg.retention_policy:
                params["rp"] = cfg.retention_policy
            path = "/write"
        else:
            params = {"org": cfg.org, "bucket": self._bucket, "precision": "ms"}
            path = "/api/v2/write"
        headers = {"Content-Type": "text/plain; charset=utf-8", **self._auth_headers(api)}
        if cfg.gzip:
            headers["Content-Encoding"] = "gzip"
        return f"{path}?{urllib.parse.urlencode(params)}", headers

    async def _write_bisect(
        self,
        lines: bytes | list[bytes],
        n: int,
        target: str,
        headers: dict[str, str],
        payload: bytes | None = None,
    ) -> tuple[int, list[Rejected]]:
        """(lines written, the rejected lines with reason and server message) for the ``n`` lines
        of ``lines`` (a list, or one well-formed body; ``payload`` its prepared request body),
        bisecting on rejection."""
        body = self._payload(lines) if payload is None else payload
        resp = await self._request("POST", target, headers, body)
        if resp.status // 100 == 2:
            return n, []
        message = _server_message(resp.body)
        if not _is_line_rejection(resp.status, message):
            self.stats.failures += 1
            raise _refusal(resp.status, message, "the write", self._api)
        if isinstance(lines, bytes):
            lines = split_lines(lines)
        if len(lines) == 1:
            return 0, [Rejected(lines[0], _reason(resp.status, message), message)]
        mid = len(lines) // 2
        ok_a, bad_a = await self._write_bisect(lines[:mid], mid, target, headers)
        ok_b, bad_b = await self._write_bisect(lines[mid:], len(lines) - mid, target, headers)
        return ok_a + ok_b, bad_a + bad_b

    async def _request(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Response:
        """One request, no retry: returns any answer that is not an outage or overload.

        Raises: SinkError (``retryable``; ``retry_after_s`` from the server's ``Retry-After``)."""
        self.stats.requests += 1
        self.stats.bytes_sent += len(body)
        try:
            resp = await self._http.request(method, target, headers, body)
        except SinkError as exc:
            self._failed(exc)
            raise
        self.stats.last_status = resp.status
        self.stats.by_status[resp.status] = self.stats.by_status.get(resp.status, 0) + 1
        if not (resp.status >= 500 or resp.status in (408, 429)):
            self._recovered()
            return resp
        error = SinkError(
            f"influxdb busy or failing ({resp.status}): {_server_message(resp.body)[:500]}",
            retryable=True,
            status=resp.status,
            retry_after_s=_retry_after_s(resp.headers.get("retry-after"), time.time()),
        )
        self._failed(error)
        raise error

    def _failed(self, error: SinkError) -> None:
        """Count a failed request; edge-triggered logging (STYLE H12): ERROR once when writes
        start failing, then DEBUG."""
        self.stats.failures += 1
        if not self._failing:
            self._failing = True
            log.error("influxdb write failing url=%s error=%s", self.config.url, error)
        else:
            log.debug("influxdb still failing url=%s error=%s", self.config.url, error)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("influxdb write recovered url=%s", self.config.url)
