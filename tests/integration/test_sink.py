"""InfluxWriter (the InfluxDB sink's HTTP writes) against the real influxd 1.x (Debian package), plus the v2 request shape.

The v1 tests are the integration proof (a real server stores and returns the points). The v2
test checks the request the sink sends (path, query, token, gzip, body) against a scripted HTTP
peer that records it: a protocol-level check, not a stand-in database.
"""

from __future__ import annotations

import asyncio
import urllib.parse
import uuid
from pathlib import Path

import pytest

from ingest.pipeline.deadletter import DeadLetterStore
from ingest.sinks.base import RetryPolicy, WriteResult, send_until_written
from ingest.sinks.influx.http import InfluxWriter, SinkConfig
from protocols.errors import SinkError, SinkRefused
from simulators.servers import Influxd
from tests.conftest import INFLUX_ADMIN
from tests.unit.ingest.io.http_peer import HttpPeer, Reply, Request

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


@pytest.fixture
def dead_letter(tmp_path: Path) -> DeadLetterStore:
    store = DeadLetterStore(tmp_path / "dead.sqlite")
    yield store
    store.close()


def _sink(influxd: Influxd, db: str, dead_letter: DeadLetterStore, **overrides: object) -> InfluxWriter:
    cfg = SinkConfig(url=influxd.url, database=db, **overrides)  # type: ignore[arg-type]
    return InfluxWriter(cfg)


async def test_gzip_write_is_queryable_with_escaped_tags(influx_db, dead_letter) -> None:
    influxd, db = influx_db
    lines = [
        f"energy,meter=000012345678,site=north\\ yard\\,b\\=1 value={i}i,flags=0i {T0 + i * 900_000}".encode()
        for i in range(200)
    ]
    async with _sink(influxd, db, dead_letter, api="v1") as sink:
        result = await sink.write(b"\n".join(lines) + b"\n")
        assert result == WriteResult(200)
        assert sink.stats.bytes_sent < sum(map(len, lines)) // 3  # the body really went gzip-compressed
    rows = influxd.query("SELECT value, site FROM energy ORDER BY time", db=db)
    assert [r["value"] for r in rows] == list(range(200))
    assert rows[0]["time"] == T0 and rows[-1]["time"] == T0 + 199 * 900_000
    assert {r["site"] for r in rows} == {"north yard,b=1"}
    assert dead_letter.count_by_reason() == {}


async def test_ping_detects_v1_on_debian_influxd(influx_db, dead_letter) -> None:
    influxd, db = influx_db
    async with _sink(influxd, db, dead_letter, api="auto") as sink:
        assert sink.api is None
        assert await sink.detect_api() == "v1"
        assert (await sink.write([f"m value=1i {T0}".encode()])).written == 1
    assert influxd.query("SELECT value FROM m", db=db) == [{"time": T0, "value": 1}]


async def test_bad_lines_are_rejected_with_the_servers_reason_and_good_lines_written(influx_db) -> None:
    influxd, db = influx_db
    influxd.write(f"power,meter=m0 value=0i {T0}", db=db)  # the schema: value is an integer field
    good = [f"power,meter=m{i} value={i}i {T0 + i}".encode() for i in range(1, 31)]
    malformed = b"power,meter=broken value= 12"
    conflict = f'power,meter=m99 value="not a number" {T0 + 99}'.encode()
    batch = [*good[:3], malformed, *good[3:20], conflict, *good[20:]]

    async with InfluxWriter(SinkConfig(url=influxd.url, database=db, api="v1")) as sink:
        result = await sink.write(batch)

    assert result.written == 30 and len(result.rejected) == 2
    rows = influxd.query("SELECT value FROM power", db=db)
    assert sorted(r["value"] for r in rows) == list(range(31))
    entries = {e.reason: e for e in result.rejected}
    assert set(entries) == {"unable to parse", "field type conflict"}
    assert entries["unable to parse"].record == malformed
    assert entries["field type conflict"].record == conflict
    assert "conflict" in entries["field type conflict"].detail  # influxd's own message is kept
    assert "unable to parse" in entries["unable to parse"].detail


