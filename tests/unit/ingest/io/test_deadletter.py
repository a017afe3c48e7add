"""DeadLetterStore: durable entries, counts by reason, bounded with counted oldest-first eviction."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from ingest.pipeline.deadletter import DeadLetterConfig, DeadLetterStore
from protocols.config import load


def test_put_list_and_count_by_reason(state_url: str, tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite", url=state_url) as store:
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


def test_entries_survive_reopen(state_url: str, tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite", url=state_url) as store:
        store.put("payload", "truncated", b"AMI\x01", "t", 5)
    with DeadLetterStore(tmp_path / "dl.sqlite", url=state_url) as store:
        assert [e.payload for e in store.list()] == [b"AMI\x01"]
        assert store.stats().entries == 1
    if state_url:  # PostgreSQL: no file at all
        assert not (tmp_path / "dl.sqlite").exists()
        return
    mode = sqlite3.connect(tmp_path / "dl.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_entry_bound_evicts_oldest_first_and_counts_it(
    state_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="ingest.pipeline.deadletter"),
        DeadLetterStore(tmp_path / "dl.sqlite", url=state_url, max_entries=3) as store,
    ):
        evicted = [store.put("line", "r", f"{i}".encode(), None, i) for i in range(5)]
        assert evicted == [0, 0, 0, 1, 1]
        assert [e.payload for e in store.list()] == [b"4", b"3", b"2"]
        stats = store.stats()
        assert (stats.entries, stats.evicted, stats.max_entries) == (3, 2, 3)
    assert sum("evicting oldest" in r.message for r in caplog.records) == 1  # edge-triggered, not per put


def test_byte_bound_evicts_and_never_the_newest(state_url: str, tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite", url=state_url, max_bytes=100) as store:
        store.put_many([("line", "r", b"a" * 40, None, 1, ""), ("line", "r", b"b" * 40, None, 2, "")])
        assert store.put("line", "r", b"c" * 40, None, 3) == 1  # 120 bytes > 100: the oldest goes
        assert [e.payload[:1] for e in store.list()] == [b"c", b"b"]
        assert store.put("line", "r", b"d" * 500, None, 4) == 2  # alone over the bound: kept, others go
        assert [e.payload[:1] for e in store.list()] == [b"d"]
        stats = store.stats()
        assert (stats.entries, stats.payload_bytes, stats.evicted) == (1, 500, 3)


def test_eviction_count_survives_reopen(state_url: str, tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite", url=state_url, max_entries=1) as store:
        store.put("line", "r", b"1")
        store.put("line", "r", b"2")
    with DeadLetterStore(tmp_path / "dl.sqlite", url=state_url, max_entries=1) as store:
        assert store.stats().evicted == 1


def test_rejects_unknown_kind_and_empty_reason(state_url: str, tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite", url=state_url) as store:
        with pytest.raises(ValueError, match="kind"):
            store.put("frame", "r", b"")
        with pytest.raises(ValueError, match="reason"):
            store.put("line", "", b"")
        assert store.stats().entries == 0


def test_config_section(tmp_path: Path) -> None:
    cfg = load(DeadLetterConfig, {"path": str(tmp_path / "x.sqlite"), "max_entries": 10})
    with DeadLetterStore.from_config(cfg) as store:
        assert (store.max_entries, store.max_bytes) == (10, 256 * 1024 * 1024)


def test_an_oversized_payload_keeps_a_prefix_its_size_and_digest(state_url: str, tmp_path: Path) -> None:
    big = bytes(range(256)) * 40  # 10,240 bytes
    with DeadLetterStore(tmp_path / "dl.sqlite", url=state_url, max_entry_bytes=1000) as store:
        store.put("payload", "too large", big, "ami/v1/gw-1/up/readings", 1)
        store.put("payload", "undecodable", b"x" * 1000, "ami/v1/gw-1/up/readings", 2)
        small, cut = store.list(2)
        assert (cut.payload, cut.size, cut.truncated) == (big[:1000], 10_240, True)
        assert cut.digest == hashlib.sha256(big).hexdigest()
        assert (small.size, small.truncated, small.payload) == (1000, False, b"x" * 1000)
        assert store.stats().payload_bytes == 2000  # bounded by what is stored, not what arrived


def test_a_flood_of_huge_payloads_evicts_its_own_entries_not_the_others(
    state_url: str, tmp_path: Path
) -> None:
    """20 huge payloads after 448 small entries of other reasons: the flood evicts its own older
    entries (fair eviction by reason); before, the oldest entries of every reason went first."""
    with DeadLetterStore(
        tmp_path / "dl.sqlite", url=state_url, max_bytes=1_000_000, max_entry_bytes=200_000
    ) as store:
        for i in range(448):
            store.put("payload", ("undecodable", "empty meter id")[i % 2], b"s" * 500, "t", i)
        for i in range(20):
            store.put("payload", "too large", b"H" * 50_000_000 if i == 0 else b"H" * 300_000, "t", 1000 + i)
        kept = store.count_by_reason()
        assert kept == {"undecodable": 224, "empty meter id": 224, "too large": 3}
        stats = store.stats()
        assert stats.payload_bytes <= 1_000_000 and stats.evicted == 17


def test_eviction_by_entries_takes_the_reason_holding_the_most(state_url: str, tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite", url=state_url, max_entries=10) as store:
        for i in range(3):
            store.put("line", "rare", b"r", None, i)
        for i in range(20):
            store.put("line", "flood", b"f", None, 100 + i)
        assert store.count_by_reason() == {"rare": 3, "flood": 7}
        assert [e.ts_ms for e in store.list(10) if e.reason == "flood"] == list(range(119, 112, -1))


def test_select_remove_and_set_reason_for_replay(state_url: str, tmp_path: Path) -> None:
    with DeadLetterStore(tmp_path / "dl.sqlite", url=state_url) as store:
        for i in range(6):
            store.put("payload" if i % 3 else "line", ("a", "b")[i % 2], f"{i}".encode(), "t", 1000 * i)
        payloads = store.select(kind="payload")
        assert [e.payload for e in payloads] == [b"1", b"2", b"4", b"5"]  # oldest first, kind filtered
        assert [e.payload for e in store.select(kind="payload", reason="b")] == [b"1", b"5"]
        assert [e.payload for e in store.select(kind="payload", since_ms=2000, until_ms=5000)] == [b"2", b"4"]
        assert [e.payload for e in store.select(kind="payload", after_id=payloads[1].id, limit=1)] == [b"4"]
        assert store.remove(payloads[0].id) and not store.remove(payloads[0].id)
        store.set_reason(payloads[1].id, "c", "still wrong")
        again = store.select(kind="payload", reason="c")
        assert [(e.id, e.ts_ms, e.detail) for e in again] == [(payloads[1].id, 2000, "still wrong")]
        assert store.stats().entries == 5 and store.count_by_reason() == {"a": 2, "b": 2, "c": 1}


def test_a_store_written_before_the_size_columns_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE dead_letter (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, reason TEXT NOT NULL,"
        " detail TEXT NOT NULL DEFAULT '', topic TEXT, ts_ms INTEGER NOT NULL, payload BLOB NOT NULL);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;"
        "INSERT INTO meta VALUES ('entries', 1), ('bytes', 3), ('evicted', 0);"
        "INSERT INTO dead_letter(kind, reason, topic, ts_ms, payload) VALUES ('payload', 'old', 't', 5, x'414d49');"
    )
    db.commit()
    db.close()
    with DeadLetterStore(path, max_entries=1) as store:
        (old,) = store.list()
        assert (old.payload, old.size, old.truncated) == (b"AMI", 3, False)
        store.put("payload", "new", b"x", "t", 6)  # the old entry's reason is known to eviction
        assert store.count_by_reason() == {"new": 1}


def _open_together(path: Path, barrier: Any) -> str:
    """Open the store at ``path`` the moment every process of the pool is ready ("" or the error)."""
    barrier.wait()
    try:
        DeadLetterStore(path).close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def test_workers_creating_a_new_file_at_the_same_moment_all_open_it(tmp_path: Path) -> None:
    """Six workers of one machine start together on a dead-letter file that does not exist yet:
    each opens it (switching a new file to WAL, adding columns), none fails 'database is locked'
    or 'duplicate column'. Repeated on fresh files: the race is narrow."""
    ctx = multiprocessing.get_context("fork")
    procs = 6
    with ctx.Manager() as manager, ctx.Pool(procs) as pool:
        for trial in range(40):
            barrier = manager.Barrier(procs)
            errors = pool.starmap(_open_together, [(tmp_path / f"dl-{trial}.sqlite", barrier)] * procs)
            assert [e for e in errors if e] == [], f"trial {trial}"
            with DeadLetterStore(tmp_path / f"dl-{trial}.sqlite") as store:
                assert store.stats().entries == 0
