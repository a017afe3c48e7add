"""The run-state store (ingest.pipeline.state): one query per batch mapped onto its meter table,
only later carries replace earlier ones, old channels are forgotten."""

from __future__ import annotations

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


def test_carry_is_mapped_onto_the_batch_meter_table(tmp_path: Path) -> None:
    with RunStateStore(tmp_path / "s.sqlite") as store:
        store.save([("gw", ["A", "B"], carry([(0, 1, 2, 100), (1, 1, 3, 100), (1, 40, 1, 100)]))])
        store.save([("other", ["A"], carry([(0, 1, 9, 100)]))])
        got = store.carry("gw", ["X", "B"])  # A is not in this batch; B is index 1
        rows = sorted(
            zip(got.meter.tolist(), got.quantity.tolist(), got.state[:, k.C_STOP_LEN].tolist(), strict=True)
        )
        assert rows == [(1, 1, 3), (1, 40, 1)]
        assert len(store.carry("nobody", ["A"])) == 0


def test_only_a_later_last_step_replaces_a_row(tmp_path: Path) -> None:
    with RunStateStore(tmp_path / "s.sqlite") as store:
        store.save([("gw", ["A"], carry([(0, 1, 4, 200)]))])
        store.save([("gw", ["A"], carry([(0, 1, 1, 200)]))])  # a replay of the same batch
        store.save([("gw", ["A"], carry([(0, 1, 1, 100)]))])  # a stale, older batch
        assert store.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 4
        store.save([("gw", ["A"], carry([(0, 1, 5, 300)]))])
        assert store.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 5


def test_channels_not_saved_for_max_age_are_forgotten(tmp_path: Path) -> None:
    now = [1_000.0]
    with RunStateStore(tmp_path / "s.sqlite", max_age_s=60, prune_every=2, clock=lambda: now[0]) as store:
        store.save([("gw", ["A"], carry([(0, 1, 1, 100)]))])
        now[0] += 61
        store.save([("gw", ["B"], carry([(0, 1, 1, 100)]))])  # the second save prunes
        assert len(store) == 1
        assert len(store.carry("gw", ["A", "B"])) == 1


def test_the_store_is_shared_by_connections(tmp_path: Path) -> None:
    with RunStateStore(tmp_path / "s.sqlite") as one, RunStateStore(tmp_path / "s.sqlite") as two:
        one.save([("gw", ["A"], carry([(0, 1, 2, 100)]))])
        assert two.carry("gw", ["A"]).state[0, k.C_STOP_LEN] == 2


def test_merging_agrees_with_a_dictionary_of_channels(tmp_path: Path) -> None:
    """Many saves of overlapping meter tables: the store holds, per (meter, quantity), the state
    with the latest last step (the first saved one on a tie), whatever the batch's meter order."""
    rng = np.random.default_rng(7)
    names = [f"M{i}" for i in range(40)]
    want: dict[tuple[str, int], tuple[int, int]] = {}  # (meter, q) -> (last, stop length)
    with RunStateStore(tmp_path / "s.sqlite") as store:
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
