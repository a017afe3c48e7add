"""End-to-end confirmations: the head-end tells a gateway which of its uplink messages are durable.

A broker's PUBACK only says the broker took a message; a broker can then lose it (the Debian
mosquitto does not restore shared subscriptions after a restart). So the edge keeps a readings
batch or an event in its outbox until the **head-end** confirms it durable: written to the store,
or dead-lettered with a reason (DESIGN §5). This module is the codec of that confirmation.

Topic and direction: ``ami/v1/{gateway}/down/ack`` (see :func:`protocols.topics.ack`), head-end ->
edge, QoS 1, not retained. The edge subscribes on its persistent session, so confirmations sent
while it is offline wait at the broker; a confirmation lost anyway is repaired by the edge's
re-send after ``ack_timeout_s``: the head-end recognises the re-sent batch by ``(gateway, seq)``
and confirms it again. Confirming is therefore idempotent and needs no shared state between
head-end workers: every worker confirms what it made durable (or found already durable).

JSON, compact::

    {"v":1,"type":"ack","gateway":"gw-1","seqs":[[1,5],[7,7]],"events":["gw-1-ev-9f"],"ts_ms":1700000101000}

* ``seqs``: inclusive ``[first, last]`` ranges of readings-batch sequence numbers, ascending and
  not overlapping (:func:`seq_ranges` builds them).
* ``events``: event ids (``payload.Event.id``) made durable.
* ``ts_ms``: when the head-end sent it (informational).

Bounds, so that a forged or corrupt message cannot cost the edge much: at most
:data:`MAX_RANGES` ranges, :data:`MAX_EVENTS` event ids, :data:`MAX_ACK_BYTES` bytes. A message
outside them, or of another shape, raises :class:`~protocols.errors.PayloadError`.

Confirmations are not signed: only the head-end may publish under ``ami/v1/+/down/#`` (the ACL
in docs/broker.md); a gateway's own credentials must never carry that right.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from protocols.errors import PayloadError
from protocols.payload import VERSION, load_json_message

__all__ = ["MAX_ACK_BYTES", "MAX_EVENTS", "MAX_RANGES", "Ack", "decode_ack", "seq_ranges"]

MAX_RANGES = 4096
MAX_EVENTS = 4096
MAX_ACK_BYTES = 256 * 1024
_MAX_SEQ = 2**63 - 1
_MAX_ID_LEN = 256


@dataclass(frozen=True, slots=True)
class Ack:
    """What the head-end confirms durable for one gateway."""

    gateway: str
    seqs: tuple[tuple[int, int], ...] = ()
    events: tuple[str, ...] = ()
    ts_ms: int = 0

    def __post_init__(self) -> None:
        if not self.gateway:
            raise ValueError("ack without a gateway")
        _check_ranges(self.seqs, ValueError)

    def to_json(self) -> bytes:
        doc = {
            "v": VERSION,
            "type": "ack",
            "gateway": self.gateway,
            "seqs": [list(r) for r in self.seqs],
            "events": list(self.events),
            "ts_ms": self.ts_ms,
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()

    def covers(self, seq: int) -> bool:
        """True if ``seq`` lies in one of the ranges."""
        return any(lo <= seq <= hi for lo, hi in self.seqs)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.seqs) + len(self.events)


def seq_ranges(seqs: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Sorted, merged inclusive ranges of the given sequence numbers (duplicates ignored)."""
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return tuple((lo, hi) for lo, hi in out)


def decode_ack(data: bytes) -> Ack:
    """Parse and check a confirmation. Raises :class:`PayloadError` with the reason."""
    doc = load_json_message(data, "ack", max_bytes=MAX_ACK_BYTES)
    gateway = doc.get("gateway")
    if not isinstance(gateway, str) or not gateway or len(gateway) > _MAX_ID_LEN:
        raise PayloadError("ack: gateway must be a non-empty string")
    raw_seqs = doc.get("seqs", [])
    raw_events = doc.get("events", [])
    ts_ms = doc.get("ts_ms", 0)
    if not isinstance(raw_seqs, list) or len(raw_seqs) > MAX_RANGES:
        raise PayloadError(f"ack: seqs must be a list of at most {MAX_RANGES} ranges")
    if not isinstance(raw_events, list) or len(raw_events) > MAX_EVENTS:
        raise PayloadError(f"ack: events must be a list of at most {MAX_EVENTS} ids")
    if not isinstance(ts_ms, int) or isinstance(ts_ms, bool):
        raise PayloadError("ack: ts_ms must be an integer")
    seqs = []
    for r in raw_seqs:
        if (
            not isinstance(r, list)
            or len(r) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        ):
            raise PayloadError("ack: each seqs entry must be [first, last] integers")
        seqs.append((r[0], r[1]))
    _check_ranges(seqs, PayloadError)
    for e in raw_events:
        if not isinstance(e, str) or not e or len(e) > _MAX_ID_LEN:
            raise PayloadError("ack: each event id must be a non-empty string")
    return Ack(gateway, tuple(seqs), tuple(raw_events), ts_ms)


def _check_ranges(seqs: Iterable[tuple[int, int]], error: type[Exception]) -> None:
    last = 0
    for lo, hi in seqs:
        if not 1 <= lo <= hi <= _MAX_SEQ or lo <= last:
            raise error(f"ack: seq range [{lo}, {hi}] is empty, out of order or overlapping")
        last = hi
