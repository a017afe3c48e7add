"""The durable outbox: order, transactions, the byte bound and its drop policy, persisted
counters, sequence numbers and previous values, and replay after a SIGKILL (DESIGN §5, STYLE H8)."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from gateway.outbox import KINDS, Outbox, OutboxStats

ROOT = Path(__file__).resolve().parents[3]
T = "ami/v1/gw-01/up/readings"  # 24 bytes of topic in every row's size


def _open(tmp_path: Path, max_bytes: int = 1 << 20, **kw: object) -> Outbox:
    return Outbox(tmp_path / "outbox.db", max_bytes=max_bytes, **kw)  # type: ignore[arg-type]


def _payloads(ob: Outbox) -> list[bytes]:
    tx = ob.begin(1_000_000)
    ob.end(tx, [])
    return [r.payload for r in tx.rows]


def _balanced(s: OutboxStats) -> bool:
    return s.added == s.published + s.dropped_total + s.pending


# -- order and transactions --------------------------------------------------------------------


def test_rows_come_out_in_insertion_order_and_leave_only_when_accepted(tmp_path: Path) -> None:
    with _open(tmp_path) as ob:
        for i in range(10):
            assert ob.add(T, b"p%d" % i, kind="register") == 0
        tx = ob.begin(4)
        assert [r.payload for r in tx.rows] == [b"p0", b"p1", b"p2", b"p3"]
        assert {r.kind for r in tx.rows} == {"register"} and {r.topic for r in tx.rows} == {T}
        assert ob.end(tx, [tx.rows[1].id, tx.rows[3].id]) == 2
        assert _payloads(ob) == [b"p0", b"p2", *(b"p%d" % i for i in range(4, 10))]
        s = ob.stats()
        assert (s.added, s.published, s.pending, s.in_flight) == (10, 2, 8, 0)
        assert _balanced(s)


def test_open_transactions_do_not_overlap_and_released_rows_come_back_first(tmp_path: Path) -> None:
    with _open(tmp_path) as ob:
        for i in range(10):
            ob.add(T, b"%d" % i, kind="instant")
        a, b = ob.begin(3), ob.begin(3)
        assert [r.payload for r in a.rows] == [b"0", b"1", b"2"]
        assert [r.payload for r in b.rows] == [b"3", b"4", b"5"]
        assert ob.stats().in_flight == 6
        ob.end(a, [a.rows[0].id])  # 1 and 2 were not acknowledged: they are released
        c = ob.begin(4)
        assert [r.payload for r in c.rows] == [b"1", b"2", b"6", b"7"]  # oldest free rows, in order
        ob.end(b, [r.id for r in b.rows])
        ob.end(c, [])
        assert _payloads(ob) == [b"1", b"2", b"6", b"7", b"8", b"9"]


def test_begin_on_an_empty_outbox_and_misuse_of_end(tmp_path: Path) -> None:
    with _open(tmp_path) as ob:
        empty = ob.begin(10)
        assert len(empty) == 0 and ob.end(empty, []) == 0
        ob.add(T, b"x", kind="daily")
        tx = ob.begin(10)
        with pytest.raises(ValueError, match="not rows of transaction"):
            ob.end(tx, [tx.rows[0].id + 100])
        ob.end(tx, [tx.rows[0].id])
        with pytest.raises(ValueError, match="not open"):
            ob.end(tx, [])
        with pytest.raises(ValueError, match="kind"):
            ob.add(T, b"x", kind="bogus")
        with pytest.raises(ValueError):
            ob.begin(0)


# -- the bound and the drop policy -------------------------------------------------------------


def _fill(ob: Outbox, kinds: list[str], size: int = 76) -> None:
    for i, kind in enumerate(kinds):
        assert ob.add(T, kind.encode() + b"%03d" % i + b"." * (size - len(kind) - 3), kind=kind) == 0


def test_shed_by_kind_sheds_oldest_instantaneous_first_then_events(tmp_path: Path) -> None:
    # each row is 24 + 76 = 100 bytes; the bound holds 8
    with _open(tmp_path, max_bytes=800) as ob:
        _fill(ob, ["instant", "register", "event", "instant", "daily", "event", "register", "instant"])
        assert ob.stats().pending_bytes == 800
        assert ob.add(T, b"r" * 76, kind="register") == 1  # sheds the oldest instant value
        assert ob.add(T, b"r" * 176, kind="register") == 2  # 200 bytes: the two remaining instants
        assert ob.add(T, b"r" * 76, kind="register") == 1  # no instants left: the oldest event
        s = ob.stats()
        assert s.dropped == {"instant": 3, "event": 1, "register": 0, "daily": 0, "cmd_result": 0}
        assert s.pending_bytes == 800 and _balanced(s)
        kept = [p[:4] for p in _payloads(ob)]
        assert kept == [b"regi", b"dail", b"even", b"regi", b"rrrr", b"rrrr", b"rrrr"]


def test_shed_by_kind_never_sheds_a_more_valuable_kind(tmp_path: Path) -> None:
    with _open(tmp_path, max_bytes=400) as ob:
        _fill(ob, ["register", "daily", "register", "daily"])
        assert ob.add(T, b"i" * 76, kind="instant") == 1  # the new instant value itself
        assert ob.add(T, b"e" * 76, kind="event") == 1
        assert ob.add(T, b"r" * 76, kind="register") == 1  # oldest register goes, FIFO within a kind
        assert ob.add(T, b"d" * 76, kind="daily") == 1  # registers go before daily data
        s = ob.stats()
        assert s.dropped == {"instant": 1, "event": 1, "register": 2, "daily": 0, "cmd_result": 0}
        assert [p[:4] for p in _payloads(ob)] == [b"dail", b"dail", b"rrrr", b"dddd"]
        assert _balanced(s)


def test_reject_new_keeps_what_is_stored(tmp_path: Path) -> None:
    with _open(tmp_path, max_bytes=300, policy="reject_new") as ob:
        _fill(ob, ["instant", "instant", "register"])
        assert ob.add(T, b"d" * 76, kind="daily") == 1
        assert ob.stats().dropped["daily"] == 1
        assert [p[:4] for p in _payloads(ob)] == [b"inst", b"inst", b"regi"]


@pytest.mark.parametrize(("policy", "shed"), [("shed_by_kind", 2), ("reject_new", 0)])
def test_command_results_are_never_dropped(tmp_path: Path, policy: str, shed: int) -> None:
    with _open(tmp_path, max_bytes=200, policy=policy) as ob:
        _fill(ob, ["daily", "daily"])
        # shed_by_kind makes room as for any kind (cmd_result is the most valuable); reject_new does not
        assert sum(ob.add(T, b"c" * 76, kind="cmd_result") for _ in range(2)) == shed
        assert ob.add(T, b"c" * 76, kind="cmd_result") == 0  # past the bound, nothing left to shed
        assert ob.add(T, b"c" * 5000, kind="cmd_result") == 0  # even one larger than the bound
        s = ob.stats()
        assert s.pending == 6 - shed and s.pending_bytes > s.max_bytes
        assert s.dropped["cmd_result"] == 0 and s.dropped["daily"] == shed
        assert _balanced(s)


def test_a_row_larger_than_the_bound_is_dropped_without_shedding_others(tmp_path: Path) -> None:
    with _open(tmp_path, max_bytes=300) as ob:
        _fill(ob, ["instant", "instant"])
        assert ob.add(T, b"x" * 400, kind="daily") == 1
        assert ob.stats().dropped == {**dict.fromkeys(KINDS, 0), "daily": 1}
        assert len(ob) == 2


def test_rows_in_flight_are_not_shed(tmp_path: Path) -> None:
    with _open(tmp_path, max_bytes=300) as ob:
        _fill(ob, ["instant", "instant", "instant"])
        tx = ob.begin(2)  # the two oldest are on their way to the broker
        assert ob.add(T, b"r" * 76, kind="register") == 1
        assert ob.add(T, b"r" * 76, kind="register") == 1  # nothing left to shed but itself
        assert ob.end(tx, [r.id for r in tx.rows]) == 2  # published, not dropped
        s = ob.stats()
        assert (s.published, s.dropped["instant"], s.dropped["register"]) == (2, 1, 1)
        assert _balanced(s)


# -- persistence -------------------------------------------------------------------------------


def test_counters_and_rows_survive_reopening(tmp_path: Path) -> None:
    with _open(tmp_path, max_bytes=300) as ob:
        _fill(ob, ["instant", "register", "instant"])
        assert ob.add(T, b"r" * 76, kind="register") == 1  # sheds the oldest instant value
        tx = ob.begin(1)
        ob.end(tx, [tx.rows[0].id])
        before = ob.stats()
    with _open(tmp_path, max_bytes=300) as ob:
        assert ob.stats() == before
        assert (before.added, before.published, before.dropped["instant"], before.pending) == (4, 1, 1, 2)
        assert [p[:4] for p in _payloads(ob)] == [b"inst", b"rrrr"]


def test_a_corrupt_database_is_moved_aside_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not an sqlite database" * 200)
    with Outbox(path, max_bytes=1000) as ob:
        assert ob.stats().corrupt_resets == 1
        ob.add(T, b"x", kind="event")
    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1
    with Outbox(path, max_bytes=1000) as ob:
        assert ob.stats().corrupt_resets == 1 and len(ob) == 1


def test_checkpoint_from_a_worker_thread_beside_writes(tmp_path: Path) -> None:
    with _open(tmp_path) as ob:
        errors: list[BaseException] = []

        def checkpoints() -> None:
            try:
                for _ in range(20):
                    ob.checkpoint()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        worker = threading.Thread(target=checkpoints)
        worker.start()
        for i in range(300):
            ob.add(T, b"%d" % i, kind="register")
        worker.join()
        assert not errors
        assert len(ob) == 300
    wal = tmp_path / "outbox.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # close() truncates the WAL


# -- sequence numbers and previous values ------------------------------------------------------


def test_add_batch_allocates_seq_in_the_same_transaction(tmp_path: Path) -> None:
    with _open(tmp_path) as ob:
        results = [ob.add_batch(T, lambda seq: b"seq=%d" % seq) for _ in range(3)]
        assert [r.seq for r in results] == [1, 2, 3] and {r.dropped for r in results} == {0}

        def broken(seq: int) -> bytes:
            raise RuntimeError("encoder failed")

        with pytest.raises(RuntimeError):
            ob.add_batch(T, broken, prev={("m1", 1): (5, 6)})
        assert ob.next_seq == 4  # not consumed
        assert ob.get_prev([("m1", 1)]) == {}  # rolled back with it
        assert ob.add_batch(T, lambda seq: b"seq=%d" % seq).seq == 4
        assert _payloads(ob) == [b"seq=1", b"seq=2", b"seq=3", b"seq=4"]
        assert ob.stats().added == 4


def test_seq_never_goes_backwards_across_reopen(tmp_path: Path) -> None:
    seen: list[int] = []
    for _ in range(3):
        with _open(tmp_path, seq_block=16) as ob:
            seen += [ob.add_batch(T, lambda s: b"%d" % s).seq for _ in range(20)]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert max(b - a for a, b in itertools.pairwise(seen)) <= 16  # gaps bounded by the block


def test_prev_values_are_recorded_with_the_batch(tmp_path: Path) -> None:
    with _open(tmp_path, max_bytes=300) as ob:
        ob.add_batch(T, lambda s: b"a" * 76, prev={("m1", 1): (100, 1000), ("m2", 1): (7, 1000)})
        ob.add_batch(T, lambda s: b"b" * 76, prev={("m1", 1): (150, 2000)})
        assert ob.get_prev([("m1", 1), ("m2", 1), ("m3", 1)]) == {
            ("m1", 1): (150, 2000),
            ("m2", 1): (7, 1000),
        }
        # a batch the policy drops was never sent: its values must not become "previous"
        dropped = ob.add_batch(T, lambda s: b"c" * 500, prev={("m1", 1): (999, 3000)})
        assert dropped.dropped == 1
        assert ob.get_prev([("m1", 1)]) == {("m1", 1): (150, 2000)}
    with _open(tmp_path, max_bytes=300) as ob:
        assert ob.get_prev([("m1", 1)]) == {("m1", 1): (150, 2000)}


# -- crash replay ------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    from gateway.outbox import Outbox
    ob = Outbox(sys.argv[1], max_bytes=1 << 30, seq_block=64)
    n = 0
    while True:
        r = ob.add_batch("t", lambda seq: b"seq=%d;" % seq + b"x" * 500, prev={("m", 1): (n, n)})
        n += 1
        if n % 7 == 0:  # acknowledge a few rows now and then, like a publisher would
            tx = ob.begin(3)
            ob.end(tx, [row.id for row in tx.rows[:2]])
            print("acked", *(row.payload.split(b";")[0].decode() for row in tx.rows[:2]), flush=True)
        print("added", r.seq, flush=True)
    """
)


