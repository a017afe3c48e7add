"""DedupStore: (gateway, seq) marks, persistence, per-gateway and age bounds, seq reuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.pipeline.dedup import DedupConfig, DedupStore
from protocols.config import load


class Clock:
    def __init__(self, now_s: float = 1_700_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def test_seen_only_after_mark_and_after_reopen(tmp_path: Path) -> None:
    with DedupStore(tmp_path / "d.sqlite") as store:
        assert not store.seen("gw-1", 7)
        store.mark("gw-1", 7)
        assert store.seen("gw-1", 7)
        assert not store.seen("gw-2", 7) and not store.seen("gw-1", 8)
    with DedupStore(tmp_path / "d.sqlite") as store:
        assert store.seen("gw-1", 7)


def test_keeps_the_newest_seqs_per_gateway(tmp_path: Path) -> None:
    with DedupStore(tmp_path / "d.sqlite", keep_per_gateway=10, prune_every=5, max_age_s=None) as store:
        for seq in range(1, 101):
            store.mark("gw-1", seq)
        store.mark("gw-2", 1)
        entries_gw1 = store.stats().entries - 1
        assert 10 <= entries_gw1 <= 10 + 5  # between N and N + prune_every
        assert all(store.seen("gw-1", s) for s in range(91, 101))
        assert not store.seen("gw-1", 50)  # forgotten, and reported as *not* seen (safe: a rewrite)
        assert store.seen("gw-2", 1)  # another gateway's marks are untouched
        store.prune()
        assert store.stats().entries == 11 and store.stats().pruned == 90


def test_out_of_order_marks_keep_the_highest_seqs(tmp_path: Path) -> None:
    with DedupStore(tmp_path / "d.sqlite", keep_per_gateway=3, prune_every=1000, max_age_s=None) as store:
        for seq in (5, 1, 9, 3, 7):
            store.mark("gw", seq)
        assert store.prune("gw") == 2
        assert [s for s in range(10) if store.seen("gw", s)] == [5, 7, 9]


def test_age_bound(tmp_path: Path) -> None:
    clock = Clock()
    with DedupStore(tmp_path / "d.sqlite", max_age_s=3600, clock=clock) as store:
        store.mark("gw", 1)
        clock.now_s += 1800
        store.mark("gw", 2)
        clock.now_s += 1801
        assert store.prune() == 1
        assert not store.seen("gw", 1) and store.seen("gw", 2)


def test_a_reused_seq_with_other_content_is_not_seen(tmp_path: Path) -> None:
    with DedupStore(tmp_path / "d.sqlite") as store:
        assert store.mark("gw", 1, digest=b"aaaa") is False  # new
        assert store.seen("gw", 1, digest=b"aaaa")
        assert store.seen("gw", 1)  # no digest given: the key alone decides
        assert not store.seen("gw", 1, digest=b"bbbb")  # the gateway restarted its sequence
        assert store.stats().seq_reuse == 1
        assert store.mark("gw", 1, digest=b"bbbb") is True  # replaced other content: a reuse
        assert store.seen("gw", 1, digest=b"bbbb")
        assert store.mark("gw", 1, digest=b"bbbb") is False  # the same batch again


def test_config_section(tmp_path: Path) -> None:
    cfg = load(DedupConfig, {"path": str(tmp_path / "d.sqlite"), "keep_per_gateway": 5, "max_age_s": None})
    with DedupStore.from_config(cfg) as store:
        assert (store.keep_per_gateway, store.max_age_s, store.prune_every) == (5, None, 1000)


def test_pending_days_are_marked_with_the_batch_and_survive_a_reopen(tmp_path: Path) -> None:
    day, next_day = 1_710_000_000_000, 1_710_086_400_000
    with DedupStore(tmp_path / "d.sqlite") as store:
        store.mark("gw-1", 1, b"a", daily_days=[day])
        store.mark("gw-1", 2, b"b", daily_days=[day, next_day])
        store.mark("gw-2", 1, b"c", daily_days=[day])
        store.mark("gw-3", 1, b"d")  # no daily totals changed (e.g. voltages only)
    with DedupStore(tmp_path / "d.sqlite") as store:
        assert store.pending_days() == [("gw-1", day, 2), ("gw-2", day, 1), ("gw-1", next_day, 1)]


def test_done_days_keeps_a_key_a_batch_touched_after_it_was_read(tmp_path: Path) -> None:
    day = 1_710_000_000_000
    with DedupStore(tmp_path / "d.sqlite") as store:
        store.mark("gw-1", 1, daily_days=[day])
        store.mark("gw-2", 1, daily_days=[day])
        read = store.pending_days()
        store.mark("gw-1", 2, daily_days=[day])  # arrives while the flush publishes
        assert store.done_days(read) == 1
        assert store.pending_days() == [("gw-1", day, 2)]  # still owed: its new total is unpublished
        assert store.done_days(store.pending_days()) == 1 and store.pending_days() == []


def test_a_mark_that_fails_leaves_neither_the_batch_nor_its_days(tmp_path: Path) -> None:
    with DedupStore(tmp_path / "d.sqlite") as store:
        with pytest.raises(ValueError):
            store.mark("gw-1", 1, b"a", daily_days=["not a day"])  # type: ignore[list-item]
        assert not store.seen("gw-1", 1) and store.pending_days() == []
        store.mark("gw-1", 1, b"a", daily_days=[5])  # the store is still usable
        assert store.seen("gw-1", 1, b"a") and store.pending_days() == [("gw-1", 5, 1)]


def test_a_mark_waits_for_another_workers_write_instead_of_failing(tmp_path: Path) -> None:
    """Workers of one machine share the file: a mark that meets another connection's write
    transaction waits for it (it once read a snapshot first and then failed with "database is
    locked" when the other write committed, which ended the worker)."""
    import sqlite3
    import threading
    import time

    path = tmp_path / "dedup.sqlite"
    with DedupStore(path) as store:
        store.mark("gw", 1)
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO processed(gateway, seq, digest, ts_ms) VALUES ('other', 1, NULL, 0)")

        def commit_later() -> None:
            time.sleep(0.3)
            other.execute("COMMIT")

        committer = threading.Thread(target=commit_later)
        committer.start()
        store.mark("gw", 2, daily_days=[0])
        committer.join()
        other.close()
        assert store.seen("gw", 2) and store.seen("other", 1)
