"""The durable outbox: order, transactions, the byte bound and its drop policy, persisted
counters, head-end confirmation and re-sends, dense sequence numbers and previous values, the
migration of older files, and replay after a SIGKILL (DESIGN §5, STYLE H8)."""

from __future__ import annotations

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
from protocols.acks import Ack

ROOT = Path(__file__).resolve().parents[3]
T = "ami/v1/gw-01/up/readings"  # 24 bytes of topic in every row's size


def _open(tmp_path: Path, max_bytes: int = 1 << 20, **kw: object) -> Outbox:
    return Outbox(tmp_path / "outbox.db", max_bytes=max_bytes, **kw)  # type: ignore[arg-type]


def _payloads(ob: Outbox) -> list[bytes]:
    tx = ob.begin(1_000_000)
    ob.end(tx, [])
    return [r.payload for r in tx.rows]


def _balanced(s: OutboxStats) -> bool:
    return s.added == s.published + s.confirmed + s.dropped_total + s.pending


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


def test_seq_is_dense_across_reopening(tmp_path: Path) -> None:
    seen: list[int] = []
    for _ in range(3):
        with _open(tmp_path) as ob:
            seen += [ob.add_batch(T, lambda s: b"%d" % s).seq for _ in range(20)]
    assert seen == list(range(1, 61))  # no block of numbers skipped at a restart


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
    from protocols.acks import Ack, seq_ranges
    ob = Outbox(sys.argv[1], max_bytes=1 << 30)
    n = 0
    while True:
        r = ob.add_batch("t", lambda seq: b"seq=%d;" % seq + b"x" * 500, prev={("m", 1): (n, n)})
        n += 1
        if n % 7 == 0:  # publish a few rows now and then and have the head-end confirm them
            tx = ob.begin(3)
            ob.end(tx, [row.id for row in tx.rows])
            named = [row.payload.split(b";")[0].decode() for row in tx.rows[:2]]
            print("acking", *named, flush=True)  # a kill from here on may or may not have deleted them
            ob.confirm(Ack("gw", seq_ranges(row.seq for row in tx.rows[:2])))
            print("acked", *named, flush=True)
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
    acked: set[int] = set()  # confirmed: the child said so after the confirmation committed
    acking: set[int] = set()  # named by a confirmation that may or may not have committed
    while len(added) < 400:
        line = proc.stdout.readline().decode().split()
        assert line, "child died before it was killed"
        if line[0] == "added":
            added.append(int(line[1]))
        else:
            (acked if line[0] == "acked" else acking).update(int(s.removeprefix("seq=")) for s in line[1:])
    proc.send_signal(signal.SIGKILL)  # mid-write, most likely
    proc.wait()
    rest = proc.stdout.read().decode().split("\n")  # lines written just before the kill
    proc.stdout.close()
    for line in rest:
        parts = line.split()
        if parts and parts[0] in ("acked", "acking"):
            (acked if parts[0] == "acked" else acking).update(int(s.removeprefix("seq=")) for s in parts[1:])

    with Outbox(db, max_bytes=1 << 30) as ob:
        replayed = [int(p.split(b";")[0].removeprefix(b"seq=")) for p in _payloads(ob)]
        assert replayed == sorted(replayed)  # insertion order
        missing = set(added) - acked - acking - set(replayed)
        assert not missing, f"committed rows lost: {sorted(missing)[:10]}"
        assert not set(replayed) & acked  # confirmed rows do not come back
        acked |= acking - set(replayed)  # a confirmation in flight at the kill: committed or not
        s = ob.stats()
        assert _balanced(s) and s.pending == len(replayed)
        assert s.unconfirmed > 0  # published, not confirmed: they are sent again after the restart
        # dense: every number allocated is stored or was confirmed, and the next one follows on
        assert set(replayed) | acked == set(range(1, ob.next_seq))
        assert ob.next_seq - 1 in (max(added), max(added) + 1)  # + 1: committed, killed before printing
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


# -- head-end confirmation and re-sends ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _publish_all(ob: Outbox) -> list[int]:
    """Hand out every due row and PUBACK all of them; their ids."""
    tx = ob.begin(1000)
    ob.end(tx, [r.id for r in tx.rows])
    return [r.id for r in tx.rows]


def test_batches_and_events_stay_after_puback_until_the_head_end_confirms(tmp_path: Path) -> None:
    clock = Clock()
    with _open(tmp_path, clock=clock) as ob:
        seqs = [
            ob.add_batch(T, lambda s: b"batch %d" % s, kind=k).seq for k in ("register", "instant", "daily")
        ]
        ob.add(T, b"event", kind="event", event_id="ev-1")
        ob.add(T, b"result", kind="cmd_result")
        assert len(_publish_all(ob)) == 5
        s = ob.stats()
        # the command result left on PUBACK; the rest waits for the head-end
        assert (s.published, s.unconfirmed, s.pending, s.confirmed, s.in_flight) == (1, 4, 4, 0, 0)
        assert _balanced(s)
        assert ob.begin(10).rows == ()  # sent and not yet due again: nothing to hand out
        assert ob.confirm(Ack("gw", seqs=((seqs[0], seqs[1]),), events=("ev-1",))) == 3
        s = ob.stats()
        assert (s.confirmed, s.unconfirmed, s.pending) == (3, 1, 1) and _balanced(s)
        assert _payloads(ob) == []  # the last batch is still stored, not due
        assert ob.confirm(Ack("gw", seqs=((1, 2), (40, 50)), events=("ev-1", "nope"))) == 0  # idempotent
        assert ob.confirm(Ack("gw", seqs=((seqs[2], seqs[2]),))) == 1
        s = ob.stats()
        assert (len(ob), s.confirmed, s.unconfirmed) == (0, 4, 0) and _balanced(s)


