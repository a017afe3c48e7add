"""Inbound messages are handled in isolation, against the real service object and a temporary
SQLite ledger (no broker): bounds on intervals by rule, meters bound to their enrolled gateway,
every rejection kept with its reason, counted and acknowledged, and the good intervals beside a
bad one charged."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from ingest.feectl.config import LimitSettings, load_service_config
from ingest.feectl.model import FeeControlError
from ingest.feectl.service import REJECT_PAYLOAD_BYTES, FeeControlService
from protocols.aggregates import IntervalRecord, encode_intervals
from protocols.commands import CommandResult
from protocols.errors import ConfigError
from protocols.flags import NOT_BILLABLE, Flag

from ..ops.conftest import KEY, NOW, config_text, write_files
from .conftest import QUARTER, make_controller, ms

TOPIC = "ami/v1/agg/intervals/gw-1"
START = NOW - QUARTER  # 09:45-10:00 local, ended at NOW


@pytest.fixture
def service(tmp_path: Path) -> FeeControlService:
    write_files(tmp_path)
    extra = '[[service.accounts]]\naccount_id = "acc-2"\ntariff = "flat"\n'
    extra += 'meters = [{ meter = "m-2", gateway = "gw-2", max_power_w = 400000 }]\n'
    text = config_text(extra).replace(
        'command_key_files = { gw-1 = "gw-1.key" }',
        'command_key_files = { gw-1 = "gw-1.key", gw-2 = "gw-1.key" }',
    )
    svc = FeeControlService(load_service_config(text, tmp_path), clock=lambda: NOW)
    svc.enroll()
    return svc


def rec(energy: int, start: int = START, end: int | None = None, meter: str = "m-1") -> IntervalRecord:
    return IntervalRecord(meter, 1, start, start + QUARTER if end is None else end, energy, 0)


def rejects(service: FeeControlService) -> list[tuple[str, str | None, int | None]]:
    with service.controller.store.transaction():
        return [(r.reason, r.meter, r.interval_start_ms) for r in service.controller.store.rejects(100)]


def balance(service: FeeControlService, account: str = "acc-1") -> int:
    return service.controller.balance(account).balance_fen


def counter(service: FeeControlService, line: str) -> float:
    """The value of one exposition line of the service's metrics (0 when absent)."""
    for text in generate_latest(service.metrics.registry).decode().splitlines():
        if text.startswith(line + " "):
            return float(text.split()[-1])
    return 0.0


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_an_energy_of_2_pow_62_is_rejected_and_the_interval_beside_it_charged(
    service: FeeControlService, encoding: str
) -> None:
    """The finding: 2^62 overflowed the ledger's INTEGER and the service exited, on every redelivery."""
    payload = encode_intervals("gw-1", 7, [rec(2**62), rec(100, START - QUARTER)], encoding)  # type: ignore[arg-type]
    for _ in range(2):  # a redelivery changes nothing
        assert service.handle_message(TOPIC, payload) is True
    assert balance(service) == -50  # 100 x 0.01 kWh at 0.5000 yuan/kWh, once
    assert rejects(service) == [("energy_out_of_range", "m-1", START)] * 2
    assert counter(service, 'amigw_feectl_rejected_total{reason="energy_out_of_range"}') == 2
    assert counter(service, 'amigw_feectl_charges_total{status="charged"}') == 1
    assert counter(service, 'amigw_feectl_messages_total{result="applied",topic="intervals"}') == 2
    assert service.controller.check_consistency().ok


@pytest.mark.parametrize("flag", list(NOT_BILLABLE), ids=lambda f: f.name)
def test_a_not_billable_interval_is_not_charged_and_the_billable_beside_it_is(
    service: FeeControlService, flag: Flag
) -> None:
    """docs/rules.md: an interval flagged SPIKE, WENT_BACKWARDS, METER_REPLACED, FAST_RUNNING or
    STOPPED has no billable consumption; a ROLLOVER interval (a warning) stays billable."""
    flagged = IntervalRecord("m-1", 1, START, START + QUARTER, 900, int(flag))
    warned = IntervalRecord("m-1", 1, START - QUARTER, START, 100, int(Flag.ROLLOVER))
    payload = encode_intervals("gw-1", 7, [flagged, warned])
    for _ in range(2):  # a redelivery changes nothing either
        assert service.handle_message(TOPIC, payload) is True
    assert balance(service) == -50  # only the 1 kWh at 0.5000 yuan/kWh
    assert counter(service, 'amigw_feectl_charges_total{status="not_billable"}') == 2
    assert counter(service, 'amigw_feectl_charges_total{status="charged"}') == 1
    assert service.stats.intervals_not_billable == 2 and rejects(service) == []


