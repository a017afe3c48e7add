"""Signed downlink commands and their results (JSON on ``ami/v1/{gateway}/down/cmd`` and
``ami/v1/{gateway}/up/cmd-result``).

A command is executed by the edge only if (DESIGN §5):

1. its HMAC-SHA256 signature, with the gateway's key, over the *canonical encoding* verifies;
2. ``now`` lies inside its validity window ``[issued_ms - max_skew_ms, expires_ms]``;
3. its id has not been seen before (stateful: the edge keeps the ids; see ``gateway.commands``).

The canonical encoding of an object is JSON with sorted keys, no whitespace and ASCII escapes
exactly as ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` writes
them (:func:`encode`). The signature is the HMAC of the canonical encoding of the object without
``sig`` (:func:`canonical`); the wire form is the canonical encoding of the object *with* its
``sig`` (:func:`signed_json`). Values are strings, integers, booleans, null, lists and objects
only: floats are refused, so that two implementations can never disagree on a number's spelling.

Verification works on the bytes received: they must be exactly the wire form of the object they
parse to. A byte order mark, another encoding than ASCII, a duplicate key, whitespace, unsorted
keys, an alternative escape (upper-case hex in a ``\\u`` escape, an escaped ``/``) or an
unknown top-level key makes the message ``malformed``, so that one signature stands for one byte
string and nothing else. ``params`` are checked per action (:data:`PARAMS`) before anything runs.

Results are signed the same way, with the same key, so the head-end matches a result to its
command by (id, gateway, meter) and trusts it only when its signature verifies. A ``failed`` or
``rejected`` result carries a ``reason`` (:data:`FAILURE_REASONS`, :data:`CommandRejected.REASONS`).

This module is pure: the clock (``now_ms``) and the key are passed in.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from protocols.errors import CommandRejected, PayloadError
from protocols.quantities import by_name

__all__ = [
    "ACTIONS",
    "FAILURE_REASONS",
    "MAX_VALIDITY_MS",
    "PARAMS",
    "RELAY_ACTIONS",
    "RESULT_STATUSES",
    "Action",
    "Command",
    "CommandResult",
    "canonical",
    "decode_result",
    "encode",
    "sign",
    "signed_json",
    "verify_command",
]

VERSION = 1


class Action(enum.StrEnum):
    """Every command action of the contract, the one definition. The relay actions
    (:data:`RELAY_ACTIONS`) are protocol-neutral: each driver maps them to its own codes."""

    TRIP = "trip"
    CLOSE_ALLOWED = "close_allowed"
    DIRECT_CLOSE = "direct_close"
    ALARM = "alarm"
    ALARM_RELEASE = "alarm_release"
    PROTECT = "protect"
    PROTECT_RELEASE = "protect_release"
    TIME_SYNC = "time_sync"
    READ_NOW = "read_now"


RELAY_ACTIONS = frozenset(a for a in Action if a not in (Action.TIME_SYNC, Action.READ_NOW))
ACTIONS = frozenset(Action)
RESULT_STATUSES = frozenset({"done", "failed", "rejected"})
# Why a command that reached the edge's executor failed (``reason`` of a ``failed`` result).
FAILURE_REASONS = frozenset(
    {
        "meter_error",
        "no_answer",
        "transport",
        "unsupported",
        "bus_down",
        "deadline",
        "not_verified",
        "internal",
    }
)
# The keys ``params`` may hold, per action; every action not listed takes ``{}``.
PARAMS: dict[str, frozenset[str]] = {"read_now": frozenset({"quantities"})}
MAX_READ_NOW_QUANTITIES = 64
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


def encode(obj: dict[str, Any]) -> bytes:
    """The canonical encoding of ``obj``: sorted keys, compact, ASCII escapes. Raises
    ``ValueError`` for a float or a value JSON cannot carry."""
    _check_json_value(obj, "message")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def canonical(obj: dict[str, Any]) -> bytes:
    """The bytes that are signed: :func:`encode` of ``obj`` without ``sig``."""
    return encode({k: v for k, v in obj.items() if k != "sig"})


def sign(obj: dict[str, Any], key: bytes) -> str:
    """Hex HMAC-SHA256 of :func:`canonical` ``(obj)`` with ``key``."""
    if not key:
        raise ValueError("signing key must not be empty")
    return hmac.new(key, canonical(obj), hashlib.sha256).hexdigest()


def signed_json(obj: dict[str, Any], key: bytes) -> bytes:
    """The wire form of a signed message: :func:`encode` of ``obj`` with its ``sig``. Every
    producer of commands and results uses this (or ``.signed()``, which calls it)."""
    return encode({**obj, "sig": sign(obj, key)})


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for k, v in pairs:
        if k in doc:
            raise ValueError(f"duplicate key {k!r}")
        doc[k] = v
    return doc


def _load_signed(data: bytes, kind: str, keys: frozenset[str]) -> dict[str, Any]:
    """Parse a signed message of ``kind`` whose top-level keys are ``keys``. Raises
    :class:`PayloadError` for anything that is not the canonical encoding of such an object,
    except a missing ``sig``: that the caller reports as unsigned."""
    if len(data) > _MAX_MESSAGE:
        raise PayloadError(f"{kind} message of {len(data)} bytes is too large")
    try:
        text = bytes(data).decode("ascii")  # the canonical encoding escapes everything else
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise PayloadError(f"{kind} message: not ASCII (a BOM or another encoding)") from None
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"{kind} message: {type(exc).__name__}: {exc}") from None
    if not isinstance(doc, dict) or type(doc.get("v")) is not int or doc["v"] != VERSION:
        raise PayloadError(f"not a v{VERSION} {kind} message")
    if doc.get("type") != kind:
        raise PayloadError(f"not a v{VERSION} {kind} message")
    unknown = sorted(set(doc) - keys)
    missing = sorted(keys - set(doc) - {"sig"})
    if unknown or missing:
        raise PayloadError(f"{kind} message: unknown keys {unknown}, missing keys {missing}")
    if "sig" not in doc:
        return doc  # unsigned, however it is spelt
    try:
        exact = encode(doc) == data
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"{kind} message: {exc}") from None
    if not exact:
        raise PayloadError(
            f"{kind} message is not in canonical form (sorted keys, no whitespace, json.dumps escapes)"
        )
    return doc


def _signature_ok(doc: dict[str, Any], key: bytes) -> bool:
    sig = doc["sig"]
    # Exact comparison: an upper-case signature would be a second spelling of the same message.
    # compare_digest refuses non-ASCII strings (TypeError): such a signature is simply wrong.
    return isinstance(sig, str) and sig.isascii() and hmac.compare_digest(sign(doc, key), sig)


def _check_params(action: str, params: Any) -> None:
    """``params`` must hold only the keys :data:`PARAMS` allows for ``action``, well typed.
    Raises ``ValueError`` naming the bad key."""
    if not isinstance(params, dict):
        raise ValueError(f"params: expected an object, got {type(params).__name__}")
    unknown = sorted(set(params) - PARAMS.get(action, frozenset()))
    if unknown:
        raise ValueError(f"params: {action} takes no {', '.join(unknown)}")
    if "quantities" in params:
        names = params["quantities"]
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_READ_NOW_QUANTITIES:
            raise ValueError(f"params.quantities: expected a list of 1..{MAX_READ_NOW_QUANTITIES} names")
        for i, name in enumerate(names):
            if not isinstance(name, str):
                raise ValueError(f"params.quantities[{i}]: expected a quantity name")
            try:
                by_name(name)
            except KeyError:
                raise ValueError(f"params.quantities[{i}]: unknown quantity {name!r}") from None
        if len(set(names)) != len(names):
            raise ValueError("params.quantities: names repeat")


@dataclass(frozen=True, slots=True)
class Command:
    """A downlink command. ``params`` carries action-specific values (:data:`PARAMS`):
    ``read_now`` takes an optional ``{"quantities": [names]}`` (default: the meter's plans);
    ``time_sync`` (the edge uses its own clock) and the relay actions take ``{}``."""

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
        _check_params(self.action, self.params)
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
        """The wire form: the command with its ``sig`` (:func:`signed_json`)."""
        return signed_json(self.to_dict(), key)


_COMMAND_KEYS = frozenset(
    {"v", "type", "id", "gateway", "meter", "action", "issued_ms", "expires_ms", "params", "sig"}
)
_RESULT_KEYS = frozenset(
    {"v", "type", "id", "gateway", "meter", "action", "status", "ts_ms", "reason", "detail",
     "relay_state", "sig"}
)  # fmt: skip


def verify_command(
    data: bytes, key: bytes, now_ms: int, *, gateway: str, max_skew_ms: int = 60_000
) -> Command:
    """Check the bytes, the signature, addressee, params and validity window; return the command.

    Raises :class:`CommandRejected` with reason ``malformed`` (not the canonical encoding of a
    command, or bad values), ``bad_signature`` (none, or it does not verify), ``expired`` or
    ``not_yet_valid`` (replay is the caller's check: it owns the store of seen ids). The
    signature is checked, in constant time, before any value in the command is trusted.
    """
    try:
        doc = _load_signed(data, "command", _COMMAND_KEYS)
    except PayloadError as exc:
        raise CommandRejected("malformed", _peek_id(data), str(exc)) from None
    command_id = doc["id"] if isinstance(doc["id"], str) else None
    if "sig" not in doc:
        raise CommandRejected("bad_signature", command_id, "no signature")
    if not _signature_ok(doc, key):
        raise CommandRejected("bad_signature", command_id)
    try:
        # Untrusted values: Command's own checks reject wrong types as malformed.
        cmd = Command(**{k: v for k, v in doc.items() if k not in ("v", "type", "sig")})
    except (ValueError, TypeError) as exc:
        raise CommandRejected("malformed", command_id, str(exc)) from None
    if cmd.gateway != gateway:
        raise CommandRejected("malformed", cmd.id, f"addressed to gateway {cmd.gateway!r}, not {gateway!r}")
    if now_ms > cmd.expires_ms:
        raise CommandRejected("expired", cmd.id, f"expired {now_ms - cmd.expires_ms} ms ago")
    if now_ms < cmd.issued_ms - max_skew_ms:
        raise CommandRejected("not_yet_valid", cmd.id, f"issued {cmd.issued_ms - now_ms} ms in the future")
    return cmd


def _peek_id(data: bytes) -> str | None:
    """The ``id`` of a message refused as malformed, when a plain parse finds a short string
    there (only to label the rejection; nothing else of such a message is used)."""
    try:
        doc = json.loads(data) if len(data) <= _MAX_MESSAGE else None
    except (ValueError, RecursionError):
        return None
    cid = doc.get("id") if isinstance(doc, dict) else None
    return cid if isinstance(cid, str) and 0 < len(cid) <= 128 else None


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What the edge did with a command. ``status``: ``done`` (executed and, for relay actions,
    verified by reading the relay state back), ``failed`` (it reached the executor but did not
    succeed; ``reason`` is one of :data:`FAILURE_REASONS`, ``detail`` says how), ``rejected``
    (never reached the meter; ``reason`` is the :class:`CommandRejected` reason)."""

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
        for name in ("id", "gateway", "meter", "action", "detail"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string")
        if isinstance(self.ts_ms, bool) or not isinstance(self.ts_ms, int):
            raise ValueError("ts_ms: expected an int")
        if self.relay_state is not None and self.relay_state not in (0, 1):
            raise ValueError("relay_state: expected 0, 1 or null")
        known = CommandRejected.REASONS if self.status == "rejected" else FAILURE_REASONS
        if self.reason is not None and (self.status == "done" or self.reason not in known):
            raise ValueError(f"reason: {self.reason!r} does not go with status {self.status!r}")

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
        """The wire form: the result with its ``sig`` (:func:`signed_json`)."""
        return signed_json(self.to_dict(), key)


def decode_result(data: bytes, key: bytes) -> CommandResult:
    """Decode a result from the bytes received and verify its signature. Raises
    :class:`PayloadError` when the bytes are not the canonical encoding of a result, or the
    signature does not verify (a result that cannot be trusted is not a result)."""
    doc = _load_signed(data, "cmd-result", _RESULT_KEYS)
    if "sig" not in doc or not _signature_ok(doc, key):
        raise PayloadError("cmd-result: signature does not verify")
    try:
        return CommandResult(**{k: v for k, v in doc.items() if k not in ("v", "type", "sig")})
    except (ValueError, TypeError) as exc:
        raise PayloadError(f"cmd-result: {exc}") from None
