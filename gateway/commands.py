"""Command intake at the edge: verify, refuse replays, execute once, publish the result.

Each downlink message goes through :meth:`CommandIntake.handle`:

1. :func:`protocols.commands.verify_command` checks the bytes (canonical encoding), signature,
   addressee, params and validity window;
2. the command id is *claimed* in a SQLite table that survives restarts (replay protection);
3. the agent's ``execute`` callback runs it (relay actions read the relay state back);
4. the outcome is stored with the id and the result is returned for publishing.

A failure while executing one command stays with that command: whatever ``execute`` raises
becomes a ``failed`` result with reason ``internal`` (logged once, with the traceback), and the
id is finished like any other, so a redelivery is answered ``replayed`` instead of running into
the same failure again. Every refusal is a ``rejected`` result with its reason, logged once.

Replays: an id whose execution finished (``done``/``failed``/``rejected``) is answered with a
``rejected``/``replayed`` result and never executed again. An id that was claimed but never
finished (the agent died mid-execution) is executed again when it is redelivered: relay
commands are idempotent in effect (a second trip leaves the relay open) and verified by reading
the relay state back, so finishing the interrupted command is right, and it is what the
head-end's retry with the same id asks for.

Ids older than the longest validity window (plus skew) are pruned: such a command would be
refused as expired anyway, so the store stays bounded.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from protocols.commands import MAX_VALIDITY_MS, Command, CommandResult, verify_command
from protocols.errors import CommandRejected

__all__ = ["CommandIntake", "ExecutedCommands"]

log = logging.getLogger("amigw.commands")


class ExecutedCommands:
    """Persistent set of command ids with their final status (SQLite, WAL)."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a claimed id must survive power loss
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS executed_commands ("
            " id TEXT PRIMARY KEY, received_ms INTEGER NOT NULL, status TEXT NOT NULL)"
        )

    def claim(self, command_id: str, now_ms: int) -> str | None:
        """Claim ``command_id``. Returns ``None`` when new (now claimed), else its stored status
        (``"claimed"`` when an earlier execution never finished)."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO executed_commands (id, received_ms, status) VALUES (?, ?, 'claimed')",
            (command_id, now_ms),
        )
        if cur.rowcount == 1:
            return None
        row = self._db.execute("SELECT status FROM executed_commands WHERE id = ?", (command_id,)).fetchone()
        return str(row[0])

    def finish(self, command_id: str, status: str) -> None:
        self._db.execute("UPDATE executed_commands SET status = ? WHERE id = ?", (status, command_id))

    def prune(self, now_ms: int, skew_ms: int) -> int:
        cur = self._db.execute(
            "DELETE FROM executed_commands WHERE received_ms < ?", (now_ms - MAX_VALIDITY_MS - 2 * skew_ms,)
        )
        return cur.rowcount

    def close(self) -> None:
        self._db.close()


Execute = Callable[[Command], Awaitable[CommandResult]]


class CommandIntake:
    """Turns raw downlink payloads into at-most-once executions and signed results."""

    def __init__(
        self,
        gateway: str,
        key: bytes,
        store: ExecutedCommands,
        execute: Execute,
        known_meters: Callable[[str], bool],
        *,
        max_skew_ms: int = 60_000,
    ) -> None:
        self.gateway = gateway
        self._key = key
        self._store = store
        self._execute = execute
        self._known = known_meters
        self._skew = max_skew_ms
        self.counts = {"received": 0, "executed": 0, "rejected": 0}

    def _rejected(
        self, reason: str, cmd_id: str | None, meter: str, action: str, now_ms: int, detail: str
    ) -> CommandResult:
        self.counts["rejected"] += 1
        log.warning("command rejected", extra={"kv": {"id": cmd_id, "reason": reason, "detail": detail}})
        return CommandResult(cmd_id or "?", self.gateway, meter, action, "rejected", now_ms, reason, detail)

    async def handle(self, payload: bytes, now_ms: int) -> bytes:
        """:meth:`handle_result`, signed: the bytes to publish."""
        return (await self.handle_result(payload, now_ms)).signed(self._key)

    async def _run(self, cmd: Command, now_ms: int) -> CommandResult:
        try:
            result = await self._execute(cmd)
        except Exception as exc:  # one command's failure must not end the loop
            error = f"{type(exc).__name__}: {exc}"
            log.error(
                "command failed",
                extra={"kv": {"id": cmd.id, "meter": cmd.meter, "action": cmd.action, "reason": "internal",
                              "error": error}},
                exc_info=True,
            )  # fmt: skip
            return CommandResult(
                cmd.id, cmd.gateway, cmd.meter, cmd.action, "failed", now_ms, "internal", error
            )
        if result.status == "failed":
            log.warning(
                "command failed",
                extra={"kv": {"id": cmd.id, "meter": cmd.meter, "action": cmd.action, "reason": result.reason,
                              "detail": result.detail}},
            )  # fmt: skip
        return result

    async def handle_result(self, payload: bytes, now_ms: int) -> CommandResult:
        """Process one downlink payload; return its result (never raises for bad input or a
        failing execution: every refusal is a ``rejected`` result, every failure a ``failed`` one)."""
        self.counts["received"] += 1
        try:
            cmd = verify_command(payload, self._key, now_ms, gateway=self.gateway, max_skew_ms=self._skew)
        except CommandRejected as exc:
            return self._rejected(exc.reason, exc.command_id, "?", "?", now_ms, exc.detail)
        if not self._known(cmd.meter):
            return self._rejected(
                "unknown_meter",
                cmd.id,
                cmd.meter,
                cmd.action,
                now_ms,
                f"meter {cmd.meter!r} is not configured on this gateway",
            )
        previous = self._store.claim(cmd.id, now_ms)
        if previous is not None and previous != "claimed":
            return self._rejected(
                "replayed",
                cmd.id,
                cmd.meter,
                cmd.action,
                now_ms,
                f"command already executed with status {previous}",
            )
        result = await self._run(cmd, now_ms)
        self._store.finish(cmd.id, result.status)
        self._store.prune(now_ms, self._skew)
        self.counts["executed"] += 1
        return result
