"""Poison stream: a running ``amigw feectl`` (child process) against a real mosquitto receives a
generated stream (hypothesis) of more than 10,000 messages on both topics it consumes, mixing valid
interval messages with malformed, wrong-typed, extreme-valued (2^62), oversized, duplicate-keyed
and cross-gateway ones, and forged, garbled or misdirected command results. It is SIGKILLed half
way through and restarted on the same broker session (the unacknowledged messages, poison
included, are redelivered to it).

Shown: the process stays up; every valid interval is charged exactly once (the ledger's charge
rows equal the valid intervals sent, one each); every bad message is in the rejects table with its
expected reason (matched by the payload's SHA-256); nothing is rejected as ``internal_error``; and
every message was acknowledged: a clean restart on the same session receives nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ingest.feectl.sqlite_store import SqliteLedgerStore
from ingest.mqtt.consumer import OVERSIZE_PREFIX_BYTES
from protocols.aggregates import MAX_MESSAGE_BYTES, IntervalRecord, encode_intervals
from protocols.commands import CommandResult
from protocols.flags import Flag
from simulators.servers import Mosquitto, free_port
from tests.integration.test_feectl_service import FLAT

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

N_MESSAGES = 10_000
KEY = bytes(range(32))
WRONG_KEY = bytes(range(1, 33))
Q = 900_000
MAX_ENERGY = 2_500  # 100 kW (the default rating) for 15 minutes, in 0.01 kWh
ESTIMATED = int(Flag.ESTIMATED)


# -- the generated stream ----------------------------------------------------------------------------
# A spec is plain data drawn by hypothesis; render() turns it into (topic, payload, expectation),
# giving every interval a start of its own so that "charged exactly once" can be counted.
GOOD_RECORD = st.tuples(st.just("ok"), st.integers(0, 5), st.integers(0, MAX_ENERGY), st.booleans())
BAD_RECORD = st.sampled_from(
    ["energy_2_62", "energy_negative", "energy_10_30", "epoch_0", "future", "zero_length", "cross_gateway"]
)
SKIPPED_RECORD = st.sampled_from(["unenrolled", "other_quantity"])
INTERVALS = st.tuples(
    st.just("intervals"),
    st.sampled_from(["json", "binary"]),
    st.lists(
        st.one_of(GOOD_RECORD, GOOD_RECORD, GOOD_RECORD, BAD_RECORD, SKIPPED_RECORD), min_size=1, max_size=4
    ),
)
WRONG_TYPES = st.sampled_from(['"5"', "1.5", "true", "null", "[1]", "{}"])
MESSAGE = st.one_of(
    INTERVALS,
    INTERVALS,
    INTERVALS,
    INTERVALS,
    st.tuples(st.just("garbage"), st.binary(max_size=200)),
    st.tuples(st.just("truncated"), st.sampled_from(["json", "binary"]), st.floats(0, 0.99)),
    st.tuples(
        st.just("wrong_type"),
        st.sampled_from(["energy", "start_ms", "meter", "batch_seq", "gateway", "intervals"]),
        WRONG_TYPES,
    ),
    st.tuples(st.just("duplicate_key"), st.sampled_from(["energy", "gateway", "meter"])),
    st.just(("payload_gateway",)),
    st.just(("agg_topic",)),
    st.just(("repeat",)),
    st.tuples(
        st.just("result"),
        st.sampled_from(
            ["garbled", "forged", "other_gateway", "unknown_id", "read_now", "unknown_topic", "dup_key"]
        ),
        st.binary(max_size=100),
    ),
)


def generate(n: int) -> list[tuple[Any, ...]]:
    specs: list[tuple[Any, ...]] = []

    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(MESSAGE)
    def collect(spec: tuple[Any, ...]) -> None:
        specs.append(spec)

    while len(specs) < n:
        collect()
    return specs[:n]


@dataclass
class Expect:
    charges: set[tuple[str, int]] = field(default_factory=set)  # (meter, start) charged by it
    reasons: set[str] = field(default_factory=set)  # reasons it must be rejected with


@dataclass
class Stream:
    tag: str
    now_ms: int
    gw1_meters: list[str]
    gw2_meter: str
    slot: int = 0
    last_valid: tuple[str, bytes] | None = None

    def start(self) -> int:
        self.slot += 1
        return self.now_ms - (self.slot + 1) * Q

    def record(self, kind: Any, encoding: str, expect: Expect) -> IntervalRecord:
        if kind[0] == "ok":
            _, m, energy, estimated = kind
            start = self.start()
            expect.charges.add((self.gw1_meters[m], start))
            return IntervalRecord(
                self.gw1_meters[m], 1, start, start + Q, energy, ESTIMATED if estimated else 0
            )
        meter, start = self.gw1_meters[0], self.start()
        end, energy, quantity = start + Q, 10, 1
        reason = {
            "energy_2_62": "energy_out_of_range",
            "energy_negative": "energy_out_of_range",
            "energy_10_30": "energy_out_of_range",
            "epoch_0": "time_out_of_range",
            "future": "time_out_of_range",
            "zero_length": "interval_length_out_of_range",
            "cross_gateway": "gateway_mismatch",
        }.get(kind)
        if kind == "energy_2_62":
            energy = 2**62
        elif kind == "energy_negative":
            energy = -1
        elif kind == "energy_10_30":
            energy = 10**30 if encoding == "json" else 2**63 - 1
        elif kind == "epoch_0":
            start, end = 0, Q
        elif kind == "future":
            start, end = self.now_ms + 3_600_000, self.now_ms + 3_600_000 + Q
        elif kind == "zero_length":
            end = start
        elif kind == "cross_gateway":
            meter = self.gw2_meter
        elif kind == "unenrolled":
            meter = f"x-{self.tag}"
        elif kind == "other_quantity":
            quantity = 2
        if reason is not None:
            expect.reasons.add(reason)
        return IntervalRecord(meter, quantity, start, end, energy, 0)

    def intervals(self, encoding: str, records: list[IntervalRecord], gateway: str = "gw-1") -> bytes:
        if any(r.energy >= 2**63 for r in records):  # beyond what our encoder writes: by hand
            doc = {"v": 1, "type": "intervals", "gateway": gateway, "batch_seq": self.slot}
            doc["intervals"] = [dataclasses.asdict(r) for r in records]
            return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        if encoding == "json":
            return encode_intervals(gateway, self.slot, records, "json")
        return encode_intervals(gateway, self.slot, records, "binary")

    def one_valid(self, encoding: str) -> bytes:
        """A valid message of one interval on a new start (charged unless it is spoilt)."""
        start = self.start()
        return self.intervals(encoding, [IntervalRecord(self.gw1_meters[0], 1, start, start + Q, 5, 0)])

    def render(self, spec: tuple[Any, ...]) -> tuple[str, bytes, Expect]:
        e = Expect()
        topic = "ami/v1/agg/intervals/gw-1"
        kind = spec[0]
        if kind == "intervals":
            encoding = spec[1]
            payload = self.intervals(encoding, [self.record(k, encoding, e) for k in spec[2]])
            if not e.reasons:
                self.last_valid = (topic, payload)
            return topic, payload, e
        if kind == "repeat" and self.last_valid is not None:  # the same message again: no new charge
            return self.last_valid[0], self.last_valid[1], e
        if kind == "garbage":
            e.reasons.add("undecodable")
            return topic, b"\x00" + spec[1], e  # never valid JSON nor the binary magic
        if kind == "truncated":
            whole = self.one_valid(spec[1])
            e.reasons.add("undecodable")
            return topic, whole[: int(len(whole) * spec[2])], e
        if kind == "wrong_type":
            doc = json.loads(self.one_valid("json"))
            name, value = spec[1], spec[2]
            if name in ("meter", "gateway") and value == '"5"':
                value = "5"  # a string is the right type there
            target = doc if name in ("batch_seq", "gateway", "intervals") else doc["intervals"][0]
            target[name] = json.loads(value)
            e.reasons.add("undecodable")
            return topic, json.dumps(doc).encode(), e
        if kind == "duplicate_key":
            text = self.one_valid("json").decode()
            key = spec[1]
            at = text.index(f'"{key}":')
            e.reasons.add("undecodable")
            return topic, (text[:at] + f'"{key}": "dup", ' + text[at:]).encode(), e
        if kind == "payload_gateway":
            e.reasons.add("gateway_mismatch")
            start = self.start()
            records = [IntervalRecord(self.gw2_meter, 1, start, start + Q, 5, 0)]
            return topic, self.intervals("json", records, "gw-2"), e
        if kind == "agg_topic":
            e.reasons.add("bad_topic")
            return "ami/v1/agg/intervals/agg", self.intervals("binary", [], "agg"), e
        if kind == "result":
            return self.result(spec[1], spec[2], e)
        return topic, self.one_valid("binary"), self.expect_one_valid(e)

    def expect_one_valid(self, e: Expect) -> Expect:
        e.charges.add((self.gw1_meters[0], self.now_ms - (self.slot + 1) * Q))
        return e

    def result(self, kind: str, noise: bytes, e: Expect) -> tuple[str, bytes, Expect]:
        topic = "ami/v1/gw-1/up/cmd-result"
        ts = self.now_ms
        cid = uuid.uuid4().hex
        meter = self.gw1_meters[1]
        if kind == "garbled":
            e.reasons.add("unverified")
            return topic, b"\x00" + noise, e
        if kind == "forged":
            e.reasons.add("unverified")
            return (
                topic,
                CommandResult(cid, "gw-1", meter, "trip", "done", ts, relay_state=1).signed(WRONG_KEY),
                e,
            )
        if kind == "other_gateway":
            e.reasons.add("gateway_mismatch")
            return topic, CommandResult(cid, "gw-2", meter, "trip", "done", ts).signed(KEY), e
        if kind == "unknown_id":  # verified, matched to nothing: journaled as ignored
            return topic, CommandResult(cid, "gw-1", meter, "trip", "failed", ts).signed(KEY), e
        if kind == "read_now":  # not a relay command of fee control's: ignored
            return topic, CommandResult(cid, "gw-1", meter, "read_now", "done", ts).signed(KEY), e
        if kind == "unknown_topic":
            e.reasons.add("unknown_gateway")
            return (
                "ami/v1/gw-9/up/cmd-result",
                CommandResult(cid, "gw-9", meter, "trip", "done", ts).signed(KEY),
                e,
            )
        # a duplicate key whose second (last-wins) value is not the signed one
        text = CommandResult(cid, "gw-1", meter, "trip", "done", ts).signed(KEY).decode()
        e.reasons.add("unverified")
        return topic, text.replace('"status":"done"', '"status":"done","status":"failed"', 1).encode(), e


# -- the running service -----------------------------------------------------------------------------
def write_config(tmp: Path, broker: Mosquitto, tag: str, metrics_port: int) -> Path:
    (tmp / "gw.key").write_text(KEY.hex())
    (tmp / "flat.toml").write_text(FLAT)
    accounts = "".join(
        f'[[service.accounts]]\naccount_id = "a{i}-{tag}"\ntariff = "flat"\n'
        f'meters = [{{ meter = "m{2 * i}-{tag}", gateway = "gw-1" }}, {{ meter = "m{2 * i + 1}-{tag}", gateway = "gw-1" }}]\n'
        for i in range(3)
    )
    accounts += f'[[service.accounts]]\naccount_id = "b-{tag}"\ntariff = "flat"\n'
    accounts += f'meters = [{{ meter = "g2-{tag}", gateway = "gw-2" }}]\n'
    path = tmp / "feectl.toml"
    path.write_text(
        f"""
