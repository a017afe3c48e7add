"""Ingest's input bounds against the real mosquitto and influxd: gateways own their meters (foreign
readings and forged events dead-lettered, the rest lands), readings outside the time bounds are
stored flagged and billed nowhere, and an oversized payload is refused before it is buffered.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ingest.pipeline.deadletter import DeadLetterStore
from protocols.flags import Flag
from protocols.payload import BatchBuilder, Event, decode
from tests.integration.test_pipeline import (
    T0,
    Publisher,
    Q,
    _uid,
    count,
    ingest_toml,
    run_worker,
    topics_for,
    wait_for,
    written,
)

pytestmark = pytest.mark.integration
__all__ = ["run_worker"]  # the fixture, shared with test_pipeline


def registry(tmp: Path, meters: dict[str, tuple[str, str]]) -> str:
    """A registry file: meter -> (gateway, area)."""
    path = tmp / "meters.toml"
    path.write_text(
        "".join(
            f'[meters."{m}"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\narea = "{area}"\ngateway = "{gw}"\n'
            for m, (gw, area) in meters.items()
        )
    )
    return str(path)


def dead_letters(tmp: Path) -> list[Any]:
    with DeadLetterStore(tmp / "dead.sqlite") as store:
        return store.list(kind="payload")


def dead_lettered(w: Any, reason: str) -> float:
    return w.metrics.dead_letters.labels(reason)._value.get()


async def test_readings_of_a_meter_bound_to_another_gateway_are_dead_lettered_and_the_rest_lands(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    influxd, db = influx_db
    gw_a, gw_b = f"gw-a-{_uid()}", f"gw-b-{_uid()}"
    reg = registry(tmp_path, {"A1": (gw_a, "TA-A"), "A2": (gw_a, "TA-A"), "B1": (gw_b, "TA-B")})
    w = await run_worker(
        ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw_a]), registry=reg)
    )
    pub = Publisher(mosquitto)
    try:
        b = BatchBuilder()
        for i, m in enumerate(("A1", "B1", "A2", "U1")):  # B1 is gw-b's; U1 is in no registry
            b.set_prev(m, 1, 10_000 * (i + 1), T0)
            for k in (1, 2):
                b.add(m, T0 + k * Q, 1, 10_000 * (i + 1) + 25 * k)
        pub.batch(b.build(gw_a, 1, sent_ms=T0 + 2 * Q))
        await wait_for(lambda: written(w) == 1)
        await wait_for(lambda: w._res.dedup.pending_periods() == 0)  # rolled up
    finally:
        pub.close()
    stored = influxd.query("SELECT * FROM meter_reading GROUP BY meter", db=db)
    assert sorted(r["meter"] for r in stored) == ["A1", "A1", "A2", "A2", "U1", "U1"]
    days = influxd.query("SELECT total FROM daily_tou GROUP BY meter", db=db)
    assert sorted((r["meter"], r["total"]) for r in days) == [("A1", 50), ("A2", 50), ("U1", 50)]
    [dl] = dead_letters(tmp_path)
    assert dl.reason == "meter not bound to gateway" and "B1" in dl.detail
    foreign = decode(dl.payload)  # the refused part, as a batch of its own
    assert (
        foreign.gateway == gw_a and foreign.seq == 1 and {foreign.meters[i] for i in foreign.meter} == {"B1"}
    )
    assert len(foreign) == 2 and dead_lettered(w, "meter not bound to gateway") == 1


async def test_forged_cross_gateway_power_downs_raise_no_alarm_for_the_other_gateways_area(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    """gw-a publishes power_down events for gw-b's meters: naming gw-b in the payload (topic
    mismatch) or naming itself (meters bound to gw-b). Neither may reach InfluxDB or raise an
    area-outage alarm for gw-b's area; gw-b's own events still do."""
    influxd, db = influx_db
    gw_a, gw_b = f"gw-a-{_uid()}", f"gw-b-{_uid()}"
    reg = registry(tmp_path, {f"B{i}": (gw_b, "TA-B") for i in range(4)})
    w = await run_worker(
        ingest_toml(
            tmp_path,
            mosquitto,
            influxd,
            db,
            topics_for(f"g{_uid()}", [gw_a, gw_b], events=True),
            registry=reg,
        )
    )
    pub = Publisher(mosquitto)
    try:
        for i in range(3):
            forged = Event(f"forged-{i}", gw_b, "power_down", T0 + i * 1_000, f"B{i}")
            pub.send(f"ami/v1/{gw_a}/up/events", forged.to_json())
            claimed = Event(f"claimed-{i}", gw_a, "power_down", T0 + i * 1_000, f"B{i}")
            pub.send(f"ami/v1/{gw_a}/up/events", claimed.to_json())
        stamped = Event("epoch-0", gw_a, "power_down", 0, None)  # outside the time bounds
        pub.send(f"ami/v1/{gw_a}/up/events", stamped.to_json())
        await wait_for(lambda: dead_lettered(w, "gateway does not match topic") == 3)
        await wait_for(lambda: dead_lettered(w, "meter not bound to gateway") == 3)
        await wait_for(lambda: dead_lettered(w, "event time out of bounds") == 1)
        await asyncio.sleep(1.0)  # room for a (wrong) alarm
        assert influxd.query("SELECT * FROM events", db=db) == []
        assert influxd.query("SELECT * FROM alarms", db=db) == []
        for i in range(3):  # the owner's own power-downs: 3 of 4 meters of TA-B
            own = Event(f"own-{i}", gw_b, "power_down", T0 + i * 1_000, f"B{i}")
            pub.send(f"ami/v1/{gw_b}/up/events", own.to_json())
        await wait_for(lambda: len(influxd.query("SELECT * FROM alarms", db=db)) >= 1)
    finally:
        pub.close()
    [alarm] = influxd.query("SELECT * FROM alarms", db=db)
    assert alarm["area"] == "TA-B" and alarm["events"] == 3
    assert count(influxd, db, "SELECT count(id) FROM events") == 3


async def test_readings_stamped_before_min_ts_are_stored_flagged_with_no_1970_daily_row(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    influxd, db = influx_db
    gw = f"gw-t-{_uid()}"
    w = await run_worker(ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw])))
    pub = Publisher(mosquitto)
    try:
        b = BatchBuilder()
        b.set_prev("M0", 1, 1_000, 0)  # an unset clock: 1970-01-01 00:00, 00:15, 00:30
        for k in (1, 2):
            b.add("M0", k * Q, 1, 1_000 + 25 * k)
        b.set_prev("M1", 1, 5_000, T0)
        b.add("M1", T0 + Q, 1, 5_040)
        pub.batch(b.build(gw, 1, sent_ms=T0 + Q))
        await wait_for(lambda: written(w) == 1)
        await wait_for(lambda: w._res.dedup.pending_periods() == 0)  # rolled up
    finally:
        pub.close()
    rows = influxd.query("SELECT * FROM meter_reading WHERE meter = 'M0'", db=db)
    assert [r["time"] for r in rows] == [Q, 2 * Q]
    assert all(r["energy_fwd_active_total_flags"] & Flag.BEFORE_MIN_TIME for r in rows)
    days = influxd.query("SELECT * FROM daily_tou", db=db)
    assert [(r["meter"], r["day"], r["total"]) for r in days] == [("M1", "2024-03-10", 40)]
    assert influxd.query("SELECT * FROM hourly WHERE meter = 'M0'", db=db) == []
    assert influxd.query("SELECT * FROM intervals WHERE meter = 'M0'", db=db) == []


async def test_an_oversized_payload_is_dead_lettered_from_a_prefix_and_acknowledged(
    mosquitto: Any, influx_db: Any, tmp_path: Path, run_worker: Any
) -> None:
    """20 messages of 1 MiB over a 64 KiB limit, then a good batch: the worker queues only their
    first 4 KiB, dead-letters each with its full size, acks them, and the good batch lands."""
    influxd, db = influx_db
    gw = f"gw-s-{_uid()}"
    text = ingest_toml(tmp_path, mosquitto, influxd, db, topics_for(f"g{_uid()}", [gw]))
    w = await run_worker(text.replace("[influx]", "max_payload_bytes = 65536\n[influx]"))
    pub = Publisher(mosquitto)
    try:
        big = b"AMI\x01" + bytes(1 << 20)
        for _ in range(20):
            pub.send(f"ami/v1/{gw}/up/readings", big)
        b = BatchBuilder()
        b.add("M1", T0 + Q, 1, 1_000)
        pub.batch(b.build(gw, 1, sent_ms=T0 + Q))
        await wait_for(lambda: written(w) == 1)
        await wait_for(lambda: w._res.dedup.pending_periods() == 0)  # rolled up
    finally:
        pub.close()
    assert dead_lettered(w, "payload too large") == 20
    stats = w._res.consumer.stats if w._res and w._res.consumer else None
    assert stats is not None and stats.oversized == 20 and stats.unacked == 0
    letters = dead_letters(tmp_path)
    assert len(letters) == 20 and all(dl.reason == "payload too large" for dl in letters)
    assert all(len(dl.payload) <= 4096 and f"{len(big)} bytes" in dl.detail for dl in letters)
    assert count(influxd, db, "SELECT count(energy_fwd_active_total) FROM meter_reading") == 1
