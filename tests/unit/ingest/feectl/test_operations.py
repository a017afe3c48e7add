"""The fee-control operations (ingest/feectl/operations.py) against the real service object and a
real SQLite ledger (no broker; a list-recording publisher where MQTT would be): enrolment takes
effect without a restart, manual relay commands are signed and sent like fee control's own,
operator lists and changes, and day statements that reconcile with the journal."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.feectl import operations as ops
from ingest.feectl.config import load_service_config
from ingest.feectl.engine import FeeController
from ingest.feectl.model import Account, FeeControlError, MeterRef, RelayState
from ingest.feectl.service import FeeControlService
from ingest.feectl.sqlite_store import SqliteLedgerStore
from ingest.feectl.store import CHARGE_KINDS, Hold, JournalKind
from protocols.aggregates import IntervalRecord, encode_intervals
from protocols.commands import CommandResult, verify_command
from protocols.errors import ConfigError
from tests.unit.ingest.ops.conftest import KEY, NOW, Recorder, config_text, write_files

from .conftest import FLAT_TOML, QUARTER, ms

START = NOW - QUARTER  # 09:45-10:00 local on Tuesday 2024-03-05, inside the FC-09 trip hours
HOUR = 3_600_000
KEY2 = bytes(range(64, 96))
DEAR_TOML = FLAT_TOML.replace('id = "flat"', 'id = "dear"').replace("flat = 5000", "flat = 10000")
FILE_ACCOUNT = 'meters = [{ meter = "m-1", gateway = "gw-1" }]'


def config(tmp: Path, edit: tuple[str, str] = ("", ""), extra: str = "") -> str:
    """test_api's file (acc-1 with m-1 on gw-1; overdraft 100 fen, no grace) with a second
    gateway and a second tariff at twice the price."""
    write_files(tmp)
    (tmp / "gw-2.key").write_text(KEY2.hex())
    (tmp / "dear.toml").write_text(DEAR_TOML)
    text = config_text(extra).replace(
        'command_key_files = { gw-1 = "gw-1.key" }',
        'command_key_files = { gw-1 = "gw-1.key", gw-2 = "gw-2.key" }',
    )
    text = text.replace(
        'tariff_files = { flat = "flat.toml" }', 'tariff_files = { flat = "flat.toml", dear = "dear.toml" }'
    )
    return text.replace(*edit) if edit[0] else text


def make_service(
    tmp: Path, *, edit: tuple[str, str] = ("", ""), extra: str = "", clock: Callable[[], int] = lambda: NOW
) -> FeeControlService:
    svc = FeeControlService(
        load_service_config(config(tmp, edit, extra), tmp), clock=clock, publisher=Recorder()
    )
    svc.enroll()
    return svc


@pytest.fixture
def service(tmp_path: Path) -> FeeControlService:
    return make_service(tmp_path)


def sent(service: FeeControlService) -> list[tuple[str, bytes]]:
    assert isinstance(service.publisher, Recorder)
    return service.publisher.sent


def doc(
    account: str = "acc-9",
    meters: tuple[tuple[str, str], ...] = (("m-9", "gw-1"),),
    *,
    tariff: str = "flat",
    protected: bool = False,
    **more: Any,
) -> dict[str, Any]:
    return {
        "account_id": account,
        "tariff": tariff,
        "protected": protected,
        "customer_class": "residential",
        "meters": [{"meter": m, "gateway": g, "remote": True} for m, g in meters],
        **more,
    }


def intervals(meter: str, energy: int, start: int = START, gateway: str = "gw-1") -> bytes:
    return encode_intervals(gateway, 1, [IntervalRecord(meter, 1, start, start + QUARTER, energy, 0)])


def charge(
    service: FeeControlService, meter: str, energy: int, start: int = START, gateway: str = "gw-1"
) -> None:
    assert service.handle_message(f"ami/v1/agg/intervals/{gateway}", intervals(meter, energy, start, gateway))


def balance(service: FeeControlService, account: str) -> int:
    return service.controller.balance(account).balance_fen


def rows(service: FeeControlService, account: str, kind: JournalKind) -> list[Any]:
    return [e for e in service.controller.journal(account) if e.kind is kind]


@contextlib.contextmanager
def refused(reason: str, subject: str | None = None) -> Iterator[None]:
    """The block raises a FeeControlError with this reason (and subject)."""
    with pytest.raises(FeeControlError) as err:
        yield
    assert err.value.reason == reason, err.value
    assert subject is None or err.value.subject == subject, err.value


# -- 1. enrolment ------------------------------------------------------------------------------
def test_an_enrolled_meter_is_charged_without_a_restart(service: FeeControlService) -> None:
    charge(service, "m-9", 100)  # not enrolled yet: skipped
    assert service.stats.intervals_skipped == 1
    out = ops.enrol_account(service, doc(opening_balance_fen=1000), "cis", NOW)
    assert (out["created"], out["changed"], out["opening_balance_fen"]) == (True, True, 1000)
    assert out["meters_added"] == ["m-9"] and out["account"]["balance_fen"] == 1000
    charge(service, "m-9", 100, START - QUARTER)  # the same service, no restart
    assert balance(service, "acc-9") == 1000 - 50  # 1 kWh at 0.5000 yuan/kWh
    (row,) = rows(service, "acc-9", JournalKind.ACCOUNT)
    assert (row.code, json.loads(row.detail)["by"]) == ("API", "cis")
    (opening,) = rows(service, "acc-9", JournalKind.ADJUSTMENT)
    assert (opening.ref, opening.code, opening.amount_fen) == ("opening:acc-9", "OPENING", 1000)


def test_a_meter_rating_from_enrolment_bounds_its_intervals(service: FeeControlService) -> None:
    d = doc()
    d["meters"][0]["max_power_w"] = 400  # at most ceil(400 W x 15 min) = 10 x 0.01 kWh
    ops.enrol_account(service, d, "cis", NOW)
    charge(service, "m-9", 11)
    charge(service, "m-9", 10, START - QUARTER)
    assert [r["reason"] for r in ops.rejects(service)["rejects"]] == ["energy_out_of_range"]
    assert balance(service, "acc-9") == -5


def test_a_tariff_change_prices_the_next_interval(service: FeeControlService) -> None:
    ops.enrol_account(service, doc(), "cis", NOW)
    charge(service, "m-9", 100, START - QUARTER)
    out = ops.enrol_account(service, doc(tariff="dear"), "cis", NOW)
    assert (out["created"], out["changed"], out["account"]["tariff"]) == (False, True, "dear")
    charge(service, "m-9", 100)
    assert [-e.amount_fen for e in rows(service, "acc-9", JournalKind.CHARGE)] == [50, 100]


def test_a_meter_of_another_account_is_refused_and_nothing_changes(service: FeeControlService) -> None:
    with refused("meter_conflict", "m-1"):
        ops.enrol_account(service, doc(meters=(("m-9", "gw-1"), ("m-1", "gw-1"))), "cis", NOW)
    with refused("unknown_account"):
        service.account_view("acc-9")  # the whole enrolment was rolled back
    charge(service, "m-9", 100)
    assert service.stats.intervals_skipped == 1


def test_a_repeated_enrolment_changes_nothing(service: FeeControlService) -> None:
    first = ops.enrol_account(service, doc(opening_balance_fen=700), "cis", NOW)
    again = ops.enrol_account(service, doc(opening_balance_fen=700), "cis", NOW + 1)
    assert (again["created"], again["changed"], again["opening_balance_fen"]) == (False, False, None)
    assert again["account"] == first["account"] and again["decisions"] == []
    assert len(rows(service, "acc-9", JournalKind.ACCOUNT)) == 1
    assert len(rows(service, "acc-9", JournalKind.ADJUSTMENT)) == 1
    with refused("opening_balance_conflict", "acc-9"):
        ops.enrol_account(service, doc(opening_balance_fen=800), "cis", NOW)
    with refused("opening_balance_conflict", "acc-1"):  # opened without one: only 0 matches
        ops.enrol_account(service, doc("acc-1", (("m-1", "gw-1"),), opening_balance_fen=5), "cis", NOW)
    assert balance(service, "acc-9") == 700


def test_removing_a_meter_stops_its_charging_but_not_while_it_is_tripped(service: FeeControlService) -> None:
    ops.enrol_account(service, doc(meters=(("m-9", "gw-1"), ("m-8", "gw-2"))), "cis", NOW)
    ops.manual_command(service, "m-8", "trip", "op", "test", NOW)
    with refused("command_conflict", "m-8"):
        ops.enrol_account(service, doc(), "cis", NOW)
    (cid,) = [c["command_id"] for c in ops.commands(service, meter="m-8")["commands"]]
    result = CommandResult(cid, "gw-2", "m-8", "trip", "done", NOW, relay_state=1).signed(KEY2)
    assert service.handle_message("ami/v1/gw-2/up/cmd-result", result)
    with refused("relay_conflict", "m-8"):
        ops.enrol_account(service, doc(), "cis", NOW)
    ops.manual_command(service, "m-8", "restore", "op", "test", NOW)
    (cid,) = [c["command_id"] for c in ops.commands(service, meter="m-8", states=["issued"])["commands"]]
    result = CommandResult(cid, "gw-2", "m-8", "close_allowed", "done", NOW, relay_state=0).signed(KEY2)
    assert service.handle_message("ami/v1/gw-2/up/cmd-result", result)
    out = ops.enrol_account(service, doc(), "cis", NOW)
    assert (out["meters_removed"], [m["meter"] for m in out["account"]["meters"]]) == (["m-8"], ["m-9"])
    charge(service, "m-8", 100, gateway="gw-2")
    assert balance(service, "acc-9") == 0 and service.stats.intervals_skipped == 1
    with refused("unknown_meter"):
        ops.manual_command(service, "m-8", "trip", "op", "test", NOW)


def test_a_change_of_protection_re_evaluates_the_account_at_once(service: FeeControlService) -> None:
    out = ops.enrol_account(service, doc(protected=True, opening_balance_fen=-500), "cis", NOW)
    assert [(d["kind"], d["reasons"]) for d in out["decisions"]] == [
        ("ZERO_NOTICE", ["TRIP_DUE"]),
        ("TRIP_SUPPRESSED", ["PROTECTED"]),
    ]
    assert service.controller.pending_commands(NOW) == ()
    out = ops.enrol_account(service, doc(protected=False), "cis", NOW + 1)
    ((kind, cid),) = [(d["kind"], d["command_id"]) for d in out["decisions"]]
    assert kind == "TRIP_ISSUED"
    assert [c.command_id for c in service.controller.pending_commands(NOW + 1)] == [cid]


@pytest.mark.parametrize(
    ("change", "reason", "subject"),
    [
        ({"colour": "red"}, "bad_fields", "colour"),
        ({"account_id": ""}, "bad_fields", "account_id"),
        ({"account_id": "x" * 129}, "bad_fields", "account_id"),
        ({"protected": 1}, "bad_fields", "protected"),
        ({"tariff": "nope"}, "unknown_tariff", "tariff"),
        ({"meters": []}, "bad_fields", "meters"),
        (
            {"meters": [{"meter": "m-9", "gateway": "gw-1", "remote": True, "colour": 1}]},
            "bad_fields",
            "meters[0].colour",
        ),
        ({"meters": [{"meter": "m-9", "gateway": "gw-1"}]}, "bad_fields", "meters[0].remote"),
        ({"meters": [{"meter": "m-9", "gateway": "agg", "remote": True}]}, "bad_fields", "meters[0].gateway"),
        ({"meters": [{"meter": "m-9", "gateway": "a/b", "remote": True}]}, "bad_fields", "meters[0].gateway"),
        (
            {"meters": [{"meter": "m-9", "gateway": "gw-3", "remote": True}]},
            "unknown_gateway",
            "meters[0].gateway",
        ),
        (
            {"meters": [{"meter": "m-9", "gateway": "gw-1", "remote": True, "max_power_w": 0}]},
            "bad_fields",
            "meters[0].max_power_w",
        ),
        (
            {"meters": [{"meter": "m", "gateway": "gw-1", "remote": True}] * 2},
            "bad_fields",
            "meters[1].meter",
        ),
        ({"opening_balance_fen": 1.5}, "bad_fields", "opening_balance_fen"),
        ({"opening_balance_fen": 10_000_001}, "amount_out_of_range", "opening_balance_fen"),
    ],
)
def test_enrolment_fields_are_checked_strictly(
    service: FeeControlService, change: dict[str, Any], reason: str, subject: str
) -> None:
    with refused(reason, subject):
        ops.enrol_account(service, {**doc(), **change}, "cis", NOW)
    with refused("unknown_account"):
        service.account_view("acc-9")


def test_missing_keys_and_a_missing_author_are_named(service: FeeControlService) -> None:
    d = doc()
    del d["customer_class"]
    with refused("bad_fields", "customer_class"):
        ops.enrol_account(service, d, "cis", NOW)
    with refused("bad_fields", "by"):
        ops.enrol_account(service, doc(), "", NOW)
    with refused("bad_fields", "body"):
        ops.enrol_account(service, ["acc-9"], "cis", NOW)


# -- restart: the file against changes made through the operations ------------------------------
def test_a_restart_keeps_api_changes_and_applies_file_edits(tmp_path: Path) -> None:
    first = make_service(tmp_path)
    ops.enrol_account(first, doc("acc-1", (("m-1", "gw-1"),), tariff="dear", protected=True), "cis", NOW)
    first.controller.store.close()
    same_file = make_service(tmp_path)  # same file, same ledger
    view = same_file.account_view("acc-1")
    assert (view["tariff"], view["protected"]) == ("dear", True)
    same_file.controller.store.close()
    edit = (FILE_ACCOUNT, 'customer_class = "commercial"\n' + FILE_ACCOUNT)
    edited = make_service(tmp_path, edit=edit)  # the entry was edited: it is applied, whole
    view = edited.account_view("acc-1")
    assert (view["tariff"], view["protected"], view["customer_class"]) == ("flat", False, "commercial")
    codes = [(e.code, json.loads(e.detail)["by"]) for e in rows(edited, "acc-1", JournalKind.ACCOUNT)]
    assert codes == [("FILE", "config"), ("API", "cis"), ("FILE", "config")]
    ops.enrol_account(edited, doc("acc-1", (("m-1", "gw-1"),), protected=True), "cis", NOW)
    edited.controller.store.close()
    assert make_service(tmp_path, edit=edit).account_view("acc-1")["protected"] is True


def test_a_file_entry_the_ledger_refuses_stops_the_start_naming_it(tmp_path: Path) -> None:
    first = make_service(tmp_path)
    ops.enrol_account(first, doc("acc-7", (("m-7", "gw-1"),)), "cis", NOW)
    first.controller.store.close()
    extra = '[[service.accounts]]\naccount_id = "acc-8"\ntariff = "flat"\nmeters = [{ meter = "m-7", gateway = "gw-1" }]\n'
    with pytest.raises(ConfigError) as err:
        make_service(tmp_path, extra=extra)
    assert err.value.key_path == "service.accounts[1]" and "meter_conflict" in str(err.value)


def test_a_version_1_ledger_gets_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE meters (meter TEXT PRIMARY KEY, account_id TEXT NOT NULL, gateway TEXT NOT NULL,
            remote INTEGER NOT NULL, position INTEGER NOT NULL, relay TEXT NOT NULL DEFAULT 'closed',
            failed_action TEXT, failed_attempts INTEGER NOT NULL DEFAULT 0, last_failed_ms INTEGER,
            blocked_reason TEXT, last_sig TEXT NOT NULL DEFAULT '');
        CREATE TABLE holds (id INTEGER PRIMARY KEY AUTOINCREMENT, account_id TEXT NOT NULL, meter TEXT,
            day TEXT, reason TEXT NOT NULL, set_ms INTEGER NOT NULL, released_ms INTEGER);
        """
    )
    db.close()
    store = SqliteLedgerStore(path)
    with store.transaction():
        store.put_account(Account("A", (MeterRef("M", "G", True, 500),), "flat"))
        store.add_hold(Hold("A", None, None, "X", NOW, NOW + 1))
        assert store.account("A").meters[0].max_power_w == 500
        assert store.holds("A")[0].until_ms == NOW + 1
    store.close()


