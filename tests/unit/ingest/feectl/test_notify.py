"""Notification rules and the outbox over a real SQLite ledger, with notifiers replaced at their
seam by scripted ones (a list-recording ``send`` that fails as told): ids are stable across
processes, the back-off schedule, transient versus permanent failures, per-notifier independence,
pruning, planned and detected area-outage notices and the ``[service.notify]`` config."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from ingest.feectl.config import FeeControlConfig, NotifySettings, load_service_config
from ingest.feectl.engine import FeeController
from ingest.feectl.metrics import FeeControlMetrics
from ingest.feectl.model import FeeControlError
from ingest.feectl.notify import (
    Note,
    NotifyError,
    Outbox,
    PermanentNotifyError,
    TransientNotifyError,
    backoff_ms,
    http_status_error,
    signature,
)
from ingest.feectl.service import FeeControlService
from ingest.feectl.sqlite_store import SqliteLedgerStore
from ingest.model.tariff import Tariff
from protocols import topics
from protocols.alarms import AreaOutage
from protocols.errors import ConfigError
from tests.unit.ingest.ops.conftest import config_text, write_files

from .conftest import FLAT_TOML, make_controller, ms

T = ms("2024-03-05 10:00")


class Scripted:
    """A notifier at the seam: records what it was sent; fails the next calls as scripted."""

    def __init__(self, name: str, failures: list[NotifyError] | None = None) -> None:
        self.name = name
        self.failures = list(failures or [])
        self.sent: list[Note] = []
        self.tries = 0

    async def send(self, note: Note) -> None:
        self.tries += 1
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(note)

    async def aclose(self) -> None:
        return None


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


SETTINGS = NotifySettings(retry_initial_s=1.0, retry_max_s=8.0, keep_days=1.0)


def outbox(ctl: FeeController, *notifiers: Scripted, clock: Clock | None = None) -> Outbox:
    return Outbox(ctl.store, notifiers, SETTINGS, FeeControlMetrics(), clock or Clock(T))


def decide_some(ctl: FeeController) -> None:
    """Enrolled at 0 fen (ZERO_NOTICE), paid (RECOVERED), then charged down to ALARM1."""
    ctl.evaluate("A17", T)
    ctl.record_payment("A17", "p-1", 10_000, T + 1)
    ctl.charge_interval("M1", T - 900_000, T, 12_000, False, T + 2)


def journal_seqs(ctl: FeeController, *codes: str) -> list[int]:
    return [e.seq for e in ctl.journal("A17") if e.code in codes]


# -- pure rules --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, None),
        (204, None),
        (299, None),
        (400, PermanentNotifyError),
        (401, PermanentNotifyError),
        (404, PermanentNotifyError),
        (410, PermanentNotifyError),
        (408, TransientNotifyError),
        (429, TransientNotifyError),
        (500, TransientNotifyError),
        (502, TransientNotifyError),
        (503, TransientNotifyError),
        (301, TransientNotifyError),
    ],
)
def test_http_status_classification(status: int, kind: type[NotifyError] | None) -> None:
    err = http_status_error(status, "body")
    if kind is None:
        assert err is None
    else:
        assert type(err) is kind and err.reason == f"http_{status}" and err.detail == "body"


def test_backoff_doubles_from_initial_up_to_the_max() -> None:
    assert [backoff_ms(n, 0.5, 10.0) for n in range(1, 8)] == [500, 1000, 2000, 4000, 8000, 10000, 10000]
    assert backoff_ms(10_000, 1.0, 300.0) == 300_000  # no overflow for long outages
    with pytest.raises(ValueError, match="attempts"):
        backoff_ms(0, 1.0, 2.0)


def test_signature_is_hmac_sha256_of_the_body() -> None:
    body = b'{"id":"x-1"}'
    want = hmac.new(b"s" * 16, body, hashlib.sha256).hexdigest()
    assert signature(b"s" * 16, body) == f"sha256={want}"
    assert signature(b"t" * 16, body) != signature(b"s" * 16, body)


# -- the outbox --------------------------------------------------------------------------------------
async def test_ids_are_stable_and_a_second_process_sends_only_what_the_first_did_not(
    tmp_path: Path, flat: Tariff
) -> None:
    db = str(tmp_path / "ledger.sqlite")
    ctl = make_controller(flat, db)
    decide_some(ctl)
    first = Scripted("mqtt")
    box = outbox(ctl, first)
    assert box.collect() == 3 and box.collect() == 0  # the cursor moved: nothing derived twice
    ledger = ctl.store.ledger_id()  # type: ignore[attr-defined]
    seqs = journal_seqs(ctl, "ZERO_NOTICE", "RECOVERED", "ALARM1")
    first.failures = [TransientNotifyError("mqtt", "down")] * 2  # the first process sends nothing
    await box.deliver(first)
    ctl.store.close()

    ctl2 = FeeController(SqliteLedgerStore(db), FeeControlConfig(), {flat.tariff_id: flat})
    second = Scripted("mqtt")
    box2 = outbox(ctl2, second, clock=Clock(T + 60_000))
    assert box2.collect() == 0
    assert await box2.deliver(second) is None
    ids = [n.id for n in second.sent]
    assert ids == [f"{ledger}-{s}" for s in seqs]
    bodies = [json.loads(n.payload) for n in second.sent]
    assert [b["id"] for b in bodies] == ids
    assert [b["kind"] for b in bodies] == ["ZERO_NOTICE", "RECOVERED", "ALARM1"]
    assert await box2.deliver(second) is None and len(second.sent) == 3  # marked: never again


async def test_transient_failures_retry_on_the_back_off_schedule_in_order(flat: Tariff) -> None:
    ctl = make_controller(flat)
    decide_some(ctl)
    clock = Clock(T)
    n = Scripted("hook", [TransientNotifyError("http_503")] * 3)
    box = outbox(ctl, n, clock=clock)
    box.collect()
    waits = []
    for _ in range(3):
        due = await box.deliver(n)
        assert due is not None
        assert await box.deliver(n) == due and n.tries == len(waits) + 1  # not before it is due
        waits.append(due - clock.now)
        clock.now = due
    assert waits == [1_000, 2_000, 4_000]
    assert await box.deliver(n) is None
    assert [json.loads(x.payload)["kind"] for x in n.sent] == ["ZERO_NOTICE", "RECOVERED", "ALARM1"]
    assert box.counts["hook"] == {"sent": 3, "retry": 3, "dead": 0}
    rows = ctl.store.deliveries("hook")
    assert [(state, attempts) for _, state, attempts, _ in rows] == [("sent", 3), ("sent", 0), ("sent", 0)]
    m = box.metrics.registry
    assert (
        m.get_sample_value("amigw_feectl_notifications_total", {"notifier": "hook", "result": "retry"}) == 3
    )
    assert m.get_sample_value("amigw_feectl_notifications_pending", {"notifier": "hook"}) == 0


async def test_a_permanent_failure_is_dead_with_its_reason_and_the_rest_go_on(flat: Tariff) -> None:
    ctl = make_controller(flat)
    decide_some(ctl)
    n = Scripted("hook", [PermanentNotifyError("http_422", "no such customer")])
    box = outbox(ctl, n)
    box.collect()
    assert await box.deliver(n) is None
    rows = ctl.store.deliveries("hook")
    assert rows[0][1:] == ("dead", 0, "http_422: no such customer")
    assert [r[1] for r in rows[1:]] == ["sent", "sent"] and len(n.sent) == 2
    assert box.counts["hook"] == {"sent": 2, "retry": 0, "dead": 1}


async def test_each_notifier_delivers_on_its_own(flat: Tariff) -> None:
    ctl = make_controller(flat)
    decide_some(ctl)
    down = Scripted("hook", [TransientNotifyError("connection")] * 100)
    up = Scripted("mqtt")
    box = outbox(ctl, up, down)
    box.collect()
    await box.deliver_all()
    assert len(up.sent) == 3 and not down.sent
    assert box.pending() == (3, {"hook": 3})


async def test_removed_notifier_is_retired_and_old_rows_are_pruned(tmp_path: Path, flat: Tariff) -> None:
    db = str(tmp_path / "ledger.sqlite")
    ctl = make_controller(flat, db)
    decide_some(ctl)
    box = outbox(ctl, Scripted("mqtt"), Scripted("old"))
    box.collect()
    clock = Clock(T)
    box2 = outbox(ctl, Scripted("mqtt"), clock=clock)  # the next start: "old" is gone from the config
    box2.collect()
    assert {r[3] for r in ctl.store.deliveries("old")} == {"notifier_removed"}
    assert box2.pending() == (3, {"mqtt": 3})
    clock.now = T + 2 * 86_400_000  # past keep_days = 1
    assert box2.prune() == 0  # still pending for mqtt: kept
    await box2.deliver(box2.notifiers[0])  # type: ignore[arg-type]
    assert box2.prune() == 3 and ctl.store.deliveries("mqtt") == []


def test_zero_notice_says_when_the_trip_may_follow(flat: Tariff) -> None:
    cfg = FeeControlConfig(grace_s=1_800, overdraft_limit_fen=100)
    ctl = make_controller(flat, config=cfg)
    ctl.evaluate("A17", T)
    box = outbox(ctl, (n := Scripted("mqtt")))
    box.collect()
    row = ctl.store.next_delivery("mqtt")
    assert row is not None and not n.sent
    body = json.loads(row.payload)
    assert body["kind"] == "ZERO_NOTICE" and body["trip_not_before_ms"] == T + 1_800_000
    assert body["overdraft_limit_fen"] == 100 and body["balance_fen"] == 0


# -- planned outages through the service -------------------------------------------------------------
AREA_ACCOUNTS = """
[[service.accounts]]
account_id = "acc-2"
tariff = "flat"
meters = [{ meter = "m-2", gateway = "gw-1", area = "TA-0042" }, { meter = "m-3", gateway = "gw-1" }]
[[service.accounts]]
account_id = "acc-3"
tariff = "flat"
meters = [{ meter = "m-4", gateway = "gw-1", area = "TA-0042" }]
[[service.accounts]]
account_id = "acc-4"
tariff = "flat"
meters = [{ meter = "m-5", gateway = "gw-1", area = "TA-0007" }]
"""


async def test_planned_outage_notifies_every_account_of_the_area_once(tmp_path: Path) -> None:
    write_files(tmp_path)
    cfg = load_service_config(config_text(AREA_ACCOUNTS), tmp_path)
    n = Scripted("mqtt")
    service = FeeControlService(cfg, clock=lambda: T, notifiers=[n])
    service.enroll()
    notice = service.announce_outage("TA-0042", T + 3_600_000, T + 7_200_000, "transformer work", "op-1")
    assert notice.accounts == ("acc-2", "acc-3") and notice.announced
    again = service.announce_outage("TA-0042", T + 3_600_000, T + 7_200_000, "transformer work", "op-1")
    assert not again.announced
    await service.flush()
    outages = [json.loads(x.payload) for x in n.sent if json.loads(x.payload)["kind"] == "OUTAGE_PLANNED"]
    assert [o["account"] for o in outages] == ["acc-2", "acc-3"]
    assert outages[0]["outage"] == {
        "area": "TA-0042",
        "start_ms": T + 3_600_000,
        "end_ms": T + 7_200_000,
        "reason": "transformer work",
    }
    assert (outages[0]["category"], outages[0]["severity"]) == ("outage", "warning")
    assert len({o["id"] for o in outages}) == 2
    with pytest.raises(FeeControlError, match="unknown_area"):
        service.announce_outage("TA-9999", T, T + 1, "x", "op-1")
    with pytest.raises(ValueError, match="end_ms"):
        service.announce_outage("TA-0042", T, T, "x", "op-1")
    with pytest.raises(ValueError, match="area"):
        service.announce_outage("TA 42", T, T + 1, "x", "op-1")
    assert service.health()["pending_notifications"] == 0


# -- config ------------------------------------------------------------------------------------------
def test_notify_config_defaults_and_webhooks(tmp_path: Path) -> None:
    write_files(tmp_path)
    (tmp_path / "hook.secret").write_text("s" * 20 + "\n")
    extra = """
