"""The fee-control service: MQTT in, the ledger core, signed commands and notifications out.

Accepts, over MQTT (through :mod:`.mqtt`):

* ``ami/v1/agg/intervals/{gateway}`` -- validated intervals from ingest
  (:func:`protocols.aggregates.decode_intervals`; a JSON duplicate key is refused). The topic's
  gateway must be a valid id and equal the payload's. Each record of quantity 1
  (``energy_fwd_active_total``) of an enrolled meter is checked against ``[service.limits]``
  (:meth:`~.config.LimitSettings.interval_refusal`) and charged, in its own transaction, with
  :meth:`FeeController.charge_interval` (``gateway=``: only the meter's enrolled gateway may
  charge it), estimated when its flags carry ``Flag.ESTIMATED``. An interval flagged with a
  ``protocols.flags.NOT_BILLABLE`` bit (spike, went backwards, meter replaced, fast running,
  stopped) has no billable consumption and is not charged. Other meters are skipped.
* ``ami/v1/agg/alarms`` -- ingest's alarms (:mod:`protocols.alarms`): an area outage is
  journaled as one ``OUTAGE_DETECTED`` notice per account with a meter in that area, and notified.
* ``ami/v1/{gateway}/up/cmd-result`` -- results signed by the edge. They are decoded with that
  gateway's key; a result that does not verify, or names another gateway, is rejected, never
  matched. A verified one goes to :meth:`FeeController.on_result`, and a ``done`` relay result's
  read-back (``relay_state``) to :meth:`FeeController.on_relay_status`.

Each message is handled in isolation (:meth:`FeeControlService.handle_message`): whatever fails
while handling it, or one interval of it, is caught there, counted
(``amigw_feectl_rejected_total{reason}``), logged once with the message's identity (topic,
gateway, meter, payload digest) and kept with its reason in the ledger's rejects table; the
message is then acknowledged. Only an unavailable ledger (``sqlite3.OperationalError``) leaves a
message to be retried, and an interval with no tariff in force leaves it unacknowledged.

A message is acknowledged (manual PUBACK) only after every ledger transaction it caused has
committed, so a crash before that makes the broker redeliver it; redelivery is harmless because
charging is exactly-once per (meter, interval) in the ledger's schema, a repeated result is
journaled as ``COMMAND_RESULT_IGNORED``, and a rejected message is rejected again.

Publishes:

* signed commands on ``ami/v1/{gateway}/down/cmd``, QoS 1. Commands are written to the ledger in
  the transaction of the decision that wants them, *before* anything is sent; the service sends
  every ``ISSUED`` command that this process has not sent yet, and resends it, with the same id,
  every ``resend_interval_s`` until a result arrives or it expires. After a crash the restarted
  process therefore resends exactly the commands decided before it, never new ones (FC-11).
* notifications (:mod:`.notify`): derived from the journal into the ledger's outbox and
  delivered by each configured notifier (``ami/v1/agg/notifications`` QoS 1, webhooks) on its
  own, retried with back-off; nothing decided before a crash is lost.

Every ``tick_interval_s`` the core's :meth:`FeeController.tick` expires overdue commands and
re-evaluates every account. The core runs on the event loop's thread (one SQLite connection;
each call is one short transaction), so calls never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ingest.mqtt.consumer import MqttConsumer
from protocols import topics
from protocols.aggregates import INTERVALS_MAGIC, MAX_MESSAGE_BYTES, IntervalRecord, decode_intervals
from protocols.alarms import MAX_ALARM_BYTES, decode_alarm
from protocols.commands import Command as SignedCommand
from protocols.commands import decode_result
from protocols.errors import ConfigError, PayloadError, TransportError
from protocols.flags import NOT_BILLABLE, Flag
from protocols.quantities import ENERGY_FORWARD

from ._log import kv
from .config import ServiceConfig
from .engine import FeeController
from .lifecycle import RelayOrderResult
from .metrics import FeeControlMetrics, serve
from .model import ORDER_ACTIONS, ChargeStatus, Decision, FeeControlError, PaymentResult, check_area
from .mqtt import consumer_config, publisher
from .notify import OUTAGE_DETECTED, OUTAGE_PLANNED, MqttNotifier, Notifier, Outbox, WebhookNotifier
from .sqlite_store import SqliteLedgerStore
from .store import JournalEntry, JournalKind, Reject

__all__ = [
    "FeeControlService",
    "OutageNotice",
    "Publisher",
    "ServiceStats",
    "install_signal_handlers",
    "wall_ms",
]

log = logging.getLogger("amigw.feectl")

_PRUNE_EVERY_MS = 3_600_000  # delivered notifications older than keep_days are pruned hourly
_NOTIFY_IDLE_S = 60.0  # a notifier loop with nothing to do looks at the outbox again after this
REJECT_PAYLOAD_BYTES = 1024  # the first bytes of a rejected message kept in the rejects table
_DETAIL_CHARS = 300  # a reject's detail, and ids taken from the payload, are cut to this


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _cut(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "..."


@dataclass(slots=True)
class _Inbound:
    """One message being handled, and what of it was rejected."""

    topic: str
    payload: bytes
    now_ms: int
    gateway: str | None = None
    rejects: list[Reject] = field(default_factory=list)
    _digest: str = ""

    @property
    def digest(self) -> str:
        if not self._digest:
            self._digest = hashlib.sha256(self.payload).hexdigest()
        return self._digest


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise PayloadError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _decode_intervals_strict(payload: bytes) -> tuple[str, int, list[IntervalRecord]]:
    """:func:`decode_intervals`, but a JSON message with a duplicate key (which value would count?)
    is refused, not read last-wins. Raises: PayloadError."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise PayloadError(f"intervals: {len(payload)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte bound")
    if payload[:3] != INTERVALS_MAGIC[:3]:
        try:
            json.loads(payload, object_pairs_hook=_refuse_duplicate_keys)
        except PayloadError:
            raise
        except (ValueError, RecursionError) as exc:
            raise PayloadError(f"intervals message: {type(exc).__name__}: {_cut(str(exc))}") from None
    return decode_intervals(payload)


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes) -> None: ...