# -- 2. manual relay commands ------------------------------------------------------------------
async def test_a_manual_trip_is_issued_and_sent_signed_with_the_gateway_key(
    service: FeeControlService,
) -> None:
    out = ops.manual_command(service, "m-1", "trip", "op7", "customer moved out", NOW)
    cmd = out["command"]
    assert (cmd["state"], cmd["action"], cmd["gateway"], cmd["meter"]) == ("issued", "trip", "gw-1", "m-1")
    assert out["decisions"][0]["kind"] == "TRIP_ISSUED"
    assert out["decisions"][0]["reasons"] == ["MANUAL", "OPERATOR:op7"]
    assert service._kick.is_set()
    await service.flush()
    (topic, payload), *notes = sent(service)
    trip = verify_command(payload, KEY, NOW, gateway="gw-1")
    assert (topic, trip.id, trip.action, trip.meter) == (
        "ami/v1/gw-1/down/cmd",
        cmd["command_id"],
        "trip",
        "m-1",
    )
    assert [json.loads(p)["kind"] for _, p in notes] == ["TRIP_ISSUED", "ZERO_NOTICE"]  # b = 0: re-evaluated
    (row,) = [e for e in rows(service, "acc-1", JournalKind.DECISION) if e.code == "TRIP_ISSUED"]
    assert json.loads(row.detail)["by"] == "op7" and json.loads(row.detail)["reason"] == "customer moved out"
    assert row.ref == cmd["command_id"]


