"""DedupStore: (gateway, seq) marks, persistence, per-gateway and age bounds, seq reuse; each
test taking ``state_url`` runs on SQLite and on PostgreSQL."""

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


def test_seen_only_after_mark_and_after_reopen(state_url: str, tmp_path: Path) -> None:
    with DedupStore(tmp_path / "d.sqlite", url=state_url) as store:
        assert not store.seen("gw-1", 7)
        store.mark("gw-1", 7)
        assert store.seen("gw-1", 7)
        assert not store.seen("gw-2", 7) and not store.seen("gw-1", 8)
    with DedupStore(tmp_path / "d.sqlite", url=state_url) as store:
        assert store.seen("gw-1", 7)


def test_keeps_the_newest_seqs_per_gateway(state_url: str, tmp_path: Path) -> None:
    with DedupStore(
        tmp_path / "d.sqlite", url=state_url, keep_per_gateway=10, prune_every=5, max_age_s=None
    ) as store:
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


def test_out_of_order_marks_keep_the_highest_seqs(state_url: str, tmp_path: Path) -> None:
    with DedupStore(
        tmp_path / "d.sqlite", url=state_url, keep_per_gateway=3, prune_every=1000, max_age_s=None
    ) as store:
        for seq in (5, 1, 9, 3, 7):
            store.mark("gw", seq)
        assert store.prune("gw") == 2
        assert [s for s in range(10) if store.seen("gw", s)] == [5, 7, 9]


def test_age_bound(state_url: str, tmp_path: Path) -> None:
    clock = Clock()
    with DedupStore(tmp_path / "d.sqlite", url=state_url, max_age_s=3600, clock=clock) as store:
        store.mark("gw", 1)
        clock.now_s += 1800
        store.mark("gw", 2)
        clock.now_s += 1801
        assert store.prune() == 1
        assert not store.seen("gw", 1) and store.seen("gw", 2)


def test_a_reused_seq_with_other_content_is_not_seen(state_url: str, tmp_path: Path) -> None:
    with DedupStore(tmp_path / "d.sqlite", url=state_url) as store:
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


DAY = 1_710_000_000_000 // 86_400_000 * 86_400_000
HOUR = 3_600_000


def _owed(store: DedupStore) -> list[tuple[str, str, int, int]]:
    rows = store._db.execute("SELECT gateway, kind, period_ms, version FROM rollup_pending ORDER BY 3, 2, 1")
    return [tuple(r) for r in rows]


def test_owed_periods_are_marked_with_the_batch_and_survive_a_reopen(state_url: str, tmp_path: Path) -> None:
    with DedupStore(tmp_path / "d.sqlite", url=state_url) as store:
        store.mark("gw-1", 1, b"a", periods=[("day", DAY), ("hour", DAY)])
        store.mark("gw-1", 2, b"b", periods=[("day", DAY), ("hour", DAY + HOUR)])
        store.mark("gw-2", 1, b"c", periods=[("day", DAY)])
        store.mark("gw-3", 1, b"d")  # no totals changed (e.g. voltages only)
    with DedupStore(tmp_path / "d.sqlite", url=state_url) as store:
        assert _owed(store) == [
            ("gw-1", "day", DAY, 2), ("gw-2", "day", DAY, 1), ("gw-1", "hour", DAY, 1),
            ("gw-1", "hour", DAY + HOUR, 1),
        ]  # fmt: skip
        assert store.pending_periods() == 4


