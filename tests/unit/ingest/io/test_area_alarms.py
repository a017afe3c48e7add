"""AreaAlarmStore: an outage is one alarm at its earliest power-down whatever order the
correlations that find it run in; merges keep the larger count; an alarm already in the sink is
adopted, not announced again; two connections (two workers) share it; on SQLite and on
PostgreSQL (``state_url``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ingest.pipeline.outages import AreaAlarmStore, Merge, OpenAlarm

Q = 900_000
HOLD = 1_800_000
T0 = 1_700_000_000_000


@pytest.fixture
def store(tmp_path: Path, state_url: str) -> AreaAlarmStore:
    return AreaAlarmStore(tmp_path / "runstate.sqlite", url=state_url, clock=lambda: T0 / 1000)


def test_an_outage_opens_one_alarm_and_later_power_downs_only_count(store: AreaAlarmStore) -> None:
    alarm, merge = store.merge("TA-1", T0, 3, HOLD)
    assert merge is Merge.OPENED and alarm == OpenAlarm("TA-1", T0, 3, T0, 1, False)
    assert store.merge("TA-1", T0 + Q, 3, HOLD)[1] is Merge.SAME
    alarm, merge = store.merge("TA-1", T0 + Q, 5, HOLD)
    assert merge is Merge.COUNTED and (alarm.ts_ms, alarm.events, alarm.version) == (T0, 5, 2)
    assert store.merge("TA-1", T0 + 3 * HOLD, 3, HOLD)[1] is Merge.OPENED  # beyond the hold: another
    assert store.merge("TA-2", T0, 3, HOLD)[1] is Merge.OPENED  # another area
    assert [(a.area, a.ts_ms) for a in store.alarms()] == [
        ("TA-1", T0),
        ("TA-1", T0 + 3 * HOLD),
        ("TA-2", T0),
    ]


def test_an_earlier_power_down_handled_later_moves_the_alarm_back(store: AreaAlarmStore) -> None:
    store.merge("TA-1", T0 + 2 * Q, 4, HOLD)
    store.mark_published("TA-1", T0 + 2 * Q)
    alarm, merge = store.merge("TA-1", T0 + Q, 3, HOLD)
    assert merge is Merge.MOVED
    assert alarm == OpenAlarm("TA-1", T0 + Q, 4, T0 + 2 * Q, 2, True)  # the larger count, published
    alarm, merge = store.merge("TA-1", T0, 3, HOLD)
    assert merge is Merge.MOVED and (alarm.ts_ms, alarm.last_ms, alarm.version) == (T0, T0 + 2 * Q, 3)
    assert store.alarms() == [alarm]
    assert store.current("TA-1", T0 + 2 * Q, HOLD) == alarm


def test_every_order_of_the_same_outage_ends_in_the_same_alarm(tmp_path: Path, state_url: str) -> None:
    found = [(T0, 3), (T0 + Q, 5), (T0 + 2 * Q, 4)]
    ends = set()
    for n, order in enumerate(itertools.permutations(found)):
        s = AreaAlarmStore(tmp_path / f"runstate-{n}.sqlite", url=state_url, clock=lambda: T0 / 1000)
        for ts, events in order:
            s.merge(f"TA-{n}", ts, events, HOLD)
        [a] = [a for a in s.alarms() if a.area == f"TA-{n}"]
        ends.add((a.ts_ms, a.events))
        s.close()
    assert ends == {(T0, 5)}


def test_an_alarm_the_sink_already_holds_is_adopted_as_published(store: AreaAlarmStore) -> None:
    alarm, merge = store.merge("TA-1", T0 + Q, 3, HOLD, known=(T0 + Q, 3))
    assert merge is Merge.SAME and alarm.published and alarm.ts_ms == T0 + Q
    alarm, merge = store.merge("TA-1", T0, 3, HOLD, known=(T0 + Q, 3))
    assert merge is Merge.MOVED and alarm.published and alarm.last_ms == T0 + Q


def test_two_connections_share_the_alarms(tmp_path: Path, state_url: str) -> None:
    a = AreaAlarmStore(tmp_path / "runstate.sqlite", url=state_url)
    b = AreaAlarmStore(tmp_path / "runstate.sqlite", url=state_url)
    assert a.merge("TA-1", T0 + Q, 3, HOLD)[1] is Merge.OPENED
    assert b.merge("TA-1", T0 + Q, 3, HOLD)[1] is Merge.SAME
    moved, _ = b.merge("TA-1", T0, 3, HOLD)
    assert a.current("TA-1", T0 + Q, HOLD) == moved


def test_old_alarms_are_dropped_when_one_opens(tmp_path: Path, state_url: str) -> None:
    now = [T0 / 1000]
    s = AreaAlarmStore(tmp_path / "runstate.sqlite", url=state_url, max_age_s=86_400, clock=lambda: now[0])
    s.merge("TA-1", T0, 3, HOLD)
    now[0] += 2 * 86_400
    s.merge("TA-2", T0 + 2 * 86_400_000, 3, HOLD)
    assert [a.area for a in s.alarms()] == ["TA-2"]
