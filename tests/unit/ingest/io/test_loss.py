"""LossStore: durable ranges merge, holes open, split and close, resets count what they lose,
alarms are claimed once, and the store is shared by two connections (two workers); on SQLite
and on PostgreSQL (``state_url``)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ingest.pipeline.loss import LossConfig, LossStore


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock, state_url: str) -> LossStore:
    """On SQLite and on PostgreSQL (``state_url``)."""
    return LossStore(tmp_path / "loss.sqlite", clock=clock, url=state_url)


def gaps(store: LossStore, gw: str = "gw-1") -> list[tuple[int, int]]:
    (acct,) = [a for a in store.report() if a.gateway == gw]
    return [(g.first, g.last) for g in acct.gaps]


def test_seqs_in_order_are_one_range_and_nothing_is_missing(store: LossStore) -> None:
    for s in range(1, 11):
        store.record("gw-1", [s])
    (acct,) = store.report()
    assert (acct.first, acct.last, acct.gaps, acct.missing) == (1, 10, (), 0)
    assert store.missing() == 0


def test_a_hole_opens_and_closes_when_the_missing_batch_arrives(store: LossStore, clock: Clock) -> None:
    store.record("gw-1", [1, 2, 3, 4, 6, 7, 8, 9, 10])
    assert gaps(store) == [(5, 5)] and store.missing() == 1
    (acct,) = store.report()
    assert acct.gaps[0].opened_ms == int(clock.t * 1000)
    store.record("gw-1", [5])
    assert gaps(store) == [] and store.missing() == 0
    assert (store.report()[0].first, store.report()[0].last) == (1, 10)


def test_a_hole_is_split_by_a_seq_inside_it_and_keeps_its_first_seen_time(
    store: LossStore, clock: Clock
) -> None:
    store.record("gw-1", [1])
    store.record("gw-1", [10])
    opened = int(clock.t * 1000)
    clock.t += 100
    store.record("gw-1", [5])
    assert gaps(store) == [(2, 4), (6, 9)]
    assert {g.opened_ms for g in store.report()[0].gaps} == {opened}
    assert store.missing() == 7


def test_a_seq_below_the_lowest_opens_the_hole_up_to_it(store: LossStore) -> None:
    store.record("gw-1", [10, 11])
    store.record("gw-1", [3])
    assert gaps(store) == [(4, 9)]


def test_random_arrival_order_ends_with_the_same_account_as_a_set(store: LossStore) -> None:
    seqs = [s for s in range(1, 300) if s % 37 not in (5, 6)]
    random.Random(7).shuffle(seqs)
    for i in range(0, len(seqs), 5):
        store.record("gw-1", seqs[i : i + 5])
    expected = [(s, s + 1) for s in range(1, 300) if s % 37 == 5 and s + 1 < 299]
    assert gaps(store) == expected
    assert store.missing() == sum(b - a + 1 for a, b in expected)


def test_gateways_are_accounted_separately(store: LossStore) -> None:
    store.record("gw-1", [1, 3])
    store.record("gw-2", [1, 2, 3])
    assert [(a.gateway, a.missing) for a in store.report()] == [("gw-1", 1), ("gw-2", 0)]


def test_out_of_range_seqs_are_ignored(store: LossStore) -> None:
    assert store.record("gw-1", [0, -5, 2**63]) is None
    assert store.report() == []


def test_a_due_hole_is_claimed_once_and_a_released_claim_comes_back(store: LossStore, clock: Clock) -> None:
    store.record("gw-1", [1, 2, 4, 7])
    assert store.claim_alarms(60) == []  # not open long enough
    clock.t += 61
    (alarm,) = store.claim_alarms(60)
    assert (alarm.kind, alarm.gateway, alarm.gaps, alarm.missing, alarm.first, alarm.last) == (
        "seq_gap", "gw-1", 2, 3, 3, 6,
    )  # fmt: skip
    assert store.claim_alarms(60) == []  # claimed: not again
    store.release(alarm)
    assert [a.missing for a in store.claim_alarms(60)] == [3]
    store.record("gw-1", [5])  # splits an alarmed hole: its parts stay alarmed
    clock.t += 1000
    assert store.claim_alarms(60) == []


def test_a_reused_seq_inside_the_ranges_resets_the_gateway_and_counts_the_open_holes_as_lost(
    store: LossStore, clock: Clock
) -> None:
    store.record("gw-1", [1, 2, 3, 5, 6, 9, 10])
    assert store.missing() == 3
    # the outbox was wiped: seq 1 comes again with other content (dedup: digest differs)
    reset = store.record("gw-1", [1], reused=[1])
    assert reset is not None and reset.lost == 3 and len(reset.gaps) == 2
    (acct,) = store.report()
    assert (acct.first, acct.last, acct.gaps, acct.resets, acct.lost) == (1, 1, (), 1, 3)
    assert store.missing() == 0
    # the next new batches are not "reused" inside the new ranges: no second reset
    assert store.record("gw-1", [2], reused=[2]) is None
    assert store.record("gw-1", [3]) is None
    (alarm,) = store.claim_alarms(600)
    assert (alarm.kind, alarm.gateway, alarm.missing, alarm.gaps) == ("seq_reset", "gw-1", 3, 2)
    assert store.claim_alarms(600) == []


def test_a_reused_seq_outside_the_ranges_is_no_reset(store: LossStore) -> None:
    store.record("gw-1", [1, 2])
    assert store.record("gw-1", [3], reused=[3]) is None
    assert store.report()[0].resets == 0


def test_two_workers_share_one_file(tmp_path: Path, clock: Clock, state_url: str) -> None:
    a = LossStore(tmp_path / "loss.sqlite", clock=clock, url=state_url)
    b = LossStore(tmp_path / "loss.sqlite", clock=clock, url=state_url)
    a.record("gw-1", [1, 2])
    b.record("gw-1", [4])
    assert a.missing() == b.missing() == 1
    a.record("gw-1", [3])
    assert b.missing() == 0
    a.record("gw-1", [9])
    clock.t += 700
    assert len(a.claim_alarms(600)) == 1 and b.claim_alarms(600) == []


def test_a_gateway_that_loses_nothing_stays_one_row(store: LossStore) -> None:
    seqs = list(range(1, 2001))
    random.Random(3).shuffle(seqs)
    for s in seqs:
        store.record("gw-1", [s])
    rows = store._db.execute("SELECT COUNT(*) FROM durable").fetchone()[0]
    assert rows == 1 and store._db.execute("SELECT COUNT(*) FROM gaps").fetchone()[0] == 0


def test_config_bounds() -> None:
    assert LossConfig().gap_alarm_s == 600.0 and LossConfig().check_s == 5.0
    assert LossConfig(gap_alarm_s=1).check_s == 0.25
    with pytest.raises(ValueError, match="gap_alarm_s"):
        LossConfig(gap_alarm_s=0)


def test_the_loss_cli_lists_open_gaps_with_age_and_a_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from gateway.cli import main

    cfg = tmp_path / "ingest.toml"
    cfg.write_text('[loss]\npath = "acct.sqlite"\n')
    assert main(["ingest", "--config", str(cfg), "--loss"]) == 0  # no store yet: nothing missing
    assert capsys.readouterr().out.strip().startswith("missing 0 batch(es) in 0 gap(s) across 0 gateway(s)")
    with LossStore(tmp_path / "acct.sqlite") as store:
        store.record("gw-1", [1, 2, 3, 4, 6, 7, 8, 9, 10])
        store.record("gw-2", [1, 2])
    assert main(["ingest", "--config", str(cfg), "--loss"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("gw-1: durable 1-10, missing 1 in 1 gap(s): 5-5 (open ")
    assert lines[1].startswith("missing 1 batch(es) in 1 gap(s) across 2 gateway(s)")
    assert main(["ingest", "--config", str(cfg), "--loss", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["missing"] == 1 and [g["gateway"] for g in doc["gateways"]] == ["gw-1", "gw-2"]
    (gap,) = doc["gateways"][0]["gaps"]
    assert (gap["first"], gap["last"], gap["missing"], gap["alarmed"]) == (5, 5, 1, False) and gap[
        "age_s"
    ] >= 0
