"""The run-state store (ingest.pipeline.state): one query per batch mapped onto its meter table,
only later carries replace earlier ones, old channels are forgotten."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from ingest.pipeline.state import RunStateStore
from ingest.rules import kernels as k
from ingest.rules import stages


def carry(rows: list[tuple[int, int, int, int]]) -> stages.RunCarry:
    """Rows (meter index, quantity, stop run length, last step time)."""
    state = stages.empty_carry(len(rows))
    for r, (_, _, length, last) in enumerate(rows):
        state[r, k.C_STOP_LEN] = length
        state[r, k.C_LAST] = last
    return stages.RunCarry(
        np.array([m for m, *_ in rows], np.uint32), np.array([q for _, q, *_ in rows], np.uint16), state
    )


def test_carry_is_mapped_onto_the_batch_meter_table(state_url: str, tmp_path: Path) -> None:
    with RunStateStore(tmp_path / "s.sqlite", url=state_url) as store:
        store.save([("gw", ["A", "B"], carry([(0, 1, 2, 100), (1, 1, 3, 100), (1, 40, 1, 100)]))])
        store.save([("other", ["A"], carry([(0, 1, 9, 100)]))])
        got = store.carry("gw", ["X", "B"])  # A is not in this batch; B is index 1
        rows = sorted(
            zip(got.meter.tolist(), got.quantity.tolist(), got.state[:, k.C_STOP_LEN].tolist(), strict=True)
        )
        assert rows == [(1, 1, 3), (1, 40, 1)]
        assert len(store.carry("nobody", ["A"])) == 0


def test_only_a_later_last_step_replaces_a_row(state_url: str, tmp_path: Path) -> None:
    with RunStateStore(tmp_path / "s.sqlite", url=state_url) as store:
        store.save([("gw", ["A"], carry([(0, 1, 4, 200)]))])
        store.save([("gw", ["A"], carry([(0, 1, 1, 200)]))])  # a replay of the same batch
        store.save([("gw", ["A"], carry([(0, 1, 1, 100)]))])  # a stale, older batch
        assert store.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 4
        store.save([("gw", ["A"], carry([(0, 1, 5, 300)]))])
        assert store.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 5


def test_channels_not_saved_for_max_age_are_forgotten(state_url: str, tmp_path: Path) -> None:
    now = [1_000.0]
    with RunStateStore(
        tmp_path / "s.sqlite", url=state_url, max_age_s=60, prune_every=2, clock=lambda: now[0]
    ) as store:
        store.save([("gw", ["A"], carry([(0, 1, 1, 100)]))])
        now[0] += 61
        store.save([("gw", ["B"], carry([(0, 1, 1, 100)]))])  # the second save prunes
        assert len(store) == 1
        assert len(store.carry("gw", ["A", "B"])) == 1


def _shared(tmp_path: Path, url: str, write_every_s: float = 0.0) -> tuple[RunStateStore, RunStateStore]:
    path = tmp_path / "s.sqlite"
    return (
        RunStateStore(path, write_every_s=write_every_s, url=url),
        RunStateStore(path, write_every_s=write_every_s, url=url),
    )


def test_the_store_is_shared_by_connections(state_url: str, tmp_path: Path) -> None:
    one, two = _shared(tmp_path, state_url)
    with one, two:
        one.save([("gw", ["A"], carry([(0, 1, 2, 100)]))])
        assert two.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 2


def test_merging_agrees_with_a_dictionary_of_channels(state_url: str, tmp_path: Path) -> None:
    """Many saves of overlapping meter tables: the store holds, per (meter, quantity), the state
    with the latest last step (the first saved one on a tie), whatever the batch's meter order."""
    rng = np.random.default_rng(7)
    names = [f"M{i}" for i in range(40)]
    want: dict[tuple[str, int], tuple[int, int]] = {}  # (meter, q) -> (last, stop length)
    with RunStateStore(tmp_path / "s.sqlite", url=state_url) as store:
        for save in range(60):
            table = list(rng.choice(names, size=int(rng.integers(1, 12)), replace=False))
            rows, seen = [], set()
            for _ in range(int(rng.integers(1, 20))):
                m, q = int(rng.integers(len(table))), int(rng.choice([1, 5, 40]))
                if (m, q) in seen:
                    continue
                seen.add((m, q))
                last = int(rng.integers(0, 30))
                rows.append((m, q, save, last))
                key = (table[m], q)
                if key not in want or last > want[key][0]:
                    want[key] = (last, save)
            store.save([("gw", table, carry(rows))])
        got = store.carry("gw", names)
        have = {
            (names[m], q): (int(s[k.C_LAST]), int(s[k.C_STOP_LEN]))
            for m, q, s in zip(got.meter.tolist(), got.quantity.tolist(), got.state, strict=True)
        }
        assert have == want
        assert len(store) == len(want)


