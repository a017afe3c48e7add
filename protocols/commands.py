"""Signed downlink commands and their results (JSON on ``ami/v1/{gateway}/down/cmd`` and
``ami/v1/{gateway}/up/cmd-result``).

A command is executed by the edge only if (DESIGN §5):

1. its HMAC-SHA256 signature, with the gateway's key, over the *canonical encoding* verifies;
2. ``now`` lies inside its validity window ``[issued_ms - max_skew_ms, expires_ms]``;
3. its id has not been seen before (stateful: the edge keeps the ids; see ``gateway.commands``).

The canonical encoding is the command object without ``sig``, serialised as JSON with sorted
keys, no whitespace and ASCII escapes (``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=True)``). Values are strings, integers, booleans, lists and objects only: floats
are refused, so that two implementations can never disagree on a number's spelling.

Results are signed the same way, with the same key, so the head-end matches a result to its
command by (id, gateway, meter) and trusts it only when its signature verifies.

This module is pure: the clock (``now_ms``) and the key are passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from protocols.errors import CommandRejected, PayloadError
from protocols.payload import load_json_message

__all__ = [
    "ACTIONS",
    "MAX_VALIDITY_MS",
    "RELAY_ACTIONS",
    "RESULT_STATUSES",
    "Command",
    "CommandResult",
    "canonical",
    "decode_result",
    "sign",
    "verify_command",
]

VERSION = 1
RELAY_ACTIONS = frozenset(
    {"trip", "close_allowed", "direct_close", "alarm", "alarm_release", "protect", "protect_release"}
)
ACTIONS = RELAY_ACTIONS | {"time_sync", "read_now"}
RESULT_STATUSES = frozenset({"done", "failed", "rejected"})
# A command valid for longer than this is refused as malformed: a leaked signed trip must not
# stay usable for days.
MAX_VALIDITY_MS = 24 * 3600 * 1000
_MAX_MESSAGE = 64 * 1024


def _check_json_value(value: Any, path: str) -> None:
    if isinstance(value, float):
        raise ValueError(f"{path}: floats are not allowed in signed messages")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: keys must be strings")
            _check_json_value(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_value(v, f"{path}[{i}]")
    elif value is not None and not isinstance(value, (str, int, bool)):
        raise ValueError(f"{path}: {type(value).__name__} is not allowed in signed messages")


def canonical(obj: dict[str, Any]) -> bytes:
    """The bytes that are signed: ``obj`` without ``sig``, sorted keys, compact, ASCII."""
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    _check_json_value(unsigned, "message")
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(obj: dict[str, Any], key: bytes) -> str:
    """Hex HMAC-SHA256 of :func:`canonical` ``(obj)`` with ``key``."""
    if not key:
        raise ValueError("signing key must not be empty")
    return hmac.new(key, canonical(obj), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Command:
    """A downlink command. ``params`` carries action-specific values (``read_now``:
    ``{"quantities": [...]}``; ``time_sync``: nothing, the edge uses its own clock)."""

    id: str
    gateway: str
    meter: str
    action: str
    issued_ms: int
    expires_ms: int
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("id", "gateway", "meter"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 128:
                raise ValueError(f"{name}: expected a non-empty string of at most 128 chars")
        if self.action not in ACTIONS:
            raise ValueError(f"action: {self.action!r} not one of {sorted(ACTIONS)}")
        for name in ("issued_ms", "expires_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative int")
        if not 0 < self.expires_ms - self.issued_ms <= MAX_VALIDITY_MS:
            raise ValueError(
                f"validity window: expires_ms must be after issued_ms by at most {MAX_VALIDITY_MS} ms"
            )
        _check_json_value(self.params, "params")

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "type": "command",
            "id": self.id,
            "gateway": self.gateway,
            "meter": self.meter,
            "action": self.action,
            "issued_ms": self.issued_ms,
            "expires_ms": self.expires_ms,
            "params": self.params,
        }

    def signed(self, key: bytes) -> bytes:
        """The wire form: the command with its ``sig``."""
        doc = self.to_dict()
        doc["sig"] = sign(doc, key)
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def verify_command(
    data: bytes, key: bytes, now_ms: int, *, gateway: str, max_skew_ms: int = 60_000
) -> Command:
    """Check signature, addressee and validity window; return the command.

    Raises :class:`CommandRejected` with reason ``malformed``, ``bad_signature``, ``expired`` or
    ``not_yet_valid`` (replay is the caller's check: it owns the store of seen ids). The signature
    is checked before anything in the command is trusted, in constant time.
    """
    try:
        doc = load_json_message(data, "command", max_bytes=_MAX_MESSAGE)
    except PayloadError as exc:
        raise CommandRejected("malformed", None, str(exc)) from None
    command_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    sig = doc.get("sig")
    if not isinstance(sig, str):
        raise CommandRejected("bad_signature", command_id, "no signature")
    try:
        expected = sign(doc, key)
    except ValueError as exc:
        raise CommandRejected("malformed", command_id, str(exc)) from None
    if not hmac.compare_digest(expected, sig.lower()):
        raise CommandRejected("bad_signature", command_id)
    try:
        # Untrusted values: Command's own checks reject wrong types as malformed.
        names = ("id", "gateway", "meter", "action", "issued_ms", "expires_ms")
        fields: dict[str, Any] = {k: doc.get(k) for k in names}
        cmd = Command(**fields, params=doc.get("params") or {})
    except (ValueError, TypeError) as exc:
        raise CommandRejected("malformed", command_id, str(exc)) from None
    if cmd.gateway != gateway:
        raise CommandRejected("malformed", cmd.id, f"addressed to gateway {cmd.gateway!r}, not {gateway!r}")
    if now_ms > cmd.expires_ms:
        raise CommandRejected("expired", cmd.id, f"expired {now_ms - cmd.expires_ms} ms ago")
    if now_ms < cmd.issued_ms - max_skew_ms:
        raise CommandRejected("not_yet_valid", cmd.id, f"issued {cmd.issued_ms - now_ms} ms in the future")
    return cmd


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What the edge did with a command. ``status``: ``done`` (executed and, for relay actions,
    verified by reading the relay state back), ``failed`` (the meter refused or did not answer;
    ``detail`` says how), ``rejected`` (never reached the meter; ``reason`` is the
    :class:`CommandRejected` reason)."""

    id: str
    gateway: str
    meter: str
    action: str
    status: str
    ts_ms: int
    reason: str | None = None
    detail: str = ""
    relay_state: int | None = None

    def __post_init__(self) -> None:
        if self.status not in RESULT_STATUSES:
            raise ValueError(f"status: {self.status!r} not one of {sorted(RESULT_STATUSES)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "type": "cmd-result",
            "id": self.id,
            "gateway": self.gateway,
            "meter": self.meter,
            "action": self.action,
            "status": self.status,
            "ts_ms": self.ts_ms,
            "reason": self.reason,
            "detail": self.detail,
            "relay_state": self.relay_state,
        }

    def signed(self, key: bytes) -> bytes:
        doc = self.to_dict()
        doc["sig"] = sign(doc, key)
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def decode_result(data: bytes, key: bytes) -> CommandResult:
    """Decode a result and verify its signature. Raises :class:`PayloadError` when malformed or
    when the signature does not verify (a result that cannot be trusted is not a result)."""
    doc = load_json_message(data, "cmd-result", max_bytes=_MAX_MESSAGE)
    sig = doc.get("sig")
    try:
        ok = isinstance(sig, str) and hmac.compare_digest(sign(doc, key), sig.lower())
    except ValueError as exc:
        raise PayloadError(f"cmd-result: {exc}") from None
    if not ok:
        raise PayloadError("cmd-result: signature does not verify")
    try:
        return CommandResult(
            doc["id"],
            doc["gateway"],
            doc["meter"],
            doc["action"],
            doc["status"],
            doc["ts_ms"],
            doc.get("reason"),
            doc.get("detail", ""),
            doc.get("relay_state"),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise PayloadError(f"cmd-result: {type(exc).__name__}: {exc}") from None
