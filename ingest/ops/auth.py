"""Bearer tokens and roles of the ops API.

A token is a random secret; the service keeps only its SHA-256 (``token_sha256``) with a name
(for the audit trail) and one role. :meth:`TokenTable.authenticate` hashes the presented token
and compares the digest with *every* entry using :func:`hmac.compare_digest`, so neither the
answer's time nor an early exit tells which entry (or how much of one) matched.

Roles (:data:`ROLES`), and the roles each one satisfies (:data:`GRANTS`): a route names the roles
it admits, and a token is admitted when its role grants one of them.

* ``read``: a read-only operator: every GET route except ``GET /v1/audit``.
* ``operate``: an operator who acts (acknowledgements, holds, manual relay commands); includes
  ``read``.
* ``payments``: a billing system: ``POST /v1/payments`` and the account and journal GETs.
* ``enrol``: a customer-information system: account enrolment and changes.
* ``admin``: everything, including ``GET /v1/audit``.

The tokens file (``[service.http] tokens_file``) is TOML::

    [tokens.billing]
    role = "payments"
    token_sha256 = "<64 hex digits: sha256 of the token's UTF-8 bytes>"

:func:`load_tokens_file` reads it (raises ``ConfigError``); :func:`new_token_entry` (also
``python -m ingest.ops.auth NAME ROLE``) makes a random token and its entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
import sys
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from protocols.config import load
from protocols.errors import ConfigError

__all__ = [
    "GRANTS",
    "ROLES",
    "ApiToken",
    "Role",
    "TokenTable",
    "admits",
    "load_tokens_file",
    "new_token_entry",
    "token_from_secret",
]

Role = Literal["read", "operate", "payments", "enrol", "admin"]
ROLES: tuple[Role, ...] = typing.get_args(Role)
GRANTS: Mapping[Role, frozenset[Role]] = {
    "read": frozenset({"read"}),
    "operate": frozenset({"read", "operate"}),
    "payments": frozenset({"payments"}),
    "enrol": frozenset({"enrol"}),
    "admin": frozenset(ROLES),
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MIN_TOKEN_CHARS = 16


def admits(role: Role, route_roles: frozenset[Role]) -> bool:
    """Whether a token of ``role`` may call a route that admits ``route_roles``."""
    return bool(GRANTS[role] & route_roles)


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One configured token: its name (who, in the audit trail), role and SHA-256 digest."""

    name: str
    role: Role
    digest: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name: expected 1..64 of [A-Za-z0-9_.-], got {self.name!r}")
        if self.role not in ROLES:
            raise ValueError(f"role: expected one of {', '.join(ROLES)}, got {self.role!r}")
        if len(self.digest) != 32:
            raise ValueError("digest: expected 32 bytes (SHA-256)")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def token_from_secret(name: str, role: Role, secret: str) -> ApiToken:
    """The entry for a token given in clear (the single ``token_file``). Raises: ValueError."""
    if len(secret) < MIN_TOKEN_CHARS:
        raise ValueError(f"the API token must be at least {MIN_TOKEN_CHARS} characters")
    return ApiToken(name, role, _digest(secret))


@dataclass(frozen=True, slots=True)
class TokenTable:
    """The configured tokens. Names and digests are unique (checked at construction)."""

    tokens: tuple[ApiToken, ...] = ()

    def __post_init__(self) -> None:
        names = [t.name for t in self.tokens]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"tokens.{name}: the name is used twice")
        if len({t.digest for t in self.tokens}) != len(self.tokens):
            raise ValueError("tokens: two entries have the same token_sha256")

    def authenticate(self, presented: str) -> ApiToken | None:
        """The entry whose digest equals the presented token's, compared with every entry."""
        digest = _digest(presented)
        found = None
        for token in self.tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found


@dataclass(frozen=True, slots=True)
class _Entry:
    role: Role
    token_sha256: str

    def __post_init__(self) -> None:
        if not _HEX64.match(self.token_sha256):
            raise ValueError("token_sha256: expected 64 lower-case hex digits")


@dataclass(frozen=True, slots=True)
class _TokensFile:
    tokens: dict[str, _Entry] = dataclasses.field(default_factory=dict)


def load_tokens_file(path: Path, key_path: str) -> tuple[ApiToken, ...]:
    """Read a tokens file. Raises: ConfigError at ``key_path``, the reason naming the file and
    the key inside it (``tokens.billing.role: ...``)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(key_path, f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(key_path, f"{path}: not valid TOML: {exc}") from None
    try:
        doc = load(_TokensFile, data)
        tokens = tuple(
            ApiToken(name, e.role, bytes.fromhex(e.token_sha256)) for name, e in doc.tokens.items()
        )
        TokenTable(tokens)
    except ConfigError as exc:
        raise ConfigError(key_path, f"{path}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(key_path, f"{path}: {exc}") from None
    if not tokens:
        raise ConfigError(key_path, f"{path}: no [tokens.<name>] entries")
    return tokens


def new_token_entry(name: str, role: Role) -> tuple[str, str]:
    """A new random token (256 bits, URL-safe) and its tokens-file entry. Raises: ValueError."""
    secret = secrets.token_urlsafe(32)
    entry = ApiToken(name, role, _digest(secret))
    text = f'[tokens.{entry.name}]\nrole = "{role}"\ntoken_sha256 = "{entry.digest.hex()}"\n'
    return secret, text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ingest.ops.auth NAME ROLE``: print a new token (first line) and its entry."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[1] not in ROLES:
        print(f"usage: python -m ingest.ops.auth NAME ROLE  (ROLE: {' | '.join(ROLES)})", file=sys.stderr)
        return 2
    try:
        secret, text = new_token_entry(args[0], args[1])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(secret)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