def test_a_manual_trip_holds_the_relay_until_a_manual_restore(service: FeeControlService) -> None:
    service.record_payment("acc-1", "pay-1", 1000)  # in credit: fee control would restore a trip
    cid = ops.manual_command(service, "m-1", "trip", "op", "safety", NOW)["command"]["command_id"]
    with refused("command_conflict", "m-1"):
        ops.manual_command(service, "m-1", "restore", "op", "changed my mind", NOW)
    done = CommandResult(cid, "gw-1", "m-1", "trip", "done", NOW, relay_state=1).signed(KEY)
    assert service.handle_message("ami/v1/gw-1/up/cmd-result", done)
    assert service.controller.command(cid).state.value == "verified"  # type: ignore[union-attr]
    service.tick()
    service.record_payment("acc-1", "pay-2", 500)
    assert service.controller.pending_commands(NOW) == ()
    deferred = [
        e.reasons for e in rows(service, "acc-1", JournalKind.DECISION) if e.code == "RESTORE_DEFERRED"
    ]
    assert deferred == [("MANUAL_TRIP",)]  # journaled once, not at every evaluation
    out = ops.manual_command(service, "m-1", "restore", "op", "done", NOW)
    assert out["command"]["action"] == "close_allowed"
    with service.controller.store.transaction():
        (snap,) = service.controller.store.meter_snapshots("acc-1")
    assert (snap.relay, snap.manual_by) == (RelayState.OPEN, None)


