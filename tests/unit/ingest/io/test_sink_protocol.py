"""InfluxWriter's requests, chunking, bisection and resumable sends, and the one retry layer
(send_until_written: back-off, Retry-After, bounds), against a scripted HTTP peer (H11).

The peer is a seam for the protocol logic (which status leads to which reaction); the real
server is exercised in tests/integration/test_sink.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.pipeline.deadletter import DeadLetterStore
from ingest.sinks.base import Rejected, RetryPolicy, WriteResult, backoff_delay_s, send_until_written
from ingest.sinks.influx.http import InfluxWriter, SinkConfig, _retry_after_s, split_lines
from protocols.config import load
from protocols.errors import SinkError, SinkRefused
from tests.unit.ingest.io.http_peer import HttpPeer, Reply, Request


class Sleeps:
    """Injected sleep: records the back-off instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)


@pytest.fixture
def dead_letter(tmp_path: Path) -> DeadLetterStore:
    store = DeadLetterStore(tmp_path / "dl.sqlite")
    yield store
    store.close()


def _sink(url: str, dead_letter: DeadLetterStore, **kw: object) -> InfluxWriter:
    cfg = SinkConfig(url=url, api="v1", database="db", **kw)  # type: ignore[arg-type]
    return InfluxWriter(cfg)


def _lines(n: int) -> list[bytes]:
    return [f"m,meter=x value={i}i {i}".encode() for i in range(n)]


POLICY = RetryPolicy(0.1, 10.0)  # forever, like the worker


@pytest.mark.parametrize("status", [500, 503, 408, 429])
async def test_an_outage_is_one_request_then_a_retryable_error_no_retry_inside(dead_letter, status) -> None:
    reply = Reply(status, body=b'{"error":"busy"}')
    async with HttpPeer(lambda _req: reply) as peer, _sink(peer.url, dead_letter) as sink:
        with pytest.raises(SinkError) as info:
            await sink.write(_lines(3))
    assert (info.value.retryable, info.value.status, info.value.retry_after_s) == (True, status, None)
    assert len(peer.requests) == 1


async def test_5xx_then_success_retried_by_the_retry_layer_with_exponential_backoff(dead_letter) -> None:
    script = iter([Reply(503, body=b'{"error":"busy"}'), Reply(500), Reply(204)])
    sleeps = Sleeps()
    async with HttpPeer(lambda _req: next(script)) as peer, _sink(peer.url, dead_letter) as sink:
        result = await send_until_written(sink, sink.prepare(_lines(3)), POLICY, sleep=sleeps)
    assert result == WriteResult(3) and len(peer.requests) == 3
    assert 0.1 <= sleeps.delays[0] <= 0.12 and 0.2 <= sleeps.delays[1] <= 0.24
    assert peer.requests[0].body == peer.requests[2].body  # the same body, re-sent


async def test_429_retry_after_is_carried_on_the_error_and_honoured_by_the_retry_layer(dead_letter) -> None:
    script = iter([Reply(429, {"Retry-After": "7"}), Reply(429, {"Retry-After": "900"}), Reply(204)])
    sleeps = Sleeps()
    failures: list[tuple[float | None, float | None]] = []
    async with HttpPeer(lambda _req: next(script)) as peer, _sink(peer.url, dead_letter) as sink:
        await send_until_written(
            sink, sink.prepare(_lines(1)), RetryPolicy(0.1, 10.0, retry_after_max_s=60.0), sleep=sleeps,
            on_failure=lambda exc, _n, delay: failures.append((exc.retry_after_s, delay)),  # type: ignore[attr-defined]
        )  # fmt: skip
    assert sleeps.delays == [7.0, 60.0]  # at least Retry-After, capped
    assert failures == [(7.0, 7.0), (900.0, 60.0)]


async def test_a_bounded_retry_gives_up_after_its_attempts_with_the_retryable_error(dead_letter) -> None:
    sleeps = Sleeps()
    delays: list[float | None] = []
    async with HttpPeer(lambda _req: Reply(503)) as peer, _sink(peer.url, dead_letter) as sink:
        with pytest.raises(SinkError) as info:
            await send_until_written(
                sink, sink.prepare(_lines(2)), SinkConfig(max_attempts=4).one_shot_retry, sleep=sleeps,
                on_failure=lambda _exc, _n, delay: delays.append(delay),
            )  # fmt: skip
    assert info.value.retryable is True and info.value.status == 503
    assert len(peer.requests) == 4 and len(sleeps.delays) == 3
    assert delays[:3] == sleeps.delays and delays[3] is None  # the last failure: no wait, raised