LIMITS = LimitSettings()  # 100 kW: at most 2500 x 0.01 kWh in 15 minutes


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (rec(2_500), None),  # exactly the rating over the interval
        (rec(2_501), "energy_out_of_range"),
        (rec(-1), "energy_out_of_range"),
        (rec(1, start=0), "time_out_of_range"),  # epoch 0
        (rec(1, start=ms("1999-12-31 23:00")), "time_out_of_range"),
        (rec(1, start=-(2**62)), "time_out_of_range"),
        (rec(1, start=NOW, end=NOW + 301_000), "time_out_of_range"),  # ends after now + 300 s
        (rec(1, start=NOW - 1000, end=NOW + 300_000), None),  # within the tolerance
        (rec(1, start=START, end=START), "interval_length_out_of_range"),
        (rec(1, start=START, end=START - 1), "interval_length_out_of_range"),
        (rec(1, start=NOW - 86_400_001, end=NOW), "interval_length_out_of_range"),
    ],
)
def test_interval_bounds(service: FeeControlService, record: IntervalRecord, reason: str | None) -> None:
    refusal = LIMITS.interval_refusal(record.start_ms, record.end_ms, record.energy, LIMITS.max_power_w, NOW)
    assert (None if refusal is None else refusal[0]) == reason
    assert service.handle_message(TOPIC, encode_intervals("gw-1", 1, [record])) is True
    assert rejects(service) == ([] if reason is None else [(reason, "m-1", record.start_ms)])
    charged = [e for e in service.controller.journal("acc-1") if e.kind.value == "charge"]
    assert len(charged) == (reason is None)


def test_the_energy_bound_follows_the_interval_length_and_the_meters_rating(
    service: FeeControlService,
) -> None:
    # 1 s at 72 kW is 2 x 0.01 kWh; a register delta may be one step above: ceil, not floor
    assert LIMITS.interval_refusal(NOW - 1000, NOW, 3, 100_000, NOW) is None
    assert LIMITS.interval_refusal(NOW - 1000, NOW, 4, 100_000, NOW) is not None
    # m-2 is enrolled with max_power_w = 400 kW: 10 000 x 0.01 kWh in 15 minutes
    big = [rec(10_000, meter="m-2"), rec(10_001, START - QUARTER, meter="m-2")]
    assert service.handle_message("ami/v1/agg/intervals/gw-2", encode_intervals("gw-2", 1, big))
    assert balance(service, "acc-2") == -5_000
    assert rejects(service) == [("energy_out_of_range", "m-2", START - QUARTER)]


def test_intervals_from_another_gateway_than_the_meters_are_refused(service: FeeControlService) -> None:
    """The finding: intervals published under gw-1 for a gw-2 customer took 50 fen."""
    assert service.handle_message(TOPIC, encode_intervals("gw-1", 1, [rec(100, meter="m-2")]))
    # the payload names another gateway than its topic: the whole message is refused
    assert service.handle_message(
        "ami/v1/agg/intervals/gw-2", encode_intervals("gw-1", 2, [rec(100, meter="m-2")])
    )
    assert balance(service, "acc-2") == 0
    assert rejects(service) == [("gateway_mismatch", "m-2", START), ("gateway_mismatch", None, None)]
    # from its own gateway it is charged
    assert service.handle_message(
        "ami/v1/agg/intervals/gw-2", encode_intervals("gw-2", 3, [rec(100, meter="m-2")])
    )
    assert balance(service, "acc-2") == -50


