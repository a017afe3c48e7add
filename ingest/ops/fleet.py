"""Fleet health for the ops API: gateway status messages in, one JSON-ready snapshot out.

Contract
--------
* :class:`FleetTracker` is pure. :meth:`FleetTracker.on_status` takes one message of
  ``ami/v1/{gateway}/status`` (retained; the last-will is the same message with
  ``"online": false``, see ``docs/payload.md``), decoded with
  :func:`protocols.payload.decode_status`, and the head-end's receive time. It never raises: a
  message that does not decode, or whose ``gateway`` is not the topic's gateway level, is ignored
  and counted by reason (:attr:`FleetTracker.malformed`). An empty payload on a status topic is
  how an operator clears a retained status: the gateway is forgotten.
* :meth:`FleetTracker.snapshot` returns ``{"gateways": [...], "online": n, "offline": n,
  "stale": n, ...}`` (shape in ``docs/ops-views.md``). A gateway is **offline** when its last
  status says ``online: false`` (the last-will, or the edge's clean exit), **stale** when it says
  online but nothing was heard from it for longer than ``stale_after_s``, else **online**.
* "Last seen": a live message is stamped with the receive time; a *retained* one (delivered
  because we just subscribed) may be hours old, so it is stamped with the status's own ``ts_ms``
  (the gateway's clock, capped at the receive time): a gateway whose retained status is old shows
  stale at once instead of fresh. A retained copy no newer than what we hold changes nothing.
* Buses: the edge's status carries ``bus_<name>_up`` (1/0) and
  ``bus_<name>_read_success_rate`` per bus (``gateway/agent.py`` ``counters``); those are the
  per-bus state reported. ``read_failures`` is ``reads - read_successes`` when the status does
  not carry it.
* Loss accounting: :func:`read_loss_account` reads the ingest loss account
  (:mod:`ingest.pipeline.loss`, a SQLite file per ingest machine) **read-only** and returns its
  :class:`~ingest.pipeline.loss.GatewayLoss` per gateway; pass it to :meth:`snapshot`.
* :func:`run_fleet_subscriber` subscribes to every gateway's status with the head-end's MQTT
  adapter (:class:`~ingest.mqtt.consumer.MqttConsumer`) and feeds the tracker until
  ``stop_event`` is set, reconnecting (with back-off) when the broker refuses or goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.mqtt.consumer import ConsumerConfig, MqttConsumer
from ingest.mqtt.settings import MqttSettings
from ingest.pipeline.loss import Gap, GatewayLoss
from protocols import topics
from protocols.errors import PayloadError, TransportError
from protocols.payload import Status, decode_status

__all__ = [
    "STATUS_MAX_BYTES",
    "FleetTracker",
    "GatewayHealth",
    "fleet_consumer_config",
    "loss_doc",
    "read_loss_account",
    "run_fleet_subscriber",
]

log = logging.getLogger("amigw.ops")

STATUS_MAX_BYTES = 64 * 1024  # a status is a few hundred bytes; more is not a status
_BUS_UP = "_up"
_BUS_RATE = "_read_success_rate"


@dataclass(slots=True)
class GatewayHealth:
    """What the tracker holds for one gateway (the last status, and when it was heard)."""

    gateway: str
    online: bool
    status_ts_ms: int  # the gateway's own ts_ms of the last online status (0: none yet)
    last_seen_ms: int | None  # when the head-end last heard an online status (see the contract)
    offline_since_ms: int | None = None  # receive time of a live offline status; None if unknown
    version: str = ""
    counters: dict[str, int | float] = field(default_factory=dict)

    def state(self, now_ms: int, stale_after_ms: int) -> str:
        if not self.online:
            return "offline"
        if self.last_seen_ms is None or now_ms - self.last_seen_ms > stale_after_ms:
            return "stale"
        return "online"


class FleetTracker:
    """Per-gateway health from status messages (module contract). Not thread-safe: feed it from
    one event loop."""

    def __init__(self, *, stale_after_s: float = 90.0, max_gateways: int = 100_000) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s: expected > 0, got {stale_after_s}")
        if max_gateways < 1:
            raise ValueError(f"max_gateways: expected >= 1, got {max_gateways}")
        self.stale_after_ms = int(stale_after_s * 1000)
        self.max_gateways = max_gateways
        self.gateways: dict[str, GatewayHealth] = {}
        self.malformed: Counter[str] = Counter()
        self.accepted = 0
        self.connected = False  # set by run_fleet_subscriber
        self.subscriber_errors = 0

    def on_status(self, topic: str, payload: bytes, now_ms: int, *, retained: bool = False) -> bool:
        """Apply one status message received at ``now_ms``; True when it changed the state.
        ``retained``: the broker's retain flag (a stored copy, delivered on subscribe)."""
        try:
            gateway = topics.gateway_of(topic)
        except PayloadError:
            self.malformed["topic"] += 1
            return False
        if topic != topics.status(gateway):
            self.malformed["topic"] += 1
            return False
        if not payload:  # a cleared retained status: the gateway was removed
            return self.gateways.pop(gateway, None) is not None
        if len(payload) > STATUS_MAX_BYTES:
            self.malformed["too_large"] += 1
            return False
        try:
            status = decode_status(payload)
        except PayloadError:
            self.malformed["undecodable"] += 1
            return False
        if status.gateway != gateway:
            self.malformed["gateway_mismatch"] += 1
            return False
        return self._apply(status, now_ms, retained)

    def _apply(self, status: Status, now_ms: int, retained: bool) -> bool:
        known = self.gateways.get(status.gateway)
        if known is None and len(self.gateways) >= self.max_gateways:
            self.malformed["too_many_gateways"] += 1
            return False
        new = known is None
        if known is None:
            known = self.gateways[status.gateway] = GatewayHealth(status.gateway, status.online, 0, None)
        if status.online:
            if not new and retained and 0 < status.ts_ms <= known.status_ts_ms:
                return False  # a re-delivered retained copy of what we hold
            known.online, known.offline_since_ms = True, None
            known.status_ts_ms = status.ts_ms
            known.last_seen_ms = min(status.ts_ms, now_ms) if retained else now_ms
            known.version, known.counters = status.version, dict(status.counters)
        else:  # the last-will carries no counters: keep the last known ones
            if not new and not known.online and retained:
                return False
            known.online = False
            known.offline_since_ms = None if retained else now_ms
            if status.version:
                known.version = status.version
            if status.counters:
                known.counters = dict(status.counters)
        self.accepted += 1
        return True

    def snapshot(self, now_ms: int, *, loss: dict[str, GatewayLoss] | None = None) -> dict[str, Any]:
        """The fleet as one JSON-ready document; ``loss``: :func:`read_loss_account`'s answer
        (gateways only in the loss account appear with state ``unknown``)."""
        loss = loss or {}
        docs = [
            gateway_doc(h, now_ms, self.stale_after_ms, loss.get(g)) for g, h in sorted(self.gateways.items())
        ]
        docs += [_unknown_doc(g, acct) for g, acct in sorted(loss.items()) if g not in self.gateways]
        docs.sort(key=lambda d: str(d["gateway"]))
        states = Counter(str(d["state"]) for d in docs)
        return {
            "now_ms": now_ms,
            "stale_after_s": self.stale_after_ms / 1000,
            "gateways": docs,
            "online": states["online"],
            "offline": states["offline"],
            "stale": states["stale"],
            "unknown": states["unknown"],
            "malformed": dict(sorted(self.malformed.items())),
            "subscriber": {"connected": self.connected, "errors": self.subscriber_errors},
        }


