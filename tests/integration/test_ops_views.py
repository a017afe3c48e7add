"""The ops read views against a real influxd (points in the documented schema: the pipeline's own
line protocol for readings and intervals, raw lines for ``daily_tou`` and ``alarms``) and the
fleet subscriber against the real mosquitto (retained statuses, a live one, a real last-will).

Every expected value is worked out by hand from the points written.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.config import parse_config
from ingest.model.registry import MeterRegistry
from ingest.mqtt.settings import MqttSettings
from ingest.ops.alarms import AlarmAcks, alarm_id, alarms
from ingest.ops.fleet import FleetTracker, run_fleet_subscriber
from ingest.ops.views import collection, load_curve, meter_latest
from ingest.pipeline.transform import Settings, transform
from ingest.sinks.influx.http import SinkConfig
from ingest.sinks.influx.lines import TagCache, encode_batch, escape_tag
from ingest.sinks.influx.query import InfluxQuery
from protocols import topics
from protocols.flags import Flag
from protocols.payload import BatchBuilder, Status
from protocols.quantities import ENERGY_FORWARD, by_name
from simulators.servers import Mosquitto

pytestmark = pytest.mark.integration

T0 = 1_710_000_000_000  # 2024-03-10 00:00 at UTC+8
Q = 900_000
DAY_MS = 86_400_000
DAY1 = dt.date(2024, 3, 10)
METER = "M 1,x"
GW = "gw-1"
VOLTAGE_A = by_name("voltage_a").code
GAP = int(Flag.GAP_BEFORE)
EST = int(Flag.ESTIMATED)


def tag(text: str) -> str:
    """A tag value as it goes into a line (the sink's escaping, line-protocol escapes included)."""
    return escape_tag(text).decode()


@pytest.fixture
async def query(influx_db: Any) -> AsyncIterator[InfluxQuery]:
    influxd, db = influx_db
    q = InfluxQuery(SinkConfig(url=influxd.url, database=db, api="v1"))
    yield q
    await q.aclose()


def pipeline_lines(tmp_path: Path, *, wide: bool) -> bytes:
    """What the worker writes for: energy register reads at k = 1, 3, 4 (k = 2 missing: the k = 3
    read spans two intervals, both estimated, and carries GAP_BEFORE), voltage at k = 3 and one
    minute after k = 4; and one later reading of another meter, which no view of METER shows."""
    settings = Settings.from_config(parse_config("", base_dir=tmp_path))
    bb = BatchBuilder()
    bb.set_prev(METER, ENERGY_FORWARD, 100_000, T0)
    for k in (1, 3, 4):
        bb.add(METER, T0 + k * Q, ENERGY_FORWARD, 100_000 + 25 * k)
    bb.add(METER, T0 + 3 * Q, VOLTAGE_A, 2201)
    bb.add(METER, T0 + 4 * Q + 60_000, VOLTAGE_A, 2199)
    bb.add("other", T0 + 9 * Q, VOLTAGE_A, 2300)
    out = transform(bb.build(GW, 1, sent_ms=T0 + 10 * Q), settings)
    return encode_batch(out.columns, TagCache(), wide=wide)


@pytest.mark.parametrize("wide", [True, False])
async def test_meter_latest_gives_each_quantity_its_own_latest_point_and_flags(
    influx_db: Any, query: InfluxQuery, tmp_path: Path, wide: bool
) -> None:
    influxd, db = influx_db
    lines = pipeline_lines(tmp_path, wide=wide)
    # the fixture made the points the expectations assume (GAP_BEFORE on the k = 3 register read)
    assert f"energy_fwd_active_total_flags={GAP}i".encode() in lines or b"flags=16i" in lines
    influxd.write(lines, db)
    got = await meter_latest(query, METER, wide=wide)
    # energy: the k = 4 read (its point has no flags field: 0, not the k = 3 point's GAP_BEFORE)
    # voltage: the read a minute after k = 4, which the edge flagged (as stored)
    assert got == {
        "meter": METER,
        "ts_ms": T0 + 4 * Q + 60_000,
        "quantities": [
            {
                "quantity": "energy_fwd_active_total",
                "value": 1001.0,
                "unit": "kWh",
                "ts_ms": T0 + 4 * Q,
                "flags": 0,
                "flag_names": [],
            },
            {
                "quantity": "voltage_a",
                "value": 219.9,
                "unit": "V",
                "ts_ms": T0 + 4 * Q + 60_000,
                "flags": GAP,
                "flag_names": ["GAP_BEFORE"],
            },
        ],
    }
    assert await meter_latest(query, "nobody", wide=wide) == {
        "meter": "nobody",
        "ts_ms": None,
        "quantities": [],
    }


async def test_load_curve_lists_the_channels_intervals_with_flags(
    influx_db: Any, query: InfluxQuery, tmp_path: Path
) -> None:
    influxd, db = influx_db
    influxd.write(pipeline_lines(tmp_path, wide=True), db)
    # a spike the validation flagged (not billable), and a T1-only point (no total: not listed)
    m, g = tag(METER), tag(GW)
    influxd.write(
        f"intervals,meter={m},gateway={g} energy_fwd_active_total=9.5,energy_fwd_active_total_flags=8i {T0 + 5 * Q}\n"
        f"intervals,meter={m},gateway={g} energy_fwd_active_t1=0.1 {T0 + 6 * Q}\n",
        db,
    )
    got = await load_curve(query, METER, T0, T0 + 6 * Q)

    def iv(k: int, kwh: float, flags: int, names: list[str]) -> dict[str, Any]:
        return {
            "ts_ms": T0 + k * Q,
            "kwh": kwh,
            "flags": flags,
            "flag_names": names,
            "estimated": bool(flags & EST),
            "billable": not flags & int(Flag.SPIKE),
        }

    assert got == {
        "meter": METER,
        "channel": "energy_fwd_active_total",
        "unit": "kWh",
        "start_ms": T0,
        "end_ms": T0 + 6 * Q,
        "count": 5,
        "estimated": 2,
        "intervals": [
            iv(1, 0.25, 0, []),
            iv(2, 0.25, GAP | EST, ["GAP_BEFORE", "ESTIMATED"]),
            iv(3, 0.25, GAP | EST, ["GAP_BEFORE", "ESTIMATED"]),
            iv(4, 0.25, 0, []),
            iv(5, 9.5, 8, ["SPIKE"]),
        ],
    }
    assert [i["billable"] for i in got["intervals"]] == [True, True, True, True, False]
    # end-labelled: (start, end] -- the interval ending at start is out, the one ending at end in
    part = await load_curve(query, METER, T0 + Q, T0 + 3 * Q)
    assert [i["ts_ms"] for i in part["intervals"]] == [T0 + 2 * Q, T0 + 3 * Q]
    assert (await load_curve(query, METER, T0, T0 + 6 * Q, channel="energy_fwd_active_t1"))["intervals"][0][
        "kwh"
    ] == 0.1


REGISTRY = """
[meters."M1"]
voltage_v = 220
imax_a = 60
phases = 1
area = "TA 1"
gateway = "gw-a"
[meters."M2"]
voltage_v = 220
imax_a = 60
phases = 1
area = "TA 1"
[meters."M3"]
voltage_v = 220
imax_a = 60
phases = 1
area = "TA-2"
gateway = "gw-b"
[areas."TA-2"]
type = "rural"
"""


def day_row(meter: str, gw: str, ts: int, intervals: int, estimated: int, invalid: int, **more: int) -> str:
    extra = "".join(f",{k}={v}i" for k, v in more.items())
    m, g = tag(meter), tag(gw)
    return (
        f'daily_tou,meter={m},gateway={g} day="x",total=100i,intervals={intervals}i,'
        f"estimated={estimated}i,invalid={invalid}i{extra} {ts}\n"
    )


async def test_collection_per_gateway_and_area_and_day(
    influx_db: Any, query: InfluxQuery, tmp_path: Path
) -> None:
    influxd, db = influx_db
    (tmp_path / "meters.toml").write_text(REGISTRY)
    registry = MeterRegistry.load(tmp_path / "meters.toml")
    d1, d2 = T0, T0 + DAY_MS
    influxd.write(
        day_row("M1", "gw-a", d1, 96, 2, 0)
        + day_row("M2", "gw-a", d1, 90, 0, 3)  # M3 silent on day 1
        + day_row("M1", "gw-a", d2, 96, 0, 0)  # M2 silent on day 2 (unbound: costs its area only)
        + day_row("M3", "gw-b", d2, 48, 0, 1)
        + day_row("X", "gw-b", d2, 96, 0, 0)  # unknown to the registry: its gateway, no area
        + day_row("M1", "gw-a", d1 - DAY_MS, 10, 0, 0)  # the day before and after: outside
        + day_row("M1", "gw-a", d2 + DAY_MS, 10, 0, 0),
        db,
    )
    got = await collection(query, registry, DAY1, DAY1 + dt.timedelta(days=1), "gateway")

    def row(day: str, received: int, expected: int, estimated: int, invalid: int) -> dict[str, Any]:
        rate = received * 10_000 // expected
        return {
            "day": day,
            "received": received,
            "expected": expected,
            "estimated": estimated,
            "invalid": invalid,
            "rate_bp": rate,
        }

    def total(rows: list[dict[str, Any]]) -> dict[str, int]:
        t = {k: sum(r[k] for r in rows) for k in ("received", "expected", "estimated", "invalid")}
        return {**t, "rate_bp": t["received"] * 10_000 // t["expected"]}

    gw_a = [row("2024-03-10", 94 + 90, 192, 2, 3), row("2024-03-11", 96, 96, 0, 0)]
    gw_b = [row("2024-03-10", 0, 96, 0, 0), row("2024-03-11", 48 + 96, 192, 0, 1)]
    assert got == {
        "group_by": "gateway",
        "start_day": "2024-03-10",
        "end_day": "2024-03-11",
        "utc_offset_ms": 8 * 3_600_000,
        "intervals_per_day": 96,
        "groups": [{"id": "gw-a", **total(gw_a), "days": gw_a}, {"id": "gw-b", **total(gw_b), "days": gw_b}],
    }
    assert [g["rate_bp"] for g in got["groups"]] == [9722, 5000]
    by_area = await collection(query, registry, DAY1, DAY1 + dt.timedelta(days=1), "area")
    ta1 = [row("2024-03-10", 184, 192, 2, 3), row("2024-03-11", 96, 192, 0, 0)]
    ta2 = [row("2024-03-10", 0, 96, 0, 0), row("2024-03-11", 48, 96, 0, 1)]
    assert by_area["groups"] == [
        {"id": "TA 1", **total(ta1), "days": ta1},
        {"id": "TA-2", **total(ta2), "days": ta2},
    ]
    one = await collection(query, registry, DAY1, DAY1, "gateway")
    assert [[d["day"] for d in g["days"]] for g in one["groups"]] == [["2024-03-10"], ["2024-03-10"]]


def alarm_lines() -> str:
    area = tag("TA 1")
    return (
        f"alarms,area={area},kind=area_outage events=4i {T0 + 60_000}\n"
        f'alarms,area={area},kind=line_loss class="HIGH",rate_bp=2000i {T0}\n'
        f"alarms,gateway=gw-a,kind=seq_gap gaps=1i,missing=3i,first=4i,last=6i {T0 + 120_000}\n"
        f"alarms,gateway=gw-a,kind=seq_reset gaps=2i,missing=5i,first=0i,last=0i {T0 + 180_000}\n"
        f"alarms,gateway=gw-a,kind=seq_gap gaps=1i,missing=1i,first=9i,last=9i {T0 + DAY_MS}\n"  # outside
        + day_row("M1", "gw-a", T0, 96, 0, 2, tou_mismatch=1)
        + day_row("M2", "gw-a", T0, 96, 0, 0, tou_mismatch=0)  # nothing wrong: no alarm
    )


async def test_alarms_list_every_kind_with_stable_ids_and_merge_acks(
    influx_db: Any, query: InfluxQuery, tmp_path: Path
) -> None:
    influxd, db = influx_db
    influxd.write(alarm_lines(), db)
    day_subject = "meter=M1\x1egateway=gw-a"
    expected = [
        {"id": alarm_id("seq_reset", "gateway=gw-a", T0 + 180_000), "kind": "seq_reset", "ts_ms": T0 + 180_000,
         "area": None, "gateway": "gw-a", "meter": None,
         "detail": {"gaps": 2, "missing": 5, "first": 0, "last": 0}, "ack": None},
        {"id": alarm_id("seq_gap", "gateway=gw-a", T0 + 120_000), "kind": "seq_gap", "ts_ms": T0 + 120_000,
         "area": None, "gateway": "gw-a", "meter": None,
         "detail": {"gaps": 1, "missing": 3, "first": 4, "last": 6}, "ack": None},
        {"id": alarm_id("area_outage", "area=TA 1", T0 + 60_000), "kind": "area_outage", "ts_ms": T0 + 60_000,
         "area": "TA 1", "gateway": None, "meter": None, "detail": {"events": 4}, "ack": None},
        {"id": alarm_id("line_loss", "area=TA 1", T0), "kind": "line_loss", "ts_ms": T0,
         "area": "TA 1", "gateway": None, "meter": None, "detail": {"class": "HIGH", "rate_bp": 2000}, "ack": None},
        {"id": alarm_id("invalid_intervals", day_subject, T0), "kind": "invalid_intervals", "ts_ms": T0,
         "area": None, "gateway": "gw-a", "meter": "M1",
         "detail": {"day": "x", "intervals": 96, "estimated": 0, "invalid": 2}, "ack": None},
        {"id": alarm_id("tou_mismatch", day_subject, T0), "kind": "tou_mismatch", "ts_ms": T0,
         "area": None, "gateway": "gw-a", "meter": "M1",
         "detail": {"day": "x", "intervals": 96, "estimated": 0, "tou_mismatch": 1}, "ack": None},
    ]  # fmt: skip
    expected[3:] = sorted(expected[3:], key=lambda a: str(a["id"]))  # same time: by id
    got = await alarms(query, T0, T0 + DAY_MS)
    assert got["alarms"] == expected
    assert (got["count"], got["truncated"]) == (6, False)
    assert got["kinds"] == [
        "area_outage",
        "line_loss",
        "seq_gap",
        "seq_reset",
        "invalid_intervals",
        "tou_mismatch",
        "command_failed",
    ]
    # the same ids on every listing; kinds filter; limit
    only = await alarms(query, T0, T0 + DAY_MS, kinds=["seq_gap", "tou_mismatch"])
    tou = next(a["id"] for a in expected if a["kind"] == "tou_mismatch")
    assert [a["id"] for a in only["alarms"]] == [expected[1]["id"], tou]
    first2 = await alarms(query, T0, T0 + DAY_MS, limit=2)
    assert [a["id"] for a in first2["alarms"]] == [expected[0]["id"], expected[1]["id"]]
    assert (first2["count"], first2["truncated"]) == (2, True)
    # acknowledgements merge into the listing
    with AlarmAcks(tmp_path / "acks.sqlite") as acks:
        acks.ack(expected[1]["id"], "ops-ana", "known outage", T0 + 200_000)
        listed = await alarms(query, T0, T0 + DAY_MS, acks=acks)
        assert listed["alarms"][1]["ack"] == {"by": "ops-ana", "note": "known outage", "ts_ms": T0 + 200_000}
        assert [a["ack"] for i, a in enumerate(listed["alarms"]) if i != 1] == [None] * 5
        open_ = await alarms(query, T0, T0 + DAY_MS, acks=acks, acked=False)
        assert expected[1]["id"] not in [a["id"] for a in open_["alarms"]] and open_["count"] == 5


# -- fleet subscriber against mosquitto ----------------------------------------------------------

TIMEOUT_S = 10.0


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[Callable[[str, bytes], None]]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{_uid()}", protocol=mqtt.MQTTv5)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    retained: list[str] = []

    def publish(topic: str, payload: bytes, retain: bool = True) -> None:
        info = client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published()
        if retain:
            retained.append(topic)

    yield publish  # type: ignore[misc]
    client.disconnect()
    client.loop_stop()
    # Leave no retained status to other tests, on a fresh connection: a test may have restarted
    # the broker, and the publishing client may not have reconnected yet.
    cleaner = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"clean-{_uid()}", protocol=mqtt.MQTTv5)
    cleaner.connect(mosquitto.host, mosquitto.port)
    cleaner.loop_start()
    for topic in retained:
        cleaner.publish(topic, b"", qos=1, retain=True).wait_for_publish(TIMEOUT_S)
    cleaner.disconnect()
    cleaner.loop_stop()


WILL_CLIENT = """
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from protocols.payload import Status
host, port, gw = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=gw, protocol=mqtt.MQTTv5)
c.will_set(f"ami/v1/{gw}/status", Status(gw, online=False).to_json(), qos=1, retain=True)
c.connect(host, port)
c.loop_start()
c.publish(f"ami/v1/{gw}/status", Status(gw, True, int(time.time() * 1000), "9.9", {"reads": 5}).to_json(),
          qos=1, retain=True).wait_for_publish(10)
print("ready", flush=True)
time.sleep(60)
"""


async def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _state(tracker: FleetTracker, gw: str) -> str | None:
    doc = next((d for d in tracker.snapshot(int(time.time() * 1000))["gateways"] if d["gateway"] == gw), None)
    return None if doc is None else str(doc["state"])


async def test_the_fleet_subscriber_sees_retained_live_and_last_will_statuses(
    mosquitto: Mosquitto, publisher: Callable[..., None], tmp_path: Path
) -> None:
    u = _uid()
    gw_old, gw_live, gw_will, gw_bad = f"old-{u}", f"live-{u}", f"will-{u}", f"bad-{u}"
    now = int(time.time() * 1000)
    # retained before we subscribe: one fresh, one an hour old (stale at once)
    publisher(
        topics.status(gw_live),
        Status(gw_live, True, now, "1.0", {"outbox_pending": 3, "bus_b1_up": 0}).to_json(),
    )
    publisher(topics.status(gw_old), Status(gw_old, True, now - 3_600_000, "1.0").to_json())
    tracker = FleetTracker(stale_after_s=60)
    stop = asyncio.Event()
    settings = MqttSettings(url=mosquitto.url, client_id=f"ops-{u}")
    task = asyncio.create_task(run_fleet_subscriber(tracker, settings, stop), name="fleet")
    try:
        await _until(
            lambda: _state(tracker, gw_live) == "online" and _state(tracker, gw_old) == "stale", "retained"
        )
        assert tracker.connected
        doc = next(
            d for d in tracker.snapshot(int(time.time() * 1000))["gateways"] if d["gateway"] == gw_live
        )
        assert (doc["outbox_pending"], doc["buses_down"], doc["version"]) == (3, ["b1"], "1.0")
        # a real last-will: an edge-like client that dies without DISCONNECT
        script = tmp_path / "will.py"
        script.write_text(WILL_CLIENT)
        root = Path(__file__).resolve().parents[2]
        proc = subprocess.Popen(
            [sys.executable, str(script), mosquitto.host, str(mosquitto.port), gw_will],
            stdout=subprocess.PIPE, text=True, cwd=root, env={"PYTHONPATH": str(root)},
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            await _until(lambda: _state(tracker, gw_will) == "online", "the will client's status")
            proc.kill()
            proc.wait(TIMEOUT_S)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await _until(lambda: _state(tracker, gw_will) == "offline", "the last-will")
        will_doc = next(
            d for d in tracker.snapshot(int(time.time() * 1000))["gateways"] if d["gateway"] == gw_will
        )
        assert (
            will_doc["version"] == "9.9"
            and will_doc["reads"] == 5
            and will_doc["offline_since_ms"] is not None
        )
        # a malformed status is counted, and the gateway does not appear
        before = tracker.malformed["undecodable"]
        publisher(topics.status(gw_bad), b'{"v":1,"type":"status"}', retain=False)
        await _until(lambda: tracker.malformed["undecodable"] == before + 1, "the malformed count")
        assert _state(tracker, gw_bad) is None
        publisher(topics.status(gw_will), b"")  # the operator clears the retained will
        await _until(lambda: _state(tracker, gw_will) is None, "the cleared gateway to go")
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)
    assert not tracker.connected


async def test_the_fleet_subscriber_retries_until_the_broker_is_there(
    mosquitto: Mosquitto, publisher: Callable[..., None]
) -> None:
    u = _uid()
    gw = f"late-{u}"
    publisher(topics.status(gw), Status(gw, True, int(time.time() * 1000), "1.0").to_json())
    mosquitto.stop()  # a clean stop saves the retained status
    tracker = FleetTracker()
    stop = asyncio.Event()
    settings = MqttSettings(url=mosquitto.url, client_id=f"ops-{u}", connect_timeout_s=1.0)
    task = asyncio.create_task(run_fleet_subscriber(tracker, settings, stop, retry_max_s=1.0), name="fleet")
    try:
        await _until(lambda: tracker.subscriber_errors >= 1, "a failed connect")
        assert not tracker.connected
        mosquitto.start()
        await _until(lambda: _state(tracker, gw) == "online", "the retained status after the reconnect")
        assert tracker.connected
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)
