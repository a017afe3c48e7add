"""The MQTT topic tree, built and parsed in one place (DESIGN §4).

::

    ami/v1/{gateway}/up/readings     edge -> head-end   reading batches
    ami/v1/{gateway}/up/events       edge -> head-end   events
    ami/v1/{gateway}/up/cmd-result   edge -> head-end   signed command results
    ami/v1/{gateway}/status          edge -> all        retained status, last-will
    ami/v1/{gateway}/down/cmd        head-end -> edge   signed commands
    ami/v1/{gateway}/down/ack        head-end -> edge   end-to-end confirmations (protocols.acks)
    ami/v1/agg/{kind}/{gateway}      ingest -> billing, fee control: aggregates
    ami/v1/agg/notifications         fee control -> customer channels: notifications
    ami/v1/agg/alarms                ingest -> fee control: alarms (protocols.alarms)

A gateway id is one topic level: it must be a valid id (:func:`check_gateway_id`) and may not be
a level the tree reserves (``agg``, where the aggregates live), or a gateway could publish into
the head-end's namespace under an ACL that grants ``ami/v1/<its id>/#``.
"""

from __future__ import annotations

import re

from protocols.errors import PayloadError

__all__ = [
    "ALARMS",
    "CMD_RESULTS_ALL",
    "EVENTS_SHARED",
    "NOTIFICATIONS",
    "PREFIX",
    "READINGS_SHARED",
    "RESERVED_GATEWAY_IDS",
    "ack",
    "agg",
    "agg_all",
    "agg_gateway_of",
    "check_gateway_id",
    "cmd_result",
    "cmd_result_gateway_of",
    "command",
    "events",
    "gateway_of",
    "readings",
    "status",
]

PREFIX = "ami/v1"
RESERVED_GATEWAY_IDS = frozenset({"agg", "+", "#", "up", "down", "status", "ack", "cmd"})
_GATEWAY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

READINGS_SHARED = f"$share/ingest/{PREFIX}/+/up/readings"
EVENTS_SHARED = f"$share/ingest/{PREFIX}/+/up/events"
CMD_RESULTS_ALL = f"{PREFIX}/+/up/cmd-result"
NOTIFICATIONS = f"{PREFIX}/agg/notifications"
ALARMS = f"{PREFIX}/agg/alarms"


def check_gateway_id(gateway: str) -> str | None:
    """Why ``gateway`` cannot be a gateway id, or None if it can.

    Letters, digits and ``. _ : -`` (starting with a letter or digit), at most 128 characters,
    and not one of :data:`RESERVED_GATEWAY_IDS` (compared case-insensitively)."""
    if not _GATEWAY_ID.fullmatch(gateway):
        return "expected letters, digits and . _ : - (1-128 characters, starting with a letter or digit)"
    if gateway.lower() in RESERVED_GATEWAY_IDS:
        return f"{gateway!r} is a reserved topic level ({', '.join(sorted(RESERVED_GATEWAY_IDS))})"
    return None


def readings(gateway: str) -> str:
    return f"{PREFIX}/{gateway}/up/readings"


def events(gateway: str) -> str:
    return f"{PREFIX}/{gateway}/up/events"


def cmd_result(gateway: str) -> str:
    return f"{PREFIX}/{gateway}/up/cmd-result"


def status(gateway: str) -> str:
    return f"{PREFIX}/{gateway}/status"


def command(gateway: str) -> str:
    return f"{PREFIX}/{gateway}/down/cmd"


def ack(gateway: str) -> str:
    return f"{PREFIX}/{gateway}/down/ack"


def agg(kind: str, gateway: str) -> str:
    """``ami/v1/agg/{kind}/{gateway}`` (kind: ``intervals`` or ``daily``)."""
    return f"{PREFIX}/agg/{kind}/{gateway}"


def agg_all(kind: str) -> str:
    """The filter for every gateway's ``ami/v1/agg/{kind}/{gateway}``."""
    return agg(kind, "+")


def agg_gateway_of(kind: str, topic: str) -> str | None:
    """``ami/v1/agg/{kind}/{gateway}`` -> ``gateway`` (not yet checked); anything else -> None."""
    prefix = agg(kind, "")
    rest = topic[len(prefix) :]
    return rest if topic.startswith(prefix) and rest and "/" not in rest else None


def cmd_result_gateway_of(topic: str) -> str | None:
    """``ami/v1/{gateway}/up/cmd-result`` -> ``gateway``; anything else -> None."""
    parts = topic.split("/")
    if len(parts) == 5 and "/".join(parts[:2]) == PREFIX and parts[3:] == ["up", "cmd-result"] and parts[2]:
        return parts[2]
    return None


def gateway_of(topic: str) -> str:
    """The gateway level of an ``ami/v1/{gateway}/...`` topic (not ``agg``).

    Raises:
        PayloadError: the topic is not of that form.
    """
    parts = topic.split("/")
    if len(parts) < 4 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[2] == "agg" or not parts[2]:
        raise PayloadError(f"topic {topic!r} names no gateway")
    return parts[2]