[service]
db_path = "ledger.sqlite"
tick_interval_s = 1.0
metrics_listen = "127.0.0.1:{metrics_port}"
command_key_files = {{ gw-1 = "gw.key", gw-2 = "gw.key" }}
tariff_files = {{ flat = "flat.toml" }}
[service.mqtt]
url = "{broker.url}"
client_id = "feectl-poison-{tag}"
session_expiry_s = 600
{accounts}"""
    )
    return path


def spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "feectl", "--config", str(config)],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def metric_sum(port: int, name: str) -> float:
    """The sum of one counter over its labels, from the service's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def ledger(db: Path) -> tuple[list[tuple[str, int]], dict[str, set[str]]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        charges = conn.execute(
            "SELECT meter, interval_start_ms FROM journal WHERE kind = 'charge'"
        ).fetchall()
        rejected: dict[str, set[str]] = defaultdict(set)
        for digest, reason in conn.execute("SELECT digest, reason FROM rejects"):
            rejected[digest].add(reason)
    return [(m, s) for m, s in charges], rejected


async def publish_all(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"poison-{uuid.uuid4().hex[:8]}") as c:
        for i in range(0, len(messages), 200):
            await asyncio.gather(*(c.publish(t, p, qos=1) for t, p in messages[i : i + 200]))


