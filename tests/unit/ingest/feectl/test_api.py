"""The payments HTTP API over a real loopback socket (port 0) against the real service object and
a temporary SQLite ledger: bearer auth, idempotent payments, errors; and that a payment's
restore command is signed and handed to the publisher at once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from ingest.feectl.api import PaymentsApi
from ingest.feectl.config import SAMPLE, LimitSettings, MqttLink, ServiceSettings, load_service_config
from ingest.feectl.service import FeeControlService
from protocols.aggregates import IntervalRecord, encode_intervals
from protocols.commands import CommandResult, verify_command
from protocols.errors import ConfigError

from .conftest import FLAT_TOML, ms

TOKEN = "unit-test-token-0123456789abcdef"
KEY = bytes(range(16, 48))
NOW = ms("2024-03-05 10:00")  # a Tuesday, inside the FC-09 trip hours


def config_text(extra: str = "") -> str:
    return f"""
[feectl]
overdraft_limit_fen = 100
grace_s = 0
[service]
db_path = "ledger.sqlite"
command_key_files = {{ gw-1 = "gw-1.key" }}
tariff_files = {{ flat = "flat.toml" }}
[service.http]
port = 0
token_file = "token"
[[service.accounts]]
account_id = "acc-1"
tariff = "flat"
meters = [{{ meter = "m-1", gateway = "gw-1" }}]
{extra}
"""


def write_files(tmp: Path) -> None:
    (tmp / "gw-1.key").write_text(KEY.hex())
    (tmp / "token").write_text(TOKEN + "\n")
    (tmp / "flat.toml").write_text(FLAT_TOML)


class Recorder:
    """A list-recording publisher: the seam where MQTT would be."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes) -> None:
        self.sent.append((topic, payload))


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[FeeControlService, int, Recorder]]:
    write_files(tmp_path)
    cfg = load_service_config(config_text(), tmp_path)
    recorder = Recorder()
    service = FeeControlService(cfg, clock=lambda: NOW, publisher=recorder)
    service.enroll()
    server = await PaymentsApi(service, TOKEN).start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield service, port, recorder
    server.close()
    await server.wait_closed()
    service.controller.store.close()


async def call(port: int, method: str, path: str, body: Any = None, *, auth: str | None = f"Bearer {TOKEN}",
               raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(data)}\r\n"
    if auth is not None:
        head += f"Authorization: {auth}\r\n"
    writer.write(head.encode() + b"\r\n" + data)
    response = await reader.read()
    writer.close()
    head_b, _, payload = response.partition(b"\r\n\r\n")
    lines = head_b.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert int(headers["content-length"]) == len(payload)
    return int(lines[0].split()[1]), headers, json.loads(payload)


def pay(account: str = "acc-1", payment_id: str = "p-1", amount_fen: int = 1000) -> dict[str, Any]:
    return {"account": account, "payment_id": payment_id, "amount_fen": amount_fen}


# -- auth --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong-token-0123456789abcdef", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"]
)
async def test_requests_without_the_token_are_401(api: Any, auth: str | None) -> None:
    service, port, _ = api
    for method, path, body in (("POST", "/v1/payments", pay()), ("GET", "/v1/accounts/acc-1", None)):
        status, headers, doc = await call(port, method, path, body, auth=auth)
        assert status == 401 and doc["error"] == "unauthorized"
        assert headers["www-authenticate"].startswith("Bearer")
    assert service.controller.balance("acc-1").balance_fen == 0  # nothing was posted


async def test_healthz_needs_no_token_and_reports_counters(api: Any) -> None:
    _, port, _ = api
    status, _, doc = await call(port, "GET", "/healthz", auth=None)
    assert status == 200 and doc["status"] == "ok" and doc["stats"]["payments"] == 0


# -- payments ----------------------------------------------------------------------------------------
async def test_payment_is_recorded_once(api: Any) -> None:
    service, port, _ = api
    status, _, doc = await call(port, "POST", "/v1/payments", pay())
    assert status == 201
    assert doc["recorded"] is True and doc["balance_fen"] == 1000 and doc["paid_ms"] == NOW
    status, _, again = await call(port, "POST", "/v1/payments", pay())
    assert status == 200 and again["recorded"] is False and again["balance_fen"] == 1000
    assert again["paid_ms"] == NOW  # the original payment's time
    status, _, doc = await call(port, "POST", "/v1/payments", pay(amount_fen=999))
    assert status == 409 and doc["error"] == "payment_conflict"
    assert service.controller.balance("acc-1").balance_fen == 1000
    payments = [e for e in service.controller.journal("acc-1") if e.kind.value == "payment"]
    assert [(e.ref, e.amount_fen, e.ts_ms) for e in payments] == [("p-1", 1000, NOW)]