def test_unconfirmed_rows_are_resent_after_the_timeout_oldest_first(tmp_path: Path) -> None:
    clock = Clock()
    with _open(tmp_path, clock=clock, ack_timeout_s=60) as ob:
        ob.add_batch(T, lambda s: b"first")
        ob.add_batch(T, lambda s: b"second")
        _publish_all(ob)
        assert ob.next_due_s() == 60
        clock.now += 59.9
        ob.add_batch(T, lambda s: b"third")
        tx = ob.begin(10)
        assert [r.payload for r in tx.rows] == [b"third"]  # the others are not due yet
        ob.end(tx, [])
        clock.now += 0.1
        assert ob.next_due_s() == 0
        tx = ob.begin(10)
        assert [(r.payload, r.sends) for r in tx.rows] == [(b"first", 1), (b"second", 1), (b"third", 0)]
        ob.end(tx, [r.id for r in tx.rows])
        s = ob.stats()
        assert (s.resent, s.unconfirmed, s.pending) == (2, 3, 3) and _balanced(s)


def test_resends_back_off_up_to_the_cap(tmp_path: Path) -> None:
    clock = Clock()
    with _open(tmp_path, clock=clock, ack_timeout_s=60, resend_cap_s=600) as ob:
        seq = ob.add_batch(T, lambda s: b"b").seq
        waits = []
        for _ in range(6):
            _publish_all(ob)
            wait = ob.next_due_s()
            assert wait is not None
            waits.append(wait)
            clock.now += wait - 0.001
            assert ob.begin(10).rows == ()  # not a moment early
            clock.now += 0.001
        assert waits == [60, 120, 240, 480, 600, 600]
        assert ob.stats().resent == 5
        ob.confirm(Ack("gw", seqs=((seq, seq),)))
        assert ob.next_due_s() is None and len(ob) == 0 and _balanced(ob.stats())


def test_an_unacknowledged_resend_keeps_its_state(tmp_path: Path) -> None:
    clock = Clock()
    with _open(tmp_path, clock=clock, ack_timeout_s=10) as ob:
        ob.add_batch(T, lambda s: b"b")
        _publish_all(ob)
        clock.now += 10
        tx = ob.begin(10)
        ob.end(tx, [])  # the connection dropped before the PUBACK: released, due at once
        tx = ob.begin(10)
        assert [r.sends for r in tx.rows] == [1]
        ob.end(tx, [tx.rows[0].id])
        assert ob.stats().resent == 1 and ob.next_due_s() == 20  # second send: twice the timeout


def test_with_confirm_broker_a_puback_is_enough(tmp_path: Path) -> None:
    with _open(tmp_path, confirm="broker") as ob:
        ob.add_batch(T, lambda s: b"b")
        ob.add(T, b"e", kind="event", event_id="ev-1")
        _publish_all(ob)
        s = ob.stats()
        assert (len(ob), s.published, s.unconfirmed, s.confirmed) == (0, 2, 0, 0) and _balanced(s)


def test_a_confirmation_for_a_row_in_flight_removes_it(tmp_path: Path) -> None:
    clock = Clock()
    with _open(tmp_path, clock=clock, ack_timeout_s=1) as ob:
        seq = ob.add_batch(T, lambda s: b"b").seq
        _publish_all(ob)
        clock.now += 1
        tx = ob.begin(10)  # a re-send is under way ...
        assert ob.confirm(Ack("gw", seqs=((seq, seq),))) == 1  # ... when the first send is confirmed
        assert ob.stats().in_flight == 0
        assert ob.end(tx, [tx.rows[0].id]) == 0  # the PUBACK of the re-send finds it gone
        s = ob.stats()
        assert (len(ob), s.confirmed, s.unconfirmed, s.resent) == (0, 1, 0, 0) and _balanced(s)
        ob.add(T, b"x", kind="instant")
        assert [r.payload for r in ob.begin(10).rows] == [b"x"]