async def wait_until(
    check: Any, timeout_s: float, what: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc.poll() is None, f"the service exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.25)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Any:
    """A broker of its own without the shipped ``message_size_limit``: messages over fee
    control's own bound must reach it (a broker configured without the limit), which the shipped
    configuration refuses at the broker already."""
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


async def test_poison_stream_is_contained_and_every_valid_interval_charged_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    tag = uuid.uuid4().hex[:6]
    stream = Stream(tag, int(time.time() * 1000), [f"m{i}-{tag}" for i in range(6)], f"g2-{tag}")
    rendered = [stream.render(spec) for spec in generate(N_MESSAGES)]
    oversized = b'{"v": 1, "type": "intervals", "x": "' + b"x" * (16 * 1024 * 1024) + b'"}'
    rendered += [("ami/v1/agg/intervals/gw-1", oversized, Expect(reasons={"too_large"}))] * 2
    expected_charges = set().union(*(e.charges for _, _, e in rendered))
    expected_reasons: dict[str, set[str]] = defaultdict(set)
    for _, payload, e in rendered:
        # the consumer keeps only the first bytes of an oversized message: that is what is recorded
        kept = payload[:OVERSIZE_PREFIX_BYTES] if len(payload) > MAX_MESSAGE_BYTES else payload
        expected_reasons[hashlib.sha256(kept).hexdigest()] |= e.reasons
    bad = {d: r for d, r in expected_reasons.items() if r}
    print(
        f"\n{len(rendered)} messages: {len(expected_charges)} valid intervals, {len(bad)} distinct bad messages"
    )

    port = free_port()
    config = write_config(tmp_path, mosquitto, tag, port)
    db, log = tmp_path / "ledger.sqlite", tmp_path / "service.log"
    proc = spawn(config, log)
    try:
        # until the service has subscribed a publish may go nowhere: repeat a first valid message
        probe = stream.one_valid("binary")
        expected_charges |= stream.expect_one_valid(Expect()).charges
        deadline = time.monotonic() + 30
        while not _charged_any(db):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            await publish_all(mosquitto, [("ami/v1/agg/intervals/gw-1", probe)])
            await asyncio.sleep(0.3)

        t0 = time.monotonic()
        half = len(rendered) // 2
        await publish_all(mosquitto, [(t, p) for t, p, _ in rendered[:half]])
        handled = metric_sum(port, "amigw_feectl_messages_total")
        proc.send_signal(signal.SIGKILL)  # mid-stream: a backlog in flight and queued for the session
        proc.wait(10)
        proc = spawn(config, log)  # the same client id: the same broker session, redelivery
        await publish_all(mosquitto, [(t, p) for t, p, _ in rendered[half:]])

        def done() -> bool:
            charges, rejected = ledger(db)
            return set(charges) >= expected_charges and all(
                r <= rejected.get(d, set()) for d, r in bad.items()
            )

        await wait_until(done, 240, "every message's effect", proc, log)
        elapsed = time.monotonic() - t0
        print(f"published and handled in {elapsed:.1f} s; SIGKILLed after {handled:.0f} of the first {half}")
        assert proc.poll() is None

        charges, rejected = ledger(db)
        assert len(charges) == len(set(charges)), "an interval was charged twice"
        assert set(charges) == expected_charges, "a bad interval was charged"
        for digest, reasons in rejected.items():
            assert "internal_error" not in reasons
            assert reasons <= expected_reasons.get(digest, set()), f"{digest} rejected for {reasons}"
        assert metric_sum(port, "amigw_feectl_rejected_total") > 0

        # everything was acknowledged: a clean restart on the same session receives nothing
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        proc = spawn(config, log)
        await wait_until(lambda: _answers(port), 30, "the restarted service", proc, log)
        await asyncio.sleep(3)
        assert metric_sum(port, "amigw_feectl_messages_total") == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        store = SqliteLedgerStore(db)
        try:
            report = store.check_consistency()
            assert report.ok, report.problems[:5]
        finally:
            store.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _answers(port: int) -> bool:
    try:
        metric_sum(port, "amigw_feectl_messages_total")
    except OSError:
        return False
    return True


def _charged_any(db: Path) -> bool:
    try:
        return bool(ledger(db)[0])
    except sqlite3.Error:  # not created yet
        return False