async def test_unknown_account_is_404(api: Any) -> None:
    _, port, _ = api
    status, _, doc = await call(port, "POST", "/v1/payments", pay(account="nobody"))
    assert status == 404 and doc["error"] == "unknown_account"
    for path in ("/v1/accounts/nobody", "/v1/accounts/nobody/journal"):
        status, _, doc = await call(port, "GET", path)
        assert status == 404 and doc["error"] == "unknown_account"


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "bad_json"),
        (b"", "bad_json"),
        (json.dumps({"account": "acc-1", "payment_id": "p"}).encode(), "bad_fields"),
        (json.dumps({**pay(), "note": "x"}).encode(), "bad_fields"),
        (json.dumps(pay(amount_fen=0)).encode(), "bad_fields"),
        (json.dumps(pay(amount_fen=-5)).encode(), "bad_fields"),
        (json.dumps({**pay(), "amount_fen": 10.5}).encode(), "bad_fields"),
        (json.dumps({**pay(), "amount_fen": True}).encode(), "bad_fields"),
        (json.dumps({**pay(), "amount_fen": "100"}).encode(), "bad_fields"),
        (json.dumps(pay(payment_id="")).encode(), "bad_fields"),
        (json.dumps(pay(account=7)).encode(), "bad_fields"),  # type: ignore[arg-type]
    ],
)
async def test_bad_payment_bodies_are_400_with_a_reason(api: Any, raw: bytes, error: str) -> None:
    service, port, _ = api
    status, _, doc = await call(port, "POST", "/v1/payments", raw=raw)
    assert status == 400 and doc["error"] == error and doc["detail"]
    assert service.controller.balance("acc-1").balance_fen == 0


async def test_payments_above_the_configured_maximum_are_refused(api: Any) -> None:
    """The finding: a payment of 10^12 fen was accepted. The bound is [service.limits]."""
    service, port, _ = api
    top = service.cfg.service.limits.max_payment_fen
    for amount in (10**12, top + 1):
        status, _, doc = await call(
            port, "POST", "/v1/payments", pay(payment_id=f"p-{amount}", amount_fen=amount)
        )
        assert status == 400 and doc["error"] == "amount_out_of_range" and str(top) in doc["detail"]
    assert service.controller.balance("acc-1").balance_fen == 0
    status, _, doc = await call(port, "POST", "/v1/payments", pay(amount_fen=top))
    assert status == 201 and doc["balance_fen"] == top
    exposition = generate_latest(service.metrics.registry).decode()
    assert 'amigw_feectl_payments_total{result="amount_out_of_range"} 2.0' in exposition
    assert 'amigw_feectl_payments_total{result="recorded"} 1.0' in exposition


async def test_protocol_errors(api: Any) -> None:
    _, port, _ = api
    assert (await call(port, "GET", "/v1/payments"))[0] == 405
    assert (await call(port, "POST", "/v1/accounts/acc-1", pay()))[0] == 405
    assert (await call(port, "GET", "/v1/nothing"))[0] == 404
    status, _, doc = await call(port, "POST", "/v1/payments", raw=b"x" * 70_000)
    assert status == 413 and doc["error"] == "body_too_large"
    status, _, doc = await call(port, "GET", "/v1/accounts/acc-1/journal?limit=0")
    assert status == 400 and doc["error"] == "bad_limit"


# -- views -------------------------------------------------------------------------------------------
async def test_account_and_journal_views(api: Any) -> None:
    _, port, _ = api
    await call(port, "POST", "/v1/payments", pay(amount_fen=300))
    status, _, view = await call(port, "GET", "/v1/accounts/acc-1")
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
    status, _, doc = await call(port, "GET", "/v1/accounts/acc-1/journal?limit=2")
    assert status == 200 and len(doc["entries"]) == 2
    assert doc["entries"][0]["kind"] == "payment" and doc["entries"][0]["amount_fen"] == 300
    assert doc["entries"][0]["seq"] < doc["entries"][1]["seq"]
    status, _, doc = await call(port, "GET", "/v1/accounts/acc-1/journal")
    assert doc["entries"][0]["kind"] == "account"  # the enrolment is the first row


async def test_payment_after_a_trip_sends_a_signed_close_allowed_at_once(api: Any) -> None:
    service, port, recorder = api
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

    status, _, doc = await call(port, "POST", "/v1/payments", pay(amount_fen=500))
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
    assert cfg.command_keys == {"gw-1": KEY} and cfg.api_token == TOKEN
    assert cfg.db_path == tmp_path / "ledger.sqlite" and cfg.service.tick_interval_s == 5.0
    (tmp_path / "token").write_text("short")
    with pytest.raises(ConfigError) as exc:
        load_service_config(config_text(), tmp_path)
    assert exc.value.key_path == "service.http.token_file"


def test_config_sample_loads_and_the_cli_prints_and_checks_it(tmp_path: Path) -> None:
    """``amigw config sample feectl`` was an AttributeError; the sample loads as it is."""
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
    tables = {"service": ServiceSettings(), "service.mqtt": MqttLink(), "service.limits": LimitSettings()}
    for name, defaults in tables.items():
        for key in defaults.__dataclass_fields__:
            value = getattr(defaults, key)
            if dataclasses.is_dataclass(value) or key in ("accounts",):
                continue
            assert re.search(rf"^#? ?{key} = ", SAMPLE, re.M), f"{name}.{key} missing from the sample"