def test_a_period_is_due_once_it_ended_and_nothing_touched_it_for_the_delay(
    state_url: str, tmp_path: Path
) -> None:
    clock = Clock(DAY / 1000 + 1800)  # half past the first hour of DAY
    with DedupStore(tmp_path / "d.sqlite", url=state_url, clock=clock) as store:
        store.mark("gw-1", 1, periods=[("day", DAY), ("hour", DAY)])
        assert store.claim_due(delay_s=60, lease_s=600) == []  # the hour has not ended
        clock.now_s = DAY / 1000 + 3600 + 59
        assert store.claim_due(delay_s=60, lease_s=600) == []  # ended 59 s ago
        clock.now_s += 1
        claimed = store.claim_due(delay_s=60, lease_s=600)
        assert [(p.gateway, p.kind, p.period_ms) for p in claimed] == [("gw-1", "hour", DAY)]
        assert store.claim_due(delay_s=60, lease_s=600) == []  # claimed: nobody else takes it
        store.mark("gw-1", 2, periods=[("hour", DAY)])  # late data touches the hour meanwhile
        assert store.done_periods(claimed) == 0  # still owed: its new data is not rolled up
        assert store.claim_due(delay_s=60, lease_s=600) == []  # touched just now: not yet due
        clock.now_s += 60
        again = store.claim_due(delay_s=60, lease_s=600)
        assert [(p.kind, p.version) for p in again] == [("hour", 2)]
        assert store.done_periods(again) == 1
        assert [k for _, k, _, _ in _owed(store)] == ["day"]


def test_a_claim_of_a_worker_that_died_expires_and_a_failed_rollup_is_released(
    state_url: str, tmp_path: Path
) -> None:
    clock = Clock(DAY / 1000 + 2 * 86_400)
    with DedupStore(tmp_path / "d.sqlite", url=state_url, clock=clock) as store:
        store.mark("gw-1", 1, periods=[("day", DAY)])
        first = store.claim_due(delay_s=0, lease_s=600)
        assert len(first) == 1 and store.claim_due(delay_s=0, lease_s=600) == []
        clock.now_s += 600  # the claimer died: its lease ran out
        second = store.claim_due(delay_s=0, lease_s=600)
        assert [(p.kind, p.period_ms) for p in second] == [("day", DAY)]
        store.done_periods((), second)  # its rollup failed: released at once
        assert len(store.claim_due(delay_s=0, lease_s=600)) == 1


def test_a_worker_started_again_takes_back_the_claims_of_its_previous_life(
    state_url: str, tmp_path: Path
) -> None:
    clock = Clock(DAY / 1000 + 2 * 86_400)
    with DedupStore(tmp_path / "d.sqlite", url=state_url, clock=clock) as store:
        store.mark("gw-1", 1, periods=[("day", DAY), ("hour", DAY)])
        assert len(store.claim_due(delay_s=0, lease_s=600, owner="ingest-0")) == 2  # then SIGKILL
        assert store.claim_due(delay_s=0, lease_s=600, owner="ingest-1") == []  # another worker
        assert store.release_claims("ingest-1") == 0  # holds none
        assert store.release_claims("ingest-0") == 2  # the killed worker, started again
        assert len(store.claim_due(delay_s=0, lease_s=600, owner="ingest-0")) == 2


def test_days_owed_by_a_store_of_the_earlier_layout_become_day_rollups(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "d.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE daily_pending (gateway TEXT, day_ms INTEGER, version INTEGER)")
        db.execute("INSERT INTO daily_pending VALUES ('gw-1', ?, 3)", (DAY,))
    with DedupStore(path) as store:
        assert _owed(store) == [("gw-1", "day", DAY, 3)]


def test_a_mark_that_fails_leaves_neither_the_batch_nor_its_periods(state_url: str, tmp_path: Path) -> None:
    with DedupStore(tmp_path / "d.sqlite", url=state_url) as store:
        with pytest.raises(ValueError, match="period kind"):
            store.mark("gw-1", 1, b"a", periods=[("week", DAY)])
        assert not store.seen("gw-1", 1) and store.pending_periods() == 0
        store.mark("gw-1", 1, b"a", periods=[("day", 5)])  # the store is still usable
        assert store.seen("gw-1", 1, b"a") and _owed(store) == [("gw-1", "day", 5, 1)]


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
        store.mark("gw", 2, periods=[("day", 0)])
        committer.join()
        other.close()
        assert store.seen("gw", 2) and store.seen("other", 1)
