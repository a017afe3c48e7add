"""Command intake: forged/expired/replayed/unknown refused; each id executed at most once,
across restarts; an interrupted execution is finished on redelivery; a failing execution is
answered and finished, never raised."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.commands import CommandIntake, ExecutedCommands
from protocols.commands import Command, CommandResult, decode_result, signed_json

KEY = b"gateway-key-0123456789"
NOW = 1_700_000_000_000


def _cmd(cid: str = "c-1", meter: str = "m-1", **kw: object) -> Command:
    fields: dict[str, object] = {"issued_ms": NOW, "expires_ms": NOW + 300_000, "action": "trip"}
    fields.update(kw)
    return Command(cid, "gw-1", meter, **fields)  # type: ignore[arg-type]


class Recorder:
    """Stands in for the agent's executor (a seam for pure logic, not a fake meter)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, cmd: Command) -> CommandResult:
        self.calls.append(cmd.id)
        return CommandResult(cmd.id, cmd.gateway, cmd.meter, cmd.action, "done", NOW, relay_state=1)


def _intake(tmp_path: Path, rec: Recorder) -> CommandIntake:
    return CommandIntake("gw-1", KEY, ExecutedCommands(tmp_path / "cmds.sqlite"), rec, lambda m: m == "m-1")


async def test_valid_command_executes_once_and_replay_is_rejected(tmp_path: Path) -> None:
    rec = Recorder()
    intake = _intake(tmp_path, rec)
    first = decode_result(await intake.handle(_cmd().signed(KEY), NOW), KEY)
    assert first.status == "done" and rec.calls == ["c-1"]
    again = decode_result(await intake.handle(_cmd().signed(KEY), NOW + 5), KEY)
    assert (again.status, again.reason) == ("rejected", "replayed") and rec.calls == ["c-1"]


async def test_replay_protection_survives_restart(tmp_path: Path) -> None:
    rec = Recorder()
    await _intake(tmp_path, rec).handle(_cmd().signed(KEY), NOW)
    restarted = _intake(tmp_path, rec)
    res = decode_result(await restarted.handle(_cmd().signed(KEY), NOW + 10), KEY)
    assert res.reason == "replayed" and rec.calls == ["c-1"]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_cmd().signed(b"forger"), "bad_signature"),
        (_cmd().to_dict().__repr__().encode(), "malformed"),
        (_cmd(issued_ms=NOW - 400_000, expires_ms=NOW - 100_000).signed(KEY), "expired"),
        (_cmd(meter="m-9").signed(KEY), "unknown_meter"),
    ],
)
async def test_refusals_never_execute(tmp_path: Path, payload: bytes, reason: str) -> None:
    rec = Recorder()
    res = decode_result(await _intake(tmp_path, rec).handle(payload, NOW), KEY)
    assert (res.status, res.reason) == ("rejected", reason)
    assert rec.calls == []


async def test_interrupted_execution_is_finished_on_redelivery(tmp_path: Path) -> None:
    store = ExecutedCommands(tmp_path / "cmds.sqlite")
    assert store.claim("c-1", NOW) is None  # the agent claimed it, then died before finishing
    store.close()
    rec = Recorder()
    res = decode_result(await _intake(tmp_path, rec).handle(_cmd().signed(KEY), NOW + 1), KEY)
    assert res.status == "done" and rec.calls == ["c-1"]


def test_store_prunes_ids_older_than_any_validity_window(tmp_path: Path) -> None:
    store = ExecutedCommands(tmp_path / "c.sqlite")
    store.claim("old", 0)
    store.claim("new", NOW)
    assert store.prune(NOW, 60_000) == 1
    assert store.claim("new", NOW) == "claimed" and store.claim("old", NOW) is None


class Exploding(Recorder):
    """An executor that fails the way a bug would (not with one of our typed errors)."""

    async def __call__(self, cmd: Command) -> CommandResult:
        self.calls.append(cmd.id)
        raise AttributeError("'list' object has no attribute 'get'")


async def test_a_failing_execution_is_answered_and_finished_not_raised(tmp_path: Path) -> None:
    rec = Exploding()
    res = decode_result(await _intake(tmp_path, rec).handle(_cmd().signed(KEY), NOW), KEY)
    assert (res.status, res.reason) == ("failed", "internal") and "AttributeError" in res.detail
    # finished, not left claimed: a redelivery (also after a restart) is not executed again
    again = decode_result(await _intake(tmp_path, rec).handle(_cmd().signed(KEY), NOW + 5), KEY)
    assert (again.status, again.reason) == ("rejected", "replayed")
    assert rec.calls == ["c-1"]


async def test_signed_read_now_with_params_as_a_list_is_rejected_before_execution(tmp_path: Path) -> None:
    rec = Recorder()
    doc = _cmd(action="read_now").to_dict() | {"params": ["voltage_a"]}
    res = decode_result(await _intake(tmp_path, rec).handle(signed_json(doc, KEY), NOW), KEY)
    assert (res.status, res.reason, res.id) == ("rejected", "malformed", "c-1")
    assert rec.calls == []