def test_fee_controls_own_trip_replaces_a_failed_manual_trip(service: FeeControlService) -> None:
    cid = ops.manual_command(service, "m-1", "trip", "op", "x", NOW)["command"]["command_id"]
    failed = CommandResult(cid, "gw-1", "m-1", "trip", "failed", NOW, detail="no answer").signed(KEY)
    assert service.handle_message("ami/v1/gw-1/up/cmd-result", failed)  # the relay stays closed
    charge(service, "m-1", 300)  # b = -150 <= -100: trip due, after the retry spacing
    (trip,) = service.controller.tick(NOW + 301_000).commands
    with service.controller.store.transaction():
        (snap,) = service.controller.store.meter_snapshots("acc-1")
    assert (trip.action.value, snap.manual_by) == ("trip", None)
    done = CommandResult(trip.command_id, "gw-1", "m-1", "trip", "done", NOW, relay_state=1).signed(KEY)
    assert service.handle_message("ami/v1/gw-1/up/cmd-result", done)
    res, _ = service.record_payment("acc-1", "pay-1", 1000)
    assert [d.kind.value for d in res.decisions][-1] == "RESTORE_ISSUED"  # a balance trip: FC-08 applies


def test_a_protected_account_is_tripped_manually_only_with_force(tmp_path: Path) -> None:
    edit = (FILE_ACCOUNT, "protected = true\n" + FILE_ACCOUNT)
    service = make_service(tmp_path, edit=edit)
    with refused("protected_conflict", "acc-1"):
        ops.manual_command(service, "m-1", "trip", "op", "x", NOW)
    assert service.controller.pending_commands(NOW) == ()
    out = ops.manual_command(service, "m-1", "trip", "op", "court order", NOW, force=True)
    assert out["decisions"][0]["reasons"] == ["MANUAL", "OPERATOR:op", "PROTECTION_OVERRIDDEN"]
    assert [c.command_id for c in service.controller.pending_commands(NOW)] == [out["command"]["command_id"]]


