"""DeadLetterStore: durable entries, counts by reason, bounded with counted oldest-first eviction."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from ingest.deadletter import DeadLetterConfig, DeadLetterStore
from protocols.config import load


def test_put_list_and_count_by_reason(tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite") as store:
        store.put("payload", "bad magic", b"\x00\x01", "ami/v1/gw-1/up/readings", 1000)
        store.put("line", "unable to parse", b"m v= 1", None, 2000, detail="unable to parse 'm v= 1'")
        store.put("line", "unable to parse", b"m,x v=", None, 3000)
        assert store.count_by_reason() == {"bad magic": 1, "unable to parse": 2}
        assert store.count_by_reason(kind="payload") == {"bad magic": 1}
        newest, middle, oldest = store.list(10)
        assert (newest.payload, newest.ts_ms) == (b"m,x v=", 3000)
        assert middle.detail == "unable to parse 'm v= 1'" and middle.topic is None
        assert (oldest.kind, oldest.topic, oldest.payload) == (
            "payload",
            "ami/v1/gw-1/up/readings",
            b"\x00\x01",
        )
        assert [e.kind for e in store.list(10, kind="line")] == ["line", "line"]
        assert len(store.list(1)) == 1


def test_entries_survive_reopen(tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite") as store:
        store.put("payload", "truncated", b"AMI\x01", "t", 5)
    with DeadLetterStore(tmp_path / "dl.sqlite") as store:
        assert [e.payload for e in store.list()] == [b"AMI\x01"]
        assert store.stats().entries == 1
    mode = sqlite3.connect(tmp_path / "dl.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_entry_bound_evicts_oldest_first_and_counts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="ingest.deadletter"),
        DeadLetterStore(tmp_path / "dl.sqlite", max_entries=3) as store,
    ):
        evicted = [store.put("line", "r", f"{i}".encode(), None, i) for i in range(5)]
        assert evicted == [0, 0, 0, 1, 1]
        assert [e.payload for e in store.list()] == [b"4", b"3", b"2"]
        stats = store.stats()
        assert (stats.entries, stats.evicted, stats.max_entries) == (3, 2, 3)
    assert sum("evicting oldest" in r.message for r in caplog.records) == 1  # edge-triggered, not per put


def test_byte_bound_evicts_and_never_the_newest(tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite", max_bytes=100) as store:
        store.put_many([("line", "r", b"a" * 40, None, 1, ""), ("line", "r", b"b" * 40, None, 2, "")])
        assert store.put("line", "r", b"c" * 40, None, 3) == 1  # 120 bytes > 100: the oldest goes
        assert [e.payload[:1] for e in store.list()] == [b"c", b"b"]
        assert store.put("line", "r", b"d" * 500, None, 4) == 2  # alone over the bound: kept, others go
        assert [e.payload[:1] for e in store.list()] == [b"d"]
        stats = store.stats()
        assert (stats.entries, stats.payload_bytes, stats.evicted) == (1, 500, 3)


def test_eviction_count_survives_reopen(tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite", max_entries=1) as store:
        store.put("line", "r", b"1")
        store.put("line", "r", b"2")
    with DeadLetterStore(tmp_path / "dl.sqlite", max_entries=1) as store:
        assert store.stats().evicted == 1


def test_rejects_unknown_kind_and_empty_reason(tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite") as store:
        with pytest.raises(ValueError, match="kind"):
            store.put("frame", "r", b"")
        with pytest.raises(ValueError, match="reason"):
            store.put("line", "", b"")
        assert store.stats().entries == 0


def test_config_section(tmp_path: Path) -> None:
    cfg = load(DeadLetterConfig, {"path": str(tmp_path / "x.sqlite"), "max_entries": 10})
    with DeadLetterStore.from_config(cfg) as store:
        assert (store.max_entries, store.max_bytes) == (10, 256 * 1024 * 1024)
