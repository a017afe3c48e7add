"""A poison stream through the real mosquitto into a running IngestWorker with the real influxd.

Hypothesis (derandomized) chooses a stream of over 10,000 messages on both topics ingest consumes,
``up/readings`` and ``up/events`` of two gateways: valid batches and events mixed with malformed
bytes, wrong-typed JSON, extreme values and timestamps, oversized payloads, duplicate-keyed JSON,
cross-gateway payloads (topic vs payload gateway, meters bound to the other gateway), meter indices
outside the table and redelivered batches. Each message carries its expected fate. The worker must
stay up and acknowledge every message; every valid batch's readings and every valid event are in
InfluxDB exactly once (queried and counted); every bad message is dead-lettered with its reason;
and a restart on the same broker session (with messages queued for it) does not crash.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from protocols.payload import BatchBuilder, Event, encode
from tests.integration.test_pipeline import T0, Q, _uid, count, ingest_toml, run_worker, topics_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
__all__ = ["run_worker"]  # the fixture, shared with test_pipeline

MESSAGES = 10_000
MAX_PAYLOAD = 16_384  # [mqtt] max_payload_bytes of the worker under test
METERS = 4  # per gateway, each bound to its gateway in the registry
UNDECODABLE = "undecodable"
MISMATCH = "gateway does not match topic"
NOT_BOUND = "meter not bound to gateway"
# Duplicate keys: json keeps the last one (a topic mismatch here); a stricter decoder refuses it.
EITHER = frozenset({MISMATCH, UNDECODABLE})

KINDS = (
    ["valid"] * 6
    + ["event"] * 3
    + ["garbage", "garbage_event", "wrong_type", "wrong_type_event", "extreme", "oversized"]
    + ["oversized_event", "dup_key", "dup_key_event", "topic_mismatch", "foreign_part", "foreign_all"]
    + ["forged_event", "foreign_event", "ancient_event", "bad_index", "empty_id", "redelivery"]
)
SPEC = st.tuples(st.sampled_from(KINDS), st.booleans(), st.integers(0, 2**16), st.binary(max_size=40))


def generate(n: int) -> list[tuple[str, bool, int, bytes]]:
    """At least ``n`` message specs, chosen by hypothesis (derandomized: the same every run)."""
    out: list[tuple[str, bool, int, bytes]] = []

    @settings(
        max_examples=n // 40 + 20, derandomize=True, database=None, deadline=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(st.lists(SPEC, min_size=40, max_size=60))
    def collect(specs: list[tuple[str, bool, int, bytes]]) -> None:
        out.extend(specs)

    collect()
    assert len(out) >= n
    return out


@dataclass(frozen=True)
class Ctx:
    """Where a message goes: its gateway's topics and meters, and the other gateway's."""

    gw: str
    other: str
    readings: str
    events: str
    own: list[str]
    foreign: list[str]


@dataclass
class Stream:
    """The messages and what each must become."""

    gateways: tuple[str, str]
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)  # dead letters expected, per reason
    either: int = 0  # dead letters whose reason is one of EITHER
    points: Counter[str] = field(default_factory=Counter)  # voltage points expected, per gateway
    events: int = 0
    batches: Counter[str] = field(default_factory=Counter)  # written | duplicate | dead_lettered
    last: dict[str, bytes] = field(default_factory=dict)
    seq: Counter[str] = field(default_factory=Counter)
    n: int = 0  # unique times and ids

    def meters(self, gw: str) -> list[str]:
        return [f"{gw}-m{i}" for i in range(METERS)]

    def batch(self, meters: list[str], x: int) -> BatchBuilder:
        self.n += 1
        b = BatchBuilder()
        for m in meters:
            for k in range(1 + x % 2):
                b.add(m, T0 + self.n * Q + k * 1_000, 30, 2_200 + x % 100)
        return b

    def build(self, gw: str, b: BatchBuilder, encoding: str = "binary", payload_gw: str = "") -> bytes:
        """The batch as gateway ``gw``'s next seq (its payload naming ``payload_gw`` if given)."""
        self.seq[gw] += 1
        batch = b.build(payload_gw or gw, self.seq[gw], sent_ms=T0 + self.n * Q)
        return encode(batch, encoding)  # type: ignore[arg-type]

    def add(self, kind: str, first: bool, x: int, blob: bytes) -> None:
        gw, other = self.gateways if first else self.gateways[::-1]
        topics = f"ami/v1/{gw}/up/readings", f"ami/v1/{gw}/up/events"
        c = Ctx(gw, other, *topics, self.meters(gw), self.meters(other))
        getattr(self, f"_{kind}")(c, x, blob)

    def dead(self, topic: str, payload: bytes, reason: str) -> None:
        """A message the worker must dead-letter with ``reason`` (counted as a dead-lettered
        message, events too)."""
        self.messages.append((topic, payload))
        self.reasons[reason] += 1
        self.batches["dead_lettered"] += 1

    # -- each kind: the message(s) and their expected fate ----------------------------------------

    def _valid(self, c: Ctx, x: int, blob: bytes) -> None:
        meters = c.own[: 1 + x % 3]
        payload = self.build(c.gw, self.batch(meters, x), "json" if x % 5 == 0 else "binary")
        self.messages.append((c.readings, payload))
        self.points[c.gw] += len(meters) * (1 + x % 2)
        self.batches["written"] += 1
        self.last[c.gw] = payload

    def _redelivery(self, c: Ctx, x: int, blob: bytes) -> None:
        if c.gw not in self.last:
            return self._valid(c, x, blob)
        self.messages.append((c.readings, self.last[c.gw]))
        self.batches["duplicate"] += 1
        return None

    def _event(self, c: Ctx, x: int, blob: bytes) -> None:
        self.n += 1
        kind = ("power_up", "relay_changed", "cover_opened", "meter_recovered")[x % 4]
        ev = Event(f"ev-{self.n}", c.gw, kind, T0 + self.n, c.own[x % METERS], {"x": x})
        self.messages.append((c.events, ev.to_json()))
        self.events += 1

    def _garbage(self, c: Ctx, x: int, blob: bytes) -> None:
        self.dead(c.readings, (b"AMI\x01" if x % 2 else b"\xff") + blob, UNDECODABLE)

    def _garbage_event(self, c: Ctx, x: int, blob: bytes) -> None:
        self.dead(c.events, (b"{" if x % 2 else b"") + blob, "undecodable event")

    def _wrong_type(self, c: Ctx, x: int, blob: bytes) -> None:
        doc = json.loads(self.build(c.gw, self.batch(c.own[:1], x), "json"))
        key, value = [("seq", "7"), ("meters", 5), ("readings", {}), ("v", True), ("sent_ms", -1)][x % 5]
        if x % 7 == 0:
            doc["readings"] = [{**doc["readings"][0], "value": 1.5}]
        doc[key] = value
        self.dead(c.readings, json.dumps(doc).encode(), UNDECODABLE)

    def _wrong_type_event(self, c: Ctx, x: int, blob: bytes) -> None:
        doc = json.loads(Event("w", c.gw, "power_up", T0, c.own[0]).to_json())
        key, value = [("ts_ms", "x"), ("meter", 5), ("detail", []), ("kind", "nope"), ("id", None)][x % 5]
        doc[key] = value
        self.dead(c.events, json.dumps(doc).encode(), "undecodable event")

    def _extreme(self, c: Ctx, x: int, blob: bytes) -> None:
        # Decodable, so written with flags (a time InfluxDB cannot store is dead-lettered as a line).
        self.n += 1
        b = BatchBuilder()
        values = (2**62, 2**63 - 1, -(2**63), -(2**62), 10**15 + 1)
        times = (0, -(10**12), 2**40, 946_684_799_999, T0 + self.n * Q)
        b.set_prev(c.own[0], 1, values[x % 5], times[(x >> 3) % 5])
        b.add(c.own[0], times[x % 5], 1, values[(x >> 2) % 5])
        b.add(c.own[0], T0 + self.n * Q, 1, values[(x >> 4) % 5])
        b.add(c.own[0], T0 + self.n * Q, 40, values[(x >> 5) % 5])
        self.messages.append((c.readings, self.build(c.gw, b)))
        self.batches["written"] += 1

    def _oversized(self, c: Ctx, x: int, blob: bytes) -> None:
        self.dead(c.readings, b"AMI\x01" + bytes(MAX_PAYLOAD + 1 + x), "payload too large")

    def _oversized_event(self, c: Ctx, x: int, blob: bytes) -> None:
        payload = b'{"v":1,"detail":"' + b"x" * (MAX_PAYLOAD + x) + b'"}'
        self.dead(c.events, payload, "payload too large")

    def _dup_key(self, c: Ctx, x: int, blob: bytes) -> None:
        text = self.build(c.gw, self.batch(c.own[:1], x), "json").decode()
        payload = text.replace(f'"gateway":"{c.gw}"', f'"gateway":"{c.gw}","gateway":"{c.other}"').encode()
        self.messages.append((c.readings, payload))
        self.either += 1
        self.batches["dead_lettered"] += 1

    def _dup_key_event(self, c: Ctx, x: int, blob: bytes) -> None:
        text = Event(f"dk-{x}", c.gw, "power_up", T0, c.own[0]).to_json().decode()
        payload = text.replace(f'"gateway":"{c.gw}"', f'"gateway":"{c.gw}","gateway":"{c.other}"').encode()
        self.messages.append((c.events, payload))
        self.either += 1
        self.batches["dead_lettered"] += 1

    def _topic_mismatch(self, c: Ctx, x: int, blob: bytes) -> None:
        payload = self.build(c.gw, self.batch(c.foreign[:1], x), payload_gw=c.other)
        self.dead(c.readings, payload, MISMATCH)

    def _foreign_part(self, c: Ctx, x: int, blob: bytes) -> None:
        mine = c.own[: 1 + x % 2]
        payload = self.build(c.gw, self.batch([*mine, c.foreign[x % METERS]], x))
        self.messages.append((c.readings, payload))
        self.reasons[NOT_BOUND] += 1  # the foreign meter's part; the rest is written
        self.points[c.gw] += len(mine) * (1 + x % 2)
        self.batches["written"] += 1

    def _foreign_all(self, c: Ctx, x: int, blob: bytes) -> None:
        self.dead(c.readings, self.build(c.gw, self.batch(c.foreign[:2], x)), NOT_BOUND)

    def _forged_event(self, c: Ctx, x: int, blob: bytes) -> None:
        ev = Event(f"forged-{x}", c.other, "power_down", T0 + x, c.foreign[x % METERS])
        self.dead(c.events, ev.to_json(), MISMATCH)

    def _foreign_event(self, c: Ctx, x: int, blob: bytes) -> None:
        ev = Event(f"claimed-{x}", c.gw, "power_down", T0 + x, c.foreign[x % METERS])
        self.dead(c.events, ev.to_json(), NOT_BOUND)

    def _ancient_event(self, c: Ctx, x: int, blob: bytes) -> None:
        ev = Event(f"old-{x}", c.gw, "power_up", x, c.own[0])  # 1970-01-01
        self.dead(c.events, ev.to_json(), "event time out of bounds")

    def _bad_index(self, c: Ctx, x: int, blob: bytes) -> None:
        doc = json.loads(self.build(c.gw, self.batch(c.own[:1], x), "json"))
        doc["readings"][0]["meter"] = 1 + x % 50
        self.dead(c.readings, json.dumps(doc).encode(), "meter index out of range")

    def _empty_id(self, c: Ctx, x: int, blob: bytes) -> None:
        doc = json.loads(self.build(c.gw, self.batch(c.own[:1], x), "json"))
        doc["meters"] = [""]
        self.dead(c.readings, json.dumps(doc).encode(), "empty meter id")


