"""Fee-control operations over the real ops server (real SQLite ledger): enrolment by a CIS
token, an operator's relay command signed and sent by the service's flush, holds, adjustments,
statements, lists; roles and malformed requests refused with nothing changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ingest.feectl.config import load_service_config
from ingest.feectl.service import FeeControlService
from ingest.ops.app import OpsSettings, build_app, serving
from protocols import topics
from protocols.commands import Action, verify_command

from .conftest import KEY, NOW, Api, Recorder, bearer, call, config_text, pay, write_files

ENROL = bearer("enrol")
OPERATE = bearer("operate")


def enrolment(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "account_id": "acc-2",
        "tariff": "flat",
        "protected": False,
        "customer_class": "residential",
        "meters": [{"meter": "m-2", "gateway": "gw-1", "remote": True}],
        "opening_balance_fen": 500,
    }
    doc.update(changes)
    return doc


async def test_a_cis_enrols_an_account_that_is_effective_at_once(api: Api) -> None:
    status, _, body = await call(api.port, "POST", "/v1/accounts", enrolment(), auth=ENROL)
    assert status == 201 and body["created"] is True and body["opening_balance_fen"] == 500, body
    assert body["account"]["balance_fen"] == 500
    status, _, again = await call(api.port, "POST", "/v1/accounts", enrolment(), auth=ENROL)
    assert status == 200 and again["created"] is False and again["opening_balance_fen"] is None
    status, _, view = await call(api.port, "GET", "/v1/accounts/acc-2", auth=bearer("read"))
    assert status == 200 and view["balance_fen"] == 500 and [m["meter"] for m in view["meters"]] == ["m-2"]
    assert "m-2" in api.service._enrolled_meters()  # charged from its next interval, no restart


async def test_enrolment_refusals_change_nothing(api: Api) -> None:
    cases = [
        (enrolment(), bearer("operate"), 403, "forbidden"),
        (enrolment(), bearer("payments"), 403, "forbidden"),
        (enrolment(colour="red"), ENROL, 400, "bad_fields"),
        (enrolment(meters=[]), ENROL, 400, "bad_fields"),
        (enrolment(meters=[{"meter": "m-2", "gateway": "gw-1"}]), ENROL, 400, "bad_fields"),
        (enrolment(tariff="nope"), ENROL, 400, "unknown_tariff"),
        (
            enrolment(meters=[{"meter": "m-2", "gateway": "gw-9", "remote": True}]),
            ENROL,
            400,
            "unknown_gateway",
        ),
        (
            enrolment(meters=[{"meter": "m-1", "gateway": "gw-1", "remote": True}]),
            ENROL,
            409,
            "meter_conflict",
        ),
    ]
    for doc, auth, status, error in cases:
        got, _, body = await call(api.port, "POST", "/v1/accounts", doc, auth=auth)
        assert (got, body["error"]) == (status, error), (doc, body)
    assert (await call(api.port, "GET", "/v1/accounts/acc-2", auth=bearer("read")))[0] == 404
    assert [r[3] for r in api.audit_rows()] == [s for _, _, s, _ in cases]  # each refusal audited


async def test_an_operators_trip_is_signed_and_sent_through_the_commands_path(api: Api) -> None:
    body = {"action": "trip", "reason": "meter tampering reported"}
    assert (await call(api.port, "POST", "/v1/meters/m-1/relay", body, auth=bearer("read")))[0] == 403
    status, _, answer = await call(api.port, "POST", "/v1/meters/m-1/relay", body, auth=OPERATE)
    assert status == 201 and answer["command"]["state"] == "issued", answer
    command_id = answer["command"]["command_id"]
    status, _, again = await call(api.port, "POST", "/v1/meters/m-1/relay", body, auth=OPERATE)
    assert (status, again["error"]) == (409, "command_conflict")
    assert (await call(api.port, "POST", "/v1/meters/nope/relay", body, auth=OPERATE))[0] == 404
    bad = {"action": "explode", "reason": "x"}
    assert (await call(api.port, "POST", "/v1/meters/m-1/relay", bad, auth=OPERATE))[0] == 400
    await api.service.flush()
    (payload,) = [p for t, p in api.recorder.sent if t == topics.command("gw-1")]
    sent = verify_command(payload, KEY, NOW, gateway="gw-1")
    assert (sent.id, sent.meter, sent.action) == (command_id, "m-1", Action.TRIP)
    status, _, listed = await call(api.port, "GET", "/v1/commands?meter=m-1", auth=bearer("read"))
    assert status == 200 and [c["command_id"] for c in listed["commands"]] == [command_id]
    status, _, one = await call(api.port, "GET", f"/v1/commands/{command_id}", auth=bearer("read"))
    assert status == 200 and one["action"] == "trip" and one["command_id"] == command_id
    rows = [r for r in api.audit_rows() if r[2] == "/v1/meters/m-1/relay"]
    assert [(r[0], r[3]) for r in rows] == [
        ("read-1", 403),
        ("operate-1", 201),
        ("operate-1", 409),
        ("operate-1", 400),
    ]


async def test_holds_adjustments_statement_and_lists(api: Api) -> None:
    path = "/v1/accounts/acc-1"
    status, _, held = await call(api.port, "POST", f"{path}/holds", {"reason": "heat wave"}, auth=OPERATE)
    assert status == 200 and held["added"] is True and held["holds"][0]["reason"] == "heat wave", held
    status, _, listed = await call(api.port, "GET", f"{path}/holds", auth=bearer("read"))
    assert status == 200 and len(listed["holds"]) == 1
    status, _, released = await call(api.port, "POST", f"{path}/holds/release", {}, auth=OPERATE)
    assert status == 200 and released["released"] == 1
    adj = {"adjustment_id": "adj-1", "amount_fen": -250, "reason": "meter test fee"}
    assert (await call(api.port, "POST", f"{path}/adjustments", adj, auth=OPERATE))[0] == 403
    status, _, first = await call(api.port, "POST", f"{path}/adjustments", adj, auth=bearer("payments"))
    assert status == 201 and first["recorded"] is True
    status, _, again = await call(api.port, "POST", f"{path}/adjustments", adj, auth=bearer("payments"))
    assert status == 200 and again["recorded"] is False
    other = dict(adj, amount_fen=-300)
    status, _, conflict = await call(api.port, "POST", f"{path}/adjustments", other, auth=bearer("payments"))
    assert (status, conflict["error"]) == (409, "adjustment_conflict")
    assert (await call(api.port, "POST", "/v1/payments", pay(amount_fen=1000)))[0] == 201
    status, _, st = await call(api.port, "GET", f"{path}/statement?from=2024-03-05&to=2024-03-05")
    assert status == 200, st
    (day,) = st["days"]
    assert (day["payments"]["fen"], day["adjustments"]["fen"]) == (1000, -250)
    assert day["closing_fen"] == day["opening_fen"] + 1000 - 250 - day["charges"]["fen"]
    status, _, bad = await call(api.port, "GET", f"{path}/statement?from=2024-03-05", auth=bearer("read"))
    assert (status, bad["error"]) == (400, "bad_argument")
    status, _, decisions = await call(api.port, "GET", f"{path}/decisions", auth=bearer("read"))
    assert status == 200 and any(d["code"] == "HOLD_RELEASED" for d in decisions["decisions"]), decisions
    assert (await call(api.port, "GET", "/v1/rejects?limit=5", auth=bearer("read")))[0] == 200
    assert (await call(api.port, "GET", "/v1/rejects?limit=0", auth=bearer("read")))[0] == 400


async def test_an_operator_announces_a_planned_outage_once(tmp_path: Path) -> None:
    write_files(tmp_path)
    extra = (
        '[[service.accounts]]\naccount_id = "acc-3"\ntariff = "flat"\n'
        'meters = [{ meter = "m-3", gateway = "gw-1", area = "TA-7" }]\n'
    )
    cfg = load_service_config(config_text(extra), tmp_path)
    service = FeeControlService(cfg, clock=lambda: NOW, publisher=Recorder(), notifiers=[])
    service.enroll()
    app = build_app(service, OpsSettings(cfg.api_tokens, cfg.service.http.max_body_bytes))
    body = {"area": "TA-7", "start_ms": NOW + 3_600_000, "end_ms": NOW + 7_200_000, "reason": "maintenance"}
    async with serving(app, "127.0.0.1", 0) as (_, port):
        assert (await call(port, "POST", "/v1/outages", body, auth=bearer("read")))[0] == 403
        status, _, first = await call(port, "POST", "/v1/outages", body, auth=OPERATE)
        assert status == 201 and first["accounts"] == ["acc-3"] and first["announced"] is True, first
        status, _, again = await call(port, "POST", "/v1/outages", body, auth=OPERATE)
        assert status == 200 and again["announced"] is False
        status, _, none = await call(port, "POST", "/v1/outages", dict(body, area="TA-0"), auth=OPERATE)
        assert (status, none["error"]) == (404, "unknown_area")
        backwards = dict(body, end_ms=body["start_ms"])
        assert (await call(port, "POST", "/v1/outages", backwards, auth=OPERATE))[0] == 400
    notes = [e for e in service.controller.journal("acc-3") if e.code == "OUTAGE_PLANNED"]
    assert len(notes) == 1
    service.controller.store.close()


async def test_a_meter_reset_is_an_operators_and_names_them(api: Api) -> None:
    assert (await call(api.port, "POST", "/v1/meters/m-1/reset", auth=bearer("read")))[0] == 403
    assert (await call(api.port, "POST", "/v1/meters/nope/reset", auth=OPERATE))[0] == 404
    status, _, body = await call(api.port, "POST", "/v1/meters/m-1/reset", auth=OPERATE)
    assert status == 200 and body["meter"] == "m-1" and body["account"] == "acc-1", body
    journal = api.service.controller.journal("acc-1")
    resets = [e for e in journal if e.meter == "m-1" and "OPERATOR:operate-1" in e.reasons]
    assert resets, [(e.code, e.meter, e.reasons) for e in journal][-3:]