[service.notify]
retry_initial_s = 0.5
[[service.notify.webhook]]
url = "https://notify.example.net/amigw"
secret_file = "hook.secret"
[[service.notify.webhook]]
name = "crm"
url = "http://127.0.0.1:9000/in"
timeout_s = 2.5
"""
    cfg = load_service_config(config_text(extra), tmp_path)
    notify = cfg.service.notify
    assert (notify.mqtt, notify.retry_initial_s, notify.retry_max_s, notify.keep_days) == (
        True,
        0.5,
        300.0,
        30.0,
    )
    assert [(w.name, w.timeout_s) for w in notify.webhook] == [("webhook", 10.0), ("crm", 2.5)]
    assert cfg.webhook_secrets == {"webhook": b"s" * 20}
    service = FeeControlService(cfg, clock=lambda: T)
    assert [n.name for n in service.outbox.notifiers] == ["mqtt", "webhook", "crm"]
    assert dataclasses.replace(notify, webhook=[]) == NotifySettings(retry_initial_s=0.5)


@pytest.mark.parametrize(
    ("extra", "key_path"),
    [
        ("[service.notify]\nretry_max_s = 0.5", "service.notify.retry_max_s"),
        ("[service.notify]\nretry_initial_s = 0", "service.notify.retry_initial_s"),
        ("[service.notify]\nkeep_days = 0", "service.notify.keep_days"),
        ("[service.notify]\nmqtt = 'yes'", "service.notify.mqtt"),
        ("[service.notify]\nsms = true", "service.notify.sms"),
        ("[[service.notify.webhook]]\nurl = 'ftp://x/y'", "service.notify.webhook[0].url"),
        (
            "[[service.notify.webhook]]\nurl = 'http://x/'\ntimeout_s = 0",
            "service.notify.webhook[0].timeout_s",
        ),
        ("[[service.notify.webhook]]\nurl = 'http://x/'\nname = 'mqtt'", "service.notify.webhook[0].name"),
        (
            "[[service.notify.webhook]]\nurl = 'http://x/'\n[[service.notify.webhook]]\nurl = 'http://y/'",
            "service.notify.webhook[1].name",
        ),
        (
            "[[service.notify.webhook]]\nurl = 'http://x/'\nsecret_file = 'missing'",
            "service.notify.webhook[0].secret_file",
        ),
        (
            "[[service.notify.webhook]]\nurl = 'http://x/'\nsecret_file = 'short'",
            "service.notify.webhook[0].secret_file",
        ),
        (
            '[[service.accounts]]\naccount_id = "a2"\ntariff = "flat"\n'
            'meters = [{meter = "m9", gateway = "gw-1", area = "T A"}]',
            "service.accounts[1].meters[0].area",
        ),
    ],
)
def test_notify_config_errors_name_the_key(tmp_path: Path, extra: str, key_path: str) -> None:
    write_files(tmp_path)
    (tmp_path / "short").write_text("too-short")
    with pytest.raises(ConfigError) as info:
        load_service_config(config_text(extra), tmp_path)
    assert info.value.key_path == key_path, info.value


def test_meter_area_is_kept_in_the_ledger(flat: Tariff, tmp_path: Path) -> None:
    write_files(tmp_path)
    (tmp_path / "flat.toml").write_text(FLAT_TOML)
    cfg = load_service_config(config_text(AREA_ACCOUNTS), tmp_path)
    service = FeeControlService(cfg, clock=lambda: T, notifiers=[])
    service.enroll()
    store = service.controller.store
    with store.transaction():
        refs = store.account("acc-2").meters
        assert [(r.meter, r.area) for r in refs] == [("m-2", "TA-0042"), ("m-3", None)]
        assert store.accounts_in_area("TA-0007") == ["acc-4"]
    assert service.enroll() == 0  # unchanged on the next start
    detail: Any = json.loads(next(e for e in service.controller.journal("acc-2") if e.code == "FILE").detail)
    assert detail["meters"] == [["m-2", "gw-1", True, None, "TA-0042"], ["m-3", "gw-1", True, None]]


async def test_detected_area_outage_from_ingest_is_notified_once(tmp_path: Path) -> None:
    write_files(tmp_path)
    cfg = load_service_config(config_text(AREA_ACCOUNTS), tmp_path)
    n = Scripted("mqtt")
    service = FeeControlService(cfg, clock=lambda: T, notifiers=[n])
    service.enroll()
    alarm = AreaOutage("TA-0042", T - 60_000, 12).to_json()
    assert service.handle_message(topics.ALARMS, alarm)
    assert service.handle_message(topics.ALARMS, alarm)  # redelivered: the same outage
    assert service.handle_message(topics.ALARMS, AreaOutage("TA-0001", T, 3).to_json())  # nobody there
    assert service.handle_message(topics.ALARMS, b'{"v":1,"type":"area_outage"}')
    await service.flush()
    outages = [json.loads(x.payload) for x in n.sent if json.loads(x.payload)["category"] == "outage"]
    assert [(o["kind"], o["account"], o["severity"]) for o in outages] == [
        ("OUTAGE_DETECTED", "acc-2", "critical"),
        ("OUTAGE_DETECTED", "acc-3", "critical"),
    ]
    assert outages[0]["outage"] == {
        "area": "TA-0042",
        "start_ms": T - 60_000,
        "end_ms": None,
        "reason": "power_down_events",
        "events": 12,
    }
    m = service.metrics.registry
    assert m.get_sample_value("amigw_feectl_messages_total", {"topic": "alarms", "result": "applied"}) == 2
    assert m.get_sample_value("amigw_feectl_messages_total", {"topic": "alarms", "result": "ignored"}) == 1
    assert m.get_sample_value("amigw_feectl_messages_total", {"topic": "alarms", "result": "rejected"}) == 1
    store = service.controller.store
    with store.transaction():
        assert [r.reason for r in store.rejects(10)] == ["undecodable"]