def publish(host: str, port: int, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"poison-{_uid()}")
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(60)
    finally:
        client.loop_stop()
        client.disconnect()


def registry(tmp: Path, stream: Stream) -> str:
    path = tmp / "meters.toml"
    path.write_text(
        "".join(
            f'[meters."{m}"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\narea = "TA-{gw}"\ngateway = "{gw}"\n'
            for gw in stream.gateways
            for m in stream.meters(gw)
        )
    )
    return str(path)


def acked(w: Any) -> int:
    return w._res.consumer.stats.acked if w._res is not None and w._res.consumer is not None else 0


def dead_letters(w: Any) -> Counter[str]:
    """The worker's dead letters per reason (its counter)."""
    samples = (s for metric in w.metrics.dead_letters.collect() for s in metric.samples)
    return Counter({s.labels["reason"]: int(s.value) for s in samples if s.name.endswith("_total")})


async def wait_acked(w: Any, n: int, task: asyncio.Task[None], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while acked(w) < n:
        assert not task.done(), "the worker stopped"
        assert time.monotonic() < deadline, f"{acked(w)} of {n} messages acknowledged"
        await asyncio.sleep(0.2)


async def test_a_poison_stream_on_both_topics_leaves_the_worker_up_and_every_valid_message_once(
    mosquitto: Any, influx_db: Any, tmp_path: Path
) -> None:
    from ingest.config import parse_config
    from ingest.pipeline.worker import IngestWorker

    influxd, db = influx_db
    stream = Stream((f"gw-p-{_uid()}", f"gw-q-{_uid()}"))
    for spec in generate(MESSAGES):
        stream.add(*spec)
    assert len(stream.messages) >= MESSAGES
    text = ingest_toml(
        tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", list(stream.gateways), events=True),
        registry=registry(tmp_path, stream), queue_max=64,
    )  # fmt: skip
    text = text.replace("[influx]", f"max_payload_bytes = {MAX_PAYLOAD}\n[influx]")
    cfg = parse_config(text)

    w = IngestWorker(cfg)
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(w.ready.wait(), 15)
    try:
        await asyncio.to_thread(publish, mosquitto.host, mosquitto.port, stream.messages)
        await wait_acked(w, len(stream.messages), task, 150)
    finally:
        w.stop()
        await asyncio.wait_for(task, 15)

    got = dead_letters(w)
    either = sum(got.pop(r, 0) - stream.reasons.get(r, 0) for r in EITHER)
    assert either == stream.either and +got == +Counter(
        {r: n for r, n in stream.reasons.items() if r not in EITHER}
    )
    for result, n in stream.batches.items():
        assert w.metrics.batches.labels(result)._value.get() == n, result
    for gw in stream.gateways:
        q = f"SELECT count(voltage_a) FROM meter_reading WHERE gateway = '{gw}'"
        assert count(influxd, db, q) == stream.points[gw], gw
    assert count(influxd, db, "SELECT count(id) FROM events") == stream.events

    # A restart on the same broker session, with a poisoned backlog queued for it while it was down.
    later = Stream(stream.gateways, seq=stream.seq, n=stream.n)
    for spec in generate(200)[:200]:
        later.add(*spec)
    await asyncio.to_thread(publish, mosquitto.host, mosquitto.port, later.messages)
    w2 = IngestWorker(cfg)
    task2 = asyncio.create_task(w2.run())
    try:
        await asyncio.wait_for(w2.ready.wait(), 15)
        await wait_acked(w2, len(later.messages), task2, 60)
    finally:
        w2.stop()
        await asyncio.wait_for(task2, 15)
    for gw in stream.gateways:
        q = f"SELECT count(voltage_a) FROM meter_reading WHERE gateway = '{gw}'"
        assert count(influxd, db, q) == stream.points[gw] + later.points[gw], gw