def test_the_core_refuses_an_interval_from_another_gateway(flat) -> None:  # type: ignore[no-untyped-def]
    ctl = make_controller(flat)  # M1 on gateway G1
    with pytest.raises(FeeControlError) as err:
        ctl.charge_interval("M1", START, NOW, 100, False, NOW, gateway="G2")
    assert err.value.reason == "gateway_mismatch"
    assert ctl.balance("A17").balance_fen == 0 and not [e for e in ctl.journal() if e.kind.value == "charge"]
    assert ctl.charge_interval("M1", START, NOW, 100, False, NOW, gateway="G1").posted_fen == 50


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (TOPIC, b"\x00\xff garbage", "undecodable"),
        (TOPIC, b"AMA\x01\xc1", "undecodable"),
        (
            TOPIC,
            b'{"v": 1, "type": "intervals", "gateway": "gw-1", "batch_seq": "7", "intervals": []}',
            "undecodable",
        ),
        (
            TOPIC,
            b'{"v": 1, "type": "intervals", "gateway": "gw-1", "batch_seq": 7, "intervals": [{"meter": "m-1", '
            b'"quantity": 1, "start_ms": 1, "end_ms": 2, "energy": 1, "energy": 9, "flags": 0}]}',
            "undecodable",  # a duplicate key: which value counts?
        ),
        (TOPIC, b"{" * 100_000, "undecodable"),
        (TOPIC, b" " * (16 * 1024 * 1024 + 1), "too_large"),
        ("ami/v1/agg/intervals/agg", encode_intervals("agg", 1, [rec(1)]), "bad_topic"),
        ("ami/v1/gw-9/up/cmd-result", b"{}", "unknown_gateway"),
        ("ami/v1/gw-1/up/cmd-result", b"not json", "unverified"),
        (
            "ami/v1/gw-1/up/cmd-result",
            CommandResult("c-1", "gw-1", "m-1", "trip", "done", NOW).signed(bytes(32)),  # forged
            "unverified",
        ),
        (
            "ami/v1/gw-1/up/cmd-result",
            CommandResult("c-1", "gw-2", "m-2", "trip", "done", NOW).signed(KEY),  # gw-2's result on gw-1
            "gateway_mismatch",
        ),
        ("ami/v1/something/else", b"x", "bad_topic"),
    ],
)
def test_bad_messages_are_rejected_with_their_reason_and_acknowledged(
    service: FeeControlService, topic: str, payload: bytes, reason: str
) -> None:
    assert service.handle_message(topic, payload) is True
    with service.controller.store.transaction():
        (r,) = service.controller.store.rejects(10)
    assert r.reason == reason and r.topic == topic and r.detail
    assert r.payload == payload[:REJECT_PAYLOAD_BYTES] and r.payload_bytes == len(payload)
    assert counter(service, f'amigw_feectl_rejected_total{{reason="{reason}"}}') == 1
    assert balance(service) == 0


