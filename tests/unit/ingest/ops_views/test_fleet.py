"""FleetTracker: online, last-will offline, stale, retained copies, malformed messages ignored and
counted, counters and buses; the read-only loss-account reader agrees with LossStore."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ingest.ops.fleet import FleetTracker, read_loss_account
from ingest.pipeline.loss import LossStore
from protocols import topics
from protocols.payload import Status

NOW = 1_700_000_000_000
COUNTERS = {
    "meters": 12,
    "reads": 1200,
    "read_successes": 1197,
    "read_success_rate": 0.9975,
    "bus_rs485-1_up": 1,
    "bus_rs485-1_read_success_rate": 1.0,
    "bus_b_2_up": 0,
    "bus_b_2_read_success_rate": 0.5,
    "outbox_pending": 7,
    "outbox_dropped_readings": 3,
    "outbox_dropped_event": 1,
}


def status(gw: str, ts_ms: int = NOW, *, online: bool = True, **counters: float) -> bytes:
    return Status(gw, online, ts_ms, "0.1.0" if online else "", dict(counters)).to_json()


def gw_doc(snap: dict[str, object], gw: str) -> dict[str, object]:
    (doc,) = [d for d in snap["gateways"] if d["gateway"] == gw]  # type: ignore[attr-defined]
    return doc  # type: ignore[no-any-return]


def test_an_online_status_reports_counters_buses_and_drops() -> None:
    t = FleetTracker(stale_after_s=90)
    assert t.on_status(topics.status("gw-1"), status("gw-1", **COUNTERS), NOW + 500)
    snap = t.snapshot(NOW + 1_500)
    assert (snap["online"], snap["offline"], snap["stale"], snap["unknown"]) == (1, 0, 0, 0)
    d = gw_doc(snap, "gw-1")
    assert d["state"] == "online" and d["online"] is True
    assert d["last_seen_ms"] == NOW + 500  # live: the receive time, not the gateway's clock
    assert d["status_ts_ms"] == NOW
    assert d["age_s"] == 1.0
    assert d["version"] == "0.1.0"
    assert (d["reads"], d["read_failures"], d["read_success_rate"], d["outbox_pending"]) == (
        1200,
        3,
        0.9975,
        7,
    )
    assert d["outbox_dropped"] == {"event": 1, "readings": 3}
    assert d["buses"] == [
        {"bus": "b_2", "up": False, "read_success_rate": 0.5},
        {"bus": "rs485-1", "up": True, "read_success_rate": 1.0},
    ]
    assert d["buses_down"] == ["b_2"]
    assert d["counters"]["meters"] == 12  # type: ignore[index]
    assert d["loss"] is None


def test_read_failures_given_by_the_status_win() -> None:
    t = FleetTracker()
    t.on_status(topics.status("g"), status("g", reads=10, read_failures=4, read_successes=9), NOW)
    assert gw_doc(t.snapshot(NOW), "g")["read_failures"] == 4


def test_the_last_will_marks_offline_and_keeps_the_last_counters() -> None:
    t = FleetTracker()
    t.on_status(topics.status("gw-1"), status("gw-1", outbox_pending=5), NOW)
    will = Status("gw-1", online=False).to_json()  # what the edge's MQTT last-will carries
    assert t.on_status(topics.status("gw-1"), will, NOW + 10_000)
    snap = t.snapshot(NOW + 11_000)
    assert (snap["online"], snap["offline"], snap["stale"]) == (0, 1, 0)
    d = gw_doc(snap, "gw-1")
    assert d["state"] == "offline" and d["online"] is False
    assert d["offline_since_ms"] == NOW + 10_000
    assert d["last_seen_ms"] == NOW  # the last online status
    assert d["outbox_pending"] == 5 and d["version"] == "0.1.0"
    # back online
    t.on_status(topics.status("gw-1"), status("gw-1", NOW + 20_000), NOW + 20_000)
    d = gw_doc(t.snapshot(NOW + 20_000), "gw-1")
    assert d["state"] == "online" and d["offline_since_ms"] is None


def test_a_retained_will_for_an_unknown_gateway_is_offline_since_unknown() -> None:
    t = FleetTracker()
    assert t.on_status(topics.status("gw-9"), Status("gw-9", online=False).to_json(), NOW, retained=True)
    d = gw_doc(t.snapshot(NOW), "gw-9")
    assert d["state"] == "offline" and d["offline_since_ms"] is None and d["last_seen_ms"] is None


def test_stale_after_the_configured_silence() -> None:
    t = FleetTracker(stale_after_s=60)
    t.on_status(topics.status("gw-1"), status("gw-1"), NOW)
    assert gw_doc(t.snapshot(NOW + 60_000), "gw-1")["state"] == "online"
    snap = t.snapshot(NOW + 60_001)
    assert gw_doc(snap, "gw-1")["state"] == "stale"
    assert (snap["online"], snap["offline"], snap["stale"]) == (0, 0, 1)


def test_an_old_retained_status_is_stale_at_once_and_a_repeat_changes_nothing() -> None:
    t = FleetTracker(stale_after_s=60)
    old = status("gw-1", NOW - 3_600_000, outbox_pending=1)
    assert t.on_status(topics.status("gw-1"), old, NOW, retained=True)
    d = gw_doc(t.snapshot(NOW), "gw-1")
    assert d["last_seen_ms"] == NOW - 3_600_000 and d["state"] == "stale"
    # the broker re-delivers its retained copy after a reconnect: no change
    assert not t.on_status(topics.status("gw-1"), old, NOW + 5_000, retained=True)
    # a retained status claiming the future is capped at the receive time
    t.on_status(topics.status("gw-2"), status("gw-2", NOW + 10**9), NOW, retained=True)
    assert gw_doc(t.snapshot(NOW), "gw-2")["last_seen_ms"] == NOW


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("ami/v1/gw-1/status", b"{not json", "undecodable"),
        ("ami/v1/gw-1/status", b'{"v":1,"type":"event"}', "undecodable"),
        ("ami/v1/gw-1/status", b'{"v":1,"type":"status","gateway":"gw-1","online":"yes"}', "undecodable"),
        (
            "ami/v1/gw-1/status",
            b'{"v":1,"type":"status","gateway":"gw-1","online":true,"counters":{"a":"x"}}',
            "undecodable",
        ),
        ("ami/v1/gw-1/status", status("gw-2"), "gateway_mismatch"),
        ("ami/v1/gw-1/up/events", status("gw-1"), "topic"),
        ("elsewhere/gw-1/status", status("gw-1"), "topic"),
        ("ami/v1/gw-1/status", b"{" + b" " * 70_000 + b"}", "too_large"),
    ],
)
def test_malformed_status_is_ignored_and_counted(topic: str, payload: bytes, reason: str) -> None:
    t = FleetTracker()
    assert t.on_status(topic, payload, NOW) is False
    snap = t.snapshot(NOW)
    assert snap["gateways"] == [] and snap["malformed"] == {reason: 1}


def test_an_empty_retained_status_forgets_the_gateway() -> None:
    t = FleetTracker()
    t.on_status(topics.status("gw-1"), status("gw-1"), NOW)
    assert t.on_status(topics.status("gw-1"), b"", NOW, retained=True)
    assert t.snapshot(NOW)["gateways"] == []


def test_the_gateway_bound_holds() -> None:
    t = FleetTracker(max_gateways=2)
    for gw in ("a", "b", "c"):
        t.on_status(topics.status(gw), status(gw), NOW)
    snap = t.snapshot(NOW)
    assert [d["gateway"] for d in snap["gateways"]] == ["a", "b"]
    assert snap["malformed"] == {"too_many_gateways": 1}


def test_bad_settings_are_value_errors() -> None:
    with pytest.raises(ValueError, match="stale_after_s"):
        FleetTracker(stale_after_s=0)


def _loss_file(tmp_path: Path) -> Path:
    path = tmp_path / "loss.sqlite"
    clock = iter([100.0, 101.0, 102.0, 103.0, 104.0, 105.0])
    with LossStore(path, clock=lambda: next(clock)) as store:
        store.record("gw-1", [1, 2, 3])
        store.record("gw-1", [7, 8])  # opens 4..6 at 101 s
        store.record("gw-1", [10])  # opens 9..9 at 102 s
        store.record("gw-2", [1, 2])
        store.claim_alarms(2.5)  # at 104 s: 4..6 due (opened 101 s), 9..9 not yet (102 s)
    return path


def test_the_read_only_loss_reader_agrees_with_the_store(tmp_path: Path) -> None:
    path = _loss_file(tmp_path)
    before = path.read_bytes()
    got = read_loss_account(path)
    with LossStore(path) as store:
        assert list(got.values()) == store.report()
    assert path.read_bytes() == before  # nothing written
    g1 = got["gw-1"]
    assert (g1.first, g1.last, g1.missing) == (1, 10, 4)
    assert [(g.first, g.last, g.opened_ms) for g in g1.gaps] == [(4, 6, 101_000), (9, 9, 102_000)]
    assert g1.gaps[0].alarmed_ms == 104_000 and g1.gaps[1].alarmed_ms is None


def test_a_missing_loss_file_is_an_empty_account_and_is_not_created(tmp_path: Path) -> None:
    assert read_loss_account(tmp_path / "none.sqlite") == {}
    assert not (tmp_path / "none.sqlite").exists()


def test_a_file_that_is_not_a_loss_account_raises(tmp_path: Path) -> None:
    (tmp_path / "x.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(sqlite3.Error):
        read_loss_account(tmp_path / "x.sqlite")


def test_the_snapshot_carries_each_gateways_loss_and_loss_only_gateways(tmp_path: Path) -> None:
    loss = read_loss_account(_loss_file(tmp_path))
    t = FleetTracker()
    t.on_status(topics.status("gw-1"), status("gw-1"), NOW)
    snap = t.snapshot(111_000, loss=loss)
    d1 = gw_doc(snap, "gw-1")
    assert d1["loss"] == {
        "first": 1,
        "last": 10,
        "missing": 4,
        "resets": 0,
        "lost": 0,
        "gaps": [
            {"first": 4, "last": 6, "missing": 3, "opened_ms": 101_000, "age_s": 10.0, "alarmed": True},
            {"first": 9, "last": 9, "missing": 1, "opened_ms": 102_000, "age_s": 9.0, "alarmed": False},
        ],
    }
    d2 = gw_doc(snap, "gw-2")
    assert d2["state"] == "unknown" and d2["online"] is None
    assert d2["loss"]["missing"] == 0  # type: ignore[index]
    assert snap["unknown"] == 1