async def test_a_retried_send_posts_only_the_bodies_not_yet_accepted_each_compressed_once(
    dead_letter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three bodies, the 2nd failing once: 3 + 1 posts (not 3 + 3), three compressions."""
    from ingest.sinks.influx import http

    compressed: list[bytes] = []
    real_gzip = http.gzip_body
    monkeypatch.setattr(
        http, "gzip_body", lambda data, level: compressed.append(data) or real_gzip(data, level)
    )
    failed: list[int] = []

    def respond(req: Request) -> Reply:
        if len(peer.requests) == 2 and not failed:
            failed.append(1)
            return Reply(503)
        return Reply(204)

    sleeps = Sleeps()
    async with HttpPeer(respond) as peer, _sink(peer.url, dead_letter, max_batch_lines=2) as sink:
        prepared = sink.prepare(_lines(6))
        assert (prepared.bodies, prepared.done, prepared.lines) == (3, 0, 6)
        assert await send_until_written(sink, prepared, POLICY, sleep=sleeps) == WriteResult(6)
    assert len(peer.requests) == 4 and len(sleeps.delays) == 1 and prepared.done == 3
    texts = [r.text for r in peer.requests]
    assert texts == [b"".join(line + b"\n" for line in _lines(6)[i : i + 2]) for i in (0, 2, 2, 4)]
    assert peer.requests[1].body == peer.requests[2].body == prepared.requests[1].payload
    assert len(compressed) == 3  # one gzip per body, at prepare; none per retry
    assert await sink.send(prepared) == WriteResult(6) and len(peer.requests) == 4  # all done: no post


async def test_rejected_lines_found_before_an_outage_are_kept_with_the_prepared_write(dead_letter) -> None:
    """Body 1 holds a bad line (bisected, rejected), body 2 meets an outage once: the retry
    resumes at body 2 and the result still names body 1's rejected line, once."""
    outage: list[int] = []

    def respond(req: Request) -> Reply:
        lines = req.text.splitlines()
        if any(b"BAD" in line for line in lines):
            msg = {"error": "partial write: unable to parse 'BAD': bad field dropped=1"}
            return Reply(400, {"Content-Type": "application/json"}, json.dumps(msg).encode())
        if lines[0].endswith(b" 4") and not outage:
            outage.append(1)
            return Reply(503)
        return Reply(204)

    lines = _lines(8)
    lines[1] = b"m,meter=x value=BAD 1"
    sleeps = Sleeps()
    async with HttpPeer(respond) as peer, _sink(peer.url, dead_letter, max_batch_lines=4) as sink:
        result = await send_until_written(sink, sink.prepare(lines), POLICY, sleep=sleeps)
    assert result.written == 7 and [r.record for r in result.rejected] == [lines[1]]
    # body 1: whole, [0 BAD], [0], [BAD], [2 3], never again; body 2: the outage, then accepted
    firsts = [r.text.splitlines()[0].rsplit(b" ", 1)[1] for r in peer.requests]
    assert firsts == [b"0", b"0", b"0", b"1", b"2", b"4", b"4"]
    assert len(sleeps.delays) == 1


@pytest.mark.parametrize(
    ("status", "body", "reason", "hint"),
    [
        (401, b'{"error":"authorization failed"}', "unauthorized", "username and password"),
        (
            403,
            b'{"error":"\\"u\\" user is not authorized to write to database \\"db\\""}',
            "forbidden",
            "WRITE",
        ),
        (404, b'{"error":"database not found: \\"db\\""}', "not_found", "create_database = true"),
        (400, b'{"error":"database is required"}', "refused", ""),
    ],
)
async def test_a_4xx_that_is_not_about_lines_is_our_refusal_never_the_datas(
    dead_letter, status: int, body: bytes, reason: str, hint: str
) -> None:
    """Credentials, privileges, a missing database or a bad request shape are our fault: a typed
    SinkRefused the caller keeps retrying, nothing dead-lettered, no bisection."""
    reply = Reply(status, {"Content-Type": "application/json"}, body)
    async with HttpPeer(lambda _req: reply) as peer, _sink(peer.url, dead_letter) as sink:
        with pytest.raises(SinkRefused) as info:
            await sink.write(_lines(8))
    assert (info.value.reason, info.value.retryable, info.value.status) == (reason, True, status)
    assert json.loads(body)["error"] in str(info.value) and hint in str(info.value)
    assert len(peer.requests) == 1 and dead_letter.count_by_reason() == {}


async def test_v1_create_database_on_a_missing_database_then_the_write_is_sent_again(dead_letter) -> None:
    created: list[bytes] = []

    def respond(req: Request) -> Reply:
        if req.path == "/query":
            created.append(req.text)
            return Reply(200, {"Content-Type": "application/json"}, b'{"results":[{"statement_id":0}]}')
        if not created:
            return Reply(
                404, {"Content-Type": "application/json"}, b'{"error":"database not found: \\"db\\""}'
            )
        return Reply(204)

    async with (
        HttpPeer(respond) as peer,
        _sink(peer.url, dead_letter, create_database=True) as sink,
    ):
        assert await sink.write(_lines(3)) == WriteResult(3)
    assert [r.path for r in peer.requests] == ["/write", "/query", "/write"]
    assert created == [b"q=CREATE+DATABASE+%22db%22"]


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (400, b'{"code":"invalid","message":"writing requires points"}', "accepts writes"),
        (404, b'{"code":"not found","message":"bucket \\"b\\" not found"}', "not_found"),
        (401, b'{"code":"unauthorized","message":"unauthorized access"}', "unauthorized"),
    ],
)
async def test_v2_probe_is_an_empty_write(dead_letter, status: int, body: bytes, outcome: str) -> None:
    """InfluxDB 2.x checks token, org and bucket before it sees the body: an empty write answered
    "writing requires points" proves all three without writing a point."""
    async with HttpPeer(lambda _req: Reply(status, {"Content-Type": "application/json"}, body)) as peer:
        cfg = SinkConfig(url=peer.url, api="v2", org="o", bucket="b", token="t", gzip=False)
        async with InfluxWriter(cfg) as sink:
            if outcome == "accepts writes":
                assert "bucket 'b' accepts writes" in await sink.probe()
            else:
                with pytest.raises(SinkRefused) as info:
                    await sink.probe()
                assert info.value.reason == outcome
    (req,) = peer.requests
    assert (req.path, req.query, req.body) == (
        "/api/v2/write",
        {"org": "o", "bucket": "b", "precision": "ms"},
        b"",
    )


