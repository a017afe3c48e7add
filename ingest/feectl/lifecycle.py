"""Relay-command lifecycle as a transition table (STYLE H2; FC-11, FC-12).

A command is created ``ISSUED`` in the same transaction as the decision that wants it, with its id
chosen before anything is sent; it is (re)sent with that same id until a result arrives, so a
crash between deciding and sending neither loses it nor doubles it (the edge de-duplicates by
id)::

    ISSUED ──done──────────▶ ACKED ──read-back matches──▶ VERIFIED
      │  ├─failed/rejected─▶ FAILED          └─verify timeout──▶ UNCONFIRMED
      │  └─deadline+grace──▶ EXPIRED

FAILED, EXPIRED and UNCONFIRMED end the attempt; the next attempt is a *new* command with a new id
(FC-12) decided afresh, so a balance paid in the meantime stops the retry. The message format and
its HMAC signature belong to ``protocols/commands.py``; this module yields plain fields only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocols.commands import Action

__all__ = [
    "OUTSTANDING",
    "RESULT_STATUSES",
    "TERMINAL",
    "TRANSITIONS",
    "CommandEvent",
    "CommandState",
    "InvalidTransitionError",
    "RelayOrder",
    "RelayOrderResult",
    "next_state",
]


class CommandState(enum.StrEnum):
    ISSUED = "issued"
    ACKED = "acked"  # result "done" received; waiting for the status-word read-back (FC-12)
    VERIFIED = "verified"
    FAILED = "failed"
    EXPIRED = "expired"
    UNCONFIRMED = "unconfirmed"  # "done" but the read-back never matched (e.g. load > 30 A deferral)


class CommandEvent(enum.StrEnum):
    RESULT_DONE = "done"
    RESULT_FAILED = "failed"
    RESULT_REJECTED = "rejected"
    DEADLINE_PASSED = "deadline_passed"
    READBACK_MATCH = "readback_match"
    VERIFY_TIMEOUT = "verify_timeout"


TRANSITIONS: dict[tuple[CommandState, CommandEvent], CommandState] = {
    (CommandState.ISSUED, CommandEvent.RESULT_DONE): CommandState.ACKED,
    (CommandState.ISSUED, CommandEvent.RESULT_FAILED): CommandState.FAILED,
    (CommandState.ISSUED, CommandEvent.RESULT_REJECTED): CommandState.FAILED,
    (CommandState.ISSUED, CommandEvent.DEADLINE_PASSED): CommandState.EXPIRED,
    # A status read-back that already shows the commanded state also confirms an ISSUED command
    # whose "done" result was lost (FC-12: the read-back, not the 9C, is the proof).
    (CommandState.ISSUED, CommandEvent.READBACK_MATCH): CommandState.VERIFIED,
    (CommandState.ACKED, CommandEvent.READBACK_MATCH): CommandState.VERIFIED,
    (CommandState.ACKED, CommandEvent.VERIFY_TIMEOUT): CommandState.UNCONFIRMED,
}

OUTSTANDING = frozenset({CommandState.ISSUED, CommandState.ACKED})  # FC-11: at most one per meter
TERMINAL = frozenset(CommandState) - OUTSTANDING
RESULT_STATUSES = frozenset({"done", "failed", "rejected"})


class InvalidTransitionError(ValueError):
    """``event`` is not allowed in ``state`` (a late or repeated result, for instance)."""

    def __init__(self, state: CommandState, event: CommandEvent) -> None:
        self.state = state
        self.event = event
        super().__init__(f"no transition from {state} on {event}")


def next_state(state: CommandState, event: CommandEvent) -> CommandState:
    """Raises:
    InvalidTransitionError: the pair is not in :data:`TRANSITIONS`.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransitionError(state, event) from None


@dataclass(frozen=True, slots=True)
class RelayOrder:
    """The fields of one relay command (FC-11); signing and framing happen in ``protocols``."""

    command_id: str
    account_id: str
    gateway: str
    meter: str
    action: Action
    issued_ms: int
    expires_ms: int  # the meter's validity deadline (N3..N8)
    attempt: int = 1
    state: CommandState = CommandState.ISSUED
    state_ms: int = 0  # when the command entered ``state`` (0: not persisted yet)

    def __post_init__(self) -> None:
        if not self.command_id:
            raise ValueError("command_id: must not be empty")
        if self.expires_ms <= self.issued_ms:
            raise ValueError("expires_ms: must be after issued_ms")
        if self.attempt < 1:
            raise ValueError("attempt: must be >= 1")

    def fields(self) -> dict[str, object]:
        """The plain dict ``protocols.commands`` signs: id, gateway, meter, action, issued_ms, expires_ms."""
        return {
            "id": self.command_id,
            "gateway": self.gateway,
            "meter": self.meter,
            "action": self.action.value,
            "issued_ms": self.issued_ms,
            "expires_ms": self.expires_ms,
        }


@dataclass(frozen=True, slots=True)
class RelayOrderResult:
    """A result reported by the edge for one relay order; matched on (command_id, gateway, meter).
    ``relay_open`` is the status-word read-back the edge sent with it (True open, False closed,
    None: none); :meth:`~.engine.FeeController.on_result` applies it in the result's transaction."""

    command_id: str
    gateway: str
    meter: str
    status: str  # "done" | "failed" | "rejected"
    detail: str = ""
    relay_open: bool | None = None

    def __post_init__(self) -> None:
        if self.status not in RESULT_STATUSES:
            raise ValueError(f"status: expected one of {sorted(RESULT_STATUSES)}, got {self.status!r}")