async def test_unknown_database_is_our_refusal_and_create_database_creates_it(influxd, dead_letter) -> None:
    name = f"missing_{uuid.uuid4().hex[:8]}"
    async with _sink(influxd, name, dead_letter, api="v1") as sink:
        with pytest.raises(SinkRefused) as info:
            await sink.write([f"m value=1i {T0}".encode()])
        with pytest.raises(SinkRefused, match="create_database = true"):
            await sink.probe()
    assert (info.value.reason, info.value.retryable, info.value.status) == ("not_found", True, 404)
    assert dead_letter.count_by_reason() == {}  # a config error is not the data's fault
    try:
        async with _sink(influxd, name, dead_letter, api="v1", create_database=True) as sink:
            assert (await sink.write([f"m value=1i {T0}".encode()])).written == 1
            assert f"database '{name}' accepts writes" in await sink.probe()
        assert influxd.query("SELECT value FROM m", db=name) == [{"time": T0, "value": 1}]
    finally:
        influxd.drop_database(name)


async def test_probe_of_a_server_with_authentication(influxd_auth, dead_letter) -> None:
    """Wrong password 401, a user without WRITE 403, the right credentials accepted; the probe
    writes no point."""
    db = f"probe_{uuid.uuid4().hex[:8]}"
    influxd_auth.create_database(db)
    influxd_auth.create_user(f"r_{db}", "r", {db: "READ"})
    try:
        for user, password, reason in (
            (INFLUX_ADMIN[0], "wrong", "unauthorized"),
            (f"r_{db}", "r", "forbidden"),
        ):
            async with _sink(influxd_auth, db, dead_letter, username=user, password=password) as sink:
                with pytest.raises(SinkRefused) as info:
                    await sink.probe()
                assert info.value.reason == reason
        async with _sink(
            influxd_auth, db, dead_letter, username=INFLUX_ADMIN[0], password=INFLUX_ADMIN[1]
        ) as sink:
            assert "accepts writes" in await sink.probe()
        assert influxd_auth.query("SHOW MEASUREMENTS", db=db) == []
    finally:
        influxd_auth.drop_database(db)


async def test_outage_raises_retryable_at_once_then_the_retry_layer_writes_after_restart(
    influx_db, dead_letter
) -> None:
    influxd, db = influx_db
    async with _sink(influxd, db, dead_letter, api="v1") as sink:
        await sink.write([f"m value=1i {T0}".encode()])  # a live keep-alive connection first
        influxd.stop()
        before = sink.stats.requests
        with pytest.raises(SinkError) as info:
            await sink.write([f"m value=2i {T0 + 1}".encode()])
        assert info.value.retryable is True
        assert sink.stats.requests == before + 1  # one request: the writer does not retry

        failures: list[int] = []

        def restart_after_two(_exc: Exception, attempt: int, _delay: float | None) -> None:
            failures.append(attempt)
            if attempt == 2:
                influxd.start()

        prepared = sink.prepare([f"m value=2i {T0 + 1}".encode()])
        policy = RetryPolicy(0.05, 0.2, attempts=10)
        result = await send_until_written(sink, prepared, policy, on_failure=restart_after_two)
        assert result.written == 1 and failures == [1, 2] and prepared.done == 1
    assert [r["value"] for r in influxd.query("SELECT value FROM m", db=db)] == [1, 2]


async def test_create_database(influxd, dead_letter) -> None:
    name = f"created_{uuid.uuid4().hex[:8]}"
    async with _sink(influxd, name, dead_letter, api="auto") as sink:
        await sink.create_database(name)
        await sink.create_database(name)  # idempotent
        assert (await sink.write([f"m value=7i {T0}".encode()])).written == 1
    try:
        assert name in influxd.databases()
        assert influxd.query("SELECT value FROM m", db=name) == [{"time": T0, "value": 7}]
    finally:
        influxd.drop_database(name)


@pytest.mark.parametrize("version", ["v2.7.11", "3.0.1"])
async def test_v2_request_shape(dead_letter, version: str) -> None:
    def respond(req: Request) -> Reply:
        if req.path == "/ping":
            return Reply(204, {"X-Influxdb-Version": version, "X-Influxdb-Build": "OSS"})
        return Reply(204)

    lines = [f"energy,meter=a value={i}i {T0 + i}".encode() for i in range(5)]
    async with HttpPeer(respond) as peer:
        cfg = SinkConfig(url=peer.url, api="auto", org="acme", bucket="meters", token="s3cr3t")
        async with InfluxWriter(cfg) as sink:
            assert (await sink.write(lines)) == WriteResult(5)
            assert sink.api == "v2"

    ping, write = peer.requests
    assert (ping.method, ping.path) == ("GET", "/ping")
    assert (write.method, write.path) == ("POST", "/api/v2/write")
    assert write.query == {"org": "acme", "bucket": "meters", "precision": "ms"}
    assert write.headers["authorization"] == "Token s3cr3t"
    assert write.headers["content-encoding"] == "gzip"
    assert write.headers["content-type"].startswith("text/plain")
    assert write.text == b"\n".join(lines) + b"\n"