def test_an_unforeseen_failure_is_contained_to_its_interval(
    service: FeeControlService, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = service.controller.charge_interval

    def charge(meter: str, start: int, *args: object, **kwargs: object) -> object:
        if start == START:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")  # a bug's stand-in
        return real(meter, start, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service.controller, "charge_interval", charge)
    payload = encode_intervals("gw-1", 1, [rec(10), rec(100, START - QUARTER)])
    assert service.handle_message(TOPIC, payload) is True
    assert rejects(service) == [("internal_error", "m-1", START)]
    assert balance(service) == -50


def test_a_message_is_one_commit_however_many_intervals_it_charges(service: FeeControlService) -> None:
    """A ledger commit is a sync to disk: one per message, not one per interval (a gateway's
    message carries hundreds of prepaid meters' intervals)."""
    commits: list[str] = []
    service.controller.store.connection.set_trace_callback(  # type: ignore[attr-defined]
        lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None
    )
    payload = encode_intervals(
        "gw-1", 3, [rec(100, START - 2 * QUARTER), rec(100, START - QUARTER), rec(100)]
    )
    assert service.handle_message(TOPIC, payload) is True
    assert len(commits) == 1
    assert balance(service) == -150 and counter(service, 'amigw_feectl_charges_total{status="charged"}') == 3


def test_an_interval_that_fails_half_way_leaves_no_trace_and_the_others_commit(
    service: FeeControlService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second interval fails after its charge was journaled and posted (in the re-evaluation
    that follows): its savepoint undoes both, the intervals before and after it are charged."""
    real = service.controller._evaluate
    calls = [0]

    def evaluate(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("a bug's stand-in, after the charge was written")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service.controller, "_evaluate", evaluate)
    payload = encode_intervals("gw-1", 4, [rec(100, START - 2 * QUARTER), rec(10, START - QUARTER), rec(100)])
    assert service.handle_message(TOPIC, payload) is True
    assert rejects(service) == [("internal_error", "m-1", START - QUARTER)]
    assert balance(service) == -100  # 2 x 1 kWh at 0.5000 yuan/kWh; nothing of the failed one
    charged = [e.interval_start_ms for e in service.controller.journal("acc-1") if e.kind.value == "charge"]
    assert charged == [START - 2 * QUARTER, START]
    assert service.controller.check_consistency().ok
    monkeypatch.setattr(service.controller, "_evaluate", real)
    assert service.handle_message(TOPIC, payload) is True  # redelivered: the failed one is charged now
    assert balance(service) == -105


def test_rejects_are_pruned_to_the_newest(tmp_path: Path) -> None:
    write_files(tmp_path)
    cfg = load_service_config(
        config_text().replace('db_path = "ledger.sqlite"', 'db_path = "l.sqlite"\nrejects_keep = 3'), tmp_path
    )
    service = FeeControlService(cfg, clock=lambda: NOW)
    for i in range(5):
        service.handle_message(TOPIC, json.dumps({"n": i}).encode())
    with service.controller.store.transaction():
        kept = service.controller.store.rejects(10)
    assert [json.loads(r.payload)["n"] for r in kept] == [2, 3, 4]


@pytest.mark.parametrize(
    ("extra", "key_path"),
    [
        ("[service.limits]\nmax_power_w = 0", "service.limits.max_power_w"),
        ("[service.limits]\nearliest_interval = 2000-01-01T00:00:00Z", "service.limits.earliest_interval"),
        ("[service.limits]\nmax_payment_fen = -1", "service.limits.max_payment_fen"),
        ("[service.limits]\nfuture_tolerance_s = -1", "service.limits.future_tolerance_s"),
        ("[service.limits]\nmax_payment = 5", "service.limits.max_payment"),
        ("[service]\nmetrics_listen = 'nowhere'", "service.metrics_listen"),
        (
            '[[service.accounts]]\naccount_id = "a2"\ntariff = "flat"\nmeters = [{ meter = "m9" }]',
            "service.accounts[1].meters[0].gateway",
        ),
        (
            '[[service.accounts]]\naccount_id = "a2"\ntariff = "flat"\nmeters = [{ meter = "m9", gateway = "agg" }]',
            "service.accounts[1].meters[0].gateway",
        ),
        (
            '[[service.accounts]]\naccount_id = "a2"\ntariff = "flat"\n'
            'meters = [{ meter = "m9", gateway = "gw-1", max_power_w = 0 }]',
            "service.accounts[1].meters[0].max_power_w",
        ),
    ],
)
def test_limit_and_enrolment_errors_name_the_key(tmp_path: Path, extra: str, key_path: str) -> None:
    write_files(tmp_path)
    text = config_text(extra)
    if extra.startswith("[service]"):  # a key of the existing [service] table
        text = config_text().replace("[service]\n", extra + "\n", 1)
    with pytest.raises(ConfigError) as exc:
        load_service_config(text, tmp_path)
    assert exc.value.key_path == key_path


def test_limit_defaults() -> None:
    assert LIMITS.earliest_ms == int(dt.datetime(2000, 1, 1, tzinfo=dt.UTC).timestamp() * 1000)
    assert (LIMITS.max_power_w, LIMITS.future_tolerance_s, LIMITS.max_payment_fen) == (
        100_000,
        300,
        10_000_000,
    )
