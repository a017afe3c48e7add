"""Tokens, roles and the audit trail of the ops API: the token table's rules as pure logic, the
tokens file as config, and roles and audit rows over a real loopback server and SQLite ledger."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.feectl.config import load_service_config
from ingest.ops.auth import (
    GRANTS,
    ROLES,
    TokenTable,
    admits,
    load_tokens_file,
    new_token_entry,
    token_from_secret,
)
from protocols.errors import ConfigError

from .conftest import LEGACY, TOKENS, Api, bearer, call, config_text, pay, write_files


# -- the token table ---------------------------------------------------------------------------------
def test_authenticate_finds_the_entry_by_the_tokens_digest() -> None:
    table = TokenTable((token_from_secret("a", "read", "a" * 16), token_from_secret("b", "admin", "b" * 16)))
    found = table.authenticate("b" * 16)
    assert found is not None and (found.name, found.role) == ("b", "admin")
    assert table.authenticate("b" * 15) is None and table.authenticate("") is None
    assert table.authenticate("a" * 16) is not None and table.authenticate("A" * 16) is None


def test_roles_grant_what_the_docs_say() -> None:
    assert set(GRANTS) == set(ROLES)
    assert admits("operate", frozenset({"read"})) and not admits("read", frozenset({"operate"}))
    assert not admits("payments", frozenset({"read"})) and not admits("enrol", frozenset({"payments"}))
    assert all(admits("admin", frozenset({r})) for r in ROLES)


def test_token_table_refuses_duplicates_and_short_tokens() -> None:
    with pytest.raises(ValueError, match="name is used twice"):
        TokenTable((token_from_secret("a", "read", "x" * 16), token_from_secret("a", "read", "y" * 16)))
    with pytest.raises(ValueError, match="same token_sha256"):
        TokenTable((token_from_secret("a", "read", "x" * 16), token_from_secret("b", "admin", "x" * 16)))
    with pytest.raises(ValueError, match="at least 16"):
        token_from_secret("a", "read", "x" * 15)


def test_a_new_token_entry_loads_and_authenticates(tmp_path: Path) -> None:
    secret, text = new_token_entry("console", "operate")
    (tmp_path / "t.toml").write_text(text)
    (token,) = load_tokens_file(tmp_path / "t.toml", "k")
    assert (token.name, token.role) == ("console", "operate")
    assert TokenTable((token,)).authenticate(secret) == token
    assert secret not in text
    out = subprocess.run(
        [sys.executable, "-m", "ingest.ops.auth", "ci", "admin"], capture_output=True, text=True
    )
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines[1] == "[tokens.ci]" and lines[2] == 'role = "admin"'
    assert lines[3] == f'token_sha256 = "{hashlib.sha256(lines[0].encode()).hexdigest()}"'
    bad = subprocess.run(
        [sys.executable, "-m", "ingest.ops.auth", "ci", "root"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('[tokens.a]\nrole = "root"\ntoken_sha256 = "' + "0" * 64 + '"\n', "tokens.a.role"),
        ('[tokens.a]\nrole = "read"\ntoken_sha256 = "abc"\n', "token_sha256"),
        ('[tokens.a]\nrole = "read"\n', "tokens.a.token_sha256"),
        ('[tokens.a]\nrole = "read"\ntoken_sha256 = "' + "0" * 64 + '"\nextra = 1\n', "tokens.a.extra"),
        ('[tokens."a b"]\nrole = "read"\ntoken_sha256 = "' + "0" * 64 + '"\n', "name"),
        ("[tokens]\n", "no [tokens.<name>] entries"),
        ("tokens = [", "not valid TOML"),
        ("[other]\nx = 1\n", "other"),
    ],
)
def test_tokens_file_errors_name_the_config_key_and_the_entry(tmp_path: Path, text: str, reason: str) -> None:
    write_files(tmp_path)
    (tmp_path / "tokens.toml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_service_config(config_text(), tmp_path)
    assert exc.value.key_path == "service.http.tokens_file" and reason in exc.value.reason


def test_the_http_table_needs_a_token_source_when_enabled(tmp_path: Path) -> None:
    write_files(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_service_config(config_text(http=""), tmp_path)
    assert exc.value.key_path == "service.http.tokens_file"
    (tmp_path / "tokens.toml").write_text(
        f'[tokens.token_file]\nrole = "admin"\ntoken_sha256 = "{"1" * 64}"\n'
    )  # the name token_file is the single token's
    with pytest.raises(ConfigError) as exc:
        load_service_config(config_text(), tmp_path)
    assert exc.value.key_path == "service.http.tokens_file" and "used twice" in exc.value.reason
    cfg = load_service_config(config_text(http='tokens_file = "nope.toml"\nenabled = false'), tmp_path)
    assert cfg.api_tokens == TokenTable()  # disabled: no file is read


# -- roles over HTTP ---------------------------------------------------------------------------------
REQUESTS = {
    "account": ("GET", "/v1/accounts/acc-1"),
    "journal": ("GET", "/v1/accounts/acc-1/journal"),
    "audit": ("GET", "/v1/audit"),
    "pay": ("POST", "/v1/payments"),
}
ALLOWED = {  # role -> the requests above it may make (others: 403 forbidden)
    "read": {"account", "journal"},
    "operate": {"account", "journal", "pay"},  # a payment taken at a counter
    "payments": {"account", "journal", "pay"},
    "enrol": set(),
    "admin": {"account", "journal", "audit", "pay"},
}


@pytest.mark.parametrize("role", ROLES)
async def test_each_role_reaches_exactly_its_routes(api: Api, role: str) -> None:
    for name, (method, path) in REQUESTS.items():
        body = pay() if method == "POST" else None
        status, _, doc = await call(api.port, method, path, body, auth=bearer(role))
        if name in ALLOWED[role]:
            assert status in (200, 201), (role, name, doc)
        else:
            assert (status, doc["error"]) == (403, "forbidden"), (role, name)
    result = (201, None) if "pay" in ALLOWED[role] else (403, "forbidden")
    assert api.audit_rows() == [(f"{role}-1", "POST", "/v1/payments", *result)]


async def test_public_routes_need_no_token_and_ignore_a_bad_one(api: Api) -> None:
    for path in ("/healthz", "/v1/openapi.json"):
        for auth in (None, "Bearer nothing-valid-here-000000"):
            assert (await call(api.port, "GET", path, auth=auth))[0] == 200


# -- the audit trail ---------------------------------------------------------------------------------
async def test_every_state_changing_call_is_audited_with_who_what_and_result(api: Api) -> None:
    await call(api.port, "POST", "/v1/payments", pay())  # token_file: role payments
    await call(api.port, "POST", "/v1/payments", pay(), auth=None)
    await call(api.port, "POST", "/v1/payments", pay(), auth=bearer("read"))
    await call(api.port, "POST", "/v1/payments", raw=b"{bad")
    await call(api.port, "POST", "/v1/payments?x=1", pay())
    await call(api.port, "DELETE", "/v1/accounts/acc-1", auth=bearer("admin"))
    await call(api.port, "POST", "/v1/payments", raw=b"x" * 70_000)
    await call(api.port, "GET", "/v1/accounts/acc-1")  # a read: not audited
    assert api.audit_rows() == [
        ("token_file", "POST", "/v1/payments", 201, None),
        ("-", "POST", "/v1/payments", 401, "unauthorized"),
        ("read-1", "POST", "/v1/payments", 403, "forbidden"),
        ("token_file", "POST", "/v1/payments", 400, "bad_json"),
        ("token_file", "POST", "/v1/payments?x=1", 400, "bad_query"),
        ("admin-1", "DELETE", "/v1/accounts/acc-1", 405, "method_not_allowed"),
        ("token_file", "POST", "/v1/payments", 413, "body_too_large"),
    ]
    status, _, doc = await call(api.port, "GET", "/v1/audit?limit=2", auth=bearer("admin"))
    assert status == 200
    newest, older = doc["entries"]
    assert (newest["status"], newest["body_sha256"], newest["body_excerpt"]) == (413, None, None)
    assert (older["who"], older["method"], older["status"]) == ("admin-1", "DELETE", 405)
    assert older["body_bytes"] == 0 and older["body_sha256"] == hashlib.sha256(b"").hexdigest()
    first = (await call(api.port, "GET", "/v1/audit?limit=1000", auth=bearer("admin")))[2]["entries"][-1]
    body = b'{"account": "acc-1", "payment_id": "p-1", "amount_fen": 1000}'
    assert first["body_sha256"] == hashlib.sha256(body).hexdigest() and first["body_bytes"] == len(body)
    assert first["body_excerpt"] == body.decode() and first["who"] == "token_file" and first["ts_ms"] > 0
    assert (await call(api.port, "GET", "/v1/audit?limit=0", auth=bearer("admin")))[0] == 400


async def test_the_audit_excerpt_is_bounded(api: Api) -> None:
    big = {**pay(), "payment_id": "p" * 100, "note": "n" * 1000}
    await call(api.port, "POST", "/v1/payments", big)
    (row,) = (await call(api.port, "GET", "/v1/audit", auth=bearer("admin")))[2]["entries"]
    assert len(row["body_excerpt"]) == 256 and row["body_bytes"] > 1000 and row["error"] == "bad_fields"


async def test_legacy_token_is_named_token_file(api: Api) -> None:
    assert LEGACY not in TOKENS.values()
    status, _, _ = await call(api.port, "POST", "/v1/payments", pay(), auth=f"bearer   {LEGACY}  ")
    assert status == 201 and api.audit_rows()[0][0] == "token_file"


async def test_an_audit_write_failure_is_logged_and_the_answer_stands(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    from ingest.ops.audit import AuditLog

    def fail(*_: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(AuditLog, "record", fail)
    status, _, doc = await call(api.port, "POST", "/v1/payments", pay())
    assert status == 201 and doc["recorded"] is True
    assert [r.getMessage() for r in caplog.records if r.name == "amigw.ops"] == ["ops audit write failed"]