def gateway_doc(
    h: GatewayHealth, now_ms: int, stale_after_ms: int, loss: GatewayLoss | None
) -> dict[str, Any]:
    """One gateway's entry of :meth:`FleetTracker.snapshot`."""
    c = h.counters
    reads = c.get("reads")
    failures = c.get("read_failures")
    if failures is None and reads is not None and "read_successes" in c:
        failures = reads - c["read_successes"]
    buses = _buses(c)
    return {
        "gateway": h.gateway,
        "state": h.state(now_ms, stale_after_ms),
        "online": h.online,
        "last_seen_ms": h.last_seen_ms,
        "age_s": None if h.last_seen_ms is None else max(0, now_ms - h.last_seen_ms) / 1000,
        "status_ts_ms": h.status_ts_ms or None,
        "offline_since_ms": h.offline_since_ms,
        "version": h.version,
        "reads": reads,
        "read_failures": failures,
        "read_success_rate": c.get("read_success_rate"),
        "outbox_pending": c.get("outbox_pending"),
        "outbox_dropped": {
            k.removeprefix("outbox_dropped_"): v
            for k, v in sorted(c.items())
            if k.startswith("outbox_dropped_")
        },
        "buses": buses,
        "buses_down": [b["bus"] for b in buses if b["up"] is False],
        "counters": dict(sorted(c.items())),
        "loss": None if loss is None else loss_doc(loss, now_ms),
    }


def _unknown_doc(gateway: str, loss: GatewayLoss) -> dict[str, Any]:
    return {
        **gateway_doc(GatewayHealth(gateway, False, 0, None), 0, 1, None),
        "state": "unknown",
        "online": None,
        "loss": loss_doc(loss, None),
    }


def _buses(c: dict[str, int | float]) -> list[dict[str, Any]]:
    """Per-bus state from ``bus_<name>_up`` and ``bus_<name>_read_success_rate``."""
    names = {k[4 : -len(_BUS_UP)] for k in c if k.startswith("bus_") and k.endswith(_BUS_UP)}
    names |= {k[4 : -len(_BUS_RATE)] for k in c if k.startswith("bus_") and k.endswith(_BUS_RATE)}
    out = []
    for name in sorted(n for n in names if n):
        up = c.get(f"bus_{name}{_BUS_UP}")
        out.append(
            {
                "bus": name,
                "up": None if up is None else bool(up),
                "read_success_rate": c.get(f"bus_{name}{_BUS_RATE}"),
            }
        )
    return out


