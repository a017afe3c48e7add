"""The fee-control service: MQTT in, the ledger core, signed commands and notifications out.

Accepts, over MQTT (through :mod:`.mqtt`):

* ``ami/v1/agg/intervals/{gateway}`` -- validated intervals from ingest
  (:func:`protocols.aggregates.decode_intervals`). Each record of quantity 1
  (``energy_fwd_active_total``) is charged with :meth:`FeeController.charge_interval`, estimated
  when its flags carry ``Flag.ESTIMATED``. Meters not enrolled in fee control are skipped.
* ``ami/v1/{gateway}/up/cmd-result`` -- results signed by the edge. They are decoded with that
  gateway's key; a result that does not verify is logged and dropped, never matched. A verified
  one goes to :meth:`FeeController.on_result`, and a ``done`` relay result's read-back
  (``relay_state``) to :meth:`FeeController.on_relay_status`.

A message is acknowledged (manual PUBACK) only after every ledger transaction it caused has
committed, so a crash before that makes the broker redeliver it; redelivery is harmless because
charging is exactly-once per (meter, interval) in the ledger's schema and a repeated result is
journaled as ``COMMAND_RESULT_IGNORED``.

Publishes:

* signed commands on ``ami/v1/{gateway}/down/cmd``, QoS 1. Commands are written to the ledger in
  the transaction of the decision that wants them, *before* anything is sent; the service sends
  every ``ISSUED`` command that this process has not sent yet, and resends it, with the same id,
  every ``resend_interval_s`` until a result arrives or it expires. After a crash the restarted
  process therefore resends exactly the commands decided before it, never new ones (FC-11).
* notifications (:func:`notification`) on ``ami/v1/agg/notifications``, QoS 1, best effort: the
  journal is the record; a notification decided just before a crash may be lost.

Every ``tick_interval_s`` the core's :meth:`FeeController.tick` expires overdue commands and
re-evaluates every account. The core runs on the event loop's thread (one SQLite connection;
each call is one short transaction), so calls never interleave.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import signal
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from ingest.mqtt_consumer import MqttConsumer
from protocols.aggregates import decode_intervals
from protocols.commands import Command as SignedCommand
from protocols.commands import decode_result
from protocols.errors import AmigwError, ConfigError, PayloadError, TransportError
from protocols.flags import Flag

from .config import ServiceConfig
from .engine import FeeController
from .lifecycle import CommandResult
from .model import ChargeStatus, Decision, DecisionKind, FeeControlError, PaymentResult
from .mqtt import (
    INTERVALS_FILTER,
    NOTIFICATIONS_TOPIC,
    MqttPublisher,
    command_topic,
    consumer_config,
    gateway_of_result_topic,
)
from .sqlite_store import SqliteLedgerStore
from .store import JournalKind

__all__ = [
    "ENERGY_QUANTITY",
    "FeeControlService",
    "Publisher",
    "ServiceStats",
    "install_signal_handlers",
    "notification",
    "wall_ms",
]

log = logging.getLogger("amigw.feectl")

ENERGY_QUANTITY = 1  # protocols.quantities: energy_fwd_active_total, 0.01 kWh
RELAY_ACTIONS = frozenset({"trip", "close_allowed"})  # the only commands fee control issues
NOTIFICATION_QUEUE_MAX = 10_000
_SEVERITY: dict[DecisionKind, tuple[str, str]] = {
    DecisionKind.ALARM1: ("balance", "warning"),
    DecisionKind.ALARM2: ("balance", "warning"),
    DecisionKind.ZERO_NOTICE: ("balance", "critical"),
    DecisionKind.RECOVERED: ("balance", "info"),
    DecisionKind.RESTORE_DEFERRED: ("balance", "warning"),
    DecisionKind.TRIP_ISSUED: ("supply", "critical"),
    DecisionKind.RESTORE_ISSUED: ("supply", "info"),
    DecisionKind.RESTORE_CONFIRMED: ("supply", "info"),
    DecisionKind.FAILED: ("command", "warning"),
    DecisionKind.EXPIRED: ("command", "warning"),
    DecisionKind.UNCONFIRMED: ("command", "warning"),
    DecisionKind.COMMAND_FAILED: ("command", "critical"),
    DecisionKind.METER_IN_PROTECT: ("command", "critical"),
}


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None: ...


@dataclass(slots=True)
class ServiceStats:
    """Counters (STYLE H12), served by ``GET /healthz``."""

    messages: int = 0
    intervals_charged: int = 0
    intervals_duplicate: int = 0
    intervals_skipped: int = 0  # other quantities, meters not under fee control, invalid values
    intervals_unpriced: int = 0  # no tariff in force: message left unacknowledged
    payloads_invalid: int = 0
    results_accepted: int = 0
    results_ignored: int = 0
    results_unverified: int = 0
    commands_sent: int = 0
    commands_resent: int = 0
    notifications_sent: int = 0
    notifications_dropped: int = 0
    publish_failures: int = 0
    payments: int = 0
    ticks: int = 0


def notification(d: Decision, ts_ms: int) -> dict[str, Any] | None:
    """The JSON object published for a decision, or None when the decision is not notified.

    ``{"v": 1, "type": "feectl-notification", "ts_ms", "kind", "category", "severity",
    "account", "meter", "reasons", "balance_fen", "actual_balance_fen", "action", "command_id"}``.
    """
    cs = _SEVERITY.get(d.kind)
    if cs is None:
        return None
    if d.kind is DecisionKind.RESTORE_DEFERRED and "BALANCE_NOT_ABOVE_RESTORE" not in d.reasons:
        return None  # waiting for a command in flight or a retry is not news to the customer
    return {
        "v": 1,
        "type": "feectl-notification",
        "ts_ms": ts_ms,
        "kind": d.kind.value,
        "category": cs[0],
        "severity": cs[1],
        "account": d.account_id,
        "meter": d.meter,
        "reasons": list(d.reasons),
        "balance_fen": d.balance_fen,
        "actual_balance_fen": d.actual_balance_fen,
        "action": None if d.action is None else d.action.value,
        "command_id": d.command_id,
    }


class FeeControlService:
    """The running service. ``await run()`` until :meth:`stop`; the handlers below are also the
    seams the HTTP API (:mod:`.api`) and the tests use."""

    def __init__(
        self,
        cfg: ServiceConfig,
        controller: FeeController | None = None,
        *,
        clock: Callable[[], int] = wall_ms,
        publisher: Publisher | None = None,
    ) -> None:
        self.cfg = cfg
        if controller is None:
            controller = FeeController(SqliteLedgerStore(cfg.db_path), cfg.feectl, cfg.tariffs)
        self.controller = controller
        self.clock = clock
        self.stats = ServiceStats()
        self.publisher = publisher
        self.api_address: tuple[str, int] | None = None
        self.consumer: MqttConsumer | None = None
        self._keys = dict(cfg.command_keys)
        self._sent: dict[str, int] = {}  # command id -> when this process last sent it
        self._notes: collections.deque[bytes] = collections.deque()
        self._kick = asyncio.Event()
        self._stop = asyncio.Event()
        self._link_down = False

    # -- enrolment ----------------------------------------------------------------------------
    def enroll(self) -> int:
        """Open or update the configured accounts; returns how many changed."""
        now = self.clock()
        return sum(self.controller.open_account(a, now) for a in self.cfg.accounts)

    # -- inbound MQTT -------------------------------------------------------------------------
    def handle_message(self, topic: str, payload: bytes) -> bool:
        """Apply one message to the ledger. True: committed or worthless, acknowledge it.
        False: leave it unacknowledged (the broker redelivers it on the next session).

        Raises:
            sqlite3.Error: the ledger failed (transient: the caller retries the message).
        """
        self.stats.messages += 1
        if topic.startswith(INTERVALS_FILTER[:-1]):
            return self._on_intervals(topic, payload)
        gateway = gateway_of_result_topic(topic)
        if gateway is not None:
            self._on_result(gateway, payload)
        return True

    def _on_intervals(self, topic: str, payload: bytes) -> bool:
        try:
            gateway, seq, records = decode_intervals(payload)
        except PayloadError as exc:
            self.stats.payloads_invalid += 1
            log.warning("intervals dropped topic=%s reason=%s raw=%s", topic, exc, payload[:64].hex())
            return True
        complete = True
        for r in records:
            if r.quantity != ENERGY_QUANTITY:
                self.stats.intervals_skipped += 1
                continue
            estimated = bool(r.flags & Flag.ESTIMATED)
            try:
                res = self.controller.charge_interval(
                    r.meter, r.start_ms, r.end_ms, r.energy, estimated, self.clock()
                )
            except FeeControlError:  # not enrolled: most meters are not prepaid
                self.stats.intervals_skipped += 1
                continue
            except ValueError as exc:
                self.stats.intervals_skipped += 1
                log.warning(
                    "interval refused gateway=%s seq=%s meter=%s reason=%s", gateway, seq, r.meter, exc
                )
                continue
            except ConfigError as exc:  # no tariff version in force: an operator must fix it
                self.stats.intervals_unpriced += 1
                complete = False
                log.error(
                    "interval not priced gateway=%s seq=%s meter=%s reason=%s", gateway, seq, r.meter, exc
                )
                continue
            if res.status is ChargeStatus.DUPLICATE:
                self.stats.intervals_duplicate += 1
            else:
                self.stats.intervals_charged += 1
            self._decided(res.decisions)
        return complete

    def _on_result(self, gateway: str, payload: bytes) -> None:
        key = self._keys.get(gateway)
        if key is None:
            self.stats.results_unverified += 1
            log.warning("cmd-result dropped gateway=%s reason=no_key_for_gateway", gateway)
            return
        try:
            r = decode_result(payload, key)
        except PayloadError as exc:
            self.stats.results_unverified += 1
            log.warning("cmd-result dropped gateway=%s reason=%s raw=%s", gateway, exc, payload[:64].hex())
            return
        if r.gateway != gateway or r.action not in RELAY_ACTIONS:
            self.stats.results_ignored += 1
            log.info(
                "cmd-result ignored gateway=%s id=%s claimed_gateway=%s action=%s",
                gateway,
                r.id,
                r.gateway,
                r.action,
            )
            return
        if r.status == "rejected" and r.reason == "replayed":
            # The edge already finished this id; its real result was published before. Failing the
            # command on this answer would count an attempt that did not fail.
            self.stats.results_ignored += 1
            log.info("cmd-result replayed id=%s gateway=%s meter=%s", r.id, gateway, r.meter)
            return
        detail = (r.reason or r.detail) if r.status == "rejected" else r.detail
        now = self.clock()
        outcome = self.controller.on_result(CommandResult(r.id, r.gateway, r.meter, r.status, detail), now)
        self._decided(outcome.decisions)
        if outcome.accepted:
            self.stats.results_accepted += 1
        else:
            self.stats.results_ignored += 1
        # The read-back also counts for a repeated result (a crash between the two transactions).
        if outcome.command is not None and r.status == "done" and r.relay_state in (0, 1):
            decisions = self.controller.on_relay_status(
                gateway, r.meter, r.relay_state == 1, r.action == "trip", self.clock()
            )
            self._decided(decisions)

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
        if res.recorded:
            self.stats.payments += 1
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
        return {
            "status": "ok",
            "mqtt_publisher": getattr(self.publisher, "connected", None),
            "pending_notifications": len(self._notes),
            "commands_awaiting_result": len(self._sent),
            "stats": asdict(self.stats),
        }

    # -- outbound -----------------------------------------------------------------------------
    def _decided(self, decisions: Iterable[Decision]) -> None:
        now = self.clock()
        for d in decisions:
            note = notification(d, now)
            if note is not None:
                if len(self._notes) >= NOTIFICATION_QUEUE_MAX:
                    self._notes.popleft()
                    self.stats.notifications_dropped += 1
                self._notes.append(json.dumps(note, separators=(",", ":")).encode())
            if d.command_id is not None:
                self._kick.set()
        if self._notes:
            self._kick.set()

    def kick(self) -> None:
        """Wake the control loop now (new commands or notifications to send)."""
        self._kick.set()

    def tick(self) -> None:
        ev = self.controller.tick(self.clock())
        self.stats.ticks += 1
        self._decided(ev.decisions)

    async def flush(self) -> None:
        """Send ``ISSUED`` commands not yet sent (or due for a resend), then notifications.
        Stops at the first transport failure; the next flush carries on."""
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
                if key is None:  # load_service_config refuses this for configured accounts
                    log.error("command not sent id=%s gateway=%s reason=no_key", c.command_id, c.gateway)
                    continue
                payload = SignedCommand(**c.fields()).signed(key)  # type: ignore[arg-type]
                await self.publisher.publish(command_topic(c.gateway), payload, qos=1)
                self._sent[c.command_id] = now
                if last is None:
                    self.stats.commands_sent += 1
                    log.info(
                        "command sent id=%s gateway=%s meter=%s action=%s attempt=%s",
                        c.command_id,
                        c.gateway,
                        c.meter,
                        c.action.value,
                        c.attempt,
                    )
                else:
                    self.stats.commands_resent += 1
            while self._notes:
                await self.publisher.publish(NOTIFICATIONS_TOPIC, self._notes[0], qos=1)
                self._notes.popleft()
                self.stats.notifications_sent += 1
        except TransportError as exc:
            self.stats.publish_failures += 1
            if not self._link_down:
                log.error("publish failed reason=%s", exc)
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
        from .api import PaymentsApi

        self.enroll()
        async with contextlib.AsyncExitStack() as stack:
            if self.publisher is None:
                self.publisher = await stack.enter_async_context(MqttPublisher(self.cfg))
            server = None
            if self.cfg.service.http.enabled and self.cfg.api_token is not None:
                api = PaymentsApi(
                    self, self.cfg.api_token, max_body_bytes=self.cfg.service.http.max_body_bytes
                )
                server = await api.start(self.cfg.service.http.host, self.cfg.service.http.port)
                stack.push_async_callback(_close_server, server)
                self.api_address = server.sockets[0].getsockname()[:2]
                log.info("http api listening host=%s port=%s", *self.api_address)
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._consume_loop(), name="feectl-consume"),
                    tg.create_task(self._control_loop(), name="feectl-control"),
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
                except (AmigwError, sqlite3.Error) as exc:
                    log.error("tick failed reason=%s", exc)
                next_tick = self.clock() + tick_ms
            try:
                await self.flush()
            except (AmigwError, sqlite3.Error) as exc:
                log.error("flush failed reason=%s", exc)
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0, next_tick - self.clock()) / 1000):
                    await self._kick.wait()

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
                        if await self._apply(msg.topic, msg.payload):
                            await consumer.ack(msg)
                return
            except TransportError as exc:
                log.error("mqtt subscribe failed reason=%s retry_s=%s", exc, delay)
            finally:
                self.consumer = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _apply(self, topic: str, payload: bytes) -> bool:
        delay = 0.5
        while True:
            try:
                return self.handle_message(topic, payload)
            except sqlite3.Error as exc:
                log.error("ledger write failed topic=%s reason=%s retry_s=%s", topic, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


def install_signal_handlers(service: FeeControlService) -> None:
    """SIGTERM and SIGINT stop the service cleanly (subscriptions closed, ledger closed)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