async def test_connection_refused_is_retryable_and_not_retried_by_the_writer(dead_letter) -> None:
    from simulators.servers import free_port

    async with _sink(f"http://127.0.0.1:{free_port()}", dead_letter) as sink:
        with pytest.raises(SinkError) as info:
            await sink.write(_lines(1))
    assert info.value.retryable is True and info.value.status is None
    assert (sink.stats.requests, sink.stats.failures) == (1, 1)


@pytest.mark.parametrize("chunked", [False, True])
async def test_bisection_isolates_rejected_lines(dead_letter, chunked: bool) -> None:
    stored: list[bytes] = []

    def respond(req: Request) -> Reply:
        lines = req.text.splitlines()
        bad = [line for line in lines if b"BAD" in line]
        stored.extend(line for line in lines if b"BAD" not in line)  # like influxd: the good part is kept
        if not bad:
            return Reply(204)
        body = json.dumps(
            {"error": f"partial write: field type conflict: {bad[0].decode()} dropped={len(bad)}"}
        )
        return Reply(400, {"Content-Type": "application/json"}, body.encode(), chunked=chunked)

    lines = _lines(64)
    lines[5] = b"m,meter=x value=BAD 5"
    lines[40] = b"m,meter=x value=BAD 40"
    async with HttpPeer(respond) as peer, _sink(peer.url, dead_letter) as sink:
        result = await sink.write(lines)
    assert result.written == 62 and set(stored) == set(lines) - {lines[5], lines[40]}
    assert len(peer.requests) <= 2 * 2 * 6 + 1  # ~2 log2(n) requests per bad line
    # rejected, reported back with the server's reason; the writer stores no dead letter itself
    assert sorted(r.record for r in result.rejected) == sorted([lines[5], lines[40]])
    assert {r.reason for r in result.rejected} == {"field type conflict"}
    assert all(isinstance(r, Rejected) and "dropped=1" in r.detail for r in result.rejected)
    assert dead_letter.count_by_reason() == {}


