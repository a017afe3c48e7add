"""Every exception the project raises on purpose, in one tree.

All packages import from here (``protocols`` is the one package everybody may import), so a
caller can catch one base class at the edge of a loop and know what it got::

    AmigwError
     ├─ ConfigError            .key_path + reason: "buses[1].baud: expected int, got 'fast'"
     │   └─ ExportError        a bad export request (range, grouping, format): .key_path names the argument
     ├─ ProtocolError          the peer's bytes were wrong
     │   ├─ FrameError         .raw: the offending bytes
     │   │   ├─ ChecksumError
     │   │   ├─ FramingError
     │   │   └─ FrameTooLong
     │   ├─ MeterErrorReply    the meter answered "no": .error_code (bits), .di
     │   └─ PayloadError       undecodable MQTT payload -> dead letter, with .reason
     ├─ TransportError         the line or the socket failed
     │   └─ TransportTimeout   also a builtin TimeoutError
     ├─ CommandRejected        .reason: bad_signature | expired | not_yet_valid | replayed |
     │                         unknown_meter | malformed
     ├─ SinkError              InfluxDB refused or was unreachable; .retryable
     │   └─ SinkRefused        InfluxDB refused *us* (credentials, database, API): .reason
     ├─ StateUnavailable       the shared state database (PostgreSQL) unreachable or gone; retried
     └─ RequestRefused         a call to our HTTP API refused: .status, .code, .detail
         └─ BadArgument        an argument out of what is answered: .param, .reason (400)

"We did something wrong" (a programming error) stays a plain ``ValueError``/``TypeError``;
these classes say the *outside world* (a config file, a meter, a broker payload, a server) did.
Errors carry their data as attributes, not as prefixes baked into the message.
"""

from __future__ import annotations

__all__ = [
    "AmigwError",
    "BadArgument",
    "ChecksumError",
    "CommandRejected",
    "ConfigError",
    "ExportError",
    "FrameError",
    "FrameTooLong",
    "FramingError",
    "MeterErrorReply",
    "PayloadError",
    "ProtocolError",
    "RequestRefused",
    "SinkError",
    "SinkRefused",
    "StateUnavailable",
    "TransportError",
    "TransportTimeout",
]


class AmigwError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(AmigwError):
    """A configuration value is missing, unknown or of the wrong type.

    ``key_path`` is the dotted path of the bad key (``"buses[1].baud"``), ``reason`` says why.
    """

    def __init__(self, key_path: str, reason: str) -> None:
        self.key_path = key_path
        self.reason = reason
        super().__init__(f"{key_path}: {reason}" if key_path else reason)


class ExportError(ConfigError):
    """An export was asked for with a bad argument (a range ending before it starts or longer than
    the maximum, an unknown grouping or format). ``key_path`` names the argument as the caller
    gave it (``"to"``, ``"by"``, ``"format"``), ``reason`` says why."""


class ProtocolError(AmigwError):
    """The bytes a peer sent (a meter, a gateway, a broker payload) were wrong."""


class FrameError(ProtocolError):
    """A frame could not be decoded. ``raw`` holds the offending bytes."""

    def __init__(self, message: str, raw: bytes = b"") -> None:
        self.raw = bytes(raw)
        super().__init__(f"{message} (raw={self.raw.hex(' ')})" if raw else message)


class ChecksumError(FrameError):
    """The frame's checksum does not match its contents."""


class FramingError(FrameError):
    """Start/end markers, length field or structure are wrong."""


class FrameTooLong(FrameError):
    """A frame (or a run of unframed bytes) exceeds the decoder's bound."""


class MeterErrorReply(ProtocolError):
    """The meter answered with an error reply.

    ``error_code`` is the raw error byte (bit field), ``di`` the data identifier asked for
    (``None`` when not applicable), ``reasons`` the names of the bits set.
    """

    def __init__(self, error_code: int, di: int | None = None, reasons: tuple[str, ...] = ()) -> None:
        self.error_code = error_code
        self.di = di
        self.reasons = reasons
        where = f" for di={di:08X}" if di is not None else ""
        names = ", ".join(reasons) if reasons else "unspecified"
        super().__init__(f"meter error reply 0x{error_code:02X}{where}: {names}")


class PayloadError(ProtocolError):
    """An MQTT payload could not be decoded; ``reason`` says what is wrong."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TransportError(AmigwError):
    """The serial line or the socket failed (closed, unplugged, refused)."""


class TransportTimeout(TransportError, TimeoutError):
    """No (complete) answer arrived within the timeout."""


class CommandRejected(AmigwError):
    """A downlink command was refused before it reached a meter.

    ``reason`` is one of :data:`CommandRejected.REASONS`; ``command_id`` the command's id when known.
    """

    REASONS = frozenset(
        {"bad_signature", "expired", "not_yet_valid", "replayed", "unknown_meter", "malformed"}
    )

    def __init__(self, reason: str, command_id: str | None = None, detail: str = "") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self.reason = reason
        self.command_id = command_id
        self.detail = detail
        super().__init__(
            f"command {command_id or '?'} rejected: {reason}" + (f" ({detail})" if detail else "")
        )


class SinkError(AmigwError):
    """InfluxDB refused a write or could not be reached.

    ``retryable`` is true for outages and overload (5xx, 429, connection errors) and for
    :class:`SinkRefused`, false for what the server will never accept (a refused InfluxQL
    statement). ``retry_after_s``: the server's ``Retry-After``, when it sent one (the retry
    layer waits at least that long).
    """

    def __init__(
        self, message: str, *, retryable: bool, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s
        super().__init__(message)


class SinkRefused(SinkError):
    """InfluxDB refused the request, not the data in it: our own misconfiguration.

    ``reason`` is one of :data:`SinkRefused.REASONS`: ``unauthorized`` (401: credentials),
    ``forbidden`` (403: no write privilege), ``not_found`` (404: database, bucket or org missing),
    ``api_unknown`` (the server did not say which API it speaks) or ``refused`` (any other refusal
    that is not about lines). Always ``retryable``: the same request succeeds once the
    configuration or the server is fixed, so data refused this way is kept and retried, never
    dead-lettered.
    """

    REASONS = frozenset({"unauthorized", "forbidden", "not_found", "api_unknown", "refused"})

    def __init__(self, message: str, *, reason: str, status: int | None = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        self.reason = reason
        super().__init__(message, retryable=True, status=status)


class StateUnavailable(AmigwError):
    """The head-end's shared state database (``[state] url``) could not be reached, dropped the
    connection or aborted a transaction (deadlock, shutdown). Nothing was changed by the failed
    call; the caller retries it (the worker does not acknowledge what it could not record)."""


class RequestRefused(AmigwError):
    """A call to one of our HTTP APIs refused: the HTTP ``status``, a stable ``code`` and a
    human ``detail`` (the API answers ``{"error": code, "detail": detail}``)."""

    def __init__(self, status: int, code: str, detail: str = "") -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class BadArgument(RequestRefused, ValueError):
    """An argument outside what is answered (a range too long, an unknown grouping): ``param``
    names it, ``reason`` says why; 400 ``bad_argument``."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(400, "bad_argument", f"{param}: {reason}")
        self.param = param
        self.reason = reason