def loss_doc(loss: GatewayLoss, now_ms: int | None) -> dict[str, Any]:
    """A gateway's loss account as JSON (the same keys as ``amigw ingest --loss --json``)."""
    return {
        "first": loss.first,
        "last": loss.last,
        "missing": loss.missing,
        "resets": loss.resets,
        "lost": loss.lost,
        "gaps": [
            {
                "first": g.first,
                "last": g.last,
                "missing": g.missing,
                "opened_ms": g.opened_ms,
                "age_s": None if now_ms is None else max(0, now_ms - g.opened_ms) / 1000,
                "alarmed": g.alarmed_ms is not None,
            }
            for g in loss.gaps
        ],
    }


def read_loss_account(path: str | Path, url: str = "") -> dict[str, GatewayLoss]:
    """The loss account of ``path`` per gateway, read-only (nothing is created or changed; a
    missing file is an empty account, as for ``amigw ingest --loss``). The tables are
    :mod:`ingest.pipeline.loss`'s (a test checks this agrees with ``LossStore.report``). With
    ``url`` (``[state] url``) the account is the one every machine shares, read through
    :class:`~ingest.pipeline.loss.LossStore` (whose tables it creates when there are none yet).

    Raises: sqlite3.Error when the file is not a loss account; StateUnavailable when the
    database at ``url`` cannot be reached."""
    if url:
        from ingest.pipeline.loss import LossStore

        with LossStore(path, url=url) as store:
            return {a.gateway: a for a in store.report()}
    p = Path(path)
    if not p.exists():
        return {}
    db = sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True, timeout=30.0)
    try:
        spans = db.execute("SELECT gateway, MIN(lo), MAX(hi) FROM durable GROUP BY gateway").fetchall()
        gaps = db.execute(
            "SELECT gateway, lo, hi, opened_ms, alarmed_ms FROM gaps ORDER BY gateway, lo"
        ).fetchall()
        resets = db.execute("SELECT gateway, resets, lost FROM resets").fetchall()
    finally:
        db.close()
    by_gw: dict[str, list[Gap]] = {}
    for gw, lo, hi, opened, alarmed in gaps:
        by_gw.setdefault(gw, []).append(Gap(gw, lo, hi, opened, alarmed))
    span = {gw: (lo, hi) for gw, lo, hi in spans}
    reset = {gw: (n, lost) for gw, n, lost in resets}
    return {
        gw: GatewayLoss(gw, *span.get(gw, (None, None)), tuple(by_gw.get(gw, ())), *reset.get(gw, (0, 0)))
        for gw in sorted(span.keys() | by_gw.keys() | reset.keys())
    }


def fleet_consumer_config(settings: MqttSettings, client_id: str | None = None) -> ConsumerConfig:
    """The status subscription: every gateway's ``status``, on a session that ends with the
    connection (MQTT 5 session expiry 0), so each (re)connect starts from the retained statuses
    rather than from a backlog queued while we were away (MQTT 3.1.1 cannot ask for that: the
    adapter's sessions are persistent there)."""
    cfg = settings.consumer_config(
        client_id or f"{settings.client_id}-fleet", (topics.status("+"),), STATUS_MAX_BYTES
    )
    return dataclasses.replace(cfg, session_expiry_s=0)


async def run_fleet_subscriber(
    tracker: FleetTracker,
    mqtt_settings: MqttSettings,
    stop_event: asyncio.Event,
    *,
    client_id: str | None = None,
    clock: Callable[[], float] = time.time,
    retry_max_s: float = 30.0,
) -> None:
    """Feed ``tracker`` from the broker until ``stop_event`` is set. A connection that cannot be
    made, or that ends with an error, is counted (``tracker.subscriber_errors``) and retried
    after 1 s, 2 s, 4 s ... up to ``retry_max_s``; the retained statuses arrive again on every
    subscribe. Returns when ``stop_event`` is set.

    Raises: ConfigError when the settings cannot make a client (a CA file that does not load);
    nothing else but ``CancelledError``."""
    cfg = fleet_consumer_config(mqtt_settings, client_id)
    delay = 1.0
    while not stop_event.is_set():
        try:
            async with MqttConsumer(cfg) as consumer:
                tracker.connected, delay = True, 1.0
                await _consume(tracker, consumer, stop_event, clock)
        except TransportError as exc:
            tracker.subscriber_errors += 1
            log.warning("fleet status subscription failed url=%s error=%s retry_s=%s", cfg.url, exc, delay)
        finally:
            tracker.connected = False
        if stop_event.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_event.wait(), delay)
        delay = min(delay * 2, retry_max_s)


async def _consume(
    tracker: FleetTracker, consumer: MqttConsumer, stop_event: asyncio.Event, clock: Callable[[], float]
) -> None:
    while not stop_event.is_set():
        try:
            msg = await consumer.get(0.25)  # cancel-safe: a timed-out wait takes nothing
        except TimeoutError:
            continue
        except StopAsyncIteration:
            raise TransportError("fleet status subscription ended") from None
        if msg.oversize:
            tracker.malformed["too_large"] += 1
        else:
            tracker.on_status(msg.topic, msg.payload, int(clock() * 1000), retained=msg.retain)
        await consumer.ack(msg)