@dataclass(slots=True)
class ServiceStats:
    """Counters (STYLE H12), served by ``GET /healthz``."""

    messages: int = 0
    intervals_charged: int = 0
    intervals_duplicate: int = 0
    intervals_skipped: int = 0  # other quantities, meters not under fee control
    intervals_not_billable: int = 0  # flagged with a NOT_BILLABLE bit: charged nothing
    intervals_unpriced: int = 0  # no tariff in force: message left unacknowledged
    payloads_invalid: int = 0
    rejected: int = 0  # messages and intervals rejected (the rejects table has each reason)
    results_accepted: int = 0
    results_ignored: int = 0
    results_unverified: int = 0
    commands_sent: int = 0
    commands_resent: int = 0
    publish_failures: int = 0
    payments: int = 0
    ticks: int = 0


@dataclass(frozen=True, slots=True)
class OutageNotice:
    """What :meth:`FeeControlService.announce_outage` did: the accounts of the area, and whether
    this call announced it (False: the same outage was announced before; nothing is sent again)."""

    area: str
    start_ms: int
    end_ms: int
    accounts: tuple[str, ...]
    announced: bool


class FeeControlService:
    """The running service. ``await run()`` until :meth:`stop`; the handlers below are also the
    seams the ops API (:mod:`ingest.ops`) and the tests use."""

    def __init__(
        self,
        cfg: ServiceConfig,
        controller: FeeController | None = None,
        *,
        clock: Callable[[], int] = wall_ms,
        publisher: Publisher | None = None,
        notifiers: Sequence[Notifier] | None = None,
    ) -> None:
        """``notifiers`` replaces the ones ``[service.notify]`` configures (tests)."""
        self.cfg = cfg
        if controller is None:
            controller = FeeController(SqliteLedgerStore(cfg.db_path), cfg.feectl, cfg.tariffs)
        self.controller = controller
        self.clock = clock
        self.stats = ServiceStats()
        self.metrics = FeeControlMetrics()
        self.metrics_address: tuple[str, int] | None = None
        self._enrolled: dict[str, str] | None = None
        self._ratings: dict[str, int] = {}  # meter -> max_power_w enrolled with it
        self.publisher = publisher
        self.api_address: tuple[str, int] | None = None
        self.consumer: MqttConsumer | None = None
        self._keys = dict(cfg.command_keys)
        self._sent: dict[str, int] = {}  # command id -> when this process last sent it
        if notifiers is None:
            notifiers = self._configured_notifiers()
        self.outbox = Outbox(controller.store, notifiers, cfg.service.notify, self.metrics, clock)
        self._note_kicks = {n.name: asyncio.Event() for n in self.outbox.notifiers}
        self._pruned_ms = 0
        self._kick = asyncio.Event()
        self._stop = asyncio.Event()
        self._link_down = False

    def _configured_notifiers(self) -> list[Notifier]:
        out: list[Notifier] = []
        notify = self.cfg.service.notify
        if notify.mqtt:
            out.append(MqttNotifier(lambda: self.publisher))
        for w in notify.webhook:
            secret = self.cfg.webhook_secrets.get(w.name)
            out.append(WebhookNotifier(w.name, w.url, secret=secret, timeout_s=w.timeout_s))
        return out

    # -- enrolment ----------------------------------------------------------------------------
    def enroll(self) -> int:
        """Apply the configuration file's accounts (``[[service.accounts]]``), each only when it
        is new or was edited since the file was last applied
        (:meth:`FeeController.file_enrolment_due`): an unchanged entry leaves the account as the
        operations (:mod:`.operations`) left it. Returns how many accounts changed.

        Raises:
            ConfigError: an entry the ledger refuses (a meter of another account, a removed meter
                with a command outstanding or its relay not closed), naming ``service.accounts[i]``.
        """
        now = self.clock()
        changed = 0
        for i, a in enumerate(self.cfg.accounts):
            if not self.controller.file_enrolment_due(a):
                continue
            try:
                res = self.controller.enrol(a, now, by="config", code="FILE", evaluate=False, record=True)
            except FeeControlError as exc:
                raise ConfigError(f"service.accounts[{i}]", str(exc)) from None
            changed += res.changed
        self._enrolled = None
        return changed

    def _enrolled_meters(self) -> dict[str, str]:
        """Meter -> enrolled gateway, for every meter in the ledger (read again after every
        enrolment, :meth:`accounts_changed`), with the meters' ratings."""
        if self._enrolled is None:
            store = self.controller.store
            with store.transaction():
                refs = [m for a in store.account_ids() for m in store.account(a).meters]
            self._ratings = {m.meter: m.max_power_w for m in refs if m.max_power_w is not None}
            self._enrolled = {m.meter: m.gateway for m in refs}
        return self._enrolled

    # -- inbound MQTT -------------------------------------------------------------------------
    def handle_message(self, topic: str, payload: bytes, *, oversize: int = 0) -> bool:
        """Apply one message to the ledger, isolated from every other message. True: done (applied,
        ignored, or rejected with its reason in the rejects table): acknowledge it. False: an
        interval had no tariff in force; leave the message unacknowledged (redelivered next session).

        Whatever the message holds, the only exception that leaves is the ledger being unavailable.
        ``oversize`` is the full length of a message the consumer refused to buffer (``payload`` is
        then its first bytes, :data:`~ingest.mqtt.consumer.OVERSIZE_PREFIX_BYTES`): rejected
        ``too_large`` unread.

        Raises:
            sqlite3.OperationalError: the ledger failed (transient: the caller retries the message).
        """
        self.stats.messages += 1
        msg = _Inbound(topic, payload, self.clock())
        kind = "other"
        try:
            if oversize:
                result = self._reject(msg, "too_large", f"{oversize} bytes, over {MAX_MESSAGE_BYTES}")
            elif (gateway := topics.agg_gateway_of("intervals", topic)) is not None:
                kind = "intervals"
                result = self._on_intervals(msg, gateway)
            elif (gateway := topics.cmd_result_gateway_of(topic)) is not None:
                kind = "cmd_result"
                result = self._on_result(msg, gateway)
            elif topic == topics.ALARMS:
                kind = "alarms"
                result = self._on_alarm(msg)
            else:
                result = self._reject(msg, "bad_topic", "not a topic fee control consumes")
        except sqlite3.OperationalError:
            raise
        except Exception as exc:  # a bug, or input no rule foresaw: contained to this message
            result = self._reject(msg, "internal_error", f"{type(exc).__name__}: {exc}", exc_info=True)
        if msg.rejects:
            store = self.controller.store
            with store.transaction():
                store.add_rejects(msg.rejects, self.cfg.service.rejects_keep)
        self.metrics.messages.labels(kind, result).inc()
        return result != "unpriced"

    def _reject(
        self,
        msg: _Inbound,
        reason: str,
        detail: str,
        *,
        meter: str | None = None,
        start_ms: int | None = None,
        exc_info: bool = False,
    ) -> str:
        """Reject the message (or one interval of it): counted, logged once, kept with its reason."""
        meter = None if meter is None else _cut(meter)
        r = Reject(
            msg.now_ms,
            msg.topic,
            reason,
            _cut(detail),
            msg.digest,
            msg.payload[:REJECT_PAYLOAD_BYTES],
            len(msg.payload),
            msg.gateway,
            meter,
            start_ms,
        )
        msg.rejects.append(r)
        self.stats.rejected += 1
        self.metrics.rejected.labels(reason).inc()
        fields = kv(
            reason=reason,
            topic=_cut(msg.topic),
            gateway=msg.gateway,
            meter=meter,
            interval_start_ms=start_ms,
            digest=msg.digest,
            bytes=len(msg.payload),
            detail=r.detail,
        )
        log.warning("message rejected", exc_info=exc_info, extra=fields)
        return "rejected"

    def _on_intervals(self, msg: _Inbound, topic_gateway: str) -> str:
        why = topics.check_gateway_id(topic_gateway)
        if why is not None:
            return self._reject(msg, "bad_topic", f"gateway level: {why}")
        try:
            gateway, seq, records = _decode_intervals_strict(msg.payload)
        except PayloadError as exc:
            self.stats.payloads_invalid += 1
            reason = "too_large" if len(msg.payload) > MAX_MESSAGE_BYTES else "undecodable"
            return self._reject(msg, reason, str(exc))
        msg.gateway = _cut(topic_gateway)
        if gateway != topic_gateway:
            return self._reject(msg, "gateway_mismatch", f"payload names gateway {_cut(gateway)!r}")
        with self.controller.store.transaction():  # one commit per message, a savepoint per interval
            outcomes = [self._charge(msg, r, seq) for r in records]
        if "unpriced" in outcomes:
            return "unpriced"
        if outcomes and all(o == "rejected" for o in outcomes):
            return "rejected"
        return "applied"

    def _charge(self, msg: _Inbound, r: IntervalRecord, seq: int) -> str:
        """One interval: skipped, charged, rejected (bounds, gateway binding, anything unforeseen)
        or unpriced. Its own savepoint of the message's transaction: an interval that fails
        leaves no trace, and the intervals beside it are not lost with it."""
        enrolled = self._enrolled_meters()
        if r.quantity != ENERGY_FORWARD or r.meter not in enrolled:  # most meters are not prepaid
            self.stats.intervals_skipped += 1
            self.metrics.charges.labels("skipped").inc()
            return "skipped"
        limits = self.cfg.service.limits
        refusal = limits.interval_refusal(
            r.start_ms, r.end_ms, r.energy, self._ratings.get(r.meter, limits.max_power_w), msg.now_ms
        )
        if refusal is not None:
            return self._reject(msg, *refusal, meter=r.meter, start_ms=r.start_ms)
        if r.flags & NOT_BILLABLE:  # no billable consumption (docs/rules.md): nothing to charge
            self.stats.intervals_not_billable += 1
            self.metrics.charges.labels("not_billable").inc()
            return "skipped"
        estimated = bool(r.flags & Flag.ESTIMATED)
        try:
            res = self.controller.charge_interval(
                r.meter, r.start_ms, r.end_ms, r.energy, estimated, msg.now_ms, gateway=msg.gateway
            )
        except FeeControlError as exc:  # gateway_mismatch; unknown_meter if unenrolled since
            return self._reject(msg, exc.reason, str(exc), meter=r.meter, start_ms=r.start_ms)
        except ConfigError as exc:  # no tariff version in force: an operator must fix it
            self.stats.intervals_unpriced += 1
            fields = kv(gateway=msg.gateway, seq=seq, meter=r.meter, interval_start_ms=r.start_ms, reason=exc)
            log.error("interval not priced", extra=fields)
            return "unpriced"
        except sqlite3.OperationalError:
            raise
        except Exception as exc:  # ValueError and anything unforeseen: this interval only
            why = f"{type(exc).__name__}: {exc}"
            unforeseen = not isinstance(exc, ValueError)
            reason = "internal_error" if unforeseen else "invalid_interval"
            return self._reject(msg, reason, why, meter=r.meter, start_ms=r.start_ms, exc_info=unforeseen)
        if res.status is ChargeStatus.DUPLICATE:
            self.stats.intervals_duplicate += 1
        else:
            self.stats.intervals_charged += 1
        self.metrics.charges.labels(res.status.value).inc()
        self._decided(res.decisions)
        return "charged"

    def _on_alarm(self, msg: _Inbound) -> str:
        """An OUT-02 area-outage alarm from ingest: one ``OUTAGE_DETECTED`` notice per account of
        the area (``ref`` ``detected:<area>:<ts_ms>``: a redelivered alarm notifies nobody again).
        An area with no enrolled meter is ignored."""
        try:
            alarm = decode_alarm(msg.payload)
        except PayloadError as exc:
            self.stats.payloads_invalid += 1
            reason = "too_large" if len(msg.payload) > MAX_ALARM_BYTES else "undecodable"
            return self._reject(msg, reason, str(exc))
        detail = {
            "area": alarm.area,
            "start_ms": alarm.ts_ms,
            "end_ms": None,
            "reason": "power_down_events",
            "events": alarm.events,
        }
        ref = f"detected:{alarm.area}:{alarm.ts_ms}"
        accounts, new = self._area_notice(OUTAGE_DETECTED, alarm.area, ref, detail)
        if new:
            log.info(
                "area outage notified", extra=kv(area=alarm.area, ts_ms=alarm.ts_ms, accounts=len(accounts))
            )
        return "applied" if accounts else "ignored"

    def _on_result(self, msg: _Inbound, gateway: str) -> str:
        msg.gateway = _cut(gateway)
        key = self._keys.get(gateway)
        if key is None:
            self.stats.results_unverified += 1
            return self._reject(msg, "unknown_gateway", "no command key for this gateway")
        try:
            r = decode_result(msg.payload, key)
        except PayloadError as exc:
            self.stats.results_unverified += 1
            return self._reject(msg, "unverified", str(exc))
        if r.gateway != gateway:
            return self._reject(msg, "gateway_mismatch", f"result names gateway {_cut(r.gateway)!r}")
        if r.action not in ORDER_ACTIONS or (r.status == "rejected" and r.reason == "replayed"):
            # Not a relay command of ours; or the edge had already finished this id and its real
            # result came before: failing the command on this answer would count a false attempt.
            self.stats.results_ignored += 1
            log.info(
                "cmd-result ignored", extra=kv(gateway=gateway, id=r.id, action=r.action, reason=r.reason)
            )
            return "ignored"
        detail = (r.reason or r.detail) if r.status == "rejected" else r.detail
        relay_open = None if r.relay_state not in (0, 1) else r.relay_state == 1
        try:
            result = RelayOrderResult(r.id, r.gateway, r.meter, r.status, detail, relay_open)
        except ValueError as exc:
            return self._reject(msg, "invalid_result", str(exc), meter=r.meter)
        outcome = self.controller.on_result(result, msg.now_ms)  # the result and its read-back
        self._decided(outcome.decisions)
        if outcome.accepted:
            self.stats.results_accepted += 1
        else:
            self.stats.results_ignored += 1
        return "applied" if outcome.accepted else "ignored"

    # -- payments and views (the HTTP API) -------------------------------------------------------
    def record_payment(self, account_id: str, payment_id: str, amount_fen: int) -> tuple[PaymentResult, int]:
        """Post a payment and re-evaluate at once; commands it causes are sent without waiting for
        the next tick. Returns the result and the payment time (ms) as recorded in the journal.

        Raises:
            FeeControlError: ``unknown_account`` or ``payment_conflict``.
            ValueError: ``amount_fen <= 0``.
        """
        now = self.clock()
        res = self.controller.record_payment(account_id, payment_id, amount_fen, now)
        self.metrics.payments.labels("recorded" if res.recorded else "repeated").inc()
        if res.recorded:
            self.stats.payments += 1
            log.info(
                "payment recorded", extra=kv(account=account_id, payment_id=payment_id, amount_fen=amount_fen)
            )
            self._decided(res.decisions)
            return res, now
        store = self.controller.store
        with store.transaction():
            entry = store.find_ref(JournalKind.PAYMENT, payment_id)
        return res, entry.ts_ms if entry is not None else now

    def account_view(self, account_id: str) -> dict[str, Any]:
        """Balance and state of one account. Raises: FeeControlError ``unknown_account``."""
        store = self.controller.store
        with store.transaction():
            account = store.account(account_id)
            b = store.balance(account_id)
            level, notice_ms = store.notification_state(account_id)
            meters = store.meter_snapshots(account_id)
            holds = store.holds(account_id)
        return {
            "account": account.account_id,
            "tariff": account.tariff_id,
            "protected": account.protected,
            "customer_class": account.customer_class,
            "balance_fen": b.balance_fen,
            "actual_balance_fen": b.actual_balance_fen,
            "level": level.name,
            "notice_ms": notice_ms,
            "holds": [h.reason for h in holds],
            "meters": [
                {
                    "meter": m.ref.meter,
                    "gateway": m.ref.gateway,
                    "remote": m.ref.remote,
                    "relay": m.relay.value,
                    "outstanding": None if m.outstanding is None else m.outstanding.value,
                    "blocked": m.blocked_reason,
                }
                for m in meters
            ],
        }

    def journal_view(self, account_id: str, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` journal rows of an account, oldest first.

        Raises: FeeControlError ``unknown_account``.
        """
        store = self.controller.store
        with store.transaction():
            store.account(account_id)
            rows = list(store.journal(account_id))[-limit:] if limit else []
        out = []
        for e in rows:
            row = asdict(e)
            row["kind"] = e.kind.value
            row["reasons"] = list(e.reasons)
            row["detail"] = json.loads(e.detail) if e.detail else {}
            out.append(row)
        return out

    def health(self) -> dict[str, Any]:
        pending, per = self.outbox.pending()
        return {
            "status": "ok",
            "mqtt_publisher": getattr(self.publisher, "connected", None),
            "pending_notifications": pending,
            "notifications": {
                name: {"pending": per.get(name, 0), **counts} for name, counts in self.outbox.counts.items()
            },
            "commands_awaiting_result": len(self._sent),
            "stats": asdict(self.stats),
        }

    # -- outbound -----------------------------------------------------------------------------
    def _decided(self, decisions: Sequence[Decision]) -> None:
        for d in decisions:
            self.metrics.decisions.labels(d.kind.value).inc()
            log.info(
                "decision",
                extra=kv(
                    kind=d.kind.value,
                    account=d.account_id,
                    meter=d.meter,
                    reasons=",".join(d.reasons),
                    balance_fen=d.balance_fen,
                    action=None if d.action is None else d.action.value,
                    command_id=d.command_id,
                ),
            )
            if d.command_id is not None:
                self._kick.set()
        if not decisions:
            return
        try:
            if self.outbox.collect():
                self.kick_notifiers()
        except sqlite3.OperationalError as exc:  # the journal has them: the control loop collects later
            log.error("notifications not collected yet", extra=kv(reason=exc))

    def kick(self) -> None:
        """Wake the control loop now (new commands or notifications to send)."""
        self._kick.set()
        self.kick_notifiers()

    def kick_notifiers(self) -> None:
        """Wake every notifier's delivery loop (new notifications in the outbox)."""
        for ev in self._note_kicks.values():
            ev.set()

    def tick(self) -> None:
        now = self.clock()
        ev = self.controller.tick(now)
        self.stats.ticks += 1
        self._decided(ev.decisions)
        if now - self._pruned_ms >= _PRUNE_EVERY_MS:
            self._pruned_ms = now
            self.outbox.prune()

    # -- notices ------------------------------------------------------------------------------
    def announce_outage(self, area: str, start_ms: int, end_ms: int, reason: str, by: str) -> OutageNotice:
        """Announce a planned outage of transformer area ``area`` from ``start_ms`` to ``end_ms``:
        one ``OUTAGE_PLANNED`` notice per account with a meter in the area, journaled (kind
        ``notice``, ``ref`` ``outage:<area>:<start_ms>:<end_ms>``) and put in the outbox in one
        transaction. Announcing the same area and times again changes nothing.

        Raises:
            FeeControlError: ``unknown_area`` when no enrolled meter is in ``area``.
            ValueError: a bad area name, ``end_ms <= start_ms``, an empty ``reason`` or ``by``.
        """
        why = check_area(area)
        if why is not None:
            raise ValueError(f"area: {why}")
        if end_ms <= start_ms:
            raise ValueError("end_ms: must be after start_ms")
        if not reason.strip() or not by.strip():
            raise ValueError("reason: reason and by must not be empty")
        ref = f"outage:{area}:{start_ms}:{end_ms}"
        detail = {"area": area, "start_ms": start_ms, "end_ms": end_ms, "reason": reason, "by": by}
        accounts, announced = self._area_notice(OUTAGE_PLANNED, area, ref, detail)
        if not accounts:
            raise FeeControlError("unknown_area", area, "no enrolled meter is in this area")
        if announced:
            log.info(
                "outage announced",
                extra=kv(area=area, start_ms=start_ms, end_ms=end_ms, accounts=len(accounts), by=by),
            )
        return OutageNotice(area, start_ms, end_ms, accounts, announced)

    def _area_notice(
        self, code: str, area: str, ref: str, detail: dict[str, Any]
    ) -> tuple[tuple[str, ...], bool]:
        """Journal one ``code`` notice per account of ``area`` (none if ``ref`` is already there)
        and put them in the outbox, in one transaction. Returns the area's accounts and whether
        anything was journaled."""
        store = self.controller.store
        with store.transaction():
            accounts = tuple(store.accounts_in_area(area))
            if not accounts or store.find_ref(JournalKind.NOTICE, ref) is not None:
                return accounts, False
            now, text = self.clock(), json.dumps(detail, separators=(",", ":"))
            for account_id in accounts:
                store.append(JournalEntry(now, account_id, JournalKind.NOTICE, code, ref=ref, detail=text))
            self.outbox.collect()  # joins this transaction: the notices and their outbox rows commit together
        self.kick_notifiers()
        return accounts, True

    async def flush(self, *, notes: bool = True) -> None:
        """Send ``ISSUED`` commands not yet sent (or due for a resend), stopping at the first
        transport failure (the next flush carries on); then, unless ``notes`` is False, collect
        and deliver notifications (every notifier until its queue is empty or must wait)."""
        await self._send_commands()
        if notes:
            self.outbox.collect()
            await self.outbox.deliver_all()

    async def _send_commands(self) -> None:
        if self.publisher is None:
            return
        now = self.clock()
        pending = self.controller.pending_commands(now)
        live = {c.command_id for c in pending}
        for cid in [c for c in self._sent if c not in live]:
            del self._sent[cid]
        resend_ms = int(self.cfg.service.resend_interval_s * 1000)
        try:
            for c in pending:
                last = self._sent.get(c.command_id)
                if last is not None and now - last < resend_ms:
                    continue
                key = self._keys.get(c.gateway)
                fields = kv(
                    id=c.command_id,
                    gateway=c.gateway,
                    meter=c.meter,
                    action=c.action.value,
                    attempt=c.attempt,
                )
                if key is None:  # load_service_config refuses this for configured accounts
                    log.error("command not sent: no key for its gateway", extra=fields)
                    continue
                payload = SignedCommand(**c.fields()).signed(key)  # type: ignore[arg-type]
                await self.publisher.publish(topics.command(c.gateway), payload)
                self._sent[c.command_id] = now
                self.metrics.commands_sent.labels(c.action.value, "first" if last is None else "resend").inc()
                if last is None:
                    self.stats.commands_sent += 1
                    log.info("command sent", extra=fields)
                else:
                    self.stats.commands_resent += 1
        except TransportError as exc:
            self.stats.publish_failures += 1
            self.metrics.publish_failures.inc()
            if not self._link_down:
                log.error("publish failed", extra=kv(reason=exc))
            self._link_down = True
            return
        if self._link_down:
            log.info("publish recovered")
        self._link_down = False

    # -- loops --------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, ready: Callable[[FeeControlService], None] | None = None) -> None:
        """Enrol accounts, start the API, the publisher and the subscriber, and run until
        :meth:`stop`. ``ready`` is called once everything is listening."""
        from ingest.ops.app import OpsSettings, build_app, serving
        from ingest.ops.routes_views import VIEWS, open_views

        self.enroll()
        async with contextlib.AsyncExitStack() as stack:
            if self.cfg.service.metrics_listen:
                metrics_server = serve(self.metrics, self.cfg.service.metrics_listen)
                stack.callback(metrics_server.server_close)
                stack.callback(metrics_server.shutdown)
                host, port = metrics_server.server_address[:2]
                self.metrics_address = (str(host), int(port))
                log.info("metrics listening", extra=kv(host=host, port=port))
            if self.publisher is None:
                self.publisher = await stack.enter_async_context(publisher(self.cfg))
            http = self.cfg.service.http
            if http.enabled:
                app = build_app(self, OpsSettings(self.cfg.api_tokens, http.max_body_bytes))
                app[VIEWS] = await stack.enter_async_context(open_views(self.cfg, self.cfg.mqtt.client_id))
                self.api_address = await stack.enter_async_context(serving(app, http.host, http.port))
                log.info("http api listening", extra=kv(host=self.api_address[0], port=self.api_address[1]))
            stack.push_async_callback(self.outbox.aclose)
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._consume_loop(), name="feectl-consume"),
                    tg.create_task(self._control_loop(), name="feectl-control"),
                ]
                tasks += [
                    tg.create_task(self._notify_loop(n), name=f"feectl-notify-{n.name}")
                    for n in self.outbox.notifiers
                ]
                if ready is not None:
                    ready(self)
                await self._stop.wait()
                for t in tasks:
                    t.cancel()
        self.controller.store.close()

    async def _control_loop(self) -> None:
        tick_ms = int(self.cfg.service.tick_interval_s * 1000)
        next_tick = 0
        while True:
            if self.clock() >= next_tick:
                try:
                    self.tick()
                except Exception as exc:  # the next tick tries again; the service stays up
                    log.error("tick failed", exc_info=True, extra=kv(reason=exc))
                next_tick = self.clock() + tick_ms
            try:
                await self.flush(notes=False)  # each notifier has its own loop (_notify_loop)
                if self.outbox.collect():
                    self.kick_notifiers()
            except Exception as exc:
                log.error("flush failed", exc_info=True, extra=kv(reason=exc))
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0, next_tick - self.clock()) / 1000):
                    await self._kick.wait()

    async def _notify_loop(self, notifier: Notifier) -> None:
        """Deliver ``notifier``'s outbox until stopped: woken by new notifications, or at the time
        its head may be retried. A notifier's failure or slowness holds back no other loop."""
        kick = self._note_kicks[notifier.name]
        while True:
            kick.clear()
            wait_s: float = _NOTIFY_IDLE_S
            try:
                due = await self.outbox.deliver(notifier)
                if due is not None:
                    wait_s = max(0.0, (due - self.clock()) / 1000)
            except Exception as exc:  # the ledger, or a bug: try again after a pause
                fields = kv(notifier=notifier.name, reason=exc)
                log.error("notification delivery failed", exc_info=True, extra=fields)
                wait_s = 1.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await kick.wait()

    async def _consume_loop(self) -> None:
        """Connect (retrying), then apply and acknowledge each message in order. A ledger error
        retries the same message with back-off: nothing later is acknowledged first (H8)."""
        delay = 1.0
        while True:
            try:
                async with MqttConsumer(consumer_config(self.cfg)) as consumer:
                    self.consumer = consumer
                    delay = 1.0
                    async for msg in consumer:
                        if await self._apply(msg.topic, msg.payload, msg.oversize):
                            await consumer.ack(msg)
                return
            except TransportError as exc:
                log.error("mqtt subscribe failed", extra=kv(reason=exc, retry_s=delay))
            finally:
                self.consumer = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _apply(self, topic: str, payload: bytes, oversize: int = 0) -> bool:
        delay = 0.5
        while True:
            try:
                return self.handle_message(topic, payload, oversize=oversize)
            except sqlite3.OperationalError as exc:
                log.error("ledger write failed", extra=kv(topic=_cut(topic), reason=exc, retry_s=delay))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    # -- hooks for the operations (ingest/feectl/operations.py) --------------------------------
    def accounts_changed(self) -> None:
        """An enrolment changed: the next interval reads the meters and ratings from the ledger."""
        self._enrolled = None

    def apply_decisions(self, decisions: Sequence[Decision]) -> None:
        """Decisions an operation took: logged, counted, notified, and their commands sent now."""
        self._decided(decisions)
        self.kick()


def install_signal_handlers(service: FeeControlService) -> None:
    """SIGTERM and SIGINT stop the service cleanly (subscriptions closed, ledger closed)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