def test_a_cached_row_is_read_again_once_another_store_saved_the_gateway(
    state_url: str, tmp_path: Path
) -> None:
    """Each store keeps the rows it read; a save by another worker's store bumps the row's
    version, so the next carry reads the new state, and the next merge keeps the other's channels."""
    one, two = _shared(tmp_path, state_url)
    with one, two:
        one.save([("gw", ["A"], carry([(0, 1, 2, 100)]))])
        assert two.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 2  # two caches version 1
        one.save([("gw", ["A", "B"], carry([(0, 1, 3, 200), (1, 1, 7, 200)]))])
        assert two.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 3
        two.save([("gw", ["C"], carry([(0, 1, 1, 300)]))])
        got = one.carry("gw", ["A", "B", "C"])
        assert sorted(zip(got.meter.tolist(), got.state[:, k.C_STOP_LEN].tolist(), strict=True)) == [
            (0, 3), (1, 7), (2, 1),
        ]  # fmt: skip


def test_a_state_file_without_versions_is_taken_over(tmp_path: Path) -> None:
    """A file written before rows carried a version keeps its channels."""
    with RunStateStore(tmp_path / "s.sqlite") as store:
        store.save([("gw", ["A"], carry([(0, 1, 4, 100)]))])
    db = sqlite3.connect(tmp_path / "s.sqlite")
    rows = db.execute(
        "SELECT gateway, saved_ms, channels, meters, meter, quantity, state FROM run_state"
    ).fetchall()
    db.executescript(
        "DROP TABLE run_state; CREATE TABLE run_state (gateway TEXT PRIMARY KEY, saved_ms INTEGER NOT NULL, "
        "channels INTEGER NOT NULL, meters TEXT NOT NULL, meter BLOB NOT NULL, quantity BLOB NOT NULL, "
        "state BLOB NOT NULL) WITHOUT ROWID;"
    )
    db.executemany("INSERT INTO run_state VALUES (?,?,?,?,?,?,?)", rows)
    db.commit()
    db.close()
    with RunStateStore(tmp_path / "s.sqlite") as store:
        assert store.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 4
        store.save([("gw", ["A"], carry([(0, 1, 5, 200)]))])
        assert store.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 5


def test_saves_are_written_at_most_every_write_every_s_and_at_close(state_url: str, tmp_path: Path) -> None:
    """A save is in the store's own carries at once and in the file once ``write_every_s`` has
    passed (or at close): a crash loses at most that much run progress."""
    now = [1_000.0]
    path = tmp_path / "s.sqlite"
    one = RunStateStore(path, url=state_url, clock=lambda: now[0], write_every_s=1.0)
    with RunStateStore(path, url=state_url) as other:
        one.save([("gw", ["A"], carry([(0, 1, 2, 100)]))])
        assert one.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 2  # its own: at once
        assert len(other.carry("gw", ["A"])) == 0  # not written yet
        now[0] += 1.0
        one.save([("gw", ["A"], carry([(0, 1, 3, 200)]))])  # due: written
        assert other.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 3
        one.save([("gw", ["A"], carry([(0, 1, 4, 300)]))])
        assert other.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 3
        one.close()
        assert other.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 4


def test_unsaved_carries_are_merged_onto_what_another_store_wrote_meanwhile(
    state_url: str, tmp_path: Path
) -> None:
    """Two workers' stores: one holds unsaved carries while the other writes a later state of
    the same channel and a new one; one's write keeps the later state and both channels."""
    one, two = _shared(tmp_path, state_url, write_every_s=3600)
    with one, two:
        one.save([("gw", ["A", "B"], carry([(0, 1, 2, 100), (1, 1, 5, 100)]))])
        two.save([("gw", ["A", "C"], carry([(0, 1, 9, 200), (1, 1, 1, 200)]))])
        two.flush()
        got = one.carry("gw", ["A", "B", "C"])  # the stored row changed: merged again
        assert sorted(zip(got.meter.tolist(), got.state[:, k.C_STOP_LEN].tolist(), strict=True)) == [
            (0, 9), (1, 5), (2, 1),
        ]  # fmt: skip
        one.flush()
        got = two.carry("gw", ["A", "B", "C"])
        assert sorted(zip(got.meter.tolist(), got.state[:, k.C_STOP_LEN].tolist(), strict=True)) == [
            (0, 9), (1, 5), (2, 1),
        ]  # fmt: skip
