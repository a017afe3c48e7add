"""The payments routes of the ops API over a real loopback socket (port 0) against the real
service object and a temporary SQLite ledger: bearer auth, idempotent (and concurrent) payments,
strict request handling (malformed framing, duplicate headers and keys, bounds), errors; and that a
payment's restore command is signed and handed to the publisher at once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from ingest.feectl.config import SAMPLE, LimitSettings, MqttLink, ServiceSettings, load_service_config
from protocols.aggregates import IntervalRecord, encode_intervals
from protocols.commands import CommandResult, verify_command
from protocols.errors import ConfigError

from ..feectl.conftest import ms
from .conftest import KEY, LEGACY, NOW, Api, call, config_text, pay, raw_call, write_files


# -- auth --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong-token-0123456789abcdef", f"Basic {LEGACY}", "Bearer", f"Bearer {LEGACY}x"]
)
async def test_requests_without_the_token_are_401(api: Api, auth: str | None) -> None:
    for method, path, body in (("POST", "/v1/payments", pay()), ("GET", "/v1/accounts/acc-1", None)):
        status, headers, doc = await call(api.port, method, path, body, auth=auth)
        assert status == 401 and doc["error"] == "unauthorized"
        assert headers["www-authenticate"] == 'Bearer realm="amigw"'
    assert api.service.controller.balance("acc-1").balance_fen == 0  # nothing was posted


async def test_two_authorization_headers_are_400_even_when_both_are_valid(api: Api) -> None:
    """Before, the last of two headers won; now the request is refused and nothing is posted."""
    two = f"Authorization: Bearer {LEGACY}\r\n"
    status, _, doc = await call(api.port, "POST", "/v1/payments", pay(), headers=two)
    assert status == 400 and doc["error"] == "bad_header"
    assert api.payments() == []
    assert api.audit_rows() == [("-", "POST", "/v1/payments", 400, "bad_header")]


async def test_healthz_needs_no_token_and_reports_counters(api: Api) -> None:
    status, _, doc = await call(api.port, "GET", "/healthz", auth=None)
    assert status == 200 and doc["status"] == "ok" and doc["stats"]["payments"] == 0


# -- payments ----------------------------------------------------------------------------------------
async def test_payment_is_recorded_once(api: Api) -> None:
    status, _, doc = await call(api.port, "POST", "/v1/payments", pay())
    assert status == 201
    assert doc["recorded"] is True and doc["balance_fen"] == 1000 and doc["paid_ms"] == NOW
    status, _, again = await call(api.port, "POST", "/v1/payments", pay())
    assert status == 200 and again["recorded"] is False and again["balance_fen"] == 1000
    assert again["paid_ms"] == NOW  # the original payment's time
    status, _, doc = await call(api.port, "POST", "/v1/payments", pay(amount_fen=999))
    assert status == 409 and doc["error"] == "payment_conflict"
    assert api.service.controller.balance("acc-1").balance_fen == 1000
    assert api.payments() == [("p-1", 1000, NOW)]


async def test_concurrent_identical_payments_are_recorded_exactly_once(api: Api) -> None:
    answers = await asyncio.gather(*(call(api.port, "POST", "/v1/payments", pay()) for _ in range(12)))
    assert sorted(status for status, _, _ in answers) == [200] * 11 + [201]
    assert {doc["balance_fen"] for _, _, doc in answers} == {1000}
    assert api.payments() == [("p-1", 1000, NOW)]


async def test_unknown_account_is_404(api: Api) -> None:
    status, _, doc = await call(api.port, "POST", "/v1/payments", pay(account="nobody"))
    assert status == 404 and doc["error"] == "unknown_account"
    for path in ("/v1/accounts/nobody", "/v1/accounts/nobody/journal"):
        status, _, doc = await call(api.port, "GET", path)
        assert status == 404 and doc["error"] == "unknown_account"
    status, _, doc = await call(api.port, "GET", "/v1/accounts/" + "a" * 129)
    assert status == 400 and doc["error"] == "bad_fields"


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "bad_json"),
        (b"", "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
        (b'{"account": "acc-1", "account": "acc-1", "payment_id": "p", "amount_fen": 5}', "bad_json"),
        (b'{"account": "acc-1", "payment_id": "p", "amount_fen": NaN}', "bad_json"),
        (json.dumps({"account": "acc-1", "payment_id": "p"}).encode(), "bad_fields"),
        (json.dumps({**pay(), "note": "x"}).encode(), "bad_fields"),
        (json.dumps(pay(amount_fen=0)).encode(), "bad_fields"),
        (json.dumps(pay(amount_fen=-5)).encode(), "bad_fields"),
        (json.dumps({**pay(), "amount_fen": 10.5}).encode(), "bad_fields"),
        (json.dumps({**pay(), "amount_fen": True}).encode(), "bad_fields"),
        (json.dumps({**pay(), "amount_fen": "100"}).encode(), "bad_fields"),
        (json.dumps(pay(payment_id="")).encode(), "bad_fields"),
        (json.dumps(pay(payment_id="p" * 129)).encode(), "bad_fields"),
        (json.dumps(pay(account=7)).encode(), "bad_fields"),  # type: ignore[arg-type]
    ],
)
async def test_bad_payment_bodies_are_400_with_a_reason(api: Api, raw: bytes, error: str) -> None:
    status, _, doc = await call(api.port, "POST", "/v1/payments", raw=raw)
    assert status == 400 and doc["error"] == error and doc["detail"]
    assert api.service.controller.balance("acc-1").balance_fen == 0


async def test_only_json_content_is_accepted(api: Api) -> None:
    body = json.dumps(pay()).encode()
    ctype = "Content-Type: text/plain\r\n"
    status, _, doc = await call(api.port, "POST", "/v1/payments", raw=body, headers=ctype)
    assert status == 400 and doc["error"] == "bad_content_type"
    assert api.payments() == []
    ctype = "Content-Type: application/json; charset=utf-8\r\n"
    assert (await call(api.port, "POST", "/v1/payments", raw=body, headers=ctype))[0] == 201


@pytest.mark.parametrize(
    "length_headers",
    [
        b"Content-Length: 61\r\nContent-Length: 61\r\n",
        b"Content-Length: +61\r\n",
        b"Content-Length: 6_1\r\n",
        b"Content-Length: 61\r\nTransfer-Encoding: chunked\r\n",
    ],
)
async def test_malformed_framing_is_refused_by_the_parser(api: Api, length_headers: bytes) -> None:
    body = json.dumps(pay()).encode()
    assert len(body) == 61
    head = b"POST /v1/payments HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + LEGACY.encode() + b"\r\n"
    status, _, _ = await raw_call(api.port, head + length_headers + b"\r\n" + body)
    assert status == 400
    assert api.payments() == [] and api.service.controller.balance("acc-1").balance_fen == 0
    # the same bytes with one well-formed Content-Length are a payment
    status, _, _ = await raw_call(api.port, head + b"Content-Length: 61\r\n\r\n" + body)
    assert status == 201 and api.payments() == [("p-1", 1000, NOW)]


async def test_payments_above_the_configured_maximum_are_refused(api: Api) -> None:
    """The bound is [service.limits] max_payment_fen."""
    service = api.service
    top = service.cfg.service.limits.max_payment_fen
    for amount in (10**12, top + 1):
        status, _, doc = await call(
            api.port, "POST", "/v1/payments", pay(payment_id=f"p-{amount}", amount_fen=amount)
        )
        assert status == 400 and doc["error"] == "amount_out_of_range" and str(top) in doc["detail"]
    assert service.controller.balance("acc-1").balance_fen == 0
    status, _, doc = await call(api.port, "POST", "/v1/payments", pay(amount_fen=top))
    assert status == 201 and doc["balance_fen"] == top
    exposition = generate_latest(service.metrics.registry).decode()
    assert 'amigw_feectl_payments_total{result="amount_out_of_range"} 2.0' in exposition
    assert 'amigw_feectl_payments_total{result="recorded"} 1.0' in exposition


async def test_protocol_errors_are_json(api: Api) -> None:
    status, headers, doc = await call(api.port, "GET", "/v1/payments")
    assert (status, doc["error"], headers["allow"]) == (405, "method_not_allowed", "POST")
    status, _, doc = await call(api.port, "POST", "/v1/accounts/acc-1", pay())
    assert (status, doc["error"]) == (405, "method_not_allowed")
    status, _, doc = await call(api.port, "GET", "/v1/nothing")
    assert (status, doc["error"]) == (404, "not_found")
    status, _, doc = await call(api.port, "POST", "/v1/payments", raw=b"x" * 70_000)
    assert status == 413 and doc["error"] == "body_too_large"
    for query in ("limit=0", "limit=1001", "limit=x", "limit=1_0", "limit=5&limit=6"):
        status, _, doc = await call(api.port, "GET", f"/v1/accounts/acc-1/journal?{query}")
        assert status == 400 and doc["error"] == "bad_limit", query
    status, _, doc = await call(api.port, "GET", "/v1/accounts/acc-1?verbose=1")
    assert status == 400 and doc["error"] == "bad_query"
    assert api.payments() == []


async def test_a_ledger_failure_is_503_and_a_bug_is_500(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    def broken_ledger(*_: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    def bug(*_: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(api.service, "account_view", broken_ledger)
    status, _, doc = await call(api.port, "GET", "/v1/accounts/acc-1")
    assert (status, doc["error"]) == (503, "ledger_unavailable")
    monkeypatch.setattr(api.service, "account_view", bug)
    status, _, doc = await call(api.port, "GET", "/v1/accounts/acc-1")
    assert (status, doc) == (500, {"error": "internal_error", "detail": ""})


# -- views -------------------------------------------------------------------------------------------
async def test_account_and_journal_views(api: Api) -> None:
    await call(api.port, "POST", "/v1/payments", pay(amount_fen=300))
    status, _, view = await call(api.port, "GET", "/v1/accounts/acc-1")
    assert status == 200
    assert (view["balance_fen"], view["level"], view["protected"]) == (300, "ALARM2", False)
    assert view["meters"] == [
        {
            "meter": "m-1",
            "gateway": "gw-1",
            "remote": True,
            "relay": "closed",
            "outstanding": None,
            "blocked": None,
        }
    ]
    status, _, doc = await call(api.port, "GET", "/v1/accounts/acc-1/journal?limit=2")
    assert status == 200 and len(doc["entries"]) == 2
    assert doc["entries"][0]["kind"] == "payment" and doc["entries"][0]["amount_fen"] == 300
    assert doc["entries"][0]["seq"] < doc["entries"][1]["seq"]
    status, _, doc = await call(api.port, "GET", "/v1/accounts/acc-1/journal")
    assert doc["entries"][0]["kind"] == "account"  # the enrolment is the first row


async def test_payment_after_a_trip_sends_a_signed_close_allowed_at_once(api: Api) -> None:
    service, recorder = api.service, api.recorder
    start = ms("2024-03-05 09:00")
    batch = encode_intervals("gw-1", 1, [IntervalRecord("m-1", 1, start, start + 900_000, 300, 0)])
    assert service.handle_message("ami/v1/agg/intervals/gw-1", batch)  # 150 fen: trip due
    await service.flush()
    ((topic, payload),) = recorder.sent[:1]
    trip = verify_command(payload, KEY, NOW, gateway="gw-1")
    assert (topic, trip.action) == ("ami/v1/gw-1/down/cmd", "trip")
    done = CommandResult(trip.id, "gw-1", "m-1", "trip", "done", NOW, relay_state=1).signed(KEY)
    assert service.handle_message("ami/v1/gw-1/up/cmd-result", done)
    assert service.controller.command(trip.id).state.value == "verified"
    recorder.sent.clear()

    status, _, doc = await call(api.port, "POST", "/v1/payments", pay(amount_fen=500))
    assert status == 201 and doc["balance_fen"] == 350
    (restore,) = [d for d in doc["decisions"] if d["kind"] == "RESTORE_ISSUED"]
    assert service._kick.is_set()  # the control loop is woken, not left to the next tick
    await service.flush()
    commands = [
        verify_command(p, KEY, NOW, gateway="gw-1") for t, p in recorder.sent if t.endswith("/down/cmd")
    ]
    assert [(c.id, c.action) for c in commands] == [(restore["command_id"], "close_allowed")]
    notes = [json.loads(p) for t, p in recorder.sent if t == "ami/v1/agg/notifications"]
    assert [n["kind"] for n in notes] == ["RECOVERED", "RESTORE_ISSUED"]


# -- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "key_path"),
    [
        ("[service.mqtt]\nurl = 'http://x'", "service.mqtt.url"),
        ("[service.mqtt]\nclientid = 'x'", "service.mqtt.clientid"),
        ("[unknown]\nx = 1", "unknown"),
        (
            '[[service.accounts]]\naccount_id = "a2"\ntariff = "nope"\nmeters = []',
            "service.accounts[1].tariff",
        ),
        (
            '[[service.accounts]]\naccount_id = "a2"\ntariff = "flat"\n'
            'meters = [{meter = "m9", gateway = "gw-9"}]',
            "service.accounts[1].meters[0].gateway",
        ),
    ],
)
def test_service_config_errors_name_the_key(tmp_path: Path, extra: str, key_path: str) -> None:
    write_files(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_service_config(config_text(extra), tmp_path)
    assert exc.value.key_path == key_path


def test_service_config_reads_its_files(tmp_path: Path) -> None:
    write_files(tmp_path)
    cfg = load_service_config(config_text(), tmp_path)
    assert cfg.command_keys == {"gw-1": KEY}
    legacy = cfg.api_tokens.authenticate(LEGACY)
    assert legacy is not None and (legacy.name, legacy.role) == ("token_file", "payments")
    assert cfg.db_path == tmp_path / "ledger.sqlite" and cfg.service.tick_interval_s == 5.0
    (tmp_path / "token").write_text("short")
    with pytest.raises(ConfigError) as exc:
        load_service_config(config_text(), tmp_path)
    assert exc.value.key_path == "service.http.token_file"


def test_config_sample_loads_and_the_cli_prints_and_checks_it(tmp_path: Path) -> None:
    cfg = load_service_config(SAMPLE, tmp_path)
    assert cfg.service.limits == LimitSettings() and cfg.service.metrics_listen == ""
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "config", "sample", "feectl"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout == SAMPLE, out.stderr
    good = tmp_path / "feectl.toml"
    good.write_text(SAMPLE)
    check = [sys.executable, "-m", "gateway.cli", "config", "check", "--kind", "feectl"]
    out = subprocess.run([*check, str(good)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(SAMPLE.replace("max_power_w = 100000", "max_power_w = -5"))
    out = subprocess.run([*check, str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "service.limits.max_power_w" in out.stderr


def test_config_sample_shows_every_key_with_its_default() -> None:
    """Each settings table's keys appear in the sample with their default value."""
    from ingest.feectl.config import HttpSettings

    tables = {
        "service": ServiceSettings(),
        "service.mqtt": MqttLink(),
        "service.limits": LimitSettings(),
        "service.http": HttpSettings(enabled=False),
    }
    for name, defaults in tables.items():
        for key in defaults.__dataclass_fields__:
            value = getattr(defaults, key)
            if dataclasses.is_dataclass(value) or key in ("accounts",):
                continue
            assert re.search(rf"^#? ?{key} = ", SAMPLE, re.M), f"{name}.{key} missing from the sample"