@pytest.mark.parametrize(
    ("args", "reason", "subject"),
    [
        (("m-404", "trip"), "unknown_meter", "m-404"),
        (("m-1", "close"), "bad_fields", "action"),
        (("m-1", "close_allowed"), "bad_fields", "action"),
        (("", "trip"), "bad_fields", "meter"),
    ],
)
def test_manual_command_arguments(
    service: FeeControlService, args: tuple[str, str], reason: str, subject: str
) -> None:
    with refused(reason, subject):
        ops.manual_command(service, *args, "op", "x", NOW)
    with refused("bad_fields", "force"):
        ops.manual_command(service, "m-1", "trip", "op", "x", NOW, force="yes")
    assert service.controller.pending_commands(NOW) == ()


# -- 3. lists and operator changes -------------------------------------------------------------
def test_command_history_filters(service: FeeControlService) -> None:
    ops.enrol_account(service, doc(), "cis", NOW)
    a = ops.manual_command(service, "m-1", "trip", "op", "x", NOW)["command"]["command_id"]
    b = ops.manual_command(service, "m-9", "trip", "op", "x", NOW + 1)["command"]["command_id"]
    service.controller.tick(NOW + 3 * HOUR)  # both expire
    c = ops.manual_command(service, "m-1", "restore", "op", "x", NOW + 3 * HOUR)["command"]["command_id"]
    assert [x["command_id"] for x in ops.commands(service)["commands"]] == [c, b, a]
    assert [x["command_id"] for x in ops.commands(service, account="acc-1")["commands"]] == [c, a]
    assert [x["state"] for x in ops.commands(service, meter="m-1")["commands"]] == ["issued", "expired"]
    assert [x["command_id"] for x in ops.commands(service, states=["expired"], limit=1)["commands"]] == [b]
    assert ops.command(service, a)["state"] == "expired"
    with refused("unknown_command", "nope"):
        ops.command(service, "nope")
    with refused("unknown_account"):
        ops.commands(service, account="acc-404")
    with refused("unknown_meter"):
        ops.commands(service, meter="m-404")
    with refused("bad_fields", "states"):
        ops.commands(service, states=["sent"])
    with refused("bad_fields", "limit"):
        ops.commands(service, limit=0)


