"""Shared parts of the ops API tests: a fee-control service over a temporary SQLite ledger, its
ops API on a real loopback socket (port 0), tokens of every role, and a raw HTTP/1.1 client (the
server closes the connection after each answer)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ingest.feectl.config import load_service_config
from ingest.feectl.service import FeeControlService
from ingest.ops.app import OpsSettings, build_app, serving

from ..feectl.conftest import FLAT_TOML, ms

LEGACY = "unit-test-token-0123456789abcdef"  # token_file: role payments
TOKENS = {
    role: f"{role}-token-0123456789abcdef" for role in ("read", "operate", "payments", "enrol", "admin")
}
KEY = bytes(range(16, 48))
NOW = ms("2024-03-05 10:00")  # a Tuesday, inside the FC-09 trip hours


def tokens_toml() -> str:
    return "".join(
        f'[tokens.{role}-1]\nrole = "{role}"\ntoken_sha256 = "{hashlib.sha256(t.encode()).hexdigest()}"\n'
        for role, t in TOKENS.items()
    )


def config_text(extra: str = "", http: str = 'token_file = "token"\ntokens_file = "tokens.toml"') -> str:
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
{http}
[[service.accounts]]
account_id = "acc-1"
tariff = "flat"
meters = [{{ meter = "m-1", gateway = "gw-1" }}]
{extra}
"""


def write_files(tmp: Path) -> None:
    (tmp / "gw-1.key").write_text(KEY.hex())
    (tmp / "token").write_text(LEGACY + "\n")
    (tmp / "tokens.toml").write_text(tokens_toml())
    (tmp / "flat.toml").write_text(FLAT_TOML)


class Recorder:
    """A list-recording publisher: the seam where MQTT would be."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes) -> None:
        self.sent.append((topic, payload))


@dataclass
class Api:
    service: FeeControlService
    port: int
    recorder: Recorder

    def audit_rows(self) -> list[tuple[Any, ...]]:
        db = self.service.controller.store.connection  # type: ignore[attr-defined]
        return db.execute("SELECT who, method, path, status, error FROM audit ORDER BY id").fetchall()  # type: ignore[no-any-return]

    def payments(self) -> list[tuple[str | None, int, int]]:
        return [
            (e.ref, e.amount_fen, e.ts_ms)
            for e in self.service.controller.journal("acc-1")
            if e.kind.value == "payment"
        ]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    write_files(tmp_path)
    cfg = load_service_config(config_text(), tmp_path)
    recorder = Recorder()
    service = FeeControlService(cfg, clock=lambda: NOW, publisher=recorder)
    service.enroll()
    app = build_app(service, OpsSettings(cfg.api_tokens, cfg.service.http.max_body_bytes))
    async with serving(app, "127.0.0.1", 0) as (_, port):
        yield Api(service, port, recorder)
    service.controller.store.close()


async def raw_call(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head_b, _, payload = response.partition(b"\r\n\r\n")
    lines = head_b.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


async def call(port: int, method: str, path: str, body: Any = None, *, auth: str | None = f"Bearer {LEGACY}",
               raw: bytes | None = None, headers: str = "") -> tuple[int, dict[str, str], Any]:  # fmt: skip
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(data)}\r\n{headers}"
    if auth is not None:
        head += f"Authorization: {auth}\r\n"
    status, got, payload = await raw_call(port, head.encode() + b"\r\n" + data)
    assert int(got["content-length"]) == len(payload)
    assert got.get("connection") == "close"
    return status, got, json.loads(payload)


def bearer(role: str) -> str:
    return f"Bearer {TOKENS[role]}"


def pay(account: str = "acc-1", payment_id: str = "p-1", amount_fen: int = 1000) -> dict[str, Any]:
    return {"account": account, "payment_id": payment_id, "amount_fen": amount_fen}
