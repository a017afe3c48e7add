"""The mosquitto configuration the head-end ships, and its ACL (docs/broker.md).

:data:`SAMPLE` is ``mosquitto.conf`` (``amigw config sample mosquitto``), :data:`ACL` is
``amigw.acl`` (``amigw config sample mosquitto-acl``); both are package data. :func:`limits` is
the site-independent part of the configuration (queue and size limits, session expiration),
which the test suite's brokers run with as well, so the tests exercise the shipped sizing.
"""

from __future__ import annotations

from importlib.resources import files

__all__ = ["ACL", "LIMIT_KEYS", "SAMPLE", "limits"]

SAMPLE = files(__package__).joinpath("mosquitto.conf").read_text(encoding="utf-8")
ACL = files(__package__).joinpath("amigw.acl").read_text(encoding="utf-8")

LIMIT_KEYS = (
    "max_queued_messages",
    "max_queued_bytes",
    "queue_qos0_messages",
    "message_size_limit",
    "max_packet_size",
    "persistent_client_expiration",
)


def limits() -> dict[str, str]:
    """The :data:`LIMIT_KEYS` directives of :data:`SAMPLE`, as ``{key: value}``."""
    out = {}
    for line in SAMPLE.splitlines():
        key, _, value = line.strip().partition(" ")
        if key in LIMIT_KEYS:
            out[key] = value.strip()
    return out