async def test_413_splits_and_batches_are_bounded(dead_letter) -> None:
    def respond(req: Request) -> Reply:
        return Reply(413) if len(req.text.splitlines()) > 4 else Reply(204)

    async with HttpPeer(respond) as peer, _sink(peer.url, dead_letter, max_batch_lines=10) as sink:
        assert await sink.write(_lines(25)) == WriteResult(25)
    sizes = [len(r.text.splitlines()) for r in peer.requests]
    assert max(sizes) <= 10 and sum(s for s in sizes if s <= 4) == 25


async def test_max_batch_bytes_bounds_each_request(dead_letter) -> None:
    async with (
        HttpPeer(lambda _req: Reply(204)) as peer,
        _sink(peer.url, dead_letter, max_batch_bytes=100, gzip=False) as sink,
    ):
        await sink.write(_lines(30))
    assert all(len(r.body) <= 100 for r in peer.requests)
    assert b"".join(r.body for r in peer.requests).splitlines() == _lines(30)
    assert "content-encoding" not in peer.requests[0].headers


async def test_v1_basic_auth_and_retention_policy(dead_letter) -> None:
    async with HttpPeer(lambda _req: Reply(204)) as peer:
        cfg = SinkConfig(url=peer.url, api="v1", database="meters", retention_policy="raw",
                         username="ingest", password="pw")  # fmt: skip
        async with InfluxWriter(cfg) as sink:
            await sink.write(_lines(1))
    (req,) = peer.requests
    assert (req.path, req.query) == ("/write", {"db": "meters", "rp": "raw", "precision": "ms"})
    assert req.headers["authorization"] == "Basic aW5nZXN0OnB3"


async def test_ping_without_version_header_is_an_error(dead_letter) -> None:
    async with (
        HttpPeer(lambda _req: Reply(204)) as peer,
        InfluxWriter(SinkConfig(url=peer.url)) as sink,
    ):
        with pytest.raises(SinkRefused, match="X-Influxdb-Version") as info:
            await sink.write(_lines(1))
    assert info.value.reason == "api_unknown"


def test_backoff_and_retry_after_are_pure() -> None:
    assert [backoff_delay_s(a, 0.5, 3.0) for a in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    assert backoff_delay_s(2, 1.0, 10.0, jitter=0.1) == pytest.approx(2.2)
    assert _retry_after_s("12", 0.0) == 12.0
    assert _retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == pytest.approx(10.0)
    assert _retry_after_s("soon", 0.0) is None and _retry_after_s(None, 0.0) is None


def test_split_lines_drops_blank_lines_and_crlf() -> None:
    assert split_lines(b"a v=1\r\n\nb v=2\n") == [b"a v=1", b"b v=2"]
    assert split_lines([b"a v=1", b"  "]) == [b"a v=1"]


def test_config_loads_from_a_mapping_and_rejects_bad_values() -> None:
    from protocols.errors import ConfigError

    cfg = load(SinkConfig, {"url": "https://influx:8086", "api": "v2", "org": "o", "token": "t"})
    assert (cfg.api, cfg.gzip, cfg.max_batch_lines) == ("v2", True, 5000)
    with pytest.raises(ConfigError, match="api"):
        load(SinkConfig, {"api": "v9"})
    with pytest.raises(ConfigError, match="url"):
        load(SinkConfig, {"url": "ftp://x"})


async def test_concurrent_writes_share_the_connection_one_request_at_a_time(dead_letter) -> None:
    import asyncio

    async with HttpPeer(lambda _req: Reply(204)) as peer, _sink(peer.url, dead_letter) as sink:
        results = await asyncio.gather(*(sink.write([f"m value={i}i {i}".encode()]) for i in range(8)))
    assert results == [WriteResult(1)] * 8
    assert sorted(r.text for r in peer.requests) == sorted(f"m value={i}i {i}\n".encode() for i in range(8))


@pytest.mark.parametrize("level", range(10))
def test_gzip_body_is_a_gzip_member_of_the_body_at_every_level(level: int) -> None:
    import gzip

    from ingest.sinks.influx import http as sink

    body = b"".join(
        b"meter_reading,meter=M%d,gateway=g v=%di %d\n" % (i, i * 7, 1_700_000_000_000 + i)
        for i in range(3000)
    )
    packed = sink.gzip_body(body, level)
    assert packed[:2] == b"\x1f\x8b" and gzip.decompress(packed) == body
    if level:
        assert len(packed) < len(body) // 5
    # The ingest extra installs ISA-L; without it the fast path silently falls back to zlib.
    assert sink._isal_gzip is not None