def test_an_operator_hold_defers_trips_until_it_ends_or_is_released(service: FeeControlService) -> None:
    ops.enrol_account(service, doc(protected=True, opening_balance_fen=-500), "cis", NOW)
    out = ops.add_hold(service, "acc-9", "EXTREME_WEATHER", "op", NOW, until_ms=NOW + HOUR)
    assert out["added"] and [(h["reason"], h["until_ms"]) for h in out["holds"]] == [
        ("EXTREME_WEATHER", NOW + HOUR)
    ]
    assert ops.add_hold(service, "acc-9", "EXTREME_WEATHER", "op", NOW)["added"] is False  # already held
    out = ops.enrol_account(service, doc(protected=False), "cis", NOW)
    assert [(d["kind"], d["reasons"]) for d in out["decisions"]] == [("TRIP_DEFERRED", ["AUDIT_HOLD"])]
    ev = service.controller.tick(NOW + HOUR)
    mine = [(d.kind.value, d.reasons) for d in ev.decisions if d.account_id == "acc-9"]
    assert mine == [("HOLD_RELEASED", ("EXPIRED",)), ("TRIP_ISSUED", ())]
    assert ops.holds(service, "acc-9")["holds"] == []


def test_releasing_holds_re_evaluates(service: FeeControlService) -> None:
    ops.enrol_account(service, doc(protected=True, opening_balance_fen=-500), "cis", NOW)
    ops.add_hold(service, "acc-9", "DISPUTE", "op", NOW, meter="m-9")
    ops.enrol_account(service, doc(protected=False), "cis", NOW)
    assert service.controller.pending_commands(NOW) == ()
    out = ops.release_holds(service, "acc-9", "op2", NOW)
    assert out["released"] == 1
    assert [(d["kind"], d["reasons"]) for d in out["decisions"]] == [
        ("HOLD_RELEASED", ["OPERATOR:op2"]),
        ("TRIP_ISSUED", []),
    ]
    assert ops.release_holds(service, "acc-9", "op2", NOW) == {"released": 0, "decisions": []}
    with refused("unknown_meter", "m-1"):
        ops.add_hold(service, "acc-9", "DISPUTE", "op", NOW, meter="m-1")
    with refused("bad_fields", "until_ms"):
        ops.add_hold(service, "acc-9", "DISPUTE", "op", NOW, until_ms=NOW)
    with refused("unknown_account"):
        ops.holds(service, "acc-404")


def test_decisions_lists_decision_rows_newest_last(service: FeeControlService) -> None:
    ops.enrol_account(service, doc(protected=True, opening_balance_fen=-500), "cis", NOW)
    ops.manual_command(service, "m-9", "trip", "op", "x", NOW, force=True)
    everything = ops.decisions(service, "acc-9")["decisions"]
    assert [r["code"] for r in everything] == ["ZERO_NOTICE", "TRIP_SUPPRESSED", "TRIP_ISSUED"]
    assert all(r["kind"] == "decision" for r in everything)
    (last,) = ops.decisions(service, "acc-9", limit=1)["decisions"]
    assert (last["code"], last["detail"]["by"]) == ("TRIP_ISSUED", "op")


def test_adjustments_are_idempotent_by_id(service: FeeControlService) -> None:
    out = ops.record_adjustment(service, "acc-1", "adj-1", -300, "METER_TEST_FEE", "op", NOW)
    assert (out["recorded"], out["balance_fen"]) == (True, -300)
    again = ops.record_adjustment(service, "acc-1", "adj-1", -300, "METER_TEST_FEE", "op", NOW + 1)
    assert (again["recorded"], again["balance_fen"]) == (False, -300)
    with refused("adjustment_conflict", "adj-1"):
        ops.record_adjustment(service, "acc-1", "adj-1", -301, "METER_TEST_FEE", "op", NOW)
    with refused("bad_fields", "adjustment_id"):
        ops.record_adjustment(service, "acc-1", "opening:acc-1", 5, "X", "op", NOW)
    with refused("bad_fields", "amount_fen"):
        ops.record_adjustment(service, "acc-1", "adj-2", 0, "X", "op", NOW)
    with refused("amount_out_of_range", "amount_fen"):
        ops.record_adjustment(service, "acc-1", "adj-2", -10_000_001, "X", "op", NOW)
    with refused("unknown_account"):
        ops.record_adjustment(service, "acc-404", "adj-3", 5, "X", "op", NOW)
    (row,) = rows(service, "acc-1", JournalKind.ADJUSTMENT)
    assert (row.code, json.loads(row.detail)) == ("METER_TEST_FEE", {"by": "op"})