def test_sigkill_replays_every_unaccepted_row_in_order_and_seq_continues(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    added: list[int] = []
    acked: set[int] = set()
    while len(added) < 400:
        line = proc.stdout.readline().decode().split()
        assert line, "child died before it was killed"
        if line[0] == "added":
            added.append(int(line[1]))
        else:
            acked |= {int(s.removeprefix("seq=")) for s in line[1:]}
    proc.send_signal(signal.SIGKILL)  # mid-write, most likely
    proc.wait()
    rest = proc.stdout.read().decode().split("\n")  # lines written just before the kill
    proc.stdout.close()
    for line in rest:
        parts = line.split()
        if parts and parts[0] == "acked":
            acked |= {int(s.removeprefix("seq=")) for s in parts[1:]}

    with Outbox(db, max_bytes=1 << 30, seq_block=64) as ob:
        replayed = [int(p.split(b";")[0].removeprefix(b"seq=")) for p in _payloads(ob)]
        assert replayed == sorted(replayed)  # insertion order
        missing = set(added) - acked - set(replayed)
        assert not missing, f"committed rows lost: {sorted(missing)[:10]}"
        assert not set(replayed) & acked  # acknowledged rows do not come back
        s = ob.stats()
        assert _balanced(s) and s.pending == len(replayed)
        assert ob.next_seq > max(added)
        # prev values are from the last committed batch, which is at least the last one reported
        ((value, _),) = ob.get_prev([("m", 1)]).values()
        assert value >= len(added) - 1
        assert ob.add_batch(T, lambda seq: b"%d" % seq).seq > max(replayed)


def test_the_database_is_plain_sqlite_in_wal_mode(tmp_path: Path) -> None:
    with _open(tmp_path) as ob:
        ob.add(T, b"x", kind="event")
        probe = sqlite3.connect(tmp_path / "outbox.db")
        assert probe.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert probe.execute("SELECT topic, payload, kind FROM outbox").fetchall() == [(T, b"x", "event")]
        probe.close()