async def test_v2_write_is_the_request_influxdb_client_sends(dead_letter) -> None:
    """No 2.x/3.x server is packaged for the test machines, so the v2 path is held to the reference
    client instead: influxdb-client's own write of the same lines must produce the same request
    (method, path, org/bucket/precision, token auth, gzip, body) as the sink's."""
    from influxdb_client import InfluxDBClient, WritePrecision
    from influxdb_client.client.write_api import SYNCHRONOUS

    lines = [f"energy,meter=a\\ b value={i}i {T0 + i}".encode() for i in range(5)]
    async with HttpPeer(lambda req: Reply(204)) as peer:
        cfg = SinkConfig(url=peer.url, api="v2", org="acme", bucket="meters", token="s3cr3t")
        async with InfluxWriter(cfg) as sink:
            assert (await sink.write(lines)) == WriteResult(5)

        def reference_write() -> None:
            with InfluxDBClient(url=peer.url, token="s3cr3t", org="acme", enable_gzip=True) as client:
                client.write_api(write_options=SYNCHRONOUS).write(
                    bucket="meters", record=b"\n".join(lines), write_precision=WritePrecision.MS
                )

        await asyncio.to_thread(reference_write)

    ours, theirs = peer.requests
    assert (ours.method, ours.path, ours.query) == (theirs.method, theirs.path, theirs.query)
    for header in ("authorization", "content-encoding"):
        assert ours.headers[header] == theirs.headers[header], header
    assert ours.headers["content-type"].split(";")[0] == theirs.headers["content-type"].split(";")[0]
    assert ours.text.rstrip(b"\n") == theirs.text.rstrip(b"\n")


async def test_v2_influxql_read_back_uses_the_v1_compatibility_endpoint() -> None:
    """Daily totals, outage correlation and completeness read InfluxQL; on 2.x/3.x that is the
    v1-compatibility ``/query`` with the bucket as ``db`` (a DBRP mapping) and token auth."""
    from ingest.sinks.influx.query import InfluxQuery

    body = b'{"results":[{"statement_id":0,"series":[{"name":"m","tags":{"meter":"a b"},"columns":["time","v"],"values":[[1,2]]}]}]}'
    async with HttpPeer(lambda req: Reply(200, {"Content-Type": "application/json"}, body)) as peer:
        query = InfluxQuery(SinkConfig(url=peer.url, api="v2", org="acme", bucket="meters", token="s3cr3t"))
        try:
            assert await query.rows('SELECT "v" FROM "m" GROUP BY meter') == [
                {"meter": "a b", "time": 1, "v": 2}
            ]
        finally:
            await query.aclose()
    [req] = peer.requests
    assert (req.method, req.path, req.headers["authorization"]) == ("POST", "/query", "Token s3cr3t")
    form = dict(urllib.parse.parse_qsl(req.body.decode()))
    assert form == {"db": "meters", "q": 'SELECT "v" FROM "m" GROUP BY meter', "epoch": "ms"}


async def test_interval_reads_come_back_from_influxd_as_messagepack(influx_db) -> None:
    """The rollup's read of many intervals asks for MessagePack, which influxd 1.x answers only to
    an Accept header of exactly that type (a list with q-values gets JSON, at more of its CPU)."""
    from ingest.sinks.influx.sink import InfluxSink
    from protocols.quantities import ENERGY_FORWARD

    influxd, db = influx_db
    t0 = 1_710_000_000_000
    influxd.write(
        b"intervals,meter=M\\ 1,gateway=g energy_fwd_active_total=0.25 %d\n"
        b"intervals,meter=M2,gateway=g energy_fwd_active_total=0.5,energy_fwd_active_total_flags=8i %d\n"
        % (t0 + 900_000, t0 + 1_800_000),
        db,
    )
    async with InfluxSink(SinkConfig(url=influxd.url, api="v1", database=db)) as sink:
        got = await sink.day_intervals(t0, t0 + 86_400_000, (ENERGY_FORWARD, 2))
        assert sink.query.answered == "application/x-msgpack"
    rows = sorted(
        zip(
            [got.meters[m] for m in got.meter],
            got.end_ts.tolist(),
            got.energy.tolist(),
            got.flags.tolist(),
            strict=True,
        )
    )
    assert rows == [("M 1", t0 + 900_000, 25, 0), ("M2", t0 + 1_800_000, 50, 8)]