def test_a_credit_adjustment_restores_a_tripped_meter(service: FeeControlService) -> None:
    charge(service, "m-1", 300)  # 150 fen: b = -150 <= -100, trip
    (trip,) = service.controller.pending_commands(NOW)
    done = CommandResult(trip.command_id, "gw-1", "m-1", "trip", "done", NOW, relay_state=1).signed(KEY)
    assert service.handle_message("ami/v1/gw-1/up/cmd-result", done)
    out = ops.record_adjustment(service, "acc-1", "goodwill", 1000, "GOODWILL", "op", NOW)
    assert [(d["kind"], d["action"]) for d in out["decisions"]][-1] == ("RESTORE_ISSUED", "close_allowed")


def test_rejects_are_listed_with_their_payload(service: FeeControlService) -> None:
    assert service.handle_message("ami/v1/agg/intervals/gw-1", b"\xff\x00garbage")
    (r,) = ops.rejects(service, 10)["rejects"]
    assert (r["reason"], r["payload_hex"], r["payload_bytes"], r["gateway"]) == (
        "undecodable",
        "ff00" + b"garbage".hex(),
        9,
        None,
    )
    with refused("bad_fields", "limit"):
        ops.rejects(service, 1001)


def test_reset_meter_clears_an_escalation_block(service: FeeControlService) -> None:
    store = service.controller.store
    with store.transaction():
        (snap,) = store.meter_snapshots("acc-1")
        store.put_meter_snapshot(dataclasses.replace(snap, blocked_reason="COMMAND_FAILED"))
    assert service.account_view("acc-1")["meters"][0]["blocked"] == "COMMAND_FAILED"
    out = ops.reset_meter(service, "m-1", "op", NOW)
    assert (out["meter"], out["account"]) == ("m-1", "acc-1")
    assert service.account_view("acc-1")["meters"][0]["blocked"] is None
    (row,) = [e for e in rows(service, "acc-1", JournalKind.DECISION) if e.code == "HOLD_RELEASED"]
    assert row.reasons == ("OPERATOR:op", "COMMAND_BLOCK")
    with refused("unknown_meter"):
        ops.reset_meter(service, "m-404", "op", NOW)


# -- 4. statements -----------------------------------------------------------------------------
def test_a_statement_by_local_day(service: FeeControlService) -> None:
    ctl = service.controller
    ops.enrol_account(service, doc(opening_balance_fen=1000), "cis", NOW)  # 03-05 10:00
    ctl.charge_interval("m-9", START, NOW, 100, False, NOW)  # 50 fen
    ctl.charge_interval("m-9", START - QUARTER, START, 40, True, NOW + 1)  # 20 fen, estimated
    ctl.record_payment("acc-9", "p-late", 1, ms("2024-03-06 00:00") - 1)  # the last ms of 03-05
    ctl.record_payment("acc-9", "p-1", 2000, ms("2024-03-06 00:00"))
    ctl.charge_interval("m-9", START - QUARTER, START, 60, False, ms("2024-03-06 09:30"))  # +10 fen
    ops.record_adjustment(service, "acc-9", "adj-1", -300, "FEE", "op", ms("2024-03-06 12:00"))
    out = ops.statement(service, "acc-9", "2024-03-04", "2024-03-07")
    assert (out["from_day"], out["to_day"], out["utc_offset_minutes"]) == ("2024-03-04", "2024-03-07", 480)
    days = {d["day"]: d for d in out["days"]}
    assert list(days) == ["2024-03-04", "2024-03-05", "2024-03-06", "2024-03-07"]
    assert days["2024-03-05"] == {
        "day": "2024-03-05",
        "opening_fen": 0,
        "charges": {"fen": 70, "intervals": 2, "estimated": 1, "corrections": 0},
        "payments": {"fen": 1, "count": 1},
        "adjustments": {"fen": 1000, "count": 1},
        "closing_fen": 931,
    }
    assert days["2024-03-06"] == {
        "day": "2024-03-06",
        "opening_fen": 931,
        "charges": {"fen": 10, "intervals": 0, "estimated": 0, "corrections": 1},
        "payments": {"fen": 2000, "count": 1},
        "adjustments": {"fen": -300, "count": 1},
        "closing_fen": 2621,
    }
    assert days["2024-03-07"]["opening_fen"] == days["2024-03-07"]["closing_fen"] == 2621
    assert (out["opening_fen"], out["closing_fen"]) == (0, 2621) and balance(service, "acc-9") == 2621
    streamed = ops.statement_days(service, "acc-9", dt.date(2024, 3, 6), dt.date(2024, 3, 6))
    assert list(streamed) == [days["2024-03-06"]]


