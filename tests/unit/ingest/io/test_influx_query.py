"""The InfluxQL client (:class:`ingest.sinks.influx.query.InfluxQuery`) against a scripted peer:
it asks for MessagePack, reads whichever of MessagePack or JSON comes back, and refuses an answer
the server cut short rather than returning a short read."""

from __future__ import annotations

import json

import msgpack
import pytest

from ingest.sinks.influx.http import SinkConfig
from ingest.sinks.influx.query import InfluxQuery
from protocols.errors import SinkError
from tests.unit.ingest.io.http_peer import HttpPeer, Reply

DOC = {
    "results": [
        {"statement_id": 0, "series": [{"name": "x", "columns": ["time", "v"], "values": [[1, 0.5]]}]}
    ]
}


def _query(url: str) -> InfluxQuery:
    return InfluxQuery(SinkConfig(url=url, api="v1", database="db"))


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("application/x-msgpack", msgpack.packb(DOC)), ("application/json", json.dumps(DOC).encode())],
)
async def test_msgpack_is_asked_for_and_either_answer_is_read(content_type: str, body: bytes) -> None:
    async with HttpPeer(lambda _req: Reply(200, {"Content-Type": content_type}, body)) as peer:
        q = _query(peer.url)
        try:
            assert await q.rows("SELECT v FROM x") == [{"time": 1, "v": 0.5}]
        finally:
            await q.aclose()
    assert peer.requests[0].headers["accept"] == "application/x-msgpack"


async def test_an_answer_cut_short_by_max_row_limit_is_an_error_not_a_short_read() -> None:
    cut = {"results": [{**DOC["results"][0], "partial": True}]}
    body = msgpack.packb(cut)
    async with HttpPeer(lambda _req: Reply(200, {"Content-Type": "application/x-msgpack"}, body)) as peer:
        q = _query(peer.url)
        try:
            with pytest.raises(SinkError, match="max-row-limit") as err:
                await q.series("SELECT v FROM x")
        finally:
            await q.aclose()
    assert not err.value.retryable


async def test_a_series_marked_partial_is_a_chunk_and_read_whole() -> None:
    doc = {"results": [{"statement_id": 0, "series": [{**DOC["results"][0]["series"][0], "partial": True}]}]}  # type: ignore[index]
    async with HttpPeer(
        lambda _req: Reply(200, {"Content-Type": "application/json"}, json.dumps(doc).encode())
    ) as peer:
        q = _query(peer.url)
        try:
            assert len(await q.series("SELECT v FROM x")) == 1
        finally:
            await q.aclose()
