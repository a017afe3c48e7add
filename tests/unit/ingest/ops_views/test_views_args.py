"""The views' argument checks (typed errors before any query), flags decoding, alarm ids, the
acknowledgement store, and the alarm listing's merge of failed commands and acknowledgements."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from ingest.model.registry import MeterRegistry
from ingest.ops.alarms import ALARM_KINDS, AlarmAcks, alarm_id, alarms
from ingest.ops.views import (
    MAX_RANGE_MS,
    check_range,
    collection,
    flags_doc,
    load_curve,
    meter_latest,
)
from ingest.sinks.influx.query import InfluxQuery
from protocols.errors import AmigwError, BadArgument
from protocols.flags import Flag

T0 = 1_710_000_000_000


class NoQuery:
    """Stands in for InfluxQuery where a view must refuse before asking anything."""

    async def rows(self, influxql: str) -> list[dict[str, Any]]:
        raise AssertionError(f"queried: {influxql}")

    async def series(self, influxql: str) -> list[dict[str, Any]]:
        raise AssertionError(f"queried: {influxql}")


Q = cast(InfluxQuery, NoQuery())


def test_flags_are_decoded_to_names_lowest_bit_first() -> None:
    assert flags_doc(0) == {"flags": 0, "flag_names": []}
    value = int(Flag.ESTIMATED | Flag.GAP_BEFORE | Flag.SPIKE_REL)
    assert flags_doc(value) == {"flags": value, "flag_names": ["GAP_BEFORE", "ESTIMATED", "SPIKE_REL"]}
    assert flags_doc(1 << 31)["flag_names"] == ["bit31"]


def test_range_checks() -> None:
    check_range(T0, T0 + MAX_RANGE_MS)  # 31 days exactly is allowed
    for start, end, param in [
        (T0, T0 + MAX_RANGE_MS + 1, "end_ms"),
        (T0, T0, "end_ms"),
        (T0, T0 - 1, "end_ms"),
        (-1, T0, "start_ms"),
        (True, T0, "start_ms"),
        (T0, 1.5, "end_ms"),
    ]:
        with pytest.raises(BadArgument) as exc:
            check_range(start, end)  # type: ignore[arg-type]
        assert exc.value.param == param
        assert isinstance(exc.value, AmigwError)


async def test_load_curve_refuses_before_querying() -> None:
    with pytest.raises(BadArgument, match="limited to 31 days") as exc:
        await load_curve(Q, "M1", T0, T0 + 32 * 86_400_000)
    assert exc.value.param == "end_ms"
    with pytest.raises(BadArgument) as exc:
        await load_curve(Q, "M1", T0, T0 + 1, channel="voltage_a")
    assert exc.value.param == "channel"
    with pytest.raises(BadArgument) as exc:
        await load_curve(Q, "", T0, T0 + 1)
    assert exc.value.param == "meter"
    with pytest.raises(BadArgument) as exc:
        await meter_latest(Q, "")
    assert exc.value.param == "meter"


async def test_collection_refuses_before_querying(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text('[meters."M1"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\n')
    reg = MeterRegistry.load(tmp_path / "m.toml")
    d = dt.date(2024, 3, 1)
    cases = [
        (d, d + dt.timedelta(days=31), "gateway", "end_day"),
        (d, d - dt.timedelta(days=1), "gateway", "end_day"),
        (d, d, "meter", "group_by"),
    ]
    for start, end, group_by, param in cases:
        with pytest.raises(BadArgument) as exc:
            await collection(Q, reg, start, end, group_by)
        assert exc.value.param == param


async def test_alarms_refuse_bad_arguments_before_querying(tmp_path: Path) -> None:
    for kwargs, param in [
        ({"kinds": ["nope"]}, "kinds"),
        ({"kinds": []}, "kinds"),
        ({"limit": 0}, "limit"),
        ({"limit": 5001}, "limit"),
        ({"acked": True}, "acked"),
    ]:
        with pytest.raises(BadArgument) as exc:
            await alarms(Q, T0, T0 + 1000, **kwargs)  # type: ignore[arg-type]
        assert exc.value.param == param
    with pytest.raises(BadArgument) as exc:
        await alarms(Q, T0, T0 + MAX_RANGE_MS + 1)
    assert exc.value.param == "end_ms"


def test_alarm_ids_are_stable_and_distinct() -> None:
    a = alarm_id("seq_gap", "gateway=gw-1", T0)
    assert a == alarm_id("seq_gap", "gateway=gw-1", T0)
    assert a.startswith("seq_gap-") and len(a) == len("seq_gap-") + 16
    others = {alarm_id("seq_gap", "gateway=gw-2", T0), alarm_id("seq_gap", "gateway=gw-1", T0 + 1)}
    assert a not in others and len(others) == 2
    assert alarm_id("seq_reset", "gateway=gw-1", T0) != a


def test_acks_are_idempotent_and_persist(tmp_path: Path) -> None:
    path = tmp_path / "acks.sqlite"
    with AlarmAcks(path) as acks:
        first = acks.ack("seq_gap-1", "ops-ana", "looking", T0)
        assert first == {
            "alarm_id": "seq_gap-1",
            "by": "ops-ana",
            "note": "looking",
            "ts_ms": T0,
            "created": True,
        }
        again = acks.ack("seq_gap-1", "ops-bo", "other", T0 + 5)
        assert again == {**first, "created": False}  # the first acknowledgement stays
        acks.ack("seq_gap-2", "ops-bo", "", T0 + 7)
    with AlarmAcks(path) as acks:  # reopened: still there
        got = acks.get(["seq_gap-1", "seq_gap-2", "seq_gap-3", "seq_gap-1"])
        assert got == {
            "seq_gap-1": {"by": "ops-ana", "note": "looking", "ts_ms": T0},
            "seq_gap-2": {"by": "ops-bo", "note": "", "ts_ms": T0 + 7},
        }
        assert acks.get([f"x{i}" for i in range(1200)]) == {}  # chunked below SQLite's bound
        for args, param in [
            (("", "a", ""), "alarm_id"),
            (("x", "", ""), "by"),
            (("x", "a", "n" * 2001), "note"),
        ]:
            with pytest.raises(BadArgument) as exc:
                acks.ack(*args, T0)
            assert exc.value.param == param


async def test_failed_commands_become_alarms_with_their_ack_state(tmp_path: Path) -> None:
    asked: list[tuple[int, int, int]] = []

    async def failed(start_ms: int, end_ms: int, limit: int) -> Sequence[Mapping[str, Any]]:
        asked.append((start_ms, end_ms, limit))
        return [
            {"id": "cmd-1", "ts_ms": T0 + 10, "gateway": "gw-1", "meter": "M1", "reason": "meter_error"},
            {"id": "cmd-2", "ts_ms": T0 + 20, "gateway": "gw-1", "meter": "M2", "reason": "timeout"},
            {"id": "cmd-3", "ts_ms": T0 + 30, "gateway": "gw-2", "meter": None, "reason": "bus_down"},
        ]

    with AlarmAcks(tmp_path / "acks.sqlite") as acks:
        first = await alarms(
            Q, T0, T0 + 1000, kinds=["command_failed"], limit=2, acks=acks, failed_commands=failed
        )
        assert asked == [(T0, T0 + 1000, 3)]
        assert first["kinds"] == ["command_failed"] and first["truncated"] is True and first["count"] == 2
        assert [a["detail"]["command"] for a in first["alarms"]] == ["cmd-3", "cmd-2"]  # newest first
        a2 = first["alarms"][1]
        assert a2 == {
            "id": alarm_id("command_failed", "command=cmd-2", T0 + 20),
            "kind": "command_failed",
            "ts_ms": T0 + 20,
            "area": None,
            "gateway": "gw-1",
            "meter": "M2",
            "detail": {"command": "cmd-2", "reason": "timeout"},
            "ack": None,
        }
        acks.ack(a2["id"], "ops-ana", "called the field team", T0 + 500)
        unacked = await alarms(
            Q, T0, T0 + 1000, kinds=["command_failed"], acks=acks, acked=False, failed_commands=failed
        )
        assert [a["detail"]["command"] for a in unacked["alarms"]] == ["cmd-3", "cmd-1"]
        acked = await alarms(
            Q, T0, T0 + 1000, kinds=["command_failed"], acks=acks, acked=True, failed_commands=failed
        )
        assert [a["id"] for a in acked["alarms"]] == [a2["id"]]
        assert acked["alarms"][0]["ack"] == {
            "by": "ops-ana",
            "note": "called the field team",
            "ts_ms": T0 + 500,
        }


async def test_without_a_failed_commands_source_that_kind_is_empty() -> None:
    got = await alarms(Q, T0, T0 + 1000, kinds=["command_failed"])
    assert got["alarms"] == [] and got["truncated"] is False


async def test_a_malformed_failed_command_record_is_a_programming_error() -> None:
    async def failed(start_ms: int, end_ms: int, limit: int) -> Sequence[Mapping[str, Any]]:
        return [{"id": 7, "ts_ms": T0}]

    with pytest.raises(ValueError, match="'id'"):
        await alarms(Q, T0, T0 + 1000, kinds=["command_failed"], failed_commands=failed)


def test_every_kind_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[4] / "docs" / "ops-views.md").read_text()
    for kind in ALARM_KINDS:
        assert f"`{kind}`" in doc