def test_statement_arguments(service: FeeControlService) -> None:
    with refused("bad_fields", "to_day"):
        ops.statement(service, "acc-1", "2024-03-05", "2024-03-04")
    with refused("bad_fields", "to_day"):
        ops.statement(service, "acc-1", "2024-01-01", "2025-01-01")  # 367 days
    with refused("bad_fields", "from_day"):
        ops.statement(service, "acc-1", "5 March", "2024-03-05")
    with refused("unknown_account"):
        ops.statement_days(service, "acc-404", "2024-03-05", "2024-03-05")
    assert len(ops.statement(service, "acc-1", "2024-01-01", "2024-12-31")["days"]) == 366


_FILES = tempfile.TemporaryDirectory()  # the property test's config files, written once
_CFG = load_service_config(config(Path(_FILES.name)), _FILES.name)
DAY0 = ms("2024-03-05 00:00")
_OP = st.tuples(
    st.sampled_from(["charge", "estimate", "payment", "adjustment"]),
    st.integers(0, 4 * 96 - 1),  # when it is posted: a quarter of 03-05 .. 03-08
    st.integers(0, 40),  # which interval (charges), or an amount step
    st.integers(0, 2_000),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_OP, max_size=40), st.integers(0, 3), st.integers(0, 3))
def test_statements_reconcile_with_the_journal(
    ops_list: list[tuple[str, int, int, int]], a: int, b: int
) -> None:
    """Any mix of charges (first postings and true-ups), payments and adjustments, posted at any
    time: each day's closing = opening + payments + adjustments - charges, a day's opening is the
    journal's balance at its local midnight, and the last closing is the account's balance."""
    ctl = FeeController(SqliteLedgerStore(":memory:"), _CFG.feectl, _CFG.tariffs)
    service = FeeControlService(_CFG, ctl, clock=lambda: NOW)
    ops.enrol_account(service, doc(opening_balance_fen=500), "cis", DAY0 - 1)
    for n, (kind, at, which, amount) in enumerate(ops_list):
        ts = DAY0 + at * QUARTER
        if kind in ("charge", "estimate"):
            start = DAY0 - (which + 1) * QUARTER
            ctl.charge_interval("m-9", start, start + QUARTER, amount, kind == "estimate", ts)
        elif kind == "payment":
            ctl.record_payment("acc-9", f"p{n}", amount + 1, ts)
        else:
            ops.record_adjustment(service, "acc-9", f"a{n}", amount - 1000 or 1, "X", "op", ts)
    lo, hi = sorted(
        (dt.date(2024, 3, 4) + dt.timedelta(days=a), dt.date(2024, 3, 4) + dt.timedelta(days=b + 2))
    )
    days = ops.statement(service, "acc-9", lo.isoformat(), hi.isoformat())["days"]
    journal = ctl.journal("acc-9")
    zone = dt.timezone(dt.timedelta(hours=8))
    for d in days:
        midnight = int(
            dt.datetime.combine(dt.date.fromisoformat(d["day"]), dt.time(), zone).timestamp() * 1000
        )
        assert d["opening_fen"] == sum(e.amount_fen for e in journal if e.ts_ms < midnight)
        flows = d["payments"]["fen"] + d["adjustments"]["fen"] - d["charges"]["fen"]
        assert d["closing_fen"] == d["opening_fen"] + flows
        end = midnight + 86_400_000
        today = [e for e in journal if midnight <= e.ts_ms < end]
        assert d["charges"]["fen"] == -sum(e.amount_fen for e in today if e.kind in CHARGE_KINDS)
        assert d["charges"]["intervals"] == sum(e.kind is JournalKind.CHARGE for e in today)
    for before, after in itertools.pairwise(days):
        assert after["opening_fen"] == before["closing_fen"]
    if hi >= dt.date(2024, 3, 8):  # every posting is on or before 03-08
        assert days[-1]["closing_fen"] == ctl.balance("acc-9").balance_fen
    assert ctl.check_consistency().ok
    ctl.store.close()
