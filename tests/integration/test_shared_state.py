"""The state stores on PostgreSQL under concurrent writers (``docs/shared-state.md``).

SQLite serialises every write transaction of every process with its file lock; on PostgreSQL the
stores take advisory locks and ``SKIP LOCKED`` claims instead. Each test runs several writers at
once, each with its own store (its own connection, as on another machine), on threads that block
in the database, and checks the invariant the store's contract promises: the loss account's
ranges merge to one, each owed rollup is claimed by one worker, the dead-letter bounds and
counters hold, no worker's run state is lost, an area outage found by several workers at once is
one alarm, and a lost database is StateUnavailable, then
reconnected.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ingest.pipeline.deadletter import DeadLetterStore
from ingest.pipeline.dedup import DedupStore
from ingest.pipeline.loss import LossStore
from ingest.pipeline.outages import AreaAlarmStore, Merge
from ingest.pipeline.state import RunStateStore
from ingest.rules import kernels as k
from ingest.rules.stages import RunCarry
from protocols.errors import StateUnavailable
from simulators.servers import Postgres

pytestmark = pytest.mark.integration

WRITERS = 4


def _concurrently(work: Callable[[int], None]) -> None:
    """``work(i)`` for each writer i on its own thread, started together; re-raises a failure."""
    start = threading.Barrier(WRITERS)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_interleaved_seqs_of_one_gateway_from_several_machines_merge_into_one_range(
    tmp_path: Path, postgres_url: str
) -> None:
    n = 400
    seqs = list(range(1, n + 1))
    random.Random(7).shuffle(seqs)
    stores = [LossStore(tmp_path / "x", url=postgres_url) for _ in range(WRITERS)]

    def record(i: int) -> None:
        for s in seqs[i::WRITERS]:
            stores[i].record("gw-1", [s])

    _concurrently(record)
    (acct,) = stores[0].report()
    assert (acct.first, acct.last, acct.missing, acct.gaps) == (1, n, 0, ())
    assert stores[1]._db.execute("SELECT COUNT(*) FROM durable").fetchone()[0] == 1
    for s in stores:
        s.close()


def test_each_owed_period_is_claimed_by_one_worker(tmp_path: Path, postgres_url: str) -> None:
    day = 1_710_000_000_000 // 86_400_000 * 86_400_000
    clock = lambda: day / 1000 + 10 * 86_400  # noqa: E731  (every period below has ended)
    stores = [DedupStore(tmp_path / "x", url=postgres_url, clock=clock) for _ in range(WRITERS)]
    for h in range(200):
        stores[0].mark(f"gw-{h % 7}", h, periods=[("hour", day + h * 3_600_000)])
    claimed: list[list[tuple[str, str, int]]] = [[] for _ in range(WRITERS)]

    def claim(i: int) -> None:
        while got := stores[i].claim_due(delay_s=0, lease_s=600, owner=f"w{i}", limit=7):
            claimed[i] += [(p.gateway, p.kind, p.period_ms) for p in got]

    _concurrently(claim)
    every = [key for keys in claimed for key in keys]
    assert len(every) == len(set(every)) == 200  # all claimed, none twice
    for s in stores:
        s.close()


def test_concurrent_dead_letters_keep_the_bounds_and_the_counters(tmp_path: Path, postgres_url: str) -> None:
    stores = [DeadLetterStore(tmp_path / "x", url=postgres_url, max_entries=50) for _ in range(WRITERS)]

    def put(i: int) -> None:
        for j in range(60):
            stores[i].put("payload", f"reason-{i}", bytes([j]) * (10 + j), "t")

    _concurrently(put)
    stats = stores[0].stats()
    (count,) = stores[0]._db.execute("SELECT COUNT(*) FROM dead_letter").fetchone()
    (size,) = stores[0]._db.execute("SELECT SUM(length(payload)) FROM dead_letter").fetchone()
    assert stats.entries == count == 50 and stats.payload_bytes == size
    assert stats.evicted == WRITERS * 60 - 50
    for s in stores:
        s.close()


def test_run_states_written_at_once_by_several_machines_are_all_kept(
    tmp_path: Path, postgres_url: str
) -> None:
    stores = [RunStateStore(tmp_path / "x", url=postgres_url, write_every_s=3600) for _ in range(WRITERS)]

    def save(i: int) -> None:
        for step in range(20):
            state = np.zeros((1, k.NCARRY), dtype=np.int64)
            state[0, k.C_LAST] = 1000 + step
            state[0, k.C_STOP_LEN] = step
            stores[i].save(
                [("gw", [f"m{i}"], RunCarry(np.array([0], np.uint32), np.array([1], np.uint16), state))]
            )
            stores[i].flush()

    _concurrently(save)
    meters = [f"m{i}" for i in range(WRITERS)]
    with RunStateStore(tmp_path / "x", url=postgres_url) as reader:
        got = reader.carry("gw", meters)
    assert sorted(got.meter.tolist()) == list(range(WRITERS))  # every machine's channel kept
    assert got.state[:, k.C_STOP_LEN].tolist() == [19] * WRITERS
    for s in stores:
        s.close()


def test_an_outage_found_by_several_machines_at_once_is_one_alarm(tmp_path: Path, postgres_url: str) -> None:
    """Each writer finds the same outages, each from a later point first (its batches came in
    another order): every area ends with one alarm, at its earliest point, opened once."""
    q, areas = 900_000, 40
    t0 = int(time.time() * 1000) // q * q - 8 * q  # recent: kept (older alarms are dropped)
    stores = [AreaAlarmStore(tmp_path / f"{i}.sqlite", url=postgres_url) for i in range(WRITERS)]
    opened = [0] * WRITERS

    def work(i: int) -> None:
        for a in range(areas):
            for p in (WRITERS - i, 0, i):  # 3 points of the outage, in this writer's order
                if stores[i].merge(f"TA-{a}", t0 + p * q, 3 + i, 1_800_000 * 3)[1] is Merge.OPENED:
                    opened[i] += 1

    _concurrently(work)
    held = stores[0].alarms()
    assert [(x.area, x.ts_ms, x.events) for x in held] == sorted(
        (f"TA-{a}", t0, 3 + WRITERS - 1) for a in range(areas)
    )
    assert sum(opened) == areas
    for s in stores:
        s.close()


def test_a_lost_database_is_state_unavailable_and_the_store_reconnects(
    tmp_path: Path, postgres: Postgres, postgres_url: str
) -> None:
    store = LossStore(tmp_path / "x", url=postgres_url)
    store.record("gw-1", [1, 2])
    postgres.stop()
    with pytest.raises(StateUnavailable):
        store.record("gw-1", [3])
    with pytest.raises(StateUnavailable):
        store.missing()
    postgres.start()
    store.record("gw-1", [3])  # connects again; the failed call left nothing behind
    (acct,) = store.report()
    assert (acct.first, acct.last, acct.missing) == (1, 3, 0)
    store.close()