def test_reopening_makes_every_unconfirmed_row_due_at_once(tmp_path: Path) -> None:
    clock = Clock()
    with _open(tmp_path, clock=clock) as ob:
        for _ in range(3):
            ob.add_batch(T, lambda s: b"%d" % s)
        _publish_all(ob)
        ob.add_batch(T, lambda s: b"%d" % s)  # never sent
        assert [r.payload for r in ob.begin(10).rows] == [b"4"]
    with _open(tmp_path, clock=clock) as ob:  # same clock: only the restart makes them due
        s = ob.stats()
        assert (s.pending, s.unconfirmed) == (4, 3)
        tx = ob.begin(10)
        assert [(r.payload, r.sends) for r in tx.rows] == [(b"1", 1), (b"2", 1), (b"3", 1), (b"4", 0)]
        ob.end(tx, [r.id for r in tx.rows])
        assert ob.stats().resent == 3 and ob.stats().unconfirmed == 4


def test_rows_awaiting_confirmation_count_toward_the_bound_and_may_be_shed(tmp_path: Path) -> None:
    with _open(tmp_path, max_bytes=300) as ob:
        for kind in ("instant", "instant", "register"):
            ob.add_batch(T, lambda s: b"." * 76, kind=kind)
        _publish_all(ob)  # all three wait for the head-end, 300 bytes
        assert ob.stats().unconfirmed == 3 and ob.stats().pending_bytes == 300
        assert ob.add(T, b"e" * 76, kind="event", event_id="e1") == 1  # sheds the oldest instant
        tx = ob.begin(10)  # the event is in flight: it cannot be shed
        assert ob.add(T, b"r" * 76, kind="register") == 1  # sheds the other instant
        assert ob.add(T, b"i" * 76, kind="instant") == 1  # nothing less valuable: itself
        s = ob.stats()
        assert s.dropped["instant"] == 3 and s.unconfirmed == 1 and _balanced(s)
        ob.end(tx, [r.id for r in tx.rows])
        assert ob.stats().unconfirmed == 2


def test_event_ids_only_on_events(tmp_path: Path) -> None:
    with _open(tmp_path) as ob, pytest.raises(ValueError, match="event_id"):
        ob.add(T, b"x", kind="cmd_result", event_id="x")


# -- files written by the previous version -----------------------------------------------------

_OLD_SCHEMA = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL, payload BLOB NOT NULL, kind TEXT NOT NULL, size INTEGER NOT NULL);
CREATE INDEX outbox_kind ON outbox (kind, id);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE prev (
    meter TEXT NOT NULL, quantity INTEGER NOT NULL, value INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
    PRIMARY KEY (meter, quantity)) WITHOUT ROWID;
INSERT INTO outbox (topic, payload, kind, size) VALUES ('ami/v1/gw-01/up/readings', x'6f6c64', 'register', 27);
INSERT INTO meta VALUES ('added', 7), ('published', 6), ('seq_next', 8), ('seq_reserved', 1031);
INSERT INTO prev VALUES ('m1', 1, 100, 5000);
"""


def test_an_outbox_of_the_previous_version_is_migrated(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "outbox.db")
    old.executescript(_OLD_SCHEMA)
    old.close()
    with _open(tmp_path) as ob:
        s = ob.stats()
        assert (s.added, s.published, s.pending, s.unconfirmed, s.confirmed) == (7, 6, 1, 0, 0)
        assert _balanced(s) and ob.get_prev([("m1", 1)]) == {("m1", 1): (100, 5000)}
        assert ob.next_seq == 1031  # numbers up to the old reservation may have gone out: not reused
        assert _publish_all(ob)  # an old row carries no key: its PUBACK is the end of it
        assert len(ob) == 0 and ob.stats().published == 7
        assert ob.add_batch(T, lambda s: b"new").seq == 1031
    with _open(tmp_path) as ob:
        assert ob.add_batch(T, lambda s: b"next").seq == 1032  # dense from now on
        columns = {r[1] for r in ob._db.execute("PRAGMA table_info(outbox)")}
        assert {"seq", "event_id", "sends", "due_ms"} <= columns


# -- dense sequence numbers across SIGKILL and clean stops --------------------------------------

_WRITER = textwrap.dedent(
    """
    import signal, sys
    from gateway.outbox import Outbox
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean stop closes the outbox
    with Outbox(sys.argv[1], max_bytes=1 << 30) as ob:
        while True:
            print("added", ob.add_batch("t", lambda seq: b"seq=%d" % seq).seq, flush=True)
    """
)


@pytest.mark.parametrize("stops", [(signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)])
def test_seq_is_dense_across_sigkill_and_clean_stops(tmp_path: Path, stops: tuple[int, ...]) -> None:
    db = tmp_path / "dense.db"
    printed: list[int] = []
    for stop in stops:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(db)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout is not None
        first = len(printed)
        while len(printed) < first + 150:
            line = proc.stdout.readline().split()
            assert line, "writer died before it was stopped"
            printed.append(int(line[1]))
        proc.send_signal(stop)
        proc.wait(10)
        printed += [int(line.split()[1]) for line in proc.stdout.read().decode().splitlines() if line]
        proc.stdout.close()
    with Outbox(db, max_bytes=1 << 30) as ob:
        stored = [int(p.removeprefix(b"seq=")) for p in _payloads(ob)]
        # every number allocated is a stored batch, consecutive from 1: no block skipped at a restart
        assert stored == list(range(1, ob.next_seq))
        assert set(printed) <= set(stored) and printed == sorted(printed)
